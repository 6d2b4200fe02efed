using System.Buffers.Binary;

namespace Kvm.Vmm.Boot;

/// <summary>
/// A Linux x86 bzImage, read through its setup header (Documentation/arch/x86/boot.rst). Only what
/// the 64-bit boot protocol needs is accepted: boot protocol 2.06 or later, a kernel that loads
/// high (LOADED_HIGH), and the 64-bit entry at load address + 0x200 (XLF_KERNEL_64, which
/// xloadflags, protocol 2.12, announces). The real-mode setup code is never run.
/// </summary>
/// <remarks>
/// The setup header starts at 0x1F1 in the file and sits at the same offset in struct boot_params
/// (the zero page); it ends at 0x202 + the byte at 0x201 (the jump instruction's displacement).
/// The file is the setup code, (setup_sects + 1) * 512 bytes (setup_sects 0 means 4), followed
/// by the protected-mode kernel (syssize * 16 bytes; a signed kernel may carry more bytes after it).
/// </remarks>
public sealed class BzImage
{
    // Setup header fields: offsets in the file and in struct boot_params alike.
    public const int SetupSectsOffset = 0x1f1;
    public const int SyssizeOffset = 0x1f4;
    public const int BootFlagOffset = 0x1fe;
    public const int JumpOffset = 0x200;
    public const int HeaderMagicOffset = 0x202;
    public const int VersionOffset = 0x206;
    public const int TypeOfLoaderOffset = 0x210;
    public const int LoadFlagsOffset = 0x211;
    public const int Code32StartOffset = 0x214;
    public const int RamdiskImageOffset = 0x218;
    public const int RamdiskSizeOffset = 0x21c;
    public const int HeapEndPtrOffset = 0x224;
    public const int CmdLinePtrOffset = 0x228;
    public const int InitrdAddrMaxOffset = 0x22c;
    public const int KernelAlignmentOffset = 0x230;
    public const int RelocatableKernelOffset = 0x234;
    public const int MinAlignmentOffset = 0x235;
    public const int XLoadFlagsOffset = 0x236;
    public const int CmdlineSizeOffset = 0x238;
    public const int PrefAddressOffset = 0x258;
    public const int InitSizeOffset = 0x260;

    /// <summary>The header must reach at least this far: init_size (0x260, 4 bytes) is the last field read.</summary>
    public const int MinHeaderEnd = InitSizeOffset + 4;

    public const ushort BootFlagValue = 0xaa55;
    /// <summary>"HdrS" read as a little-endian u32.</summary>
    public const uint HeaderMagicValue = 0x5372_6448;
    public const ushort MinProtocol = 0x0206;
    /// <summary>The protocol that introduced xloadflags (and so XLF_KERNEL_64).</summary>
    public const ushort XLoadFlagsProtocol = 0x020c;

    // loadflags
    public const byte LoadedHigh = 1 << 0;
    public const byte KaslrFlag = 1 << 1;
    public const byte QuietFlag = 1 << 5;
    public const byte KeepSegments = 1 << 6;
    public const byte CanUseHeap = 1 << 7;

    // xloadflags
    public const ushort XlfKernel64 = 1 << 0;
    public const ushort XlfCanBeLoadedAbove4G = 1 << 1;

    /// <summary>The 64-bit entry point, relative to the load address of the protected-mode kernel.</summary>
    public const ulong Entry64Offset = 0x200;

    /// <summary>The lowest address a protected-mode kernel may be loaded at.</summary>
    public const ulong MinLoadAddress = 0x100000;

    private const ulong PageSize = 4096;
    private const ulong FourGiB = 0x1_0000_0000;

    private readonly byte[] _setupHeader;

    private BzImage(string name, byte[] setupHeader, int kernelOffset, int kernelLength)
    {
        Name = name;
        _setupHeader = setupHeader;
        KernelOffset = kernelOffset;
        KernelLength = kernelLength;
    }

    /// <summary>The file name, for messages.</summary>
    public string Name { get; }

    /// <summary>The boot protocol version, e.g. 0x020f for 2.15.</summary>
    public ushort Protocol => Hdr16(VersionOffset);

    /// <summary>The protocol version as the documentation writes it ("2.15").</summary>
    public string ProtocolText => FormatProtocol(Protocol);

