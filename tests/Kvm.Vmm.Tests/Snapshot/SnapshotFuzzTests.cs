using System.Buffers.Binary;
using System.Diagnostics;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;
using Kvm.Vmm.Snapshot;
using Xunit.Abstractions;
using static Kvm.Vmm.Tests.Snapshot.SnapshotTestData;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>
/// Seeded mutation fuzz of the snapshot reader: damaged state files (bit flips, overwritten bytes,
/// truncation at every section boundary and at random, huge or negative lengths and counts, other
/// versions, duplicate ids, inserted and deleted bytes), most with their length and CRC fixed up
/// so that the parser and not only the CRC meets them, and damaged memory file headers. The reader
/// must accept the file or throw <see cref="SnapshotFormatException"/> naming the file: no other
/// exception, no case slower than 2 s, and no more allocated than a few times the file's size.
/// Every case is a function of (seed name, case number): a failure names both.
/// </summary>
public class SnapshotFuzzTests(ITestOutputHelper output)
{
    private const int Iterations = 5000;
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(120);

    private static readonly ulong[] Interesting =
    [
        0, 1, 2, 3, 4, 7, 8, 15, 16, 24, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0x7fff, 0x8000, 0xffff,
        0x10000, 0x100000, 0x7fff_ffff, 0x8000_0000, 0xffff_fff0, 0xffff_fffc, 0xffff_ffff, 0x1_0000_0000,
        0x10_0000_0000_0000, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, 0xffff_ffff_ffff_f000, ulong.MaxValue,
    ];

    public static TheoryData<string> Seeds => ["full", "bare", "many"];

    private static SnapshotState SeedState(string seed) => seed switch
    {
        "full" => State(),
        "bare" => SnapshotState.Create("{\"kernel\":\"k\"}", [(0, 1UL << 20)], []),
        "many" => State(extraRecords: 40),
        _ => throw new ArgumentException(seed),
    };

    private static int StableSeed(string s) => s.Aggregate(0x5a17, (h, c) => unchecked(h * 31 + c)) & 0x7fff_ffff;

    /// <summary>What one read of a damaged snapshot came to.</summary>
    private enum Outcome { Accepted, RefusedHeader, RefusedCrc, RefusedParser, RefusedMemoryFile }

    /// <summary>A snapshot directory with a valid memory file, whose state file each case replaces.</summary>
    private sealed class Bed : IDisposable
    {
        public Bed(string seed)
        {
            Dir = new TempDir(preferShm: true);
            SnapshotWriter.Write(Dir.Path, SeedState(seed), Memory());
            Original = File.ReadAllBytes(StatePath);
            Layout = Walk(Original);
        }

        public TempDir Dir { get; }
        public byte[] Original { get; }
        public Layout Layout { get; }
        public string StatePath => Dir.Sub(SnapshotFormat.StateFileName);
        public string MemoryPath => Dir.Sub(SnapshotFormat.MemoryFileName);

        public void Dispose() => Dir.Dispose();
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public async Task MutatedStateFilesOnlyEverThrowSnapshotFormatException(string seed)
    {
        using var bed = new Bed(seed);
        SnapshotReader.Read(bed.Dir.Path); // the unmutated snapshot is valid
        var samples = new Dictionary<string, string>();
        var counts = await Run(() => Fuzz(bed, seed, samples));
        output.WriteLine($"{seed}: {string.Join(", ", counts.Select(c => $"{c.Key} {c.Value}"))}");
        foreach (var sample in samples.Values)
            output.WriteLine(sample);
        // The fix-ups must let most cases through to the parser, and both outcomes must occur.
        Assert.True(counts.GetValueOrDefault(Outcome.RefusedParser) >= Iterations / 4, $"only {counts.GetValueOrDefault(Outcome.RefusedParser)} cases reached a refusal by the parser");
        Assert.True(counts.GetValueOrDefault(Outcome.Accepted) > 0, "no mutation was accepted");
        Assert.True(counts.GetValueOrDefault(Outcome.RefusedCrc) > 0, "no mutation was refused by the CRC");
    }

    private static async Task<Dictionary<Outcome, int>> Run(Func<Dictionary<Outcome, int>> fuzz)
    {
        // On a worker, so that a hang fails the test instead of stalling the run.
        var work = Task.Run(fuzz);
        var finished = await Task.WhenAny(work, Task.Delay(Budget));
        Assert.True(finished == work, $"fuzzing did not finish within {Budget} (a read hangs or is very slow)");
        return await work;
    }

