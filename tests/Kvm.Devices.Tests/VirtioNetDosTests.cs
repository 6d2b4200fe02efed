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
    private static byte[] Udp(MacAddress destination, MacAddress source, uint dstIp, int length = 60)
    {
        var frame = Eth.Frame(destination, source, length);
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

    // A rule of one UDP datagram a second over a ten-minute window in ten slots: 61 a slot is above
    // it. The limit, 8 kbit/s (1000 bytes a second), lets through a burst of one largest frame's
    // bytes (64 KiB, some 47 of these 1400-byte frames) and then one frame each 1.4 s.
    private const int FloodFrame = 1400;

    private static long Allowed(TimeSpan elapsed) =>
        (VirtioNetHeader.MaxPacket + (long)(1000 * elapsed.TotalSeconds)) / FloodFrame + 2;

    private static DosRules LimitRules(bool udp) => new()
    {
        UdpPerSecond = udp ? 1 : null, PacketsPerSecond = udp ? null : 1, DestinationsPerSecond = null, HalfOpenPerSecond = null,
        IcmpPerSecond = null, Window = TimeSpan.FromMinutes(10), Action = DosAction.Limit, LimitTo = 8_000,
    };

    [Fact]
    public void OverADosLimitAFloodingGuestsExcessIsDroppedAndTheRuleFiresUntilTheFloodStops()
    {
        var rules = LimitRules(udp: true);
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Dos = rules });
        var alarms = new List<DosAlarm>();
        rig.Net.DosAlarm += (_, a) => { lock (alarms) alarms.Add(a); };
        rig.Start();
        var monitor = rig.Net.Monitor!;
        long now = Stopwatch.GetTimestamp();
        long slot = (long)(rules.Window.TotalSeconds / TrafficMonitor.Slots * Stopwatch.Frequency);
        var flood = Eth.Packet(Udp(Eth.PeerMac, Eth.VmMac, 0x0a000001, FloodFrame));
        for (int s = 0; s < TrafficMonitor.Slots; s++)
        {
            for (int i = 0; i < 61; i++)
                rig.Transmit(flood);
            monitor.Tick(now += slot);
        }
        lock (alarms)
            Assert.Equal(("udp", false), (Assert.Single(alarms).Rule, alarms[0].Cleared));
        Assert.Equal(610, rig.Backend.Drain(0).Count);      // until the rule fired, nothing was held or dropped
        Assert.Equal(0, rig.Net.Stats.TxDosLimited);

        // The flood goes on for another window: the device drops what is over the limit (the guest
        // is not held back: every frame it queued is used at once), and the rule stays firing
        // because the monitor still sees the whole flood.
        var watch = Stopwatch.StartNew();
        for (int s = 0; s < TrafficMonitor.Slots; s++)
        {
            for (int i = 0; i < 61; i++)
                rig.Transmit(flood);
            monitor.Tick(now += slot);
        }
        int left = rig.Backend.Drain(0).Count;
        var stats = rig.Net.Stats;
        Assert.Equal(610, left + stats.TxDosLimited);
        long allowed = Allowed(watch.Elapsed);
        Assert.True(left <= allowed, $"{left} frames left over the 8 kbit/s limit in {watch.Elapsed.TotalMilliseconds:0} ms (at most {allowed})");
        Assert.True(stats.TxDosLimited >= 610 - allowed);
        Assert.Equal(stats.TxDosLimited, stats.TxDropped);
        lock (alarms)
            Assert.Single(alarms);
        Assert.Single(monitor.Firing);

        // The flood stops for a window: the rule clears and the guest sends freely again.
        for (int s = 0; s < TrafficMonitor.Slots; s++)
            monitor.Tick(now += slot);
        lock (alarms)
            Assert.True(alarms[^1].Cleared);
        Assert.Empty(monitor.Firing);
        for (int i = 0; i < 61; i++)
            rig.Transmit(flood);
        Assert.Equal(61, rig.Backend.Drain(0).Count);
        Assert.Equal(stats.TxDosLimited, rig.Net.Stats.TxDosLimited);
    }

    [Fact]
    public void OverADosLimitAFloodAtTheGuestIsDroppedBeforeItsRing()
    {
        var rules = LimitRules(udp: false);
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Dos = rules });
        var alarms = new List<DosAlarm>();
        rig.Net.DosAlarm += (_, a) => { lock (alarms) alarms.Add(a); };
        rig.Start(queueSize: 256);
        var monitor = rig.Net.Monitor!;
        long now = Stopwatch.GetTimestamp();
        long slot = (long)(rules.Window.TotalSeconds / TrafficMonitor.Slots * Stopwatch.Frequency);
        var packet = Eth.Packet(Udp(Eth.VmMac, Eth.PeerMac, 0x0a000002, FloodFrame));
        for (int s = 0; s < TrafficMonitor.Slots; s++)
        {
            rig.PostRx(61);
            for (int i = 0; i < 61; i++)
            {
                rig.Backend.Inject(0, packet);
                rig.Receive();
            }
            monitor.Tick(now += slot);
        }
        lock (alarms)
            Assert.Equal(("packets", TrafficDirection.In), (Assert.Single(alarms).Rule, alarms[0].Direction));

        // Another 200 frames at once, with room in the ring for all (at most 47 fit in a burst): the limit lets a few in and
        // drops the rest, and the monitor counts them all.
        var q = rig.Queues[NetRig.RxQueue(0)];
        rig.PostRx(200);
        ushort before = q.UsedIdx;
        var watch = Stopwatch.StartNew();
        for (int i = 0; i < 200; i++)
            rig.Backend.Inject(0, packet);
        Assert.True(Wait.Until(() => rig.Net.Stats.RxDosLimited + (ushort)(q.UsedIdx - before) == 200),
            $"200 frames offered, {rig.Net.Stats.RxDosLimited} dropped and {(ushort)(q.UsedIdx - before)} received");
        int received = (ushort)(q.UsedIdx - before);
        long allowed = Allowed(watch.Elapsed);
        Assert.True(received <= allowed, $"{received} frames received over the 8 kbit/s limit in {watch.Elapsed.TotalMilliseconds:0} ms (at most {allowed})");
        Assert.True(rig.Net.Stats.RxDosLimited >= 200 - allowed);
        Assert.Equal(rig.Net.Stats.RxDosLimited, rig.Net.Stats.RxDropped);
        monitor.Tick(now += slot);
        Assert.Single(monitor.Firing);
    }
}
