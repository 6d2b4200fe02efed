using Kvm.Devices.Virtio.Net;
using Kvm.Network;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// Debian's cloud kernel with its virtio_net driver on this VMM's virtio-net, reaching a peer: a
/// network namespace behind a bridge (NetTopology) that the VMM puts the VM's tap on, or behind a
/// veth whose host end is the VM's uplink itself (dev=: packet sockets, no tap). The guest's
/// init (native/linux/init) takes its address from ip= and runs the network checks; the peer
/// serves and receives bytes whose SHA-256 both sides compare.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class LinuxNetTests
{
    private static readonly TimeSpan BootTimeout = TimeSpan.FromSeconds(400);
    private const string Peer = "10.77.1.1", Guest = "10.77.1.2";

    /// <summary>
    /// One queue pair and offloads; two pairs on two vCPUs; no offloads (the guest checksums and
    /// segments itself; on a host interface the VMM finishes the peer's 64 KiB TCP frames for it);
    /// each on a tap and on a host interface.
    /// </summary>
    public static TheoryData<int, int, bool, bool> Configurations => new()
    {
        { 1, 1, true, false },
        { 2, 2, true, false },
        { 1, 1, false, false },
        { 1, 1, true, true },
        { 2, 2, true, true },
        { 1, 1, false, true },
    };

    [SkippableTheory]
    [MemberData(nameof(Configurations))]
    public void AGuestReachesAPeerNamespaceAndMovesBytesBothWays(int cpus, int queues, bool offloads, bool hostInterface)
    {
        LinuxNetGuest.Files();
        using var net = NetTopology.Create();
        string? bridge = hostInterface ? null : net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        const long bytes = 3 << 20;
        var served = peer.ServeBytes(5000, bytes);
        var received = peer.ReceiveBytes(5001);

        var nic = new NicSpec
        {
            Mac = MacAddress.Random(), Queues = queues, Offloads = offloads,
            Uplinks = [hostInterface ? new UplinkSpec { Interface = peer.HostInterface } : new UplinkSpec { Tap = net.Prefix + "t0", Bridge = bridge }],
        };
        string checks = $"macaddr:{nic.Mac},netqueues:{queues},ping:{Peer},tcpget:{Peer}:5000:{bytes},tcpput:{Peer}:5001:{bytes}";
        var spec = LinuxNetGuest.Spec(Guest, Peer, checks, nic, cpus);
        var serial = new SerialCapture();
        VirtioNetStats stats;
        ulong negotiated;
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            using var cancel = new CancellationTokenSource(BootTimeout);
            var reason = vm.Run(cancel.Token);
            var device = (VirtioNet)vm.Nics.Single().Device;
            Assert.True(reason == new DebugExitStop(0),
                $"the guest's verdict: {reason.Describe()} (0 = every check passed; N = check N of '{checks}' failed); device: {device.Stats}" +
                (device.Backend is PacketBackend p ? $", frames per socket {string.Join('/', p.FramesPerSocket)}" : "") + $"; console:\n{serial.Text}");
            stats = device.Stats;
            negotiated = device.NegotiatedFeatures;
            if (device.Backend is PacketBackend packets)
            {
                // The peer's TCP sends 64 KiB frames (veth TSO): without offloads the VMM cut them.
                Assert.Equal(0, packets.Unfinished);
                Assert.True(offloads || packets.Segmented > 0, "no received frame was segmented for a guest without offloads");
            }
        }

        string[] guest = LinuxNetGuest.GuestLines(serial.Text);
        Assert.Equal(checks.Split(','), guest.Where(l => l.StartsWith("PASS ", StringComparison.Ordinal)).Select(l => l[5..]));
        Assert.Contains($"net eth0 {Guest}/24 mac {nic.Mac}", guest);
        Assert.Contains($"tcpget {bytes} {served.Sha256}", guest);
        var (count, sha) = received.WaitAsync(TimeSpan.FromMinutes(2)).GetAwaiter().GetResult();
        Assert.Equal(bytes, count);
        Assert.Contains($"tcpput {bytes} {sha}", guest);

        // The offloads were taken exactly when offered, and the device dropped nothing it sent.
        bool csum = (negotiated & (1UL << VirtioNet.FeatureCsum)) != 0;
        bool tso = (negotiated & (1UL << VirtioNet.FeatureHostTso4)) != 0;
        Assert.Equal(offloads, csum);
        Assert.Equal(offloads, tso);
        Assert.Equal(queues > 1, (negotiated & (1UL << VirtioNet.FeatureMq)) != 0);
        Assert.Equal(0, stats.TxDropped);
        Assert.True(stats.TxBytes >= bytes && stats.RxBytes >= bytes, $"the device moved {stats.TxBytes} bytes out and {stats.RxBytes} in, fewer than the {bytes} each way the guest moved");
    }
}