    private static Dictionary<Outcome, int> Fuzz(Bed bed, string seed, Dictionary<string, string> samples)
    {
        var counts = new Dictionary<Outcome, int>();
        int stable = StableSeed(seed);
        for (int i = 0; i < Iterations; i++)
        {
            var rng = new Random(unchecked(stable * 31 + i * 7919));
            var (file, what) = Mutate(bed.Original, bed.Layout, rng);
            File.WriteAllBytes(bed.StatePath, file);
            var outcome = ReadOnce(bed, file, $"{seed}:{i} ({what})", () => SnapshotReader.Read(bed.Dir.Path), samples);
            counts[outcome] = counts.GetValueOrDefault(outcome) + 1;
        }
        return counts;
    }

    /// <summary>Runs one read under the pass criteria; throws (an xunit assertion) on a failure.</summary>
    private static Outcome ReadOnce(Bed bed, byte[] file, string name, Action read, Dictionary<string, string>? samples = null)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        var cpuBefore = ThreadCpuTime.Now;
        Outcome outcome;
        try
        {
            read();
            outcome = Outcome.Accepted;
        }
        catch (SnapshotFormatException e)
        {
            Assert.True(e.FilePath == bed.StatePath || e.FilePath == bed.MemoryPath, $"{name}: the refusal names {e.FilePath}");
            Assert.True(e.Message.Contains(e.FilePath, StringComparison.Ordinal), $"{name}: the message does not name the file: {e.Message}");
            if (samples is not null && samples.Count < 60)
                samples.TryAdd(Kind(e.Problem), $"{name}: {e.Message}");
            outcome = e.FilePath == bed.MemoryPath ? Outcome.RefusedMemoryFile
                : e.Problem.StartsWith("CRC mismatch", StringComparison.Ordinal) ? Outcome.RefusedCrc
                : e.Offset is { } o && o < 48 ? Outcome.RefusedHeader
                : Outcome.RefusedParser;
        }
        catch (Exception e)
        {
            Assert.Fail($"{name}: {e.GetType().Name}: {e.Message}\nfile ({file.Length} bytes) starts {Convert.ToHexString(file.AsSpan(0, Math.Min(file.Length, 96)))}\n{e}");
            throw;
        }
        var cpu = ThreadCpuTime.Now - cpuBefore;
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        // The file's bytes, the payloads copied out of them, the spec as UTF-16, the memory header, the handles.
        long bound = 4L * file.Length + (256 << 10);
        Assert.True(allocated <= bound, $"{name}: one read of a {file.Length}-byte file allocated {allocated} bytes (bound {bound})");
        // CPU time, not wall clock: a loaded machine may leave the thread waiting for a CPU for seconds.
        Assert.True(cpu < TimeSpan.FromSeconds(2), $"{name}: one read used {cpu.TotalSeconds:0.00} s of CPU");
        return outcome;
    }

    /// <summary>A refusal's kind for the samples: its words without numbers and quoted names.</summary>
    private static string Kind(string problem) => Regex.Replace(problem, @"0x[0-9a-f]+|[0-9A-F]{8,}|\d+|\('[^']*'\)", "#");

