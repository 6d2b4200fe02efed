using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// virtio-net benchmark (issue 12): TCP throughput each way (iperf3) and TCP request/response
/// latency (kvm-rr, native/linux/kvm-rr.c) between a Linux guest and a peer, under `vmctl run --net`
/// against QEMU q35 with virtio-net-pci on a tap, without vhost and (where /dev/vhost-net exists or
/// `modprobe vhost_net` makes it) with vhost-net. Same kernel (Debian's bzImage), initramfs,
/// command line, vCPUs, memory, MAC and topology for every VMM: the peer is a network namespace
/// behind a bridge (a veth pair), running `iperf3 -s` and `kvm-rr server`; each VM's tap is a port
/// of that bridge. The guest's init runs the checks iperf (guest sends), iperf reverse (guest
/// receives) and rr, and prints their figures. The VMMs alternate, run after run; each row prints the
/// median of the runs and the ratios ours/QEMU. The 'failover' part (NetBenchmark.Failover.cs)
/// measures the gap in a stream when an uplink fails, our NIC team against Linux bonding. Needs
/// root (bridges, namespaces, taps).
/// </summary>
internal static partial class NetBenchmark
{
    private const string Usage =
        "Usage: Kvm.Benchmarks net [--parts traffic,failover] [--runs N] [--time SECONDS] [--count N] [--size BYTES] [--vmms L]\n" +
        "                          [--stream MIB] [--cut MIB] [--limit S]\n" +
        "  --parts L        what to measure (default both): 'traffic', TCP throughput each way and request/response latency,\n" +
        "                   vmctl run against QEMU; 'failover', the longest silence in a TCP stream from the guest when the\n" +
        "                   active uplink's link goes down, vmctl run's NIC team (active-backup over two taps) against QEMU\n" +
        "                   on a Linux bond (active-backup, miimon 100) over the same two paths\n" +
        "  --runs N         runs of each VMM in each part, alternating (default 3)\n" +
        "  --time SECONDS   traffic: iperf3's time each way (default 10)\n" +
        "  --count N        traffic: timed request/response round trips (default 2000; 100 untimed ones first)\n" +
        "  --size BYTES     traffic: bytes each way per round trip (default 1)\n" +
        "  --vmms L         traffic: of vmctl,qemu,qemu-vhost (default all three; qemu-vhost only where /dev/vhost-net is)\n" +
        "  --stream MIB     failover: MiB the guest sends in its stream (default 128, at most 256: the guest holds it in its RAM)\n" +
        "  --cut MIB        failover: MiB the peer has received when the link goes down (default 4)\n" +
        "  --limit S        seconds a VM may take from start to its verdict before it is stopped (default 600)";

    private static readonly string[] AllParts = ["traffic", "failover"];

    private const string PeerAddress = "10.77.9.1", GuestAddress = "10.77.9.2";
    private const int IperfPort = 5201, RrPort = 5202;
    // One MAC for every VMM: the peer's neighbour entry stays right from one VM to the next.
    private const string Mac = "52:54:00:6b:76:01";
    private const int Cpus = 2;
    private const string Memory = "512M";

    /// <summary>One VMM: its name, and how to start it on a tap with a kernel command line.</summary>
    private sealed record Side(string Name, string Key, Func<string, string, string[]> Args, string File, bool NeedsTap);

    /// <summary>One run's figures: Mbit/s each way, the sender's retransmits, and RR microseconds.</summary>
    private sealed record Figures(double SendMbits, double ReceiveMbits, int? SendRetr, int? ReceiveRetr, double RrMean, double RrP50, double RrP99);

