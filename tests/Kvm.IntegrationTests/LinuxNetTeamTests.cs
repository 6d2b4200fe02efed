using System.Globalization;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Xunit.Abstractions;

namespace Kvm.IntegrationTests;

/// <summary>
/// A NIC teamed over two taps on two bridges (two switches joined by a trunk; the peer hangs off
/// the first): a TCP stream from the guest to the peer goes on while the VMM moves it between the
/// uplinks. The peer's receiver measures the longest silence in the stream; both ends compare the
/// bytes by SHA-256. The cut is the link going down (the carrier shows it), or the uplink's bridge
/// port silently dropping everything (only the team's ARP probes to the peer show it).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class LinuxNetTeamTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(600);
    private const string Peer = "10.77.3.1", Guest = "10.77.3.2";
    private const int Port = 5001;

    [SkippableTheory]
    [InlineData(false)]
    [InlineData(true)]
    public void AStreamGoesOnWhileTheActiveUplinkIsCutAndFailsBackWhenItReturns(bool silent)
    {
        using var net = NetTopology.Create();
        string a = net.AddBridge(), b = net.AddBridge();
        net.AddTrunk(a, b);
        var peer = net.AddPeer(a, Peer + "/24");

        var receiver = LinuxNetGuest.StartReceiver(net, peer, Port);

        const long bytes = 64 << 20;
        string tapA = net.Prefix + "ta", tapB = net.Prefix + "tb";
        var nic = new NicSpec
        {
            Mac = MacAddress.Random(), Policy = TeamPolicy.ActiveBackup, FailbackDelay = TimeSpan.FromSeconds(1),
            Uplinks = [new UplinkSpec { Tap = tapA, Bridge = a }, new UplinkSpec { Tap = tapB, Bridge = b }],
            ArpTarget = silent ? System.Net.IPAddress.Parse(Peer) : null, ArpInterval = TimeSpan.FromMilliseconds(50), ArpMisses = 4,
            // At most 40 Mbit/s, so the stream lasts 13 s or more however fast the host: the
            // failback, a second after A returns at 12 MiB, comes while 10 s of it are left (a
            // loaded nested host once delayed the answers on B too, A came and went again, and a
            // stream 48 MiB long had ended before A sent 100 frames).
            TxLimit = 40_000_000,
        };
        var spec = LinuxNetGuest.Spec(Guest, Peer, $"ping:{Peer},tcpput:{Peer}:{Port}:{bytes}", nic);
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(spec, serial.Write);
        var team = (NicTeam)((VirtioNet)vm.Nics.Single().Device).Backend;
        var changes = new List<TeamChange>();
        team.Changed += c => { lock (changes) changes.Add(c); };
        using var cancel = new CancellationTokenSource(Timeout);
        var run = Task.Run(() => vm.Run(cancel.Token));

        // Cut the active uplink a few MiB in, bring it back a few MiB later.
        long Got() => long.Parse(receiver.StandardOutput.ReadLine()?.Split(' ')[1] ?? "-1", CultureInfo.InvariantCulture);
        Assert.Equal([tapA], team.ActiveUplinks.Select(n => n.Replace("tap ", "")).ToArray());
        while (Got() is >= 0 and < (4 << 20)) { }
        var before = team.Status();
        if (silent)
            net.DropTraffic(tapA);
        else
            net.SetLinkDown(tapA);
        while (Got() is >= 0 and < (12 << 20)) { }
        var during = team.Status();
        Assert.Equal([tapB], team.ActiveUplinks.Select(n => n.Replace("tap ", "")).ToArray());
        if (silent)
            net.StopDropping(tapA);
        else
            net.SetLinkUp(tapA);
        // The uplink's bridge port comes back in forwarding state; the team fails back a second
        // after, and the stream goes on over A.
        Assert.True(SpinWait.SpinUntil(() => team.ActiveUplinks.SequenceEqual(["tap " + tapA]), TimeSpan.FromSeconds(60)), "no failback to A");
        // The receiver's lines queued up meanwhile: watch A's own counter, not the lines.
        long failedBack = team.Status()[0].TxPackets;
        SpinWait.SpinUntil(() => team.Status()[0].TxPackets > failedBack + 100, TimeSpan.FromSeconds(60));
        var after = team.Status();
        var done = LinuxNetGuest.Done(receiver);
        var reason = run.WaitAsync(Timeout).GetAwaiter().GetResult();
        string console = serial.Text.Replace("\r", "");
        Assert.True(reason == new DebugExitStop(0), $"the guest's verdict: {reason.Describe()}; console:\n{console}");

        Assert.Equal(bytes.ToString(CultureInfo.InvariantCulture), done[1]);
        Assert.Contains($"kvm-guest: tcpput {bytes} {done[2]}\n", console);
        output.WriteLine($"{(silent ? "silent drop" : "link down")}: longest silence in the stream: {done[3]} ms; team changes: {string.Join("; ", changes.Select(c => $"{c.Uplink} {(c.Up ? "up" : "down")} ({c.Reason}) -> {string.Join(",", c.Active)}"))}");

        // A carried the stream before the cut, B while A was down, A again after the failback.
        Assert.True(during[1].TxPackets > before[1].TxPackets, "uplink B carried nothing while A was down");
        Assert.True(after[0].TxPackets > failedBack + 100, $"uplink A sent {after[0].TxPackets - failedBack} frames in a minute after it came back");
        Assert.Equal(1, team.Failovers);
        lock (changes)
        {
            Assert.Contains(changes, c => !c.Up && c.Reason == (silent ? "probes unanswered" : "link down") && c.Active.SequenceEqual(["tap " + tapB]));
            Assert.Contains(changes, c => c.Reason == "failback" && c.Active.SequenceEqual(["tap " + tapA]));
        }
    }

    /// <summary>
    /// Load distribution: with flow-hash, 16 TCP streams from the guest (iperf3 -P 16) go out of
    /// both uplinks, each stream on one, so both carry a share (all 16 on one uplink by chance:
    /// 1 in 32768). The switches see the VM's MAC on both ports, as without a link aggregation.
    /// </summary>
    [SkippableFact]
    public void ManyFlowsUseBothUplinksWithFlowHash()
    {
        using var net = NetTopology.Create();
        string a = net.AddBridge(), b = net.AddBridge();
        net.AddTrunk(a, b);
        var peer = net.AddPeer(a, Peer + "/24");
        peer.StartIperfServer();

        string tapA = net.Prefix + "ta", tapB = net.Prefix + "tb";
        var nic = new NicSpec
        {
            Policy = TeamPolicy.FlowHash,
            Uplinks = [new UplinkSpec { Tap = tapA, Bridge = a }, new UplinkSpec { Tap = tapB, Bridge = b }],
        };
        var spec = LinuxNetGuest.Spec(Guest, Peer, $"iperf:{Peer}:5:send:16", nic);
        var serial = new SerialCapture();
        IReadOnlyList<UplinkStatus> status;
        VmStopReason reason;
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            using var cancel = new CancellationTokenSource(Timeout);
            reason = vm.Run(cancel.Token);
            status = ((NicTeam)((VirtioNet)vm.Nics.Single().Device).Backend).Status();
        }
        string console = serial.Text.Replace("\r", "");
        Assert.True(reason == new DebugExitStop(0), $"the guest's verdict: {reason.Describe()}; console:\n{console}");
        string result = Assert.Single(LinuxNetGuest.GuestLines(console), l => l.StartsWith("iperf send ", StringComparison.Ordinal));
        long total = status.Sum(u => u.TxBytes);
        output.WriteLine($"{result}; " + string.Join("; ", status.Select(u => $"{u.Name}: sent {u.TxPackets} frames, {u.TxBytes} bytes ({100.0 * u.TxBytes / total:0.0}%)")));
        Assert.All(status, u => Assert.True(u.Active && u.Up, $"{u.Name} is not up and active"));
        Assert.All(status, u => Assert.True(u.TxBytes > total / 50, $"{u.Name} carried {u.TxBytes} of {total} bytes: the flows did not spread"));
    }
}
