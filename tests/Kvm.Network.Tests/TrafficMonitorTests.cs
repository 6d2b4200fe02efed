using System.Buffers.Binary;
using System.Diagnostics;
using Kvm.Network;

namespace Kvm.Network.Tests;

/// <summary>The detection rules on crafted frames, with the monitor's slots closed by hand (no timer): each tick is a tenth of the window.</summary>
public class TrafficMonitorTests
{
    private static readonly MacAddress Vm = MacAddress.Parse("52:54:00:00:00:01"), Peer = MacAddress.Parse("52:54:00:00:00:02");

    /// <summary>An IPv4 frame of protocol <paramref name="proto"/>, with a TCP header's ports and flags, or 8 bytes of UDP/ICMP header.</summary>
    private static byte[] Ipv4(uint src, uint dst, byte proto, ushort srcPort = 1234, ushort dstPort = 80, byte tcpFlags = 0)
    {
        var f = new byte[14 + 20 + 20];
        Peer.CopyTo(f);
        Vm.CopyTo(f.AsSpan(6));
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(12), 0x0800);
        f[14] = 0x45;
        f[14 + 9] = proto;
        BinaryPrimitives.WriteUInt32BigEndian(f.AsSpan(14 + 12), src);
        BinaryPrimitives.WriteUInt32BigEndian(f.AsSpan(14 + 16), dst);
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(34), srcPort);
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(36), dstPort);
        f[34 + 13] = tcpFlags;
        return f;
    }

    private const byte Syn = 0x02, Ack = 0x10;

    private sealed class Clock
    {
        public TrafficMonitor Monitor = null!;
        public long Now = Stopwatch.GetTimestamp();

        /// <summary>Closes one slot a tenth of the window later.</summary>
        public void Tick()
        {
            Now += (long)(Monitor.Rules.Window.TotalSeconds / TrafficMonitor.Slots * Stopwatch.Frequency);
            Monitor.Tick(Now);
        }
    }

    private static (TrafficMonitor Monitor, Clock Clock, List<DosAlarm> Alarms) Make(DosRules rules)
    {
        var clock = new Clock();
        var m = new TrafficMonitor(rules, startTimer: false, clock: () => clock.Now);
        clock.Monitor = m;
        var alarms = new List<DosAlarm>();
        m.Alarm += alarms.Add;
        return (m, clock, alarms);
    }

    [Fact]
    public void AUdpFloodSustainedForTheWindowFiresAndClearsWhenItStops()
    {
        var (m, clock, alarms) = Make(new DosRules { UdpPerSecond = 1000, PacketsPerSecond = null, DestinationsPerSecond = null });
        var udp = Ipv4(0x0a000001, 0x0a000002, 17);
        // 150 per slot of 100 ms = 1500/s, above 1000/s: nothing before the window is full.
        for (int slot = 0; slot < TrafficMonitor.Slots; slot++)
        {
            Assert.Empty(alarms);
            for (int i = 0; i < 150; i++)
                m.Observe(TrafficDirection.In, udp);
            clock.Tick();
        }
        var alarm = Assert.Single(alarms);
        Assert.Equal(("udp", TrafficDirection.In, false, 1000L), (alarm.Rule, alarm.Direction, alarm.Cleared, alarm.Threshold));
        Assert.Equal(1500, alarm.Rate, 1);
        Assert.Contains("udp in at 1500 per second for 1 s (threshold 1000)", alarm.Describe());
        Assert.Single(m.Firing);
        // Still high: no second alarm. Then quiet (below half the threshold) for a window: cleared.
        for (int i = 0; i < 150; i++)
            m.Observe(TrafficDirection.In, udp);
        clock.Tick();
        Assert.Single(alarms);
        for (int slot = 0; slot < TrafficMonitor.Slots; slot++)
        {
            for (int i = 0; i < 20; i++)
                m.Observe(TrafficDirection.In, udp);
            clock.Tick();
        }
        Assert.Equal(2, alarms.Count);
        Assert.True(alarms[1].Cleared);
        Assert.Empty(m.Firing);
    }

    [Fact]
    public void ABurstShorterThanTheWindowDoesNotFire()
    {
        var (m, clock, alarms) = Make(new DosRules { PacketsPerSecond = 1000 });
        var frame = Ipv4(0x0a000001, 0x0a000002, 17);
        for (int slot = 0; slot < 3 * TrafficMonitor.Slots; slot++)
        {
            // 9 quiet slots, then one of 5000: the window's average is 5000/s, but it is one burst.
            for (int i = 0; i < (slot % TrafficMonitor.Slots == 9 ? 5000 : 10); i++)
                m.Observe(TrafficDirection.Out, frame);
            clock.Tick();
        }
        Assert.Empty(alarms);
    }

    [Fact]
    public void SynsWithoutTheirAckAreHalfOpenAndCompletedHandshakesAreNot()
    {
        var (m, clock, alarms) = Make(new DosRules { HalfOpenPerSecond = 100, PacketsPerSecond = null, DestinationsPerSecond = null });
        // 50 handshakes per slot that complete (500/s): not half-open.
        ushort port = 1000;
        for (int slot = 0; slot < 2 * TrafficMonitor.Slots; slot++)
        {
            for (int i = 0; i < 50; i++, port++)
            {
                m.Observe(TrafficDirection.In, Ipv4(0x0a000001, 0x0a000002, 6, port, 80, Syn));
                m.Observe(TrafficDirection.In, Ipv4(0x0a000001, 0x0a000002, 6, port, 80, Ack));
            }
            clock.Tick();
        }
        Assert.Empty(alarms);
        // A SYN flood from many ports that never ACK: 30 per slot, 300/s, fires once they time out (1 s) and keep coming.
        for (int slot = 0; slot < 3 * TrafficMonitor.Slots; slot++)
        {
            for (int i = 0; i < 30; i++, port++)
                m.Observe(TrafficDirection.In, Ipv4((uint)(0x0b000000 + port), 0x0a000002, 6, port, 80, Syn));
            clock.Tick();
        }
        var alarm = Assert.Single(alarms);
        Assert.Equal(("half-open", TrafficDirection.In), (alarm.Rule, alarm.Direction));
        Assert.InRange(alarm.Rate, 100.1, 300);     // above the threshold, at most the flood's rate
    }

    [Fact]
    public void AScanOfManyDestinationsFiresTalkingToTheSameManyDoesNot()
    {
        var (m, clock, alarms) = Make(new DosRules { DestinationsPerSecond = 500, PacketsPerSecond = null });
        // 300 destinations, again and again: each counted once per window.
        for (int slot = 0; slot < 3 * TrafficMonitor.Slots; slot++)
        {
            for (uint d = 0; d < 300; d++)
                m.Observe(TrafficDirection.Out, Ipv4(0x0a000002, 0x0c000000 + d, 17));
            clock.Tick();
        }
        Assert.Empty(alarms);
        // 100 new ones every slot: 1000/s.
        uint next = 0x0d000000;
        for (int slot = 0; slot < 2 * TrafficMonitor.Slots; slot++)
        {
            for (int i = 0; i < 100; i++)
                m.Observe(TrafficDirection.Out, Ipv4(0x0a000002, next++, 17));
            clock.Tick();
        }
        var alarm = Assert.Single(alarms);
        Assert.Equal(("destinations", TrafficDirection.Out), (alarm.Rule, alarm.Direction));
    }

    [Fact]
    public void IcmpIsCountedAndGarbageIsOnlyAPacket()
    {
        var (m, clock, alarms) = Make(new DosRules { IcmpPerSecond = 100, PacketsPerSecond = 100_000 });
        var rng = new Random(12);
        for (int slot = 0; slot < TrafficMonitor.Slots; slot++)
        {
            for (int i = 0; i < 20; i++)
                m.Observe(TrafficDirection.In, Ipv4(0x0a000001, 0x0a000002, 1));
            // Frames of every length and content: counted, never thrown on.
            for (int i = 0; i < 200; i++)
            {
                var junk = new byte[rng.Next(0, 80)];
                rng.NextBytes(junk);
                if (junk.Length > 13 && rng.Next(2) == 0)
                    BinaryPrimitives.WriteUInt16BigEndian(junk.AsSpan(12), rng.Next(2) == 0 ? (ushort)0x0800 : (ushort)0x86dd);
                m.Observe(TrafficDirection.In, junk);
            }
            clock.Tick();
        }
        var alarm = Assert.Single(alarms, a => a.Rule == "icmp");
        Assert.InRange(alarm.Rate, 200, 1e6);
    }

    [Theory]
    [InlineData(0L, "threshold 0 must be positive")]
    [InlineData(-5L, "threshold -5 must be positive")]
    public void BadRulesAreRefused(long threshold, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => new TrafficMonitor(new DosRules { UdpPerSecond = threshold }, startTimer: false));
        Assert.Contains(message, e.Message);
        Assert.Throws<ArgumentException>(() => new DosRules { Window = TimeSpan.FromMilliseconds(10) }.Validate());
    }
}
