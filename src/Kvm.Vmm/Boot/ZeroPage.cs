using System.Buffers.Binary;

namespace Kvm.Vmm.Boot;

/// <summary>
/// struct boot_params, the "zero page" a bzImage's 64-bit entry receives in RSI
/// (Documentation/arch/x86/zero-page.rst). It starts all zero (so the sentinel at 0x1EF is 0 and
/// the kernel trusts every field), gets the kernel's own setup header at 0x1F1, then the fields a
/// boot loader fills: type_of_loader, loadflags, the command line and initrd pointers, the e820
/// map and the ACPI RSDP address.
/// </summary>
public static class ZeroPage
{
    public const int Size = 4096;

    public const int AcpiRsdpAddrOffset = 0x070;   // u64, protocol 2.14+
    public const int ExtRamdiskImageOffset = 0x0c0; // u32: bits 32-63 of ramdisk_image
    public const int ExtRamdiskSizeOffset = 0x0c4;  // u32: bits 32-63 of ramdisk_size
    public const int ExtCmdLinePtrOffset = 0x0c8;   // u32: bits 32-63 of cmd_line_ptr
    public const int E820EntriesOffset = 0x1e8;     // u8
    public const int SentinelOffset = 0x1ef;        // u8, must stay 0
    public const int SetupHeaderOffset = BzImage.SetupSectsOffset;
    public const int E820TableOffset = 0x2d0;       // struct boot_e820_entry[128]
    public const int E820EntrySize = 20;            // u64 addr, u64 size, u32 type (packed)
    public const int E820MaxEntries = 128;

    /// <summary>type_of_loader 0xFF: a boot loader without an assigned id.</summary>
    public const byte LoaderTypeUndefined = 0xff;

    /// <summary>
    /// Builds the zero page for <paramref name="image"/>. <paramref name="initrdAddress"/> and
    /// <paramref name="initrdSize"/> are 0 without an initrd; <paramref name="acpiRsdp"/> is null
    /// when the VMM offers no ACPI tables. The e820 entries are written exactly as given.
    /// </summary>
    public static byte[] Build(
        BzImage image,
        ulong cmdlineAddress,
        ulong initrdAddress,
        ulong initrdSize,
        IReadOnlyList<MemoryMapEntry> e820,
        ulong? acpiRsdp = null)
    {
        if (e820.Count == 0)
            throw new BootException($"kernel {image.Name}: the memory map for the zero page is empty");
        if (e820.Count > E820MaxEntries)
            throw new BootException(
                $"kernel {image.Name}: the memory map has {e820.Count} entries; the zero page holds at most {E820MaxEntries}");

        var page = new byte[Size];
        var p = page.AsSpan();
        image.SetupHeader.CopyTo(p[SetupHeaderOffset..]);

        p[BzImage.TypeOfLoaderOffset] = LoaderTypeUndefined;
        // The real-mode setup code does not run, so it gets no heap; the kernel loads high.
        p[BzImage.LoadFlagsOffset] = (byte)((image.LoadFlags | BzImage.LoadedHigh) & ~BzImage.CanUseHeap);
        BinaryPrimitives.WriteUInt16LittleEndian(p[BzImage.HeapEndPtrOffset..], 0);
        // code32_start is only used by the 32-bit entry; keep it truthful anyway.
        BinaryPrimitives.WriteUInt32LittleEndian(p[BzImage.Code32StartOffset..], (uint)image.LoadAddress);

        BinaryPrimitives.WriteUInt32LittleEndian(p[BzImage.CmdLinePtrOffset..], (uint)cmdlineAddress);
        BinaryPrimitives.WriteUInt32LittleEndian(p[ExtCmdLinePtrOffset..], (uint)(cmdlineAddress >> 32));

        BinaryPrimitives.WriteUInt32LittleEndian(p[BzImage.RamdiskImageOffset..], (uint)initrdAddress);
        BinaryPrimitives.WriteUInt32LittleEndian(p[ExtRamdiskImageOffset..], (uint)(initrdAddress >> 32));
        BinaryPrimitives.WriteUInt32LittleEndian(p[BzImage.RamdiskSizeOffset..], (uint)initrdSize);
        BinaryPrimitives.WriteUInt32LittleEndian(p[ExtRamdiskSizeOffset..], (uint)(initrdSize >> 32));

        p[E820EntriesOffset] = (byte)e820.Count;
        for (int i = 0; i < e820.Count; i++)
        {
            var e = p.Slice(E820TableOffset + i * E820EntrySize, E820EntrySize);
            BinaryPrimitives.WriteUInt64LittleEndian(e, e820[i].Address);
            BinaryPrimitives.WriteUInt64LittleEndian(e[8..], e820[i].Size);
            BinaryPrimitives.WriteUInt32LittleEndian(e[16..], e820[i].Type);
        }

        // Older kernels ignore these bytes (padding before 2.14), so writing it is always safe.
        if (acpiRsdp is { } rsdp)
            BinaryPrimitives.WriteUInt64LittleEndian(p[AcpiRsdpAddrOffset..], rsdp);
        return page;
    }
}
