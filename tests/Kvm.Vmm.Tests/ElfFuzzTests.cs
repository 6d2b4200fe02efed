using System.Buffers.Binary;
using System.Diagnostics;
using Kvm.Tests.Shared;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

/// <summary>
/// Mutates valid ELF files at random and checks that the parser only ever accepts the file or
/// throws <see cref="BootException"/>: no other exception, no hang, no large allocation.
/// </summary>
public class ElfFuzzTests
{
    private const int Iterations = 10000;
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(60);

    private static readonly ulong[] Interesting =
    [
        0, 1, 2, 3, 4, 7, 8, 12, 0x10, 0x38, 0x40, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0x7fff, 0x8000, 0xffff,
        0x10000, 0x7fff_ffff, 0x8000_0000, 0xffff_fff0, 0xffff_fffc, 0xffff_ffff, 0x1_0000_0000,
        0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, 0xffff_ffff_ffff_fff0, ulong.MaxValue,
    ];

    public static TheoryData<string> SyntheticInputs => ["elf64", "elf64-desc8", "elf32", "elf32-desc8", "elf64-section-note", "elf32-section-note"];

    private static (ElfBuilder Builder, byte[] File) Synthetic(string kind)
    {
        ElfBuilder b;
        switch (kind)
        {
            case "elf64": b = ElfBuilder.WithPvh(true); break;
            case "elf64-desc8": b = ElfBuilder.WithPvh(true, eightByteDesc: true); break;
            case "elf32": b = ElfBuilder.WithPvh(false); break;
            case "elf32-desc8": b = ElfBuilder.WithPvh(false, eightByteDesc: true); break;
            default:
                bool is64 = kind.StartsWith("elf64", StringComparison.Ordinal);
                b = new ElfBuilder { Is64 = is64, Machine = is64 ? (ushort)62 : (ushort)3 };
                b.Load(0x100000, ElfBuilder.Pattern(0x40, 7), 0x100);
                b.NoteSegment(ElfBuilder.Note("GNU", 3, [1, 2, 3, 4]));
                b.NoteSections.Add(ElfBuilder.Note("GNU", 1, [0, 0, 0, 0]));
                b.NoteSections.Add(ElfBuilder.PvhNote(0x100000));
                break;
        }
        return (b, b.Build());
    }

    [Theory]
    [MemberData(nameof(SyntheticInputs))]
    public async Task MutatedSyntheticElfOnlyEverThrowsBootException(string kind)
    {
        var (b, file) = Synthetic(kind);
        ElfImage.Parse(file, kind); // the unmutated input is valid

        var fields = FieldOffsets(b, file);
        await RunFuzz(file, fields, seed: StableSeed(kind), kind);
    }

