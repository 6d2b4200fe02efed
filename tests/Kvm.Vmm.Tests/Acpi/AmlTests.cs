using Kvm.Vmm.Acpi;

namespace Kvm.Vmm.Tests.Acpi;

public class AmlTests
{
    [Theory]
    [InlineData(0, new byte[] { 0x01 })]
    [InlineData(62, new byte[] { 0x3F })]                // 62 + 1 = 63: the largest one-byte length
    [InlineData(63, new byte[] { 0x41, 0x04 })]          // 63 + 2 = 65 = 0x041
    [InlineData(4093, new byte[] { 0x4F, 0xFF })]        // 4093 + 2 = 0xFFF: the largest two-byte length
    [InlineData(4094, new byte[] { 0x81, 0x00, 0x01 })]  // 4094 + 3 = 0x1001
    [InlineData(1048572, new byte[] { 0x8F, 0xFF, 0xFF })] // 1048572 + 3 = 0xFFFFF: the largest three-byte length
    [InlineData(1048573, new byte[] { 0xC1, 0x00, 0x00, 0x01 })] // 1048573 + 4 = 0x100001: four bytes
    public void Package_length_counts_itself_and_uses_the_fewest_bytes(int content, byte[] expected)
    {
        byte[] encoded = Aml.WithPkgLength(new byte[content]);
        Assert.Equal(expected, encoded[..expected.Length]);
        Assert.Equal(content + expected.Length, encoded.Length);
    }

    [Theory]
    [InlineData("PNP0A03", 0x030AD041u)]
    [InlineData("PNP0A08", 0x080AD041u)]
    [InlineData("PNP0501", 0x0105D041u)]
    [InlineData("PNP0303", 0x0303D041u)]
    [InlineData("PNP0C0F", 0x0F0CD041u)]
    public void Eisa_ids_compress_as_asl_does(string id, uint expected) =>
        Assert.Equal(expected, Aml.EisaIdValue(id));

    [Theory]
    [InlineData("pnp0a03")]
    [InlineData("PNP0A0")]
    [InlineData("PNP0A0G")]
    public void Malformed_eisa_ids_are_refused(string id) =>
        Assert.Throws<ArgumentException>(() => Aml.EisaIdValue(id));

    [Fact]
    public void Name_strings_encode_root_dual_multi_and_padding()
    {
        Assert.Equal("_HID"u8.ToArray(), Aml.NameString("_HID"));
        Assert.Equal("PS2_"u8.ToArray(), Aml.NameString("PS2"));
        Assert.Equal(new byte[] { 0x5C, (byte)'_', (byte)'S', (byte)'B', (byte)'_' }, Aml.NameString("\\_SB"));
        Assert.Equal([0x5C, 0x2E, .. "_SB_PCI0"u8], Aml.NameString("\\_SB.PCI0"));
        Assert.Equal([0x2F, 0x03, .. "_SB_PCI0GSIA"u8], Aml.NameString("_SB.PCI0.GSIA"));
        Assert.Equal([0x5E, .. "GSIA"u8], Aml.NameString("^GSIA"));
        Assert.Equal(new byte[] { 0x5C, 0x00 }, Aml.NameString("\\"));
    }

    [Theory]
    [InlineData("1ABC")]
    [InlineData("ABCDE")]
    [InlineData("ab")]
    [InlineData("\\_SB..X")]
    public void Invalid_names_are_refused(string name) =>
        Assert.Throws<ArgumentException>(() => Aml.NameString(name));

    [Theory]
    [InlineData(0UL, new byte[] { 0x00 })]
    [InlineData(1UL, new byte[] { 0x01 })]
    [InlineData(0x0BUL, new byte[] { 0x0A, 0x0B })]
    [InlineData(0x1234UL, new byte[] { 0x0B, 0x34, 0x12 })]
    [InlineData(0x0001FFFFUL, new byte[] { 0x0C, 0xFF, 0xFF, 0x01, 0x00 })]
    [InlineData(0x1_0000_0000UL, new byte[] { 0x0E, 0, 0, 0, 0, 1, 0, 0, 0 })]
    [InlineData(ulong.MaxValue, new byte[] { 0xFF })]
    public void Integers_use_the_shortest_encoding(ulong value, byte[] expected) =>
        Assert.Equal(expected, Aml.Integer(value));

    [Fact]
    public void Terms_nest_with_their_opcodes_and_lengths()
    {
        // Device (COM1) { Name (_UID, One) }
        Assert.Equal([0x5B, 0x82, 0x0B, .. "COM1"u8, 0x08, .. "_UID"u8, 0x01], Aml.Device("COM1", Aml.Name("_UID", Aml.Integer(1))));
        // Method (_SRS, 1, NotSerialized) {}
        Assert.Equal([0x14, 0x06, .. "_SRS"u8, 0x01], Aml.Method("_SRS", 1));
        // Return (0x0B)
        Assert.Equal(new byte[] { 0xA4, 0x0A, 0x0B }, Aml.Return(Aml.Integer(0x0B)));
        // Package (2) { Zero, One }
        Assert.Equal(new byte[] { 0x12, 0x04, 0x02, 0x00, 0x01 }, Aml.Package(Aml.Integer(0), Aml.Integer(1)));
        // Buffer (2) { 0x79, 0x00 }
        Assert.Equal(new byte[] { 0x11, 0x05, 0x0A, 0x02, 0x79, 0x00 }, Aml.Buffer([0x79, 0x00]));
        // "AB"
        Assert.Equal(new byte[] { 0x0D, 0x41, 0x42, 0x00 }, Aml.String("AB"));
    }

    [Fact]
    public void Resource_descriptors_have_their_spec_layouts()
    {
        Assert.Equal(new byte[] { 0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08 }, AcpiResources.Io(0x3F8, 0x3F8, 1, 8));
        Assert.Equal(new byte[] { 0x22, 0x10, 0x00 }, AcpiResources.IrqNoFlags(4));
        Assert.Equal(new byte[] { 0x88, 0x0D, 0x00, 0x02, 0x0C, 0x00, 0, 0, 0x00, 0x00, 0xFF, 0x00, 0, 0, 0x00, 0x01 },
            AcpiResources.WordBusNumber(0, 0xFF));
        byte[] mem = AcpiResources.DWordMemory(0xC000_0000, 0x2000_0000);
        Assert.Equal(26, mem.Length);
        Assert.Equal(new byte[] { 0x87, 0x17, 0x00, 0x00, 0x0C, 0x01 }, mem[..6]);
        Assert.Equal(new byte[] { 0, 0, 0, 0, 0, 0, 0, 0xC0, 0xFF, 0xFF, 0xFF, 0xDF, 0, 0, 0, 0, 0, 0, 0, 0x20 }, mem[6..]);
        Assert.Equal(new byte[] { 0x89, 0x06, 0x00, 0x09, 0x01, 16, 0, 0, 0 },
            AcpiResources.ExtendedInterrupt(16, level: true, activeHigh: true, shared: true));
    }
}
