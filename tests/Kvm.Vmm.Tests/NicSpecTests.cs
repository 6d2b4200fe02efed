using Kvm.Network;
using Kvm.Vmm.Machine;

namespace Kvm.Vmm.Tests;

public class NicSpecTests
{
    [Fact]
    public void ATapAloneGetsDefaultsAndARandomLocalMac()
    {
        var n = NicSpec.Parse("tap=kvm0");
        var u = Assert.Single(n.Uplinks);
        Assert.Equal("kvm0", u.Tap);
        Assert.Null(u.Bridge);
        Assert.Equal(1, n.Queues);
        Assert.True(n.Offloads);
        Assert.False(n.AllowSpoofing);
        Assert.Equal(1500, n.Mtu);
        Assert.False(n.Mac.IsMulticast);
        Assert.Equal(0x02UL, n.Mac.Value >> 40 & 0x02);
        Assert.NotEqual(n.Mac, NicSpec.Parse("tap=kvm0").Mac);
    }

    [Fact]
    public void EveryOptionIsRead()
    {
        var n = NicSpec.Parse("tap=kvm1@br0,mac=52:54:00:12:34:56,queues=4,offload=off,spoof=allow,mtu=9000");
        Assert.Equal(("kvm1", "br0"), (n.Uplinks[0].Tap, n.Uplinks[0].Bridge));
        Assert.Equal(MacAddress.Parse("52:54:00:12:34:56"), n.Mac);
        Assert.Equal(4, n.Queues);
        Assert.False(n.Offloads);
        Assert.True(n.AllowSpoofing);
        Assert.Equal(9000, n.Mtu);
        var o = n.ToOptions();
        Assert.Equal((n.Mac, 4, false, true, 9000), (o.Mac, o.QueuePairs, o.Offloads, o.AllowSpoofing, o.Mtu));
    }

