namespace Kvm.Vmm.Acpi;

/// <summary>
/// What the ACPI tables describe. The defaults are the VMM's machine: a PCI host bridge with a 32-bit
/// BAR window at 0xC0000000-0xDFFFFFFF, COM1, an i8042, no ECAM.
/// </summary>
/// <param name="Cpus">vCPUs, 1-255: vCPU i gets APIC id i and ACPI processor UID i (xAPIC entries hold 8-bit ids, and 0xFF is the broadcast id).</param>
/// <param name="PciMmioStart">Start of the host bridge's 32-bit memory window for BARs.</param>
/// <param name="PciMmioSize">Its length; the window must end at or below 4 GiB.</param>
public sealed record AcpiConfig(int Cpus, ulong PciMmioStart = 0xC000_0000, ulong PciMmioSize = 0x2000_0000)
{
    /// <summary>
    /// Where PCI ECAM (memory-mapped configuration space) is, or null when the VMM offers only the
    /// 0xCF8/0xCFC ports. When set, the tables hold an MCFG for segment 0, buses 0-255 (256 MiB from
    /// here, 1 MiB aligned), and the DSDT reserves that range in a PNP0C02 motherboard resource device,
    /// which Linux requires before it uses ECAM. The VMM should also mark it reserved in the e820 map.
    /// </summary>
    public ulong? EcamBase { get; init; }

    /// <summary>Whether an i8042 sits at ports 0x60/0x64 (IRQ 1): sets the FADT's "8042" boot flag and adds a PNP0303 device.</summary>
    public bool I8042 { get; init; } = true;

    /// <summary>
    /// The I/O APIC's id in the MADT. Default 0: the value of the ID register of KVM's in-kernel
    /// IOAPIC after reset, which is also what QEMU and Firecracker describe. xAPIC systems deliver
    /// interrupts on the system bus, so the id need not differ from the local APIC ids.
    /// </summary>
    public byte IoApicId { get; init; }

    /// <summary>
    /// Port base of the ACPI PM1a register blocks, or null for none: the PM1a event block
    /// (PM1_STS and PM1_EN, 4 bytes) at this port, the PM1a control block (PM1_CNT, 2 bytes) at
    /// this port + 4. A platform that is not HW-reduced must have both (ACPI 6.x, FADT: "This is a
    /// required field"); Linux's ACPI interpreter writes PM1_EN and reads PM1_CNT.SCI_EN while it
    /// starts. Default 0x600 (where QEMU's q35 puts its PM base). With no SMI command port the
    /// platform is always in ACPI mode, so a device behind these ports needs only to read PM1_CNT
    /// with SCI_EN (bit 0) set; an unclaimed port that reads as all ones does that too.
    /// </summary>
    public ushort? PmIoBase { get; init; } = 0x600;

    /// <summary>
    /// Port base of the GPE0 block (GPE0_STS then GPE0_EN, 2 bytes each: 16 general-purpose
    /// events), or null for none. Default 0x620, past the PM1 blocks. GPE 0 signals a new VM
    /// generation id when <see cref="VmGenIdAddress"/> is set.
    /// </summary>
    public ushort? GpeIoBase { get; init; } = 0x620;

    /// <summary>The length of the GPE0 block (FADT GPE0_BLK_LEN): status and enable, 2 bytes each.</summary>
    public const int GpeBlockLength = 4;

    /// <summary>
    /// Guest-physical address of the 16-byte VM generation id, or null for no VM Generation ID
    /// device. When set (it needs <see cref="GpeIoBase"/>), the DSDT holds \_SB.VGEN (_HID
    /// "KVMC0001", _CID "VM_Gen_Counter", ADDR = Package { low 32 bits, high 32 bits }) and
    /// \_GPE._E00, which notifies it (0x80): the VMM writes a new id there and raises GPE 0 when
    /// the VM becomes a copy of another (a fork), and Linux's vmgenid driver reseeds its random
    /// state. The address must be in memory the e820 map reserves (the OS must not use it).
    /// </summary>
    public ulong? VmGenIdAddress { get; init; }

    /// <summary>The general-purpose event that announces a new VM generation id.</summary>
    public const int VmGenIdGpe = 0;

    /// <summary>The ISA IRQ (= GSI) of the SCI, announced in the FADT and overridden to level, active high in the MADT.</summary>
    public const int SciIrq = 9;

    /// <summary>Guest-physical address of the local APICs.</summary>
    public const uint LocalApicAddress = 0xFEE0_0000;

    /// <summary>Guest-physical address of the I/O APIC.</summary>
    public const uint IoApicAddress = 0xFEC0_0000;

    /// <summary>The first GSI used for PCI INTx: slot s, pin p (0 = INTA) is wired to GSI 16 + (s + p) % 8.</summary>
    public const int PciGsiBase = 16;

    /// <summary>The number of GSIs PCI INTx lines are spread over.</summary>
    public const int PciGsiCount = 8;

    /// <summary>The GSI that PCI device <paramref name="slot"/>'s interrupt pin <paramref name="pin"/> (0 = INTA ... 3 = INTD) is wired to.</summary>
    public static int PciGsi(int slot, int pin) => PciGsiBase + (slot + pin) % PciGsiCount;
}
