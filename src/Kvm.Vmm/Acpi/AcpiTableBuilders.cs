namespace Kvm.Vmm.Acpi;

/// <summary>The fixed-layout tables. Offsets in comments are from the start of the table (ACPI 6.3, chapter 5.2).</summary>
internal static class AcpiTableBuilders
{
    /// <summary>ECAM size for buses 0-255: 4 KiB per function, 8 functions, 32 devices.</summary>
    public const ulong EcamSize = 256UL << 20;

    // FADT Flags (5.2.9, table "Fixed ACPI Description Table Fixed Feature Flags").
    public const uint FlagWbinvd = 1u << 0, FlagProcC1 = 1u << 2, FlagPwrButton = 1u << 4, FlagSlpButton = 1u << 5,
        FlagHwReducedAcpi = 1u << 20;

    // IA-PC Boot Architecture Flags (5.2.9.3).
    public const ushort BootLegacyDevices = 1 << 0, Boot8042 = 1 << 1, BootVgaNotPresent = 1 << 2;

    // MPS INTI flags (5.2.12.5): bits 0-1 polarity (01 active high), bits 2-3 trigger mode (01 edge, 11 level).
    public const ushort IntiEdgeActiveHigh = 0b0101, IntiLevelActiveHigh = 0b1101;

    /// <summary>A system description table: the 36-byte header, then <paramref name="body"/>; length and checksum fixed afterwards.</summary>
    public static byte[] Sdt(string signature, byte revision, Action<TableWriter> body)
    {
        var w = new TableWriter();
        w.Ascii(signature, 4);                       // 0  Signature
        w.U32(0);                                    // 4  Length (patched)
        w.U8(revision);                              // 8  Revision
        w.U8(0);                                     // 9  Checksum (patched)
        w.Ascii(AcpiTables.OemId, 6);                // 10 OEMID
        w.Ascii(AcpiTables.OemTableId, 8);           // 16 OEM Table ID
        w.U32(AcpiTables.OemRevision);               // 24 OEM Revision
        w.Ascii(AcpiTables.CreatorId, 4);            // 28 Creator ID
        w.U32(AcpiTables.CreatorRevision);           // 32 Creator Revision
        body(w);
        w.PatchU32(4, (uint)w.Length);
        w.PatchU8(9, TableWriter.Checksum(w.Written(0, w.Length)));
        return w.ToArray();
    }

    /// <summary>RSDP revision 2 (5.2.5.3): checksum over the first 20 bytes, extended checksum over all 36.</summary>
    public static byte[] Rsdp(ulong xsdtAddress)
    {
        var w = new TableWriter();
        w.Ascii("RSD PTR ", 8);                      // 0  Signature
        w.U8(0);                                     // 8  Checksum (first 20 bytes)
        w.Ascii(AcpiTables.OemId, 6);                // 9  OEMID
        w.U8(2);                                     // 15 Revision: 2 = ACPI 2.0 and later
        w.U32(0);                                    // 16 RsdtAddress: no RSDT, the XSDT serves ACPI 2.0+ OSes
        w.U32(AcpiTables.RsdpLength);                // 20 Length
        w.U64(xsdtAddress);                          // 24 XsdtAddress
        w.U8(0);                                     // 32 Extended Checksum
        w.Zeros(3);                                  // 33 Reserved
        w.PatchU8(8, TableWriter.Checksum(w.Written(0, 20)));
        w.PatchU8(32, TableWriter.Checksum(w.Written(0, AcpiTables.RsdpLength)));
        return w.ToArray();
    }

    /// <summary>XSDT (5.2.8): the header and one 64-bit address per table.</summary>
    public static byte[] Xsdt(IReadOnlyList<ulong> tables) => Sdt("XSDT", 1, w =>
    {
        foreach (ulong address in tables)
            w.U64(address);
    });