    /// <summary>setup_sects as found in the file (0 stands for 4).</summary>
    public byte SetupSectsField => _setupHeader[0];

    /// <summary>Number of 512-byte setup sectors after the boot sector (0 in the file reads as 4).</summary>
    public int SetupSects => SetupSectsField == 0 ? 4 : SetupSectsField;

    /// <summary>Bytes of the file before the protected-mode kernel.</summary>
    public int SetupSize => (SetupSects + 1) * 512;

    /// <summary>Where the protected-mode kernel starts in the file.</summary>
    public int KernelOffset { get; }

    /// <summary>Bytes of protected-mode kernel to load (syssize * 16).</summary>
    public int KernelLength { get; }

    /// <summary>The syssize field: the protected-mode kernel's size in 16-byte units.</summary>
    public uint Syssize => Hdr32(SyssizeOffset);

    public byte LoadFlags => _setupHeader[LoadFlagsOffset - SetupSectsOffset];
    public ushort XLoadFlags => Hdr16(XLoadFlagsOffset);
    public uint KernelAlignment => Hdr32(KernelAlignmentOffset);
    public bool Relocatable => _setupHeader[RelocatableKernelOffset - SetupSectsOffset] != 0;
    /// <summary>log2 of the minimum alignment a relocatable kernel accepts.</summary>
    public byte MinAlignment => _setupHeader[MinAlignmentOffset - SetupSectsOffset];
    public ulong PrefAddress => Hdr64(PrefAddressOffset);
    /// <summary>Bytes the kernel needs, from its runtime start address, before it reads the memory map.</summary>
    public uint InitSize => Hdr32(InitSizeOffset);
    /// <summary>Longest command line the kernel takes, without the terminating NUL.</summary>
    public uint CmdlineSize => Hdr32(CmdlineSizeOffset);
    /// <summary>Highest address the initrd may occupy (its last byte).</summary>
    public uint InitrdAddrMax => Hdr32(InitrdAddrMaxOffset);

    /// <summary>XLF_CAN_BE_LOADED_ABOVE_4G: noted, but this loader keeps everything below 4 GiB.</summary>
    public bool CanBeLoadedAbove4G => (XLoadFlags & XlfCanBeLoadedAbove4G) != 0;

    /// <summary>Offset of the first byte after the setup header (0x202 + the byte at 0x201).</summary>
    public int HeaderEnd => SetupSectsOffset + _setupHeader.Length;

    /// <summary>The setup header as it is in the file: bytes 0x1F1 up to <see cref="HeaderEnd"/>.</summary>
    public ReadOnlySpan<byte> SetupHeader => _setupHeader;

    /// <summary>
    /// Where the protected-mode kernel is loaded. A relocatable kernel goes at pref_address (never
    /// below 1 MiB) rounded up to kernel_alignment: its decompressor would move itself to at least
    /// pref_address anyway, so loading lower saves nothing. A kernel that is not relocatable must
    /// be loaded at pref_address exactly.
    /// </summary>
    public ulong LoadAddress
    {
        get
        {
            if (!Relocatable)
                return PrefAddress;
            ulong a = Math.Max(PrefAddress, MinLoadAddress);
            ulong align = KernelAlignment;
            return (a + align - 1) & ~(align - 1);
        }
    }

    /// <summary>The memory the kernel occupies from <see cref="LoadAddress"/> until it has read the memory map: max(init_size, kernel length), whole pages.</summary>
    public ulong Footprint => AlignUp(Math.Max(InitSize, (ulong)KernelLength), PageSize);

    /// <summary>One past the last byte of the kernel's footprint.</summary>
    public ulong KernelEnd => LoadAddress + Footprint;

    /// <summary>The 64-bit entry point: load address + 0x200.</summary>
    public ulong EntryPoint => LoadAddress + Entry64Offset;

    /// <summary>The highest address (exclusive) the initrd may end at: initrd_addr_max + 1, and never above 4 GiB.</summary>
    public ulong InitrdLimit => Math.Min((ulong)InitrdAddrMax + 1, FourGiB);

    /// <summary>"2.15" for 0x020f.</summary>
    public static string FormatProtocol(ushort version) => $"{version >> 8}.{version & 0xff:d2}";

