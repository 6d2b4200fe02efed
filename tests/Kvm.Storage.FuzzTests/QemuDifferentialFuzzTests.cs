using System.Buffers.Binary;
using System.Globalization;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using Xunit.Abstractions;

namespace Kvm.Storage.FuzzTests;

/// <summary>
/// A differential fuzz with qemu-img as the oracle, over the structured fields of qemu-made images:
/// the header, every header extension's type and length, the bitmaps extension, the bitmap directory
/// and a bitmap table, the snapshot table and the feature name table. Each mutant is opened by
/// <c>qemu-img info</c> and <c>qemu-img check</c>; every mutant qemu refuses to open, the engine must
/// refuse at open with one clean line (the file named, no control bytes). Every case also passes the
/// read-only criteria of <see cref="FuzzHarness.RunReadOnly"/> (no crash, no hang, bounded memory,
/// the file unchanged).
/// </summary>
public sealed class QemuDifferentialFuzzTests(ITestOutputHelper output)
{
    public const int CasesPerSeed = 120;

    /// <summary>A field to mutate: where it is, how wide, and what it is called (for the report).</summary>
    private sealed record FieldAt(string Name, long Offset, int Width);

    private static IReadOnlyList<(string Name, string Path, List<FieldAt> Fields)> MakeSeeds(string dir)
    {
        var seeds = new List<(string, string, List<FieldAt>)>();
        var v3 = Path.Combine(dir, "diff-v3.qcow2");
        Qemu.Create(v3, 8 << 20, 65536);
        Qemu.Io(v3, ["write -P 0x11 0 256k"]);
        Qemu.Run("qemu-img", ["snapshot", "-c", "s1", v3]);
        Qemu.Io(v3, ["write -P 0x22 64k 64k"]);
        Qemu.Run("qemu-img", ["snapshot", "-c", "second", v3]);
        Qemu.Run("qemu-img", ["bitmap", "--add", v3, "b0"]);
        Qemu.Run("qemu-img", ["bitmap", "--add", "-g", "4096", v3, "b1"]);
        seeds.Add(("v3", v3, FieldsOf(File.ReadAllBytes(v3))));

        var v2 = Path.Combine(dir, "diff-v2.qcow2");
        Qemu.Create(v2, 8 << 20, 4096, ["compat=0.10"]);
        Qemu.Io(v2, ["write -P 0x11 0 64k"]);
        Qemu.Run("qemu-img", ["snapshot", "-c", "s1", v2]);
        seeds.Add(("v2", v2, FieldsOf(File.ReadAllBytes(v2))));
        return seeds;
    }