    private static (byte[] File, string What) Mutate(byte[] original, Layout layout, Random rng)
    {
        var file = (byte[])original.Clone();
        var what = new List<string>();
        int count = rng.Next(1, 4);
        for (int m = 0; m < count; m++)
        {
            switch (rng.Next(12))
            {
                case 0:
                    if (file.Length > 0)
                    {
                        int at = rng.Next(file.Length);
                        file[at] ^= (byte)(1 << rng.Next(8));
                        what.Add($"flip@{at}");
                    }
                    break;
                case 1:
                    if (file.Length > 0)
                    {
                        int at = rng.Next(file.Length);
                        file[at] = (byte)rng.Next(256);
                        what.Add($"byte@{at}");
                    }
                    break;
                case 2:
                {
                    int at = rng.Next(file.Length + 1);
                    file = file[..at];
                    what.Add($"cut@{at}");
                    break;
                }
                case 3:
                {
                    int at = Math.Clamp(layout.Boundaries.ElementAt(rng.Next(layout.Boundaries.Count)) + rng.Next(-2, 3), 0, file.Length);
                    file = file[..at];
                    what.Add($"cut-boundary@{at}");
                    break;
                }
                case 4:
                case 5:
                case 6:
                {
                    var (offset, width, name) = layout.Fields[rng.Next(layout.Fields.Count)];
                    if (offset + width > file.Length)
                        break;
                    ulong v = rng.Next(4) switch
                    {
                        0 => (ulong)rng.NextInt64() ^ ((ulong)rng.Next() << 32),
                        1 => (ulong)file.Length + (ulong)(long)rng.Next(-64, 65), // near the file size
                        _ => Interesting[rng.Next(Interesting.Length)],
                    };
                    if (rng.Next(3) == 0)
                        v = Read(file, offset, width) + (ulong)(long)rng.Next(-3, 4); // off by a little
                    Write(file, offset, width, v);
                    what.Add($"{name}@{offset}=0x{v:x}");
                    break;
                }
                case 7:
                    if (file.Length >= 12)
                    {
                        uint v = rng.Next(3) switch { 0 => 0, 1 => 2, _ => (uint)rng.Next() };
                        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(8), v);
                        what.Add($"version={v}");
                    }
                    break;
                case 8:
                {
                    int at = Math.Min(layout.Boundaries.ElementAt(rng.Next(layout.Boundaries.Count)), file.Length);
                    var extra = new byte[rng.Next(1, 40)];
                    rng.NextBytes(extra);
                    file = [.. file[..at], .. extra, .. file[at..]];
                    what.Add($"insert{extra.Length}@{at}");
                    break;
                }
                case 9:
                    if (file.Length > 0)
                    {
                        int at = rng.Next(file.Length);
                        int n = Math.Min(rng.Next(1, 40), file.Length - at);
                        file = [.. file[..at], .. file[(at + n)..]];
                        what.Add($"delete{n}@{at}");
                    }
                    break;
                case 10:
                    if (layout.RecordIds.Count >= 2)
                    {
                        // One record's id copied over another's of the same length: a duplicate id.
                        int a = layout.RecordIds[rng.Next(layout.RecordIds.Count)], b = layout.RecordIds[rng.Next(layout.RecordIds.Count)];
                        int n = BinaryPrimitives.ReadUInt16LittleEndian(original.AsSpan(a));
                        if (n == BinaryPrimitives.ReadUInt16LittleEndian(original.AsSpan(b)) && b + 2 + n <= file.Length)
                        {
                            original.AsSpan(a + 2, n).CopyTo(file.AsSpan(b + 2));
                            what.Add($"id@{a}->@{b}");
                        }
                    }
                    break;
                default:
                {
                    var tail = new byte[rng.Next(1, 64)];
                    rng.NextBytes(tail);
                    file = [.. file, .. tail];
                    what.Add($"tail{tail.Length}");
                    break;
                }
            }
        }
        // Most cases get a true length and CRC, so that the parser meets the damage.
        bool length = rng.Next(10) < 8, crc = rng.Next(10) < 8;
        FixUp(file, length, crc);
        what.Add(length && crc ? "fixed" : length ? "length-fixed" : crc ? "crc-fixed" : "raw");
        return (file, string.Join(' ', what));
    }

    private static ulong Read(byte[] file, int offset, int width) => width switch
    {
        2 => BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(offset)),
        4 => BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(offset)),
        _ => BinaryPrimitives.ReadUInt64LittleEndian(file.AsSpan(offset)),
    };

    private static void Write(byte[] file, int offset, int width, ulong v)
    {
        switch (width)
        {
            case 2: BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(offset), (ushort)v); break;
            case 4: BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(offset), (uint)v); break;
            default: BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(offset), v); break;
        }
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public void EveryTruncationIsRefused(string seed)
    {
        using var bed = new Bed(seed);
        var original = bed.Original;
        int refusedByParser = 0;
        for (int cut = 0; cut < original.Length; cut++)
        {
            foreach (bool fix in new[] { false, true })
            {
                var file = original[..cut];
                if (fix)
                    FixUp(file);
                var outcome = ReadOnce(bed, file, $"{seed}: cut at {cut}{(fix ? ", fixed up" : "")}", () => SnapshotReader.ParseState(file, bed.StatePath));
                Assert.NotEqual(Outcome.Accepted, outcome);
                if (outcome == Outcome.RefusedParser)
                    refusedByParser++;
            }
        }
        Assert.True(refusedByParser > original.Length / 2, $"{refusedByParser} truncations reached the parser");

        // At every boundary, through the file system and the whole reader, the message says what ended early.
        foreach (int cut in bed.Layout.Boundaries.Where(b => b < original.Length))
        {
            var file = original[..cut];
            FixUp(file);
            File.WriteAllBytes(bed.StatePath, file);
            var e = Assert.Throws<SnapshotFormatException>(() => SnapshotReader.Read(bed.Dir.Path));
            Assert.Contains(bed.StatePath, e.Message, StringComparison.Ordinal);
        }
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public void EveryFieldSetToEveryBoundaryValueIsAcceptedOrRefused(string seed)
    {
        using var bed = new Bed(seed);
        var original = bed.Original;
        var counts = new Dictionary<Outcome, int>();
        foreach (var (offset, width, name) in bed.Layout.Fields)
        {
            var values = Interesting.Concat([(ulong)original.Length, (ulong)original.Length - 1, (ulong)original.Length + 1,
                Read(original, offset, width) + 1, Read(original, offset, width) - 1]);
            foreach (ulong v in values)
            {
                var file = (byte[])original.Clone();
                Write(file, offset, width, v);
                FixUp(file, length: name != "file length");
                var outcome = ReadOnce(bed, file, $"{seed}: {name}@{offset}=0x{v:x}", () => SnapshotReader.ParseState(file, bed.StatePath));
                counts[outcome] = counts.GetValueOrDefault(outcome) + 1;
            }
        }
        output.WriteLine($"{seed}: {string.Join(", ", counts.Select(c => $"{c.Key} {c.Value}"))}");
        Assert.True(counts.GetValueOrDefault(Outcome.RefusedParser) > counts.Values.Sum() / 2);
    }

    [Fact]
    public void DamagedMemoryFileHeadersAreRefused()
    {
        using var bed = new Bed("full");
        var header = new byte[4096];
        using (var f = File.OpenHandle(bed.MemoryPath))
            RandomAccess.Read(f, header, 0);
        long length = new FileInfo(bed.MemoryPath).Length;
        var counts = new Dictionary<Outcome, int>();
        for (int i = 0; i < 600; i++)
        {
            var rng = new Random(unchecked(StableSeed("memory") * 31 + i * 7919));
            var h = (byte[])header.Clone();
            long newLength = length;
            string what;
            switch (rng.Next(5))
            {
                case 0:
                {
                    int at = rng.Next(48);
                    h[at] ^= (byte)(1 << rng.Next(8));
                    what = $"flip@{at}";
                    break;
                }
                case 1:
                {
                    int at = rng.Next(6) * 8;
                    BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(at), Interesting[rng.Next(Interesting.Length)]);
                    what = $"u64@{at}";
                    break;
                }
                case 2:
                    newLength = rng.Next(3) switch { 0 => rng.Next(4097), 1 => length - 4096 * rng.Next(1, 8), _ => length + rng.Next(1, 9000) };
                    what = $"length={newLength}";
                    break;
                case 3:
                {
                    int at = rng.Next(48, 4088);
                    h[at] = (byte)rng.Next(1, 256);
                    what = $"reserved@{at}";
                    break;
                }
                default:
                    h[4088 + rng.Next(8)] ^= 1;
                    what = "crc";
                    break;
            }
            if (rng.Next(4) != 0)
                BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(4088), Crc(h.AsSpan(0, 4088)));
            using (var f = File.OpenHandle(bed.MemoryPath, FileMode.Open, FileAccess.ReadWrite))
            {
                RandomAccess.Write(f, h, 0);
                RandomAccess.SetLength(f, newLength);
            }
            var outcome = ReadOnce(bed, [], $"memory:{i} ({what})", () => SnapshotReader.Read(bed.Dir.Path));
            counts[outcome] = counts.GetValueOrDefault(outcome) + 1;
        }
        output.WriteLine(string.Join(", ", counts.Select(c => $"{c.Key} {c.Value}")));
        Assert.True(counts.GetValueOrDefault(Outcome.RefusedMemoryFile) > 300);
    }
}
