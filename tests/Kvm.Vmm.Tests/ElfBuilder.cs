using System.Buffers.Binary;
using System.Text;

namespace Kvm.Vmm.Tests;

/// <summary>
/// Writes small little-endian ELF32/ELF64 files for the loader tests: a header, a program header
/// table right after it, segment contents, and optionally a section header table at the end.
/// Field offsets are exposed so tests can corrupt exactly one field.
/// </summary>
public sealed class ElfBuilder
{
    public const uint PtLoad = 1, PtNote = 4, PtPhdr = 6, ShtProgbits = 1, ShtNote = 7;

    public sealed record Segment(uint Type, ulong PhysicalAddress, byte[] Data, ulong MemorySize);

    public bool Is64 { get; init; } = true;
    public ushort Type { get; init; } = 2;      // ET_EXEC
    public ushort Machine { get; init; } = 62;  // EM_X86_64
    public ulong Entry { get; init; } = 0x100000;
    public List<Segment> Segments { get; } = [];

    /// <summary>Note areas placed in SHT_NOTE sections (not covered by any PT_NOTE).</summary>
    public List<byte[]> NoteSections { get; } = [];

    public int HeaderSize => Is64 ? 64 : 52;
    public int PhEntSize => Is64 ? 56 : 32;
    public int ShEntSize => Is64 ? 64 : 40;

    // Header field offsets.
    public int PhOffField => Is64 ? 32 : 28;
    public int ShOffField => Is64 ? 40 : 32;
    public int PhEntSizeField => Is64 ? 54 : 42;
    public int PhNumField => Is64 ? 56 : 44;
    public int ShEntSizeField => Is64 ? 58 : 46;
    public int ShNumField => Is64 ? 60 : 48;

    /// <summary>Offset of program header <paramref name="i"/> (the table follows the ELF header).</summary>
    public int Ph(int i) => HeaderSize + i * PhEntSize;

    // Program header field offsets, relative to the entry.
    public int POffset => Is64 ? 8 : 4;
    public int PPaddr => Is64 ? 24 : 12;
    public int PFilesz => Is64 ? 32 : 16;
    public int PMemsz => Is64 ? 40 : 20;

    public ElfBuilder Load(ulong paddr, byte[] data, ulong? memsz = null)
    {
        Segments.Add(new Segment(PtLoad, paddr, data, memsz ?? (ulong)data.Length));
        return this;
    }

    public ElfBuilder NoteSegment(params byte[][] notes)
    {
        var area = notes.SelectMany(n => n).ToArray();
        Segments.Add(new Segment(PtNote, 0, area, (ulong)area.Length));
        return this;
    }

    /// <summary>One ELF note: namesz, descsz, type, name (NUL-terminated, padded to 4), desc (padded to 4).</summary>
    public static byte[] Note(string name, uint type, byte[] desc)
    {
        byte[] n = [.. Encoding.ASCII.GetBytes(name), 0];
        var b = new List<byte>();
        b.AddRange(U32(n.Length));
        b.AddRange(U32(desc.Length));
        b.AddRange(U32(type));
        b.AddRange(n);
        Pad4(b);
        b.AddRange(desc);
        Pad4(b);
        return [.. b];
    }

    public static byte[] PvhNote(uint entry) => Note("Xen", 18, U32(entry));
    public static byte[] PvhNote64(ulong entry) => Note("Xen", 18, U64(entry));

    public static ElfBuilder WithPvh(bool is64 = true, uint entry = 0x100040, bool eightByteDesc = false)
    {
        var b = new ElfBuilder { Is64 = is64, Machine = is64 ? (ushort)62 : (ushort)3 };
        b.Load(0x100000, Pattern(0x300, 1), 0x1000);
        b.Load(0x200000, Pattern(0x80, 2), 0x2000);
        b.NoteSegment(eightByteDesc ? PvhNote64(entry) : PvhNote(entry));
        return b;
    }

    public static byte[] Pattern(int length, int seed) =>
        Enumerable.Range(0, length).Select(i => (byte)(i * 13 + seed * 71 + 5)).ToArray();

    /// <summary>Where the contents of segment <paramref name="i"/> land in the built file.</summary>
    public List<int> DataOffsets { get; } = [];

