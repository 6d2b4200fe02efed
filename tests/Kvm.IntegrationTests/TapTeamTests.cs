using System.Buffers.Binary;
using System.Globalization;
using Kvm.Network;

namespace Kvm.IntegrationTests;

/// <summary>
/// Tap backends and the NIC team on real taps and bridges (as root; no VM): what the team sends
/// is counted by the kernel on the tap it chose (/sys/class/net/TAP/statistics/rx_packets: the
/// host receives what the VMM writes), and the team follows the taps' link state.
/// </summary>
public class TapTeamTests
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(20);

    private static long HostReceived(string tap) =>
        long.Parse(File.ReadAllText($"/sys/class/net/{tap}/statistics/rx_packets").Trim(), CultureInfo.InvariantCulture);

    /// <summary>
    /// Waits until <paramref name="changes"/> holds <paramref name="count"/> entries: the team
    /// reports a change (TeamChange) after it has switched and announced the VM's MAC, so a test
    /// that saw the switch may look before the report is in.
    /// </summary>
    private static void WaitForCount<T>(List<T> changes, int count, string what) =>
        Assert.True(SpinWait.SpinUntil(() =>
        {
            lock (changes)
                return changes.Count >= count;
        }, Wait), what);

    /// <summary>A frame from <paramref name="mac"/> to everyone, with an all-zero virtio-net header (ethertype 0x88b5, for local experiments).</summary>
    private static byte[] Frame(MacAddress mac)
    {
        var packet = new byte[VirtioNetHeader.Size + 64];
        var frame = packet.AsSpan(VirtioNetHeader.Size);
        MacAddress.Broadcast.CopyTo(frame);
        mac.CopyTo(frame[6..]);
        BinaryPrimitives.WriteUInt16BigEndian(frame[12..], 0x88b5);
        return packet;
    }

    [SkippableFact]
    public void ATapOnItsBridgeIsTakenAgainByASecondOwnerAndGoesWithTheLast()
    {
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        string tap = net.Prefix + "t0";
        using (var first = TapBackend.Open(tap, 2, bridge))
        {
            Assert.Equal(bridge, TapBackend.MasterOf(tap));
            Assert.True(first.LinkUp);
            // A hand-over's new process opens the same tap while the old one still holds it.
            using var second = TapBackend.Open(tap, 2, bridge);
            Assert.Equal(bridge, TapBackend.MasterOf(tap));
            second.SetActivePairs(1);
            Assert.True(second.Send(0, Frame(MacAddress.Random())));
        }
        Assert.False(Directory.Exists($"/sys/class/net/{tap}"), "the tap the VMM made outlived its last owner");
    }

    [SkippableFact]
    public void TheTeamMovesTrafficOffAFailedUplinkAndBackAfterTheFailbackDelay()
    {
        using var net = NetTopology.Create();
        string a = net.AddBridge(), b = net.AddBridge();
        string tapA = net.Prefix + "ta", tapB = net.Prefix + "tb";
        var mac = MacAddress.Random();
        var delay = TimeSpan.FromMilliseconds(800);
        using var team = new NicTeam([TapBackend.Open(tapA, 1, a), TapBackend.Open(tapB, 1, b)],
            new TeamOptions { Policy = TeamPolicy.ActiveBackup, FailbackDelay = delay }, mac);
        var changes = new List<TeamChange>();
        team.Changed += c => { lock (changes) changes.Add(c); };
        var frame = Frame(mac);

        long a0 = HostReceived(tapA), b0 = HostReceived(tapB);
        for (int i = 0; i < 10; i++)
            Assert.True(team.Send(0, frame));
        Assert.Equal(a0 + 10, HostReceived(tapA));
        Assert.Equal(b0, HostReceived(tapB));

        net.SetLinkDown(tapA);
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapB]), Wait), "no failover to B");
        // The VM's MAC was announced on B (one RARP), then the traffic follows.
        Assert.True(SpinWait.SpinUntil(() => HostReceived(tapB) == b0 + 1, Wait), $"B received {HostReceived(tapB) - b0} frames, not the announcement");
        for (int i = 0; i < 10; i++)
            Assert.True(team.Send(0, frame));
        Assert.Equal(b0 + 11, HostReceived(tapB));
        Assert.Equal(1, team.Failovers);

        var upAt = System.Diagnostics.Stopwatch.StartNew();
        net.SetLinkUp(tapA);
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapA]), Wait), "no failback to A");
        Assert.True(upAt.Elapsed >= delay, $"the team went back to A {upAt.Elapsed.TotalMilliseconds} ms after it came up, before the {delay.TotalMilliseconds} ms delay");
        long aBack = HostReceived(tapA);
        for (int i = 0; i < 10; i++)
            Assert.True(team.Send(0, frame));
        Assert.Equal(aBack + 10, HostReceived(tapA));
        var status = team.Status();
        Assert.True(status[0].Active && !status[1].Active && status[0].Up && status[1].Up);
        Assert.Equal(1, status[0].Failures);
        WaitForCount(changes, 3, "the failback was not reported");
        lock (changes)
            Assert.Equal(["link down", "link up", "failback"], changes.Select(c => c.Reason));

        // Both down: nothing goes out, and the team says why.
        net.SetLinkDown(tapA);
        net.SetLinkDown(tapB);
        Assert.True(SpinWait.SpinUntil(() => !team.LinkUp, Wait));
        Assert.False(team.Send(0, frame));
        Assert.Equal(1, team.NoUplinkDrops);
    }
    /// <summary>
    /// The team hears link changes from the kernel (netlink) and acts on them at once: with the
    /// periodic reads an hour apart, a tap set down still moves the traffic within seconds, and
    /// setting it up again brings it back.
    /// </summary>
    [SkippableFact]
    public void TheTeamActsOnALinkChangeTheKernelReportsWithoutPolling()
    {
        using var net = NetTopology.Create();
        string a = net.AddBridge(), b = net.AddBridge();
        string tapA = net.Prefix + "ta", tapB = net.Prefix + "tb";
        var hour = TimeSpan.FromHours(1);
        using var team = new NicTeam([TapBackend.Open(tapA, 1, a), TapBackend.Open(tapB, 1, b)],
            new TeamOptions { Policy = TeamPolicy.ActiveBackup, MonitorInterval = hour, LinkRecheck = hour }, MacAddress.Random());
        var changes = new List<string>();
        team.Changed += c => { lock (changes) changes.Add(c.Reason); };
        Assert.True(SpinWait.SpinUntil(() => team.HearsLinkChanges, Wait), "the team's monitor opened no netlink socket");
        Assert.Equal(["tap " + tapA], team.ActiveUplinks);
        net.SetLinkDown(tapA);
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapB]), Wait), "the team did not hear that A went down");
        net.SetLinkUp(tapA);
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapA]), Wait), "the team did not hear that A came back");
        WaitForCount(changes, 3, "the failback was not reported");
        lock (changes)
            Assert.Equal(["link down", "link up", "failback"], changes);
    }

    /// <summary>
    /// With flow-hash, the VM's broadcasts leave by several uplinks and a bridge floods each one
    /// back into the others: none of them reaches the VM again.
    /// </summary>
    [SkippableFact]
    public void TheVmsOwnFramesFloodedBackIntoTheTeamAreNotDelivered()
    {
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        string tapA = net.Prefix + "ta", tapB = net.Prefix + "tb";
        var mac = MacAddress.Random();
        using var team = new NicTeam([TapBackend.Open(tapA, 1, bridge), TapBackend.Open(tapB, 1, bridge)],
            new TeamOptions { Policy = TeamPolicy.FlowHash }, mac);
        long a0 = HostReceived(tapA), b0 = HostReceived(tapB);
        for (int i = 0; i < 32; i++)
        {
            // A UDP broadcast from 10.0.0.i: flows differ by source address.
            var packet = Frame(mac);
            var frame = packet.AsSpan(VirtioNetHeader.Size);
            BinaryPrimitives.WriteUInt16BigEndian(frame[12..], 0x0800);
            frame[14] = 0x45;
            frame[23] = 17;
            frame[26..30].Fill(10);
            frame[29] = (byte)(i + 1);
            frame[30..34].Fill(255);
            Assert.True(team.Send(0, packet));
        }
        Assert.True(HostReceived(tapA) > a0 && HostReceived(tapB) > b0, "the flows did not use both uplinks");
        Thread.Sleep(200);
        var buffer = new byte[VirtioNetHeader.MaxPacket];
        int n;
        while ((n = team.Receive(0, buffer)) > 0)
            Assert.NotEqual(mac, MacAddress.FromBytes(buffer.AsSpan(VirtioNetHeader.Size + 6, 6)));
    }

    /// <summary>
    /// ARP probes find what the carrier does not: uplink A's bridge port stops forwarding (its tap
    /// stays up), A's probes to the peer go unanswered, the traffic moves to B (two switches joined
    /// by a trunk, the peer on the first) and back once A's probes are answered again. The answers
    /// never reach the VM's side. When the peer itself stops answering, no uplink is blamed.
    /// </summary>
    [SkippableFact]
    public void ArpProbesFindASilentFailureThatTheCarrierDoesNot()
    {
        using var net = NetTopology.Create();
        string a = net.AddBridge(), b = net.AddBridge();
        net.AddTrunk(a, b);
        var peer = net.AddPeer(a, "10.77.6.1/24");
        string tapA = net.Prefix + "ta", tapB = net.Prefix + "tb";
        var mac = MacAddress.Random();
        var options = new TeamOptions
        {
            Policy = TeamPolicy.ActiveBackup, FailbackDelay = TimeSpan.FromMilliseconds(300),
            ArpTarget = System.Net.IPAddress.Parse(peer.Address), ArpInterval = TimeSpan.FromMilliseconds(50), ArpMisses = 4,
        };
        using var team = new NicTeam([TapBackend.Open(tapA, 1, a), TapBackend.Open(tapB, 1, b)], options, mac);
        var changes = new List<TeamChange>();
        team.Changed += c => { lock (changes) changes.Add(c); };
        var probeMacs = new[] { NicTeam.ProbeMac(mac, 0), NicTeam.ProbeMac(mac, 1) };
        Assert.DoesNotContain(mac, probeMacs);
        Assert.NotEqual(probeMacs[0], probeMacs[1]);

        Assert.True(SpinWait.SpinUntil(() => team.Status().All(u => u.ProbesAnswered >= 3), Wait),
            $"the peer did not answer both uplinks' probes: {string.Join("; ", team.Status())}");
        Assert.Equal(["tap " + tapA], team.ActiveUplinks);

        net.DropTraffic(tapA);
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapB]), Wait), "no failover to B");
        Assert.True(File.ReadAllText($"/sys/class/net/{tapA}/operstate").Trim() is "up" or "unknown", "the tap's link went down: not a silent failure");
        var status = team.Status();
        Assert.False(status[0].Up);
        Assert.True(status[1].Up && status[1].Active);
        // The change is reported once the team has announced the VM's MAC on B, after it switched.
        Assert.True(SpinWait.SpinUntil(() =>
        {
            lock (changes)
                return changes.Any(c => c.Uplink == "tap " + tapA && !c.Up && c.Reason == "probes unanswered");
        }, Wait), "no change reported for A's unanswered probes");

        net.StopDropping(tapA);
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapA]), Wait), "no failback to A");
        WaitForCount(changes, 3, "the failback was not reported");
        lock (changes)
            Assert.Equal(["probes unanswered", "probe answered", "failback"], changes.Select(c => c.Reason));

        // The answers went to the probe addresses, and the team kept them from the VM.
        var buffer = new byte[VirtioNetHeader.MaxPacket];
        int n;
        while ((n = team.Receive(0, buffer)) > 0)
        {
            var destination = MacAddress.FromBytes(buffer.AsSpan(VirtioNetHeader.Size, 6));
            Assert.DoesNotContain(destination, probeMacs);
        }

        // The peer stops answering everyone: the target is down, not an uplink.
        net.DropTraffic(peer.HostInterface);
        Thread.Sleep(300);                                      // answers already on their way
        long answered = team.Status().Sum(u => u.ProbesAnswered);
        Thread.Sleep(options.ArpInterval * options.ArpMisses * 4);
        Assert.Equal(answered, team.Status().Sum(u => u.ProbesAnswered));
        Assert.Equal(["tap " + tapA], team.ActiveUplinks);
        Assert.True(team.Status().All(u => u.Up), $"an uplink was blamed for the target's silence: {string.Join("; ", team.Status())}");
        Assert.Equal(1, team.Failovers);
    }
}