    public static int Run(string[] args)
    {
        int runs = 3, seconds = 10, count = 2000, size = 1, limit = 600, streamMib = 128, cutMib = 4;
        string[] vmms = ["vmctl", "qemu", "qemu-vhost"];
        string[] parts = AllParts;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--parts" when i + 1 < args.Length && args[i + 1].Split(',').All(AllParts.Contains):
                    parts = args[++i].Split(',');
                    break;
                case "--stream" when i + 1 < args.Length && int.TryParse(args[i + 1], out int m) && m is > 0 and <= 256:
                    streamMib = m;
                    i++;
                    break;
                case "--cut" when i + 1 < args.Length && int.TryParse(args[i + 1], out int cut) && cut > 0:
                    cutMib = cut;
                    i++;
                    break;
                case "--runs" when i + 1 < args.Length && int.TryParse(args[i + 1], out int n) && n > 0:
                    runs = n;
                    i++;
                    break;
                case "--time" when i + 1 < args.Length && int.TryParse(args[i + 1], out int t) && t > 0:
                    seconds = t;
                    i++;
                    break;
                case "--count" when i + 1 < args.Length && int.TryParse(args[i + 1], out int c) && c > 0:
                    count = c;
                    i++;
                    break;
                case "--size" when i + 1 < args.Length && int.TryParse(args[i + 1], out int b) && b is > 0 and <= 65536:
                    size = b;
                    i++;
                    break;
                case "--limit" when i + 1 < args.Length && int.TryParse(args[i + 1], out int l) && l > 0:
                    limit = l;
                    i++;
                    break;
                case "--vmms" when i + 1 < args.Length && args[i + 1].Split(',').All(v => v is "vmctl" or "qemu" or "qemu-vhost"):
                    vmms = args[++i].Split(',');
                    break;
                case "--help" or "-h":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    return Prerequisites.UnknownArgument(args[i], Usage);
            }
        }

        if (cutMib >= streamMib)
        {
            Console.Error.WriteLine($"benchmark: net: --cut {cutMib} must be below --stream {streamMib} (the link goes down while the stream runs)");
            return 2;
        }

        string linux = Path.Combine(TestEnvironment.BuildDir, "linux");
        string bzImage = Path.Combine(linux, "bzImage"), initrd = Path.Combine(linux, "initramfs.cpio.gz");
        string rr = Path.Combine(linux, "kvm-rr");
        var files = new List<(string, string)> { (bzImage, "Debian's bzImage"), (initrd, "the test initramfs") };
        var programs = new List<(string, string)> { Prerequisites.Qemu, ("ip", "iproute2") };
        if (parts.Contains("traffic"))
        {
            files.Add((rr, "kvm-rr"));
            programs.Add(("iperf3", "iperf3"));
        }
        if (parts.Contains("failover"))
            programs.Add(("python3", "python3"));
        if (!Prerequisites.Check(files, [], buildHint: "make linux")
            || !Prerequisites.Check([Prerequisites.Vmctl], programs)
            || !Place.CheckKvm())
            return 1;
        if (!Environment.IsPrivilegedProcess)
        {
            Console.Error.WriteLine("benchmark: net needs root (bridges, network namespaces, taps and, for failover, a bond)");
            return 1;
        }
        var guest = new GuestFiles(bzImage, initrd, TestEnvironment.FindOnPath("qemu-system-x86_64")!);
        int status = 0;
        if (parts.Contains("traffic"))
            status |= MeasureTraffic(guest, rr, vmms, runs, seconds, count, size, limit);
        if (parts.Contains("failover"))
        {
            if (parts.Contains("traffic"))
                Console.WriteLine();
            status |= MeasureFailover(guest, runs, (long)streamMib << 20, (long)cutMib << 20, limit);
        }
        return status;
    }

    /// <summary>What every part boots: Debian's kernel, the test initramfs, and the QEMU to compare with.</summary>
    private sealed record GuestFiles(string Kernel, string Initrd, string Qemu);

    /// <summary>QEMU's arguments for the guest on <paramref name="tap"/> (q35, virtio-net-pci) with <paramref name="cmdline"/>; <paramref name="vhost"/> "on" or "off".</summary>
    private static string[] QemuArgs(GuestFiles guest, string cmdline, string tap, string vhost) =>
    [
        "-M", "q35", "-accel", "kvm", "-cpu", "host", "-smp", $"{Cpus}", "-m", Memory,
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", guest.Kernel, "-initrd", guest.Initrd, "-append", cmdline,
        "-netdev", $"tap,id=n0,ifname={tap},script=no,downscript=no,vhost={vhost}",
        "-device", $"virtio-net-pci,netdev=n0,mac={Mac},disable-legacy=on",
    ];

    /// <summary>vmctl run's arguments for the guest with <paramref name="cmdline"/> and the NIC <paramref name="net"/> (--net's value).</summary>
    private static string[] VmctlArgs(GuestFiles guest, string cmdline, string net) =>
        ["run", "--kernel", guest.Kernel, "--initrd", guest.Initrd, "--cpus", $"{Cpus}", "--memory", Memory, "--cmdline", cmdline,
         "--debug-exit", "--net", net];

    /// <summary>The traffic part: throughput each way and request/response latency, the VMMs alternating; 0 when every run worked.</summary>
    private static int MeasureTraffic(GuestFiles guest, string rr, string[] vmms, int runs, int seconds, int count, int size, int limit)
    {
        string qemu = guest.Qemu;
        string? vhostMissing = vmms.Contains("qemu-vhost") ? VhostMissing() : null;

        string cmdline = $"console=ttyS0 quiet panic=-1 ip={GuestAddress}::{PeerAddress}:255.255.255.0::eth0:off " +
                         $"kvmtest=iperf:{PeerAddress}:{seconds},iperf:{PeerAddress}:{seconds}:reverse,rr:{PeerAddress}:{RrPort}:{count}:{size}";
        var sides = new List<Side>();
        if (vmms.Contains("vmctl"))
        {
            sides.Add(new Side("vmctl run", "vmctl", (tap, bridge) => VmctlArgs(guest, cmdline, $"tap={tap}@{bridge},mac={Mac}"),
                TestEnvironment.Vmctl, NeedsTap: false));
        }
        if (vmms.Contains("qemu"))
            sides.Add(new Side("qemu vhost=off", "qemu", (tap, _) => QemuArgs(guest, cmdline, tap, "off"), qemu, NeedsTap: true));
        if (vmms.Contains("qemu-vhost") && vhostMissing is null)
            sides.Add(new Side("qemu vhost=on", "qemu-vhost", (tap, _) => QemuArgs(guest, cmdline, tap, "on"), qemu, NeedsTap: true));

        using var net = new Topology();
        var results = sides.ToDictionary(s => s.Key, _ => new List<Figures>());
        var failures = new List<string>();
        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var total = Stopwatch.StartNew();
        try
        {
            net.Build(PeerAddress + "/24");
            net.StartServer(["iperf3", "-s", "-p", $"{IperfPort}", "--forceflush"], "Server listening");
            net.StartServer([rr, "server", $"{RrPort}"], "kvm-rr: listening");
            // Programs and files into the page cache before the first timed run.
            TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["run", "--help"], TimeSpan.FromSeconds(60));
            TestEnvironment.RunProcess(qemu, ["--version"], TimeSpan.FromSeconds(60));

            for (int r = 0; r < runs; r++)
            {
                foreach (var side in sides)
                {
                    // A VMM that failed once is not run again; the others go on.
                    if (failures.Any(f => f.StartsWith(side.Name + ":", StringComparison.Ordinal)))
                        continue;
                    try
                    {
                        var f = RunOne(side, net, limit);
                        results[side.Key].Add(f);
                        Console.Error.WriteLine($"run {r + 1}/{runs}: {side.Name}: send {f.SendMbits:0} Mbit/s, receive {f.ReceiveMbits:0} Mbit/s, " +
                                                $"rr mean {f.RrMean:0} us p50 {f.RrP50:0} us p99 {f.RrP99:0} us");
                    }
                    catch (RunFailure e)
                    {
                        failures.Add($"{side.Name}: {e.Message}");
                        Console.Error.WriteLine($"run {r + 1}/{runs}: {side.Name}: failed (below)");
                    }
                }
            }
        }
        catch (RunFailure e)
        {
            // The topology or a peer server: nothing to measure without them.
            Console.Error.WriteLine($"benchmark: net: {e.Message}");
            return 1;
        }

        Console.WriteLine($"virtio-net, a Linux guest and a peer namespace over a bridge: vmctl run against QEMU q35 virtio-net-pci " +
                          $"({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm}, {FirstLine(TestEnvironment.RunProcess(qemu, ["--version"], TimeSpan.FromSeconds(60)).Stdout)})");
        Console.WriteLine($"guest: Debian's cloud kernel (bzImage) with the test initramfs, {Cpus} vCPUs, {Memory}iB, one queue pair, offloads on " +
                          $"(each VMM's defaults), the same MAC; its tap a port of the bridge, the peer a veth behind it.");
        Console.WriteLine($"send: guest to peer, receive: peer to guest, iperf3 3.12 (client in the guest, server in the peer), one TCP stream, " +
                          $"{seconds} s each, the receiver's rate; rr: kvm-rr, {count} round trips of {size} byte(s) each way over one TCP " +
                          $"connection (TCP_NODELAY) after 100 untimed; median of {runs} runs, the VMMs alternating.");
        Console.WriteLine($"{"",-18}{"send Gbit/s",13}{"retr",7}{"recv Gbit/s",13}{"retr",7}{"rr mean us",12}{"rr p50 us",11}{"rr p99 us",11}");
        foreach (var side in sides)
        {
            var v = results[side.Key];
            if (v.Count == 0)
            {
                Console.WriteLine($"{side.Name,-18}{"failed",13}");
                continue;
            }
            Console.WriteLine($"{side.Name,-18}{Median(v, f => f.SendMbits) / 1000,13:0.000}{RetrMedian(v, f => f.SendRetr),7}" +
                              $"{Median(v, f => f.ReceiveMbits) / 1000,13:0.000}{RetrMedian(v, f => f.ReceiveRetr),7}" +
                              $"{Median(v, f => f.RrMean),12:0}{Median(v, f => f.RrP50),11:0}{Median(v, f => f.RrP99),11:0}");
        }
        if (vmms.Contains("qemu-vhost") && vhostMissing is not null)
            Console.WriteLine($"{"qemu vhost=on",-18}not measured: {vhostMissing}");
        if (results.TryGetValue("vmctl", out var ours) && ours.Count > 0)
        {
            foreach (var peer in sides.Where(s => s.Key != "vmctl" && results[s.Key].Count > 0))
            {
                var theirs = results[peer.Key];
                Console.WriteLine($"ratio vmctl/{peer.Name} (medians): send {Median(ours, f => f.SendMbits) / Median(theirs, f => f.SendMbits):0.00}, " +
                                  $"receive {Median(ours, f => f.ReceiveMbits) / Median(theirs, f => f.ReceiveMbits):0.00} (above 1: ours moves more); " +
                                  $"rr mean {Median(ours, f => f.RrMean) / Median(theirs, f => f.RrMean):0.00}, " +
                                  $"p50 {Median(ours, f => f.RrP50) / Median(theirs, f => f.RrP50):0.00}, " +
                                  $"p99 {Median(ours, f => f.RrP99) / Median(theirs, f => f.RrP99):0.00} (below 1: ours answers sooner)");
            }
        }
        Console.WriteLine($"({total.Elapsed.TotalSeconds:0} s in all; load average {loadBefore} before, {LoadAverage()} after)");
        foreach (var f in failures)
            Console.Error.WriteLine($"benchmark: net: {f}");
        return failures.Count == 0 ? 0 : 1;
    }

    /// <summary>Null when QEMU can use vhost-net here (loading vhost_net if needed), else why not.</summary>
    private static string? VhostMissing()
    {
        if (File.Exists("/dev/vhost-net"))
            return null;
        if (TestEnvironment.FindOnPath("modprobe") is { } modprobe)
            TestEnvironment.RunProcess(modprobe, ["vhost_net"], TimeSpan.FromSeconds(30));
        return File.Exists("/dev/vhost-net") ? null : "no /dev/vhost-net, and 'modprobe vhost_net' did not make one";
    }

    /// <summary>Boots the guest under one VMM on a fresh tap, waits for its verdict and reads its figures.</summary>
    private static Figures RunOne(Side side, Topology net, int limitSeconds)
    {
        string tap = net.NewTap(side.NeedsTap);
        try
        {
            var args = side.Args(tap, net.Bridge);
            string output = Guest(side.File, args, limitSeconds).Console;
            var send = Iperf().Matches(output).FirstOrDefault(m => m.Groups["dir"].Value == "send");
            var receive = Iperf().Matches(output).FirstOrDefault(m => m.Groups["dir"].Value == "receive");
            var rr = Rr().Match(output);
            if (send is null || receive is null || !rr.Success)
                throw new RunFailure($"the guest printed no iperf send, iperf receive or rr line; its last lines:{Last(output, 30)}");
            return new Figures(D(send.Groups["mbits"]), D(receive.Groups["mbits"]), Retr(send), Retr(receive),
                D(rr.Groups["mean"]), D(rr.Groups["p50"]), D(rr.Groups["p99"]));
        }
        finally
        {
            net.DeleteTap(tap);
        }

        static double D(Group g) => double.Parse(g.Value, CultureInfo.InvariantCulture);
        static int? Retr(Match m) => int.TryParse(m.Groups["retr"].Value, out int r) ? r : null;
    }

    [GeneratedRegex(@"kvm-guest: iperf (?<dir>send|receive) (?<mbits>[0-9.]+) Mbit/s retr (?<retr>\S+)")]
    private static partial Regex Iperf();

    [GeneratedRegex(@"kvm-guest: rr count=\d+ size=\d+ mean_us=(?<mean>[0-9.]+) p50_us=(?<p50>[0-9.]+) p99_us=(?<p99>[0-9.]+)")]
    private static partial Regex Rr();

    /// <summary>What a VMM printed: the guest's console (its stdout) and its own stderr.</summary>
    private sealed record GuestRun(string Console, string Stderr);

    /// <summary>
    /// Runs a VMM to its end (stopping it after <paramref name="limitSeconds"/>) and returns its
    /// console and stderr; throws <see cref="RunFailure"/> unless the guest's init printed "verdict 0".
    /// The exit status is not the test: under QEMU in the nested host kvm-exit's port write faults
    /// (SIGSEGV) and init powers the VM off instead, so QEMU exits 0 rather than 1.
    /// <paramref name="started"/>, when given, gets the VMM's process as soon as it runs (to stop
    /// it early from another thread).
    /// </summary>
    private static GuestRun Guest(string file, string[] args, int limitSeconds, Action<Process>? started = null)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var x in args)
            psi.ArgumentList.Add(x);
        string command = $"{file} {string.Join(' ', args.Select(a => a.Contains(' ') ? $"\"{a}\"" : a))}";
        var sw = Stopwatch.StartNew();
        using var p = Process.Start(psi) ?? throw new RunFailure($"cannot start {command}");
        started?.Invoke(p);
        p.StandardInput.Close();
        var err = p.StandardError.ReadToEndAsync();
        var output = p.StandardOutput.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(limitSeconds)))
        {
            Prerequisites.EndAndDrain(p, Task.WhenAll(output, err));
            throw new RunFailure($"did not end within {limitSeconds} s and was stopped\n  command: {command}" +
                                 $"\n  the guest's lines:{GuestLines(output.Result)}\n  last stderr lines:{Last(err.Result)}");
        }
        p.WaitForExit();
        if (!output.Result.Contains("kvm-guest: verdict 0", StringComparison.Ordinal))
        {
            throw new RunFailure($"exited with status {p.ExitCode} after {sw.Elapsed.TotalSeconds:0.0} s without the guest's 'verdict 0'" +
                                 $"\n  command: {command}\n  the guest's lines:{GuestLines(output.Result)}\n  last stderr lines:{Last(err.Result)}");
        }
        return new GuestRun(output.Result, err.Result);
    }

    /// <summary>What init printed (its own lines, and the last of the kernel's log it adds after a failure).</summary>
    private static string GuestLines(string console)
    {
        var lines = console.Split('\n').Select(l => l.TrimEnd('\r')).Where(l => l.StartsWith("kvm-guest: ", StringComparison.Ordinal)).ToList();
        var own = lines.Where(l => !l.StartsWith("kvm-guest: dmesg: ", StringComparison.Ordinal));
        var dmesg = lines.Where(l => l.StartsWith("kvm-guest: dmesg: ", StringComparison.Ordinal)).TakeLast(8);
        return Last(string.Join('\n', own.Concat(dmesg)), 60);
    }

    private static double Median(List<Figures> v, Func<Figures, double> pick) => DiskBenchmark.Median(v.Select(pick).ToList());

    private static string RetrMedian(List<Figures> v, Func<Figures, int?> pick)
    {
        var r = v.Select(pick).Where(x => x is not null).Select(x => (double)x!.Value).ToList();
        return r.Count == 0 ? "-" : $"{DiskBenchmark.Median(r):0}";
    }

    private static string FirstLine(string text) => text.Split('\n')[0].Trim();

    private static string Last(string text, int lines = 10)
    {
        var l = text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(x => x.TrimEnd('\r')).TakeLast(lines).ToArray();
        return l.Length == 0 ? " (none)" : string.Concat(l.Select(x => "\n    " + x));
    }

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));

    /// <summary>
    /// The benchmark's network, made with iproute2: a bridge (STP off), a peer namespace joined to
    /// it by a veth pair, the servers running in the namespace, and the VMs' taps; for the failover
    /// part, more bridges and the trunks between them. Names begin with "kn", the part's letter
    /// (<paramref name="part"/>: "b" for traffic, "f" for failover) and this process's id, so that
    /// two benchmarks, or two parts, do not collide. Dispose removes it all.
    /// </summary>
    private sealed class Topology(char part = 'b') : IDisposable
    {
        private readonly string _prefix = $"kn{part}{Environment.ProcessId}";
        private readonly List<Process> _servers = [];
        private readonly List<string> _links = [];
        private int _taps;
        private bool _built;

        /// <summary>The beginning of every name this topology gives (at most 10 characters of the kernel's 15).</summary>
        public string Prefix => _prefix;

        /// <summary>The peer's bridge.</summary>
        public string Bridge => _prefix + "b";
        private string Namespace => _prefix + "n";
        private string HostEnd => _prefix + "h";
        private string PeerEnd => _prefix + "p";

        public void Build(string cidr)
        {
            _built = true;
            Ip("link", "add", Bridge, "type", "bridge", "stp_state", "0");
            Ip("link", "set", Bridge, "up");
            Ip("netns", "add", Namespace);
            Ip("link", "add", HostEnd, "type", "veth", "peer", "name", PeerEnd, "netns", Namespace);
            Ip("link", "set", HostEnd, "master", Bridge);
            Ip("link", "set", HostEnd, "up");
            Ip("-n", Namespace, "addr", "add", cidr, "dev", PeerEnd);
            Ip("-n", Namespace, "link", "set", PeerEnd, "up");
            Ip("-n", Namespace, "link", "set", "lo", "up");
        }

        /// <summary>Starts <paramref name="command"/> in the namespace and waits for a line holding <paramref name="ready"/>.</summary>
        public void StartServer(string[] command, string ready)
        {
            var p = TestEnvironment.StartRedirected("ip", ["netns", "exec", Namespace, .. command]);
            _servers.Add(p);
            var line = Task.Run(() =>
            {
                string? l;
                while ((l = p.StandardOutput.ReadLine()) is not null)
                {
                    if (l.Contains(ready, StringComparison.Ordinal))
                        return true;
                }
                return false;
            });
            if (!line.Wait(TimeSpan.FromSeconds(30)) || !line.Result)
                throw new RunFailure($"{string.Join(' ', command)} in {Namespace} did not say '{ready}': {p.StandardError.ReadToEnd()}");
            // The rest of its output is read and dropped, so its pipe never fills.
            _ = Task.Run(() => p.StandardOutput.ReadToEnd());
            _ = Task.Run(() => p.StandardError.ReadToEnd());
        }

        /// <summary>
        /// Starts the <see cref="StreamReceiver"/> on <paramref name="port"/> in the namespace,
        /// reporting silences of <paramref name="silenceMs"/> or more, and returns it once it
        /// listens, its standard output open for its "got", "silence" and "done" lines.
        /// </summary>
        public Process StartReceiver(string python, int port, int silenceMs)
        {
            var p = TestEnvironment.StartRedirected("ip", StreamReceiver.IpArguments(Namespace, python, port, silenceMs));
            p.StandardInput.Close();
            _servers.Add(p);
            _ = Task.Run(() => p.StandardError.ReadToEnd());
            var first = p.StandardOutput.ReadLineAsync();
            // python3 starting in a loaded nested host can take seconds.
            if (!first.Wait(TimeSpan.FromSeconds(120)) || first.Result != "listening")
                throw new RunFailure($"the stream receiver on port {port} in {Namespace} did not start listening: {(first.IsCompleted ? first.Result : "(no line)")}");
            return p;
        }

        /// <summary>
        /// Another bridge (STP off, so its ports forward at once), up, named the prefix and
        /// <paramref name="suffix"/>; it goes on <see cref="Dispose"/> unless deleted before.
        /// </summary>
        public string AddBridge(string suffix)
        {
            string name = _prefix + suffix;
            _built = true;
            _links.Add(name);
            Ip("link", "add", name, "type", "bridge", "stp_state", "0");
            Ip("link", "set", name, "up");
            return name;
        }

        /// <summary>
        /// A veth pair named the prefix and <paramref name="a"/>, <paramref name="b"/>, left down
        /// for the caller to enslave and bring up; it goes on <see cref="Dispose"/> unless
        /// deleted before. Returns the two names.
        /// </summary>
        public (string A, string B) AddVeth(string a, string b)
        {
            string x = _prefix + a, y = _prefix + b;
            _built = true;
            _links.Add(x);
            Ip("link", "add", x, "type", "veth", "peer", "name", y);
            return (x, y);
        }

        /// <summary>Joins bridges <paramref name="a"/> and <paramref name="b"/> by a veth pair, up: two switches and the trunk between them.</summary>
        public void AddTrunk(string a, string b)
        {
            var (x, y) = AddVeth("ka", "kb");
            Ip("link", "set", x, "master", a, "up");
            Ip("link", "set", y, "master", b, "up");
        }

        /// <summary>
        /// A tap name; when <paramref name="make"/>, the tap itself too (QEMU attaches to an existing one),
        /// a port of <paramref name="bridge"/> (default the peer's) and up. vmctl makes its own from --net tap=NAME@BRIDGE.
        /// </summary>
        public string NewTap(bool make, string? bridge = null)
        {
            string tap = $"{_prefix}t{++_taps}";
            if (make)
            {
                Ip("tuntap", "add", tap, "mode", "tap");
                Ip("link", "set", tap, "master", bridge ?? Bridge);
                Ip("link", "set", tap, "up");
            }
            return tap;
        }

        public void DeleteTap(string tap) => Quietly("link", "delete", tap);

        /// <summary>
        /// Takes <paramref name="ifname"/> administratively down as `ip link set IFNAME down` does
        /// (SIOCSIFFLAGS, through the native shim), in this process, and returns the moments just
        /// before and after on CLOCK_MONOTONIC, in seconds: starting ip(8) from this process took
        /// 0.4-1.4 s in the nested host, too blurred a moment for a gap of tens of milliseconds.
        /// </summary>
        public static (double Before, double After) SetLinkDown(string ifname)
        {
            double before = StreamReceiver.Now();
            int rc = Kvm.Interop.Native.KvmShim.InterfaceSetUp(ifname, 0);
            double after = StreamReceiver.Now();
            if (rc < 0)
                throw new RunFailure($"cannot set {ifname} down (SIOCSIFFLAGS): {Kvm.Interop.Native.Errno.Describe(-rc)}");
            return (before, after);
        }

        /// <summary>Deletes the interface <paramref name="name"/> now, if it is there (a veth pair goes whole).</summary>
        public void Delete(string name)
        {
            _links.Remove(name);
            Quietly("link", "delete", name);
        }

        public void Dispose()
        {
            foreach (var p in _servers)
            {
                try
                {
                    p.Kill(entireProcessTree: true);
                    p.WaitForExit();
                }
                catch (InvalidOperationException)
                {
                }
                p.Dispose();
            }
            if (!_built)
                return;
            for (int i = _links.Count - 1; i >= 0; i--)
                Quietly("link", "delete", _links[i]);
            Quietly("netns", "delete", Namespace);
            Quietly("link", "delete", HostEnd);
            Quietly("link", "delete", Bridge);
        }

        /// <summary>Runs ip with <paramref name="args"/>; throws <see cref="RunFailure"/> with its output when it fails.</summary>
        public static void Ip(params string[] args)
        {
            var r = TestEnvironment.RunProcess("ip", args, TimeSpan.FromSeconds(60));
            if (r.ExitCode != 0)
                throw new RunFailure($"ip {string.Join(' ', args)} failed (exit {r.ExitCode}): {r.Stderr.Trim()}{r.Stdout.Trim()}");
        }

        /// <summary>Runs ip, ignoring a failure (the object is already gone).</summary>
        public static void Quietly(params string[] args)
        {
            try
            {
                TestEnvironment.RunProcess("ip", args, TimeSpan.FromSeconds(60));
            }
            catch (TimeoutException)
            {
            }
        }
    }

    /// <summary>One run of a VMM, or a piece of the topology, that did not work.</summary>
    private sealed class RunFailure(string message) : Exception(message);
}
