using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>
/// Persistent dirty bitmaps (the qcow2 bitmaps extension). The in-memory bitmap is checked against
/// values worked out by hand from the qcow2 specification; everything the engine stores is
/// checked against qemu (qemu-nbd exporting the bitmap, qemu-img info, check and convert), and
/// what qemu stores is read back by the engine. Writes are seeded and their expected dirty
/// ranges computed independently (<see cref="QemuDirtyBitmap.Expected"/>).
/// </summary>
public sealed class Qcow2BitmapTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static readonly TimeSpan CliTimeout = TimeSpan.FromMinutes(2);

    // ------------------------------------------------------------------ DirtyBlockBitmap

    [Fact]
    public void MarkSetsEveryGranuleARangeTouchesAcrossGranuleAndWordBoundaries()
    {
        var b = new DirtyBlockBitmap(512 * 200, 9); // 200 bits: four 64-bit words, the last partial
        b.Mark(511, 2); // the last byte of granule 0 and the first of granule 1
        Assert.True(b.IsSet(0));
        Assert.True(b.IsSet(1));
        Assert.False(b.IsSet(2));

        b.Mark(63 * 512 + 100, 600); // granule 63 (the last bit of word 0) into granule 64 (word 1)
        Assert.False(b.IsSet(62));
        Assert.True(b.IsSet(63));
        Assert.True(b.IsSet(64));
        Assert.False(b.IsSet(65));

        b.Mark(100 * 512, 130 * 512); // bits 100..199: the rest of word 1, all of word 2, word 3
        Assert.Equal(2UL + 2 + 100, b.CountSet());
        Assert.Equal([new DirtyExtent(0, 1024), new DirtyExtent(63 * 512, 1024), new DirtyExtent(100 * 512, 100 * 512)], b.Extents());
        Assert.Equal(104UL * 512, b.DirtyBytes());

        b.Mark(5 * 512, 0); // empty writes mark nothing
        Assert.False(b.IsSet(5));
    }

    [Fact]
    public void TheLastPartialGranuleIsClippedToTheDiskSize()
    {
        var b = new DirtyBlockBitmap(10000, 12); // granules 0..2, the last holds 10000-8192 = 1808 bytes
        Assert.Equal(3UL, b.BitCount);
        Assert.Equal(8UL, b.DataBytes); // 3 bits, stored as one 64-bit word
        b.Mark(9000, 5000); // runs past the end of the disk
        Assert.Equal([new DirtyExtent(8192, 1808)], b.Extents());
        Assert.Equal(1808UL, b.DirtyBytes());
        b.Mark(10000, 1); // at the end: nothing
        b.Mark(20000, 4096); // past the end: nothing
        Assert.Equal(1UL, b.CountSet());
        Assert.False(b.IsSet(3));
    }

    [Fact]
    public void ExtentsMergeAdjacentGranulesAndKeepGapsApart()
    {
        var b = new DirtyBlockBitmap(1 * MiB, 12);
        b.Mark(0, 1);
        b.Mark(4096, 4096); // adjacent to granule 0
        b.Mark(3 * 4096 + 10, 1); // a gap of granule 2
        b.Mark(64 * 4096 - 1, 2); // granules 63 and 64 across a word boundary
        b.Mark(65 * 4096, 4096); // adjacent to 64
        Assert.Equal(
            [new DirtyExtent(0, 8192), new DirtyExtent(3 * 4096, 4096), new DirtyExtent(63 * 4096, 3 * 4096)],
            b.Extents());
        b.Mark(0, 1 * MiB);
        Assert.Equal([new DirtyExtent(0, 1 * MiB)], b.Extents());
    }

    [Fact]
    public void MergeAcrossGranularitiesSetsEveryGranuleTheOtherRecords()
    {
        ulong disk = 3 * MiB + 1536;
        var fine = new DirtyBlockBitmap(disk, 9);
        var coarse = new DirtyBlockBitmap(disk, 16);
        fine.Mark(1000, 10); // sector 1
        fine.Mark(70000, 600); // sectors 136..137, in 64K granule 1
        fine.Mark(disk - 1, 1); // the last sector, in the partial last 64K granule
        coarse.Merge(fine);
        Assert.Equal([new DirtyExtent(0, 131072), new DirtyExtent(disk / 65536 * 65536, disk % 65536)], coarse.Extents());

        // Coarse into fine: every sector of the coarse granules.
        var fine2 = new DirtyBlockBitmap(disk, 9);
        var coarse2 = new DirtyBlockBitmap(disk, 16);
        coarse2.Mark(65536 + 3, 1);
        fine2.Mark(0, 1);
        fine2.Merge(coarse2);
        Assert.Equal([new DirtyExtent(0, 512), new DirtyExtent(65536, 65536)], fine2.Extents());
        Assert.Equal(129UL, fine2.CountSet());
        Assert.Equal(Expected([(0, 1), (65536, 65536)], 512, disk), ToTuples(fine2.Extents()));
    }

    [Fact]
    public void ResizeGrowsWithClearGranulesAndShrinkDropsTheBitsPastTheEnd()
    {
        var b = new DirtyBlockBitmap(100 * 512, 9);
        b.Mark(0, 100 * 512);
        b.ResetChanged();
        b.Resize(300 * 512);
        Assert.True(b.Changed);
        Assert.Equal(300UL, b.BitCount);
        Assert.Equal(40UL, b.DataBytes); // 300 bits -> 5 words
        Assert.Equal([new DirtyExtent(0, 100 * 512)], b.Extents());
        b.Mark(299 * 512, 512);
        Assert.Equal([new DirtyExtent(0, 100 * 512), new DirtyExtent(299 * 512, 512)], b.Extents());

        b.Resize(70 * 512); // drops bits 70..299, including part of word 1
        Assert.Equal(70UL, b.BitCount);
        Assert.Equal([new DirtyExtent(0, 70 * 512)], b.Extents());
        var bytes = new byte[16];
        b.CopyTo(0, bytes);
        Assert.Equal(Convert.FromHexString("FFFFFFFFFFFFFFFF3F00000000000000"), bytes); // 64 + 6 bits

        b.Resize(300 * 512); // growing again: the dropped bits do not come back
        Assert.Equal([new DirtyExtent(0, 70 * 512)], b.Extents());
        Assert.Equal(70UL, b.CountSet());
    }

    [Fact]
    public void StoredLayoutIsLeastSignificantBitFirstAndRoundTrips()
    {
        // 100 granules of 512 bytes: 100 bits, stored in 16 bytes (two 64-bit words).
        var b = new DirtyBlockBitmap(100 * 512, 9);
        foreach (ulong bit in new ulong[] { 0, 3, 8, 9, 63, 64, 99 })
            b.Mark(bit * 512, 1);
        // By hand, bit i = bit (i % 8) of byte (i / 8):
        // byte 0: bits 0 and 3 -> 0x09; byte 1: bits 8, 9 -> 0x03; byte 7: bit 63 -> 0x80;
        // byte 8: bit 64 -> 0x01; byte 12: bit 99 (99 = 96 + 3) -> 0x08.
        var expected = new byte[16];
        expected[0] = 0x09;
        expected[1] = 0x03;
        expected[7] = 0x80;
        expected[8] = 0x01;
        expected[12] = 0x08;
        var stored = new byte[16];
        b.CopyTo(0, stored);
        Assert.Equal(expected, stored);

        var second = new byte[8];
        b.CopyTo(8, second);
        Assert.Equal(expected[8..], second);
        var past = new byte[24]; // bytes past the data read as zero
        b.CopyTo(0, past);
        Assert.Equal(expected.Concat(new byte[8]), past);

        var loaded = new DirtyBlockBitmap(100 * 512, 9);
        loaded.Load(0, stored);
        Assert.Equal(b.Extents(), loaded.Extents());

        // Bits past the 100th are tail bits: ignored on load, never stored.
        var dirty = (byte[])expected.Clone();
        dirty[12] = 0xf8; // bits 99..103
        dirty[15] = 0xff;
        var tail = new DirtyBlockBitmap(100 * 512, 9);
        tail.Load(0, dirty);
        Assert.Equal(7UL, tail.CountSet());
        tail.CopyTo(0, stored);
        Assert.Equal(expected, stored);

        Assert.Throws<ArgumentException>(() => b.CopyTo(4, stored));
        Assert.Throws<ArgumentException>(() => tail.Load(4, dirty));
    }

    // ------------------------------------------------------------------ engine writes, qemu reads

    /// <param name="qemuCreates">qemu-img creates the image (else Qcow2Image.Create).</param>
    /// <param name="qemuAdds">qemu-img bitmap --add adds the bitmaps (else AddBitmap).</param>
    [SkippableTheory]
    [InlineData(false, 512, 9, 3 * MiB + 1536, false, 1)]
    [InlineData(true, 4096, 12, 5 * MiB + 512, true, 2)]
    [InlineData(false, 65536, 16, 20 * MiB + 3 * 512, true, 3)]
    [InlineData(true, 2 * MiB, 20, 9 * MiB + 512, false, 4)]
    [InlineData(false, 4096, 9, 64 * MiB, false, 5)] // 16 KiB of bitmap data: four clusters
    [InlineData(true, 65536, 20, 7 * MiB + 2560, true, 6)]
    [InlineData(false, 2 * MiB, 12, 33 * MiB + 512, true, 7)]
    public void EngineWritesAreTheRangesQemuReadsFromTheBitmap(bool qemuCreates, int clusterSize, int granularityBits, ulong size, bool qemuAdds, int seed)
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        var path = _dir.File("e.qcow2");
        CreateImage(path, qemuCreates, size, clusterSize);
        ulong granularity = 1UL << granularityBits;
        ulong defaultGranularity = (ulong)Math.Clamp(clusterSize, 4096, 65536);
        if (qemuAdds)
        {
            QemuImg.Run("bitmap", "--add", "-g", granularity.ToString(CultureInfo.InvariantCulture), path, "main");
            QemuImg.Run("bitmap", "--add", path, "default");
            QemuImg.Run("bitmap", "--add", "--disable", path, "off");
        }
        else
        {
            using var q = Qcow2Image.Open(path);
            q.AddBitmap("main", granularityBits);
            q.AddBitmap("default");
            q.AddBitmap("off", 9, enabled: false);
            Assert.Equal(defaultGranularity, q.GetBitmapGranularity("default")); // qemu's default
        }

        var model = new byte[size];
        var ops = RandomOps(seed, size, 40, Math.Min(size / 4, 3 * MiB), granularity);
        using (var q = Qcow2Image.Open(path))
        {
            Apply(q, ops.Take(20), model, seed);
            q.Flush();
            Apply(q, ops.Skip(20), model, seed + 1000);
        }

        var written = ops.Select(o => (o.Offset, o.Length)).ToList();
        Assert.Equal(Expected(written, granularity, size), QemuDirtyBitmap.DirtyRanges(path, "main"));
        Assert.Equal(Expected(written, defaultGranularity, size), QemuDirtyBitmap.DirtyRanges(path, "default"));
        Assert.Empty(QemuDirtyBitmap.DirtyRanges(path, "off"));
        var bitmaps = QemuBitmaps(path);
        Assert.Equal(["main", "default", "off"], bitmaps.Select(b => b.Name));
        Assert.Equal([granularity, defaultGranularity], bitmaps.Take(2).Select(b => b.Granularity));
        Assert.Equal(["auto", "auto", ""], bitmaps.Select(b => string.Join(',', b.Flags)));
        AssertCleanForBoth(path);

        // What the engine reads back from the file is what qemu read.
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
        {
            Assert.Equal(Expected(written, granularity, size), ToTuples(q.GetBitmapExtents("main")));
            var list = q.ListBitmaps();
            Assert.Equal(Expected(written, granularity, size).Aggregate(0UL, (s, r) => s + r.Length), list[0].DirtyBytes);
            Assert.Equal(0UL, list[2].DirtyBytes);
        }
        // The bitmaps took no data: the disk reads as the writes left it.
        Assert.Equal(model, File.ReadAllBytes(QemuToRaw(path, _dir.File("e.raw"))));
    }

    [SkippableFact]
    public void QemuWritesAreTheRangesTheEngineReadsFromTheBitmap()
    {
        QemuImg.Require();
        ulong size = 10 * MiB + 512;
        var path = _dir.File("q.qcow2");
        QemuImg.Create(path, "qcow2", size, 4096);
        QemuImg.Run("bitmap", "--add", "-g", "512", path, "g512");
        QemuImg.Run("bitmap", "--add", "-g", "4096", path, "g4k");
        QemuImg.Run("bitmap", "--add", "-g", "1M", path, "g1m");
        var ops = RandomOps(11, size, 30, 2 * MiB, 4096);
        var commands = ops.Select(o => o.Kind switch
        {
            WorkloadOpKind.Write => $"write -P 0x{o.Offset % 251 + 1:x2} {o.Offset} {o.Length}",
            WorkloadOpKind.WriteZeroes => $"write -z {o.Offset} {o.Length}",
            _ => $"discard {o.Offset} {o.Length}",
        }).ToArray();
        QemuImg.Io(path, "qcow2", commands);

        var written = ops.Select(o => (o.Offset, o.Length)).ToList();
        using var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
        foreach (var (name, g) in new[] { ("g512", 512UL), ("g4k", 4096UL), ("g1m", MiB) })
        {
            Assert.Equal(g, q.GetBitmapGranularity(name));
            Assert.Equal(Expected(written, g, size), ToTuples(q.GetBitmapExtents(name)));
        }
        Assert.All(q.ListBitmaps(), b => Assert.True(b.Enabled && !b.InUse));
        Assert.True(q.Check().IsClean);
    }

    [SkippableFact]
    public void SessionsAccumulateAndADisabledBitmapRecordsNothing()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 8 * MiB + 512;
        var path = _dir.File("s.qcow2");
        CreateImage(path, qemu: false, size, 65536);
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("on", 12);
            q.AddBitmap("off", 12, enabled: false);
        }
        var all = new List<(ulong, ulong)>();
        var model = new byte[size];
        for (int session = 0; session < 4; session++)
        {
            var ops = RandomOps(100 + session, size, 6, MiB, 4096);
            using (var q = Qcow2Image.Open(path))
                Apply(q, ops, model, session);
            all.AddRange(ops.Select(o => (o.Offset, o.Length)));
            Assert.Equal(Expected(all, 4096, size), QemuDirtyBitmap.DirtyRanges(path, "on"));
            Assert.Empty(QemuDirtyBitmap.DirtyRanges(path, "off"));
            AssertCleanForBoth(path);
        }
        // An open that writes nothing changes nothing.
        var hash = Hash(path);
        using (var q = Qcow2Image.Open(path))
            q.Read(0, new byte[4096]);
        Assert.Equal(hash, Hash(path));
    }

    [SkippableFact]
    public void WhileASessionWritesTheFileMarksItsEnabledBitmapsInUse()
    {
        QemuImg.Require();
        var path = _dir.File("inuse.qcow2");
        CreateImage(path, qemu: false, 4 * MiB, 4096);
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("on", 12);
            q.AddBitmap("off", 12, enabled: false);
        }
        string Flags() => string.Join(" ", QemuBitmapsShared(path).Select(b => b.Name + "=" + string.Join(',', b.Flags)));
        using (var q = Qcow2Image.Open(path))
        {
            q.Read(0, new byte[512]);
            Assert.Equal("on=auto off=", Flags()); // nothing written yet
            q.Write(0, new byte[] { 1 });
            Assert.Equal("on=in-use,auto off=", Flags()); // a writer that died now would leave it stale
            q.Flush();
            Assert.Equal("on=in-use,auto off=", Flags());
            q.ClearBitmap("off"); // a bitmap operation stores every bitmap
            Assert.Equal("on=auto off=", Flags());
            q.WriteZeroes(MiB, 4096); // the next write marks the enabled ones in use again
            Assert.Equal("on=in-use,auto off=", Flags());
            q.SetBitmapEnabled("off", true);
            q.Discard(2 * MiB, 4096);
            Assert.Equal("on=in-use,auto off=in-use,auto", Flags());
        }
        Assert.Equal("on=auto off=auto", Flags());
        Assert.True(QemuImg.Check(path).Clean);
    }

    [SkippableFact]
    public void EnableDisableClearMergeAndRemoveAgreeWithQemu()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 16 * MiB + 512;
        var path = _dir.File("ops.qcow2");
        CreateImage(path, qemu: false, size, 65536);
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("a", 12);
            q.AddBitmap("b", 16);
            q.AddBitmap("c", 20, enabled: false);
            q.AddBitmap("d", 9, enabled: false);
        }
        var model = new byte[size];
        var w = Enumerable.Range(0, 5).Select(i => RandomOps(200 + i, size, 5, 512 * KiB, 4096)).ToArray();
        List<(ulong, ulong)> Writes(params int[] which) => which.SelectMany(i => w[i].Select(o => (o.Offset, o.Length))).ToList();
        void Session(int i)
        {
            using var q = Qcow2Image.Open(path);
            Apply(q, w[i], model, i);
        }
        void Op(Action<Qcow2Image> op)
        {
            using (var q = Qcow2Image.Open(path))
                op(q);
            AssertCleanForBoth(path);
        }

        Session(0);
        Op(q => q.SetBitmapEnabled("a", false));
        Assert.Equal(["", "auto", "", ""], QemuBitmaps(path).Select(b => string.Join(',', b.Flags)));
        Session(1);
        Assert.Equal(Expected(Writes(0), 4096, size), QemuDirtyBitmap.DirtyRanges(path, "a"));
        Assert.Equal(Expected(Writes(0, 1), 65536, size), QemuDirtyBitmap.DirtyRanges(path, "b"));

        Op(q => q.SetBitmapEnabled("a", true));
        Assert.Equal(["auto", "auto", "", ""], QemuBitmaps(path).Select(b => string.Join(',', b.Flags)));
        Session(2);
        Assert.Equal(Expected(Writes(0, 2), 4096, size), QemuDirtyBitmap.DirtyRanges(path, "a"));

        Op(q => q.ClearBitmap("b"));
        Assert.Empty(QemuDirtyBitmap.DirtyRanges(path, "b"));
        Assert.Equal(["auto"], QemuBitmaps(path)[1].Flags);
        Session(3);
        Assert.Equal(Expected(Writes(3), 65536, size), QemuDirtyBitmap.DirtyRanges(path, "b"));

        // Merges across granularities; qemu's own merge on a copy is the oracle.
        var copy = _dir.File("ops-copy.qcow2");
        File.Copy(path, copy);
        QemuImg.Run("bitmap", "--merge", "a", copy, "c");
        QemuImg.Run("bitmap", "--merge", "b", copy, "d");
        Op(q => q.MergeBitmap("a", "c")); // 4K into 1M
        Op(q => q.MergeBitmap("b", "d")); // 64K into 512
        var a = QemuDirtyBitmap.DirtyRanges(path, "a");
        Assert.Equal(Expected(a, MiB, size), QemuDirtyBitmap.DirtyRanges(path, "c"));
        Assert.Equal(QemuDirtyBitmap.DirtyRanges(copy, "c"), QemuDirtyBitmap.DirtyRanges(path, "c"));
        Assert.Equal(Expected(Writes(3), 65536, size), QemuDirtyBitmap.DirtyRanges(path, "d"));
        Assert.Equal(QemuDirtyBitmap.DirtyRanges(copy, "d"), QemuDirtyBitmap.DirtyRanges(path, "d"));
        Assert.Equal(a, QemuDirtyBitmap.DirtyRanges(path, "a")); // the source is unchanged

        Session(4); // c and d stay disabled
        Assert.Equal(Expected(a, MiB, size), QemuDirtyBitmap.DirtyRanges(path, "c"));
        Assert.Equal(Expected(Writes(3), 65536, size), QemuDirtyBitmap.DirtyRanges(path, "d"));

        Op(q => q.RemoveBitmap("a"));
        Assert.Equal(["b", "c", "d"], QemuBitmaps(path).Select(b => b.Name));
        Assert.Equal(Expected(Writes(3, 4), 65536, size), QemuDirtyBitmap.DirtyRanges(path, "b"));
        Op(q =>
        {
            q.RemoveBitmap("b");
            q.RemoveBitmap("c");
            q.RemoveBitmap("d");
            Assert.Empty(q.ListBitmaps());
        });
        Assert.Empty(QemuBitmaps(path));
        Assert.Equal(0UL, ReadField(path, Field.AutoclearFeatures, 8) & 1); // no bitmaps extension left
        Assert.Equal(model, File.ReadAllBytes(QemuToRaw(path, _dir.File("ops.raw"))));
    }

    [SkippableFact]
    public void QemuImgConvertCopiesTheBitmapsTheEngineWrote()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 12 * MiB + 1024;
        var src = _dir.File("src.qcow2");
        CreateImage(src, qemu: false, size, 4096);
        using (var q = Qcow2Image.Open(src))
        {
            q.AddBitmap("fine", 9);
            q.AddBitmap("coarse", 16);
            q.AddBitmap("frozen", 13, enabled: false);
        }
        var model = new byte[size];
        using (var q = Qcow2Image.Open(src))
            Apply(q, RandomOps(31, size, 25, 2 * MiB, 512), model, 31);
        using (var q = Qcow2Image.Open(src))
            q.MergeBitmap("coarse", "frozen");

        var dst = _dir.File("dst.qcow2");
        QemuImg.Run("convert", "--bitmaps", "-f", "qcow2", "-O", "qcow2", src, dst);
        Assert.Equal(QemuBitmaps(src).Select(b => (b.Name, b.Granularity)), QemuBitmaps(dst).Select(b => (b.Name, b.Granularity)));
        foreach (var name in new[] { "fine", "coarse", "frozen" })
        {
            var ranges = QemuDirtyBitmap.DirtyRanges(src, name);
            Assert.NotEmpty(ranges);
            Assert.Equal(ranges, QemuDirtyBitmap.DirtyRanges(dst, name));
        }
        Assert.True(QemuImg.Check(dst).Clean);
    }

    [SkippableFact]
    public void NonAsciiNamesMeanTheSameBitmapToQemuAndTheEngine()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 2 * MiB;
        var path = _dir.File("names.qcow2");
        QemuImg.Create(path, "qcow2", size, 65536);
        QemuImg.Run("bitmap", "--add", "-g", "4096", path, "bäckup-ü");
        using (var q = Qcow2Image.Open(path))
        {
            Assert.Equal(["bäckup-ü"], q.ListBitmaps().Select(b => b.Name));
            q.AddBitmap("日本", 16);
            q.Write(300 * KiB, new byte[10]);
        }
        Assert.Equal(["bäckup-ü", "日本"], QemuBitmaps(path).Select(b => b.Name));
        Assert.Equal(Expected([(300 * KiB, 10)], 4096, size), QemuDirtyBitmap.DirtyRanges(path, "bäckup-ü"));
        Assert.Equal(Expected([(300 * KiB, 10)], 65536, size), QemuDirtyBitmap.DirtyRanges(path, "日本"));
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
            Assert.Equal(Expected([(300 * KiB, 10)], 4096, size), ToTuples(q.GetBitmapExtents("bäckup-ü")));
        AssertCleanForBoth(path);
    }

    // ------------------------------------------------------------------ stale bitmaps

    [SkippableFact]
    public void AStaleBitmapIsNeverTrustedOrTouchedAndCanBeRemoved()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 6 * MiB;
        var path = _dir.File("stale.qcow2");
        QemuImg.Create(path, "qcow2", size, 65536);
        QemuImg.Run("bitmap", "--add", "-g", "4096", path, "stale");
        QemuImg.Run("bitmap", "--add", "-g", "4096", path, "good");
        QemuImg.Io(path, "qcow2", "write -P 0x33 100k 300k");
        long entry = BitmapEntryOffset(path, "stale");
        uint flags = (uint)ReadField(path, (int)entry + 12, 4);
        Assert.Equal(2u, flags); // auto
        Poke(path, entry + 12, flags | 1, 4); // in use: as a writer that died leaves it
        var staleEntry = ReadBytes(path, entry, 24);
        var staleTable = ReadBytes(path, (long)BinaryPrimitives.ReadUInt64BigEndian(staleEntry), 8 * (int)BinaryPrimitives.ReadUInt32BigEndian(staleEntry.AsSpan(8)));

        using (var q = Qcow2Image.Open(path))
        {
            var list = q.ListBitmaps();
            Assert.True(list[0].InUse);
            Assert.Null(list[0].DirtyBytes);
            Assert.False(list[1].InUse);
            q.Write(2 * MiB + 5, new byte[] { 1, 2, 3 });
        }
        var info = QemuBitmaps(path);
        Assert.Equal(["in-use", "auto"], info[0].Flags);
        Assert.Equal(["auto"], info[1].Flags);
        Assert.Equal(Expected([(100 * KiB, 300 * KiB), (2 * MiB + 5, 3)], 4096, size), QemuDirtyBitmap.DirtyRanges(path, "good"));
        Assert.Equal(staleEntry, ReadBytes(path, BitmapEntryOffset(path, "stale"), 24));
        Assert.Equal(staleTable, ReadBytes(path, (long)BinaryPrimitives.ReadUInt64BigEndian(staleEntry), staleTable.Length));

        // Changing the other bitmaps rewrites the directory: the stale entry is carried over as it was.
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("extra", 16);
            q.ClearBitmap("good");
            q.Write(MiB, new byte[] { 7 });
            q.RemoveBitmap("extra");
        }
        Assert.Equal(["stale", "good"], QemuBitmaps(path).Select(b => b.Name));
        Assert.Equal("in-use,auto", string.Join(',', QemuBitmaps(path)[0].Flags));
        var staleNow = ReadBytes(path, BitmapEntryOffset(path, "stale"), 24);
        Assert.Equal(staleEntry.AsSpan(0, 16).ToArray(), staleNow.AsSpan(0, 16).ToArray()); // table, size, flags
        Assert.Equal(staleTable, ReadBytes(path, (long)BinaryPrimitives.ReadUInt64BigEndian(staleEntry), staleTable.Length));
        Assert.Equal(Expected([(MiB, 1)], 4096, size), QemuDirtyBitmap.DirtyRanges(path, "good"));
        Assert.Equal(0, QemuImg.Check(path).Corruptions);

        var hash = Hash(path);
        using (var q = Qcow2Image.Open(path))
        {
            AssertRefused(() => q.GetBitmapExtents("stale"));
            AssertRefused(() => q.ClearBitmap("stale"));
            AssertRefused(() => q.MergeBitmap("stale", "good"));
            AssertRefused(() => q.MergeBitmap("good", "stale"));
            AssertRefused(() => q.SetBitmapEnabled("stale", true));
            AssertRefused(() => q.SetBitmapEnabled("stale", false));
            var resize = Assert.Throws<InvalidOperationException>(() => q.Resize(size * 2));
            Assert.Contains("'stale'", resize.Message, StringComparison.Ordinal);
            Assert.Equal(size, q.Size);
        }
        Assert.Equal(hash, Hash(path));

        using (var q = Qcow2Image.Open(path))
        {
            q.RemoveBitmap("stale");
            Assert.Equal(["good"], q.ListBitmaps().Select(b => b.Name));
        }
        Assert.Equal(["good"], QemuBitmaps(path).Select(b => b.Name));
        AssertCleanForBoth(path);
        Assert.Equal(Expected([(MiB, 1)], 4096, size), QemuDirtyBitmap.DirtyRanges(path, "good"));
    }

    private static void AssertRefused(Action action)
    {
        var e = Assert.Throws<InvalidOperationException>(action);
        Assert.Contains("'stale'", e.Message, StringComparison.Ordinal);
        Assert.Contains("in use", e.Message, StringComparison.Ordinal);
    }

    // ------------------------------------------------------------------ resize

    [SkippableTheory]
    [InlineData(false, 4096)]
    [InlineData(true, 65536)]
    [InlineData(false, 512)]
    public void GrowingTheDiskGrowsTheBitmaps(bool qemuCreates, int clusterSize)
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 3 * MiB + 512, grown = 9 * MiB + 1536;
        var path = _dir.File("grow.qcow2");
        CreateImage(path, qemuCreates, size, clusterSize);
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("g4k", 12);
            q.AddBitmap("g64k", 16);
            q.AddBitmap("g512", 9, enabled: false);
        }
        var before = RandomOps(41, size, 8, MiB, 4096);
        var after = RandomOps(42, grown, 8, MiB, 4096);
        var model = new byte[grown];
        using (var q = Qcow2Image.Open(path))
        {
            Apply(q, before, model, 41);
            ImageOperations.Resize(q, grown);
            Assert.Equal(grown, q.Size);
            Apply(q, after, model, 42);
            q.Write(grown - 1, new byte[] { 0x5a }); // the last byte of the new area
            model[grown - 1] = 0x5a;
        }
        var all = before.Concat(after).Select(o => (o.Offset, o.Length)).Append((grown - 1, 1UL)).ToList();
        Assert.Equal(Expected(all, 4096, grown), QemuDirtyBitmap.DirtyRanges(path, "g4k"));
        Assert.Equal(Expected(all, 65536, grown), QemuDirtyBitmap.DirtyRanges(path, "g64k"));
        Assert.Empty(QemuDirtyBitmap.DirtyRanges(path, "g512"));
        AssertCleanForBoth(path);
        Assert.Equal(model, File.ReadAllBytes(QemuToRaw(path, _dir.File("grow.raw"))));

        // qemu keeps writing into the grown bitmaps, and the engine reads them.
        QemuImg.Io(path, "qcow2", $"write -P 0x77 {grown - 70000} 70000");
        all.Add((grown - 70000, 70000));
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
            Assert.Equal(Expected(all, 65536, grown), ToTuples(q.GetBitmapExtents("g64k")));
    }

    // ------------------------------------------------------------------ errors

    [SkippableFact]
    public void BadBitmapRequestsAreRefusedAndLeaveTheFileAsItWas()
    {
        QemuImg.Require();
        var path = _dir.File("err.qcow2");
        CreateImage(path, qemu: false, 4 * MiB, 65536);
        using (var q = Qcow2Image.Open(path))
            q.AddBitmap("b0");
        var hash = Hash(path);

        void Refused<T>(Action<Qcow2Image> op, params string[] mentions) where T : Exception
        {
            using (var q = Qcow2Image.Open(path))
            {
                var e = Assert.Throws<T>(() => op(q));
                foreach (var m in mentions)
                    Assert.Contains(m, e.Message, StringComparison.Ordinal);
                Assert.DoesNotContain('\n', e.Message);
            }
            Assert.Equal(hash, Hash(path));
        }

        Refused<ArgumentException>(q => q.AddBitmap("b0"), "'b0'", "already exists");
        Refused<ArgumentException>(q => q.AddBitmap(""), "empty");
        Refused<ArgumentException>(q => q.AddBitmap(new string('x', 1024)), "1024 bytes", "1023");
        Refused<ArgumentException>(q => q.AddBitmap(new string('é', 512)), "1024 bytes"); // 512 characters, 1024 bytes of UTF-8
        Refused<ArgumentException>(q => q.AddBitmap("tiny", 8), "granularity", "256");
        Refused<ArgumentException>(q => q.AddBitmap("huge", 32), "granularity", "4294967296");
        Refused<ArgumentException>(q => q.RemoveBitmap("nope"), "'nope'", "'b0'");
        Refused<ArgumentException>(q => q.GetBitmapExtents("nope"), "'nope'");
        Refused<ArgumentException>(q => q.MergeBitmap("b0", "nope"), "'nope'");

        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
        {
            foreach (var op in new Action[]
                     {
                         () => q.AddBitmap("new"), () => q.RemoveBitmap("b0"), () => q.ClearBitmap("b0"),
                         () => q.SetBitmapEnabled("b0", false), () => q.MergeBitmap("b0", "b0"),
                     })
                Assert.Contains("read-only", Assert.Throws<InvalidOperationException>(op).Message, StringComparison.Ordinal);
            Assert.Empty(q.GetBitmapExtents("b0")); // reading is allowed
        }
        Assert.Equal(hash, Hash(path));

        // The longest name qcow2 allows is accepted, and qemu reads it back.
        string longest = new('n', 1023);
        using (var q = Qcow2Image.Open(path))
            q.AddBitmap(longest, 16);
        Assert.Equal(["b0", longest], QemuBitmaps(path).Select(b => b.Name));
        Assert.True(QemuImg.Check(path).Clean);

        // Version 2 images have no bitmaps.
        var v2 = _dir.File("v2.qcow2");
        QemuImg.Create(v2, "qcow2", 4 * MiB, extraOptions: ["compat=0.10"]);
        var v2Hash = Hash(v2);
        using (var q = Qcow2Image.Open(v2))
        {
            var e = Assert.Throws<InvalidOperationException>(() => q.AddBitmap("b"));
            Assert.Contains("version 2", e.Message, StringComparison.Ordinal);
        }
        Assert.Equal(v2Hash, Hash(v2));
    }

    // ------------------------------------------------------------------ sessions do not leak

    [SkippableFact]
    public void RepeatedSessionsAndBitmapChangesLeaveNoLeakedClusters()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        ulong size = 4 * MiB + 512;
        var path = _dir.File("leak.qcow2");
        CreateImage(path, qemu: false, size, 512); // small clusters: bitmap data spans several
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("keep", 9);
            q.AddBitmap("coarse", 16);
        }
        var all = new List<(ulong, ulong)>();
        var model = new byte[size];
        for (int cycle = 0; cycle < 12; cycle++)
        {
            var ops = RandomOps(300 + cycle, size, 4, 256 * KiB, 512);
            using (var q = Qcow2Image.Open(path))
            {
                Apply(q, ops, model, cycle);
                // Now and then a bitmap comes and goes in the middle of a session.
                if (cycle % 3 == 1)
                    q.AddBitmap("temp", 12);
                if (cycle % 3 == 2)
                {
                    q.MergeBitmap("temp", "coarse");
                    q.RemoveBitmap("temp");
                }
                if (cycle % 4 == 3)
                    q.ClearBitmap("coarse");
                q.Write(size - 512, new byte[512]); // written after the bitmap operations: still recorded
            }
            all.AddRange(ops.Select(o => (o.Offset, o.Length)));
            all.Add((size - 512, 512));
            using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
            {
                var mine = q.Check();
                Assert.True(mine.IsClean, $"cycle {cycle}: {string.Join("; ", mine.Problems)}");
            }
            var qemu = QemuImg.Check(path);
            Assert.True(qemu.Clean, $"cycle {cycle}: {qemu}");
        }
        Assert.Equal(Expected(all, 512, size), QemuDirtyBitmap.DirtyRanges(path, "keep"));
        Assert.DoesNotContain(QemuBitmaps(path), b => b.Flags.Contains("in-use"));
    }

    [SkippableFact]
    public void BitmapOperationsOnAnotherThreadLoseNoConcurrentWrite()
    {
        // Writers mark granules while another thread keeps storing the bitmaps (each bitmap
        // operation stores them all and unloads them). Every write must end up recorded: a mark
        // that landed in bits already stored, or after they were unloaded, would be lost, and the
        // bitmap would be wrong yet trusted.
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        const int writers = 2, perWriter = 3000;
        ulong size = 64 * MiB;
        var path = _dir.File("race.qcow2");
        CreateImage(path, qemu: false, size, 65536);
        using (var q = Qcow2Image.Open(path))
        {
            q.AddBitmap("all", 12);
            var data = new byte[512];
            ConcurrentThreads.Run(writers + 1, (t, errors) =>
            {
                if (t == writers)
                {
                    // The store loop: add and remove a bitmap until the writers are done.
                    for (int i = 0; Volatile.Read(ref _writersDone) < writers; i++)
                    {
                        q.AddBitmap($"t{i}", 16);
                        q.RemoveBitmap($"t{i}");
                    }
                    return;
                }
                for (int i = 0; i < perWriter; i++)
                    q.Write(((ulong)(i * writers + t) << 12) % size, data); // one 4 KiB granule per write
                Interlocked.Increment(ref _writersDone);
            });
        }
        var writes = Enumerable.Range(0, writers * perWriter).Select(k => (((ulong)k << 12) % size, 512UL));
        Assert.Equal(Expected(writes, 4096, size), QemuDirtyBitmap.DirtyRanges(path, "all"));
        AssertCleanForBoth(path);
    }

    private int _writersDone;

    // ------------------------------------------------------------------ vmctl

    [SkippableFact]
    public void VmctlAddsListsAndExportsWhatQemuSees()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        RequireVmctl();
        ulong size = 6 * MiB + 512;
        var path = _dir.File("cli.qcow2");
        QemuImg.Create(path, "qcow2", size, 65536);

        var add = Vmctl("disk", "bitmap", "add", path, "backup", "-g", "4K");
        Assert.True(add.ExitCode == 0, add.Stderr);
        Assert.Equal(0, Vmctl("disk", "bitmap", "add", path, "paused", "--disabled").ExitCode);
        Assert.Equal([("backup", 4096UL, "auto"), ("paused", 65536UL, "")],
            QemuBitmaps(path).Select(b => (b.Name, b.Granularity, string.Join(',', b.Flags))));

        QemuImg.Io(path, "qcow2", "write -P 1 1000 5000", "write -z 3M 70k", $"write -P 2 {size - 100} 100");
        var expected = Expected([(1000, 5000), (3 * MiB, 70 * KiB), (size - 100, 100)], 4096, size);
        Assert.Equal(expected, QemuDirtyBitmap.DirtyRanges(path, "backup"));

        var list = Vmctl("disk", "bitmap", "list", path, "--json");
        Assert.True(list.ExitCode == 0, list.Stderr);
        using (var doc = JsonDocument.Parse(list.Stdout))
        {
            var items = doc.RootElement.EnumerateArray().ToList();
            Assert.Equal(2, items.Count);
            Assert.Equal("backup", items[0].GetProperty("name").GetString());
            Assert.Equal(4096UL, items[0].GetProperty("granularity").GetUInt64());
            Assert.True(items[0].GetProperty("enabled").GetBoolean());
            Assert.False(items[0].GetProperty("inUse").GetBoolean());
            Assert.Equal(expected.Aggregate(0UL, (s, r) => s + r.Length), items[0].GetProperty("dirtyBytes").GetUInt64());
            Assert.False(items[1].GetProperty("enabled").GetBoolean());
            Assert.Equal(0UL, items[1].GetProperty("dirtyBytes").GetUInt64());
        }

        var export = Vmctl("disk", "bitmap", "export", path, "backup", "--json");
        Assert.True(export.ExitCode == 0, export.Stderr);
        using (var doc = JsonDocument.Parse(export.Stdout))
        {
            var root = doc.RootElement;
            Assert.Equal(4096UL, root.GetProperty("granularity").GetUInt64());
            Assert.Equal(size, root.GetProperty("diskSize").GetUInt64());
            var extents = root.GetProperty("extents").EnumerateArray()
                .Select(e => (e.GetProperty("offset").GetUInt64(), e.GetProperty("length").GetUInt64())).ToList();
            Assert.Equal(QemuDirtyBitmap.DirtyRanges(path, "backup"), extents);
        }

        var info = Vmctl("disk", "info", path);
        Assert.True(info.ExitCode == 0, info.Stderr);
        Assert.Contains("bitmap: backup, granularity 4096, enabled", info.Stdout, StringComparison.Ordinal);

        Assert.Equal(0, Vmctl("disk", "bitmap", "clear", path, "backup").ExitCode);
        Assert.Empty(QemuDirtyBitmap.DirtyRanges(path, "backup"));
        Assert.True(QemuImg.Check(path).Clean);
    }

    [SkippableFact]
    public void VmctlBitmapErrorsExitOneWithOneLineNamingTheProblem()
    {
        QemuImg.Require();
        RequireVmctl();
        var path = _dir.File("clierr.qcow2");
        QemuImg.Create(path, "qcow2", 4 * MiB);
        QemuImg.Run("bitmap", "--add", path, "b0");
        var hash = Hash(path);
        foreach (var (args, mention) in new (string[], string)[]
                 {
                     (["disk", "bitmap", "add", path, "b0"], "'b0'"),
                     (["disk", "bitmap", "add", path, "b1", "-g", "3000"], "3000"),
                     (["disk", "bitmap", "add", path, "b1", "-g", "256"], "256"),
                     (["disk", "bitmap", "export", path, "nope"], "'nope'"),
                     (["disk", "bitmap", "remove", path, "nope"], "'nope'"),
                     (["disk", "bitmap", "merge", path, "b0", "nope"], "'nope'"),
                 })
        {
            var r = Vmctl(args);
            Assert.True(r.ExitCode == 1, $"vmctl {string.Join(' ', args)}: exit {r.ExitCode}, {r.Stdout} {r.Stderr}");
            var lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
            Assert.True(lines.Length == 1, $"vmctl {string.Join(' ', args)} printed {lines.Length} lines: {r.Stderr}");
            Assert.Contains(mention, lines[0], StringComparison.Ordinal);
            Assert.Equal(hash, Hash(path));
        }
    }

    private static void RequireVmctl() =>
        TestEnvironment.SkipIf(File.Exists(TestEnvironment.Vmctl) ? null : $"{TestEnvironment.Vmctl} is missing (run 'make' first)");

    private static ProcessResult Vmctl(params string[] args) => TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, CliTimeout);

    // ------------------------------------------------------------------ helpers

    private static IReadOnlyList<(ulong Offset, ulong Length)> Expected(IEnumerable<(ulong Offset, ulong Length)> writes, ulong granularity, ulong size) =>
        QemuDirtyBitmap.Expected(writes, granularity, size);

    private static List<(ulong Offset, ulong Length)> ToTuples(IEnumerable<DirtyExtent> extents) =>
        extents.Select(e => (e.Offset, e.Length)).ToList();

    private static void CreateImage(string path, bool qemu, ulong size, int clusterSize)
    {
        if (qemu)
            QemuImg.Create(path, "qcow2", size, clusterSize);
        else
            Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize }).Dispose();
    }

    /// <summary>
    /// Seeded writes, zero writes and discards: some a byte long, some ending at the disk's end, some
    /// crossing a granule boundary by a byte, the rest anywhere with any length up to <paramref name="maxLength"/>.
    /// </summary>
    private static List<WorkloadOp> RandomOps(int seed, ulong size, int count, ulong maxLength, ulong granularity)
    {
        var rng = new Random(seed);
        ulong Below(ulong n) => (ulong)rng.NextInt64((long)n);
        var ops = new List<WorkloadOp>();
        for (int i = 0; i < count; i++)
        {
            var kind = rng.Next(10) switch
            {
                < 6 => WorkloadOpKind.Write,
                < 8 => WorkloadOpKind.WriteZeroes,
                _ => WorkloadOpKind.Discard,
            };
            ulong length, offset;
            switch (rng.Next(5))
            {
                case 0:
                    length = 1;
                    offset = Below(size);
                    break;
                case 1:
                    length = 1 + Below(Math.Min(maxLength, size));
                    offset = size - length;
                    break;
                case 2:
                    length = 2;
                    offset = Math.Min(size - 2, (1 + Below(size / granularity)) * granularity - 1);
                    break;
                default:
                    length = 1 + Below(maxLength);
                    offset = Below(size - length + 1);
                    break;
            }
            ops.Add(new WorkloadOp(i, kind, offset, length));
        }
        return ops;
    }

    private static void Apply(Qcow2Image q, IEnumerable<WorkloadOp> ops, byte[] model, int seed)
    {
        var rng = new Random(seed);
        foreach (var o in ops)
        {
            switch (o.Kind)
            {
                case WorkloadOpKind.Write:
                    var data = new byte[o.Length];
                    rng.NextBytes(data);
                    q.Write(o.Offset, data);
                    data.CopyTo(model, (long)o.Offset);
                    break;
                case WorkloadOpKind.WriteZeroes:
                    q.WriteZeroes(o.Offset, o.Length);
                    model.AsSpan((int)o.Offset, (int)o.Length).Clear();
                    break;
                default:
                    q.Discard(o.Offset, o.Length); // no backing file: discarded ranges read as zeros
                    model.AsSpan((int)o.Offset, (int)o.Length).Clear();
                    break;
            }
        }
    }

    /// <summary>The bitmaps as <c>qemu-img info</c> lists them, in directory order.</summary>
    private static List<(string Name, ulong Granularity, string[] Flags)> QemuBitmaps(string path) => QemuBitmaps(path, shared: false);

    /// <summary>The same, read while the engine has the image open (<c>qemu-img info -U</c>).</summary>
    private static List<(string Name, ulong Granularity, string[] Flags)> QemuBitmapsShared(string path) => QemuBitmaps(path, shared: true);

    private static List<(string Name, ulong Granularity, string[] Flags)> QemuBitmaps(string path, bool shared)
    {
        using var doc = JsonDocument.Parse(QemuImg.Run(shared ? ["info", "-U", "--output=json", path] : ["info", "--output=json", path]).Stdout);
        var list = new List<(string, ulong, string[])>();
        if (doc.RootElement.GetProperty("format-specific").GetProperty("data").TryGetProperty("bitmaps", out var bitmaps))
        {
            foreach (var b in bitmaps.EnumerateArray())
            {
                list.Add((b.GetProperty("name").GetString()!, b.GetProperty("granularity").GetUInt64(),
                    b.GetProperty("flags").EnumerateArray().Select(f => f.GetString()!).ToArray()));
            }
        }
        return list;
    }

    /// <summary>qemu-img check and the engine's own check both find the image clean, and no bitmap is left in use.</summary>
    private static void AssertCleanForBoth(string path)
    {
        var qemu = QemuImg.Check(path);
        Assert.True(qemu.Clean, qemu.ToString());
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
        {
            var mine = q.Check();
            Assert.True(mine.IsClean, string.Join("; ", mine.Problems));
            Assert.DoesNotContain(q.ListBitmaps(), b => b.InUse);
        }
        Assert.DoesNotContain(QemuBitmaps(path), b => b.Flags.Contains("in-use"));
    }

    /// <summary>The file offset of a bitmap's directory entry, found through the bitmaps header extension.</summary>
    private static long BitmapEntryOffset(string path, string name)
    {
        var header = ReadBytes(path, 0, 4096);
        int pos = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(Field.HeaderLength));
        while (true)
        {
            uint type = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(pos));
            int length = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(pos + 4));
            if (type == 0)
                throw new InvalidOperationException($"{path} has no bitmaps extension");
            if (type == 0x23852875)
            {
                uint count = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(pos + 8));
                ulong dirSize = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(pos + 16));
                ulong dirOffset = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(pos + 24));
                var dir = ReadBytes(path, (long)dirOffset, (int)dirSize);
                int at = 0;
                for (uint i = 0; i < count; i++)
                {
                    int nameSize = BinaryPrimitives.ReadUInt16BigEndian(dir.AsSpan(at + 18));
                    int extra = (int)BinaryPrimitives.ReadUInt32BigEndian(dir.AsSpan(at + 20));
                    if (Encoding.UTF8.GetString(dir, at + 24 + extra, nameSize) == name)
                        return (long)dirOffset + at;
                    at += (24 + extra + nameSize + 7) & ~7;
                }
                throw new InvalidOperationException($"{path} has no bitmap named {name}");
            }
            pos += 8 + ((length + 7) & ~7);
        }
    }

    private static byte[] ReadBytes(string path, long offset, int length)
    {
        using var f = File.OpenHandle(path);
        var buf = new byte[length];
        RandomAccess.Read(f, buf, offset);
        return buf;
    }
}
