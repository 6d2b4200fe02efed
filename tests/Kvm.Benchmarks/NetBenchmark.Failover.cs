using System.Diagnostics;
using Kvm.Tests.Shared;

/// <summary>
/// The failover part of the network benchmark (issue 12): how long a TCP stream from the guest
/// stands still when the uplink carrying it loses its link, this VMM's NIC team against Linux
/// bonding in the same topology, run and place. Two bridges (switches, STP off) joined by a veth
/// trunk, the peer namespace on the first, so that either path reaches it (the topology of
/// LinuxNetTeamTests):
/// <list type="bullet">
/// <item>ours: <c>vmctl run --net tap=A@first,tap=B@second,policy=active-backup</c>; the VMM
/// teams the two taps and hears their link changes from the kernel (netlink). The cut is
/// what <c>ip link set A down</c> does, as in LinuxNetTeamTests' link-down case.</item>
/// <item>bonding: QEMU q35 with virtio-net-pci (vhost=off, as the traffic part's plain QEMU) on
/// one tap, a port of a third bridge whose other port is a Linux bond (mode active-backup,
/// miimon 100) of two veth pairs, one to each switch. The cut is what <c>ip link set A0 down</c> does on the
/// bond's active slave, the first link of path A as the tap is ours (its peer on the switch loses
/// its carrier with it); bonding does nothing on the slave's NETDEV_DOWN in active-backup, so its
/// MII monitor finds the link down within 100 ms.</item>
/// </list>
/// The guest (the same kernel, initramfs, command line and MAC for both) sends a stream of random
/// bytes with init's <c>tcpput</c> to the <see cref="StreamReceiver"/> in the peer's namespace,
/// the receiver the failover tests use, which reports every silence between two reads of 5 ms or
/// more with its start and end on CLOCK_MONOTONIC; the link goes down once the receiver has the
/// first MiBs. The failover's gap is the longest silence that ends after the benchmark began to
/// take the link down and begins no later than 250 ms after the link was down; the
/// longest silence elsewhere in the stream is printed beside it, as the noise floor of the place
/// (in the nested host, pauses of tens of milliseconds come without any failover, and a
/// failover shorter than them is hidden in the longest silence of the whole stream, the figure
/// the failover tests print). Each run checks that the bytes arrived whole and
/// that the traffic did move to path B (ours: the VMM's team-change warning; bonding: the bond's
/// active slave). The two alternate, run after run; the medians and their ratio are printed and
/// nothing is asserted.
/// </summary>
internal static partial class NetBenchmark
{
    private const string FailoverPeer = "10.77.10.1", FailoverGuest = "10.77.10.2";
    private const int StreamPort = 5203;
    private const int MiiMonMs = 100;

    /// <summary>The shortest silence the receiver reports; a failover gap below it shows as "&lt;5".</summary>
    private const int SilenceMs = 5;

    /// <summary>
    /// How long after the link was down a silence may begin and still be the failover's, in
    /// seconds: what was already past the cut still arrives first, and in the nested host the
    /// receiver itself may be scheduled late.
    /// </summary>
    private const double CutWindow = 0.25;

    /// <summary>
    /// One run's figures, in milliseconds: the failover's gap (0 when no silence of
    /// <see cref="SilenceMs"/> came at the cut), the longest silence elsewhere in the stream (0:
    /// none), how long taking the link down took from its start to its end; then the bytes the
    /// peer had when the link went down, the stream's rate past its first MiB (the silences
    /// included) and what showed that the traffic moved.
    /// </summary>
    private sealed record Gap(double CutMs, double ElsewhereMs, double DownMs, long CutBytes, double Mbits, string Moved);

