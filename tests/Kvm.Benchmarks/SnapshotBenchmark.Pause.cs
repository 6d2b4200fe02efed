using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// The pause part of the snapshot benchmark (issue 11): how long the guest stands still while this
/// VMM hands a running VM to a new kvm-vmm process on the same host, against QEMU's local live
/// migration to a second QEMU process, the runs alternating.
/// <list type="bullet">
/// <item>upgrade in place: the control socket's <c>handover</c> (<c>vmctl control upgrade</c>);
/// the new process starts before the guest pauses, guest RAM (a memfd) is passed, not copied.</item>
/// <item>suspend and resume: <c>suspend</c>, then <c>handover</c> (<c>vmctl control resume</c>):
/// the pause includes starting the new process.</item>
/// <item>QEMU: a destination QEMU started with <c>-incoming defer</c> and QMP
/// <c>migrate-incoming unix:PATH</c>, then the source's QMP <c>migrate unix:PATH</c> (pre-copy, the
/// guest running); its <c>query-migrate</c> downtime.</item>
/// </list>
/// Both VMMs' own figures are printed beside the guest's view: the guest kit's <c>tick</c> prints a
/// line every 20 ms of its time; from the host, the pause is how much later the ticks after the
/// hand-over arrive than the ticks before it say they should (the lower envelope of arrival minus
/// schedule, after against before).
/// </summary>
internal static partial class SnapshotBenchmark
{
    private const int TickPeriodMs = 20;

    /// <summary>Cloud Hypervisor's published pause of a local live upgrade (cloud-hypervisor#3566): a reference, not a measurement.</summary>
    private const double CloudHypervisorUpgradeMs = 50;

    /// <summary>How long the guest ticks, seen live, before each hand-over and after it.</summary>
    private static readonly TimeSpan TickSettle = TimeSpan.FromSeconds(2.5);

    [GeneratedRegex(@"^guestkit: tick (\d+)$")]
    private static partial Regex TickLine();

    private static string TickCmdline(ulong size) =>
        $"tick period={TickPeriodMs} pwrbtn=0 fill={(size - (2UL << 20) - UnfilledTop) >> 10}K";

    /// <summary>The pause figures of one guest size, in seconds.</summary>
    private sealed class PauseResults
    {
        public List<double> UpgradeOwn { get; } = [];
        public List<double> UpgradeCall { get; } = [];
        public List<double> UpgradeGuest { get; } = [];
        public List<double> ResumeOwn { get; } = [];
        public List<double> SuspendCall { get; } = [];
        public List<double> ResumeCall { get; } = [];
        public List<double> ResumeGuest { get; } = [];
        public List<double> QemuDowntime { get; } = [];
        public List<double> QemuTotal { get; } = [];
        public List<double> QemuGuest { get; } = [];
        public List<string> Failures { get; } = [];
    }

