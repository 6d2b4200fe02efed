using Kvm.Network;

namespace Kvm.Network.Tests;

public sealed class MacAddressTests
{
    [Theory]
    [InlineData("52:54:00:12:34:56", 0x5254_0012_3456UL)]
    [InlineData("52-54-00-12-34-56", 0x5254_0012_3456UL)]
    [InlineData("ff:ff:ff:ff:ff:ff", 0xffff_ffff_ffffUL)]
    [InlineData("00:00:00:00:00:00", 0UL)]
    [InlineData("0:1:2:a:B:c", 0x0001_020a_0b0cUL)]
    [InlineData("AA:bb:CC:dd:EE:ff", 0xaabb_ccdd_eeffUL)]
    public void ParseReadsSixHexBytes(string text, ulong value)
    {
        var mac = MacAddress.Parse(text);
        Assert.Equal(value, mac.Value);
        Assert.Equal(mac, MacAddress.Parse(mac.ToString()));
    }

    [Theory]
    [InlineData("")]
    [InlineData("52:54:00:12:34")]
    [InlineData("52:54:00:12:34:56:78")]
    [InlineData("52:54:00:12:34:5g")]
    [InlineData("52:54:00:12:34:567")]
    [InlineData("52:54:00:12::56")]
    [InlineData("52:54-00:12:34:56")]
    [InlineData("525400123456")]
    [InlineData(" 52:54:00:12:34:56")]
    [InlineData("52:54:00:12:34:+6")]
    public void ParseRefusesWhatIsNotAnAddressNamingIt(string text)
    {
        var e = Assert.Throws<FormatException>(() => MacAddress.Parse(text));
        Assert.Contains($"'{text}'", e.Message);
    }

    [Fact]
    public void ToStringIsLowerCaseWithColons()
    {
        Assert.Equal("0a:bc:00:01:ff:10", new MacAddress(0x0abc_0001_ff10).ToString());
        Assert.Equal("ff:ff:ff:ff:ff:ff", MacAddress.Broadcast.ToString());
    }

    [Fact]
    public void BytesRoundTripInWireOrder()
    {
        byte[] wire = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
        var mac = MacAddress.FromBytes(wire);
        Assert.Equal(0x5254_00ab_cdefUL, mac.Value);
        Assert.Equal(wire, mac.ToBytes());
        var at = new byte[10];
        mac.CopyTo(at.AsSpan(2));
        Assert.Equal(wire, at[2..8]);
        Assert.Equal(0, at[0] | at[1] | at[8] | at[9]);
        // Only the first six bytes are read.
        Assert.Equal(mac, MacAddress.FromBytes([.. wire, 0x99]));
    }

    [Theory]
    [InlineData("ff:ff:ff:ff:ff:ff", true, true)]
    [InlineData("01:00:5e:00:00:fb", true, false)]
    [InlineData("33:33:00:00:00:01", true, false)]
    [InlineData("52:54:00:12:34:56", false, false)]
    [InlineData("02:00:00:00:00:00", false, false)]
    [InlineData("fe:ff:ff:ff:ff:ff", false, false)]
    public void GroupAndBroadcastBits(string text, bool multicast, bool broadcast)
    {
        var mac = MacAddress.Parse(text);
        Assert.Equal(multicast, mac.IsMulticast);
        Assert.Equal(broadcast, mac.IsBroadcast);
    }

    [Fact]
    public void RandomAddressesAreLocallyAdministeredUnicastAndDiffer()
    {
        var seen = new HashSet<MacAddress>();
        for (int i = 0; i < 1000; i++)
        {
            var mac = MacAddress.Random();
            Assert.False(mac.IsMulticast);
            Assert.Equal(0x02UL, mac.Value >> 40 & 0x02);
            Assert.Equal(0UL, mac.Value >> 48);
            seen.Add(mac);
        }
        Assert.True(seen.Count > 990);
    }

    [Fact]
    public void EqualityIsByValue()
    {
        Assert.Equal(MacAddress.Parse("52:54:00:12:34:56"), MacAddress.Parse("52-54-00-12-34-56"));
        Assert.NotEqual(MacAddress.Parse("52:54:00:12:34:56"), MacAddress.Parse("52:54:00:12:34:57"));
    }
}
