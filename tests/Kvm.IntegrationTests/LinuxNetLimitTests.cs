using System.Globalization;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Xunit.Abstractions;

namespace Kvm.IntegrationTests;

/// <summary>A NIC's transmit limit holds a guest's TCP stream to the rate, measured by the peer that receives it.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
[Collection(QuietCollection.Name)]
public class LinuxNetLimitTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(600);
    private const string Peer = "10.77.4.1", Guest = "10.77.4.2";
    private const int Port = 5001;

    /// <summary>
    /// 10 Mbit/s: well below what a guest sends in a nested KVM host (the limit must be what holds
    /// the stream back). The limit counts Ethernet frame bytes; TCP's payload, measured by the
    /// peer past slow start, is within 5% of it.
    /// </summary>
    [SkippableFact]
    public void ATransmitLimitHoldsAStreamToItsRate()
    {
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        var receiver = LinuxNetGuest.StartReceiver(net, peer, Port);

        const long limit = 10_000_000;
        const long bytes = 12 << 20;
        var nic = new NicSpec { TxLimit = limit, Uplinks = [new UplinkSpec { Tap = net.Prefix + "t0", Bridge = bridge }] };
        var spec = LinuxNetGuest.Spec(Guest, Peer, $"tcpput:{Peer}:{Port}:{bytes}", nic);
        var serial = new SerialCapture();
        VmStopReason reason;
        VirtioNetStats stats;
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            using var cancel = new CancellationTokenSource(Timeout);
            reason = vm.Run(cancel.Token);
            stats = ((VirtioNet)vm.Nics.Single().Device).Stats;
        }
        string console = serial.Text.Replace("\r", "");
        Assert.True(reason == new DebugExitStop(0), $"the guest's verdict: {reason.Describe()}; console:\n{console}");
        var done = LinuxNetGuest.Done(receiver);
        Assert.Contains($"kvm-guest: tcpput {bytes} {done[2]}\n", console);
        double rate = double.Parse(done[4], CultureInfo.InvariantCulture);
        output.WriteLine($"payload rate {rate / 1e6:0.000} Mbit/s under a {limit / 1e6} Mbit/s limit; longest silence {done[3]} ms; {stats}");
        Assert.InRange(rate / limit, 0.95, 1.05);
    }
    /// <summary>
    /// A receive limit: the VMM reads the tap no faster than the rate, frames wait in the tap's
    /// queue (and drop there once it is full), and the sender's TCP settles at the rate. Measured
    /// by the guest's iperf3 receiving from the peer for 10 s (slow start included).
    /// </summary>
    [SkippableFact]
    public void AReceiveLimitHoldsAStreamToItsRate()
    {
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        peer.StartIperfServer();

        const long limit = 10_000_000;
        var nic = new NicSpec { RxLimit = limit, Uplinks = [new UplinkSpec { Tap = net.Prefix + "t0", Bridge = bridge }] };
        var spec = LinuxNetGuest.Spec(Guest, Peer, $"iperf:{Peer}:10:reverse", nic);
        var serial = new SerialCapture();
        VmStopReason reason;
        VirtioNetStats stats;
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            using var cancel = new CancellationTokenSource(Timeout);
            reason = vm.Run(cancel.Token);
            stats = ((VirtioNet)vm.Nics.Single().Device).Stats;
        }
        string console = serial.Text.Replace("\r", "");
        Assert.True(reason == new DebugExitStop(0), $"the guest's verdict: {reason.Describe()}; console:\n{console}");
        string result = Assert.Single(LinuxNetGuest.GuestLines(console), l => l.StartsWith("iperf receive ", StringComparison.Ordinal));
        double rate = double.Parse(result.Split(' ')[2], CultureInfo.InvariantCulture) * 1e6;
        output.WriteLine($"{result}: {rate / limit:0.000} of a {limit / 1e6} Mbit/s receive limit; {stats}");
        Assert.InRange(rate / limit, 0.95, 1.05);
    }
}