    private static int MeasurePauses(string work, int runs, ulong[] sizes, TimeSpan limit, string qemuVersion)
    {
        var total = Stopwatch.StartNew();
        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var results = new Dictionary<ulong, PauseResults>();
        foreach (var size in sizes)
        {
            var r = results[size] = new PauseResults();
            try
            {
                MeasurePauseSize(work, runs, size, limit, r);
            }
            catch (BenchmarkFailure e)
            {
                r.Failures.Add(e.Message);
                Console.Error.WriteLine($"benchmark: snapshot: pause: {Mib(size)}: {e.Message}");
            }
        }

        Console.WriteLine($"pause of upgrade in place and suspend/resume, kvm-vmm against QEMU's local live migration ({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm}, {qemuVersion})");
        Console.WriteLine($"guest: the guest kit's 'tick period={TickPeriodMs} pwrbtn=0 fill=SIZE', 1 vCPU: it fills its RAM from 2 MiB up to {Mib(UnfilledTop)} below the top with non-zero");
        Console.WriteLine($"words, then prints a line every {TickPeriodMs} ms of its TSC time. Median of {runs}; per run, on one running VM each: ours upgrade, ours suspend");
        Console.WriteLine("and resume, QEMU migration; the other VMM's guest paused meanwhile (both spin between ticks).");
        Console.WriteLine("- upgrade: control-socket 'handover' (vmctl control upgrade): a new kvm-vmm starts and builds the machine on the RAM's memfd,");
        Console.WriteLine("  then the guest pauses and its state goes over; 'own' is the reply's pausedSeconds, 'call' the whole call as the client saw it.");
        Console.WriteLine("- suspend/resume: 'suspend', then 'handover' (vmctl control resume): the pause counts from the suspend and includes the new");
        Console.WriteLine("  process's start; 'own' is the handover reply's pausedSeconds, 'calls' the two calls.");
        Console.WriteLine("- QEMU: a second QEMU on the same host with '-incoming defer' and QMP 'migrate-incoming unix:PATH', then the source's QMP");
        Console.WriteLine("  'migrate unix:PATH' (pre-copy while the guest runs, max-bandwidth 1 TB/s, QEMU's default downtime-limit) until completed;");
        Console.WriteLine("  'own' is query-migrate's downtime, 'total' its total-time. QEMU's RAM is " +
                          (_qemuMemfd ? "a memfd (memory-backend-memfd)." : "anonymous memory (its default)."));
        Console.WriteLine("- guest: the pause as the guest's serial output shows it from outside: from the arrival of the last tick of the process that");
        Console.WriteLine("  ran the guest before to that of the first tick of the one after, less the ticks' period (for ours the first tick after is");
        Console.WriteLine("  dated back from the ticks that followed it live, since a console replays what came before the client attached).");
        Console.WriteLine($"  Resolution about a tick ({TickPeriodMs} ms; longer where the guest ticks slower, as QEMU's during its pre-copy): a guest whose");
        Console.WriteLine("  TSC ran on through the pause prints its overdue tick at once.");
        Console.WriteLine($"{"guest",-10}{"upgrade own ms",16}{"guest ms",10}{"call ms",10}{"susp/res own ms",17}{"guest ms",10}{"calls ms",10}" +
                          $"{"qemu own ms",13}{"guest ms",10}{"total s",9}");
        foreach (var size in sizes)
        {
            var r = results[size];
            Console.WriteLine($"{Mib(size),-10}{Ms(r.UpgradeOwn),16}{Ms(r.UpgradeGuest),10}{Ms(r.UpgradeCall),10}" +
                              $"{Ms(r.ResumeOwn),17}{Ms(r.ResumeGuest),10}{Ms(r.SuspendCall.Zip(r.ResumeCall, (a, b) => a + b).ToList()),10}" +
                              $"{Ms(r.QemuDowntime),13}{Ms(r.QemuGuest),10}{F(r.QemuTotal, "0.00"),9}");
        }
        Console.WriteLine("Ratios of the medians, QEMU's over ours (above 1: our guest is paused for less), by each VMM's own figure and by the guest's");
        Console.WriteLine($"view; and Cloud Hypervisor's published local upgrade pause ({CloudHypervisorUpgradeMs:0} ms, cloud-hypervisor#3566; a reference,");
        Console.WriteLine("measured elsewhere, not here) over ours.");
        Console.WriteLine($"{"guest",-10}{"qemu/upgrade",14}{"(guest)",9}{"qemu/susp-res",15}{"(guest)",9}{"ch/upgrade",12}{"(guest)",9}");
        foreach (var size in sizes)
        {
            var r = results[size];
            var ch = new List<double> { CloudHypervisorUpgradeMs / 1000 };
            Console.WriteLine($"{Mib(size),-10}{Ratio(r.QemuDowntime, r.UpgradeOwn),14}{Ratio(r.QemuGuest, r.UpgradeGuest),9}" +
                              $"{Ratio(r.QemuDowntime, r.ResumeOwn),15}{Ratio(r.QemuGuest, r.ResumeGuest),9}" +
                              $"{Ratio(ch, r.UpgradeOwn),12}{Ratio(ch, r.UpgradeGuest),9}");
        }
        Console.WriteLine($"({total.Elapsed.TotalSeconds:0} s in all; load average {loadBefore} before, {LoadAverage()} after)");
        var failures = results.Values.SelectMany(r => r.Failures).ToList();
        foreach (var f in failures)
            Console.Error.WriteLine($"benchmark: snapshot: pause: {f}");
        return failures.Count == 0 ? 0 : 1;
    }

