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
/// Denial-of-service detection on two Linux guests behind one bridge: a SYN flood from the peer at
/// the first (whose NIC has dos=suspend) pauses it through its control (VmControl, as kvm-vmm runs
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

    [SkippableFact]
    public void ASynFloodAtOneVmSuspendsItWhileAnotherVmsTransferGoesOn()
    {
        LinuxNetGuest.Files();
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        const long bytes = 24 << 20;
        var served = peer.ServeBytes(5000, bytes);

        // The victim waits for a connection that never comes (tcpserve); its NIC suspends the VM
        // at 200 half-open handshakes per second sustained for a second.
        var victimNic = new NicSpec
        {
            Uplinks = [new UplinkSpec { Tap = net.Prefix + "tv", Bridge = bridge }],
            Dos = new DosRules { HalfOpenPerSecond = 200, Window = TimeSpan.FromSeconds(1), Action = DosAction.Suspend },
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
        var flood = peer.Run(TimeSpan.FromMinutes(3), net.Python, "-c", SynFlood, Victim, "7000", "1000", "12");
        Assert.True(flood.ExitCode == 0, flood.Stdout + flood.Stderr);
        Assert.True(SpinWait.SpinUntil(() => control.State == "paused", TimeSpan.FromSeconds(60)),
            $"the victim is {control.State} after the flood ({flood.Stdout.Trim()}); alarms: {string.Join("; ", alarms.Select(a => a.Alarm.Describe()))}");
        var status = control.Status();
        output.WriteLine($"{flood.Stdout.Trim()}; {status.PausedBy}");
        Assert.StartsWith("virtio-net0: denial-of-service rule half-open in at ", status.PausedBy);
        lock (alarms)
            Assert.Contains(alarms, a => a.Nic == "virtio-net0" && a.Alarm.Rule == "half-open" && a.Alarm.Direction == TrafficDirection.In && !a.Alarm.Cleared);
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
}
