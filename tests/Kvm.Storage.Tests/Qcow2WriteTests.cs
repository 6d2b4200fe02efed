using Kvm.Storage.Qcow2;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>Images the engine creates and writes: qemu-img check finds nothing, qemu-img compare agrees with the reference.</summary>
public sealed class Qcow2WriteTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [SkippableTheory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 * 1024 * 1024)]
    public void Create_MakesAnImageQemuAccepts(int clusterSize)
    {
        QemuImg.Require();
        var path = _dir.File("new.qcow2");
        const ulong size = 10L * 1024 * 1024 * 1024 + 512; // 10 GiB and a sector: not a multiple of any cluster size
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize }))
        {
            Assert.Equal(size, img.Size);
            Assert.Equal(clusterSize, img.ClusterSize);
            Assert.Equal(3, img.Version);
            Assert.Null(img.BackingFile);
            Assert.Null(img.Backing);
            Assert.False(img.ReadOnly);
            var buf = new byte[100_000];
            buf.AsSpan().Fill(0xCD);
            img.Read(size - 100_000, buf);
            Assert.True(buf.AsSpan().IndexOfAnyExcept((byte)0) < 0, "a new image reads as zeros");
            Assert.Equal([new Extent(0, size, ExtentKind.Unallocated)], img.GetAllocation(0, size));
        }
        var info = Assert.Single(QemuImg.Info(path));
        Assert.Equal("qcow2", info.Format);
        Assert.Equal(size, info.VirtualSize);
        Assert.Equal(clusterSize, info.ClusterSize);
        Assert.Equal("1.1", info.Compat);
        Assert.Equal(16, info.RefcountBits);
        Assert.False(info.Corrupt);
        Assert.Null(info.BackingFilename);
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        // Only metadata (header, refcount table and block, L1 table): about what qemu-img create makes.
        var theirs = _dir.File("qemu.qcow2");
        QemuImg.Create(theirs, "qcow2", size, clusterSize);
        var limit = new FileInfo(theirs).Length + 2L * clusterSize;
        Assert.True(new FileInfo(path).Length <= limit, $"a new image should hold only metadata: {new FileInfo(path).Length} bytes, qemu-img makes {new FileInfo(theirs).Length}");
        Assert.Equal(0, check.AllocatedClusters);
    }

    [SkippableFact]
    public void Create_WithABackingFile_WritesItsNameAndFormat()
    {
        QemuImg.Require();
        var basePath = _dir.File("base.qcow2");
        QemuImg.Create(basePath, "qcow2", 4 * MiB);
        QemuImg.Io(basePath, "qcow2", "write -P 0x42 0 4M");
        var child = _dir.File("child.qcow2");
        using (var img = Qcow2Image.Create(child, new Qcow2CreateOptions { Size = 4 * MiB, BackingFile = "base.qcow2", BackingFormat = "qcow2" }))
        {
            Assert.Equal("base.qcow2", img.BackingFile);
            Assert.NotNull(img.Backing);
            var b = new byte[1];
            img.Read(MiB, b);
            Assert.Equal(0x42, b[0]);
        }
        var chain = QemuImg.Info(child);
        Assert.Equal(2, chain.Count);
        Assert.Equal("base.qcow2", chain[0].BackingFilename);
        Assert.Equal("qcow2", chain[0].BackingFormat); // the backing-format header extension
        Assert.Equal(basePath, chain[0].FullBackingFilename);
        Assert.True(QemuImg.Check(child).Clean);
        Assert.True(QemuImg.Compare(child, basePath).Identical);
    }

    [Fact]
    public void Create_RefusesAnExistingFile_AndLeavesItAlone()
    {
        var path = _dir.File("exists.qcow2");
        File.WriteAllBytes(path, [1, 2, 3, 4, 5]);
        Assert.ThrowsAny<Exception>(() => Qcow2Image.Create(path, new Qcow2CreateOptions { Size = MiB }));
        Assert.Equal([1, 2, 3, 4, 5], File.ReadAllBytes(path));
    }

    [SkippableTheory]
    [InlineData(512, 8)]
    [InlineData(65536, 64)]
    [InlineData(2 * 1024 * 1024, 64)]
    public void RandomWorkload_PassesCheck_AndMatchesTheReference(int clusterSize, int sizeMiB)
    {
        QemuImg.Require();
        var size = (ulong)sizeMiB * MiB + 3 * 512; // a partial last cluster
        var path = _dir.File("w.qcow2");
        var refPath = _dir.File("w.ref");
        var workload = new RandomWorkload(new WorkloadOptions
        {
            Seed = 1000 + clusterSize, Size = size, ClusterSize = clusterSize, Operations = 3000, MaxLength = 4 * MiB,
        });
        WorkloadStats stats;
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize }))
        using (var reference = RawReference.Create(refPath, size))
        {
            stats = workload.Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
        }
        Assert.True(stats.Writes > 800 && stats.WriteZeroes > 200 && stats.Discards > 200 && stats.CrossingClusterBoundary > 300, stats.ToString());

        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        Assert.True(check.AllocatedClusters > 0, check.ToString());
        var cmp = QemuImg.Compare(path, refPath, "qcow2", "raw");
        Assert.True(cmp.Identical, cmp.Output);

        // Reopened, the engine reads the same.
        using (var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
            AssertContentEquals(img, refPath);
    }

    [SkippableTheory]
    [InlineData(65536)]
    [InlineData(4096)]
    public void RandomWorkload_OnABackingChainOfDepthThree(int clusterSize)
    {
        QemuImg.Require();
        const ulong size = 32 * MiB;
        var basePath = _dir.File("base.qcow2");
        var mid = _dir.File("mid.qcow2");
        var top = _dir.File("top.qcow2");
        QemuImg.Create(basePath, "qcow2", size);
        QemuImg.Io(basePath, "qcow2", "write -P 0x5a 0 32M");
        QemuImg.Io(basePath, "qcow2", PatternWrites(size, 65536, 1));
        QemuImg.Io(basePath, "qcow2", "write -z 20M 1M");
        var baseRaw = QemuToRaw(basePath, _dir.File("base.raw"));
        var baseHash = Hash(basePath);

        // mid: created by the engine over base, written by one workload.
        var midRef = _dir.File("mid.ref");
        using (var img = Qcow2Image.Create(mid, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize, BackingFile = "base.qcow2", BackingFormat = "qcow2" }))
        using (var reference = RawReference.Create(midRef, size, baseRaw))
        {
            new RandomWorkload(new WorkloadOptions { Seed = 31, Size = size, ClusterSize = clusterSize, Operations = 2000 }).Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
        }
        Assert.Equal(baseHash, Hash(basePath));
        var midHash = Hash(mid);

        // top: created by the engine over mid, written by another.
        var topRef = _dir.File("top.ref");
        using (var img = Qcow2Image.Create(top, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize, BackingFile = "mid.qcow2", BackingFormat = "qcow2" }))
        using (var reference = RawReference.Create(topRef, size, midRef))
        {
            Assert.NotNull(img.Backing?.Backing);
            new RandomWorkload(new WorkloadOptions { Seed = 32, Size = size, ClusterSize = clusterSize, Operations = 3000 }).Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
        }
        Assert.Equal(baseHash, Hash(basePath));
        Assert.Equal(midHash, Hash(mid));

        foreach (var p in new[] { mid, top })
        {
            var check = QemuImg.Check(p);
            Assert.True(check.Clean, $"{p}: {check}");
        }
        var chain = QemuImg.Info(top);
        Assert.Equal(3, chain.Count);
        Assert.Equal("qcow2", chain[0].BackingFormat);
        var cmp = QemuImg.Compare(mid, midRef, "qcow2", "raw");
        Assert.True(cmp.Identical, "mid: " + cmp.Output);
        cmp = QemuImg.Compare(top, topRef, "qcow2", "raw");
        Assert.True(cmp.Identical, "top: " + cmp.Output);
    }

    [SkippableFact]
    public void RandomWorkload_OnAVersion2ImageWithABackingFile_DiscardExposesTheBacking()
    {
        QemuImg.Require();
        const ulong size = 16 * MiB;
        var basePath = _dir.File("base.qcow2");
        var child = _dir.File("child.qcow2");
        QemuImg.Create(basePath, "qcow2", size);
        QemuImg.Io(basePath, "qcow2", "write -P 0x3c 0 16M");
        QemuImg.Create(child, "qcow2", size, backing: "base.qcow2", backingFormat: "qcow2", extraOptions: ["compat=0.10"]);
        var baseRaw = QemuToRaw(basePath, _dir.File("base.raw"));
        var refPath = _dir.File("child.ref");
        WorkloadStats stats;
        using (var img = Qcow2Image.Open(child))
        using (var reference = RawReference.Create(refPath, size, baseRaw))
        {
            Assert.Equal(2, img.Version);
            stats = new RandomWorkload(new WorkloadOptions
            {
                Seed = 2, Size = size, Operations = 1500, DiscardExposesBacking = true, BackingContent = baseRaw,
            }).Run(img, reference);
            RandomWorkload.VerifyAll(img, reference);
        }
        Assert.True(stats.Discards > 100, stats.ToString());
        var check = QemuImg.Check(child);
        Assert.True(check.Clean, check.ToString());
        Assert.True(QemuImg.Compare(child, refPath, "qcow2", "raw").Identical);
    }

    [SkippableFact]
    public void WriteZeroes_MakesZeroClusters_AndDiscardFreesThem()
    {
        QemuImg.Require();
        const ulong size = 8 * MiB, cs = 65536;
        var basePath = _dir.File("base.qcow2");
        QemuImg.Create(basePath, "qcow2", size);
        QemuImg.Io(basePath, "qcow2", "write -P 0xee 0 8M");
        var path = _dir.File("z.qcow2");
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, BackingFile = "base.qcow2", BackingFormat = "qcow2" }))
        {
            img.Write(0, RandomWorkload.Pattern(1, 1, (int)(2 * MiB)));
            img.WriteZeroes(cs, 3 * cs);         // over data of this image
            img.WriteZeroes(4 * MiB, 4 * cs);    // over the backing file only
            img.Discard(MiB, 2 * cs);            // over data: v3 reads zeros
            Assert.Equal([new Extent(cs, 3 * cs, ExtentKind.Zero)], img.GetAllocation(cs, 3 * cs));
            Assert.Equal([new Extent(4 * MiB, 4 * cs, ExtentKind.Zero)], img.GetAllocation(4 * MiB, 4 * cs));
            var buf = new byte[4 * cs];
            buf.AsSpan().Fill(1);
            img.Read(4 * MiB, buf);
            Assert.True(buf.AsSpan().IndexOfAnyExcept((byte)0) < 0, "zeroed clusters must not show the backing file");
            img.Read(MiB, buf.AsSpan(0, (int)(2 * cs)));
            Assert.True(buf.AsSpan(0, (int)(2 * cs)).IndexOfAnyExcept((byte)0) < 0, "discarded clusters read as zeros in a v3 image");
        }
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        // Zeroing whole clusters records them as zero clusters: nothing stored, no data.
        var map = QemuImg.Map(path);
        foreach (var (start, length) in new[] { (cs, 3 * cs), (4 * MiB, 4 * cs), (MiB, 2 * cs) })
        {
            var covering = map.Where(m => m.Start < start + length && m.Start + m.Length > start).ToList();
            Assert.All(covering, m => Assert.True(m.Zero && !m.Data && m.Depth == 0,
                $"[{start}, {start + length}) should be zero clusters in this image, qemu-img map says {m}"));
        }
    }

    [SkippableFact]
    public void ConcurrentWriters_SharingClusters_OverABackingFile()
    {
        QemuImg.Require();
        const int threads = 16, chunksPerThread = 48, chunk = 5000; // chunks straddle 64 KiB clusters; neighbours share clusters
        var size = (ulong)(threads * chunksPerThread * chunk) + MiB;
        var basePath = _dir.File("base.qcow2");
        QemuImg.Create(basePath, "qcow2", size);
        QemuImg.Io(basePath, "qcow2", $"write -P 0x77 0 {size}");
        var path = _dir.File("c.qcow2");
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, BackingFile = "base.qcow2", BackingFormat = "qcow2" }))
        {
            ConcurrentThreads.Run(threads, (t, errors) =>
            {
                for (var i = 0; i < chunksPerThread; i++)
                {
                    var index = i * threads + t;
                    var data = RandomWorkload.Pattern(t, i, chunk);
                    img.Write((ulong)index * chunk, data);
                    var back = new byte[chunk];
                    img.Read((ulong)index * chunk, back);
                    if (!back.AsSpan().SequenceEqual(data))
                        errors.Enqueue($"thread {t} chunk {i}: read back wrong data right after writing it");
                    if (i % 16 == 15)
                        img.Flush();
                }
            });
        }
        var refPath = _dir.File("c.ref");
        using (var reference = RawReference.Create(refPath, size))
        {
            var fill = new byte[size];
            fill.AsSpan().Fill(0x77);
            reference.Write(0, fill);
            for (var t = 0; t < threads; t++)
            {
                for (var i = 0; i < chunksPerThread; i++)
                    reference.Write((ulong)(i * threads + t) * chunk, RandomWorkload.Pattern(t, i, chunk));
            }
        }
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        var cmp = QemuImg.Compare(path, refPath, "qcow2", "raw");
        Assert.True(cmp.Identical, cmp.Output);
    }

    /// <summary>
    /// Writes that cover whole clusters fill them outside the image lock and map them afterwards;
    /// here they race with partial writes into the clusters they share with their neighbours, and
    /// nothing is flushed: closing the image must write every pending L2 entry and refcount.
    /// </summary>
    [SkippableTheory]
    [InlineData(4096, false)]
    [InlineData(65536, false)]
    [InlineData(65536, true)]
    public void ConcurrentWriters_WholeAndPartialClusters_WithoutFlushing(int clusterSize, bool withBacking)
    {
        QemuImg.Require();
        const int threads = 8, chunksPerThread = 24;
        int chunk = clusterSize * 3 + clusterSize / 2 + 100; // whole clusters in the middle, shared ones at both ends
        var size = (ulong)(threads * chunksPerThread * chunk) + MiB;
        var path = _dir.File("c.qcow2");
        string? basePath = null;
        if (withBacking)
        {
            basePath = _dir.File("base.qcow2");
            QemuImg.Create(basePath, "qcow2", size);
            QemuImg.Io(basePath, "qcow2", $"write -P 0x77 0 {size / 2}");
        }
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions
        {
            Size = size, ClusterSize = clusterSize, BackingFile = withBacking ? "base.qcow2" : null, BackingFormat = withBacking ? "qcow2" : null,
        }))
        {
            // Two halves: the engine's own check runs between them, with the first half's metadata
            // still pending; the second half's is written only when the image is closed.
            void WriteChunks(int first, int count) => ConcurrentThreads.Run(threads, (t, errors) =>
            {
                for (var i = first; i < first + count; i++)
                {
                    var index = i * threads + t;
                    var data = RandomWorkload.Pattern(t, i, chunk);
                    img.Write((ulong)index * (ulong)chunk, data);
                    var back = new byte[chunk];
                    img.Read((ulong)index * (ulong)chunk, back);
                    if (!back.AsSpan().SequenceEqual(data))
                        errors.Enqueue($"thread {t} chunk {i}: read back wrong data right after writing it");
                }
            });
            WriteChunks(0, chunksPerThread / 2);
            var own = img.Check();
            Assert.True(own.IsClean, string.Join('\n', own.Problems));
            WriteChunks(chunksPerThread / 2, chunksPerThread - chunksPerThread / 2);
        }
        var refPath = _dir.File("c.ref");
        using (var reference = RawReference.Create(refPath, size))
        {
            if (withBacking)
            {
                var fill = new byte[size / 2];
                fill.AsSpan().Fill(0x77);
                reference.Write(0, fill);
            }
            for (var t = 0; t < threads; t++)
            {
                for (var i = 0; i < chunksPerThread; i++)
                    reference.Write((ulong)(i * threads + t) * (ulong)chunk, RandomWorkload.Pattern(t, i, chunk));
            }
        }
        var check = QemuImg.Check(path);
        Assert.True(check.Clean, check.ToString());
        // The file was extended ahead of new clusters while open; closing trims it to the last one.
        using (var report = System.Text.Json.JsonDocument.Parse(check.Json))
            Assert.Equal(report.RootElement.GetProperty("image-end-offset").GetInt64(), new FileInfo(path).Length);
        var cmp = QemuImg.Compare(path, refPath, "qcow2", "raw");
        Assert.True(cmp.Identical, cmp.Output);
    }

    [SkippableFact]
    public void ReadOnly_RefusesWrites_NamingTheFile_AndChangesNothing()
    {
        QemuImg.Require();
        var path = _dir.File("ro.qcow2");
        QemuImg.Create(path, "qcow2", 4 * MiB);
        QemuImg.Io(path, "qcow2", "write -P 0x10 0 1M");
        var hash = Hash(path);
        using (var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
        {
            Assert.True(img.ReadOnly);
            foreach (var call in new Action[] { () => img.Write(2 * MiB, new byte[10]), () => img.WriteZeroes(0, 65536), () => img.Discard(0, 65536) })
            {
                var e = Assert.Throws<InvalidOperationException>(call);
                Assert.Contains(path, e.Message);
            }
            img.Flush();
            var b = new byte[1];
            img.Read(0, b);
            Assert.Equal(0x10, b[0]);
        }
        Assert.Equal(hash, Hash(path));
    }

    [Fact]
    public void OutOfBounds_IsRefusedWithOffsetLengthAndSize()
    {
        var path = _dir.File("b.qcow2");
        using var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = MiB });
        foreach (var (call, offset, length) in new (Action, ulong, ulong)[]
                 {
                     (() => img.Read(MiB - 10, new byte[11]), MiB - 10, 11),
                     (() => img.Write(MiB, new byte[1]), MiB, 1),
                     (() => img.WriteZeroes(MiB - 4096, 8192), MiB - 4096, 8192),
                     (() => img.Discard(2 * MiB, 1), 2 * MiB, 1),
                     (() => img.GetAllocation(1, MiB), 1, MiB),
                     (() => img.Write(ulong.MaxValue - 1, new byte[4]), ulong.MaxValue - 1, 4),
                 })
        {
            var e = Assert.Throws<ArgumentOutOfRangeException>(call);
            Assert.True(e.Message.Contains(offset.ToString()) && e.Message.Contains(length.ToString()) && e.Message.Contains(MiB.ToString()),
                $"the message should name offset {offset}, length {length} and size {MiB}: {e.Message}");
        }
        img.Write(MiB - 1, [7]);
        var b = new byte[1];
        img.Read(MiB - 1, b);
        Assert.Equal(7, b[0]);
    }
}
