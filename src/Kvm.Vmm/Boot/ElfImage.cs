using System.Buffers.Binary;
using System.Text;

namespace Kvm.Vmm.Boot;

/// <summary>A loadable segment of an ELF file, addressed by its physical address.</summary>
public sealed record ElfSegment(int Index, ulong FileOffset, ulong FileSize, ulong PhysicalAddress, ulong MemorySize);

/// <summary>
/// An x86 ELF kernel with a PVH entry point: the ELF note XEN_ELFNOTE_PHYS32_ENTRY (name "Xen",
/// type 18) gives the 32-bit physical address to enter in protected mode. ELF32 and ELF64 are
/// both read. Every offset and size is checked against the file before use.
/// </summary>
public sealed class ElfImage
{
    public const uint XenElfNotePhys32Entry = 18;
    private const ushort EtExec = 2, EtDyn = 3, EmI386 = 3, EmX86_64 = 62;
    private const uint PtLoad = 1, PtNote = 4, ShtNote = 7;

    private ElfImage(string name, bool is64, ulong elfEntry, uint pvhEntry, IReadOnlyList<ElfSegment> segments)
    {
        Name = name;
        Is64 = is64;
        ElfEntry = elfEntry;
        PvhEntry = pvhEntry;
        Segments = segments;
    }

    public string Name { get; }
    public bool Is64 { get; }
    public ulong ElfEntry { get; }

    /// <summary>The 32-bit physical PVH entry point.</summary>
    public uint PvhEntry { get; }

    public IReadOnlyList<ElfSegment> Segments { get; }

    /// <summary>Lowest and one-past-highest physical address the segments occupy.</summary>
    public (ulong Start, ulong End) Extent =>
        (Segments.Min(s => s.PhysicalAddress), Segments.Max(s => s.PhysicalAddress + s.MemorySize));

    /// <summary>Reads and parses a kernel file.</summary>
    public static ElfImage Read(string path) => Parse(ReadFile(path), path);

    /// <summary>Reads a boot file whole; errors name it (as <paramref name="what"/>, "kernel" by default) and say what is wrong.</summary>
    public static byte[] ReadFile(string path, string what = "kernel")
    {
        try
        {
            return File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new BootException($"{what} {path}: no such file");
        }
        catch (UnauthorizedAccessException)
        {
            throw new BootException(Directory.Exists(path) ? $"{what} {path}: is a directory" : $"{what} {path}: permission denied");
        }
        catch (IOException e)
        {
            throw new BootException($"{what} {path}: cannot read: {e.Message}", e);
        }
    }

    /// <summary>Parses and checks an ELF file; <paramref name="name"/> is used in error messages.</summary>
    public static ElfImage Parse(ReadOnlySpan<byte> file, string name)
    {
        if (file.Length < 4 || file[0] != 0x7f || file[1] != (byte)'E' || file[2] != (byte)'L' || file[3] != (byte)'F')
        {
            string start = Convert.ToHexString(file[..Math.Min(4, file.Length)]).ToLowerInvariant();
            throw new BootException(file.Length == 0
                ? $"kernel {name}: the file is empty"
                : $"kernel {name}: not an ELF file (starts with 0x{start}, expected 0x7f454c46)");
        }
        if (file.Length < 52)
            throw new BootException($"kernel {name}: ELF header truncated: file is {file.Length} bytes");
        byte cls = file[4], data = file[5];
        if (cls is not (1 or 2))
            throw new BootException($"kernel {name}: unsupported ELF class {cls} at offset 4 (expected 1 or 2)");
        if (data != 1)
            throw new BootException($"kernel {name}: ELF data encoding {data} at offset 5 is not little-endian");
        bool is64 = cls == 2;
        if (is64 && file.Length < 64)
            throw new BootException($"kernel {name}: ELF64 header truncated: file is {file.Length} bytes, the header 64");

        ushort type = U16(file, 16), machine = U16(file, 18);
        if (type is not (EtExec or EtDyn))
            throw new BootException($"kernel {name}: ELF type {type} at offset 16 is not an executable");
        if (machine is not (EmX86_64 or EmI386))
            throw new BootException($"kernel {name}: ELF machine {machine} at offset 18 is not x86 (3) or x86-64 (62)");

        ulong entry, phoff, shoff;
        int phentsize, phnum, shentsize, shnum;
        if (is64)
        {
            entry = U64(file, 24);
            phoff = U64(file, 32);
            shoff = U64(file, 40);
            phentsize = U16(file, 54);
            phnum = U16(file, 56);
            shentsize = U16(file, 58);
            shnum = U16(file, 60);
        }
        else
        {
            entry = U32(file, 24);
            phoff = U32(file, 28);
            shoff = U32(file, 32);
            phentsize = U16(file, 42);
            phnum = U16(file, 44);
            shentsize = U16(file, 46);
            shnum = U16(file, 48);
        }
        int wantPh = is64 ? 56 : 32;
        if (phnum == 0)
            throw new BootException($"kernel {name}: ELF has no program headers (e_phnum = 0)");
        if (phentsize != wantPh)
            throw new BootException($"kernel {name}: e_phentsize is {phentsize}, expected {wantPh}");
        CheckRange(file, phoff, (ulong)phnum * (ulong)phentsize, name, $"program header table (e_phoff 0x{phoff:x}, {phnum} entries)");

        var segments = new List<ElfSegment>();
        uint? pvh = null;
        for (int i = 0; i < phnum; i++)
        {
            int o = checked((int)(phoff + (ulong)(i * phentsize)));
            uint ptype = U32(file, o);
            ulong offset, paddr, filesz, memsz;
            if (is64)
            {
                offset = U64(file, o + 8);
                paddr = U64(file, o + 24);
                filesz = U64(file, o + 32);
                memsz = U64(file, o + 40);
            }
            else
            {
                offset = U32(file, o + 4);
                paddr = U32(file, o + 12);
                filesz = U32(file, o + 16);
                memsz = U32(file, o + 20);
            }
            if (ptype == PtLoad)
            {
                CheckRange(file, offset, filesz, name, $"segment {i} (p_offset 0x{offset:x}, p_filesz 0x{filesz:x})");
                if (filesz > memsz)
                    throw new BootException($"kernel {name}: segment {i} has p_filesz 0x{filesz:x} larger than p_memsz 0x{memsz:x}");
                if (paddr + memsz < paddr)
                    throw new BootException($"kernel {name}: segment {i} at p_paddr 0x{paddr:x} with p_memsz 0x{memsz:x} wraps around");
                if (memsz > 0)
                    segments.Add(new ElfSegment(i, offset, filesz, paddr, memsz));
            }
            else if (ptype == PtNote)
            {
                CheckRange(file, offset, filesz, name, $"note segment {i} (p_offset 0x{offset:x}, p_filesz 0x{filesz:x})");
                pvh ??= FindPvhNote(file.Slice((int)offset, (int)filesz), name, $"note segment {i}");
            }
        }
        if (pvh is null && shnum > 0 && shentsize == (is64 ? 64 : 40))
            pvh = FindPvhInSections(file, name, is64, shoff, shnum, shentsize);
        if (segments.Count == 0)
            throw new BootException($"kernel {name}: ELF has no loadable (PT_LOAD) segments");
        if (pvh is null)
            throw new BootException(
                $"kernel {name}: ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); this VMM boots ELF kernels through their PVH entry");
        return new ElfImage(name, is64, entry, pvh.Value, segments);
    }

