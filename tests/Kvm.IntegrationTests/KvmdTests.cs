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

    private readonly string _dir;
    private readonly List<KvmdInstance> _daemons = [];
    private readonly HashSet<int> _vmPids = [];

    public KvmdTests()
    {
        _dir = Directory.CreateTempSubdirectory("kvmd-").FullName;
        // kvmd's private cluster runs as the 'postgres' user, which must reach its directory.
        File.SetUnixFileMode(_dir, (UnixFileMode)0b111_101_101);
    }

    private string Socket => KvmdInstance.SocketIn(_dir);
    private string RunDir => Path.Combine(_dir, "run");

    private static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        foreach (var p in new[] { TestEnvironment.Kvmd, TestEnvironment.KvmVmm, TestEnvironment.Vmctl })
            if (!File.Exists(p))
                throw new SkipException($"{p} is missing (run 'make' first)");
        if (TestEnvironment.FindOnPath("initdb") is null && !Directory.Exists("/usr/lib/postgresql"))
            throw new SkipException("PostgreSQL's server programs are missing (apt-get install postgresql)");
    }

    /// <summary>Starts kvmd (host "test-host", files in the test's folder) and waits until it answers.</summary>
    private LiveProcess StartKvmd() => StartKvmd(_dir, "test-host", []);

    private LiveProcess StartKvmd(string folder, string host, IEnumerable<string> more)
    {
        var kvmd = KvmdInstance.Start(folder, host, more);
        _daemons.Add(kvmd);
        return kvmd.Process;
    }

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
        await using var db = await InventoryDatabase.OpenAsync(new InventoryOptions { ConnectionString = KvmdInstance.DatabaseIn(_dir) });
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
        if (listed.Pid is { } pid)
            _vmPids.Add(pid);
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
        StartKvmd();
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
        var first = StartKvmd();
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
        StartKvmd();
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
    /// kvm-vmm ended before B took the lease.
    /// </summary>
    [SkippableFact]
    public void TwoHostsNeverRunOneVmAtOnceWhenTheOwnerFreezes()
    {
        Require();
        var a = StartKvmd();
        string bSocket = StartHostB();
        Assert.Equal(["host-b", "test-host"], JsonSerializer.Deserialize(VmctlOk("hosts", "--json"), KvmdJson.Default.HostList)!.Hosts.Select(h => h.Name).Order());

        Create("ha", "tick period=50");
        VmctlOk("start", "ha");
        AssertAgrees("ha", "running", "running");
        int pidOnA = Show("ha").Vm.Pid!.Value;
        using (var console = Console("ha"))
            Assert.True(console.WaitForTick(3), console.Text);
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
        _vmPids.Add(pidOnB);
        Thread.Sleep(5000); // A's renewal rounds
        var seenByA = Show("ha").Vm;
        Assert.Equal("host-b", seenByA.Host);
        Assert.Equal("running", seenByA.ActualState);
        Assert.Null(seenByA.Pid);
        Assert.True(Directory.Exists($"/proc/{pidOnB}"), "B's VM stopped");
        var detailOnB = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "show", "ha", "--json"), KvmdJson.Default.VmDetail)!;
        using (var console = new ConsoleClient(detailOnB.ConsoleSocket!))
            Assert.True(console.WaitForTick(3), console.Text);
        var stop = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "stop", "ha", "--json"), KvmdJson.Default.VmStopped)!;
        Assert.Equal("guest", stop.Outcome);
        AssertAgrees("ha", "stopped", "stopped");

        Kvm.Interop.Native.Libc.Kill(a.Process.Id, 15);
        Assert.True(a.WaitForExit(Timeout));
        Assert.Contains("fenced", a.Stderr.Result, StringComparison.Ordinal);
    }

    /// <summary>Starts a second host, "host-b", whose inventory is the first host's cluster (a shared one); returns its socket.</summary>
    private string StartHostB()
    {
        string bDir = Path.Combine(_dir, "b");
        StartKvmd(bDir, "host-b", ["--database", KvmdInstance.DatabaseIn(_dir)]);
        return KvmdInstance.SocketIn(bDir);
    }

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
        string disk = Path.Combine(_dir, "shared.raw");
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

        long before = JsonSerializer.Deserialize(VmctlOkAt(bSocket, "events", "--after", "0", "--json").Split('\n', StringSplitOptions.RemoveEmptyEntries).Last(), KvmdJson.Default.EventInfo)!.Id;
        VmctlOk("stop", "x", "--force");
        var released = VmctlOkAt(bSocket, "events", "--after", before.ToString(System.Globalization.CultureInfo.InvariantCulture), "--json");
        Assert.Contains("reservation.released", released, StringComparison.Ordinal);
        Assert.Empty(Assert.Single(JsonSerializer.Deserialize(VmctlOk("disks", "--json"), KvmdJson.Default.DiskList)!.Disks, d => d.Path == disk).Reservations);

        VmctlOkAt(bSocket, "start", "y");
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

    public void Dispose()
    {
        // A clean stop: kvmd stops its private PostgreSQL cluster.
        foreach (var d in _daemons)
            d.Dispose();
        foreach (int pid in _vmPids)
            Kvm.Interop.Native.Libc.Kill(pid, 9);
        // Any VM a failed test left running (VMs outlive kvmd by design), and a cluster left by a
        // kvmd that was killed.
        KvmdInstance.KillLeftovers(_dir);
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
