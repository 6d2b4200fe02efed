using System.Buffers.Binary;
using Kvm.Storage.Raw;

namespace Kvm.Storage.Tests;

/// <summary>The oracles and the workload must be able to say "wrong": these tests feed them wrong images.</summary>
public sealed class HarnessTests : IDisposable
{
    private const ulong MiB = 1 << 20;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public void Workload_IsReproducible_AndDependsOnTheSeed()
    {
        var a = new RandomWorkload(new WorkloadOptions { Seed = 1, Size = 64 * MiB }).Generate();
        var b = new RandomWorkload(new WorkloadOptions { Seed = 1, Size = 64 * MiB }).Generate();
        var c = new RandomWorkload(new WorkloadOptions { Seed = 2, Size = 64 * MiB }).Generate();
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
        Assert.Equal(RandomWorkload.Pattern(1, 5, 1000), RandomWorkload.Pattern(1, 5, 1000));
        Assert.NotEqual(RandomWorkload.Pattern(1, 5, 1000), RandomWorkload.Pattern(1, 6, 1000));
        Assert.NotEqual(RandomWorkload.Pattern(1, 5, 1000), RandomWorkload.Pattern(2, 5, 1000));
        Assert.All(a, op => Assert.True(op.Offset + op.Length <= 64 * MiB && (op.Kind == WorkloadOpKind.Flush || op.Length > 0)));
    }

    [Theory]
    [InlineData(512)]
    [InlineData(65536)]
    [InlineData(2 * 1024 * 1024)]
    public void Workload_CrossesClusterBoundaries_AndRespectsAlignment(int clusterSize)
    {
        var ops = new RandomWorkload(new WorkloadOptions { Seed = 9, Size = 256 * MiB, ClusterSize = clusterSize, Alignment = 512, MaxLength = 8 * MiB })
            .Generate().Where(o => o.Kind != WorkloadOpKind.Flush).ToList();
        var cs = (ulong)clusterSize;
        Assert.All(ops, o => Assert.True(o.Offset % 512 == 0 && o.Length % 512 == 0, o.ToString()));
        var crossing = ops.Count(o => o.Offset / cs != (o.Offset + o.Length - 1) / cs);
        var partial = ops.Count(o => o.Offset % cs != 0 || o.Length % cs != 0);
        var whole = ops.Count(o => o.Offset % cs == 0 && o.Length % cs == 0);
        Assert.True(crossing > ops.Count / 5, $"{crossing} of {ops.Count} cross a boundary");
        Assert.True(whole > ops.Count / 10, $"{whole} of {ops.Count} cover whole clusters");
        if (clusterSize > 512)
            Assert.True(partial > ops.Count / 5, $"{partial} of {ops.Count} touch part of a cluster");
    }

    [Fact]
    public void Workload_DiscardsWholeClusters_WhenDiscardExposesBacking()
    {
        var backing = _dir.File("b.raw");
        File.WriteAllBytes(backing, new byte[1]);
        var ops = new RandomWorkload(new WorkloadOptions
        {
            Seed = 3, Size = 10 * MiB + 512, DiscardExposesBacking = true, BackingContent = backing,
        }).Generate();
        var discards = ops.Where(o => o.Kind == WorkloadOpKind.Discard).ToList();
        Assert.NotEmpty(discards);
        Assert.All(discards, o => Assert.True(o.Offset % 65536 == 0 && (o.Length % 65536 == 0 || o.Offset + o.Length == 10 * MiB + 512), o.ToString()));
    }

    public static TheoryData<string> Faults => new() { "drop-write", "short-write", "discard-noop", "zeroes-noop", "stale-read" };

    [Theory]
    [MemberData(nameof(Faults))]
    public void Workload_CatchesAFaultyImage(string fault)
    {
        const ulong size = 8 * MiB;
        using var inner = RawImage.Create(_dir.File("f.raw"), size);
        using var img = new FaultyImage(inner, fault);
        using var reference = RawReference.Create(_dir.File("f.ref"), size);
        var workload = new RandomWorkload(new WorkloadOptions { Seed = 4, Size = size, Operations = 2000 });
        var e = Assert.Throws<WorkloadMismatchException>(() =>
        {
            workload.Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
        });
        Assert.Contains("mismatch at guest offset", e.Message);
    }

    [Fact]
    public void Workload_PassesACorrectImage()
    {
        const ulong size = 8 * MiB;
        using var img = RawImage.Create(_dir.File("ok.raw"), size);
        using var reference = RawReference.Create(_dir.File("ok.ref"), size);
        var stats = new RandomWorkload(new WorkloadOptions { Seed = 4, Size = size, Operations = 2000 }).Run(img, reference);
        RandomWorkload.VerifyAll(img, reference);
        Assert.True(stats.BytesVerified > 0 && stats.BytesWritten > 0);
    }