    public byte[] Build()
    {
        var file = new List<byte>(new byte[HeaderSize + Segments.Count * PhEntSize]);
        DataOffsets.Clear();
        foreach (var s in Segments)
        {
            Align(file, 16);
            DataOffsets.Add(file.Count);
            file.AddRange(s.Data);
        }
        var noteSectionOffsets = new List<int>();
        foreach (var n in NoteSections)
        {
            Align(file, 4);
            noteSectionOffsets.Add(file.Count);
            file.AddRange(n);
        }
        int shoff = 0, shnum = 0;
        if (NoteSections.Count > 0)
        {
            Align(file, 8);
            shoff = file.Count;
            shnum = NoteSections.Count + 2;
            file.AddRange(new byte[ShEntSize]); // SHT_NULL
            // An unrelated PROGBITS section first, so the note search has to skip one.
            file.AddRange(SectionHeader(ShtProgbits, (ulong)DataOffsets.FirstOrDefault(), 16));
            for (int i = 0; i < NoteSections.Count; i++)
                file.AddRange(SectionHeader(ShtNote, (ulong)noteSectionOffsets[i], (ulong)NoteSections[i].Length));
        }

        var bytes = file.ToArray();
        var h = bytes.AsSpan();
        h[0] = 0x7f; h[1] = (byte)'E'; h[2] = (byte)'L'; h[3] = (byte)'F';
        h[4] = Is64 ? (byte)2 : (byte)1;
        h[5] = 1; // little-endian
        h[6] = 1; // EV_CURRENT
        W16(h, 16, Type);
        W16(h, 18, Machine);
        W32(h, 20, 1);
        if (Is64)
        {
            W64(h, 24, Entry);
            W64(h, 32, (ulong)HeaderSize);
            W64(h, 40, (ulong)shoff);
            W16(h, 52, (ushort)HeaderSize);
        }
        else
        {
            W32(h, 24, (uint)Entry);
            W32(h, 28, (uint)HeaderSize);
            W32(h, 32, (uint)shoff);
            W16(h, 40, (ushort)HeaderSize);
        }
        W16(h, PhEntSizeField, (ushort)PhEntSize);
        W16(h, PhNumField, (ushort)Segments.Count);
        W16(h, ShEntSizeField, (ushort)ShEntSize);
        W16(h, ShNumField, (ushort)shnum);

        for (int i = 0; i < Segments.Count; i++)
        {
            var s = Segments[i];
            int o = Ph(i);
            W32(h, o, s.Type);
            if (Is64)
            {
                W32(h, o + 4, 5); // R+X
                W64(h, o + 8, (ulong)DataOffsets[i]);
                W64(h, o + 16, s.PhysicalAddress);
                W64(h, o + 24, s.PhysicalAddress);
                W64(h, o + 32, (ulong)s.Data.Length);
                W64(h, o + 40, s.MemorySize);
                W64(h, o + 48, 4);
            }
            else
            {
                W32(h, o + 4, (uint)DataOffsets[i]);
                W32(h, o + 8, (uint)s.PhysicalAddress);
                W32(h, o + 12, (uint)s.PhysicalAddress);
                W32(h, o + 16, (uint)s.Data.Length);
                W32(h, o + 20, (uint)s.MemorySize);
                W32(h, o + 24, 5);
                W32(h, o + 28, 4);
            }
        }
        return bytes;
    }

    private byte[] SectionHeader(uint type, ulong offset, ulong size)
    {
        var b = new byte[ShEntSize];
        W32(b, 4, type);
        if (Is64)
        {
            W64(b, 24, offset);
            W64(b, 32, size);
            W64(b, 48, 4);
        }
        else
        {
            W32(b, 16, (uint)offset);
            W32(b, 20, (uint)size);
            W32(b, 32, 4);
        }
        return b;
    }

    private static void Align(List<byte> b, int a)
    {
        while (b.Count % a != 0)
            b.Add(0);
    }

    private static void Pad4(List<byte> b) => Align(b, 4);

    public static byte[] U32(int v) => U32((uint)v);

    public static byte[] U32(uint v)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, v);
        return b;
    }

    public static byte[] U64(ulong v)
    {
        var b = new byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(b, v);
        return b;
    }

    public static void W16(Span<byte> b, int o, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(b[o..], v);
    public static void W32(Span<byte> b, int o, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b[o..], v);
    public static void W64(Span<byte> b, int o, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(b[o..], v);

    /// <summary>Writes a program header field of the width the class uses.</summary>
    public void WriteWord(Span<byte> b, int o, ulong v)
    {
        if (Is64)
            W64(b, o, v);
        else
            W32(b, o, checked((uint)v));
    }
}