    /// <summary>
    /// FADT revision 6, minor 3 (5.2.9), 276 bytes. Not HW-reduced: the machine has a PIT, PICs, an
    /// RTC and ISA devices, and Linux treats a HW-reduced platform as having none of them.
    /// </summary>
    public static byte[] Fadt(AcpiConfig config, ulong facsAddress, ulong dsdtAddress) => Sdt("FACP", 6, w =>
    {
        ushort? pm = config.PmIoBase;
        uint pm1aEvt = pm ?? 0, pm1aCnt = pm is ushort b ? (uint)(b + 4) : 0;
        byte pm1EvtLen = (byte)(pm is null ? 0 : 4), pm1CntLen = (byte)(pm is null ? 0 : 2);
        uint gpe0 = config.GpeIoBase ?? 0;
        byte gpe0Len = (byte)(config.GpeIoBase is null ? 0 : AcpiConfig.GpeBlockLength);
        bool facsLow = facsAddress <= uint.MaxValue, dsdtLow = dsdtAddress <= uint.MaxValue;

        w.U32(facsLow ? (uint)facsAddress : 0);      // 36  FIRMWARE_CTRL (X_FIRMWARE_CTRL must then be 0)
        w.U32(dsdtLow ? (uint)dsdtAddress : 0);      // 40  DSDT
        w.U8(0);                                     // 44  Reserved (ACPI 1.0 INT_MODEL)
        w.U8(0);                                     // 45  Preferred_PM_Profile: unspecified
        w.U16(AcpiConfig.SciIrq);                    // 46  SCI_INT
        w.U32(0);                                    // 48  SMI_CMD: 0 = no SMM; the platform is always in ACPI mode
        w.U8(0);                                     // 52  ACPI_ENABLE
        w.U8(0);                                     // 53  ACPI_DISABLE
        w.U8(0);                                     // 54  S4BIOS_REQ
        w.U8(0);                                     // 55  PSTATE_CNT
        w.U32(pm1aEvt);                              // 56  PM1a_EVT_BLK
        w.U32(0);                                    // 60  PM1b_EVT_BLK
        w.U32(pm1aCnt);                              // 64  PM1a_CNT_BLK
        w.U32(0);                                    // 68  PM1b_CNT_BLK
        w.U32(0);                                    // 72  PM2_CNT_BLK
        w.U32(0);                                    // 76  PM_TMR_BLK: optional, no PM timer
        w.U32(gpe0);                                 // 80  GPE0_BLK
        w.U32(0);                                    // 84  GPE1_BLK
        w.U8(pm1EvtLen);                             // 88  PM1_EVT_LEN
        w.U8(pm1CntLen);                             // 89  PM1_CNT_LEN
        w.U8(0);                                     // 90  PM2_CNT_LEN
        w.U8(0);                                     // 91  PM_TMR_LEN
        w.U8(gpe0Len);                               // 92  GPE0_BLK_LEN
        w.U8(0);                                     // 93  GPE1_BLK_LEN
        w.U8(0);                                     // 94  GPE1_BASE
        w.U8(0);                                     // 95  CST_CNT
        w.U16(0x0FFF);                               // 96  P_LVL2_LAT: > 100, no C2
        w.U16(0x0FFF);                               // 98  P_LVL3_LAT: > 1000, no C3
        w.U16(0);                                    // 100 FLUSH_SIZE
        w.U16(0);                                    // 102 FLUSH_STRIDE
        w.U8(0);                                     // 104 DUTY_OFFSET
        w.U8(0);                                     // 105 DUTY_WIDTH
        w.U8(0);                                     // 106 DAY_ALRM
        w.U8(0);                                     // 107 MON_ALRM
        w.U8(0);                                     // 108 CENTURY: no century register in CMOS
        w.U16(BootArch(config));                     // 109 IAPC_BOOT_ARCH
        w.U8(0);                                     // 111 Reserved
        w.U32(FlagWbinvd | FlagProcC1 | FlagPwrButton | FlagSlpButton); // 112 Flags
        w.Zeros(12);                                 // 116 RESET_REG: none (RESET_REG_SUP clear)
        w.U8(0);                                     // 128 RESET_VALUE
        w.U16(0);                                    // 129 ARM_BOOT_ARCH
        w.U8(3);                                     // 131 FADT Minor Version: 6.3
        w.U64(facsLow ? 0 : facsAddress);            // 132 X_FIRMWARE_CTRL
        w.U64(dsdtAddress);                          // 140 X_DSDT
        Gas(w, pm1aEvt, pm1EvtLen);                  // 148 X_PM1a_EVT_BLK
        Gas(w, 0, 0);                                // 160 X_PM1b_EVT_BLK
        Gas(w, pm1aCnt, pm1CntLen);                  // 172 X_PM1a_CNT_BLK
        Gas(w, 0, 0);                                // 184 X_PM1b_CNT_BLK
        Gas(w, 0, 0);                                // 196 X_PM2_CNT_BLK
        Gas(w, 0, 0);                                // 208 X_PM_TMR_BLK
        Gas(w, gpe0, gpe0Len);                       // 220 X_GPE0_BLK
        Gas(w, 0, 0);                                // 232 X_GPE1_BLK
        Gas(w, 0, 0);                                // 244 SLEEP_CONTROL_REG (HW-reduced only)
        Gas(w, 0, 0);                                // 256 SLEEP_STATUS_REG (HW-reduced only)
        w.U64(0);                                    // 268 Hypervisor Vendor Identity
        if (w.Length != AcpiTables.FadtLength)
            throw new InvalidOperationException($"FADT is {w.Length} bytes, expected {AcpiTables.FadtLength}");
    });

