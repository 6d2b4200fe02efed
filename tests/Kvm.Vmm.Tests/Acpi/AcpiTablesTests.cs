using Kvm.Vmm.Acpi;

namespace Kvm.Vmm.Tests.Acpi;

public class AcpiTablesTests
{
    private const ulong Base = 0xE0000;

    private static AcpiTableSet Build(int cpus = 2, ulong? ecam = null, ulong baseAddress = Base) =>
        AcpiTables.Build(new AcpiConfig(cpus) { EcamBase = ecam }, baseAddress);

    public static TheoryData<int, bool> Configs() => new() { { 1, false }, { 2, false }, { 2, true }, { 8, true }, { 255, true } };

    [Theory]
    [MemberData(nameof(Configs))]
    public void Every_table_sums_to_zero_and_its_length_field_is_its_length(int cpus, bool ecam)
    {
        var set = Build(cpus, ecam ? 0xE000_0000 : null);
        foreach (var t in set.Tables.Where(t => t.Signature is not ("RSDP" or "FACS")))
        {
            var bytes = set.Table(t.Signature);
            Assert.Equal(t.Signature, bytes.Ascii(0, 4));
            Assert.Equal((uint)t.Length, bytes.U32(4));
            Assert.True(bytes.Sum() == 0, $"{t.Signature} sums to {bytes.Sum()}");
            Assert.Equal("KVMCS ", bytes.Ascii(10, 6));
        }
    }

    [Fact]
    public void Rsdp_is_revision_2_with_both_checksums_and_points_at_the_xsdt()
    {
        var set = Build();
        var rsdp = set.Table("RSDP");
        Assert.Equal(36, rsdp.Length);
        Assert.Equal("RSD PTR ", rsdp.Ascii(0, 8));
        Assert.Equal(0, rsdp[..20].Sum());
        Assert.Equal(0, rsdp.Sum());
        Assert.Equal(2, rsdp.U8(15));
        Assert.Equal(0u, rsdp.U32(16));
        Assert.Equal(36u, rsdp.U32(20));
        Assert.Equal(set.Find("XSDT")!.Address, rsdp.U64(24));
        Assert.Equal(set.RsdpAddress, set.Find("RSDP")!.Address);
    }

    [Fact]
    public void Rsdp_is_16_byte_aligned_inside_the_legacy_scan_area_and_the_blob_fits()
    {
        var set = Build(cpus: AcpiTables.MaxCpus, ecam: 0xE000_0000);
        Assert.Equal(0UL, set.RsdpAddress % 16);
        Assert.InRange(set.RsdpAddress, 0xE0000UL, 0xFFFFFUL - 36 + 1);
        Assert.InRange(set.Bytes.Length, 1, AcpiTables.MaxSize);
        Assert.True(Base + (ulong)set.Bytes.Length <= 0x100000, "the tables end below 1 MiB");
        Assert.Equal("RSD PTR ", System.Text.Encoding.ASCII.GetString(set.Bytes, (int)(set.RsdpAddress - Base), 8));
    }

