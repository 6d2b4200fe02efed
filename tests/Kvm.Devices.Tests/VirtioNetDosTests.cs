using System.Buffers.Binary;
using System.Diagnostics;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;

namespace Kvm.Devices.Tests;

/// <summary>
/// The device feeds its denial-of-service monitor with what the guest sends and receives and
/// reports the monitor's alarms. The window is ten minutes, so the monitor's own timer does not
/// close a slot while the test runs; the test closes them (TrafficMonitor.Tick) with its own clock.
/// </summary>
public class VirtioNetDosTests
{
    private static byte[] Udp(MacAddress destination, MacAddress source, uint dstIp)
    {
        var frame = Eth.Frame(destination, source, 60);
        BinaryPrimitives.WriteUInt16BigEndian(frame.AsSpan(12), 0x0800);
        frame[14] = 0x45;
        frame[14 + 6] = frame[14 + 7] = 0;      // not a fragment
        frame[14 + 9] = 17;
        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(14 + 16), dstIp);
        return frame;
    }

    [Fact]
    public void AFloodTheGuestSendsRaisesAnAlarmNamingTheRuleAndItsEndClearsIt()
    {
        var rules = new DosRules
        {
            UdpPerSecond = 1, PacketsPerSecond = null, DestinationsPerSecond = null, HalfOpenPerSecond = null, IcmpPerSecond = null,
            Window = TimeSpan.FromMinutes(10), Action = DosAction.Limit, LimitTo = 1_000_000,
        };
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Dos = rules });
        var alarms = new List<(VirtioNet, DosAlarm)>();
        rig.Net.DosAlarm += (n, a) => { lock (alarms) alarms.Add((n, a)); };
        rig.Start();
        var monitor = rig.Net.Monitor!;
        long now = Stopwatch.GetTimestamp();
        long slot = (long)(rules.Window.TotalSeconds / TrafficMonitor.Slots * Stopwatch.Frequency);
        // One per second over the window is 60 per slot: 61 in each of ten slots is above it.
        var flood = Eth.Packet(Udp(Eth.PeerMac, Eth.VmMac, 0x0a000001));
        for (int s = 0; s < TrafficMonitor.Slots; s++)
        {
            lock (alarms)
                Assert.Empty(alarms);
            for (int i = 0; i < 61; i++)
                rig.Transmit(flood);
            monitor.Tick(now += slot);
        }
        var (net, alarm) = Assert.Single(alarms);
        Assert.Same(rig.Net, net);
        Assert.Equal(("udp", TrafficDirection.Out, false), (alarm.Rule, alarm.Direction, alarm.Cleared));
        Assert.Equal(610.0 / 600, alarm.Rate, 3);
        Assert.Equal(610, rig.Backend.Drain(0).Count);      // detection drops nothing

        // Quiet for a window: cleared.
        for (int s = 0; s < TrafficMonitor.Slots; s++)
            monitor.Tick(now += slot);
        Assert.Equal(2, alarms.Count);
        Assert.True(alarms[1].Item2.Cleared);
        Assert.Empty(monitor.Firing);
    }

    [Fact]
    public void FramesTheGuestReceivesCountAsInbound()
    {
        var rules = new DosRules
        {
            PacketsPerSecond = 1, UdpPerSecond = null, DestinationsPerSecond = null, HalfOpenPerSecond = null, IcmpPerSecond = null,
            Window = TimeSpan.FromMinutes(10),
        };
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Dos = rules });
        var alarms = new List<DosAlarm>();
        rig.Net.DosAlarm += (_, a) => { lock (alarms) alarms.Add(a); };
        rig.Start(queueSize: 256);
        var monitor = rig.Net.Monitor!;
        long now = Stopwatch.GetTimestamp();
        long slot = (long)(rules.Window.TotalSeconds / TrafficMonitor.Slots * Stopwatch.Frequency);
        var packet = Eth.Packet(Udp(Eth.VmMac, Eth.PeerMac, 0x0a000002));
        for (int s = 0; s < TrafficMonitor.Slots; s++)
        {
            rig.PostRx(61);
            for (int i = 0; i < 61; i++)
            {
                rig.Backend.Inject(0, packet);
                rig.Receive();          // takes the frame from the used ring, which frees its descriptor
            }
            Assert.Equal(61L * (s + 1), rig.Net.Stats.RxPackets);
            monitor.Tick(now += slot);
        }
        var alarm = Assert.Single(alarms);
        Assert.Equal(("packets", TrafficDirection.In), (alarm.Rule, alarm.Direction));
    }
}