    /// <summary>
    /// A cheap probe: true when the file has the boot sector flag 0xAA55 at 0x1FE and the "HdrS"
    /// magic at 0x202, i.e. it should be parsed as a bzImage rather than as an ELF.
    /// </summary>
    public static bool IsBzImage(ReadOnlySpan<byte> file) =>
        file.Length >= VersionOffset
        && BinaryPrimitives.ReadUInt16LittleEndian(file[BootFlagOffset..]) == BootFlagValue
        && BinaryPrimitives.ReadUInt32LittleEndian(file[HeaderMagicOffset..]) == HeaderMagicValue;

    /// <summary>Reads and parses a kernel file.</summary>
    public static BzImage Read(string path) => Parse(ElfImage.ReadFile(path), path);

    /// <summary>Parses and checks a bzImage; <paramref name="name"/> is used in error messages.</summary>
    public static BzImage Parse(ReadOnlySpan<byte> file, string name)
    {
        string k = $"kernel {name}";
        if (file.Length == 0)
            throw new BootException($"{k}: the file is empty");
        if (file.Length >= 4 && file[0] == 0x7f && file[1] == (byte)'E' && file[2] == (byte)'L' && file[3] == (byte)'F')
            throw new BootException($"{k}: is an ELF file, not a bzImage");
        if (file.Length < VersionOffset + 2)
            throw new BootException(
                $"{k}: file is {file.Length} bytes, too short for a bzImage setup header (boot_flag at 0x1fe, \"HdrS\" at 0x202, version at 0x206)");

        ushort bootFlag = BinaryPrimitives.ReadUInt16LittleEndian(file[BootFlagOffset..]);
        if (bootFlag != BootFlagValue)
            throw new BootException($"{k}: not a bzImage: boot_flag at 0x1fe is 0x{bootFlag:x4}, expected 0xaa55");
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(file[HeaderMagicOffset..]);
        if (magic != HeaderMagicValue)
            throw new BootException(
                $"{k}: not a bzImage: header magic at 0x202 is 0x{magic:x8}, expected \"HdrS\" (0x{HeaderMagicValue:x8}); kernels without it predate boot protocol 2.00");

        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(file[VersionOffset..]);
        if (version < MinProtocol)
            throw new BootException(
                $"{k}: boot protocol {FormatProtocol(version)} (version 0x{version:x4} at 0x206) is older than {FormatProtocol(MinProtocol)}, the oldest this VMM loads");

        int headerEnd = HeaderMagicOffset + file[JumpOffset + 1];
        if (file.Length < headerEnd)
            throw new BootException(
                $"{k}: truncated: the setup header ends at 0x{headerEnd:x} (0x202 + the byte at 0x201) but the file is {file.Length} bytes");

        if (version < XLoadFlagsProtocol || headerEnd < XLoadFlagsOffset + 2)
            throw new BootException(
                $"{k}: boot protocol {FormatProtocol(version)} has no 64-bit entry: XLF_KERNEL_64 in xloadflags needs protocol {FormatProtocol(XLoadFlagsProtocol)} or later");
        ushort xloadflags = BinaryPrimitives.ReadUInt16LittleEndian(file[XLoadFlagsOffset..]);
        if ((xloadflags & XlfKernel64) == 0)
            throw new BootException(
                $"{k}: xloadflags 0x{xloadflags:x4} at 0x236 lacks XLF_KERNEL_64: the kernel has no 64-bit entry point at +0x200 (a 32-bit kernel?)");
        if (headerEnd < MinHeaderEnd)
            throw new BootException(
                $"{k}: the setup header ends at 0x{headerEnd:x}, before init_size (0x{InitSizeOffset:x}), which protocol {FormatProtocol(version)} defines");

        byte loadflags = file[LoadFlagsOffset];
        if ((loadflags & LoadedHigh) == 0)
            throw new BootException(
                $"{k}: loadflags 0x{loadflags:x2} at 0x211 lacks LOADED_HIGH: a zImage loaded at 0x10000 is not supported");

        byte sects = file[SetupSectsOffset];
        int setupSize = ((sects == 0 ? 4 : sects) + 1) * 512;
        if (file.Length <= setupSize)
            throw new BootException(
                $"{k}: truncated: file is {file.Length} bytes but the setup code alone takes (setup_sects {sects} + 1) * 512 = {setupSize} bytes; no protected-mode kernel follows");
        uint syssize = BinaryPrimitives.ReadUInt32LittleEndian(file[SyssizeOffset..]);
        ulong kernelLength = (ulong)syssize * 16;
        ulong available = (ulong)(file.Length - setupSize);
        if (syssize == 0)
            throw new BootException($"{k}: syssize at 0x1f4 is 0: the header gives no protected-mode kernel size");
        if (kernelLength > available)
            throw new BootException(
                $"{k}: truncated: syssize 0x{syssize:x} says the protected-mode kernel is {kernelLength} bytes but only {available} follow the setup code");

        uint alignment = BinaryPrimitives.ReadUInt32LittleEndian(file[KernelAlignmentOffset..]);
        bool relocatable = file[RelocatableKernelOffset] != 0;
        ulong pref = BinaryPrimitives.ReadUInt64LittleEndian(file[PrefAddressOffset..]);
        if (relocatable && (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment < PageSize))
            throw new BootException(
                $"{k}: kernel_alignment 0x{alignment:x} at 0x230 is not a power of two of at least 4 KiB");
        if (!relocatable && pref < MinLoadAddress)
            throw new BootException(
                $"{k}: the kernel is not relocatable and its pref_address 0x{pref:x} (at 0x258) is below 1 MiB");
        if (pref >= FourGiB)
            throw new BootException($"{k}: pref_address 0x{pref:x} at 0x258 is above 4 GiB");

        var image = new BzImage(name, file[SetupSectsOffset..headerEnd].ToArray(), setupSize, (int)kernelLength);
        if (image.KernelEnd > FourGiB)
            throw new BootException(
                $"{k}: loaded at 0x{image.LoadAddress:x} with init_size 0x{image.InitSize:x} the kernel would end at 0x{image.KernelEnd:x}, above 4 GiB");
        return image;
    }