    private static uint? FindPvhInSections(ReadOnlySpan<byte> file, string name, bool is64, ulong shoff, int shnum, int shentsize)
    {
        if (shoff > (ulong)file.Length || (ulong)shnum * (ulong)shentsize > (ulong)file.Length - shoff)
            return null; // section headers are optional for loading; a bad table just means no note there
        for (int i = 0; i < shnum; i++)
        {
            int o = (int)shoff + i * shentsize;
            if (U32(file, o + 4) != ShtNote)
                continue;
            ulong offset = is64 ? U64(file, o + 24) : U32(file, o + 16);
            ulong size = is64 ? U64(file, o + 32) : U32(file, o + 20);
            CheckRange(file, offset, size, name, $"note section {i} (sh_offset 0x{offset:x}, sh_size 0x{size:x})");
            if (FindPvhNote(file.Slice((int)offset, (int)size), name, $"note section {i}") is { } e)
                return e;
        }
        return null;
    }

    /// <summary>Walks the notes of one note area; returns the PVH entry if present.</summary>
    private static uint? FindPvhNote(ReadOnlySpan<byte> notes, string name, string where)
    {
        int pos = 0;
        while (notes.Length - pos >= 12)
        {
            uint namesz = U32(notes, pos), descsz = U32(notes, pos + 4), ntype = U32(notes, pos + 8);
            ulong nameStart = (ulong)pos + 12;
            ulong descStart = nameStart + Align4(namesz);
            ulong next = descStart + Align4(descsz);
            if (next > (ulong)notes.Length)
                throw new BootException(
                    $"kernel {name}: {where}: note at offset {pos} (namesz {namesz}, descsz {descsz}) runs past the end of its area ({notes.Length} bytes)");
            var noteName = notes.Slice((int)nameStart, (int)namesz);
            if (ntype == XenElfNotePhys32Entry && noteName.TrimEnd((byte)0).SequenceEqual("Xen"u8))
            {
                var desc = notes.Slice((int)descStart, (int)descsz);
                ulong value = descsz switch
                {
                    4 => U32(desc, 0),
                    8 => U64(desc, 0),
                    _ => throw new BootException(
                        $"kernel {name}: {where}: PVH entry note has a {descsz}-byte value, expected 4 or 8"),
                };
                if (value > uint.MaxValue)
                    throw new BootException($"kernel {name}: {where}: PVH entry 0x{value:x} is above 4 GiB");
                return (uint)value;
            }
            pos = (int)next;
        }
        return null;
    }

    private static ulong Align4(uint v) => ((ulong)v + 3) & ~3UL;

    private static void CheckRange(ReadOnlySpan<byte> file, ulong offset, ulong size, string name, string what)
    {
        if (offset > (ulong)file.Length || size > (ulong)file.Length - offset)
            throw new BootException($"kernel {name}: {what} extends past the end of the file ({file.Length} bytes)");
    }

    private static ushort U16(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt16LittleEndian(b[o..]);
    private static uint U32(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt32LittleEndian(b[o..]);
    private static ulong U64(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt64LittleEndian(b[o..]);

    /// <summary>For messages: a short description of the image.</summary>
    public override string ToString() =>
        new StringBuilder().Append(Name).Append(Is64 ? " (ELF64" : " (ELF32").Append($", PVH entry 0x{PvhEntry:x}, {Segments.Count} segments)").ToString();
}
