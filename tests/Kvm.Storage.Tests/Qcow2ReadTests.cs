using Kvm.Storage.Qcow2;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>The engine reads images that qemu-img and qemu-io made exactly as qemu does.</summary>
public sealed class Qcow2ReadTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [SkippableTheory]
    [InlineData(512, "1.1")]
    [InlineData(65536, "1.1")]
    [InlineData(2 * 1024 * 1024, "1.1")]
    [InlineData(65536, "0.10")]
    [InlineData(4096, "0.10")]
    public void ReadsImagesWrittenByQemuIo(int clusterSize, string compat)
    {
        QemuImg.Require();
        var cs = (ulong)clusterSize;
        var size = 32 * MiB + (compat == "1.1" ? 0UL : 512UL);
        var path = _dir.File("q.qcow2");
        QemuImg.Create(path, "qcow2", size, clusterSize, extraOptions: [$"compat={compat}"]);
        QemuImg.Io(path, "qcow2", PatternWrites(size, cs, 1));
        QemuImg.Io(path, "qcow2",
            $"write -z {size / 4 + cs} {2 * cs}",     // whole clusters zeroed over data
            $"write -z {cs + 1000} 3000",              // partial zeroing
            $"discard {size / 4 + 4 * cs} {cs}");      // a discarded cluster
        var raw = QemuToRaw(path, _dir.File("q.raw"));

        using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
        Assert.Equal(size, img.Size);
        Assert.Equal(clusterSize, img.ClusterSize);
        Assert.Equal(compat == "1.1" ? 3 : 2, img.Version);
        Assert.Null(img.BackingFile);
        Assert.Null(img.Backing);
        AssertContentEquals(img, raw);
    }

    [SkippableFact]
    public void DiskImageOpen_DetectsTheFormat()
    {
        QemuImg.Require();
        var q = _dir.File("d.qcow2");
        var r = _dir.File("d.img");
        QemuImg.Create(q, "qcow2", 4 * MiB);
        QemuImg.Create(r, "raw", 4 * MiB);
        QemuImg.Io(q, "qcow2", "write -P 0x61 0 64k");
        QemuImg.Io(r, "raw", "write -P 0x62 0 64k");
        using (var img = DiskImage.Open(q))
        {
            var qi = Assert.IsType<Qcow2Image>(img);
            Assert.False(qi.ReadOnly);
            var b = new byte[1];
            img.Read(65535, b);
            Assert.Equal(0x61, b[0]);
        }
        using (var img = DiskImage.Open(r, new ImageOpenOptions { ReadOnly = true }))
        {
            Assert.IsType<Raw.RawImage>(img);
            Assert.True(img.ReadOnly);
            var b = new byte[1];
            img.Read(65535, b);
            Assert.Equal(0x62, b[0]);
        }
    }

    [SkippableFact]
    public void GetAllocation_AgreesWithQemuImgMap()
    {
        QemuImg.Require();
        const ulong size = 16 * MiB, cs = 65536;
        var path = _dir.File("m.qcow2");
        QemuImg.Create(path, "qcow2", size, (int)cs);
        QemuImg.Io(path, "qcow2", PatternWrites(size, cs, 2));
        QemuImg.Io(path, "qcow2", $"write -z {size / 4 + cs} {2 * cs}", $"write -z -u {size / 4 + 5 * cs} {cs}", $"write -z {8 * MiB} {3 * cs}");
        var map = QemuImg.Map(path);
        Assert.Contains(map, m => m.Zero && m.Present && !m.Data); // the oracle saw zero clusters, so this test can fail

        using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
        var ours = PerCluster(img.GetAllocation(0, size).Select(e => (e.Offset, e.Length, e.Kind)), size, cs);
        var theirs = PerCluster(map.Select(m => (m.Start, m.Length,
            m.Data ? ExtentKind.Data : m.Present ? ExtentKind.Zero : ExtentKind.Unallocated)), size, cs);
        for (var i = 0; i < ours.Length; i++)
            Assert.True(ours[i] == theirs[i], $"cluster {i} (offset {(ulong)i * cs}): engine says {ours[i]}, qemu-img map says {theirs[i]}");

        // Extents come in order, cover the range exactly and are merged.
        var extents = img.GetAllocation(100, size - 200);
        Assert.Equal(100UL, extents[0].Offset);
        for (var i = 1; i < extents.Count; i++)
        {
            Assert.Equal(extents[i - 1].Offset + extents[i - 1].Length, extents[i].Offset);
            Assert.False(extents[i - 1].Kind == extents[i].Kind && extents[i - 1].Depth == extents[i].Depth, $"extents {i - 1} and {i} should be merged");
        }
        Assert.Equal(size - 100, extents[^1].Offset + extents[^1].Length);
    }

    [SkippableFact]
    public void ZeroClusters_HideTheBackingFile()
    {
        QemuImg.Require();
        var basePath = _dir.File("base.qcow2");
        var child = _dir.File("child.qcow2");
        QemuImg.Create(basePath, "qcow2", 8 * MiB);
        QemuImg.Io(basePath, "qcow2", "write -P 0xaa 0 8M");
        QemuImg.Create(child, "qcow2", null, backing: "base.qcow2", backingFormat: "qcow2");
        QemuImg.Io(child, "qcow2", "write -z 1M 1M", "write -z -u 3M 128k", $"write -z {2 * MiB + 100} 5000", "write -P 0xbb 5M 4k", "write -z 5M 4k");
        var raw = QemuToRaw(child, _dir.File("child.raw"));

        using var img = Qcow2Image.Open(child, new ImageOpenOptions { ReadOnly = true });
        Assert.NotNull(img.Backing);
        AssertContentEquals(img, raw);
        var buf = new byte[MiB];
        img.Read(MiB, buf);
        Assert.True(buf.AsSpan().IndexOfAnyExcept((byte)0) < 0, "zero clusters must read as zeros, not the backing file's 0xaa");
        img.Read(0, buf);
        Assert.True(buf.AsSpan().IndexOfAnyExcept((byte)0xaa) < 0, "unallocated clusters read the backing file");
        Assert.Equal([new Extent(MiB, MiB, ExtentKind.Zero)], img.GetAllocation(MiB, MiB));
        Assert.Equal([new Extent(3 * MiB, 128 * KiB, ExtentKind.Zero)], img.GetAllocation(3 * MiB, 128 * KiB));
    }

    [SkippableTheory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * 1024 * 1024)]
    public void ReadsCompressedClusters(int clusterSize)
    {
        QemuImg.Require();
        var size = clusterSize >= 2 * 1024 * 1024 ? 16 * MiB : 8 * MiB;
        var source = _dir.File("src.raw");
        File.WriteAllBytes(source, MixedContent(size, 5, clusterSize));
        var path = _dir.File("c.qcow2");
        QemuImg.Convert(source, path, "qcow2", "raw", compress: true, clusterSize: clusterSize);
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        Assert.True(check.CompressedClusters > 0, $"qemu-img stored no compressed clusters, so this test would prove nothing: {check}");
        Assert.True(check.CompressedClusters < check.AllocatedClusters, $"some clusters should be stored uncompressed too: {check}");

        using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
        Assert.Equal(clusterSize, img.ClusterSize);
        AssertContentEquals(img, source);
        // Reads that start and end inside compressed clusters.
        var cs = (ulong)clusterSize;
        using var reference = RawReference.Open(source);
        foreach (var (off, len) in new[] { (cs / 2, cs), (3 * cs - 7, 14UL), (size / 2 + 1, 3 * cs + 5) })
            RandomWorkload.VerifyRange(img, reference, off, len, () => $"compressed read at {off} length {len}");
    }

    [SkippableFact]
    public void WritesOverCompressedClusters()
    {
        QemuImg.Require();
        const ulong size = 8 * MiB;
        var source = _dir.File("src.raw");
        File.WriteAllBytes(source, MixedContent(size, 6));
        var path = _dir.File("c.qcow2");
        QemuImg.Convert(source, path, "qcow2", "raw", compress: true);
        Assert.True(QemuImg.Check(path).CompressedClusters > 0);

        var refPath = _dir.File("c.ref");
        using (var img = Qcow2Image.Open(path))
        using (var reference = RawReference.Create(refPath, size, source))
        {
            new RandomWorkload(new WorkloadOptions { Seed = 66, Size = size, Operations = 800 }).Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
        }
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        var cmp = QemuImg.Compare(path, refPath, "qcow2", "raw");
        Assert.True(cmp.Identical, cmp.Output);
    }

    [SkippableTheory]
    [InlineData("qcow2")]
    [InlineData("raw")]
    public void ReadsABackingChainOfDepthThree(string baseFormat)
    {
        QemuImg.Require();
        var folder = System.IO.Path.Combine(_dir.Path, "chain");
        var basePath = _dir.File($"chain/base.{baseFormat}");
        var mid = _dir.File("chain/mid.qcow2");
        var top = _dir.File("chain/top.qcow2");
        // The layers grow: reads past the end of a smaller backing file are zeros.
        QemuImg.Create(basePath, baseFormat, 8 * MiB);
        QemuImg.Io(basePath, baseFormat, PatternWrites(8 * MiB, 65536, 1));
        QemuImg.Create(mid, "qcow2", 12 * MiB, 4096, backing: $"base.{baseFormat}", backingFormat: baseFormat);
        QemuImg.Io(mid, "qcow2", PatternWrites(12 * MiB, 4096, 2));
        QemuImg.Io(mid, "qcow2", "write -z 1M 256k", "write -P 0x71 7M 2M");
        QemuImg.Create(top, "qcow2", 16 * MiB, 65536, backing: "mid.qcow2", backingFormat: "qcow2");
        QemuImg.Io(top, "qcow2", PatternWrites(16 * MiB, 65536, 3));
        QemuImg.Io(top, "qcow2", "write -P 0x72 1000k 100k", "write -z 6M 64k", "discard 3M 64k");
        Assert.Equal(3, QemuImg.Info(top).Count);
        var raw = QemuToRaw(top, _dir.File("top.raw"));

        // Opened from another working directory: relative backing names resolve against the image's folder.
        Assert.NotEqual(folder, Directory.GetCurrentDirectory());
        using var img = Qcow2Image.Open(top, new ImageOpenOptions { ReadOnly = true });
        Assert.Equal("mid.qcow2", img.BackingFile);
        var midImg = Assert.IsType<Qcow2Image>(img.Backing);
        Assert.Equal($"base.{baseFormat}", midImg.BackingFile);
        Assert.Equal(4096, midImg.ClusterSize);
        Assert.NotNull(midImg.Backing);
        Assert.Null(midImg.Backing!.Backing);
        Assert.Equal(8 * MiB, midImg.Backing.Size);
        Assert.True(midImg.Backing.ReadOnly && midImg.ReadOnly);
        AssertContentEquals(img, raw);

        using var viaDiskImage = DiskImage.Open(top, new ImageOpenOptions { ReadOnly = true });
        AssertContentEquals(viaDiskImage, raw);
    }

    [SkippableFact]
    public void ReadsAnImageWithInternalSnapshots()
    {
        QemuImg.Require();
        const ulong size = 8 * MiB;
        var path = _dir.File("s.qcow2");
        QemuImg.Create(path, "qcow2", size);
        QemuImg.Io(path, "qcow2", PatternWrites(size, 65536, 1));
        QemuImg.Snapshot(path, "-c", "first");
        QemuImg.Io(path, "qcow2", PatternWrites(size, 65536, 2).Take(4).ToArray());
        QemuImg.Io(path, "qcow2", "write -z 4M 128k");
        QemuImg.Snapshot(path, "-c", "second");
        QemuImg.Io(path, "qcow2", "write -P 0x99 100k 200k", "discard 6M 64k");
        Assert.Equal(2, QemuImg.Info(path)[0].SnapshotCount);
        var raw = QemuToRaw(path, _dir.File("s.raw"));

        using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
        AssertContentEquals(img, raw);
    }

    [SkippableFact]
    public void WritingToAnImageWithInternalSnapshots_LeavesTheSnapshotsIntact()
    {
        QemuImg.Require();
        const ulong size = 8 * MiB;
        var path = _dir.File("s.qcow2");
        QemuImg.Create(path, "qcow2", size);
        QemuImg.Io(path, "qcow2", "write -P 0x11 0 8M");
        QemuImg.Snapshot(path, "-c", "before");
        var before = QemuToRaw(path, _dir.File("before.raw"));

        var refPath = _dir.File("s.ref");
        using (var img = Qcow2Image.Open(path))
        using (var reference = RawReference.Create(refPath, size, before))
        {
            // Every cluster is shared with the snapshot (refcount 2): each write must copy, never overwrite.
            new RandomWorkload(new WorkloadOptions { Seed = 77, Size = size, Operations = 600 }).Run(img, reference);
        }
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        Assert.True(QemuImg.Compare(path, refPath, "qcow2", "raw").Identical);

        // Going back to the snapshot restores exactly what it held.
        QemuImg.Snapshot(path, "-a", "before");
        var cmp = QemuImg.Compare(path, before, "qcow2", "raw");
        Assert.True(cmp.Identical, $"the internal snapshot was damaged by writes to the active image: {cmp.Output}");
    }

    [SkippableTheory]
    [InlineData(1)]
    [InlineData(8)]
    [InlineData(64)]
    public void ReadsAndWritesImagesWithOtherRefcountWidths(int refcountBits)
    {
        QemuImg.Require();
        const ulong size = 16 * MiB;
        var path = _dir.File("r.qcow2");
        QemuImg.Create(path, "qcow2", size, extraOptions: [$"refcount_bits={refcountBits}"]);
        QemuImg.Io(path, "qcow2", PatternWrites(size, 65536, 4));
        Assert.Equal(refcountBits, QemuImg.Info(path)[0].RefcountBits);
        var raw = QemuToRaw(path, _dir.File("r.raw"));
        var refPath = _dir.File("r.ref");
        using (var img = Qcow2Image.Open(path))
        {
            AssertContentEquals(img, raw);
            using var reference = RawReference.Create(refPath, size, raw);
            new RandomWorkload(new WorkloadOptions { Seed = refcountBits, Size = size, Operations = 1000 }).Run(img, reference);
        }
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        Assert.True(QemuImg.Compare(path, refPath, "qcow2", "raw").Identical);
    }

    /// <summary>Compressible text, incompressible noise and zero runs, in 4 KiB pieces.</summary>
    internal static byte[] MixedContent(ulong size, int seed, int clusterSize = 65536)
    {
        var data = new byte[size];
        var text = "The quick brown fox jumps over the lazy dog. 0123456789 "u8.ToArray();
        for (var off = 0; off < data.Length; off += 4096)
        {
            var piece = data.AsSpan(off, Math.Min(4096, data.Length - off));
            switch ((off / 4096 * 7 + seed) % 5)
            {
                case 0:
                case 1:
                    for (var i = 0; i < piece.Length; i++)
                        piece[i] = text[(i + off / 4096) % text.Length];
                    break;
                case 2:
                    RandomWorkload.Pattern(seed, off / 4096, piece.Length).CopyTo(piece);
                    break;
                case 3:
                    break; // zeros
                default:
                    piece.Fill((byte)(off / 4096));
                    break;
            }
        }
        // Some whole clusters of noise, so that qemu stores some clusters uncompressed.
        var stretch = Math.Max(65536, clusterSize);
        for (var off = 0; off + stretch <= data.Length; off += 17 * stretch)
            RandomWorkload.Pattern(seed + 1, off, stretch).CopyTo(data.AsSpan(off));
        return data;
    }

    private static ExtentKind[] PerCluster(IEnumerable<(ulong Offset, ulong Length, ExtentKind Kind)> extents, ulong size, ulong cs)
    {
        var kinds = new ExtentKind?[(size + cs - 1) / cs];
        foreach (var (offset, length, kind) in extents)
        {
            for (var c = offset / cs; c < (offset + length + cs - 1) / cs; c++)
            {
                if (kinds[c] is { } k && k != kind)
                    throw new InvalidOperationException($"cluster {c} reported both as {k} and {kind}: extents are not cluster-granular");
                kinds[c] = kind;
            }
        }
        return kinds.Select((k, i) => k ?? throw new InvalidOperationException($"cluster {i} is missing from the extents")).ToArray();
    }
}