    [SkippableFact]
    public async Task MutatedGuestKitOnlyEverThrowsBootException()
    {
        string? why = TestEnvironment.GuestKitUnavailable();
        Skip.If(why is not null, why);
        var file = await File.ReadAllBytesAsync(TestEnvironment.GuestKit);
        ElfImage.Parse(file, "guestkit");

        // Field offsets from the real file's own header.
        bool is64 = file[4] == 2;
        var b = new ElfBuilder { Is64 = is64 };
        var fields = HeaderFields(b);
        ulong phoff = is64 ? BinaryPrimitives.ReadUInt64LittleEndian(file.AsSpan(32)) : BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(28));
        int phnum = BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(b.PhNumField));
        for (int i = 0; i < phnum; i++)
            fields.AddRange(PhFields(b, (int)phoff + i * b.PhEntSize));
        await RunFuzz(file, fields, seed: 0x6e57, "guestkit");
    }

    private static int StableSeed(string s) => s.Aggregate(0x5eed, (h, c) => unchecked(h * 31 + c)) & 0x7fff_ffff;

    private static List<(int Offset, int Width)> HeaderFields(ElfBuilder b) =>
    [
        (4, 1), (5, 1), (16, 2), (18, 2),
        (b.PhOffField, b.Is64 ? 8 : 4), (b.ShOffField, b.Is64 ? 8 : 4),
        (b.PhEntSizeField, 2), (b.PhNumField, 2), (b.ShEntSizeField, 2), (b.ShNumField, 2),
    ];

    private static IEnumerable<(int Offset, int Width)> PhFields(ElfBuilder b, int ph)
    {
        int w = b.Is64 ? 8 : 4;
        yield return (ph, 4);
        yield return (ph + b.POffset, w);
        yield return (ph + b.PPaddr, w);
        yield return (ph + b.PFilesz, w);
        yield return (ph + b.PMemsz, w);
    }

    private static List<(int Offset, int Width)> FieldOffsets(ElfBuilder b, byte[] file)
    {
        var fields = HeaderFields(b);
        for (int i = 0; i < b.Segments.Count; i++)
        {
            fields.AddRange(PhFields(b, b.Ph(i)));
            if (b.Segments[i].Type == ElfBuilder.PtNote)
            {
                // namesz, descsz, type of the notes in this area.
                int o = b.DataOffsets[i];
                int end = o + b.Segments[i].Data.Length;
                while (o + 12 <= end)
                {
                    fields.Add((o, 4));
                    fields.Add((o + 4, 4));
                    fields.Add((o + 8, 4));
                    uint namesz = BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(o));
                    uint descsz = BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(o + 4));
                    o += 12 + (int)((namesz + 3) & ~3u) + (int)((descsz + 3) & ~3u);
                }
            }
        }
        // Section headers, when present: sh_type, sh_offset, sh_size.
        ulong shoff = b.Is64 ? BinaryPrimitives.ReadUInt64LittleEndian(file.AsSpan(40)) : BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(32));
        int shnum = BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(b.ShNumField));
        for (int i = 0; i < shnum; i++)
        {
            int s = (int)shoff + i * b.ShEntSize;
            fields.Add((s + 4, 4));
            fields.Add((s + (b.Is64 ? 24 : 16), b.Is64 ? 8 : 4));
            fields.Add((s + (b.Is64 ? 32 : 20), b.Is64 ? 8 : 4));
            // And the first words of the note the section points at.
            ulong off = b.Is64 ? BinaryPrimitives.ReadUInt64LittleEndian(file.AsSpan(s + 24)) : BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(s + 16));
            if (off != 0 && off + 12 <= (ulong)file.Length)
            {
                fields.Add(((int)off, 4));
                fields.Add(((int)off + 4, 4));
            }
        }
        return fields;
    }

    private static async Task RunFuzz(byte[] original, List<(int Offset, int Width)> fields, int seed, string what)
    {
        // Run on a worker so that a hang fails the test instead of stalling the run.
        var work = Task.Run(() => Fuzz(original, fields, seed, what));
        var finished = await Task.WhenAny(work, Task.Delay(Budget));
        Assert.True(finished == work, $"{what}: fuzzing did not finish within {Budget} (a parse hangs or is very slow)");
        var failure = await work;
        Assert.True(failure is null, failure);
    }

    // Returns a description of the first failure, or null.
    private static string? Fuzz(byte[] original, List<(int Offset, int Width)> fields, int seed, string what)
    {
        var rng = new Random(seed);
        int accepted = 0, refused = 0;
        long worstAllocation = 0;
        var slowest = TimeSpan.Zero;
        for (int iteration = 0; iteration < Iterations; iteration++)
        {
            var file = Mutate(original, fields, rng);
            long before = GC.GetAllocatedBytesForCurrentThread();
            var cpuBefore = ThreadCpuTime.Now;
            try
            {
                ElfImage.Parse(file, what);
                accepted++;
            }
            catch (BootException)
            {
                refused++;
            }
            catch (Exception e)
            {
                return $"{what} iteration {iteration} (seed {seed}): {e.GetType().Name}: {e.Message}\n"
                    + $"file ({file.Length} bytes) starts {Convert.ToHexString(file.AsSpan(0, Math.Min(file.Length, 128)))}\n{e.StackTrace}";
            }
            // CPU time, not wall clock: a loaded machine may leave the thread waiting for a CPU for seconds.
            var used = ThreadCpuTime.Now - cpuBefore;
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            worstAllocation = Math.Max(worstAllocation, allocated);
            if (used > slowest)
                slowest = used;
            if (allocated > 4L << 20)
                return $"{what} iteration {iteration} (seed {seed}): one parse allocated {allocated} bytes";
            if (used > TimeSpan.FromSeconds(2))
                return $"{what} iteration {iteration} (seed {seed}): one parse used {used.TotalSeconds:0.00} s of CPU";
        }
        // Both outcomes must occur, or the mutations are not exercising anything.
        if (refused == 0)
            return $"{what}: no mutation was refused in {Iterations} iterations";
        if (accepted == 0)
            return $"{what}: no mutation was accepted in {Iterations} iterations";
        return null;
    }

    private static byte[] Mutate(byte[] original, List<(int Offset, int Width)> fields, Random rng)
    {
        var file = (byte[])original.Clone();
        int count = rng.Next(1, 5);
        for (int m = 0; m < count; m++)
        {
            switch (rng.Next(7))
            {
                case 0: // random byte
                    if (file.Length > 0)
                        file[rng.Next(file.Length)] = (byte)rng.Next(256);
                    break;
                case 1: // bit flip
                    if (file.Length > 0)
                        file[rng.Next(file.Length)] ^= (byte)(1 << rng.Next(8));
                    break;
                case 2: // truncation
                    file = file[..rng.Next(file.Length + 1)];
                    break;
                case 3: // extension with random bytes
                {
                    var tail = new byte[rng.Next(1, 256)];
                    rng.NextBytes(tail);
                    file = [.. file, .. tail];
                    break;
                }
                case 4: // a huge or boundary value into a field
                case 5:
                case 6:
                {
                    var (offset, width) = fields[rng.Next(fields.Count)];
                    if (offset + width > file.Length)
                        break;
                    ulong v = rng.Next(4) == 0
                        ? (ulong)rng.NextInt64() ^ ((ulong)rng.Next() << 32)
                        : Interesting[rng.Next(Interesting.Length)];
                    if (rng.Next(4) == 0)
                        v = (ulong)file.Length + (ulong)rng.Next(-16, 17); // near the file size
                    var span = file.AsSpan(offset, width);
                    switch (width)
                    {
                        case 1: span[0] = (byte)v; break;
                        case 2: BinaryPrimitives.WriteUInt16LittleEndian(span, (ushort)v); break;
                        case 4: BinaryPrimitives.WriteUInt32LittleEndian(span, (uint)v); break;
                        default: BinaryPrimitives.WriteUInt64LittleEndian(span, v); break;
                    }
                    break;
                }
            }
        }
        return file;
    }
}
