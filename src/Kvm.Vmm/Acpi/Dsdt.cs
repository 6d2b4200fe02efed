using static Kvm.Vmm.Acpi.Aml;
using static Kvm.Vmm.Acpi.AcpiResources;

namespace Kvm.Vmm.Acpi;

/// <summary>
/// The DSDT (revision 2: 64-bit integers). In ASL terms:
/// <code>
/// Scope (\_SB) {
///   Device (PCI0) {                         // the PCI host bridge
///     _HID PNP0A08, _CID PNP0A03, _SEG 0, _BBN 0, _UID 0
///     _CRS: WordBusNumber 0-0xFF, IO 0xCF8 len 8, WordIO 0-0xCF7 and 0xD00-0xFFFF,
///           DWordMemory PciMmioStart .. PciMmioStart + PciMmioSize - 1
///     _PRT: slot 0-31, pin INTA-INTD -> \_SB.GSIx, x = (slot + pin) % 8
///   }
///   Device (GSIA) ... Device (GSIH) {      // PCI interrupt links, one per GSI 16-23
///     _HID PNP0C0F, _UID x, _PRS = _CRS = Interrupt (ResourceConsumer, Level, ActiveHigh, Shared) {16 + x},
///     _STA 0x0B, Method (_SRS, 1) {}
///   }
///   Device (COM1) { _HID PNP0501, _UID 1, _CRS: IO 0x3F8 len 8, IRQNoFlags {4} }
///   Device (PS2K) { _HID PNP0303, _CRS: IO 0x60, IO 0x64, IRQNoFlags {1} }      // when I8042
///   Device (MRES) { _HID PNP0C02, _CRS: Memory32Fixed ECAM, 256 MiB }          // when EcamBase
///   Device (VGEN) { _HID "KVMC0001", _CID "VM_Gen_Counter", ADDR Package { lo, hi } } // when VmGenIdAddress
/// }
/// Scope (\_GPE) { Method (_E00) { Notify (\_SB.VGEN, 0x80) } }  // when VmGenIdAddress
/// Name (\_S5, Package (4) { 5, 5, 0, 0 })      // soft off, when there is a PM1 block
/// </code>
/// Why links rather than GSI numbers in the _PRT: a _PRT entry that names a GSI directly
/// (Source = 0) describes a level-triggered, active-LOW, shareable interrupt (ACPI 6.x, 6.2.13).
/// The VMM drives PCI INTx level-triggered active-HIGH, so each GSI is described by an interrupt
/// link device whose resource says exactly that; the link is fixed (one possible setting, _SRS
/// accepts it and changes nothing).
/// </summary>
internal static class Dsdt
{
    public const int PciSlots = 32;

    /// <summary>The SLP_TYP that \_S5 names; the PM device powers off when it is written with SLP_EN.</summary>
    public const int S5SleepType = Kvm.Devices.Legacy.AcpiPm.AcpiPmDevice.SleepTypeS5;

    public static byte[] Build(AcpiConfig config) =>
        AcpiTableBuilders.Sdt("DSDT", 2, w => w.Bytes(Body(config)));

    /// <summary>The AML term list of the DSDT (everything after the header).</summary>
    public static byte[] Body(AcpiConfig config)
    {
        var devices = new List<byte[]> { PciHostBridge(config) };
        for (int i = 0; i < AcpiConfig.PciGsiCount; i++)
            devices.Add(InterruptLink(i));
        devices.Add(Com1());
        if (config.I8042)
            devices.Add(Keyboard());
        if (config.EcamBase is ulong ecam)
            devices.Add(EcamReservation(ecam));
        if (config.VmGenIdAddress is ulong genId)
            devices.Add(VmGenId(genId));
        byte[] body = Scope("\\_SB", [.. devices]);
        if (config.VmGenIdAddress is not null)
            body = [.. body, .. Scope("\\_GPE", Method($"_E{AcpiConfig.VmGenIdGpe:X2}", 0, Notify("\\_SB." + VmGenIdDevice, 0x80)))];
        if (config.PmIoBase is null)
            return body;
        // \_S5: SLP_TYP values for PM1a_CNT and PM1b_CNT, then two reserved bytes.
        byte[] s5 = Name("\\_S5", Package(Integer(S5SleepType), Integer(S5SleepType), Integer(0), Integer(0)));
        return [.. body, .. s5];
    }