    [Fact]
    public void SeveralTapsMakeATeamWithItsPolicyAndLimits()
    {
        var n = NicSpec.Parse("tap=a@br0,tap=b@br1,policy=flow-hash,failback=off,failback-delay=2500,tx-limit=10M,rx-limit=1.5G");
        Assert.Equal([("a", "br0"), ("b", "br1")], n.Uplinks.Select(u => (u.Tap, u.Bridge!)));
        Assert.Equal(TeamPolicy.FlowHash, n.Policy);
        Assert.False(n.Failback);
        Assert.Equal(TimeSpan.FromMilliseconds(2500), n.FailbackDelay);
        Assert.Equal((10_000_000L, 1_500_000_000L), (n.TxLimit!.Value, n.RxLimit!.Value));
        var both = NicSpec.Parse("tap=a,limit=800K");
        Assert.Equal((800_000L, 800_000L), (both.TxLimit!.Value, both.RxLimit!.Value));
        Assert.Equal(TeamPolicy.ActiveBackup, both.Policy);
        Assert.Equal(TeamPolicy.VmPort, NicSpec.Parse("tap=a,tap=b,policy=vm-port").Policy);
        var back = VmSpecJsonContext.Parse(VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [n] }), "team.json").Nics[0];
        Assert.Equal((n.Policy, n.Failback, n.FailbackDelay, n.TxLimit, n.RxLimit), (back.Policy, back.Failback, back.FailbackDelay, back.TxLimit, back.RxLimit));
        Assert.Equal(n.Uplinks, back.Uplinks);
    }

    [Fact]
    public void AHostInterfaceIsAnUplinkAloneOrInATeamAndKeptInJson()
    {
        var n = NicSpec.Parse("dev=eth1,tap=a@br0,queues=2");
        Assert.Equal([("", null, "eth1"), ("a", "br0", null)], n.Uplinks.Select(u => (u.Tap, u.Bridge, u.Interface)));
        Assert.Equal("interface eth1", n.Uplinks[0].ToString());
        var back = VmSpecJsonContext.Parse(VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [n] }), "dev.json").Nics[0];
        Assert.Equal(n.Uplinks, back.Uplinks);
        Assert.Contains("\"interface\": \"eth1\"", VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [n] }));
        var e = Assert.Throws<ArgumentException>(() => VmSpecJsonContext.Parse("""{ "kernel": "k", "nics": [ { "uplinks": [ { "tap": "a", "interface": "eth1" } ] } ] }""", "n.json").Validate());
        Assert.Contains("uplink interface 'eth1' cannot have a tap or a bridge as well", e.Message);
    }

    [Fact]
    public void ABandwidthGroupIsReadWithSharesAndReservationsAndKeptInJson()
    {
        var n = NicSpec.Parse("tap=a,group=uplink0,group-rate=1G,shares=300,reserve=10M,rx-reserve=20M");
        var b = n.Bandwidth!;
        Assert.Equal(("uplink0", 1_000_000_000L, 300, 10_000_000L, 20_000_000L), (b.Group, b.Capacity, b.Shares, b.TxReservation, b.RxReservation));
        Assert.Equal(b, n.ToOptions().Bandwidth);
        var back = VmSpecJsonContext.Parse(VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [n] }), "bw.json").Nics[0];
        Assert.Equal(b, back.Bandwidth);
        Assert.Equal(BandwidthClaim.DefaultShares, NicSpec.Parse("tap=a,group=/run/x/g,group-rate=10M").Bandwidth!.Shares);
        Assert.Null(NicSpec.Parse("tap=a").Bandwidth);
        var e = Assert.Throws<ArgumentException>(() => VmSpecJsonContext.Parse("""{ "kernel": "k", "nics": [ { "uplinks": [ { "tap": "a" } ], "bandwidth": { "group": "g" } } ] }""", "n.json"));
        Assert.Contains("nics[0].bandwidth: the field 'rate' is required", e.Message);
    }

    [Fact]
    public void ArpProbesAreReadAndKeptInJson()
    {
        var n = NicSpec.Parse("tap=a,tap=b,arp-target=10.0.0.1,arp-interval=50,arp-misses=4");
        Assert.Equal((System.Net.IPAddress.Parse("10.0.0.1"), TimeSpan.FromMilliseconds(50), 4), (n.ArpTarget, n.ArpInterval, n.ArpMisses));
        var options = n.ToTeamOptions();
        Assert.Equal((n.ArpTarget, n.ArpInterval, n.ArpMisses), (options.ArpTarget, options.ArpInterval, options.ArpMisses));
        var back = VmSpecJsonContext.Parse(VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [n] }), "arp.json").Nics[0];
        Assert.Equal((n.ArpTarget, n.ArpInterval, n.ArpMisses), (back.ArpTarget, back.ArpInterval, back.ArpMisses));
        // Without a target: no probes, the defaults.
        var plain = NicSpec.Parse("tap=a,tap=b");
        Assert.Null(plain.ArpTarget);
        Assert.Equal((TimeSpan.FromMilliseconds(100), 3), (plain.ArpInterval, plain.ArpMisses));
        Assert.DoesNotContain("arp", VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [plain] }), StringComparison.OrdinalIgnoreCase);
        var e = Assert.Throws<ArgumentException>(() => VmSpecJsonContext.Parse("""{ "kernel": "k", "nics": [ { "uplinks": [ { "tap": "a" } ], "arpTarget": "10.1" } ] }""", "n.json"));
        Assert.Contains("nics[0].arpTarget: '10.1'", e.Message);
    }

    [Fact]
    public void DosDetectionIsReadWithItsThresholdsAndKeptInJson()
    {
        var n = NicSpec.Parse("tap=a,dos=limit,dos-syn=300,dos-udp=off,dos-window=2000,dos-limit=5M");
        var d = n.Dos!;
        Assert.Equal((DosAction.Limit, 300L, (long?)null, TimeSpan.FromSeconds(2), 5_000_000L), (d.Action, d.HalfOpenPerSecond!.Value, d.UdpPerSecond, d.Window, d.LimitTo));
        Assert.Equal(new DosRules().PacketsPerSecond, d.PacketsPerSecond);
        Assert.Equal(DosAction.Suspend, NicSpec.Parse("tap=a,dos=suspend").Dos!.Action);
        Assert.Null(NicSpec.Parse("tap=a,dos=suspend,dos=off").Dos);
        Assert.Null(NicSpec.Parse("tap=a").Dos);
        var back = VmSpecJsonContext.Parse(VmSpecJsonContext.Format(new VmSpec { Kernel = "k", Nics = [n] }), "dos.json").Nics[0].Dos!;
        Assert.Equal(d, back);
        Assert.Contains("dos window 50 ms is outside", Assert.Throws<ArgumentException>(() => NicSpec.Parse("tap=a,dos=suspend,dos-window=50")).Message);
        Assert.Contains("'many'", Assert.Throws<ArgumentException>(() => NicSpec.Parse("tap=a,dos-pps=many")).Message);
    }

    [Theory]
    [InlineData("tap=", "")]
    [InlineData("tap=a,offload", "a")]
    [InlineData("tap=a,offloads=on", "a")]
    [InlineData("tap=a,spoof=drop", "a")]
    public void OtherFormsAreRead(string text, string tap)
    {
        var n = NicSpec.Parse(text);
        Assert.Equal(tap, n.Uplinks[0].Tap);
        Assert.True(n.Offloads);
        Assert.False(n.AllowSpoofing);
    }

    [Theory]
    [InlineData("mac=52:54:00:12:34:56", "no uplink")]
    [InlineData("tap=a,tap=a", "tap 'a' is named twice")]
    [InlineData("tap=a,tap=b,tap=c,tap=d,tap=e,tap=f,tap=g,tap=h,tap=i", "9 uplinks is more than 8")]
    [InlineData("tap=a,tap=b,policy=round-robin", "policy 'round-robin' is not active-backup, flow-hash or vm-port")]
    [InlineData("tap=a,tap=b,failback=maybe", "failback 'maybe' is not on or off")]
    [InlineData("tap=a,tap=b,failback-delay=soon", "failback-delay 'soon' is not a whole number")]
    [InlineData("tap=a,tap=b,arp-target=10.1", "arp-target '10.1' is not an IPv4 address")]
    [InlineData("tap=a,tap=b,arp-target=fe80::1", "arp-target 'fe80::1' is not an IPv4 address")]
    [InlineData("tap=a,tap=b,arp-target=255.255.255.255", "ARP target 255.255.255.255 is not a host's IPv4 address")]
    [InlineData("tap=a,arp-target=10.0.0.1", "an ARP target needs two uplinks or more")]
    [InlineData("tap=a,tap=b,arp-target=10.0.0.1,arp-interval=5", "ARP interval 5 ms is outside 10 ms to 60 s")]
    [InlineData("tap=a,tap=b,arp-target=10.0.0.1,arp-misses=0", "ARP misses 0 is outside 1 to 100")]
    [InlineData("tap=a,tap=b,arp-misses=x", "arp-misses 'x' is not a whole number")]
    [InlineData("tap=a,shares=3", "shares and reservations need a bandwidth group and its rate (group=NAME,group-rate=RATE)")]
    [InlineData("tap=a,group=g", "need a bandwidth group and its rate")]
    [InlineData("tap=a,group=g,group-rate=10M,shares=0", "shares 0 is outside 1 to 100000")]
    [InlineData("tap=a,group=g,group-rate=10M,reserve=20M", "is outside 0 to the group's capacity")]
    [InlineData("tap=a,group=a b,group-rate=10M", "is neither a name")]
    [InlineData("tap=a,group=g,group-rate=fast", "group-rate: 'fast' is not a rate")]
    [InlineData("tap=a,limit=fast", "limit: 'fast' is not a rate")]
    [InlineData("tap=a,tx-limit=0", "tx-limit: '0' is not a rate")]
    [InlineData("tap=a,mac=52:54:00:12:34", "not a MAC address")]
    [InlineData("tap=a,mac=01:00:5e:00:00:01", "multicast")]
    [InlineData("tap=a,mac=00:00:00:00:00:00", "not a usable address")]
    [InlineData("tap=a,queues=0", "queues 0 is out of range")]
    [InlineData("tap=a,queues=17", "queues 17 is out of range")]
    [InlineData("tap=a,queues=-1", "queues '-1' is not a whole number")]
    [InlineData("tap=a,mtu=67", "mtu 67 is out of range")]
    [InlineData("tap=a,mtu=65518", "mtu 65518 is out of range")]
    [InlineData("tap=a,offload=maybe", "offload 'maybe' is not on or off")]
    [InlineData("tap=a,spoof=yes", "unknown option 'spoof=yes'")]
    [InlineData("tap=a,vhost=on", "unknown option 'vhost=on'")]
    [InlineData("tap=a,queues", "unknown option 'queues'")]
    [InlineData("tap=abcdefghijklmnop", "not an interface name")]
    [InlineData("tap=a/b", "not an interface name")]
    [InlineData("tap=a@", "bridge name ''")]
    [InlineData("tap=a@b r", "not an interface name")]
    [InlineData("dev=eth1,dev=eth1", "interface 'eth1' is named twice")]
    [InlineData("dev=abcdefghijklmnop", "'abcdefghijklmnop' is not an interface name")]
    [InlineData("dev=", "'' is not an interface name")]
    [InlineData("dev=a/b", "not an interface name")]
    public void BadTextIsRefusedNamingTheProblem(string text, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => NicSpec.Parse(text));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void VmSpecRefusesTwoNicsWithOneMac()
    {
        var mac = MacAddress.Parse("52:54:00:00:00:01");
        var nic = new NicSpec { Mac = mac, Uplinks = [new UplinkSpec { Tap = "a" }] };
        var e = Assert.Throws<ArgumentException>(new VmSpec { Kernel = "k", Nics = [nic, nic with { Uplinks = [new UplinkSpec { Tap = "b" }] }] }.Validate);
        Assert.Contains("52:54:00:00:00:01", e.Message);
    }

    [Fact]
    public void DisksAndNicsShareThePciSlots()
    {
        var disks = Enumerable.Range(0, VmSpec.MaxDisks).Select(i => new DiskSpec { Path = $"d{i}" }).ToArray();
        var nic = new NicSpec { Uplinks = [new UplinkSpec { Tap = "a" }] };
        var e = Assert.Throws<ArgumentException>(new VmSpec { Kernel = "k", Disks = disks, Nics = [nic] }.Validate);
        Assert.Contains("1 NICs", e.Message);
    }

    [Fact]
    public void JsonRoundTripKeepsEveryNic()
    {
        var spec = new VmSpec
        {
            Kernel = "k",
            Nics =
            [
                new NicSpec { Mac = MacAddress.Parse("52:54:00:00:00:01"), Uplinks = [new UplinkSpec { Tap = "kvm0" }] },
                new NicSpec
                {
                    Mac = MacAddress.Parse("52:54:00:00:00:02"), Queues = 2, Offloads = false, AllowSpoofing = true, Mtu = 9000,
                    Uplinks = [new UplinkSpec { Tap = "", Bridge = "br0" }],
                },
            ],
        };
        string json = VmSpecJsonContext.Format(spec);
        var back = VmSpecJsonContext.Parse(json, "nics.json");
        Assert.Equal(spec.Nics.Count, back.Nics.Count);
        for (int i = 0; i < spec.Nics.Count; i++)
        {
            var (a, b) = (spec.Nics[i], back.Nics[i]);
            Assert.Equal((a.Mac, a.Queues, a.Offloads, a.AllowSpoofing, a.Mtu), (b.Mac, b.Queues, b.Offloads, b.AllowSpoofing, b.Mtu));
            Assert.Equal(a.Uplinks, b.Uplinks);
        }
        Assert.Contains("\"mac\": \"52:54:00:00:00:02\"", json);
        Assert.Contains("\"allowSpoofing\": true", json);
        // A spec without NICs writes none.
        Assert.DoesNotContain("nics", VmSpecJsonContext.Format(new VmSpec { Kernel = "k" }));
    }

    [Fact]
    public void AJsonNicOutOfRangeIsRefusedByValidation()
    {
        var spec = VmSpecJsonContext.Parse("""{ "kernel": "k", "nics": [ { "queues": 99, "uplinks": [ { "tap": "a" } ] } ] }""", "n.json");
        var e = Assert.Throws<ArgumentException>(spec.Validate);
        Assert.Contains("queues 99", e.Message);
    }

    [Fact]
    public void JsonNicWithoutAMacGetsARandomOne()
    {
        var spec = VmSpecJsonContext.Parse("""{ "kernel": "k", "nics": [ { "uplinks": [ { "tap": "kvm0" } ] } ] }""", "n.json");
        var n = Assert.Single(spec.Nics);
        Assert.False(n.Mac.IsMulticast);
        Assert.Equal(1, n.Queues);
        Assert.Equal("kvm0", n.Uplinks[0].Tap);
    }

    [Theory]
    [InlineData("""{ "kernel": "k", "nics": [ { "mac": "52:54:00:00:00:01" } ] }""", "'uplinks'")]
    [InlineData("""{ "kernel": "k", "nics": [ { "mac": "xx", "uplinks": [ { "tap": "a" } ] } ] }""", "nics[0].mac")]
    [InlineData("""{ "kernel": "k", "nics": [ { "uplinks": [ { "tap": "a" } ], "vlan": 3 } ] }""", "vlan")]
    public void BadJsonNicsAreRefusedNamingTheProblem(string json, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => VmSpecJsonContext.Parse(json, "n.json"));
        Assert.Contains(message, e.Message);
    }
}
