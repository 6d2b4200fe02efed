namespace Kvm.Vmm.Acpi;

/// <summary>
/// Builds the ACPI tables of a VM (ACPI 6.3): RSDP (revision 2), XSDT, FADT (revision 6.3, full
/// hardware model), FACS, MADT, DSDT and, when ECAM is offered, MCFG.
/// </summary>
/// <remarks>
/// Blob layout from <c>baseAddress</c> (each structure starts on a 16-byte boundary; the FACS on a
/// 64-byte one, as the specification requires):
/// <code>
/// RSDP (36) | XSDT (36 + 8 * n) | FADT "FACP" (276) | FACS (64) | MADT "APIC" | MCFG (60, optional) | DSDT
/// </code>
/// The XSDT lists FACP, APIC and MCFG; the FADT points at the FACS and the DSDT. The RSDP comes
/// first so that, with a base in 0xE0000-0xFFFFF, the legacy scan of that area on 16-byte
/// boundaries finds it as well as the boot protocols' explicit pointer. The blob is at most
/// <see cref="MaxSize"/> bytes (64 KiB): with 255 vCPUs it is about 6 KiB, so it also fits below 1 MiB
/// from 0xE0000.
/// </remarks>
public static class AcpiTables
{
    /// <summary>The largest blob <see cref="Build"/> produces.</summary>
    public const int MaxSize = 64 * 1024;

    /// <summary>The most vCPUs the MADT's xAPIC entries can describe (APIC ids and UIDs 0-254).</summary>
    public const int MaxCpus = 255;

    internal const string OemId = "KVMCS";
    internal const string OemTableId = "KVMCSVMM";
    internal const uint OemRevision = 1;
    internal const string CreatorId = "KVMC";
    internal const uint CreatorRevision = 1;

    internal const int HeaderLength = 36;
    internal const int RsdpLength = 36;
    internal const int FadtLength = 276;
    internal const int FacsLength = 64;

    /// <summary>
    /// Lays the tables for <paramref name="config"/> out at guest-physical <paramref name="baseAddress"/>
    /// (16-byte aligned). Throws <see cref="ArgumentException"/> for a configuration the tables cannot describe.
    /// </summary>
    public static AcpiTableSet Build(AcpiConfig config, ulong baseAddress)
    {
        ArgumentNullException.ThrowIfNull(config);
        Validate(config);
        if (baseAddress % 16 != 0)
            throw new ArgumentException($"ACPI tables must start on a 16-byte boundary (the RSDP's alignment), not at 0x{baseAddress:X}", nameof(baseAddress));
        if (baseAddress > ulong.MaxValue - MaxSize)
            throw new ArgumentException($"ACPI tables at 0x{baseAddress:X} would wrap around the address space", nameof(baseAddress));

        byte[] madt = AcpiTableBuilders.Madt(config);
        byte[]? mcfg = config.EcamBase is ulong ecam ? AcpiTableBuilders.Mcfg(ecam) : null;
        byte[] dsdt = Dsdt.Build(config);
        byte[] facs = AcpiTableBuilders.Facs();
        int xsdtEntries = mcfg is null ? 2 : 3;

        // Offsets.
        int offset = 0;
        int rsdpAt = offset;
        offset = Align(offset + RsdpLength, 16);
        int xsdtAt = offset;
        offset = Align(offset + HeaderLength + 8 * xsdtEntries, 16);
        int fadtAt = offset;
        offset += FadtLength;
        int facsAt = (int)(Align(baseAddress + (ulong)offset, 64) - baseAddress);
        offset = Align(facsAt + FacsLength, 16);
        int madtAt = offset;
        offset = Align(offset + madt.Length, 16);
        int mcfgAt = offset;
        if (mcfg is not null)
            offset = Align(offset + mcfg.Length, 16);
        int dsdtAt = offset;
        int total = dsdtAt + dsdt.Length;
        if (total > MaxSize)
            throw new ArgumentException($"the ACPI tables take {total} bytes, more than the {MaxSize} bytes reserved for them", nameof(config));

        ulong At(int o) => baseAddress + (ulong)o;
        byte[] fadt = AcpiTableBuilders.Fadt(config, facsAddress: At(facsAt), dsdtAddress: At(dsdtAt));
        var xsdtTargets = new List<ulong> { At(fadtAt), At(madtAt) };
        if (mcfg is not null)
            xsdtTargets.Add(At(mcfgAt));
        byte[] xsdt = AcpiTableBuilders.Xsdt(xsdtTargets);
        byte[] rsdp = AcpiTableBuilders.Rsdp(At(xsdtAt));

        var blob = new byte[total];
        var tables = new List<AcpiTableInfo>();
        void Place(string signature, int at, byte[] bytes)
        {
            bytes.CopyTo(blob, at);
            tables.Add(new AcpiTableInfo(signature, At(at), bytes.Length));
        }
        Place("RSDP", rsdpAt, rsdp);
        Place("XSDT", xsdtAt, xsdt);
        Place("FACP", fadtAt, fadt);
        Place("FACS", facsAt, facs);
        Place("APIC", madtAt, madt);
        if (mcfg is not null)
            Place("MCFG", mcfgAt, mcfg);
        Place("DSDT", dsdtAt, dsdt);
        return new AcpiTableSet(baseAddress, blob, At(rsdpAt), tables);
    }