    /// <summary>
    /// Checks that the kernel's footprint (<see cref="LoadAddress"/> .. <see cref="KernelEnd"/>) is
    /// RAM in <paramref name="memoryMap"/>; throws a message saying how much memory is needed if not.
    /// </summary>
    public void CheckKernelFits(IReadOnlyList<MemoryMapEntry> memoryMap)
    {
        foreach (var (start, end) in UsableRam(memoryMap))
        {
            if (start <= LoadAddress && KernelEnd <= end)
                return;
        }
        throw new BootException(
            $"kernel {Name}: needs RAM at 0x{LoadAddress:x}-0x{KernelEnd:x} (load address 0x{LoadAddress:x}, init_size 0x{InitSize:x}) " +
            $"and the memory map has none there; the VM needs at least {(KernelEnd + (1UL << 20) - 1) >> 20} MiB");
    }

    /// <summary>
    /// Where an initrd of <paramref name="size"/> bytes goes: as high as possible, page aligned, in
    /// RAM of <paramref name="memoryMap"/> (RAM entries less any other entry overlapping them),
    /// above the kernel's footprint and ending at or below <see cref="InitrdLimit"/>
    /// (initrd_addr_max + 1, never above 4 GiB).
    /// </summary>
    public ulong PlaceInitrd(IReadOnlyList<MemoryMapEntry> memoryMap, ulong size, string initrdName = "initrd")
    {
        if (size == 0)
            throw new BootException($"initrd {initrdName}: is empty");
        ulong limit = InitrdLimit;
        if (HighestFit(memoryMap, KernelEnd, limit, size) is ulong start)
            return start;
        var usable = UsableRam(memoryMap);
        ulong top = usable.Count == 0 ? 0 : Math.Min(usable.Max(u => u.End), limit);
        throw new BootException(
            $"initrd {initrdName}: {size} bytes ({FormatMiB(size)}) do not fit in RAM between the end of kernel {Name} at 0x{KernelEnd:x} " +
            $"and 0x{top:x} (the lower of the end of RAM and initrd_addr_max 0x{InitrdAddrMax:x} + 1); give the VM more memory");
    }