    /// <summary>The failover part: the gap of our team and of a Linux bond, alternating; 0 when every run worked.</summary>
    private static int MeasureFailover(GuestFiles guest, int runs, long streamBytes, long cutBytes, int limit)
    {
        string python = TestEnvironment.FindOnPath("python3")!;
        string cmdline = $"console=ttyS0 quiet panic=-1 ip={FailoverGuest}::{FailoverPeer}:255.255.255.0::eth0:off " +
                         $"kvmtest=ping:{FailoverPeer},tcpput:{FailoverPeer}:{StreamPort}:{streamBytes}";
        (string Key, string Name)[] sides = [("team", "vmctl run, team"), ("bond", "qemu on a bond")];
        var results = sides.ToDictionary(s => s.Key, _ => new List<Gap>());
        var failures = new List<string>();
        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var total = Stopwatch.StartNew();
        using var net = new Topology('f');
        try
        {
            net.Build(FailoverPeer + "/24");
            string second = net.AddBridge("c");
            net.AddTrunk(net.Bridge, second);
            // Programs and files into the page cache before the first run.
            TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["run", "--help"], TimeSpan.FromSeconds(60));
            TestEnvironment.RunProcess(guest.Qemu, ["--version"], TimeSpan.FromSeconds(60));

            for (int r = 0; r < runs; r++)
            {
                foreach (var (key, name) in sides)
                {
                    // A side that failed once is not run again; the other goes on.
                    if (failures.Any(f => f.StartsWith(name + ":", StringComparison.Ordinal)))
                        continue;
                    try
                    {
                        var g = FailoverRun(key == "bond", guest, cmdline, net, second, python, streamBytes, cutBytes, limit);
                        results[key].Add(g);
                        Console.Error.WriteLine($"run {r + 1}/{runs}: {name}: gap at the cut {Ms(g.CutMs)} ms, longest silence elsewhere {Ms(g.ElsewhereMs)} ms " +
                                                $"(link down at {Mib(g.CutBytes)} MiB, in {g.DownMs:0.0} ms), {g.Mbits:0} Mbit/s; {g.Moved}");
                    }
                    catch (RunFailure e)
                    {
                        failures.Add($"{name}: {e.Message}");
                        Console.Error.WriteLine($"run {r + 1}/{runs}: {name}: failed (below)");
                    }
                }
            }
        }
        catch (RunFailure e)
        {
            // The topology: nothing to measure without it.
            Console.Error.WriteLine($"benchmark: net: failover: {e.Message}");
            return 1;
        }

        Console.WriteLine($"failover: a TCP stream from the guest while its active uplink's link goes down, vmctl run's NIC team against " +
                          $"Linux bonding under QEMU q35 virtio-net-pci ({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm}, " +
                          $"{FirstLine(TestEnvironment.RunProcess(guest.Qemu, ["--version"], TimeSpan.FromSeconds(60)).Stdout)})");
        Console.WriteLine("topology: two bridges (switches, STP off) joined by a veth trunk, the peer namespace on the first; " +
                          "ours: --net tap=A@first,tap=B@second,policy=active-backup (the VMM hears link changes through netlink); " +
                          $"bonding: QEMU's tap (vhost=off) on a third bridge whose other port is a bond (mode active-backup, miimon {MiiMonMs}) " +
                          "of two veth pairs, one to each switch.");
        Console.WriteLine($"guest: Debian's cloud kernel (bzImage) with the test initramfs, {Cpus} vCPUs, {Memory}iB, the same MAC; it sends " +
                          $"{Mib(streamBytes)} MiB of random bytes (init's tcpput: busybox nc, one TCP connection) to a receiver in the peer " +
                          $"that reports every silence of {SilenceMs} ms or more between two reads. Once it has {Mib(cutBytes)} MiB, path A's first link " +
                          "goes down (SIOCSIFFLAGS in the benchmark's process, as 'ip link set IF down'): ours TAP_A, bonding VETH_A (the bond's active slave). " +
                          $"gap: the longest silence ending after the cut began and beginning at most {CutWindow * 1000:0} ms after the link was down; " +
                          $"elsewhere: the longest other silence of the stream (the place's noise). Median of {runs} runs, the two alternating.");
        Console.WriteLine($"{"",-18}{"gap ms",10}{"min ms",10}{"max ms",10}{"elsewhere ms",14}{"Mbit/s",10}");
        foreach (var (key, name) in sides)
        {
            var v = results[key];
            if (v.Count == 0)
            {
                Console.WriteLine($"{name,-18}{"failed",10}");
                continue;
            }
            Console.WriteLine($"{name,-18}{Ms(Median(v, g => g.CutMs)),10}{Ms(v.Min(g => g.CutMs)),10}{Ms(v.Max(g => g.CutMs)),10}" +
                              $"{Ms(Median(v, g => g.ElsewhereMs)),14}{Median(v, g => g.Mbits),10:0}");
        }
        if (results["team"].Count > 0 && results["bond"].Count > 0)
        {
            double ours = Math.Max(Median(results["team"], g => g.CutMs), SilenceMs), theirs = Math.Max(Median(results["bond"], g => g.CutMs), SilenceMs);
            Console.WriteLine($"ratio ours/bonding (median gaps): {ours / theirs:0.00} " +
                              $"(below 1: ours resumes the stream sooner; a gap under {SilenceMs} ms counts as {SilenceMs})");
        }
        Console.WriteLine($"({total.Elapsed.TotalSeconds:0} s in all; load average {loadBefore} before, {LoadAverage()} after)");
        foreach (var f in failures)
            Console.Error.WriteLine($"benchmark: net: failover: {f}");
        return failures.Count == 0 ? 0 : 1;