    private static void Validate(AcpiConfig config)
    {
        if (config.Cpus is < 1 or > MaxCpus)
            throw new ArgumentException($"the MADT describes 1 to {MaxCpus} vCPUs with xAPIC entries; {config.Cpus} asked", nameof(config));
        if (config.PciMmioSize == 0 || config.PciMmioStart + config.PciMmioSize > 1UL << 32 || config.PciMmioStart + config.PciMmioSize < config.PciMmioStart)
            throw new ArgumentException($"the PCI memory window 0x{config.PciMmioStart:X} + 0x{config.PciMmioSize:X} must be non-empty and end at or below 4 GiB", nameof(config));
        if (config.EcamBase is ulong ecam && (ecam % (1UL << 20) != 0 || ecam > ulong.MaxValue - AcpiTableBuilders.EcamSize + 1))
            throw new ArgumentException($"the ECAM base 0x{ecam:X} must be 1 MiB aligned and leave room for 256 buses", nameof(config));
        if (config.EcamBase is ulong e && e + AcpiTableBuilders.EcamSize > 1UL << 32)
            throw new ArgumentException($"the ECAM range at 0x{e:X} must lie below 4 GiB (the DSDT reserves it with a 32-bit descriptor)", nameof(config));
        if (config.GpeIoBase is ushort gpe && gpe > 0xFFFF - (AcpiConfig.GpeBlockLength - 1))
            throw new ArgumentException($"the GPE0 block at port 0x{gpe:X} does not fit below port 0x10000", nameof(config));
        if (config.GpeIoBase is ushort g && config.PmIoBase is ushort p && g < p + 6 && p < g + AcpiConfig.GpeBlockLength)
            throw new ArgumentException($"the GPE0 block at port 0x{g:X} overlaps the PM1 blocks at port 0x{p:X}", nameof(config));
        if (config.VmGenIdAddress is ulong id && config.GpeIoBase is null)
            throw new ArgumentException($"the VM generation id (at 0x{id:X}) is announced through GPE {AcpiConfig.VmGenIdGpe}, and there is no GPE0 block", nameof(config));
        if (config.VmGenIdAddress is ulong at && (at % 8 != 0 || at > ulong.MaxValue - 16))
            throw new ArgumentException($"the VM generation id's address 0x{at:X} must be 8-byte aligned", nameof(config));
        if (config.PmIoBase is ushort pm && pm > 0xFFFF - 5)
            throw new ArgumentException($"the PM register blocks at port 0x{pm:X} do not fit below port 0x10000", nameof(config));
    }

    private static int Align(int value, int alignment) => (value + alignment - 1) / alignment * alignment;

    private static ulong Align(ulong value, ulong alignment) => (value + alignment - 1) / alignment * alignment;
}