    /// <summary>The VM Generation ID device's name in \_SB.</summary>
    public const string VmGenIdDevice = "VGEN";

    /// <summary>The VM Generation ID device's _HID (Linux names the device KVMC0001:00 after it).</summary>
    public const string VmGenIdHid = "KVMC0001";

    /// <summary>
    /// The VM Generation ID device (Microsoft's "Virtual Machine Generation ID" specification):
    /// _CID "VM_Gen_Counter", which Windows matches, and Linux's vmgenid driver too (it matches
    /// "VM_GEN_COUNTER": ACPICA upper-cases _HID and _CID strings); ADDR the id's guest-physical
    /// address as two 32-bit halves. The _HID is a valid ACPI id of our own, <see cref="VmGenIdHid"/>
    /// (iasl refuses "VMGENCTR", which the Linux driver also matches: its last four characters are not hex digits).
    /// </summary>
    private static byte[] VmGenId(ulong address) =>
        Device(VmGenIdDevice,
            Name("_HID", String(VmGenIdHid)),
            Name("_CID", String("VM_Gen_Counter")),
            Name("_DDN", String("VM_Gen_Counter")),
            Name("_STA", Integer(0x0F)),
            Name("ADDR", Package(Integer(address & 0xFFFF_FFFF), Integer(address >> 32))));

    public static string LinkName(int index) => "GSI" + (char)('A' + index);

    private static byte[] PciHostBridge(AcpiConfig config)
    {
        byte[] crs = Template(
            WordBusNumber(0x00, 0xFF),
            Io(0x0CF8, 0x0CF8, 1, 8),
            WordIo(0x0000, 0x0CF7),
            WordIo(0x0D00, 0xFFFF),
            DWordMemory((uint)config.PciMmioStart, (uint)config.PciMmioSize));

        var routes = new List<byte[]>();
        for (int slot = 0; slot < PciSlots; slot++)
        {
            for (int pin = 0; pin < 4; pin++)
            {
                int link = AcpiConfig.PciGsi(slot, pin) - AcpiConfig.PciGsiBase;
                routes.Add(Package(
                    Integer(((ulong)slot << 16) | 0xFFFF),   // Address: device = slot, any function
                    Integer((ulong)pin),                      // Pin: 0 = INTA
                    NameString("\\_SB." + LinkName(link)),    // Source: the link device
                    Integer(0)));                             // Source Index
            }
        }

        return Device("PCI0",
            Name("_HID", EisaId("PNP0A08")),
            Name("_CID", EisaId("PNP0A03")),
            Name("_SEG", Integer(0)),
            Name("_BBN", Integer(0)),
            Name("_UID", Integer(0)),
            Name("_CRS", crs),
            Name("_PRT", Package([.. routes])));
    }

    private static byte[] InterruptLink(int index)
    {
        uint gsi = (uint)(AcpiConfig.PciGsiBase + index);
        byte[] resource = Template(ExtendedInterrupt(gsi, level: true, activeHigh: true, shared: true));
        return Device(LinkName(index),
            Name("_HID", EisaId("PNP0C0F")),
            Name("_UID", Integer((ulong)index)),
            Name("_STA", Integer(0x0B)),              // present, enabled, functioning
            Name("_PRS", resource),
            Name("_CRS", resource),
            Method("_SRS", 1));
    }

    private static byte[] Com1() =>
        Device("COM1",
            Name("_HID", EisaId("PNP0501")),
            Name("_UID", Integer(1)),
            Name("_CRS", Template(Io(0x03F8, 0x03F8, 1, 8), IrqNoFlags(4))));

    private static byte[] Keyboard() =>
        Device("PS2K",
            Name("_HID", EisaId("PNP0303")),
            Name("_UID", Integer(0)),
            Name("_CRS", Template(Io(0x0060, 0x0060, 1, 1), Io(0x0064, 0x0064, 1, 1), IrqNoFlags(1))));

    private static byte[] EcamReservation(ulong ecam) =>
        Device("MRES",
            Name("_HID", EisaId("PNP0C02")),
            Name("_UID", Integer(0)),
            Name("_CRS", Template(Memory32Fixed((uint)ecam, (uint)AcpiTableBuilders.EcamSize))));
}
