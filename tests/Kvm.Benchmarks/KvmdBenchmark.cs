using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Kvm.Cluster;
using Kvm.Control;
using Kvm.Rpc;
using Kvm.Tests.Shared;

/// <summary>
/// kvmd benchmark (issue 10): prints figures and ratios, asserts nothing. Four parts, each with a
/// peer measured in the same run:
/// <list type="bullet">
/// <item>list: `vmctl list` (the process, as a user runs it) and vm.list over the RPC with 100 VMs
/// created (not started) in the inventory; peers: psql reading the same rows from the same
/// database, vm.list of the empty inventory. Needs no KVM.</item>
/// <item>rpc: the round trip of kvm-vmm's control socket `status` on a running guest, and of kvmd's
/// vm.show (the inventory plus that status) and daemon.status, and the status call on a new
/// connection each time, as vm.show makes it; peer: QEMU's QMP `query-status` on
/// QEMU microvm running the same guest. Calls interleaved, one connection per server.</item>
/// <item>boot: from `vmctl create` to the guest's first console line through kvmd (`vmctl create`
/// + `vmctl start`, then the VM's console socket), against `vmctl run` and QEMU to the same line
/// on their stdout.</item>
/// <item>takeover: two kvmd on one PostgreSQL (host A's private cluster), a VM on A, A frozen with
/// SIGSTOP: the time until B runs the VM, against the configured lease duration, with kvmd's
/// defaults and with a shorter lease.</item>
/// </list>
/// The guest everywhere is the guest kit's `hello` without a debug-exit device: it prints its line,
/// then halts its vCPU, and the VM runs on until stopped.
/// </summary>
internal static class KvmdBenchmark
{
    private const string Usage =
        "Usage: Kvm.Benchmarks kvmd [--parts list,rpc,boot,takeover] [--calls N] [--runs N] [--vms N]\n" +
        "                           [--takeover-runs N] [--short-lease S] [--dir FOLDER] [--keep]\n" +
        "  --parts L          the figures to measure (default all; 'list' alone needs no KVM)\n" +
        "  --calls N          RPC calls per row, after 20 untimed ones (default 500)\n" +
        "  --runs N           timed runs of each process row in list and boot, alternating (default 10 and 5)\n" +
        "  --vms N            VMs in the inventory for list (default 100)\n" +
        "  --takeover-runs N  freezes of host A per lease setting (default 2)\n" +
        "  --short-lease S    the shorter lease duration in seconds; renewal and fence margin scale with it\n" +
        "                     as kvmd's defaults do (a fifth, and 0.3 of it; default 5)\n" +
        "  --dir FOLDER       where the two kvmd keep their files (default: a new folder under the temp folder)\n" +
        "  --keep             leave that folder afterwards";

    /// <summary>The guest kit's workload, and the console line it prints first.</summary>
    private const string Workload = "hello", Marker = "guestkit: hello";

    /// <summary>What the guest kit prints when it cannot run the workload: no need to wait for the marker any longer.</summary>
    private const string GuestError = "guestkit: error";
    private const string Memory = "256M";
    private const int WarmUpCalls = 20;
    private static readonly string[] AllParts = ["list", "rpc", "boot", "takeover"];
    private static readonly TimeSpan Limit = TimeSpan.FromSeconds(120);

    private sealed record Settings(string[] Parts, int Calls, int? Runs, int Vms, int TakeoverRuns, double ShortLease);

