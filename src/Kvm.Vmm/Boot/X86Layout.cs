namespace Kvm.Vmm.Boot;

/// <summary>Where the VMM puts things in guest-physical memory on x86.</summary>
public static class X86Layout
{
    /// <summary>The boot GDT the vCPU starts with (null, null, code32 at 0x10, data32 at 0x18, TSS at 0x20).</summary>
    public const ulong BootGdt = 0x500;
    public const ushort BootCodeSelector = 0x10, BootDataSelector = 0x18, BootTssSelector = 0x20;

    /// <summary>struct hvm_start_info.</summary>
    public const ulong PvhStartInfo = 0x6000;
    /// <summary>hvm_modlist_entry array (empty for now).</summary>
    public const ulong PvhModlist = 0x6040;
    /// <summary>hvm_memmap_table_entry array.</summary>
    public const ulong PvhMemmap = 0x7000;
    public const int PvhMemmapMaxEntries = 128;
    /// <summary>The kernel command line, NUL-terminated.</summary>
    public const ulong CmdlineStart = 0x20000;
    public const int CmdlineMaxSize = 4096;
    /// <summary>End of the area the VMM's boot data uses; kernels load above it.</summary>
    public const ulong BootDataEnd = CmdlineStart + CmdlineMaxSize;

    /// <summary>The ACPI tables: in the BIOS area (inside the reserved hole below 1 MiB), 64 KiB at most.</summary>
    public const ulong AcpiTablesStart = 0xe0000;

    /// <summary>
    /// The 16-byte VM generation id (the ACPI VMGENID device's ADDR): right after the ACPI tables'
    /// 64 KiB, in the reserved BIOS area, so the guest never uses it as RAM, yet it is guest RAM to
    /// the VMM and travels with every snapshot and fork.
    /// </summary>
    public const ulong VmGenIdAddress = 0xf0000;

    /// <summary>Start of the EBDA/VGA/BIOS hole, reported as reserved.</summary>
    public const ulong LowRamEnd = 0x9fc00;
    public const ulong HighMemoryStart = 0x100000;

    /// <summary>RAM above this goes above 4 GiB: the 32-bit MMIO window (PCI, LAPIC, IOAPIC) sits in between.</summary>
    public const ulong MmioHoleStart = 0xc000_0000;
    public const ulong FourGiB = 0x1_0000_0000;

    /// <summary>
    /// The window PCI BARs are assigned from: the first 512 MiB of the MMIO hole. The rest of the
    /// hole is left for a PCIe ECAM area (0xe0000000), the IOAPIC (0xfec00000), the LAPIC
    /// (0xfee00000) and the TSS pages KVM needs.
    /// </summary>
    public const ulong PciMmioStart = MmioHoleStart;
    public const ulong PciMmioSize = 0x2000_0000;

    /// <summary>INTx of PCI slot s is wired to IOAPIC pin 16 + s % 8 (level-triggered, shared when slots wrap).</summary>
    public static byte PciIntxGsi(int slot) => (byte)(16 + slot % 8);

    /// <summary>KVM_SET_TSS_ADDR (three pages) and KVM_SET_IDENTITY_MAP_ADDR (one page), as QEMU places them.</summary>
    public const ulong TssAddress = 0xfffb_d000;
    public const ulong IdentityMapAddress = 0xfffb_c000;

    /// <summary>Splits a RAM size into guest-physical ranges around the MMIO hole.</summary>
    public static IReadOnlyList<(ulong GuestAddress, ulong Size)> RamRanges(ulong size)
    {
        if (size <= MmioHoleStart)
            return [(0, size)];
        return [(0, MmioHoleStart), (FourGiB, size - MmioHoleStart)];
    }
}
