using System.Security.Cryptography;
using Kvm.Storage.Raw;

namespace Kvm.Storage.Tests;

public sealed class RawImageTests : IDisposable
{
    private const ulong MiB = 1 << 20;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public void Create_MakesASparseFileOfTheRequestedSize_ThatReadsAsZeros()
    {
        var path = _dir.File("disk.raw");
        using (var img = RawImage.Create(path, 8 * MiB + 512))
        {
            Assert.Equal(8 * MiB + 512, img.Size);
            Assert.False(img.ReadOnly);
            Assert.Null(img.Backing);
            Assert.Equal(path, img.Path);
            var buf = new byte[3 * MiB];
            buf.AsSpan().Fill(0xCC);
            img.Read(5 * MiB + 512, buf);
            Assert.True(buf.AsSpan().IndexOfAnyExcept((byte)0) < 0, "a new raw image must read as zeros");
            Assert.Equal([new Extent(0, img.Size, ExtentKind.Zero)], img.GetAllocation(0, img.Size));
        }
        Assert.Equal((long)(8 * MiB + 512), new FileInfo(path).Length);
        Assert.True(AllocatedBytes(path) < 64 * 1024, $"a new image should be sparse, but {AllocatedBytes(path)} bytes are allocated");
    }

    [Fact]
    public void Create_RefusesAnExistingFile_AndLeavesItAlone()
    {
        var path = _dir.File("exists.raw");
        File.WriteAllBytes(path, [1, 2, 3]);
        var e = Assert.ThrowsAny<IOException>(() => RawImage.Create(path, MiB));
        Assert.Contains(path, e.Message);
        Assert.Equal([1, 2, 3], File.ReadAllBytes(path));
    }

    [Fact]
    public void Open_MissingFile_Throws()
    {
        Assert.Throws<FileNotFoundException>(() => RawImage.Open(_dir.File("nope.raw")));
    }

    [Fact]
    public void WritesRoundTripAcrossReopen_AtUnalignedOffsets()
    {
        var path = _dir.File("disk.raw");
        var writes = new (ulong Offset, byte[] Data)[]
        {
            (0, RandomWorkload.Pattern(1, 0, 512)),
            (4095, RandomWorkload.Pattern(1, 1, 2)),          // straddles a 4 KiB block
            (65536 - 7, RandomWorkload.Pattern(1, 2, 70000)), // straddles a 64 KiB cluster
            (3 * MiB - 1, RandomWorkload.Pattern(1, 3, 1)),
            (4 * MiB - 100, RandomWorkload.Pattern(1, 4, 100)), // ends exactly at the end of the image
        };
        using (var img = RawImage.Create(path, 4 * MiB))
        {
            foreach (var (offset, data) in writes)
                img.Write(offset, data);
            img.Flush();
        }
        using (var img = RawImage.Open(path))
        {
            Assert.Equal(4 * MiB, img.Size);
            foreach (var (offset, data) in writes)
            {
                var back = new byte[data.Length];
                img.Read(offset, back);
                Assert.Equal(data, back);
            }
            // The bytes around each write are still zeros.
            var around = new byte[2];
            img.Read(4094, around.AsSpan(0, 1));
            img.Read(4097, around.AsSpan(1, 1));
            Assert.Equal(new byte[2], around);
        }
        // And the file itself holds exactly those bytes at those offsets.
        var file = File.ReadAllBytes(path);
        foreach (var (offset, data) in writes)
            Assert.Equal(data, file.AsSpan((int)offset, data.Length).ToArray());
    }

    [SkippableFact]
    public void ReadsImagesMadeByQemu()
    {
        QemuImg.Require();
        var path = _dir.File("q.raw");
        QemuImg.Create(path, "raw", 2 * MiB);
        QemuImg.Io(path, "raw", "write -P 0xab 0 64k", "write -P 0x5c 1000 3000", "write -P 0x11 2044k 4k");
        using var img = RawImage.Open(path, readOnly: true);
        Assert.Equal(2 * MiB, img.Size);
        var buf = new byte[2 * MiB];
        img.Read(0, buf);
        var expected = new byte[2 * MiB];
        expected.AsSpan(0, 65536).Fill(0xab);
        expected.AsSpan(1000, 3000).Fill(0x5c);
        expected.AsSpan((int)(2 * MiB - 4096), 4096).Fill(0x11);
        Assert.True(expected.AsSpan().SequenceEqual(buf), "raw image content differs from what qemu-io wrote");
    }