        static double Median(List<Gap> v, Func<Gap, double> pick) => DiskBenchmark.Median(v.Select(pick).ToList());
    }

    /// <summary>Milliseconds as printed: "&lt;5" for a silence shorter than the receiver reports, else whole milliseconds.</summary>
    private static string Ms(double ms) => ms < SilenceMs ? $"<{SilenceMs}" : $"{ms:0}";

    private static string Mib(long bytes) => (bytes / 1048576.0).ToString("0.0", System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>
    /// One run of one side: the receiver, the VMM and its uplinks (ours: two taps the VMM makes;
    /// bonding: the bond, its veth pairs, the bridge and QEMU's tap, made here), the cut once
    /// <paramref name="cutBytes"/> arrived, then the stream's end and the VMM's. What the run
    /// made is deleted at its end, whatever happened.
    /// </summary>
    private static Gap FailoverRun(bool bonded, GuestFiles guest, string cmdline, Topology net, string second, string python,
        long streamBytes, long cutBytes, int limitSeconds)
    {
        var deadline = DateTime.UtcNow.AddSeconds(limitSeconds);
        var made = new List<string>();
        Process? receiver = null, vmm = null;
        Task<GuestRun>? vm = null;
        try
        {
            receiver = net.StartReceiver(python, StreamPort, SilenceMs);
            string cut, other, file;
            string[] args;
            string? bond = null;
            if (!bonded)
            {
                cut = net.Prefix + "ta";
                other = net.Prefix + "tb";
                made.AddRange([cut, other]);
                file = TestEnvironment.Vmctl;
                args = VmctlArgs(guest, cmdline, $"tap={cut}@{net.Bridge},tap={other}@{second},policy=active-backup,mac={Mac}");
            }
            else
            {
                (string bridge, bond, cut, other) = BuildBond(net, second, made);
                string tap = net.NewTap(make: true, bridge);
                made.Add(tap);
                file = guest.Qemu;
                args = QemuArgs(guest, cmdline, tap, "off");
            }

            vm = Task.Run(() => Guest(file, args, limitSeconds, p => Volatile.Write(ref vmm, p)));
            var silences = new List<StreamSilence>();
            long got = 0;
            while (got < cutBytes)
            {
                string line = NextLine(receiver, vm, deadline, $"before {Mib(cutBytes)} MiB had arrived");
                if (StreamReceiver.Done(line) is not null)
                    throw new RunFailure($"the stream ended at {Mib(got)} MiB, before the link was to go down at {Mib(cutBytes)} MiB");
                if (StreamReceiver.Silence(line) is { } quiet)
                    silences.Add(quiet);
                got = StreamReceiver.Got(line) ?? got;
            }
            if (bond is not null && ActiveSlave(bond) != cut)
                throw new RunFailure($"the bond's active slave was {ActiveSlave(bond) ?? "(none)"} when the link was to go down, not {cut}");
            var (cutStart, cutDone) = Topology.SetLinkDown(cut);

            StreamReceived? done = null;
            while (done is null)
            {
                string line = NextLine(receiver, vm, deadline, "before the stream ended");
                if (StreamReceiver.Silence(line) is { } quiet)
                    silences.Add(quiet);
                done = StreamReceiver.Done(line);
            }
            string moved = bond is null ? "" : BondMoved(bond, cut, other);
            var run = vm.GetAwaiter().GetResult();
            if (done.Bytes != streamBytes || !run.Console.Contains($"kvm-guest: tcpput {streamBytes} {done.Sha256}", StringComparison.Ordinal))
                throw new RunFailure($"the peer got {done.Bytes} bytes (SHA-256 {done.Sha256}), not the {streamBytes} the guest sent; the guest's lines:{GuestLines(run.Console)}");
            if (bond is null)
                moved = TeamMoved(run.Stderr, cut, other);
            var atCut = silences.Where(x => x.End > cutStart && x.Start <= cutDone + CutWindow).ToList();
            double cutMs = atCut.Count == 0 ? 0 : atCut.Max(x => x.Ms);
            double elsewhereMs = silences.Except(atCut).Select(x => x.Ms).DefaultIfEmpty(0).Max();
            return new Gap(cutMs, elsewhereMs, (cutDone - cutStart) * 1000, got, done.RateBits / 1e6, moved);
        }
        finally
        {
            // A run that failed early leaves no VMM behind to hold the next run's tap names.
            if (vm is not null && !vm.IsCompleted)
            {
                try
                {
                    Volatile.Read(ref vmm)?.Kill(entireProcessTree: true);
                }
                catch (InvalidOperationException)
                {
                }
                try
                {
                    vm.Wait(TimeSpan.FromSeconds(60));
                }
                catch (AggregateException)
                {
                }
            }
            if (receiver is not null && !receiver.HasExited)
            {
                try
                {
                    receiver.Kill(entireProcessTree: true);
                }
                catch (InvalidOperationException)
                {
                }
            }
            for (int i = made.Count - 1; i >= 0; i--)
                net.Delete(made[i]);
        }
    }

    /// <summary>
    /// The bonded side's links, each added to <paramref name="made"/>: a bridge whose port is
    /// a bond in mode active-backup with miimon 100, enslaving two veth pairs whose other ends are
    /// ports of the peer's bridge (path A) and of <paramref name="second"/> (path B). Path A comes up
    /// first and the bond must have made it active before path B comes up, so that every run starts
    /// on A as ours does. Returns the bridge (for QEMU's tap), the bond and its slaves on path A and B.
    /// </summary>
    private static (string Bridge, string Bond, string A, string B) BuildBond(Topology net, string second, List<string> made)
    {
        string bridge = net.AddBridge("x");
        made.Add(bridge);
        string bond = net.Prefix + "bd";
        made.Add(bond);
        Topology.Ip("link", "add", bond, "type", "bond", "mode", "active-backup", "miimon", $"{MiiMonMs}");
        var (a, aSwitch) = net.AddVeth("a0", "a1");
        made.Add(a);
        var (b, bSwitch) = net.AddVeth("b0", "b1");
        made.Add(b);
        Topology.Ip("link", "set", a, "master", bond);
        Topology.Ip("link", "set", b, "master", bond);
        Topology.Ip("link", "set", bond, "master", bridge, "up");
        Topology.Ip("link", "set", aSwitch, "master", net.Bridge, "up");
        Topology.Ip("link", "set", a, "up");
        if (!SpinWait.SpinUntil(() => ActiveSlave(bond) == a, TimeSpan.FromSeconds(10)))
            throw new RunFailure($"bond {bond} did not make {a} its active slave within 10 s: {BondStatus(bond)}");
        Topology.Ip("link", "set", bSwitch, "master", second, "up");
        Topology.Ip("link", "set", b, "up");
        return (bridge, bond, a, b);
    }

    /// <summary>The bond's /proc/net/bonding file, or why it could not be read.</summary>
    private static string BondStatus(string bond)
    {
        try
        {
            return File.ReadAllText($"/proc/net/bonding/{bond}");
        }
        catch (IOException e)
        {
            return $"(/proc/net/bonding/{bond}: {e.Message})";
        }
    }

    /// <summary>The bond's "Currently Active Slave", or null when it has none or the file says nothing of it.</summary>
    private static string? ActiveSlave(string bond)
    {
        const string Key = "Currently Active Slave: ";
        string? line = BondStatus(bond).Split('\n').FirstOrDefault(l => l.StartsWith(Key, StringComparison.Ordinal));
        string? slave = line?[Key.Length..].Trim();
        return slave is null or "None" ? null : slave;
    }

    /// <summary>What shows that the bond moved the traffic from <paramref name="cut"/> to <paramref name="other"/>; throws when it did not.</summary>
    private static string BondMoved(string bond, string cut, string other)
    {
        string? active = ActiveSlave(bond);
        if (active != other)
            throw new RunFailure($"after the stream the bond's active slave was {active ?? "(none)"}, not {other}: {BondStatus(bond)}");
        return $"bond's active slave now {other}";
    }

    /// <summary>What shows that our team moved the traffic from <paramref name="cut"/> to <paramref name="other"/> (the VMM's warning, event 1006); throws when it did not.</summary>
    private static string TeamMoved(string stderr, string cut, string other)
    {
        string expected = $"uplink tap {cut} down (link down); traffic now on tap {other}";
        string? line = stderr.Split('\n').FirstOrDefault(l => l.Contains(expected, StringComparison.Ordinal));
        if (line is null)
            throw new RunFailure($"the VMM did not report '{expected}'; its last stderr lines:{Last(stderr)}");
        return "team: " + expected;
    }

    /// <summary>
    /// The receiver's next line; throws <see cref="RunFailure"/> when the receiver ends, the VM's
    /// run ends (with its own failure, if it failed) or the deadline passes first.
    /// </summary>
    private static string NextLine(Process receiver, Task<GuestRun> vm, DateTime deadline, string when)
    {
        var read = receiver.StandardOutput.ReadLineAsync();
        var left = deadline - DateTime.UtcNow;
        int first = left > TimeSpan.Zero ? Task.WaitAny([read, vm], left) : -1;
        if (first == 0)
            return read.Result ?? throw new RunFailure($"the stream receiver ended without its 'done' line {when}");
        if (first == 1)
        {
            var run = vm.GetAwaiter().GetResult();
            throw new RunFailure($"the VM ended {when}; the guest's lines:{GuestLines(run.Console)}");
        }
        throw new RunFailure($"no line from the stream receiver {when}, and the time limit passed");
    }
}