    public static ushort BootArch(AcpiConfig config) =>
        (ushort)(BootLegacyDevices | BootVgaNotPresent | (config.I8042 ? Boot8042 : 0));

    /// <summary>FACS (5.2.10): 64 bytes, no checksum, version 2; the OS must find it 64-byte aligned.</summary>
    public static byte[] Facs()
    {
        var w = new TableWriter();
        w.Ascii("FACS", 4);                          // 0  Signature
        w.U32(AcpiTables.FacsLength);                // 4  Length
        w.U32(0);                                    // 8  Hardware Signature
        w.U32(0);                                    // 12 Firmware Waking Vector
        w.U32(0);                                    // 16 Global Lock
        w.U32(0);                                    // 20 Flags: no S4BIOS, no 64-bit wake
        w.U64(0);                                    // 24 X_Firmware_Waking_Vector
        w.U8(2);                                     // 32 Version
        w.Zeros(3);                                  // 33 Reserved
        w.U32(0);                                    // 36 OSPM Flags
        w.Zeros(24);                                 // 40 Reserved
        return w.ToArray();
    }

    /// <summary>
    /// MADT revision 5 (5.2.12): local APIC address, PCAT_COMPAT (8259s present), one Processor Local
    /// APIC per vCPU (UID = APIC id = index, enabled), the I/O APIC (GSI base 0), the ISA overrides
    /// IRQ0 -> GSI 2 (the PIT, edge, active high) and IRQ9 -> GSI 9 (the SCI, level, active high), and
    /// LINT1 as NMI on every processor.
    /// </summary>
    public static byte[] Madt(AcpiConfig config) => Sdt("APIC", 5, w =>
    {
        w.U32(AcpiConfig.LocalApicAddress);          // 36 Local Interrupt Controller Address
        w.U32(1);                                    // 40 Flags: PCAT_COMPAT
        for (int cpu = 0; cpu < config.Cpus; cpu++)
        {
            w.U8(0);                                 // Type: Processor Local APIC
            w.U8(8);                                 // Length
            w.U8((byte)cpu);                         // ACPI Processor UID
            w.U8((byte)cpu);                         // APIC ID
            w.U32(1);                                // Flags: Enabled
        }
        w.U8(1);                                     // Type: I/O APIC
        w.U8(12);                                    // Length
        w.U8(config.IoApicId);                       // I/O APIC ID
        w.U8(0);                                     // Reserved
        w.U32(AcpiConfig.IoApicAddress);             // I/O APIC Address
        w.U32(0);                                    // Global System Interrupt Base
        InterruptSourceOverride(w, irq: 0, gsi: 2, IntiEdgeActiveHigh);
        InterruptSourceOverride(w, irq: AcpiConfig.SciIrq, gsi: AcpiConfig.SciIrq, IntiLevelActiveHigh);
        w.U8(4);                                     // Type: Local APIC NMI
        w.U8(6);                                     // Length
        w.U8(0xFF);                                  // ACPI Processor UID: all processors
        w.U16(0);                                    // Flags: conforms to the bus (NMI)
        w.U8(1);                                     // Local APIC LINT#
    });

    /// <summary>MCFG revision 1 (PCI Firmware Specification 3.x, 4.1.2): one allocation for segment 0, buses 0-255.</summary>
    public static byte[] Mcfg(ulong ecamBase) => Sdt("MCFG", 1, w =>
    {
        w.U64(0);                                    // 36 Reserved
        w.U64(ecamBase);                             // 44 Base Address
        w.U16(0);                                    // 52 PCI Segment Group Number
        w.U8(0);                                     // 54 Start Bus Number
        w.U8(0xFF);                                  // 55 End Bus Number
        w.U32(0);                                    // 56 Reserved
    });

    private static void InterruptSourceOverride(TableWriter w, byte irq, uint gsi, ushort flags)
    {
        w.U8(2);                                     // Type: Interrupt Source Override
        w.U8(10);                                    // Length
        w.U8(0);                                     // Bus: ISA
        w.U8(irq);                                   // Source
        w.U32(gsi);                                  // Global System Interrupt
        w.U16(flags);                                // Flags (MPS INTI)
    }

    /// <summary>A Generic Address Structure (5.2.3.2) in system I/O space, or all zeros when <paramref name="length"/> is 0.</summary>
    private static void Gas(TableWriter w, uint port, byte length)
    {
        if (length == 0)
        {
            w.Zeros(12);
            return;
        }
        w.U8(1);                                     // Address Space ID: System I/O
        w.U8((byte)(length * 8));                    // Register Bit Width
        w.U8(0);                                     // Register Bit Offset
        w.U8(2);                                     // Access Size: word (the PM1 registers are 16 bits each)
        w.U64(port);                                 // Address
    }
}