    [Fact]
    public void ReadsPastTheEndOfAShortenedFile_ReturnZeros()
    {
        var path = _dir.File("short.raw");
        using var img = RawImage.Create(path, MiB);
        img.Write(0, Enumerable.Repeat((byte)0x77, 200_000).ToArray());
        // Something else shortens the file while the image is open.
        using (var fs = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
            fs.SetLength(100_000);
        var buf = new byte[100];
        buf.AsSpan().Fill(0xEE);
        img.Read(99_950, buf);
        Assert.True(buf.AsSpan(0, 50).IndexOfAnyExcept((byte)0x77) < 0);
        Assert.True(buf.AsSpan(50).IndexOfAnyExcept((byte)0) < 0, "bytes past the end of the file must read as zeros");
        buf.AsSpan().Fill(0xEE);
        img.Read(500_000, buf);
        Assert.True(buf.AsSpan().IndexOfAnyExcept((byte)0) < 0);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void WriteZeroesAndDiscard_PunchHoles(bool discard)
    {
        var path = _dir.File("holes.raw");
        using var img = RawImage.Create(path, 4 * MiB);
        var data = RandomWorkload.Pattern(7, 0, (int)(4 * MiB));
        img.Write(0, data);
        img.Flush();
        var before = AllocatedBytes(path);
        Assert.Equal([new Extent(0, 4 * MiB, ExtentKind.Data)], img.GetAllocation(0, 4 * MiB));

        if (discard)
            img.Discard(MiB, MiB);
        else
            img.WriteZeroes(MiB, MiB);

        Assert.Equal(
            [new Extent(0, MiB, ExtentKind.Data), new Extent(MiB, MiB, ExtentKind.Zero), new Extent(2 * MiB, 2 * MiB, ExtentKind.Data)],
            img.GetAllocation(0, 4 * MiB));
        var after = AllocatedBytes(path);
        Assert.True(before - after >= (long)MiB, $"expected about 1 MiB freed, allocated went from {before} to {after}");

        var back = new byte[4 * MiB];
        img.Read(0, back);
        Array.Clear(data, (int)MiB, (int)MiB);
        Assert.True(data.AsSpan().SequenceEqual(back), "content after zeroing differs");
    }

    [Fact]
    public void WriteZeroes_OnUnalignedRange_ZeroesExactlyThoseBytes()
    {
        using var img = RawImage.Create(_dir.File("u.raw"), MiB);
        var data = RandomWorkload.Pattern(3, 0, (int)MiB);
        for (var i = 0; i < data.Length; i++)
            data[i] |= 1; // no zero bytes, so that every zeroed byte shows
        img.Write(0, data);
        img.WriteZeroes(100, 5000);
        img.Discard(300_001, 70_000);
        Array.Clear(data, 100, 5000);
        Array.Clear(data, 300_001, 70_000);
        var back = new byte[MiB];
        img.Read(0, back);
        Assert.Equal(data.Length, data.AsSpan().CommonPrefixLength(back)); // else: the index of the first wrong byte
        // The whole 4 KiB blocks inside the discarded range became a hole, the edges stay data.
        var map = img.GetAllocation(0, MiB);
        var zero = Assert.Single(map, e => e.Kind == ExtentKind.Zero);
        Assert.Equal(RoundUp(300_001, 4096), zero.Offset);
        Assert.Equal(RoundDown(370_001, 4096), zero.Offset + zero.Length);
    }

    [Fact]
    public void GetAllocation_ClipsToTheRequestedRange_AndMergesNeighbours()
    {
        using var img = RawImage.Create(_dir.File("a.raw"), 8 * MiB);
        img.Write(MiB, new byte[MiB].Select(_ => (byte)1).ToArray());
        img.Write(2 * MiB, new byte[MiB].Select(_ => (byte)2).ToArray()); // adjacent: one Data extent
        img.Write(6 * MiB, new byte[4096].Select(_ => (byte)3).ToArray());

        Assert.Equal(
            [new Extent(0, MiB, ExtentKind.Zero), new Extent(MiB, 2 * MiB, ExtentKind.Data),
             new Extent(3 * MiB, 3 * MiB, ExtentKind.Zero), new Extent(6 * MiB, 4096, ExtentKind.Data),
             new Extent(6 * MiB + 4096, 2 * MiB - 4096, ExtentKind.Zero)],
            img.GetAllocation(0, 8 * MiB));
        Assert.Equal(
            [new Extent(MiB + 10, 2 * MiB - 10, ExtentKind.Data), new Extent(3 * MiB, 100, ExtentKind.Zero)],
            img.GetAllocation(MiB + 10, 2 * MiB + 90));
        Assert.Equal([new Extent(4 * MiB, 4096, ExtentKind.Zero)], img.GetAllocation(4 * MiB, 4096));
        Assert.Empty(img.GetAllocation(5 * MiB, 0));
        Assert.All(img.GetAllocation(0, 8 * MiB), e => Assert.Equal(0, e.Depth));
    }

    [SkippableFact]
    public void GetAllocation_AgreesWithQemuImgMap()
    {
        QemuImg.Require();
        var path = _dir.File("m.raw");
        using (var img = RawImage.Create(path, 16 * MiB))
        {
            var w = new RandomWorkload(new WorkloadOptions { Seed = 11, Size = img.Size, Operations = 300, Alignment = 4096 });
            using var reference = RawReference.Create(_dir.File("m.ref"), img.Size);
            w.Run(img, reference);
            var ours = img.GetAllocation(0, img.Size);
            Assert.Contains(ours, e => e.Kind == ExtentKind.Zero);
            Assert.Contains(ours, e => e.Kind == ExtentKind.Data);
            img.Flush();
            var theirs = Merge(QemuImg.Map(path, "raw")
                .Select(m => new Extent(m.Start, m.Length, m.Data ? ExtentKind.Data : ExtentKind.Zero)));
            Assert.Equal(theirs, ours);
        }
    }

    [Fact]
    public void OutOfBounds_IsRefusedWithOffsetLengthAndSize()
    {
        var path = _dir.File("b.raw");
        using var img = RawImage.Create(path, MiB);
        var hash = Hash(path);
        var cases = new (string Name, Action Call, ulong Offset, ulong Length)[]
        {
            ("read", () => img.Read(MiB - 10, new byte[11]), MiB - 10, 11),
            ("write", () => img.Write(MiB, new byte[1]), MiB, 1),
            ("zeroes", () => img.WriteZeroes(MiB - 4096, 8192), MiB - 4096, 8192),
            ("discard", () => img.Discard(2 * MiB, 1), 2 * MiB, 1),
            ("allocation", () => img.GetAllocation(1, MiB), 1, MiB),
            ("overflow", () => img.Write(ulong.MaxValue - 1, new byte[4]), ulong.MaxValue - 1, 4),
            ("overflow zeroes", () => img.WriteZeroes(512, ulong.MaxValue), 512, ulong.MaxValue),
        };
        foreach (var (name, call, offset, length) in cases)
        {
            var e = Assert.Throws<ArgumentOutOfRangeException>(call);
            Assert.True(e.Message.Contains(offset.ToString()) && e.Message.Contains(length.ToString()) && e.Message.Contains(MiB.ToString()),
                $"{name}: the message should name offset {offset}, length {length} and size {MiB}: {e.Message}");
        }
        // Ranges that end exactly at the end are fine.
        img.Write(MiB - 1, new byte[1]);
        img.Read(MiB, Span<byte>.Empty);
        Assert.Equal(hash, Hash(path));
    }

    [Fact]
    public void ReadOnly_RefusesEveryWrite_NamingTheFile_AndChangesNothing()
    {
        var path = _dir.File("ro.raw");
        using (var img = RawImage.Create(path, MiB))
            img.Write(0, RandomWorkload.Pattern(5, 0, 300_000));
        var hash = Hash(path);
        using (var img = RawImage.Open(path, readOnly: true))
        {
            Assert.True(img.ReadOnly);
            foreach (var call in new Action[]
                     {
                         () => img.Write(0, new byte[10]),
                         () => img.WriteZeroes(0, 65536),
                         () => img.Discard(0, 65536),
                     })
            {
                var e = Assert.Throws<InvalidOperationException>(call);
                Assert.Contains(path, e.Message);
            }
            img.Flush();
            var buf = new byte[10];
            img.Read(0, buf);
            Assert.Equal(RandomWorkload.Pattern(5, 0, 10), buf);
        }
        Assert.Equal(hash, Hash(path));
    }

    [Fact]
    public void Disposed_ImageRefusesIo()
    {
        var img = RawImage.Create(_dir.File("d.raw"), MiB);
        img.Dispose();
        Assert.Throws<ObjectDisposedException>(() => img.Read(0, new byte[1]));
        Assert.Throws<ObjectDisposedException>(() => img.Write(0, new byte[1]));
        Assert.Throws<ObjectDisposedException>(() => img.WriteZeroes(0, 4096));
        Assert.Throws<ObjectDisposedException>(() => img.GetAllocation(0, 4096));
    }

    [Fact]
    public void ConcurrentWritersAndReaders_OnDisjointRanges()
    {
        const int threads = 16, chunksPerThread = 64, chunk = 12_345; // odd size: chunks straddle blocks
        var size = (ulong)(threads * chunksPerThread * chunk);
        using var img = RawImage.Create(_dir.File("c.raw"), size);
        ConcurrentThreads.Run(threads, (t, errors) =>
        {
            // Chunks are interleaved: thread t owns chunk t, t+threads, … so neighbours write next to each other.
            for (var i = 0; i < chunksPerThread; i++)
            {
                var index = i * threads + t;
                img.Write((ulong)index * chunk, RandomWorkload.Pattern(t, i, chunk));
                if (i % 8 == 7)
                    img.Flush();
                var back = new byte[chunk];
                img.Read((ulong)index * chunk, back);
                if (!back.AsSpan().SequenceEqual(RandomWorkload.Pattern(t, i, chunk)))
                    errors.Enqueue($"thread {t} chunk {i} read back wrong data right after writing it");
            }
        });

        var all = new byte[size];
        img.Read(0, all);
        for (var t = 0; t < threads; t++)
        {
            for (var i = 0; i < chunksPerThread; i++)
            {
                var index = i * threads + t;
                Assert.True(all.AsSpan(index * chunk, chunk).SequenceEqual(RandomWorkload.Pattern(t, i, chunk)),
                    $"chunk {index} (thread {t}, write {i}) holds the wrong data");
            }
        }
    }

    [SkippableFact]
    public void RandomWorkload_MatchesReference_AndQemuAgrees()
    {
        QemuImg.Require();
        var path = _dir.File("w.raw");
        var refPath = _dir.File("w.ref");
        const ulong size = 64 * MiB + 4096 + 512; // not a multiple of the cluster size
        var workload = new RandomWorkload(new WorkloadOptions { Seed = 20240601, Size = size, ClusterSize = 65536, Operations = 4000 });
        WorkloadStats stats;
        using (var img = RawImage.Create(path, size))
        using (var reference = RawReference.Create(refPath, size))
        {
            stats = workload.Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
            img.Flush();
        }
        Assert.Equal(4000, stats.Total);
        Assert.True(stats.Writes > 1000 && stats.WriteZeroes > 300 && stats.Discards > 300 && stats.Flushes > 50 && stats.Reads > 700, stats.ToString());
        Assert.True(stats.CrossingClusterBoundary > 1000, $"too few ops cross a cluster boundary: {stats}");
        Assert.True(stats.Unaligned > 1000, $"too few unaligned ops: {stats}");

        var cmp = QemuImg.Compare(path, refPath, "raw", "raw");
        Assert.True(cmp.Identical, cmp.Output);
        var info = Assert.Single(QemuImg.Info(path));
        Assert.Equal("raw", info.Format);
        Assert.Equal(size, info.VirtualSize);

        // Reopened, the image still matches the reference everywhere.
        using (var img = RawImage.Open(path, readOnly: true))
        using (var reference = RawReference.Open(refPath))
            RandomWorkload.VerifyAll(img, reference);
    }

    [SkippableFact]
    public void QemuImgInfo_ReportsRawAndTheVirtualSize()
    {
        QemuImg.Require();
        var path = _dir.File("i.raw");
        using (RawImage.Create(path, 3 * MiB + 512))
        {
        }
        var info = Assert.Single(QemuImg.Info(path));
        Assert.Equal("raw", info.Format);
        Assert.Equal(3 * MiB + 512, info.VirtualSize);
        Assert.Null(info.BackingFilename);
    }

    internal static string Hash(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    /// <summary>Bytes the filesystem has allocated for a file (st_blocks * 512), via du.</summary>
    internal static long AllocatedBytes(string path)
    {
        var r = Kvm.Tests.Shared.TestEnvironment.RunProcess("stat", ["-c", "%b %B", path], TimeSpan.FromSeconds(30));
        var parts = r.Stdout.Trim().Split(' ');
        return long.Parse(parts[0]) * long.Parse(parts[1]);
    }

    internal static List<Extent> Merge(IEnumerable<Extent> extents)
    {
        var list = new List<Extent>();
        foreach (var e in extents)
        {
            if (list.Count > 0 && list[^1].Kind == e.Kind && list[^1].Depth == e.Depth && list[^1].Offset + list[^1].Length == e.Offset)
                list[^1] = list[^1] with { Length = list[^1].Length + e.Length };
            else
                list.Add(e);
        }
        return list;
    }

    private static ulong RoundUp(ulong v, ulong a) => (v + a - 1) / a * a;

    private static ulong RoundDown(ulong v, ulong a) => v / a * a;
}