    [SkippableFact]
    public void QemuCompare_SeesAOneByteDifference()
    {
        QemuImg.Require();
        var a = _dir.File("a.raw");
        var b = _dir.File("b.raw");
        var data = RandomWorkload.Pattern(1, 1, (int)MiB);
        File.WriteAllBytes(a, data);
        data[777_777] ^= 1;
        File.WriteAllBytes(b, data);
        var r = QemuImg.Compare(a, b, "raw", "raw");
        Assert.False(r.Identical);
        Assert.Contains("777728", r.Output); // the 512-byte sector holding the difference
        Assert.True(QemuImg.Compare(a, a, "raw", "raw").Identical);
    }

    [SkippableFact]
    public void QemuCheck_ReportsLeaksAndCorruptions()
    {
        QemuImg.Require();
        var path = _dir.File("c.qcow2");
        QemuImg.Create(path, "qcow2", 16 * MiB);
        QemuImg.Io(path, "qcow2", "write -P 0x11 0 64k");
        var clean = QemuImg.Check(path);
        Assert.True(clean.Clean, clean.ToString());
        Assert.Equal(1, clean.AllocatedClusters);

        // A leak: give an unused cluster past the end a refcount of 1, and make the file long enough to hold it.
        var leaky = _dir.File("leak.qcow2");
        File.Copy(path, leaky);
        var bytes = File.ReadAllBytes(leaky);
        var clusterCount = bytes.Length / 65536;
        var refBlock = RefcountBlockOffset(bytes);
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(refBlock + 2 * (clusterCount + 1)), 1);
        Array.Resize(ref bytes, (clusterCount + 2) * 65536);
        File.WriteAllBytes(leaky, bytes);
        var leak = QemuImg.Check(leaky);
        Assert.Equal(3, leak.ExitCode);
        Assert.Equal(1, leak.Leaks);
        Assert.Equal(0, leak.Corruptions);
        Assert.False(leak.Clean);
        var repaired = QemuImg.Check(leaky, repair: "leaks");
        Assert.Equal(0, repaired.ExitCode);
        Assert.True(QemuImg.Check(leaky).Clean);

        // A corruption: the header cluster's refcount drops to 0 while it is in use.
        var corrupt = _dir.File("corrupt.qcow2");
        File.Copy(path, corrupt);
        bytes = File.ReadAllBytes(corrupt);
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(RefcountBlockOffset(bytes)), 0);
        File.WriteAllBytes(corrupt, bytes);
        var bad = QemuImg.Check(corrupt);
        Assert.Equal(2, bad.ExitCode);
        Assert.True(bad.Corruptions > 0, bad.ToString());
    }

    [SkippableFact]
    public void QemuIo_ThrowsWhenAPatternDoesNotMatch()
    {
        QemuImg.Require();
        var path = _dir.File("p.qcow2");
        QemuImg.Create(path, "qcow2", MiB);
        QemuImg.Io(path, "qcow2", "write -P 0xab 0 4k", "read -P 0xab 0 4k");
        var e = Assert.Throws<InvalidOperationException>(() => QemuImg.Io(path, "qcow2", "read -P 0xcd 0 4k"));
        Assert.Contains("qemu-io", e.Message);
        Assert.Contains("read -P 0xcd 0 4k", e.Message);
    }

    /// <summary>The first refcount block of a 64 KiB-cluster qcow2 image (header fields are big-endian).</summary>
    private static int RefcountBlockOffset(byte[] image)
    {
        var table = (int)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(48));
        return (int)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(table));
    }

    /// <summary>An image with one deliberate bug.</summary>
    private sealed class FaultyImage(IBlockImage inner, string fault) : IBlockImage
    {
        private int _writes;

        public string Path => inner.Path;
        public ulong Size => inner.Size;
        public bool ReadOnly => inner.ReadOnly;
        public IBlockImage? Backing => inner.Backing;

        public void Read(ulong offset, Span<byte> destination)
        {
            inner.Read(offset, destination);
            if (fault == "stale-read" && destination.Length > 4096 && offset % 3 == 0)
                destination[^1] ^= 0x40;
        }

        public void Write(ulong offset, ReadOnlySpan<byte> source)
        {
            var n = Interlocked.Increment(ref _writes);
            if (fault == "drop-write" && n % 50 == 0)
                return;
            if (fault == "short-write" && source.Length > 1)
                source = source[..^1];
            inner.Write(offset, source);
        }

        public void WriteZeroes(ulong offset, ulong length)
        {
            if (fault != "zeroes-noop")
                inner.WriteZeroes(offset, length);
        }

        public void Discard(ulong offset, ulong length)
        {
            if (fault != "discard-noop")
                inner.Discard(offset, length);
        }

        public void Flush() => inner.Flush();

        public IReadOnlyList<Extent> GetAllocation(ulong offset, ulong length) => inner.GetAllocation(offset, length);

        public void Dispose()
        {
        }
    }
}
