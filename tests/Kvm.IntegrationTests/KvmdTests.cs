using System.Text.Json;
using Kvm.Cluster;
using Kvm.Control;
using Kvm.Inventory;
using Kvm.Rpc;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// VMs through kvmd, as a user drives them with vmctl: kvmd with its private PostgreSQL cluster,
/// the guest kit's `tick` workload (a numbered console line every 50 ms; it powers off on the ACPI
/// power button). What kvmd answers is checked against the inventory read directly from its
/// database, and kvmd is killed with SIGKILL while VMs run to check that they never notice.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class KvmdTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(90);
    private readonly KvmdHarness _kvmd = new();

    private string Socket => _kvmd.Socket;
    private string StateDir => _kvmd.StateDir;
    private string RunDir => _kvmd.RunDir;

    private static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        KvmdHarness.RequireKvmd();
    }

    /// <summary>
    /// Starts kvmd (this test's first host) and waits until it answers; on a copy of the template
    /// cluster unless <paramref name="freshCluster"/> lets kvmd make its own, as on a new host.
    /// </summary>
    private LiveProcess StartKvmd(IEnumerable<string>? more = null, bool freshCluster = false) => _kvmd.Start(more, freshCluster);

    private ProcessResult Vmctl(params string[] args) => VmctlAt(Socket, args);

    private static ProcessResult VmctlAt(string socket, params string[] args) =>
        TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["--connect", socket, .. args], Timeout);

    private string VmctlOk(params string[] args) => VmctlOkAt(Socket, args);

    private static string VmctlOkAt(string socket, params string[] args)
    {
        var r = VmctlAt(socket, args);
        Assert.True(r.ExitCode == 0, $"vmctl {string.Join(' ', args)}: status {r.ExitCode}: {r.Stderr}");
        return r.Stdout;
    }

    private VmList List() => JsonSerializer.Deserialize(VmctlOk("list", "--json"), KvmdJson.Default.VmList)!;

    private VmDetail Show(string name) => JsonSerializer.Deserialize(VmctlOk("show", name, "--json"), KvmdJson.Default.VmDetail)!;

    /// <summary>The inventory itself, read from kvmd's private cluster, not through kvmd.</summary>
    private async Task<IReadOnlyList<VmRow>> InventoryVms()
    {
        await using var db = await InventoryDatabase.OpenAsync(new InventoryOptions { ConnectionString = _kvmd.SharedDatabase() });
        return await db.Vms.ListAsync();
    }

    /// <summary>vmctl list and show say what the inventory says: state, desired state, host.</summary>
    private void AssertAgrees(string name, string actual, string desired)
    {
        var listed = Assert.Single(List().Vms, v => v.Name == name);
        var shown = Show(name).Vm;
        var row = Assert.Single(InventoryVms().GetAwaiter().GetResult(), v => v.Name == name);
        Assert.Equal(actual, listed.ActualState);
        Assert.Equal(desired, listed.DesiredState);
        Assert.Equal(StateNames.Of(row.ActualState), listed.ActualState);
        Assert.Equal(StateNames.Of(row.DesiredState), listed.DesiredState);
        Assert.Equal(listed, shown);
        bool running = actual is "running" or "paused";
        Assert.Equal(running, row.OwnerHost is not null);
        Assert.Equal(running ? "test-host" : null, listed.Host);
        Assert.Equal(running, listed.Pid is not null);
    }

    private ConsoleClient Console(string name)
    {
        var endpoint = Show(name).ConsoleSocket ?? throw new Xunit.Sdk.XunitException($"no console socket for {name}");
        return new ConsoleClient(endpoint);
    }

    private void Create(string name, string cmdline) =>
        VmctlOk("create", name, "--kernel", TestEnvironment.GuestKit, "--cmdline", cmdline, "--debug-exit", "--cpus", "2");

    [SkippableFact]
    public void AVmsLifeThroughKvmd()
    {
        Require();
        // As a user meets it: kvmd's first start makes its private cluster (initdb) itself.
        StartKvmd(freshCluster: true);
        Create("life", "tick period=50");
        AssertAgrees("life", "stopped", "stopped");
        var refused = Vmctl("create", "life", "--kernel", TestEnvironment.GuestKit);
        Assert.Equal(1, refused.ExitCode);
        Assert.Contains("already exists", refused.Stderr, StringComparison.Ordinal);

        Assert.Contains("life: running", VmctlOk("start", "life"), StringComparison.Ordinal);
        AssertAgrees("life", "running", "running");
        using (var console = Console("life"))
        {
            Assert.True(console.WaitFor("guestkit: tick pwrbtn armed"), console.Text);
            Assert.True(console.WaitForTick(3), console.Text);

            // Paused: the counter stops; resumed: it goes on.
            VmctlOk("pause", "life");
            AssertAgrees("life", "paused", "paused");
            int atPause = console.AssertStandsStill();
            VmctlOk("resume", "life");
            AssertAgrees("life", "running", "running");
            Assert.True(console.WaitForTick(atPause + 3), console.Text);

            // Stop by ACPI: the guest answers the power button.
            var stop = JsonSerializer.Deserialize(VmctlOk("stop", "life", "--json"), KvmdJson.Default.VmStopped)!;
            Assert.Equal("guest", stop.Outcome);
            Assert.True(console.WaitFor("guestkit: tick pwrbtn pressed"), console.Text);
            Assert.True(console.Closed(TimeSpan.FromSeconds(10)), "the console stayed open after the VM stopped");
        }
        AssertAgrees("life", "stopped", "stopped");
        var shown = Show("life");
        Assert.Null(shown.ConsoleSocket);
        Assert.NotNull(shown.LastExit);
        Assert.False(shown.LastExit.Failed, shown.LastExit.Reason);

        // Again, and this time a guest that ignores the power button, stopped by force.
        VmctlOk("delete", "life");
        Assert.DoesNotContain(List().Vms, v => v.Name == "life");
        Create("life", "tick period=50 pwrbtn=0");
        VmctlOk("start", "life");
        AssertAgrees("life", "running", "running");
        using (var console = Console("life"))
            Assert.True(console.WaitForTick(2), console.Text);
        var deleteRunning = Vmctl("delete", "life");
        Assert.Equal(1, deleteRunning.ExitCode);
        Assert.Contains("is running", deleteRunning.Stderr, StringComparison.Ordinal);
        var forced = JsonSerializer.Deserialize(VmctlOk("stop", "life", "--force", "--json"), KvmdJson.Default.VmStopped)!;
        Assert.Equal("forced", forced.Outcome);
        AssertAgrees("life", "stopped", "stopped");
        VmctlOk("delete", "life");
        Assert.Empty(List().Vms);
        Assert.Empty(InventoryVms().GetAwaiter().GetResult());

        // The events tell the story in order.
        var events = VmctlOk("events", "--after", "0", "--json").Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => JsonSerializer.Deserialize(l, KvmdJson.Default.EventInfo)!).ToList();
        var kinds = events.Where(e => e.Subject == "vm/life").Select(e => e.Kind).ToList();
        Assert.Equal(2, kinds.Count(k => k == "vm.created"));
        Assert.Equal(2, kinds.Count(k => k == "vm.exited"));
        Assert.Equal(2, kinds.Count(k => k == "vm.deleted"));
        Assert.True(events.Zip(events.Skip(1)).All(p => p.First.Id < p.Second.Id));
    }

    [SkippableFact]
    public void KvmdKilledAndStartedAgainWhileVmsRunDisturbsNoVm()
    {
        Require();
        // A lease long enough for the restart on a slow machine: the VMs must not fence meanwhile.
        string[] lease = ["--lease-duration", "60", "--fence-margin", "10"];
        var first = StartKvmd(lease);
        Create("a", "tick period=50");
        Create("b", "tick period=50");
        VmctlOk("start", "a");
        VmctlOk("start", "b");
        AssertAgrees("a", "running", "running");
        AssertAgrees("b", "running", "running");
        int pidA = Show("a").Vm.Pid!.Value, pidB = Show("b").Vm.Pid!.Value;
        using var consoleA = Console("a");
        Assert.True(consoleA.WaitForTick(3), consoleA.Text);

        // kvmd dies without a word; the VMs go on.
        first.Process.Kill();
        Assert.True(first.WaitForExit(Timeout));
        int before = consoleA.LastTick;
        Assert.True(consoleA.WaitForTick(before + 5), consoleA.Text);
        // While no kvmd watches, VM b ends (through its own control socket): the next kvmd must notice.
        using (var control = RpcClient.Connect(Path.Combine(RunDir, "vms", "b", "control.sock"), "b"))
            control.CallAsync("stop", new StopRequest(Force: true), VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult)
                .WaitAsync(Timeout).GetAwaiter().GetResult();
        Assert.True(SpinWait.SpinUntil(() => !Directory.Exists($"/proc/{pidB}"), Timeout), "VM b's kvm-vmm did not exit");

        // A new kvmd finds VM a running (same process) and controls it; VM b is recorded as stopped.
        StartKvmd(lease);
        AssertAgrees("a", "running", "running");
        Assert.Equal(pidA, Show("a").Vm.Pid);
        AssertAgrees("b", "stopped", "stopped");
        Assert.Contains("forced", Show("b").LastExit?.Reason ?? "(no exit record)", StringComparison.Ordinal);
        VmctlOk("pause", "a");
        AssertAgrees("a", "paused", "paused");
        int atPause = consoleA.AssertStandsStill();
        VmctlOk("resume", "a");
        Assert.True(consoleA.WaitForTick(atPause + 3), consoleA.Text);
        Assert.True(consoleA.Text.Split('\n').Count(l => l == "guestkit: tick 1") == 1, "the guest started over: " + consoleA.Text);
        var stop = JsonSerializer.Deserialize(VmctlOk("stop", "a", "--json"), KvmdJson.Default.VmStopped)!;
        Assert.Equal("guest", stop.Outcome);
        AssertAgrees("a", "stopped", "stopped");
    }

    /// <summary>
    /// Two hosts, one inventory (host B uses host A's cluster as its shared one). A VM runs on A;
    /// A's kvmd is frozen (SIGSTOP) past the lease's expiry. A's VM fences itself before the lease
    /// can expire; B breaks the lease (a new generation) and starts the VM; A, continued, finds its
    /// lease lost and records nothing over B's. The VM never runs on both hosts at once: A's
    /// kvm-vmm ended before B took the lease, and the guest's own journal on its disk (blk-log:
    /// each run's tag and a counter) shows A's run, then B's run continuing it, never interleaved.
    /// </summary>
    [SkippableFact]
    public void TwoHostsNeverRunOneVmAtOnceWhenTheOwnerFreezes()
    {
        Require();
        var a = StartKvmd();
        string bSocket = StartHostB();
        Assert.Equal(["host-b", "test-host"], JsonSerializer.Deserialize(VmctlOk("hosts", "--json"), KvmdJson.Default.HostList)!.Hosts.Select(h => h.Name).Order());

        string disk = Path.Combine(_kvmd.Dir, "ha.raw");
        using (var f = File.Create(disk))
            f.SetLength(8 << 20);
        VmctlOk("create", "ha", "--kernel", TestEnvironment.GuestKit, "--cmdline", "blk-log period=50", "--debug-exit", "--disk", disk);
        VmctlOk("start", "ha");
        AssertAgrees("ha", "running", "running");
        int pidOnA = Show("ha").Vm.Pid!.Value;
        using (var console = Console("ha"))
            Assert.True(console.WaitFor("guestkit: blk-log seq 3"), console.Text);
        // B refuses to start a VM whose lease A holds, naming A.
        var refused = VmctlAt(bSocket, "start", "ha");
        Assert.Equal(1, refused.ExitCode);
        Assert.Contains("test-host", refused.Stderr, StringComparison.Ordinal);

        var frozenAt = DateTimeOffset.UtcNow;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Assert.Equal(0, Kvm.Interop.Native.Libc.Kill(a.Process.Id, 19)); // SIGSTOP
        try
        {
            // A's VM stops by itself (its fence), then B takes the VM over.
            Assert.True(SpinWait.SpinUntil(() => Ended(pidOnA), Timeout), "A's VM did not fence itself");
            var exitOnA = VmHost.ReadExitRecord(Path.Combine(RunDir, "vms", "ha", "exit.json"));
            Assert.NotNull(exitOnA);
            Assert.Contains("fenced", exitOnA.Reason, StringComparison.Ordinal);
            Assert.True(exitOnA.Fenced);
            VmInfo? onB = null;
            Assert.True(SpinWait.SpinUntil(() =>
            {
                onB = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "show", "ha", "--json"), KvmdJson.Default.VmDetail)!.Vm;
                if (onB.Host == "host-b" && onB.ActualState == "running")
                    return true;
                Thread.Sleep(200);
                return false;
            }, Timeout), $"B did not take the VM over: {JsonSerializer.Serialize(onB!, KvmdJson.Default.VmInfo)}");
            System.Console.WriteLine($"takeover: the VM ran on host-b {clock.Elapsed.TotalSeconds:0.0} s after host A froze (lease duration 10 s, fence margin 3 s)");

            // A's VM had ended before B took the lease (one clock: this machine's).
            var events = VmctlOkAt(bSocket, "events", "--after", "0", "--json").Split('\n', StringSplitOptions.RemoveEmptyEntries)
                .Select(l => JsonSerializer.Deserialize(l, KvmdJson.Default.EventInfo)!).Where(e => e.Subject == "vm/ha").ToList();
            var broken = Assert.Single(events, e => e.Kind == "lease.broken");
            Assert.True(exitOnA.At < broken.At, $"A's VM ended at {exitOnA.At:O}, after B broke its lease at {broken.At:O}");
            Assert.True(frozenAt < exitOnA.At);
            Assert.Contains(events, e => e.Kind == "vm.takeover" && e.Host == "host-b");
        }
        finally
        {
            Kvm.Interop.Native.Libc.Kill(a.Process.Id, 18); // SIGCONT
        }

        // A, continued, finds its lease lost; the inventory keeps B's record, and B's VM runs on.
        int pidOnB = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "show", "ha", "--json"), KvmdJson.Default.VmDetail)!.Vm.Pid!.Value;
        Thread.Sleep(5000); // A's renewal rounds
        var seenByA = Show("ha").Vm;
        Assert.Equal("host-b", seenByA.Host);
        Assert.Equal("running", seenByA.ActualState);
        Assert.Null(seenByA.Pid);
        Assert.True(Directory.Exists($"/proc/{pidOnB}"), "B's VM stopped");
        var detailOnB = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "show", "ha", "--json"), KvmdJson.Default.VmDetail)!;
        using (var console = new ConsoleClient(detailOnB.ConsoleSocket!))
            Assert.True(console.WaitFor("guestkit: blk-log seq"), console.Text);
        Thread.Sleep(1000); // B's run writes on
        var stop = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "stop", "ha", "--force", "--json"), KvmdJson.Default.VmStopped)!;
        Assert.Equal("forced", stop.Outcome);
        AssertAgrees("ha", "stopped", "stopped");

        // The guest's journal: exactly two runs, one after the other, the second continuing the first.
        var runs = BlkLogJournal.Runs(disk);
        Assert.True(runs.Count == 2, $"expected A's run then B's, found {runs.Count} run(s): {string.Join(", ", runs)}");
        Assert.True(runs[0].Records >= 3 && runs[1].Records >= 3, string.Join(", ", runs));

        Kvm.Interop.Native.Libc.Kill(a.Process.Id, 15);
        Assert.True(a.WaitForExit(Timeout));
        Assert.Contains("fenced", a.Stderr.Result, StringComparison.Ordinal);
    }

    /// <summary>
    /// One host alone. Its kvmd freezes past the lease: its VM fences itself. Continued, the host
    /// finds the VM fenced and still wanted, takes its lease again (a new generation) and starts
    /// it: nobody else would. A VM with restart policy 'on-failure' killed (a crash) is started
    /// again; one with 'always' whose guest ends by itself is started again, up to five quick
    /// times in a row, then left stopped.
    /// </summary>
    [SkippableFact]
    public void ALoneHostRestartsItsFencedVmAndVmsByTheirRestartPolicy()
    {
        Require();
        var kvmd = StartKvmd(["--lease-duration", "6", "--lease-renew", "1", "--fence-margin", "2"]);
        Create("lone", "tick period=50");
        VmctlOk("start", "lone");
        int first = Show("lone").Vm.Pid!.Value;
        long generation = LeaseGeneration("lone");
        Assert.Equal(0, Kvm.Interop.Native.Libc.Kill(kvmd.Process.Id, 19)); // SIGSTOP
        try
        {
            Assert.True(SpinWait.SpinUntil(() => Ended(first), Timeout), $"the VM did not fence itself: {ProcessState(first)}\nits log:\n{VmLog("lone")}");
        }
        finally
        {
            Kvm.Interop.Native.Libc.Kill(kvmd.Process.Id, 18); // SIGCONT
        }
        Assert.True(SpinWait.SpinUntil(() => Show("lone").Vm is { ActualState: "running", Pid: { } p } && p != first, Timeout),
            $"the fenced VM was not started again: {JsonSerializer.Serialize(Show("lone").Vm, KvmdJson.Default.VmInfo)}");
        Assert.True(LeaseGeneration("lone") > generation);
        using (var console = Console("lone"))
            Assert.True(console.WaitForTick(2), console.Text);
        // Recorded as fenced (wanted still), then taken over by this same host.
        var events = Events("lone");
        int fenced = events.FindIndex(e => e.Kind == "vm.actual-state" && e.Data.GetProperty("state").GetString() == "fenced");
        Assert.True(fenced >= 0, $"no fenced state recorded: {string.Join(", ", events.Select(e => e.Kind))}");
        Assert.Contains(events.Skip(fenced), e => e.Kind == "vm.takeover" && e.Host == "test-host");
        VmctlOk("stop", "lone", "--force");
        AssertAgrees("lone", "stopped", "stopped");

        // on-failure: a crash (kvm-vmm killed) is followed by a new start; a stop asked for is not.
        VmctlOk("create", "crashy", "--kernel", TestEnvironment.GuestKit, "--cmdline", "tick period=50", "--debug-exit", "--restart", "on-failure");
        VmctlOk("start", "crashy");
        int crashed = Show("crashy").Vm.Pid!.Value;
        Assert.Equal(0, Kvm.Interop.Native.Libc.Kill(crashed, 9));
        Assert.True(SpinWait.SpinUntil(() => Show("crashy").Vm is { ActualState: "running", Pid: { } p } && p != crashed, Timeout),
            "the crashed VM was not started again");
        Assert.Contains("vm.restarting", Events("crashy").Select(e => e.Kind));
        VmctlOk("stop", "crashy", "--force");
        Thread.Sleep(2000);
        AssertAgrees("crashy", "stopped", "stopped");

        // always: a guest that ends by itself (status 0) is started again; five quick ends in a
        // row, and kvmd gives up.
        VmctlOk("create", "again", "--kernel", TestEnvironment.GuestKit, "--cmdline", "tick period=20 n=5", "--debug-exit", "--restart", "always");
        VmctlOk("start", "again");
        Assert.True(SpinWait.SpinUntil(() => Events("again").Any(e => e.Kind == "vm.restart-abandoned"), TimeSpan.FromSeconds(120)),
            $"kvmd did not give up: {string.Join(", ", Events("again").Select(e => e.Kind))}");
        var again = Events("again");
        Assert.Equal(5, again.Count(e => e.Kind == "vm.restarting"));
        Assert.Equal(6, again.Count(e => e.Kind == "vm.exited"));
        AssertAgrees("again", "stopped", "stopped");
    }

    private string VmLog(string vm)
    {
        string log = Path.Combine(StateDir, "vms", vm, "kvm-vmm.log");
        return File.Exists(log) ? string.Join('\n', File.ReadLines(log).TakeLast(30)) : $"({log} is missing)";
    }

    /// <summary>A process's state and where each of its threads waits, for a failure's message.</summary>
    private static string ProcessState(int pid)
    {
        try
        {
            var lines = new List<string> { File.ReadAllText($"/proc/{pid}/stat") };
            foreach (var task in Directory.EnumerateDirectories($"/proc/{pid}/task"))
                lines.Add($"{Path.GetFileName(task)} {File.ReadAllText(Path.Combine(task, "comm")).Trim()} {File.ReadAllText(Path.Combine(task, "wchan"))} {File.ReadAllText(Path.Combine(task, "stat")).Split(' ')[2]}");
            return string.Join('\n', lines);
        }
        catch (IOException e)
        {
            return e.Message;
        }
    }

    private List<EventInfo> Events(string vm) =>
        VmctlOk("events", "--after", "0", "--json").Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => JsonSerializer.Deserialize(l, KvmdJson.Default.EventInfo)!).Where(e => e.Subject == $"vm/{vm}").ToList();

    private long LeaseGeneration(string vm) =>
        Assert.Single(JsonSerializer.Deserialize(VmctlOk("leases", "--json"), KvmdJson.Default.LeaseList)!.Leases, l => l.Kind == "vm" && l.Resource == vm).Generation;

    /// <summary>Starts a second host, "host-b", whose inventory is the first host's cluster (a shared one); returns its socket.</summary>
    private string StartHostB() => _kvmd.StartHost("host-b");

    /// <summary>
    /// A writable disk is one VM's at a time, across hosts: a VM on host B that wants the disk a VM
    /// on host A runs with is refused, naming that VM and host; once A's VM stops (its reservation
    /// released, with an event), B's starts. Read-only use is shared.
    /// </summary>
    [SkippableFact]
    public void DiskReservationsAcrossTwoHosts()
    {
        Require();
        StartKvmd();
        string bSocket = StartHostB();
        string disk = Path.Combine(_kvmd.Dir, "shared.raw");
        using (var f = File.Create(disk))
            f.SetLength(8 << 20);
        string[] vm = ["--kernel", TestEnvironment.GuestKit, "--cmdline", "tick period=50", "--debug-exit"];
        VmctlOk(["create", "x", .. vm, "--disk", disk]);
        VmctlOkAt(bSocket, ["create", "y", .. vm, "--disk", disk]);
        VmctlOkAt(bSocket, ["create", "ro1", .. vm, "--disk", disk + ",readonly"]);

        VmctlOk("start", "x");
        var refused = VmctlAt(bSocket, "start", "y");
        Assert.Equal(1, refused.ExitCode);
        Assert.Contains("VM 'x' on host 'test-host'", refused.Stderr, StringComparison.Ordinal);
        Assert.Contains("exclusive", refused.Stderr, StringComparison.Ordinal);
        var afterRefusal = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "show", "y", "--json"), KvmdJson.Default.VmDetail)!.Vm;
        Assert.Equal("stopped", afterRefusal.DesiredState);
        Assert.Null(afterRefusal.Host);
        // Read-only is shared with other readers, never with a writer.
        Assert.Equal(1, VmctlAt(bSocket, "start", "ro1").ExitCode);

        var disks = JsonSerializer.Deserialize(VmctlOk("disks", "--json"), KvmdJson.Default.DiskList)!.Disks;
        var entry = Assert.Single(disks, d => d.Path == disk);
        var held = Assert.Single(entry.Reservations);
        Assert.Equal(("exclusive", "test-host", "x"), (held.Mode, held.Host, held.Vm));
        Assert.Contains(JsonSerializer.Deserialize(VmctlOk("leases", "--json"), KvmdJson.Default.LeaseList)!.Leases,
            l => l.Kind == "vm" && l.Resource == "x" && l.Owner == "test-host" && l.ExpiresAt is not null);

        // A start that waits for the disk: it waits (and says so in an event) until A's VM lets go,
        // then starts at once, woken by the release's notification.
        long before = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "events", "--after", "0", "--json").Split('\n', StringSplitOptions.RemoveEmptyEntries).Last(), KvmdJson.Default.EventInfo)!.Id;
        using var waiting = LiveProcess.Start(TestEnvironment.Vmctl, ["--connect", bSocket, "start", "y", "--wait", "300"]);
        Assert.True(SpinWait.SpinUntil(() => VmctlOkAt(bSocket, "events", "--after", "0", "--json").Contains("vm.start-waiting", StringComparison.Ordinal), Timeout),
            "the waiting start recorded no vm.start-waiting event");
        Thread.Sleep(1000);
        if (waiting.Process.HasExited)
            Assert.Fail($"the waiting start ended while the disk was held: {waiting.Output} {waiting.Stderr.Result}");
        VmctlOk("stop", "x", "--force");
        Assert.True(waiting.WaitForExit(Timeout), "the waiting start did not end once the disk was released");
        if (waiting.Process.ExitCode != 0)
            Assert.Fail($"the waiting start failed: {waiting.Stderr.Result}\nevents:\n{VmctlOkAt(bSocket, "events", "--after", before.ToString(System.Globalization.CultureInfo.InvariantCulture), "--json")}");
        Assert.Contains("y: running on host-b", waiting.Output, StringComparison.Ordinal);
        var released = VmctlOkAt(bSocket, "events", "--after", before.ToString(System.Globalization.CultureInfo.InvariantCulture), "--json");
        Assert.Contains("reservation.released", released, StringComparison.Ordinal);
        // A wait that runs out refuses as an immediate start does, naming the holder.
        var stopwatch = System.Diagnostics.Stopwatch.StartNew();
        var timedOut = Vmctl("start", "x", "--wait", "2");
        Assert.Equal(1, timedOut.ExitCode);
        Assert.Contains("VM 'y' on host 'host-b'", timedOut.Stderr, StringComparison.Ordinal);
        Assert.True(stopwatch.Elapsed >= TimeSpan.FromSeconds(2), $"the start waited {stopwatch.Elapsed.TotalSeconds:0.0} s, not 2 s");
        Assert.Equal("stopped", Show("x").Vm.ActualState);

        var nowHeld = Assert.Single(Assert.Single(JsonSerializer.Deserialize(VmctlOk("disks", "--json"), KvmdJson.Default.DiskList)!.Disks, d => d.Path == disk).Reservations);
        Assert.Equal(("exclusive", "host-b", "y"), (nowHeld.Mode, nowHeld.Host, nowHeld.Vm));
        VmctlOkAt(bSocket, "stop", "y", "--force");
        VmctlOkAt(bSocket, "start", "ro1");
        Assert.Equal("shared", Assert.Single(Assert.Single(JsonSerializer.Deserialize(VmctlOk("disks", "--json"), KvmdJson.Default.DiskList)!.Disks, d => d.Path == disk).Reservations).Mode);
        VmctlOkAt(bSocket, "stop", "ro1", "--force");
    }

    /// <summary>Whether process <paramref name="pid"/> has ended: gone, or a zombie its frozen parent cannot reap.</summary>
    private static bool Ended(int pid)
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

    public void Dispose() => _kvmd.Dispose();
}
