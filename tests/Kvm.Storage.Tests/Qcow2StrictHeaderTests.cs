using System.Buffers.Binary;
using System.Text;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>
/// Header fields, header extensions, snapshot and bitmap tables that qemu-img refuses to open are
/// refused by the engine too, with one line naming the file, the field, its offset and its value.
/// Each case first asks qemu-img, so the table documents qemu 7.2's rules as well as testing ours.
/// </summary>
public sealed class Qcow2StrictHeaderTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>Where the variable structures of the base image lie.</summary>
    private sealed record Layout(int FeatureTable, int BitmapsExt, ulong BitmapDir, ulong BitmapTable, ulong Snapshots, int ClusterSize);

    private (string Path, Layout Layout) Base()
    {
        var path = _dir.File("base.qcow2");
        QemuImg.Create(path, "qcow2", 16 * MiB);
        QemuImg.Io(path, "qcow2", "write -P 0x11 0 1M");
        QemuImg.Snapshot(path, "-c", "s1");
        QemuImg.Run("bitmap", "--add", path, "b0");
        var b = File.ReadAllBytes(path);
        int feature = -1, bitmaps = -1;
        for (int pos = (int)BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(100)); ;)
        {
            uint type = BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(pos)), len = BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(pos + 4));
            if (type == 0)
                break;
            if (type == Qcow2Header.ExtFeatureNames)
                feature = pos;
            if (type == Qcow2Header.ExtBitmaps)
                bitmaps = pos;
            pos += 8 + (int)((len + 7) & ~7u);
        }
        ulong dir = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan(bitmaps + 8 + 16));
        ulong table = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan((int)dir));
        return (path, new Layout(feature, bitmaps, dir, table, ReadField(path, Field.SnapshotsOffset, 8), 65536));
    }

    /// <summary>One mutation: what to poke, and what the error must name (a field, and the value or the offset).</summary>
    private sealed record Case(string Name, Func<Layout, (long At, ulong Value, int Width)[]> Pokes, string[] Fields, Func<Layout, ulong[]> Values);

    private static readonly Case[] Cases =
    [
        new("compression type 2", l => [(104, 2, 1), (72, 8, 8)], ["compression_type"], l => [2, 104]),
        new("compression type 1 without its feature bit", l => [(104, 1, 1)], ["incompatible_features"], l => [72]),
        new("compression feature bit with type 0", l => [(72, 8, 8)], ["incompatible_features"], l => [72]),
        new("header_length below 104", l => [(100, 100, 4)], ["header_length"], l => [100]),
        new("header_length past the cluster", l => [(100, 65537, 4)], ["header_length"], l => [65537]),
        new("backing_file_offset past the cluster", l => [(8, 65537, 8), (16, 4, 4)], ["backing_file_offset"], l => [65537]),
        new("backing name longer than its room", l => [(8, 65530, 8), (16, 10, 4)], ["backing_file_size"], l => [10]),
        new("refcount_order 7", l => [(96, 7, 4)], ["refcount_order"], l => [7]),
        new("cluster_bits 22", l => [(20, 22, 4)], ["cluster_bits"], l => [22]),
        new("crypt_method 3", l => [(32, 3, 4)], ["crypt_method"], l => [3]),
        new("unknown incompatible bit 40", l => [(72, 1UL << 40, 8)], ["incompatible_features", "bit 40"], l => [1UL << 40]),
        new("size too large", l => [(24, 1UL << 62, 8)], ["size", "l1_size"], l => [1UL << 62, 24]),
        new("snapshots_offset unaligned", l => [(64, l.Snapshots + 512, 8)], ["snapshots_offset"], l => [l.Snapshots + 512]),
        new("nb_snapshots 65537", l => [(60, 65537, 4)], ["nb_snapshots"], l => [65537]),
        new("snapshot extra_data_size 1025", l => [((long)l.Snapshots + 36, 1025, 4)], ["extra_data_size"], l => [1025, l.Snapshots + 36]),
        new("feature table longer than the extension area", l => [(l.FeatureTable + 4, 70000, 4)], ["length", "header extension"], l => [70000]),
        new("bitmaps extension length 16", l => [(l.BitmapsExt + 4, 16, 4)], ["bitmaps extension", "length"], l => [16]),
        new("bitmaps extension reserved field", l => [(l.BitmapsExt + 12, 1, 4)], ["reserved"], l => [(ulong)l.BitmapsExt + 12]),
        new("nb_bitmaps 0", l => [(l.BitmapsExt + 8, 0, 4)], ["nb_bitmaps"], l => [(ulong)l.BitmapsExt + 8]),
        new("nb_bitmaps 65536", l => [(l.BitmapsExt + 8, 65536, 4)], ["nb_bitmaps"], l => [65536]),
        new("nb_bitmaps 2 with one entry", l => [(l.BitmapsExt + 8, 2, 4)], ["nb_bitmaps"], l => [2]),
        new("bitmap_directory_size 0", l => [(l.BitmapsExt + 16, 0, 8)], ["bitmap_directory_size"], l => [(ulong)l.BitmapsExt + 16]),
        new("bitmap_directory_size too large", l => [(l.BitmapsExt + 16, 1024 * 65535 + 1, 8)], ["bitmap_directory_size"], l => [1024 * 65535 + 1]),
        new("bitmap_directory_size cuts the entry", l => [(l.BitmapsExt + 16, 24, 8)], ["bitmap directory", "name_size"], l => [l.BitmapDir]),
        new("bitmap_directory_offset unaligned", l => [(l.BitmapsExt + 24, l.BitmapDir + 8, 8)], ["bitmap_directory_offset"], l => [l.BitmapDir + 8]),
        new("bitmap flags reserved bit", l => [((long)l.BitmapDir + 12, 6, 4)], ["flags"], l => [6, l.BitmapDir + 12]),
        new("bitmap type 2", l => [((long)l.BitmapDir + 16, 2, 1)], ["type"], l => [2, l.BitmapDir + 16]),
        new("bitmap granularity 8", l => [((long)l.BitmapDir + 17, 8, 1)], ["granularity_bits"], l => [8]),
        new("bitmap table size wrong", l => [((long)l.BitmapDir + 8, 2, 4)], ["bitmap_table_size"], l => [2, l.BitmapDir + 8]),
        new("bitmap table offset 0", l => [((long)l.BitmapDir, 0, 8)], ["bitmap_table_offset"], l => [l.BitmapDir]),
        new("bitmap extra data", l => [((long)l.BitmapDir + 20, 8, 4)], ["extra_data_size"], l => [8, l.BitmapDir + 20]),
        new("bitmap table entry with reserved bits", l => [((long)l.BitmapTable, 2, 8)], ["bitmap table entry"], l => [l.BitmapTable]),
    ];

    public static TheoryData<string> CaseNames() => new(Cases.Select(c => c.Name));

    [SkippableTheory]
    [MemberData(nameof(CaseNames))]
    public void RefusedLikeQemu(string name)
    {
        QemuImg.Require();
        var c = Cases.Single(x => x.Name == name);
        var (path, layout) = Base();
        foreach (var (at, value, width) in c.Pokes(layout))
            Poke(path, at, value, width);

        var qemu = TestEnvironment.RunProcess("qemu-img", ["info", path], TimeSpan.FromMinutes(1));
        Assert.True(qemu.ExitCode != 0, $"qemu-img opened the mutant '{name}'; the case is wrong:\n{qemu.Stdout}");

        var hash = Hash(path);
        foreach (var readOnly in new[] { true, false })
        {
            var e = Assert.Throws<ImageFormatException>(() => DiskImage.Open(path, new ImageOpenOptions { ReadOnly = readOnly }).Dispose());
            Assert.Contains(path, e.Message, StringComparison.Ordinal);
            Assert.DoesNotContain('\n', e.Message);
            AssertNames(e, c.Fields, c.Values(layout));
            Assert.Matches(@"at offset \d+", e.Message);
        }
        Assert.Equal(hash, Hash(path));
    }

    /// <summary>An unknown incompatible feature is named from the image's feature name table, escaped.</summary>
    [SkippableFact]
    public void UnknownIncompatibleFeatureIsNamedAndEscaped()
    {
        QemuImg.Require();
        var (path, layout) = Base();
        // Rewrite the feature table's first entry as incompatible bit 40 with a hostile name.
        int entry = layout.FeatureTable + 8;
        var name = new byte[46];
        Encoding.ASCII.GetBytes("\u001b[31mred\u0007").CopyTo(name, 0);
        using (var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite))
            RandomAccess.Write(f, [0, 40, .. name], entry);
        Poke(path, Field.IncompatibleFeatures, 1UL << 40, 8);
        Assert.NotEqual(0, TestEnvironment.RunProcess("qemu-img", ["info", path], TimeSpan.FromMinutes(1)).ExitCode);

        var e = Assert.Throws<ImageFormatException>(() => DiskImage.Open(path, new ImageOpenOptions { ReadOnly = true }).Dispose());
        Assert.Contains(@"\x1b[31mred\x07", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain(e.Message, ch => ch < 0x20 || ch == 0x7f);
    }

    /// <summary>Accepted by qemu, so accepted here: header_length 105 (extensions start unaligned), unknown autoclear bits, zstd.</summary>
    [SkippableFact]
    public void WhatQemuAcceptsIsAccepted()
    {
        QemuImg.Require();
        var path = _dir.File("zstd.qcow2");
        QemuImg.Create(path, "qcow2", 4 * MiB, extraOptions: ["compression_type=zstd"]);
        Poke(path, Field.AutoclearFeatures, 1UL << 9, 8);
        Assert.Equal(0, TestEnvironment.RunProcess("qemu-img", ["info", path], TimeSpan.FromMinutes(1)).ExitCode);
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
            Assert.True(q.Check().IsClean);
    }

    /// <summary>A backing file name with control bytes is escaped in the error that names it.</summary>
    [SkippableFact]
    public void BackingFileNameInAnErrorIsEscaped()
    {
        QemuImg.Require();
        var path = _dir.File("child.qcow2");
        QemuImg.Create(path, "qcow2", 4 * MiB);
        var name = Encoding.UTF8.GetBytes("missing\u001b]0;pwned\u0007.qcow2");
        using (var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite))
            RandomAccess.Write(f, name, 65536 - 512);
        Poke(path, Field.BackingFileOffset, 65536 - 512, 8);
        Poke(path, Field.BackingFileSize, (ulong)name.Length, 4);
        var e = Assert.Throws<ImageFormatException>(() => DiskImage.Open(path, new ImageOpenOptions { ReadOnly = true }).Dispose());
        Assert.Contains(@"missing\x1b]0;pwned\x07.qcow2", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain(e.Message, ch => ch < 0x20 || ch == 0x7f);
    }
}