    [Fact]
    public void Tables_do_not_overlap_and_lie_inside_the_blob()
    {
        var set = Build(cpus: 8, ecam: 0xE000_0000);
        ulong end = set.BaseAddress;
        foreach (var t in set.Tables)
        {
            Assert.True(t.Address >= end, $"{t.Signature} at 0x{t.Address:X} overlaps the previous table");
            end = t.Address + (ulong)t.Length;
        }
        Assert.Equal(set.BaseAddress + (ulong)set.Bytes.Length, end);
        Assert.Equal(["RSDP", "XSDT", "FACP", "FACS", "APIC", "MCFG", "DSDT"], set.Tables.Select(t => t.Signature));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Xsdt_lists_exactly_the_fadt_madt_and_mcfg_when_configured(bool ecam)
    {
        var set = Build(ecam: ecam ? 0xE000_0000 : null);
        var xsdt = set.Table("XSDT");
        Assert.Equal(1, xsdt.U8(8));
        int entries = (xsdt.Length - 36) / 8;
        var addresses = new ulong[entries];
        for (int i = 0; i < entries; i++)
            addresses[i] = xsdt.U64(36 + 8 * i);
        var expected = ecam ? new[] { "FACP", "APIC", "MCFG" } : ["FACP", "APIC"];
        Assert.Equal(expected.Select(s => set.Find(s)!.Address), addresses);
        foreach ((string sig, ulong address) in expected.Zip(addresses))
            Assert.Equal(sig, System.Text.Encoding.ASCII.GetString(set.Bytes, (int)(address - set.BaseAddress), 4));
    }

    [Fact]
    public void Fadt_is_revision_6_3_points_at_the_dsdt_and_facs_and_is_not_hw_reduced()
    {
        var set = Build();
        var fadt = set.Table("FACP");
        ulong dsdt = set.Find("DSDT")!.Address, facs = set.Find("FACS")!.Address;
        Assert.Equal(276, fadt.Length);
        Assert.Equal(6, fadt.U8(8));
        Assert.Equal(3, fadt.U8(131));                                  // FADT Minor Version
        Assert.Equal((uint)dsdt, fadt.U32(40));                         // DSDT
        Assert.Equal(dsdt, fadt.U64(140));                              // X_DSDT
        Assert.Equal((uint)facs, fadt.U32(36));                         // FIRMWARE_CTRL
        Assert.Equal(0UL, fadt.U64(132));                               // X_FIRMWARE_CTRL: 0 when FIRMWARE_CTRL is set
        Assert.Equal(9, fadt.U16(46));                                  // SCI_INT
        Assert.Equal(0u, fadt.U32(48));                                 // SMI_CMD: always in ACPI mode
        uint flags = fadt.U32(112);
        Assert.Equal(0u, flags & (1u << 20));                           // HW_REDUCED_ACPI clear
        Assert.NotEqual(0u, flags & 1u);                                // WBINVD
        Assert.Equal(0b110, fadt.U16(109) & 0b110);                     // IA-PC boot: 8042, VGA not present
        Assert.Equal(0, fadt.U16(109) & (1 << 5));                      // CMOS RTC present
    }

    [Fact]
    public void Fadt_pm1a_blocks_are_in_both_the_32_and_64_bit_fields()
    {
        var fadt = Build().Table("FACP");
        Assert.Equal(0x600u, fadt.U32(56));                             // PM1a_EVT_BLK
        Assert.Equal(0x604u, fadt.U32(64));                             // PM1a_CNT_BLK
        Assert.Equal(4, fadt.U8(88));                                   // PM1_EVT_LEN
        Assert.Equal(2, fadt.U8(89));                                   // PM1_CNT_LEN
        Assert.Equal(0u, fadt.U32(76));                                 // PM_TMR_BLK: none
        Assert.Equal(1, fadt.U8(148));                                  // X_PM1a_EVT_BLK: system I/O
        Assert.Equal(32, fadt.U8(149));
        Assert.Equal(0x600UL, fadt.U64(152));
        Assert.Equal(1, fadt.U8(172));                                  // X_PM1a_CNT_BLK
        Assert.Equal(16, fadt.U8(173));
        Assert.Equal(0x604UL, fadt.U64(176));
    }

    [Fact]
    public void Fadt_gpe0_block_is_in_both_the_32_and_64_bit_fields_and_absent_without_one()
    {
        var fadt = Build().Table("FACP");
        Assert.Equal(0x620u, fadt.U32(80));                             // GPE0_BLK
        Assert.Equal(AcpiConfig.GpeBlockLength, fadt.U8(92));           // GPE0_BLK_LEN: status and enable, 2 bytes each
        Assert.Equal(0u, fadt.U32(84));                                 // GPE1_BLK: none
        Assert.Equal(0, fadt.U8(93));
        Assert.Equal(1, fadt.U8(220));                                  // X_GPE0_BLK: system I/O
        Assert.Equal(32, fadt.U8(221));
        Assert.Equal(0x620UL, fadt.U64(224));

        var none = AcpiTables.Build(new AcpiConfig(1) { GpeIoBase = null }, Base).Table("FACP");
        Assert.Equal(0u, none.U32(80));
        Assert.Equal(0, none.U8(92));
        Assert.Equal(0UL, none.U64(224));
        Assert.Equal(0, none.Sum());
    }

    [Fact]
    public void A_vm_generation_id_needs_a_gpe_block_an_aligned_address_and_a_block_clear_of_pm1()
    {
        var noGpe = Assert.Throws<ArgumentException>(() => AcpiTables.Build(new AcpiConfig(1) { GpeIoBase = null, VmGenIdAddress = 0xF0000 }, Base));
        Assert.Contains("no GPE0 block", noGpe.Message);
        var odd = Assert.Throws<ArgumentException>(() => AcpiTables.Build(new AcpiConfig(1) { VmGenIdAddress = 0xF0004 }, Base));
        Assert.Contains("0xF0004", odd.Message);
        var overlap = Assert.Throws<ArgumentException>(() => AcpiTables.Build(new AcpiConfig(1) { GpeIoBase = 0x604 }, Base));
        Assert.Contains("overlaps the PM1 blocks", overlap.Message);
    }

    [Fact]
    public void Fadt_without_pm_blocks_or_i8042_leaves_them_zero()
    {
        var set = AcpiTables.Build(new AcpiConfig(1) { PmIoBase = null, I8042 = false }, Base);
        var fadt = set.Table("FACP");
        Assert.Equal(0u, fadt.U32(56));
        Assert.Equal(0u, fadt.U32(64));
        Assert.Equal(0, fadt.U8(88));
        Assert.Equal(0UL, fadt.U64(152));
        Assert.Equal(0, fadt.U16(109) & 0b10);
        Assert.Equal(0, fadt.Sum());
    }

    [Fact]
    public void Facs_is_64_byte_aligned_with_its_signature_and_length()
    {
        var set = Build(baseAddress: 0x10_0010);
        var info = set.Find("FACS")!;
        Assert.Equal(0UL, info.Address % 64);
        var facs = set.Table("FACS");
        Assert.Equal("FACS", facs.Ascii(0, 4));
        Assert.Equal(64u, facs.U32(4));
        Assert.Equal(2, facs.U8(32));
    }

    [Fact]
    public void Pointers_follow_the_base_address()
    {
        var low = Build(cpus: 2, ecam: 0xE000_0000, baseAddress: 0xE0000);
        var high = Build(cpus: 2, ecam: 0xE000_0000, baseAddress: 0x1_0000_0000);
        var fadt = high.Table("FACP");
        Assert.Equal(high.Find("DSDT")!.Address, fadt.U64(140));
        Assert.Equal(0u, fadt.U32(40));                                 // no 32-bit DSDT pointer above 4 GiB
        Assert.Equal(0u, fadt.U32(36));
        Assert.Equal(high.Find("FACS")!.Address, fadt.U64(132));
        Assert.Equal(high.Find("XSDT")!.Address, high.Table("RSDP").U64(24));
        Assert.Equal(low.Bytes.Length, high.Bytes.Length);
        Assert.Equal(low.Table("DSDT").ToArray(), high.Table("DSDT").ToArray());
    }

    [Fact]
    public void Mcfg_is_present_only_when_ecam_is_offered()
    {
        Assert.Null(Build().Find("MCFG"));
        var mcfg = Build(ecam: 0xE000_0000).Table("MCFG");
        Assert.Equal(60, mcfg.Length);
        Assert.Equal(1, mcfg.U8(8));
        Assert.Equal(0UL, mcfg.U64(36));                                // reserved
        Assert.Equal(0xE000_0000UL, mcfg.U64(44));                      // base address
        Assert.Equal(0, mcfg.U16(52));                                  // segment
        Assert.Equal(0, mcfg.U8(54));                                   // start bus
        Assert.Equal(0xFF, mcfg.U8(55));                                // end bus
    }

    [Theory]
    [InlineData(0)]
    [InlineData(256)]
    public void Cpu_counts_the_madt_cannot_describe_are_refused(int cpus)
    {
        var e = Assert.Throws<ArgumentException>(() => AcpiTables.Build(new AcpiConfig(cpus), Base));
        Assert.Contains("vCPUs", e.Message);
    }

    [Fact]
    public void Bad_addresses_are_refused_with_a_message()
    {
        Assert.Contains("16-byte", Assert.Throws<ArgumentException>(() => AcpiTables.Build(new AcpiConfig(1), 0xE0008)).Message);
        Assert.Contains("4 GiB", Assert.Throws<ArgumentException>(() =>
            AcpiTables.Build(new AcpiConfig(1, 0xF000_0000, 0x2000_0000), Base)).Message);
        Assert.Contains("ECAM", Assert.Throws<ArgumentException>(() =>
            AcpiTables.Build(new AcpiConfig(1) { EcamBase = 0xE000_1000 }, Base)).Message);
    }
}
