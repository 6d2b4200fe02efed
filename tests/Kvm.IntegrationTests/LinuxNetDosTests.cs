using System.Globalization;
using Kvm.Control;
using Kvm.Network;
using Kvm.Rpc;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit.Abstractions;

namespace Kvm.IntegrationTests;

/// <summary>
/// Denial-of-service detection on two Linux guests behind one bridge: a SYN flood, and separately
/// a UDP flood, from the peer at the first (whose NIC has dos=suspend) pauses it through its control (VmControl, as kvm-vmm runs
/// it), naming the rule and the figures, while the second guest's transfer from the same peer
/// goes on to the end; an operator's resume lets the first go on.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class LinuxNetDosTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(600);
    private const string Peer = "10.77.5.1", Victim = "10.77.5.2", Bystander = "10.77.5.3";

    // SYNs to ADDR:PORT at about RATE per second for SECONDS from random spoofed sources in
    // 198.18.0.0/15 (IP_HDRINCL: the script writes the IP header), as a real SYN flood comes: the
    // victim's SYN-ACKs go to its gateway, the peer, which drops them, so no RST completes the
    // handshakes (a flood from the peer's own address would be reset by its kernel). Prints "sent N".
    private const string SynFlood = """
        import random, socket, struct, sys, time
        dst, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        def csum(b):
            if len(b) % 2: b += b"\0"
            t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
            return ~t & 0xffff
        n = 0; start = time.monotonic()
        while time.monotonic() - start < seconds:
            src = socket.inet_aton("198.%d.%d.%d" % (18 + random.getrandbits(1), random.getrandbits(8), random.randint(1, 254)))
            tcp = struct.pack("!HHIIBBHHH", random.randint(1024, 65535), port, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
            pseudo = src + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
            tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64, 6, 0, src, socket.inet_aton(dst))
            ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
            s.sendto(ip + tcp, (dst, 0)); n += 1
            ahead = n / rate - (time.monotonic() - start)
            if ahead > 0: time.sleep(ahead)
        print("sent", n, flush=True)
        """;

    // UDP datagrams of 64 bytes to ADDR:PORT (closed on the victim) at about RATE per second for
    // SECONDS. Prints "sent N".
    private const string UdpFlood = """
        import socket, sys, time
        dst, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        payload = b"x" * 64
        n = 0; start = time.monotonic()
        while time.monotonic() - start < seconds:
            try: s.sendto(payload, (dst, port))
            except OSError: pass
            n += 1
            ahead = n / rate - (time.monotonic() - start)
            if ahead > 0: time.sleep(ahead)
        print("sent", n, flush=True)
        """;

    [SkippableTheory]
    [InlineData("half-open")]
    [InlineData("udp")]
    public void AFloodAtOneVmSuspendsItWhileAnotherVmsTransferGoesOn(string rule)
    {
        LinuxNetGuest.Files();
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        const long bytes = 24 << 20;
        var served = peer.ServeBytes(5000, bytes);

        // The victim waits for a connection that never comes (tcpserve); its NIC suspends the VM
        // at 200 half-open handshakes, or 500 UDP datagrams, per second sustained for a second.
        var victimNic = new NicSpec
        {
            Uplinks = [new UplinkSpec { Tap = net.Prefix + "tv", Bridge = bridge }],
            Dos = rule == "udp"
                ? new DosRules { UdpPerSecond = 500, Window = TimeSpan.FromSeconds(1), Action = DosAction.Suspend }
                : new DosRules { HalfOpenPerSecond = 200, Window = TimeSpan.FromSeconds(1), Action = DosAction.Suspend },
        };
        var bystanderNic = new NicSpec { Uplinks = [new UplinkSpec { Tap = net.Prefix + "tb", Bridge = bridge }] };
        var victimSerial = new SerialCapture();
        var bystanderSerial = new SerialCapture();
        using var victim = VirtualMachine.Create(LinuxNetGuest.Spec(Victim, Peer, $"ping:{Peer},tcpserve:7000:1", victimNic), victimSerial.Write);
        using var bystander = VirtualMachine.Create(LinuxNetGuest.Spec(Bystander, Peer, $"ping:{Peer},tcpget:{Peer}:5000:{bytes}", bystanderNic), bystanderSerial.Write);
        using var control = new VmControl(victim);
        control.Register(new RpcDispatcher(NullLogger.Instance));
        var alarms = new List<(string Nic, DosAlarm Alarm)>();
        victim.TrafficAlarm += (n, a) => { lock (alarms) alarms.Add((n, a)); };
        using var cancel = new CancellationTokenSource(Timeout);
        var victimRun = Task.Run(() => victim.Run(cancel.Token));
        var bystanderRun = Task.Run(() => bystander.Run(cancel.Token));

        Assert.True(SpinWait.SpinUntil(() => victimSerial.Text.Contains("tcpserve listening 7000", StringComparison.Ordinal), Timeout),
            "the victim did not listen; console:\n" + victimSerial.Text);
        var flood = rule == "udp"
            ? peer.Run(TimeSpan.FromMinutes(3), net.Python, "-c", UdpFlood, Victim, "9999", "1500", "12")
            : peer.Run(TimeSpan.FromMinutes(3), net.Python, "-c", SynFlood, Victim, "7000", "1000", "12");
        Assert.True(flood.ExitCode == 0, flood.Stdout + flood.Stderr);
        Assert.True(SpinWait.SpinUntil(() => control.State == "paused", TimeSpan.FromSeconds(60)),
            $"the victim is {control.State} after the flood ({flood.Stdout.Trim()}); alarms: {string.Join("; ", alarms.Select(a => a.Alarm.Describe()))}");
        var status = control.Status();
        output.WriteLine($"{flood.Stdout.Trim()}; {status.PausedBy}");
        Assert.StartsWith($"virtio-net0: denial-of-service rule {rule} in at ", status.PausedBy);
        lock (alarms)
            Assert.Contains(alarms, a => a.Nic == "virtio-net0" && a.Alarm.Rule == rule && a.Alarm.Direction == TrafficDirection.In && !a.Alarm.Cleared);
        Assert.All(victim.Vcpus, t => Assert.Equal("Paused", t.State.ToString()));

        // The bystander's transfer ends whole while the victim stays paused.
        var reason = bystanderRun.WaitAsync(Timeout).GetAwaiter().GetResult();
        string console = bystanderSerial.Text.Replace("\r", "");
        Assert.True(reason == new DebugExitStop(0), $"the bystander's verdict: {reason.Describe()}; console:\n{console}");
        Assert.Contains($"kvm-guest: tcpget {bytes} {served.Sha256}\n", console);
        Assert.Equal("paused", control.State);

        // The operator resumes it: it runs again.
        Assert.Equal("running", control.Resume().State);
        Assert.Null(control.Status().PausedBy);
        victim.RequestStop(new HostStop("test over"));
        victimRun.WaitAsync(Timeout).GetAwaiter().GetResult();
    }

    [SkippableFact]
    public void AVmFloodingOutwardIsSuspendedAndGoesOnWhenResumed()
    {
        LinuxNetGuest.Files();
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        net.AddPeer(bridge, Peer + "/24");
        var nic = new NicSpec
        {
            Uplinks = [new UplinkSpec { Tap = net.Prefix + "tf", Bridge = bridge }],
            Dos = new DosRules { UdpPerSecond = 500, Window = TimeSpan.FromSeconds(1), Action = DosAction.Suspend },
        };
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(LinuxNetGuest.Spec(Victim, Peer, $"udpflood:{Peer}:9999:6:3000", nic), serial.Write);
        using var control = new VmControl(vm);
        control.Register(new RpcDispatcher(NullLogger.Instance));
        using var cancel = new CancellationTokenSource(Timeout);
        var run = Task.Run(() => vm.Run(cancel.Token));

        Assert.True(SpinWait.SpinUntil(() => control.State == "paused" || run.IsCompleted, Timeout),
            $"the VM is {control.State}; console:\n{serial.Text}");
        string? pausedBy = control.Status().PausedBy;
        output.WriteLine(pausedBy);
        Assert.StartsWith("virtio-net0: denial-of-service rule udp out at ", pausedBy);
        Assert.DoesNotContain("udpflood kvm-flood: sent", serial.Text);      // stopped mid-flood

        Assert.Equal("running", control.Resume().State);
        // The rule clears while the VM stands still and may fire again as the flood goes on: the
        // operator (the test) resumes it each time.
        var deadline = DateTime.UtcNow + Timeout;
        while (!run.IsCompleted && DateTime.UtcNow < deadline)
        {
            if (control.State == "paused")
                control.Resume();
            Thread.Sleep(200);
        }
        var reason = run.WaitAsync(TimeSpan.FromSeconds(10)).GetAwaiter().GetResult();
        Assert.True(reason == new DebugExitStop(0), $"verdict {reason.Describe()}; console:\n{serial.Text}");
        Assert.Contains("kvm-guest: udpflood kvm-flood: sent ", serial.Text);
    }

    /// <summary>
    /// With dos=limit a VM flooding outward keeps running: once the UDP rule fires, what reaches
    /// the peer is held to the limit (the excess dropped, counted in the NIC's stats), the rule
    /// stays firing for as long as the flood goes on (the monitor judges what the guest offers,
    /// not what the limit lets out), and the guest's flood runs to its end.
    /// </summary>
    [SkippableFact]
    public void AVmFloodingOutwardUnderDosLimitIsHeldToTheLimitAndKeepsRunning()
    {
        LinuxNetGuest.Files();
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        const long limit = 2_000_000;
        // A window of 3 s: the guest's flood (kvm-flood keeps its average rate, so it bursts after
        // a stall) may stand still for a second in the nested host, and a rule clears after a
        // whole window below half its threshold; the rule fires within half a window or so.
        const int size = 1200, rate = 3000, seconds = 16;
        var settle = TimeSpan.FromSeconds(6);
        var sink = peer.CountDatagrams(9999, settle);
        var nic = new NicSpec
        {
            Uplinks = [new UplinkSpec { Tap = net.Prefix + "tl", Bridge = bridge }],
            Dos = new DosRules { UdpPerSecond = 500, Window = TimeSpan.FromSeconds(3), Action = DosAction.Limit, LimitTo = limit },
        };
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(LinuxNetGuest.Spec(Victim, Peer, $"udpflood:{Peer}:9999:{seconds}:{rate}:{size}", nic), serial.Write);
        using var control = new VmControl(vm);
        control.Register(new RpcDispatcher(NullLogger.Instance));
        var alarms = new List<DosAlarm>();
        vm.TrafficAlarm += (_, a) => { lock (alarms) alarms.Add(a); };
        using var cancel = new CancellationTokenSource(Timeout);
        var run = Task.Run(() => vm.Run(cancel.Token));
        bool everPaused = false;
        while (!run.IsCompleted)
        {
            everPaused |= control.State == "paused";
            Thread.Sleep(50);
        }
        var reason = run.WaitAsync(TimeSpan.FromSeconds(10)).GetAwaiter().GetResult();
        var nicStats = Assert.Single(control.Stats().Nics!);
        var (total, late, span) = sink.WaitAsync(TimeSpan.FromMinutes(2)).GetAwaiter().GetResult();
        double lateRate = span > 0 ? late * 8 / span : 0;
        string figures = $"peer got {total} bytes, {late} in the last {span:0.00} s ({lateRate / 1e6:0.00} Mbit/s of payload); " +
                         $"VM sent {nicStats.TxPackets} frames, {nicStats.TxDosLimited} dropped over the limit; alarms: " +
                         string.Join("; ", alarms.Select(a => a.Describe())) + "; " +
                         serial.Text.Split('\n').FirstOrDefault(l => l.Contains("udpflood kvm-flood", StringComparison.Ordinal))?.Trim();
        output.WriteLine(figures);
        Assert.True(reason == new DebugExitStop(0), $"verdict {reason.Describe()}; {figures}; console:\n{serial.Text}");
        Assert.Contains("kvm-guest: udpflood kvm-flood: sent ", serial.Text);
        Assert.False(everPaused, "dos=limit paused the VM");
        lock (alarms)
        {
            // One firing of the rule for the whole flood (it may clear once the flood is over).
            Assert.Single(alarms, a => a.Rule == "udp" && a.Direction == TrafficDirection.Out && !a.Cleared);
            Assert.DoesNotContain(alarms, a => a.Direction == TrafficDirection.In);
        }
        Assert.True(nicStats.TxDosLimited > 0, figures);
        // Held to the limit: payload is 1200 of each frame's 1242 bytes; the bucket's burst (64 KiB)
        // spread over the span is the only allowance above it. The flood goes on through the limit.
        Assert.True(span >= 5, $"the flood reached the peer for too short a time to judge: {figures}");
        double ceiling = limit * 1.05 + VirtioNetHeader.MaxPacket * 8 / span;
        Assert.True(lateRate <= ceiling, $"above the {limit / 1e6} Mbit/s limit: {figures}");
        Assert.True(lateRate >= limit * 0.5, $"the limit let almost nothing through: {figures}");
    }
}
