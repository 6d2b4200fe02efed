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

    /// <summary>kvmd's first start makes its PostgreSQL cluster: minutes in the nested KVM host.</summary>
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(400);
    private readonly string _dir;
    private readonly List<LiveProcess> _daemons = [];
    private readonly HashSet<int> _vmPids = [];

    public KvmdTests()
    {
        _dir = Directory.CreateTempSubdirectory("kvmd-").FullName;
        // kvmd's private cluster runs as the 'postgres' user, which must reach its directory.
        File.SetUnixFileMode(_dir, (UnixFileMode)0b111_101_101);
    }

    private string Socket => Path.Combine(_dir, "kvmd.sock");
    private string StateDir => Path.Combine(_dir, "state");
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

    /// <summary>Starts kvmd and waits until it answers.</summary>
    private LiveProcess StartKvmd()
    {
        var kvmd = LiveProcess.Start(TestEnvironment.Kvmd,
            ["--socket", Socket, "--state-dir", StateDir, "--run-dir", RunDir, "--host-name", "test-host", "--group", "nonexistent-group"]);
        _daemons.Add(kvmd);
        bool up = SpinWait.SpinUntil(() =>
        {
            if (kvmd.Process.HasExited)
                return true;
            try
            {
                using var c = RpcClient.Connect(Socket, "kvmd");
                c.CallAsync("daemon.status", KvmdJson.Default.DaemonStatus).WaitAsync(TimeSpan.FromSeconds(10)).GetAwaiter().GetResult();
                return true;
            }
            catch (Exception e) when (e is RpcException or TimeoutException)
            {
                Thread.Sleep(100);
                return false;
            }
        }, StartTimeout);
        if (kvmd.Process.HasExited || !up)
            Assert.Fail($"kvmd did not come up (exited: {kvmd.Process.HasExited}): {(kvmd.Process.HasExited ? kvmd.Stderr.Result : "")}");
        return kvmd;
    }

    private ProcessResult Vmctl(params string[] args)
    {
        var r = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["--connect", Socket, .. args], Timeout);
        return r;
    }

    private string VmctlOk(params string[] args)
    {
        var r = Vmctl(args);
        Assert.True(r.ExitCode == 0, $"vmctl {string.Join(' ', args)}: status {r.ExitCode}: {r.Stderr}");
        return r.Stdout;
    }

    private VmList List() => JsonSerializer.Deserialize(VmctlOk("list", "--json"), KvmdJson.Default.VmList)!;

    private VmDetail Show(string name) => JsonSerializer.Deserialize(VmctlOk("show", name, "--json"), KvmdJson.Default.VmDetail)!;

    /// <summary>The inventory itself, read from kvmd's private cluster, not through kvmd.</summary>
    private async Task<IReadOnlyList<VmRow>> InventoryVms()
    {
        string cs = new Npgsql.NpgsqlConnectionStringBuilder
        {
            Host = Path.Combine(StateDir, "postgres", "run"),
            Username = Kvm.Inventory.Embedded.EmbeddedPostgres.SuperUser,
            Database = "kvm",
        }.ConnectionString;
        await using var db = await InventoryDatabase.OpenAsync(new InventoryOptions { ConnectionString = cs });
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
            Thread.Sleep(300);
            int atPause = console.LastTick;
            Thread.Sleep(1000);
            Assert.Equal(atPause, console.LastTick);
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
        Thread.Sleep(300);
        int atPause = consoleA.LastTick;
        Thread.Sleep(1000);
        Assert.Equal(atPause, consoleA.LastTick);
        VmctlOk("resume", "a");
        Assert.True(consoleA.WaitForTick(atPause + 3), consoleA.Text);
        Assert.True(consoleA.Text.Split('\n').Count(l => l == "guestkit: tick 1") == 1, "the guest started over: " + consoleA.Text);
        var stop = JsonSerializer.Deserialize(VmctlOk("stop", "a", "--json"), KvmdJson.Default.VmStopped)!;
        Assert.Equal("guest", stop.Outcome);
        AssertAgrees("a", "stopped", "stopped");
    }

    public void Dispose()
    {
        foreach (var d in _daemons)
        {
            if (!d.Process.HasExited)
            {
                // A clean stop: kvmd stops its private PostgreSQL cluster.
                Kvm.Interop.Native.Libc.Kill(d.Process.Id, 15);
                d.WaitForExit(TimeSpan.FromSeconds(30));
            }
            d.Dispose();
        }
        foreach (int pid in _vmPids)
            Kvm.Interop.Native.Libc.Kill(pid, 9);
        // A cluster left by a kvmd that was killed: immediate shutdown (SIGQUIT to the postmaster).
        string pidFile = Path.Combine(StateDir, "postgres", "data", "postmaster.pid");
        if (File.Exists(pidFile) && int.TryParse(File.ReadLines(pidFile).First(), out int postmaster))
            Kvm.Interop.Native.Libc.Kill(postmaster, 3);
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