    /// <summary>
    /// The highest page-aligned address at which <paramref name="size"/> bytes fit in RAM of
    /// <paramref name="memoryMap"/> between <paramref name="floor"/> and <paramref name="limit"/>
    /// (exclusive), or null when they do not fit.
    /// </summary>
    public static ulong? HighestFit(IReadOnlyList<MemoryMapEntry> memoryMap, ulong floor, ulong limit, ulong size)
    {
        var usable = UsableRam(memoryMap);
        for (int i = usable.Count - 1; i >= 0; i--)
        {
            ulong lo = Math.Max(usable[i].Start, floor);
            ulong hi = Math.Min(usable[i].End, limit);
            if (hi <= lo || hi - lo < size)
                continue;
            ulong start = (hi - size) & ~(PageSize - 1);
            if (start >= lo)
                return start;
        }
        return null;
    }

    /// <summary>
    /// RAM (type 1) ranges of a memory map, merged, with every range of another type cut out, sorted
    /// by address: (start, exclusive end).
    /// </summary>
    public static IReadOnlyList<(ulong Start, ulong End)> UsableRam(IReadOnlyList<MemoryMapEntry> memoryMap)
    {
        var ram = memoryMap.Where(e => e.Type == MemoryMapEntry.Ram && e.Size > 0)
            .Select(e => (Start: e.Address, End: SaturatingEnd(e)))
            .OrderBy(r => r.Start)
            .ToList();
        var merged = new List<(ulong Start, ulong End)>();
        foreach (var r in ram)
        {
            if (merged.Count > 0 && r.Start <= merged[^1].End)
                merged[^1] = (merged[^1].Start, Math.Max(merged[^1].End, r.End));
            else
                merged.Add(r);
        }
        foreach (var hole in memoryMap.Where(e => e.Type != MemoryMapEntry.Ram && e.Size > 0))
        {
            ulong hs = hole.Address, he = SaturatingEnd(hole);
            var next = new List<(ulong Start, ulong End)>();
            foreach (var (s, e) in merged)
            {
                if (he <= s || hs >= e)
                {
                    next.Add((s, e));
                    continue;
                }
                if (s < hs)
                    next.Add((s, hs));
                if (he < e)
                    next.Add((he, e));
            }
            merged = next;
        }
        return merged;
    }

    /// <summary>Copies the protected-mode kernel to <see cref="LoadAddress"/> and zeroes the rest of its footprint.</summary>
    public void LoadKernel(ReadOnlySpan<byte> file, Kvm.Hypervisor.GuestMemory memory)
    {
        if (file.Length < KernelOffset + KernelLength)
            throw new BootException(
                $"kernel {Name}: the file given to load is {file.Length} bytes; the parsed image needs {KernelOffset + KernelLength}");
        if (Footprint > int.MaxValue || !memory.IsValid(LoadAddress, Footprint))
            throw new BootException(
                $"kernel {Name}: 0x{LoadAddress:x}-0x{KernelEnd:x} (init_size 0x{InitSize:x}) does not fit in guest RAM ({Kvm.Hypervisor.GuestMemory.FormatSize(memory.TotalSize)})");
        var dest = memory.GetWritableSpan(LoadAddress, (int)Footprint);
        file.Slice(KernelOffset, KernelLength).CopyTo(dest);
        dest[KernelLength..].Clear();
    }

    /// <summary>For messages: a short description of the image.</summary>
    public override string ToString() =>
        $"{Name} (bzImage, boot protocol {ProtocolText}, {KernelLength} bytes of kernel at 0x{LoadAddress:x}, init_size 0x{InitSize:x})";

    private static ulong SaturatingEnd(MemoryMapEntry e) => e.Address + e.Size < e.Address ? ulong.MaxValue : e.Address + e.Size;
    private static ulong AlignUp(ulong v, ulong a) => (v + a - 1) & ~(a - 1);
    private static string FormatMiB(ulong bytes) => $"{bytes / (1024.0 * 1024.0):0.#} MiB";

    private ushort Hdr16(int offset) => BinaryPrimitives.ReadUInt16LittleEndian(_setupHeader.AsSpan(offset - SetupSectsOffset));
    private uint Hdr32(int offset) => BinaryPrimitives.ReadUInt32LittleEndian(_setupHeader.AsSpan(offset - SetupSectsOffset));
    private ulong Hdr64(int offset) => BinaryPrimitives.ReadUInt64LittleEndian(_setupHeader.AsSpan(offset - SetupSectsOffset));
}