    private static uint U32(byte[] b, long o) => BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan((int)o));
    private static ulong U64(byte[] b, long o) => BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan((int)o));

    /// <summary>Every structured field of the image, found by walking it as the specification lays it out.</summary>
    private static List<FieldAt> FieldsOf(byte[] b)
    {
        var f = new List<FieldAt>
        {
            new("version", 4, 4), new("backing_file_offset", 8, 8), new("backing_file_size", 16, 4), new("cluster_bits", 20, 4),
            new("size", 24, 8), new("crypt_method", 32, 4), new("l1_size", 36, 4), new("l1_table_offset", 40, 8),
            new("refcount_table_offset", 48, 8), new("refcount_table_clusters", 56, 4), new("nb_snapshots", 60, 4),
            new("snapshots_offset", 64, 8),
        };
        uint version = U32(b, 4);
        int cs = 1 << (int)U32(b, 20);
        int pos = 72;
        if (version == 3)
        {
            f.AddRange([new("incompatible_features", 72, 8), new("compatible_features", 80, 8), new("autoclear_features", 88, 8),
                new("refcount_order", 96, 4), new("header_length", 100, 4), new("compression_type", 104, 1)]);
            pos = (int)U32(b, 100);
        }
        ulong bitmapDir = 0, bitmapDirSize = 0;
        while (pos + 8 <= cs)
        {
            uint type = U32(b, pos), len = U32(b, pos + 4);
            f.Add(new($"extension@{pos}.type", pos, 4));
            if (type == 0)
                break;
            f.Add(new($"extension 0x{type:x8}.length", pos + 4, 4));
            if (type == Qcow2Header.ExtBitmaps)
            {
                f.AddRange([new("bitmaps.nb_bitmaps", pos + 8, 4), new("bitmaps.reserved", pos + 12, 4),
                    new("bitmaps.directory_size", pos + 16, 8), new("bitmaps.directory_offset", pos + 24, 8)]);
                bitmapDirSize = U64(b, pos + 16);
                bitmapDir = U64(b, pos + 24);
            }
            if (type == Qcow2Header.ExtFeatureNames)
                f.AddRange([new("feature[0].type", pos + 8, 1), new("feature[0].bit", pos + 9, 1), new("feature[0].name", pos + 10, 8)]);
            pos += 8 + (int)((len + 7) & ~7u);
        }
        for (ulong e = bitmapDir, n = 0; e < bitmapDir + bitmapDirSize; n++)
        {
            f.AddRange([new($"bitmap[{n}].table_offset", (long)e, 8), new($"bitmap[{n}].table_size", (long)e + 8, 4),
                new($"bitmap[{n}].flags", (long)e + 12, 4), new($"bitmap[{n}].type", (long)e + 16, 1),
                new($"bitmap[{n}].granularity_bits", (long)e + 17, 1), new($"bitmap[{n}].name_size", (long)e + 18, 2),
                new($"bitmap[{n}].extra_data_size", (long)e + 20, 4), new($"bitmap[{n}].name", (long)e + 24, 1)]);
            f.Add(new($"bitmap[{n}].table[0]", (long)U64(b, (long)e), 8));
            e += (24UL + BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan((int)e + 18)) + 7) & ~7UL;
        }
        ulong s = U64(b, 64);
        for (uint i = 0; i < U32(b, 60); i++)
        {
            s = (s + 7) & ~7UL;
            f.AddRange([new($"snapshot[{i}].l1_table_offset", (long)s, 8), new($"snapshot[{i}].l1_size", (long)s + 8, 4),
                new($"snapshot[{i}].id_size", (long)s + 12, 2), new($"snapshot[{i}].name_size", (long)s + 14, 2),
                new($"snapshot[{i}].extra_data_size", (long)s + 36, 4), new($"snapshot[{i}].id", (long)s + 40 + U32(b, (long)s + 36), 1)]);
            s += 40 + U32(b, (long)s + 36) + BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan((int)s + 12)) + BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan((int)s + 14));
        }
        return f;
    }

    private static ulong Read(byte[] b, FieldAt f) => f.Width switch
    {
        8 => U64(b, f.Offset),
        4 => U32(b, f.Offset),
        2 => BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan((int)f.Offset)),
        _ => b[f.Offset],
    };

    private static void Write(byte[] b, FieldAt f, ulong v)
    {
        switch (f.Width)
        {
            case 8: BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan((int)f.Offset), v); break;
            case 4: BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan((int)f.Offset), (uint)v); break;
            case 2: BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan((int)f.Offset), (ushort)v); break;
            default: b[f.Offset] = (byte)v; break;
        }
    }

    /// <summary>A value near a boundary qemu cares about: zero, small, the old value nudged, a cluster away, a power of two, all ones, a control byte.</summary>
    private static ulong Interesting(ulong old, int width, Random rng)
    {
        ulong max = width == 8 ? ulong.MaxValue : (1UL << (width * 8)) - 1;
        ulong v = rng.Next(12) switch
        {
            0 => 0,
            1 => (ulong)rng.Next(1, 8),
            2 => old + 1,
            3 => old - 1,
            4 => old + 8,
            5 => old + 512,
            6 => old + 65536,
            7 => old * 2,
            8 => 1UL << rng.Next(width * 8),
            9 => max,
            10 => old ^ (1UL << rng.Next(width * 8)),
            _ => (ulong)rng.Next(0x1b, 0x20) | 0x80, // an escape-ish byte (in names)
        };
        return v & max;
    }

    [SkippableFact]
    public void RefusedWhenQemuRefuses()
    {
        Qemu.Require();
        var dir = Corpus.Dir("differential");
        var campaign = new FuzzCampaign("diff", nameof(QemuDifferentialFuzzTests) + "." + nameof(RefusedWhenQemuRefuses), output);
        int qemuRefused = 0, agreed = 0;
        foreach (var (name, seedPath, fields) in MakeSeeds(dir))
        {
            var seed = File.ReadAllBytes(seedPath);
            int cases = Math.Max(1, (int)(CasesPerSeed * FuzzHarness.Scale));
            for (int i = 0; i < cases; i++)
            {
                if (!FuzzHarness.Selected(name, i))
                    continue;
                var rng = FuzzHarness.CaseRandom("diff", name, i);
                var bytes = (byte[])seed.Clone();
                var changes = new List<string>();
                for (int k = 0, n = rng.Next(1, 3); k < n; k++)
                {
                    var field = fields[rng.Next(fields.Count)];
                    ulong old = Read(bytes, field), v = Interesting(old, field.Width, rng);
                    Write(bytes, field, v);
                    changes.Add($"{field.Name} 0x{old:x} -> 0x{v:x}");
                }
                string description = string.Join("; ", changes);
                var file = Path.Combine(dir, $"{name}-{i}.qcow2");
                File.WriteAllBytes(file, bytes);

                var info = TestEnvironment.RunProcess("qemu-img", ["info", "-f", "qcow2", file], TimeSpan.FromMinutes(1));
                var check = info.ExitCode == 0 ? Qemu.Check(file) : null;
                string? qemuRefusal = info.ExitCode != 0 ? info.Stderr.Trim() : check!.ExitCode == 1 ? check.Stderr.Trim() : null;

                var result = FuzzHarness.RunReadOnly(file, [new WatchedFile(file, fullHash: true, FuzzHarness.Hash(bytes))], rng);
                if (qemuRefusal is not null)
                {
                    qemuRefused++;
                    string? message = null;
                    try
                    {
                        DiskImage.Open(file, FuzzHarness.ReadOnlyOptions).Dispose();
                    }
                    catch (ImageFormatException e)
                    {
                        message = e.Message;
                    }
                    if (message is null)
                        result = result with { Failure = (result.Failure is null ? "" : result.Failure + "\n      ") + $"qemu-img refuses it ({qemuRefusal.ReplaceLineEndings(" ")}) but the engine opened it", Signature = "opened what qemu refuses" };
                    else if (!message.Contains(file, StringComparison.Ordinal) || message.Any(c => c < 0x20 || c == 0x7f))
                        result = result with { Failure = $"the refusal does not name the file on one clean line: {message}", Signature = "unclear refusal" };
                    else
                        agreed++;
                }
                else if (check!.ExitCode == 0 && result.Failure is null && result.Outcome != "accepted, check clean")
                {
                    // An image qemu-img calls clean must be clean to the engine too.
                    result = result with { Failure = $"qemu-img check calls it clean, the engine's outcome is '{result.Outcome}'", Signature = "not clean where qemu is" };
                }
                campaign.Record($"{name}:{i}", "field", description, result, bytes);
                File.Delete(file);
            }
        }
        output.WriteLine($"qemu-img refused {qemuRefused} mutants; the engine refused {agreed} of them cleanly");
        campaign.Finish();
        Assert.True(qemuRefused > 20, $"only {qemuRefused} mutants were refused by qemu-img: the fuzz is not reaching the rules");
    }
}
