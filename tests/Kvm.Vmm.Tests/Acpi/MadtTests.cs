using Kvm.Vmm.Acpi;

namespace Kvm.Vmm.Tests.Acpi;

public class MadtTests
{
    private sealed record Entry(byte Type, byte[] Bytes);

    private static (byte[] Madt, List<Entry> Entries) Parse(int cpus, byte ioApicId = 0)
    {
        var set = AcpiTables.Build(new AcpiConfig(cpus) { IoApicId = ioApicId }, 0xE0000);
        byte[] madt = set.Table("APIC").ToArray();
        var entries = new List<Entry>();
        for (int at = 44; at < madt.Length;)
        {
            byte length = madt[at + 1];
            Assert.True(length >= 2 && at + length <= madt.Length, $"entry at {at} has a bad length {length}");
            entries.Add(new Entry(madt[at], madt[at..(at + length)]));
            at += length;
        }
        return (madt, entries);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(8)]
    public void Header_fields_and_one_enabled_local_apic_per_vcpu(int cpus)
    {
        var (madt, entries) = Parse(cpus);
        ReadOnlySpan<byte> m = madt;
        Assert.Equal("APIC", m.Ascii(0, 4));
        Assert.Equal(5, m.U8(8));                                      // revision (ACPI 6.3)
        Assert.Equal(0, m.Sum());
        Assert.Equal(0xFEE0_0000u, m.U32(36));                         // Local Interrupt Controller Address
        Assert.Equal(1u, m.U32(40));                                   // PCAT_COMPAT
        Assert.Equal(44 + 8 * cpus + 12 + 2 * 10 + 6, madt.Length);

        var lapics = entries.Where(e => e.Type == 0).ToList();
        Assert.Equal(cpus, lapics.Count);
        for (int i = 0; i < cpus; i++)
        {
            ReadOnlySpan<byte> e = lapics[i].Bytes;
            Assert.Equal(8, e.Length);
            Assert.Equal(i, e.U8(2));                                  // ACPI Processor UID
            Assert.Equal(i, e.U8(3));                                  // APIC ID
            Assert.Equal(1u, e.U32(4));                                // Enabled
        }
        // The local APIC entries come first: byte-exact at their spec offsets.
        Assert.Equal(new byte[] { 0, 8, 0, 0, 1, 0, 0, 0 }, madt[44..52]);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(8)]
    public void One_io_apic_at_fec00000_with_gsi_base_0(int cpus)
    {
        var (madt, entries) = Parse(cpus);
        var ioapic = Assert.Single(entries, e => e.Type == 1);
        ReadOnlySpan<byte> e = ioapic.Bytes;
        Assert.Equal(12, e.Length);
        Assert.Equal(0, e.U8(2));                                      // I/O APIC ID
        Assert.Equal(0, e.U8(3));
        Assert.Equal(0xFEC0_0000u, e.U32(4));
        Assert.Equal(0u, e.U32(8));
        int at = 44 + 8 * cpus;
        Assert.Equal(new byte[] { 1, 12, 0, 0, 0x00, 0x00, 0xC0, 0xFE, 0, 0, 0, 0 }, madt[at..(at + 12)]);
    }

    [Fact]
    public void Io_apic_id_is_configurable()
    {
        var (_, entries) = Parse(2, ioApicId: 2);
        Assert.Equal(2, entries.Single(e => e.Type == 1).Bytes[2]);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(8)]
    public void Overrides_put_the_pit_on_gsi_2_and_the_sci_level_active_high(int cpus)
    {
        var (madt, entries) = Parse(cpus);
        var overrides = entries.Where(e => e.Type == 2).Select(e => e.Bytes).ToList();
        Assert.Equal(2, overrides.Count);

        ReadOnlySpan<byte> pit = overrides[0];
        Assert.Equal(10, pit.Length);
        Assert.Equal(0, pit.U8(2));                                    // bus ISA
        Assert.Equal(0, pit.U8(3));                                    // IRQ 0
        Assert.Equal(2u, pit.U32(4));                                  // GSI 2
        Assert.Equal(0x0005, pit.U16(8));                              // edge, active high

        ReadOnlySpan<byte> sci = overrides[1];
        Assert.Equal(9, sci.U8(3));
        Assert.Equal(9u, sci.U32(4));
        Assert.Equal(0x000D, sci.U16(8));                              // level, active high

        int at = 44 + 8 * cpus + 12;
        Assert.Equal(new byte[] { 2, 10, 0, 0, 2, 0, 0, 0, 5, 0 }, madt[at..(at + 10)]);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(8)]
    public void Lint1_is_nmi_on_every_processor(int cpus)
    {
        var (madt, entries) = Parse(cpus);
        var nmi = Assert.Single(entries, e => e.Type == 4);
        Assert.Equal(new byte[] { 4, 6, 0xFF, 0, 0, 1 }, nmi.Bytes);
        Assert.Equal(nmi.Bytes, madt[^6..]);
    }

    [Fact]
    public void Every_vcpu_up_to_255_gets_its_own_apic_id()
    {
        var (_, entries) = Parse(AcpiTables.MaxCpus);
        var ids = entries.Where(e => e.Type == 0).Select(e => e.Bytes[3]).ToList();
        Assert.Equal(Enumerable.Range(0, 255).Select(i => (byte)i), ids);
        Assert.DoesNotContain((byte)0xFF, entries.Where(e => e.Type == 0).Select(e => e.Bytes[2]));
    }
}