    public static int Run(string[] args)
    {
        var s = new Settings(AllParts, 500, null, 100, 2, 5);
        string? dir = null;
        bool keep = false;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--parts" when i + 1 < args.Length && args[i + 1].Split(',').All(AllParts.Contains):
                    s = s with { Parts = args[++i].Split(',') };
                    break;
                case "--calls" when i + 1 < args.Length && int.TryParse(args[i + 1], out int c) && c > 0:
                    s = s with { Calls = c };
                    i++;
                    break;
                case "--runs" when i + 1 < args.Length && int.TryParse(args[i + 1], out int r) && r > 0:
                    s = s with { Runs = r };
                    i++;
                    break;
                case "--vms" when i + 1 < args.Length && int.TryParse(args[i + 1], out int v) && v > 0:
                    s = s with { Vms = v };
                    i++;
                    break;
                case "--takeover-runs" when i + 1 < args.Length && int.TryParse(args[i + 1], out int t) && t > 0:
                    s = s with { TakeoverRuns = t };
                    i++;
                    break;
                case "--short-lease" when i + 1 < args.Length && double.TryParse(args[i + 1], NumberStyles.Float, CultureInfo.InvariantCulture, out double l) && l >= 2:
                    s = s with { ShortLease = l };
                    i++;
                    break;
                case "--dir" when i + 1 < args.Length:
                    dir = args[++i];
                    break;
                case "--keep":
                    keep = true;
                    break;
                case "--help" or "-h":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    return Prerequisites.UnknownArgument(args[i], Usage);
            }
        }

        bool vms = s.Parts.Any(p => p != "list");
        var files = new List<(string, string)> { Prerequisites.GuestKit, Prerequisites.Vmctl, Prerequisites.Kvmd, Prerequisites.KvmVmm };
        var programs = new List<(string, string)>();
        if (s.Parts.Contains("list"))
            programs.Add(Prerequisites.Psql);
        if (s.Parts.Contains("rpc") || s.Parts.Contains("boot"))
            programs.Add(Prerequisites.Qemu);
        if (!Prerequisites.Check(files, programs))
            return 1;
        if (TestEnvironment.FindOnPath("initdb") is null && !Directory.Exists("/usr/lib/postgresql"))
        {
            Console.Error.WriteLine("benchmark: kvmd: PostgreSQL's server programs are missing (Debian package postgresql)");
            return 1;
        }
        if (vms && !Place.CheckKvm())
        {
            Console.Error.WriteLine("benchmark: kvmd: '--parts list' measures what needs no KVM");
            return 1;
        }

        string work = dir is null ? Directory.CreateTempSubdirectory("kvm-kvmdbench-").FullName : Path.GetFullPath(dir);
        Directory.CreateDirectory(work);
        // kvmd's private cluster runs as the 'postgres' user, which must reach its folder.
        File.SetUnixFileMode(work, (UnixFileMode)0b111_101_101);
        var failures = new List<string>();
        try
        {
            string a = Path.Combine(work, "a"), b = Path.Combine(work, "b");
            var clock = Stopwatch.StartNew();
            if (s.Parts.Any(p => p != "takeover"))
            {
                using var kvmd = KvmdInstance.Start(a, "bench-a");
                Console.Error.WriteLine($"kvmd up in {clock.Elapsed.TotalSeconds:0.0} s (its private PostgreSQL cluster made on the first start)");
                foreach (var part in s.Parts.Where(p => p != "takeover"))
                {
                    Attempt(part, failures, () => (part switch
                    {
                        "list" => (Action<KvmdInstance, Settings>)ListPart,
                        "rpc" => RpcPart,
                        _ => BootPart,
                    })(kvmd, s));
                }
            }
            if (s.Parts.Contains("takeover"))
                Attempt("takeover", failures, () => TakeoverPart(a, b, s));
        }
        catch (InvalidOperationException e)
        {
            // kvmd did not come up.
            failures.Add(e.Message);
        }
        finally
        {
            KvmdInstance.KillLeftovers(work);
            if (!keep && dir is null)
            {
                try
                {
                    Directory.Delete(work, recursive: true);
                }
                catch (IOException e)
                {
                    Console.Error.WriteLine($"benchmark: kvmd: cannot remove {work}: {e.Message}");
                }
            }
        }
        foreach (var f in failures)
            Console.Error.WriteLine($"benchmark: kvmd: {f}");
        return failures.Count == 0 ? 0 : 1;
    }

    /// <summary>Runs one part; a failure is recorded (and printed) and the next part still runs.</summary>
    private static void Attempt(string part, List<string> failures, Action measure)
    {
        try
        {
            measure();
        }
        catch (Exception e) when (e is BenchmarkFailure or RpcException or IOException or SocketException or InvalidOperationException
                                       or KeyNotFoundException or JsonException or TimeoutException)
        {
            failures.Add($"{part}: {e.Message}");
            Console.Error.WriteLine($"benchmark: kvmd: {part} failed: {e.Message}");
            Console.WriteLine($"({part}: failed; the reason follows at the end)");
        }
    }

    // ---- list -------------------------------------------------------------------------------

    private static void ListPart(KvmdInstance kvmd, Settings s)
    {
        int runs = s.Runs ?? 10;
        string started = Now();
        string load = LoadAverage();
        using var rpc = LineClient.Connect(kvmd.Socket, Limit);
        var empty = TimeCalls(s.Calls, () => rpc.Call("vm.list").Dispose());

        // The first VM as a user makes it; the others with its spec, one vm.create each.
        string[] vmctl = ["--connect", kvmd.Socket];
        RunOk(TestEnvironment.Vmctl, [.. vmctl, "create", "list-1", "--kernel", TestEnvironment.GuestKit, "--cmdline", Workload, "--memory", Memory]);
        string spec;
        using (var shown = rpc.Call("vm.show", "{\"name\":\"list-1\"}"))
            spec = shown.RootElement.GetProperty("result").GetProperty("spec").GetRawText();
        var creates = new List<double>();
        for (int i = 2; i <= s.Vms; i++)
        {
            long t = Stopwatch.GetTimestamp();
            rpc.Call("vm.create", $"{{\"name\":\"list-{i}\",\"spec\":{spec}}}").Dispose();
            creates.Add(Stopwatch.GetElapsedTime(t).TotalMilliseconds);
        }
        int listed, bytes;
        using (var l = rpc.Call("vm.list"))
        {
            listed = l.RootElement.GetProperty("result").GetProperty("vms").GetArrayLength();
            bytes = Encoding.UTF8.GetByteCount(l.RootElement.GetRawText());
        }
        if (listed != s.Vms)
            throw new BenchmarkFailure($"vm.list names {listed} VMs, not the {s.Vms} created");
        var full = TimeCalls(s.Calls, () => rpc.Call("vm.list").Dispose());

        // Processes, as a user runs them, alternating. psql reads the rows vmctl list shows from the same database.
        string query = "select v.name, v.actual_state, v.desired_state, h.name as host from vms v " +
                       "left join hosts h on h.id = v.owner_host order by v.name";
        var rows = new (string Name, string File, string[] Args, List<double> Times)[]
        {
            ("vmctl list", TestEnvironment.Vmctl, [.. vmctl, "list"], []),
            ("vmctl list --json", TestEnvironment.Vmctl, [.. vmctl, "list", "--json"], []),
            ("vmctl --version (start-up only)", TestEnvironment.Vmctl, ["--version"], []),
            ("psql, the same rows", TestEnvironment.FindOnPath("psql")!,
                ["-X", "-q", "-h", Path.Combine(kvmd.StateDir, "postgres", "run"), "-U", Kvm.Inventory.Embedded.EmbeddedPostgres.SuperUser, "-d", "kvm", "-c", query], []),
        };
        foreach (var row in rows)
            CheckListing(row.Name, RunOk(row.File, row.Args).Stdout, row.Args.Contains("list") || row.File.EndsWith("psql", StringComparison.Ordinal) ? s.Vms : 0);
        for (int r = 0; r < runs; r++)
        {
            foreach (var row in rows)
                row.Times.Add(RunOk(row.File, row.Args).Milliseconds);
            Console.Error.WriteLine($"list run {r + 1}/{runs}: {string.Join(", ", rows.Select(x => $"{x.Name} {x.Times[^1]:0} ms"))}");
        }

        Console.WriteLine($"kvmd: listing {s.Vms} VMs, created and not started ({started}, {Place.ForDisk})");
        Console.WriteLine($"over the RPC (one connection, {s.Calls} calls per row after {WarmUpCalls} untimed; the reply with {s.Vms} VMs is {bytes / 1024.0:0.0} KiB)");
        Console.WriteLine($"{"",-40}{"median ms",11}{"p99 ms",11}{"mean ms",11}{"min ms",11}{"ratio",8}");
        CallRow("vm.list, empty inventory", empty, Median(empty));
        CallRow($"vm.list, {s.Vms} VMs", full, Median(empty));
        CallRow("vm.create (the VMs above, one call each)", creates, Median(empty));
        Console.WriteLine("  ratio = row / vm.list of the empty inventory (median)");
        Console.WriteLine($"processes ({runs} runs each, alternating)");
        Console.WriteLine($"{"",-40}{"median ms",11}{"mean ms",11}{"min ms",11}{"max ms",11}{"ratio",8}");
        double peer = Median(rows[^1].Times);
        foreach (var row in rows)
            Console.WriteLine($"{row.Name,-40}{Median(row.Times),11:0.0}{row.Times.Average(),11:0.0}{row.Times.Min(),11:0.0}{row.Times.Max(),11:0.0}{Median(row.Times) / peer,8:0.00}");
        Console.WriteLine($"  ratio = row / psql (median); below 1 means faster than psql.  Load average {load} before, {LoadAverage()} after");

        for (int i = 1; i <= s.Vms; i++)
            rpc.Call("vm.delete", $"{{\"name\":\"list-{i}\"}}").Dispose();
    }

    /// <summary>A listing names every VM (or, for the start-up row, prints a version).</summary>
    private static void CheckListing(string row, string stdout, int vms)
    {
        int named = Enumerable.Range(1, vms).Count(i => stdout.Contains($"list-{i}", StringComparison.Ordinal));
        if (named != vms || stdout.Length == 0)
            throw new BenchmarkFailure($"{row} printed {named} of the {vms} VMs: {stdout[..Math.Min(stdout.Length, 300)]}");
    }

    // ---- rpc --------------------------------------------------------------------------------

    private static void RpcPart(KvmdInstance kvmd, Settings s)
    {
        string started = Now();
        string load = LoadAverage();
        RunOk(TestEnvironment.Vmctl, ["--connect", kvmd.Socket, "create", "rpc", "--kernel", TestEnvironment.GuestKit, "--cmdline", Workload,
            "--memory", Memory, "--start"]);
        string control, consoleSocket;
        using (var rpc = LineClient.Connect(kvmd.Socket, Limit))
        using (var shown = rpc.Call("vm.show", "{\"name\":\"rpc\"}"))
        {
            var r = shown.RootElement.GetProperty("result");
            control = r.GetProperty("controlSocket").GetString()!;
            consoleSocket = r.GetProperty("consoleSocket").GetString()!;
        }
        FirstLine(consoleSocket, Stopwatch.StartNew(), Limit);

        string qmpSocket = Path.Combine(kvmd.Folder, "qmp.sock");
        using var qemu = LiveProcess.Start(TestEnvironment.FindOnPath("qemu-system-x86_64")!, [.. QemuArgs(), "-qmp", $"unix:{qmpSocket},server=on,wait=off"]);
        try
        {
            if (!qemu.WaitFor(Marker, Limit))
                throw new BenchmarkFailure($"QEMU did not print '{Marker}': {qemu.Tail()} {(qemu.Process.HasExited ? qemu.Stderr.Result : "")}");
            using var vmm = LineClient.Connect(control, Limit);
            using var daemon = LineClient.Connect(kvmd.Socket, Limit);
            using var qmp = LineClient.ConnectQmp(qmpSocket, Limit);
            using (var st = vmm.Call("status"))
                Expect(st.RootElement.GetProperty("result").GetProperty("state").GetString() == "running", "kvm-vmm's status is not 'running'", st);
            using (var st = qmp.Qmp("query-status"))
                Expect(st.RootElement.GetProperty("return").GetProperty("running").GetBoolean(), "QEMU's query-status is not running", st);

            var rows = new (string Name, Action Call, List<double> Times)[]
            {
                ("kvm-vmm control socket: status", () => vmm.Call("status").Dispose(), []),
                ("kvm-vmm: connect, status, close", () =>
                {
                    using var fresh = LineClient.Connect(control, Limit);
                    fresh.Call("status").Dispose();
                }, []),
                ("kvmd: vm.show (inventory + status)", () => daemon.Call("vm.show", "{\"name\":\"rpc\"}").Dispose(), []),
                ("kvmd: daemon.status (no inventory)", () => daemon.Call("daemon.status").Dispose(), []),
                ("QEMU QMP: query-status", () => qmp.Qmp("query-status").Dispose(), []),
            };
            for (int i = 0; i < WarmUpCalls; i++)
                foreach (var row in rows)
                    row.Call();
            for (int i = 0; i < s.Calls; i++)
            {
                foreach (var row in rows)
                {
                    long t = Stopwatch.GetTimestamp();
                    row.Call();
                    row.Times.Add(Stopwatch.GetElapsedTime(t).TotalMilliseconds * 1000);
                }
            }

            Console.WriteLine($"kvmd: RPC round trip on a running VM, one connection per server, calls interleaved ({started}, {Place.ForVm})");
            Console.WriteLine($"guest: guest kit '{Workload}' (prints its line, then halts its vCPU), 1 vCPU, {Memory}, under kvmd and under QEMU microvm with -qmp; " +
                              $"{s.Calls} calls per row after {WarmUpCalls} untimed; one client for both protocols (a JSON text per line, parsed)");
            Console.WriteLine($"{"",-40}{"median us",11}{"p99 us",11}{"mean us",11}{"min us",11}{"ratio",8}");
            double peer = Median(rows[^1].Times);
            foreach (var row in rows)
                CallRow(row.Name, row.Times, peer, "0");
            Console.WriteLine($"  ratio = row / QEMU's query-status (median); below 1 means faster than QEMU.  Load average {load} before, {LoadAverage()} after");
        }
        finally
        {
            qemu.Dispose();
            File.Delete(qmpSocket);
            using var rpc = RpcClient.Connect(kvmd.Socket, "kvmd");
            rpc.CallAsync("vm.delete", new DeleteVmRequest("rpc", Force: true), KvmdJson.Default.DeleteVmRequest, KvmdJson.Default.VmInfo)
                .WaitAsync(Limit).GetAwaiter().GetResult();
        }
    }

    private static void Expect(bool condition, string what, JsonDocument reply)
    {
        if (!condition)
            throw new BenchmarkFailure($"{what}: {reply.RootElement.GetRawText()}");
    }

    // ---- boot -------------------------------------------------------------------------------

    private static void BootPart(KvmdInstance kvmd, Settings s)
    {
        int runs = s.Runs ?? 5;
        string started = Now();
        string load = LoadAverage();
        string[] vmctl = ["--connect", kvmd.Socket];
        string[] spec = ["--kernel", TestEnvironment.GuestKit, "--cmdline", Workload, "--memory", Memory];
        string qemu = TestEnvironment.FindOnPath("qemu-system-x86_64")!;
        var breakdown = new List<(double Create, double Start, double Console)>();
        int vm = 0;

        // Through kvmd: vmctl create, vmctl start, then the VM's console socket (it replays what the
        // guest printed before the client attached), until the line.
        double CreateThenStart()
        {
            string name = $"boot-{++vm}";
            var clock = Stopwatch.StartNew();
            double create = RunOk(TestEnvironment.Vmctl, [.. vmctl, "create", name, .. spec]).Milliseconds;
            double start = RunOk(TestEnvironment.Vmctl, [.. vmctl, "start", name]).Milliseconds;
            double before = clock.Elapsed.TotalMilliseconds;
            FirstLine(Path.Combine(kvmd.RunDir, "vms", name, "console.sock"), clock, Limit);
            double total = clock.Elapsed.TotalMilliseconds;
            breakdown.Add((create, start, total - before));
            Delete(kvmd, name);
            return total;
        }

        double CreateStarting()
        {
            string name = $"boot-{++vm}";
            var clock = Stopwatch.StartNew();
            RunOk(TestEnvironment.Vmctl, [.. vmctl, "create", name, .. spec, "--start"]);
            FirstLine(Path.Combine(kvmd.RunDir, "vms", name, "console.sock"), clock, Limit);
            double total = clock.Elapsed.TotalMilliseconds;
            Delete(kvmd, name);
            return total;
        }

        var rows = new (string Name, Func<double> Time, List<double> Times)[]
        {
            ("kvmd: vmctl create + vmctl start", CreateThenStart, []),
            ("kvmd: vmctl create --start", CreateStarting, []),
            ("vmctl run", () => ToLine(TestEnvironment.Vmctl, ["run", .. spec]), []),
            ("qemu-system-x86_64 (microvm)", () => ToLine(qemu, QemuArgs()), []),
        };
        // One untimed run of each warms the page cache.
        foreach (var row in rows)
            row.Time();
        breakdown.Clear();
        for (int r = 0; r < runs; r++)
        {
            foreach (var row in rows)
                row.Times.Add(row.Time());
            Console.Error.WriteLine($"boot run {r + 1}/{runs}: {string.Join(", ", rows.Select(x => $"{x.Name} {x.Times[^1]:0} ms"))}");
        }

        Console.WriteLine($"kvmd: from the VM's creation to the guest's first console line '{Marker}', {runs} runs each, alternating ({started}, {Place.ForVm})");
        Console.WriteLine($"guest: guest kit, 1 vCPU, {Memory}; through kvmd the clock runs from 'vmctl create' until the VM's console " +
                          "socket shows the line; vmctl run and QEMU from their start until their stdout shows it");
        Console.WriteLine($"{"",-40}{"median ms",11}{"mean ms",11}{"min ms",11}{"vs run",8}{"vs qemu",8}");
        double run = Median(rows[2].Times), peer = Median(rows[3].Times);
        foreach (var row in rows)
            Console.WriteLine($"{row.Name,-40}{Median(row.Times),11:0.0}{row.Times.Average(),11:0.0}{row.Times.Min(),11:0.0}" +
                              $"{Median(row.Times) / run,8:0.00}{Median(row.Times) / peer,8:0.00}");
        Console.WriteLine($"  'kvmd: vmctl create + vmctl start' (median ms): vmctl create {Median(breakdown.Select(b => b.Create)):0}, " +
                          $"vmctl start {Median(breakdown.Select(b => b.Start)):0}, then the console {Median(breakdown.Select(b => b.Console)):0}");
        Console.WriteLine($"  ratios: row / vmctl run and row / QEMU (medians); below 1 means faster.  Load average {load} before, {LoadAverage()} after");
    }

    private static void Delete(KvmdInstance kvmd, string name)
    {
        using var rpc = RpcClient.Connect(kvmd.Socket, "kvmd");
        rpc.CallAsync("vm.delete", new DeleteVmRequest(name, Force: true), KvmdJson.Default.DeleteVmRequest, KvmdJson.Default.VmInfo)
            .WaitAsync(Limit).GetAwaiter().GetResult();
    }

    /// <summary>QEMU microvm with the guest kit, as ENVIRONMENT.md runs it, without the debug-exit device (the guest halts after its line).</summary>
    private static string[] QemuArgs() =>
    [
        "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-m", Memory, "-kernel", TestEnvironment.GuestKit, "-append", Workload,
    ];

    /// <summary>Milliseconds from a program's start until its stdout shows the line; then it is killed.</summary>
    private static double ToLine(string file, string[] args)
    {
        var clock = Stopwatch.StartNew();
        using var p = TestEnvironment.StartRedirected(file, args);
        p.StandardInput.Close();
        var stderr = p.StandardError.ReadToEndAsync();
        var text = new StringBuilder();
        var reader = Task.Run(() =>
        {
            var buffer = new char[4096];
            int n;
            while ((n = p.StandardOutput.Read(buffer, 0, buffer.Length)) > 0)
            {
                text.Append(buffer, 0, n);
                string seen = text.ToString();
                if (seen.Contains(Marker, StringComparison.Ordinal))
                    return clock.Elapsed.TotalMilliseconds;
                if (seen.Contains(GuestError, StringComparison.Ordinal))
                    return -1;
            }
            return -1;
        });
        bool done = reader.Wait(Limit);
        double ms = done ? reader.Result : -1;
        Prerequisites.EndAndDrain(p, reader);
        if (ms < 0)
            throw new BenchmarkFailure($"{file} {string.Join(' ', args)} did not print '{Marker}' " +
                                       $"({(done ? "the guest printed an error, or the program ended" : $"within {Limit.TotalSeconds} s")}); " +
                                       $"its output: '{text.ToString().Trim()}', stderr: '{(stderr.Wait(TimeSpan.FromSeconds(5)) ? stderr.Result.Trim() : "")}'");
        return ms;
    }

    /// <summary>Connects to a VM's console socket and reads until the line; returns <paramref name="clock"/>'s milliseconds then.</summary>
    private static double FirstLine(string consoleSocket, Stopwatch clock, TimeSpan limit)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = (int)limit.TotalMilliseconds };
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(consoleSocket));
            var text = new StringBuilder();
            var buffer = new byte[4096];
            int n;
            while ((n = socket.Receive(buffer)) > 0)
            {
                text.Append(Encoding.UTF8.GetString(buffer, 0, n));
                string seen = text.ToString();
                if (seen.Contains(Marker, StringComparison.Ordinal))
                    return clock.Elapsed.TotalMilliseconds;
                if (seen.Contains(GuestError, StringComparison.Ordinal))
                    break;
            }
            throw new BenchmarkFailure($"the console {consoleSocket} showed no '{Marker}': '{text.ToString().Trim()}'");
        }
        catch (SocketException e)
        {
            throw new BenchmarkFailure($"the console {consoleSocket}: {e.Message}");
        }
    }

    // ---- takeover ---------------------------------------------------------------------------

    private sealed record LeaseSetting(string Name, double Duration, double Renew, double Margin)
    {
        public string[] Args =>
        [
            "--lease-duration", Duration.ToString(CultureInfo.InvariantCulture), "--lease-renew", Renew.ToString(CultureInfo.InvariantCulture),
            "--fence-margin", Margin.ToString(CultureInfo.InvariantCulture),
        ];
    }

    /// <summary>One freeze: seconds after it until B ran the VM, A's VM ended (its fence), and A's lease expired.</summary>
    private sealed record TakeoverTimes(double Running, double? Fenced, double? Expired);

    private static void TakeoverPart(string aFolder, string bFolder, Settings s)
    {
        var defaults = new KvmdOptions();
        var settings = new[]
        {
            new LeaseSetting("defaults", defaults.LeaseDuration.TotalSeconds, defaults.LeaseRenewInterval.TotalSeconds, defaults.FenceMargin.TotalSeconds),
            new LeaseSetting("shorter", s.ShortLease,
                Math.Round(s.ShortLease * defaults.LeaseRenewInterval / defaults.LeaseDuration, 3),
                Math.Round(s.ShortLease * defaults.FenceMargin / defaults.LeaseDuration, 3)),
        };
        string started = Now();
        string load = LoadAverage();
        var results = new List<(LeaseSetting Setting, List<TakeoverTimes> Runs)>();
        foreach (var setting in settings)
        {
            var runs = new List<TakeoverTimes>();
            results.Add((setting, runs));
            // A with its private cluster (made by an earlier part, or now), B on A's cluster; the defaults run with no lease options at all.
            using var a = KvmdInstance.Start(aFolder, "bench-a", setting.Name == "defaults" ? [] : setting.Args);
            using var b = KvmdInstance.Start(bFolder, "bench-b", [.. setting.Name == "defaults" ? [] : setting.Args, "--database", a.SharedDatabase]);
            for (int r = 1; r <= s.TakeoverRuns; r++)
            {
                runs.Add(FreezeOnce(a, b, $"takeover-{setting.Name}-{r}", setting));
                var t = runs[^1];
                Console.Error.WriteLine($"takeover {setting.Name} run {r}/{s.TakeoverRuns}: B ran the VM {t.Running:0.00} s after A froze " +
                                        $"(A's VM fenced at {Seconds(t.Fenced)} s, A's lease expired at {Seconds(t.Expired)} s)");
            }
            b.Stop(Limit);
            a.Stop(Limit);
        }

        Console.WriteLine($"kvmd: lease takeover: host A's kvmd frozen (SIGSTOP) while its VM runs; host B on the same PostgreSQL (A's private cluster) " +
                          $"takes the VM over ({started}, {Place.ForVm})");
        Console.WriteLine("seconds after the freeze: B runs the VM (vm.show on B: host B, running); A's VM ended by its fence (its exit record); " +
                          "A's lease expired (lease.broken's expired_at); expiry to running on B; ratio = B runs / lease duration");
        Console.WriteLine($"{"setting",-10}{"lease s",9}{"renew s",9}{"margin s",9}{"run",5}{"B runs",9}{"fenced",9}{"expired",9}{"exp->run",10}{"ratio",8}");
        foreach (var (setting, runs) in results)
        {
            for (int i = 0; i < runs.Count; i++)
            {
                var t = runs[i];
                Console.WriteLine($"{setting.Name,-10}{setting.Duration,9:0.##}{setting.Renew,9:0.##}{setting.Margin,9:0.##}{i + 1,5}{t.Running,9:0.00}" +
                                  $"{Seconds(t.Fenced),9}{Seconds(t.Expired),9}{Seconds(t.Running - t.Expired),10}{t.Running / setting.Duration,8:0.00}");
            }
            if (runs.Count > 1)
            {
                double m = Median(runs.Select(t => t.Running));
                Console.WriteLine($"{setting.Name,-10}{"",27}{"med",5}{m,9:0.00}{Seconds(MedianOrNull(runs.Select(t => t.Fenced))),9}" +
                                  $"{Seconds(MedianOrNull(runs.Select(t => t.Expired))),9}{Seconds(MedianOrNull(runs.Select(t => t.Running - t.Expired))),10}{m / setting.Duration,8:0.00}");
            }
        }
        Console.WriteLine($"  kvmd renews every 'renew s' and a VM fences itself 'margin s' before its lease could expire; B looks for expired leases " +
                          $"every {defaults.TakeoverInterval.TotalSeconds:0.##} s.  Load average {load} before, {LoadAverage()} after");
    }

    /// <summary>Starts a VM on A, freezes A, and times B's takeover; continues A and deletes the VM afterwards.</summary>
    private static TakeoverTimes FreezeOnce(KvmdInstance a, KvmdInstance b, string name, LeaseSetting setting)
    {
        RunOk(TestEnvironment.Vmctl, ["--connect", a.Socket, "create", name, "--kernel", TestEnvironment.GuestKit, "--cmdline", Workload,
            "--memory", Memory, "--start"]);
        FirstLine(Path.Combine(a.RunDir, "vms", name, "console.sock"), Stopwatch.StartNew(), Limit);
        Thread.Sleep(TimeSpan.FromSeconds(setting.Renew * 1.5)); // a renewal or two: A's lease is in its steady state
        using var onB = RpcClient.Connect(b.Socket, "kvmd B");
        long newest = onB.CallAsync("events.wait", new EventsRequest(After: -1), KvmdJson.Default.EventsRequest, KvmdJson.Default.EventList)
            .WaitAsync(Limit).GetAwaiter().GetResult().Newest;
        using var poll = LineClient.Connect(b.Socket, Limit);
        string show = $"{{\"name\":\"{name}\"}}";

        var frozenAt = DateTimeOffset.UtcNow;
        var clock = Stopwatch.StartNew();
        if (!a.Signal(19)) // SIGSTOP
            throw new BenchmarkFailure("cannot freeze host A's kvmd");
        double running;
        var events = new List<EventInfo>();
        try
        {
            // B's events, waited for (a long poll, no load on B meanwhile) until B takes the VM
            // over; then vm.show on B until B runs it.
            var limit = TimeSpan.FromSeconds(setting.Duration) + Limit;
            long after = newest;
            while (!events.Any(e => e.Kind == "vm.takeover" && e.Subject == $"vm/{name}"))
            {
                var left = limit - clock.Elapsed;
                if (left <= TimeSpan.Zero)
                    throw new BenchmarkFailure($"B did not take VM '{name}' over within {limit.TotalSeconds:0} s of A's freeze");
                var list = onB.CallAsync("events.wait", new EventsRequest(After: after, TimeoutSeconds: Math.Min(left.TotalSeconds, 30)),
                    KvmdJson.Default.EventsRequest, KvmdJson.Default.EventList).WaitAsync(Limit).GetAwaiter().GetResult();
                events.AddRange(list.Events);
                after = list.Last;
            }
            while (true)
            {
                using (var shown = poll.Call("vm.show", show))
                {
                    var vm = shown.RootElement.GetProperty("result").GetProperty("vm");
                    if (vm.TryGetProperty("host", out var host) && host.GetString() == b.HostName && vm.GetProperty("actualState").GetString() == "running")
                    {
                        running = clock.Elapsed.TotalSeconds;
                        break;
                    }
                }
                if (clock.Elapsed > limit)
                    throw new BenchmarkFailure($"B took VM '{name}' over but did not run it within {limit.TotalSeconds:0} s of A's freeze");
                Thread.Sleep(10);
            }
        }
        finally
        {
            a.Signal(18); // SIGCONT
        }

        // When A's VM ended (its kvm-vmm's exit record) and when A's lease expired (the event of B breaking it).
        var exit = VmHost.ReadExitRecord(Path.Combine(a.RunDir, "vms", name, "exit.json"));
        double? fenced = exit is not null && exit.Fenced ? (exit.At - frozenAt).TotalSeconds : null;
        double? expired = null;
        if (events.FirstOrDefault(e => e.Kind == "lease.broken" && e.Subject == $"vm/{name}") is { } broken
            && broken.Data.TryGetProperty("expired_at", out var at) && at.ValueKind == JsonValueKind.String
            && DateTimeOffset.TryParse(at.GetString(), CultureInfo.InvariantCulture, out var expiry))
            expired = (expiry - frozenAt).TotalSeconds;

        onB.CallAsync("vm.delete", new DeleteVmRequest(name, Force: true), KvmdJson.Default.DeleteVmRequest, KvmdJson.Default.VmInfo)
            .WaitAsync(Limit).GetAwaiter().GetResult();
        // A, continued, finds its lease lost at its next renewal; then the next run may freeze it again.
        Thread.Sleep(TimeSpan.FromSeconds(setting.Renew * 2));
        return new TakeoverTimes(running, fenced, expired);
    }

    private static string Seconds(double? s) => s is { } v ? v.ToString("0.00", CultureInfo.InvariantCulture) : "-";

    private static double? MedianOrNull(IEnumerable<double?> values)
    {
        var v = values.Where(x => x is not null).Select(x => x!.Value).ToList();
        return v.Count == 0 ? null : Median(v);
    }

    // ---- shared -----------------------------------------------------------------------------

    private sealed record Ran(string Stdout, double Milliseconds);

    /// <summary>Runs a program to its end; its wall time; any status but 0 is a failure naming the command and what it said.</summary>
    private static Ran RunOk(string file, string[] args)
    {
        var clock = Stopwatch.StartNew();
        ProcessResult r;
        try
        {
            r = TestEnvironment.RunProcess(file, args, Limit);
        }
        catch (TimeoutException e)
        {
            throw new BenchmarkFailure(e.Message);
        }
        double ms = clock.Elapsed.TotalMilliseconds;
        if (r.ExitCode != 0)
            throw new BenchmarkFailure($"{file} {string.Join(' ', args)} exited with status {r.ExitCode}: {r.Stderr.Trim()} {r.Stdout.Trim()}");
        return new Ran(r.Stdout, ms);
    }

    /// <summary>Times <paramref name="calls"/> calls (milliseconds each) after <see cref="WarmUpCalls"/> untimed ones.</summary>
    private static List<double> TimeCalls(int calls, Action call)
    {
        for (int i = 0; i < WarmUpCalls; i++)
            call();
        var times = new List<double>(calls);
        for (int i = 0; i < calls; i++)
        {
            long t = Stopwatch.GetTimestamp();
            call();
            times.Add(Stopwatch.GetElapsedTime(t).TotalMilliseconds);
        }
        return times;
    }

    private static void CallRow(string name, List<double> v, double peer, string format = "0.00") =>
        Console.WriteLine($"{name,-40}{Median(v).ToString(format, CultureInfo.InvariantCulture),11}" +
                          $"{Percentile(v, 0.99).ToString(format, CultureInfo.InvariantCulture),11}{v.Average().ToString(format, CultureInfo.InvariantCulture),11}" +
                          $"{v.Min().ToString(format, CultureInfo.InvariantCulture),11}{Median(v) / peer,8:0.00}");

    private static double Median(IEnumerable<double> values) => Percentile(values.ToList(), 0.5);

    /// <summary>The value at or below which the fraction <paramref name="p"/> of the values lie (0.5 of an even count: the mean of the middle two).</summary>
    private static double Percentile(List<double> values, double p)
    {
        var s = values.Order().ToArray();
        if (s.Length == 0)
            return double.NaN;
        if (p == 0.5)
            return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
        return s[Math.Clamp((int)Math.Ceiling(p * s.Length) - 1, 0, s.Length - 1)];
    }

    private static string Now() => $"{DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC";

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));
}