    private static string Ms(List<double> seconds) => F(seconds.Select(x => x * 1000).ToList(), "0.0");

    private static void MeasurePauseSize(string work, int runs, ulong size, TimeSpan limit, PauseResults r)
    {
        string folder = Path.Combine(work, "pause-" + Mib(size).Replace(" ", "", StringComparison.Ordinal));
        Directory.CreateDirectory(folder);
        string control = Path.Combine(folder, "vm.ctl"), console = Path.Combine(folder, "vm.console"), spec = Path.Combine(folder, "vm.json");
        File.WriteAllText(spec, JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["kernel"] = TestEnvironment.GuestKit,
            ["cmdline"] = TickCmdline(size),
            ["memoryBytes"] = size,
            ["cpus"] = 1,
            ["debugExit"] = true,
        }));

        // Ours: one VM, handed from process to process; the pids of the ones the first started.
        Guest? ours = null;
        var successors = new List<int>();
        ConsoleLines? consoleLines = null;
        // QEMU: the process running the guest now, and its QMP.
        Guest? qemu = null;
        LineClient? qmp = null;
        try
        {
            ours = Guest.Start($"kvm-vmm ({Mib(size)})", TestEnvironment.KvmVmm, ["--spec", spec, "--control", control, "--console", console]);
            if (!SpinWait.SpinUntil(() => File.Exists(control) && File.Exists(console) || ours.Process.HasExited, limit) || ours.Process.HasExited)
                throw new BenchmarkFailure($"{ours.Name} did not make its control and console sockets");
            consoleLines = ConsoleLines.Connect(console, $"{ours.Name}'s console");
            consoleLines.WaitLine("guestkit: tick 1", limit);

            string qmpSocket = Path.Combine(folder, "qmp0.sock");
            (qemu, qmp) = StartTickingQemu(folder, size, qmpSocket, incoming: false, limit);
            qemu.WaitLine("guestkit: tick 1", limit);

            bool oursBroken = false, qemuBroken = false, oursPaused = false;
            for (int run = 0; run < runs; run++)
            {
                // Only the VM being measured runs: the other VMM's guest is paused meanwhile (both spin, and
                // the nested host has two vCPUs).
                if (!qemuBroken)
                    qmp.Qmp("stop").Dispose();
                if (!oursBroken)
                {
                    try
                    {
                        int pid = successors.Count == 0 ? ours.Process.Id : successors[^1];
                        Thread.Sleep(TickSettle);
                        var before = consoleLines;
                        var clock = Stopwatch.StartNew();
                        var (own, newPid) = Handover(control, limit);
                        double call = clock.Elapsed.TotalSeconds;
                        successors.Add(newPid);
                        consoleLines = FollowConsole(before, console, pid, ours, limit);
                        r.UpgradeOwn.Add(own);
                        r.UpgradeCall.Add(call);
                        AddGuestPause(r.UpgradeGuest, before, consoleLines, $"{Mib(size)} upgrade");

                        pid = newPid;
                        Thread.Sleep(TickSettle);
                        before = consoleLines;
                        clock.Restart();
                        using (var c = LineClient.Connect(control, limit))
                            c.Call("suspend").Dispose();
                        double suspend = clock.Elapsed.TotalSeconds;
                        clock.Restart();
                        (own, newPid) = Handover(control, limit);
                        call = clock.Elapsed.TotalSeconds;
                        successors.Add(newPid);
                        consoleLines = FollowConsole(before, console, pid, ours, limit);
                        r.ResumeOwn.Add(own);
                        r.SuspendCall.Add(suspend);
                        r.ResumeCall.Add(call);
                        AddGuestPause(r.ResumeGuest, before, consoleLines, $"{Mib(size)} suspend/resume");
                    }
                    catch (BenchmarkFailure e)
                    {
                        oursBroken = true;
                        r.Failures.Add($"{Mib(size)}: ours: {e.Message}");
                        Console.Error.WriteLine($"benchmark: snapshot: pause: {Mib(size)}: ours: {e.Message}");
                    }
                }
                if (!qemuBroken)
                {
                    try
                    {
                        if (!oursBroken)
                        {
                            using (var c = LineClient.Connect(control, limit))
                                c.Call("pause").Dispose();
                            oursPaused = true;
                        }
                        qmp.Qmp("cont").Dispose();
                        Thread.Sleep(TickSettle);
                        string next = Path.Combine(folder, $"qmp{run + 1}.sock"), migration = Path.Combine(folder, "migration.sock");
                        File.Delete(migration);
                        var (dest, destQmp) = StartTickingQemu(folder, size, next, incoming: true, limit);
                        try
                        {
                            destQmp.Qmp("migrate-incoming", $"{{\"uri\":{JsonSerializer.Serialize("unix:" + migration)}}}").Dispose();
                            qmp.ClearEvents();
                            var clock = Stopwatch.StartNew();
                            qmp.Qmp("migrate", $"{{\"uri\":{JsonSerializer.Serialize("unix:" + migration)}}}").Dispose();
                            qmp.WaitMigration();
                            double seconds = clock.Elapsed.TotalSeconds;
                            // QEMU 7.2 says completed (event and status) before it has worked out the
                            // migration's times: until then query-migrate shows total-time 0.
                            var info = qmp.Qmp("query-migrate");
                            for (int i = 0; i < 50 && info.RootElement.GetProperty("return").TryGetProperty("total-time", out var tt) && tt.GetDouble() == 0; i++)
                            {
                                info.Dispose();
                                Thread.Sleep(100);
                                info = qmp.Qmp("query-migrate");
                            }
                            using var infoKept = info;
                            var ret = info.RootElement.GetProperty("return");
                            Console.Error.WriteLine($"{Mib(size)} qemu query-migrate: {ret.GetRawText()}");
                            if (!ret.TryGetProperty("downtime", out var downtime))
                                throw new BenchmarkFailure($"QEMU's query-migrate has no downtime: {ret.GetRawText()}");
                            double totalMs = ret.TryGetProperty("total-time", out var t) ? t.GetDouble() : seconds * 1000;
                            // The destination runs the guest now (the source's run state travels with it).
                            dest.WaitLine("guestkit: tick", limit);
                            Thread.Sleep(TickSettle);
                            r.QemuDowntime.Add(downtime.GetDouble() / 1000);
                            r.QemuTotal.Add(totalMs / 1000);
                            AddGuestPause(r.QemuGuest, TickLog.Of(qemu), TickLog.Of(dest), $"{Mib(size)} qemu migration");
                            try
                            {
                                qmp.Qmp("quit").Dispose();
                            }
                            catch (BenchmarkFailure)
                            {
                                // QEMU may close the monitor before its reply.
                            }
                            if (!qemu.Process.WaitForExit(limit))
                                throw new BenchmarkFailure($"{qemu.Name} did not quit after its migration");
                        }
                        finally
                        {
                            qmp.Dispose();
                            qemu.Dispose();
                            (qemu, qmp) = (dest, destQmp);
                        }
                    }
                    catch (BenchmarkFailure e)
                    {
                        qemuBroken = true;
                        r.Failures.Add($"{Mib(size)}: qemu: {e.Message}");
                        Console.Error.WriteLine($"benchmark: snapshot: pause: {Mib(size)}: qemu: {e.Message}");
                    }
                }
                if (oursPaused)
                {
                    using (var c = LineClient.Connect(control, limit))
                        c.Call("resume").Dispose();
                    oursPaused = false;
                }
                Console.Error.WriteLine($"{Mib(size)} pause {run + 1}/{runs}: " +
                                        $"upgrade {Last(r.UpgradeOwn, run)} ms (guest {Last(r.UpgradeGuest, run)}), " +
                                        $"suspend/resume {Last(r.ResumeOwn, run)} ms (guest {Last(r.ResumeGuest, run)}), " +
                                        $"qemu downtime {Last(r.QemuDowntime, run)} ms (guest {Last(r.QemuGuest, run)}, total {Last(r.QemuTotal, run)} ms)");
                if (oursBroken && qemuBroken)
                    break;
            }
        }
        finally
        {
            consoleLines?.Dispose();
            if (successors.Count > 0)
                EndHandedOver(control, successors, limit);
            ours?.Dispose();
            qmp?.Dispose();
            qemu?.Dispose();
        }
    }

    private static string Last(List<double> seconds, int run) =>
        seconds.Count == run + 1 ? (seconds[run] * 1000).ToString("0.0", CultureInfo.InvariantCulture) : "-";

    /// <summary>The control socket's handover: the reply's pausedSeconds and the new process's pid.</summary>
    private static (double Paused, int Pid) Handover(string control, TimeSpan limit)
    {
        using var c = LineClient.Connect(control, limit);
        using var reply = c.Call("handover");
        var result = reply.RootElement.GetProperty("result");
        return (result.GetProperty("pausedSeconds").GetDouble(), result.GetProperty("pid").GetInt32());
    }

    /// <summary>
    /// After a hand-over: waits for the old process (<paramref name="oldPid"/>) to end and its
    /// console connection to close (every line it got out has arrived), then attaches to the console
    /// of the new one (same path) and lets the guest tick there a while.
    /// </summary>
    private static ConsoleLines FollowConsole(ConsoleLines old, string console, int oldPid, Guest first, TimeSpan limit)
    {
        if (oldPid == first.Process.Id)
        {
            // Our own child: WaitForExit, not its stdout's end (the new process holds that pipe too).
            if (!first.Process.WaitForExit(limit))
                throw new BenchmarkFailure($"kvm-vmm (pid {oldPid}) did not exit after handing the VM over");
        }
        else if (!SpinWait.SpinUntil(() => Gone(oldPid), limit))
            throw new BenchmarkFailure($"kvm-vmm (pid {oldPid}) did not exit after handing the VM over");
        if (!old.WaitEnd(limit))
            throw new BenchmarkFailure("the old kvm-vmm's console connection did not close after the hand-over");
        old.Dispose();
        var next = ConsoleLines.Connect(console, "the new kvm-vmm's console");
        Thread.Sleep(TickSettle);
        next.ThrowIfFailed();
        return next;
    }

    /// <summary>Whether the process is gone (or a zombie nobody reaped yet).</summary>
    private static bool Gone(int pid)
    {
        try
        {
            string stat = File.ReadAllText($"/proc/{pid}/stat");
            return stat[(stat.LastIndexOf(')') + 2)..].StartsWith('Z');
        }
        catch (IOException)
        {
            return true;
        }
    }

    /// <summary>Stops the VM in the last process it was handed to (control 'stop', forced), and ends any of the benchmark's successors still there.</summary>
    private static void EndHandedOver(string control, List<int> successors, TimeSpan limit)
    {
        try
        {
            using var c = LineClient.Connect(control, TimeSpan.FromSeconds(30));
            c.Call("stop", """{"force":true}""").Dispose();
        }
        catch (BenchmarkFailure e)
        {
            Console.Error.WriteLine($"benchmark: snapshot: pause: stopping the handed-over VM: {e.Message}");
        }
        foreach (int pid in successors)
        {
            if (SpinWait.SpinUntil(() => Gone(pid), TimeSpan.FromSeconds(10)))
                continue;
            try
            {
                using var p = Process.GetProcessById(pid);
                p.Kill();
                p.WaitForExit(limit);
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException or System.ComponentModel.Win32Exception)
            {
            }
        }
    }

    /// <summary>A QEMU running the ticking guest (or, <paramref name="incoming"/>, waiting for it: -incoming defer), with its QMP.</summary>
    private static (Guest Vm, LineClient Qmp) StartTickingQemu(string folder, ulong size, string qmpSocket, bool incoming, TimeSpan limit)
    {
        using var listener = Listen(qmpSocket);
        var vm = Guest.Start($"qemu{(incoming ? " -incoming" : "")} ({Mib(size)})", QemuPath,
            [.. QemuArgs(size, TickCmdline(size)), "-chardev", $"socket,id=qmp,path={qmpSocket}", "-mon", "chardev=qmp,mode=control",
             .. incoming ? new[] { "-incoming", "defer" } : []]);
        try
        {
            var qmp = LineClient.AcceptQmp(listener, qmpSocket, () => vm.Process.HasExited, limit);
            qmp.Qmp("migrate-set-capabilities", """{"capabilities":[{"capability":"events","state":true}]}""").Dispose();
            qmp.Qmp("migrate-set-parameters", """{"max-bandwidth":1000000000000}""").Dispose();
            return (vm, qmp);
        }
        catch
        {
            vm.Dispose();
            throw;
        }
    }

    /// <summary>The guest's view of a pause into <paramref name="list"/>; where its ticks do not tell, a warning and no figure.</summary>
    private static void AddGuestPause(List<double> list, TickLog before, TickLog after, string what)
    {
        try
        {
            list.Add(GuestPause(before, after, what));
        }
        catch (BenchmarkFailure e)
        {
            Console.Error.WriteLine($"benchmark: snapshot: pause: no guest view: {e.Message}");
        }
    }

    /// <summary>
    /// The guest's pause as its ticks show it from outside: from the arrival of the last tick the
    /// process before the hand-over printed to that of the first tick the one after printed, less
    /// the period between two ticks. The last tick before arrives as it is printed (the old
    /// process's console or stdout stays connected until it ends); the first after may come late in
    /// a burst (a console's replay when the client attaches again), so its arrival is taken from the
    /// ticks after it that came live: the earliest of arrival - (n - first) * period over the first
    /// 100, the period (host seconds per tick) fitted by least squares over the ticks after.
    /// </summary>
    private static double GuestPause(TickLog before, TickLog after, string what)
    {
        var pre = before.Ticks();
        if (pre.Count == 0)
            throw new BenchmarkFailure($"{what}: no ticks before the pause");
        var last = pre.MaxBy(t => t.N);
        var post = after.Ticks().Where(t => t.N > last.N).ToList();
        if (post.Count < 50)
            throw new BenchmarkFailure($"{what}: only {post.Count} ticks after the pause");
        double mx = post.Average(t => (double)t.N), my = post.Average(t => t.At);
        double period = post.Sum(t => (t.N - mx) * (t.At - my)) / post.Sum(t => (t.N - mx) * (t.N - mx));
        if (!(period > TickPeriodMs / 1000.0 * 0.5 && period < TickPeriodMs / 1000.0 * 5))
            throw new BenchmarkFailure($"{what}: the guest's ticks after the pause came every {period * 1000:0.00} ms, not about {TickPeriodMs}");
        long first = post.Min(t => t.N);
        double firstAt = post.Where(t => t.N < first + 100).Min(t => t.At - (t.N - first) * period);
        return firstAt - last.At - (first - last.N) * period;
    }

    /// <summary>Lines of guest output stamped with when their first byte arrived (Stopwatch timestamps).</summary>
    private abstract class TickLog
    {
        protected abstract List<(long At, string Line)> Lines();

        /// <summary>The tick lines: arrival in seconds (Stopwatch time) and tick number.</summary>
        public List<(double At, long N)> Ticks() =>
            Lines().Select(l => (l.At, M: TickLine().Match(l.Line)))
                .Where(x => x.M.Success)
                .Select(x => ((double)x.At / Stopwatch.Frequency, long.Parse(x.M.Groups[1].Value, CultureInfo.InvariantCulture)))
                .ToList();

        public static TickLog Of(Guest g) => new GuestLog(g);

        private sealed class GuestLog(Guest g) : TickLog
        {
            protected override List<(long At, string Line)> Lines() => g.Lines();
        }
    }

    /// <summary>A client of a kvm-vmm's console socket that stamps each line of guest output with its arrival.</summary>
    private sealed class ConsoleLines : TickLog, IDisposable
    {
        private readonly Socket _socket;
        private readonly string _name;
        private readonly Thread _reader;
        private readonly List<(long At, string Line)> _lines = [];
        private readonly object _lock = new();
        private bool _ended;

        private ConsoleLines(Socket socket, string name)
        {
            _socket = socket;
            _name = name;
            _reader = new Thread(Read) { IsBackground = true, Name = "console lines" };
            _reader.Start();
        }

        public static ConsoleLines Connect(string path, string name)
        {
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                socket.Connect(new UnixDomainSocketEndPoint(path));
            }
            catch (SocketException e)
            {
                socket.Dispose();
                throw new BenchmarkFailure($"cannot attach to {name} ({path}): {e.Message}");
            }
            return new ConsoleLines(socket, name);
        }

        protected override List<(long At, string Line)> Lines()
        {
            lock (_lock)
                return [.. _lines];
        }

        private void Read()
        {
            var buffer = new byte[4096];
            var line = new StringBuilder();
            long lineAt = 0;
            try
            {
                int n;
                while ((n = _socket.Receive(buffer)) > 0)
                {
                    long now = Stopwatch.GetTimestamp();
                    for (int i = 0; i < n; i++)
                    {
                        if (line.Length == 0 && lineAt == 0)
                            lineAt = now;
                        char c = (char)buffer[i];
                        if (c == '\n')
                        {
                            lock (_lock)
                                _lines.Add((lineAt, line.ToString().TrimEnd('\r')));
                            line.Clear();
                            lineAt = 0;
                        }
                        else
                            line.Append(c);
                    }
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
            }
            lock (_lock)
            {
                _ended = true;
                Monitor.PulseAll(_lock);
            }
        }

        /// <summary>Waits until the server closes the connection.</summary>
        public bool WaitEnd(TimeSpan limit)
        {
            var clock = Stopwatch.StartNew();
            lock (_lock)
            {
                while (!_ended)
                {
                    var left = limit - clock.Elapsed;
                    if (left <= TimeSpan.Zero)
                        return false;
                    Monitor.Wait(_lock, left);
                }
            }
            return true;
        }

        /// <summary>Waits for a whole line that starts with <paramref name="prefix"/>.</summary>
        public void WaitLine(string prefix, TimeSpan limit)
        {
            if (!SpinWait.SpinUntil(() =>
                {
                    ThrowIfFailed();
                    lock (_lock)
                        return _ended || _lines.Any(l => l.Line.StartsWith(prefix, StringComparison.Ordinal));
                }, limit))
                throw new BenchmarkFailure($"{_name}: no '{prefix}' line within {limit.TotalSeconds:0} s");
            lock (_lock)
                if (!_lines.Any(l => l.Line.StartsWith(prefix, StringComparison.Ordinal)))
                    throw new BenchmarkFailure($"{_name}: closed before a '{prefix}' line");
        }

        /// <summary>Fails if the guest reported an error.</summary>
        public void ThrowIfFailed()
        {
            lock (_lock)
            {
                var error = _lines.FirstOrDefault(l => l.Line.StartsWith("guestkit: error", StringComparison.Ordinal));
                if (error.Line is not null)
                    throw new BenchmarkFailure($"{_name}: {error.Line}");
            }
        }

        public void Dispose()
        {
            try
            {
                _socket.Shutdown(SocketShutdown.Both);   // a blocked Receive returns
            }
            catch (SocketException)
            {
            }
            _reader.Join(TimeSpan.FromSeconds(10));
            _socket.Dispose();
        }
    }
}
