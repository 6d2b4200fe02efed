using System.Diagnostics;
using System.Text.Json;
using System.Text.RegularExpressions;
using Kvm.Cluster;
using Kvm.Control;
using Kvm.Rpc;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// Save, start from a snapshot and upgrade in place for VMs kvmd runs, as a user drives them with
/// vmctl (save NAME DIR, start NAME --from DIR, upgrade NAME): kvmd with its private PostgreSQL
/// cluster, the guest kit's tick workload (a numbered console line every 50 ms; it powers off on
/// the ACPI power button). The guest's counter must go on without a gap or a repeat across each
/// operation, and the inventory and its events must tell what happened: a save with stop is a
/// stop, an upgrade is no end of the VM (never a failure of the old process), and a later stop
/// stops the process that runs the VM now.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed partial class KvmdSnapshotTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(120);
    private readonly KvmdHarness _kvmd = new();

    public void Dispose() => _kvmd.Dispose();

    private string Socket => _kvmd.Socket;

    private string P(string name) => Path.Combine(_kvmd.Dir, name);

    private static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        KvmdHarness.RequireKvmd();
    }

    private ProcessResult Vmctl(params string[] args) =>
        TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["--connect", Socket, .. args], Timeout);

    private string VmctlOk(params string[] args)
    {
        var r = Vmctl(args);
        Assert.True(r.ExitCode == 0, $"vmctl {string.Join(' ', args)}: status {r.ExitCode}: {r.Stdout}{r.Stderr}");
        return r.Stdout;
    }

    /// <summary>vmctl's refusal of <paramref name="args"/>: status 1 (2 when <paramref name="usage"/>), its stderr containing <paramref name="why"/>.</summary>
    private void Refused(string why, string[] args, bool usage = false)
    {
        var r = Vmctl(args);
        Assert.True(r.ExitCode == (usage ? 2 : 1), $"vmctl {string.Join(' ', args)}: status {r.ExitCode}: {r.Stdout}{r.Stderr}");
        Assert.Contains(why, r.Stderr, StringComparison.Ordinal);
    }

    private VmDetail Show(string name) => JsonSerializer.Deserialize(VmctlOk("show", name, "--json"), KvmdJson.Default.VmDetail)!;

    private ConsoleClient Console(string name) =>
        new(Show(name).ConsoleSocket ?? throw new Xunit.Sdk.XunitException($"no console socket for {name}"));

    private void Create(string name, string cmdline, string memory = "64M") =>
        VmctlOk("create", name, "--kernel", TestEnvironment.GuestKit, "--cmdline", cmdline, "--debug-exit", "--cpus", "2", "--memory", memory);

    private List<EventInfo> Events(string name) =>
        VmctlOk("events", "--after", "0", "--json").Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => JsonSerializer.Deserialize(l, KvmdJson.Default.EventInfo)!).Where(e => e.Subject == $"vm/{name}").ToList();

    /// <summary>The tick numbers in whole lines of <paramref name="console"/>.</summary>
    private static int[] Ticks(string console) => TickLine().Matches(console)
        .Select(m => int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)).ToArray();

    [GeneratedRegex(@"^guestkit: tick (\d+)\r?\n", RegexOptions.Multiline)]
    private static partial Regex TickLine();

    /// <summary>Whether a kvm-vmm runs as <paramref name="pid"/> (a process that took a VM over is nobody's child here: once it ends it may stay a zombie, with no command line).</summary>
    private static bool Runs(int pid)
    {
        try
        {
            return File.ReadAllText($"/proc/{pid}/cmdline").Contains("kvm-vmm", StringComparison.Ordinal);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>The counter across consoles joined in order: every number from the first on, once each, none missing.</summary>
    private static void AssertCountsOn(string joined, int atLeast)
    {
        var ticks = Ticks(joined);
        Assert.True(ticks.Length >= atLeast, $"only {ticks.Length} ticks:\n{joined}");
        Assert.True(ticks.SequenceEqual(Enumerable.Range(ticks[0], ticks.Length)), $"the counter did not go on by one:\n{joined}");
    }

    /// <summary>Saves VM <paramref name="name"/> with --stop through kvmd once its counter passed <paramref name="tick"/>; returns its console up to the end.</summary>
    private string SaveStopped(string name, string dir, int tick, params string[] more) => SaveStopped(name, dir, tick, out _, more);

    private string SaveStopped(string name, string dir, int tick, out VmSaved saved, params string[] more)
    {
        using var console = Console(name);
        Assert.True(console.WaitForTick(tick), console.Text);
        saved = JsonSerializer.Deserialize(VmctlOk(["save", name, dir, "--stop", "--json", .. more]), KvmdJson.Default.VmSaved)!;
        Assert.Equal(dir, saved.Save.Directory);
        Assert.Equal("stopping", saved.Save.State);
        Assert.True(saved.Save.PausedSeconds > 0 && saved.Save.MemoryBytes == 64UL << 20, JsonSerializer.Serialize(saved));
        Assert.Equal("stopped", saved.Vm.ActualState);
        Assert.Equal("stopped", saved.Vm.DesiredState);
        Assert.Null(saved.Vm.Pid);
        Assert.True(console.Closed(Timeout), "the console stayed open after save --stop");
        return console.Text;
    }

    /// <summary>
    /// 'vmctl save NAME DIR --stop' through kvmd, then 'vmctl start NAME --from DIR': the VM is
    /// recorded as stopped (a stop asked for, "after saving"), not failed; started from the
    /// snapshot it carries on in the same boot, its counter going on from where it was saved. Saved
    /// without stop, it carries on. Once more with a working set and a lazy restore, and at last a
    /// stop by the power button, as for any VM.
    /// </summary>
    [SkippableFact]
    public void SavedWithStopThroughKvmdThenStartedFromTheSnapshotTheCounterGoesOn()
    {
        Require();
        _kvmd.Start();
        // Restart policy "always": a save with stop must not be undone by it.
        VmctlOk("create", "snap", "--kernel", TestEnvironment.GuestKit, "--cmdline", "tick period=50", "--debug-exit", "--cpus", "2",
            "--memory", "64M", "--restart", "always");
        VmctlOk("start", "snap");
        string first = SaveStopped("snap", P("snap1"), 10);
        Assert.True(File.Exists(Path.Combine(P("snap1"), "state")) && File.Exists(Path.Combine(P("snap1"), "memory")));
        var shown = Show("snap");
        Assert.Equal("stopped", shown.Vm.ActualState);
        Assert.NotNull(shown.LastExit);
        Assert.False(shown.LastExit.Failed, shown.LastExit.Reason);
        Assert.Contains($"saving to {P("snap1")}", shown.LastExit.Reason, StringComparison.Ordinal);
        Thread.Sleep(2500); // a restart policy would have started it again by now (1 s)
        Assert.Equal("stopped", Show("snap").Vm.ActualState);

        // Eager, and the vCPUs start where they were saved.
        var started = JsonSerializer.Deserialize(VmctlOk("start", "snap", "--from", P("snap1"), "--json"), KvmdJson.Default.VmInfo)!;
        Assert.Equal("running", started.ActualState);
        Assert.NotNull(started.Pid);
        // Saved without stop, the VM carries on as it was.
        using (var console = Console("snap"))
        {
            Assert.True(console.WaitForTick(Ticks(first).Max() + 5), console.Text);
            var live = JsonSerializer.Deserialize(VmctlOk("save", "snap", P("live"), "--json"), KvmdJson.Default.VmSaved)!;
            Assert.Equal("running", live.Save.State);
            Assert.Equal("running", live.Vm.ActualState);
            Assert.Equal(started.Pid, live.Vm.Pid);
            int atSave = console.LastTick;
            Assert.True(console.WaitForTick(atSave + 5), "the VM did not carry on after the save");
        }
        // With a working set traced for half a second after the save point, which the lazy start below loads first.
        int beforeSave = Ticks(first).Max() + 15;
        string second = SaveStopped("snap", P("snap2"), beforeSave, out var traced, "--working-set", "0.5");
        Assert.True(traced.Save.WorkingSetPages > 0, $"no working set: {traced.Save.WorkingSetSkipped}");
        Assert.DoesNotContain("guestkit: tick pwrbtn armed", second); // no new boot
        AssertCountsOn(first + second, 20);

        // Lazily, from the second snapshot; then stopped as any VM is (the guest answers the power button).
        VmctlOk("start", "snap", "--from", P("snap2"), "--memory", "lazy");
        Assert.Equal("running", Show("snap").Vm.ActualState);
        string third;
        using (var console = Console("snap"))
        {
            Assert.True(console.WaitForTick(Ticks(second).Max() + 10), console.Text);
            var stop = JsonSerializer.Deserialize(VmctlOk("stop", "snap", "--json"), KvmdJson.Default.VmStopped)!;
            Assert.Equal("guest", stop.Outcome);
            Assert.True(console.Closed(Timeout));
            third = console.Text;
        }
        Assert.DoesNotContain("guestkit: tick pwrbtn armed", third);
        // The snapshot is the VM at the save point, before the traced window it then ran on for:
        // the restored counter goes on from there, after the ticks seen before the save began.
        AssertCountsOn(third, 10);
        int from = Ticks(third)[0];
        Assert.True(from > beforeSave && from <= Ticks(second).Max() + 1,
            $"the restored counter starts at {from}; the save began after tick {beforeSave}, the VM stopped after tick {Ticks(second).Max()}");

        var events = Events("snap");
        Assert.DoesNotContain(events, e => e.Kind is "vm.failed" or "vm.restarting" or "vm.start-failed");
        var saves = events.Where(e => e.Kind == "vm.saved").ToList();
        Assert.Equal([P("snap1"), P("live"), P("snap2")], saves.Select(e => e.Data.GetProperty("directory").GetString()));
        Assert.Equal([true, false, true], saves.Select(e => e.Data.GetProperty("stop").GetBoolean()));
        Assert.True(saves[0].Data.GetProperty("pausedMs").GetDouble() > 0);
        Assert.True(saves[2].Data.GetProperty("workingSetPages").GetUInt64() > 0);
        var restores = events.Where(e => e.Kind == "vm.restored").ToList();
        Assert.Equal([P("snap1"), P("snap2")], restores.Select(e => e.Data.GetProperty("directory").GetString()));
        Assert.Equal(["eager", "lazy"], restores.Select(e => e.Data.GetProperty("memory").GetString()));
        Assert.Equal(3, events.Count(e => e.Kind == "vm.exited"));
    }

    /// <summary>
    /// 'vmctl upgrade NAME' through kvmd, to the same kvm-vmm and then to a copy (--vmm): each time
    /// the VM goes on in a new process (a new pid in vm.show and in its control socket's status),
    /// its counter going on without a gap, the old process gone with nothing recorded for it; the
    /// VM stays running while kvmd renews its lease and arms the new process's fence; a restarted
    /// kvmd finds the new process again; a hand-over through the control socket behind kvmd's back
    /// ('vmctl control upgrade') is followed too; and a stop then stops the newest process and is
    /// recorded as a stop. The events tell of each upgrade (old pid, new pid, pause) and never of
    /// a failure.
    /// </summary>
    [SkippableFact]
    public void UpgradedThroughKvmdTheVmRunsOnInTheNewProcessWhichKvmdSupervises()
    {
        Require();
        string copy = TestEnvironment.CopyKvmVmm(P("v2"));

        // A lease long enough for kvmd's restart below on a slow machine: the VM must not fence meanwhile.
        string[] lease = ["--lease-duration", "60", "--fence-margin", "10"];
        var kvmd = _kvmd.Start(lease);
        Create("up", "tick period=50");
        VmctlOk("start", "up");
        var pids = new List<int> { Show("up").Vm.Pid ?? throw new Xunit.Sdk.XunitException("no pid") };
        var text = new System.Text.StringBuilder();
        foreach (string[] more in new[] { Array.Empty<string>(), ["--vmm", copy] })
        {
            using (var console = Console("up"))
            {
                Assert.True(console.WaitForTick(Ticks(text.ToString()).DefaultIfEmpty(0).Max() + 5), console.Text);
                var up = JsonSerializer.Deserialize(VmctlOk(["upgrade", "up", "--json", .. more]), KvmdJson.Default.VmUpgraded)!;
                Assert.Equal(pids[^1], up.OldPid);
                Assert.NotEqual(up.OldPid, up.Handover.Pid);
                Assert.True(up.Handover.PausedSeconds > 0 && up.Handover.PausedSeconds <= up.Handover.Seconds, JsonSerializer.Serialize(up));
                Assert.Equal(up.Handover.Pid, up.Vm.Pid);
                Assert.Equal("running", up.Vm.ActualState);
                pids.Add(up.Handover.Pid);
                Assert.True(console.Closed(Timeout), "the old console did not close");
                // The new console keeps what the guest wrote since the hand-over: the text joins on.
                text.Append(console.Text);
            }
            Assert.False(Runs(pids[^2]), $"the old kvm-vmm (pid {pids[^2]}) still runs");
            var shown = Show("up");
            Assert.Equal(pids[^1], shown.Vm.Pid);
            Assert.Equal(pids[^1], shown.Status?.Pid);
            Assert.Equal("running", shown.Vm.ActualState);
            if (more.Length > 0)
            {
                using var process = Process.GetProcessById(pids[^1]);
                Assert.Equal(copy, process.MainModule?.FileName);
            }
        }

        // Its lease renewed (and the new process's fence armed again) a few times, it runs on.
        Thread.Sleep(5000);
        Assert.Equal("running", Show("up").Vm.ActualState);
        Assert.Equal(pids[^1], Show("up").Vm.Pid);

        // A kvmd started again finds the new process (no child of anyone it knows) through the control socket.
        Assert.Equal(0, Kvm.Interop.Native.Libc.Kill(kvmd.Process.Id, 15));
        Assert.True(kvmd.Process.WaitForExit(Timeout), "kvmd did not stop");
        _kvmd.Start(lease);
        var found = Show("up");
        Assert.Equal(pids[^1], found.Vm.Pid);
        Assert.Equal("running", found.Vm.ActualState);

        // Handed over through its control socket, not through kvmd: kvmd follows it all the same.
        using (var console = Console("up"))
        {
            Assert.True(console.WaitForTick(Ticks(text.ToString()).Max() + 5), console.Text);
            var direct = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["control", "upgrade", found.ControlSocket!, "--json"], Timeout);
            Assert.True(direct.ExitCode == 0, $"vmctl control upgrade: {direct.Stdout}{direct.Stderr}");
            pids.Add(JsonSerializer.Deserialize(direct.Stdout, VmControlJson.Default.HandoverResult)!.Pid);
            Assert.True(console.Closed(Timeout), "the old console did not close");
            text.Append(console.Text);
        }
        Assert.True(SpinWait.SpinUntil(() => Show("up").Vm.Pid == pids[^1], Timeout), $"kvmd did not follow the VM to pid {pids[^1]}");
        Assert.Equal("running", Show("up").Vm.ActualState);
        Assert.False(Runs(pids[^2]), $"the old kvm-vmm (pid {pids[^2]}) still runs");

        using (var console = Console("up"))
        {
            Assert.True(console.WaitForTick(Ticks(text.ToString()).Max() + 5), console.Text);
            var stop = JsonSerializer.Deserialize(VmctlOk("stop", "up", "--json"), KvmdJson.Default.VmStopped)!;
            Assert.Equal("guest", stop.Outcome);
            Assert.True(console.Closed(Timeout));
            text.Append(console.Text);
        }
        AssertCountsOn(text.ToString(), 15);
        Assert.False(Runs(pids[^1]), $"kvm-vmm pid {pids[^1]} still runs after the stop");
        var stopped = Show("up");
        Assert.Equal("stopped", stopped.Vm.ActualState);
        Assert.NotNull(stopped.LastExit);
        Assert.False(stopped.LastExit.Failed, stopped.LastExit.Reason);
        Assert.Equal(pids[^1], stopped.LastExit.Pid);

        var events = Events("up");
        Assert.DoesNotContain(events, e => e.Kind is "vm.failed" or "vm.fenced" or "vm.start-failed");
        var upgrades = events.Where(e => e.Kind == "vm.upgraded").ToList();
        Assert.Equal(3, upgrades.Count);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(pids[i], upgrades[i].Data.GetProperty("oldPid").GetInt32());
            Assert.Equal(pids[i + 1], upgrades[i].Data.GetProperty("newPid").GetInt32());
        }
        Assert.True(upgrades[0].Data.GetProperty("pausedMs").GetDouble() > 0 && upgrades[1].Data.GetProperty("pausedMs").GetDouble() > 0);
        Assert.Equal(copy, upgrades[1].Data.GetProperty("vmm").GetString());
        Assert.Equal(copy, upgrades[2].Data.GetProperty("vmm").GetString());
        Assert.Contains("through its control socket", upgrades[2].Data.GetProperty("note").GetString(), StringComparison.Ordinal);
        Assert.Single(events, e => e.Kind == "vm.exited");
        // The states the inventory went through: never stopped or failed between the start and the stop.
        var states = events.Where(e => e.Kind == "vm.actual-state").Select(e => e.Data.GetProperty("state").GetString()).ToList();
        Assert.Equal(["starting", "running", "stopping", "stopped"], states);
    }

    /// <summary>
    /// What kvmd refuses, each with its reason and nothing changed: a save or upgrade of a VM that
    /// does not run, a relative snapshot directory, --memory without --from, a directory without a
    /// snapshot, a snapshot of another machine (memory, vCPUs), a kvm-vmm that does not exist, an
    /// upgrade of a paused VM.
    /// </summary>
    [SkippableFact]
    public void WhatCannotBeDoneIsRefusedWithItsReasonAndChangesNothing()
    {
        Require();
        _kvmd.Start();
        Create("a", "tick period=50");
        Refused("VM 'a' is not running", ["save", "a", P("s")]);
        Refused("VM 'a' is not running", ["upgrade", "a"]);
        Refused("VM 'nope' does not exist", ["save", "nope", P("s")]);
        Refused("--memory applies only with --from", ["start", "a", "--memory", "lazy"], usage: true);
        Refused("the state file is missing", ["start", "a", "--from", P("empty")]);
        using (var client = RpcClient.Connect(Socket, "kvmd"))
        {
            var e = Assert.Throws<RpcException>(() => client.CallAsync("vm.save", new SaveVmRequest("a", "relative/dir"),
                KvmdJson.Default.SaveVmRequest, KvmdJson.Default.VmSaved).WaitAsync(Timeout).GetAwaiter().GetResult());
            Assert.Equal(RpcErrorCode.InvalidParams, e.Code);
            Assert.Contains("is not an absolute path", e.Message, StringComparison.Ordinal);
            e = Assert.Throws<RpcException>(() => client.CallAsync("vm.start", new StartVmRequest("a", From: "relative/dir"),
                KvmdJson.Default.StartVmRequest, KvmdJson.Default.VmInfo).WaitAsync(Timeout).GetAwaiter().GetResult());
            Assert.Contains("is not an absolute path", e.Message, StringComparison.Ordinal);
            e = Assert.Throws<RpcException>(() => client.CallAsync("vm.start", new StartVmRequest("a", From: P("s"), Memory: "sometimes"),
                KvmdJson.Default.StartVmRequest, KvmdJson.Default.VmInfo).WaitAsync(Timeout).GetAwaiter().GetResult());
            Assert.Contains("memory 'sometimes' is not one of eager, lazy", e.Message, StringComparison.Ordinal);
        }
        Assert.Equal("stopped", Show("a").Vm.ActualState);

        VmctlOk("start", "a");
        Refused("does not exist", ["upgrade", "a", "--vmm", P("no/kvm-vmm")]);
        VmctlOk("pause", "a");
        Refused("VM 'a' is paused: resume it first", ["upgrade", "a"]);
        VmctlOk("resume", "a");
        SaveStopped("a", P("s"), 3);

        // Another VM whose machine differs: refused naming each difference; it stays as it was.
        Create("b", "tick period=50", memory: "128M");
        var r = Vmctl("start", "b", "--from", P("s"));
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("does not match the VM's spec", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("memory: the VM has 128 MiB, the snapshot 64 MiB", r.Stderr, StringComparison.Ordinal);
        var b = Show("b");
        Assert.Equal("stopped", b.Vm.ActualState);
        Assert.Equal("stopped", b.Vm.DesiredState);
        Assert.Null(b.Vm.Host);
        Assert.DoesNotContain(Events("b"), e => e.Kind is "vm.actual-state" or "vm.start-failed");
        // The VM whose snapshot it is starts from it.
        VmctlOk("start", "a", "--from", P("s"));
        Assert.Equal("running", Show("a").Vm.ActualState);
        VmctlOk("stop", "a", "--force");
    }

    /// <summary>
    /// An upgrade through kvmd whose new process fails once the VM is suspended leaves the VM
    /// suspended in its old process, recorded paused, and says so; 'vmctl resume NAME' then hands
    /// it to a new kvm-vmm (a plain resume cannot: its disks are closed), where its counter goes on,
    /// kvmd supervises the new process, and the event tells of the hand-over.
    /// </summary>
    [SkippableFact]
    public void AVmLeftSuspendedByAFailedUpgradeResumesInANewProcess()
    {
        Require();
        // A stand-in for kvm-vmm that refuses the VM once the old process has suspended it.
        string refusing = StandInTaker.Write(P("refusing-taker"), "send(\"failed\", error=\"the stand-in refuses the VM\")\n");
        _kvmd.Start();
        Create("s", "tick period=50");
        VmctlOk("start", "s");
        int oldPid = Show("s").Vm.Pid ?? throw new Xunit.Sdk.XunitException("no pid");
        // The old console stays attached through the failed upgrade and the resume: it closes when
        // the old process ends, holding everything the guest printed there.
        var old = Console("s");
        VmInfo resumed;
        try
        {
            Assert.True(old.WaitForTick(5), old.Text);
            var failed = Vmctl("upgrade", "s", "--vmm", refusing);
            Assert.True(failed.ExitCode == 1 && failed.Stderr.Contains("the stand-in refuses the VM", StringComparison.Ordinal)
                        && failed.Stderr.Contains("stays suspended", StringComparison.Ordinal), failed.Stdout + failed.Stderr);
            var suspended = Show("s");
            Assert.Equal("paused", suspended.Vm.ActualState);
            Assert.Equal(oldPid, suspended.Vm.Pid);
            Assert.Equal("suspended", suspended.Status?.State);
            Assert.Contains("tries again", Vmctl("upgrade", "s", "--vmm", refusing).Stderr, StringComparison.Ordinal);

            resumed = JsonSerializer.Deserialize(VmctlOk("resume", "s", "--json"), KvmdJson.Default.VmInfo)!;
            Assert.Equal("running", resumed.ActualState);
            Assert.NotNull(resumed.Pid);
            Assert.NotEqual(oldPid, resumed.Pid);
            Assert.True(old.Closed(Timeout), "the old console did not close");
        }
        finally
        {
            old.Dispose();
        }
        int before = Ticks(old.Text).Max();
        using (var console = Console("s"))
        {
            Assert.True(console.WaitForTick(before + 5), console.Text);
            // The counter went on from where it was suspended: nothing ran twice or was lost. (The
            // two consoles' texts join: a line the guest was printing at the suspend ends in the new one.)
            var ticks = Ticks(old.Text + console.Text);
            Assert.Equal(Enumerable.Range(ticks[0], ticks.Length), ticks);
            Assert.True(ticks[^1] >= before + 5, string.Join(", ", ticks));
        }
        Assert.True(SpinWait.SpinUntil(() => !Runs(oldPid), Timeout), $"the old kvm-vmm (pid {oldPid}) still runs");
        Assert.Equal(resumed.Pid, Show("s").Status?.Pid);
        Assert.Contains(Events("s"), e => e.Kind == "vm.upgraded" && e.Data.GetProperty("newPid").GetInt32() == resumed.Pid);
        VmctlOk("stop", "s", "--force");
        Assert.Equal("stopped", Show("s").Vm.ActualState);
    }

    /// <summary>blk-seq's progress lines on a console: the last number done.</summary>
    private static long SeqProgress(string console) =>
        SeqLine().Matches(console).Select(m => long.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)).DefaultIfEmpty(0).Max();

    [GeneratedRegex(@"guestkit: blk-seq (\d+)\r?$", RegexOptions.Multiline)]
    private static partial Regex SeqLine();

    private DiskInfo DiskAt(string path) =>
        JsonSerializer.Deserialize(VmctlOk("disks", "--json"), KvmdJson.Default.DiskList)!.Disks.SingleOrDefault(d => d.Path == path)
        ?? throw new Xunit.Sdk.XunitException($"disk {path} is not in the inventory: {VmctlOk("disks")}");

    /// <summary>
    /// 'vmctl checkpoint NAME DIR' for a VM kvmd runs (the guest kit writing 1, 2, 3... to its
    /// qcow2 disk without pause): kvmd has kvm-vmm take the checkpoint, then the inventory tells
    /// where the VM runs now. Its spec names the new top image, which is registered backed by the
    /// image the checkpoint froze, reserved exclusively by the VM while the frozen image is now
    /// shared; vm.checkpointed and vm.spec are recorded. Checkpointed again, the chain grows by one
    /// layer. Stopped and started again, the VM boots on the newest layer and the frozen ones never
    /// change. 'vmctl delete-checkpoint NAME DIR' folds a frozen layer away on disk and in the
    /// inventory. A VM that is not running is refused, and every image is clean for qemu-img.
    /// </summary>
    [SkippableFact]
    public void ACheckpointThroughKvmdMovesTheVmOntoItsNewLayerInTheInventory()
    {
        Require();
        _kvmd.Start();
        string disk = P("seq.qcow2");
        Kvm.Storage.Qcow2.Qcow2Image.Create(disk, new Kvm.Storage.Qcow2.Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        VmctlOk("create", "ck", "--kernel", TestEnvironment.GuestKit, "--cmdline", "blk-seq timeout=600", "--debug-exit", "--cpus", "2",
            "--memory", "64M", "--disk", disk);
        Refused("is not running", ["checkpoint", "ck", P("early")]);
        VmctlOk("start", "ck");
        string layer;
        using (var console = Console("ck"))
        {
            Assert.True(SpinWait.SpinUntil(() => SeqProgress(console.Text) >= 500, Timeout), $"blk-seq did not reach 500: {console.Text}");
            var taken = JsonSerializer.Deserialize(VmctlOk("checkpoint", "ck", P("ckpt1"), "--json"), KvmdJson.Default.VmCheckpointed)!;
            Assert.Equal(P("ckpt1"), taken.Checkpoint.Directory);
            layer = Assert.IsType<string>(taken.Checkpoint.Layers[0]);
            Assert.NotEqual(disk, layer);
            Assert.Equal(Path.Combine(P("ckpt1"), "disk0.qcow2"), taken.Checkpoint.Disks[0]);
            Assert.True(taken.Checkpoint.StopSeconds > 0, JsonSerializer.Serialize(taken));
            Assert.Equal("running", taken.Vm.ActualState);
            long atCheckpoint = SeqProgress(console.Text);
            Assert.True(SpinWait.SpinUntil(() => SeqProgress(console.Text) >= atCheckpoint + 200, Timeout),
                $"blk-seq did not go on after the checkpoint: {console.Text}");
        }

        // The inventory: the spec, the disks and their reservations, the events.
        var shown = Show("ck");
        Assert.Equal(layer, shown.Spec.GetProperty("disks")[0].GetProperty("path").GetString());
        Assert.Equal(layer, Assert.Single(shown.Status!.Disks!));
        var top = DiskAt(layer);
        Assert.Equal(disk, top.Backing);
        Assert.Equal("qcow2", top.Format);
        Assert.Equal(8L << 20, top.SizeBytes);
        Assert.Equal(("exclusive", "ck"), Assert.Single(top.Reservations) is var t ? (t.Mode, t.Vm) : default);
        Assert.Equal(("shared", "ck"), Assert.Single(DiskAt(disk).Reservations) is var f ? (f.Mode, f.Vm) : default);
        var events = Events("ck");
        Assert.Contains(events, e => e.Kind == "vm.checkpointed" && e.Data.GetProperty("directory").GetString() == P("ckpt1")
                                     && e.Data.GetProperty("layers")[0].GetString() == layer);
        Assert.Contains(events, e => e.Kind == "vm.spec");

        // Again: one more layer on the chain, the first layer shared now.
        var again = JsonSerializer.Deserialize(VmctlOk("checkpoint", "ck", P("ckpt2"), "--json"), KvmdJson.Default.VmCheckpointed)!;
        string layer2 = Assert.IsType<string>(again.Checkpoint.Layers[0]);
        Assert.Equal(layer, DiskAt(layer2).Backing);
        Assert.Equal("exclusive", Assert.Single(DiskAt(layer2).Reservations).Mode);
        Assert.Equal("shared", Assert.Single(DiskAt(layer).Reservations).Mode);
        Assert.Equal(layer2, Show("ck").Spec.GetProperty("disks")[0].GetProperty("path").GetString());

        // Stopped and started again: on the newest layer (blk-seq, booted afresh, finds the number
        // the VM wrote last and ends with status 3, as it does on a disk that holds one); the
        // frozen layers never change.
        VmctlOk("stop", "ck", "--force");
        Assert.Empty(DiskAt(layer2).Reservations);
        string frozen = Smaps.Sha256(disk), frozen1 = Smaps.Sha256(layer);
        VmctlOk("start", "ck");
        Assert.True(SpinWait.SpinUntil(() => Show("ck").Vm.ActualState == "stopped", Timeout), VmctlOk("show", "ck", "--json"));
        var ended = Show("ck");
        Assert.True(ended.LastExit?.Status == 3, $"the restarted guest did not find its number on the disk: {VmctlOk("show", "ck", "--json")}");
        Assert.Equal(layer2, ended.Spec.GetProperty("disks")[0].GetProperty("path").GetString());
        Assert.Equal(frozen, Smaps.Sha256(disk));
        Assert.Equal(frozen1, Smaps.Sha256(layer));
        foreach (var image in new[] { disk, layer, layer2, again.Checkpoint.Disks[0], Path.Combine(P("ckpt1"), "disk0.qcow2") })
        {
            var r = TestEnvironment.RunProcess("qemu-img", ["check", image], Timeout);
            Assert.True(r.ExitCode == 0, $"qemu-img check {image}: {r.Stdout}{r.Stderr}");
        }

        // Deleting the second checkpoint through kvmd folds the layer it kept frozen (the first
        // layer) into the newest, on disk and in the inventory; deleting the first folds nothing
        // (its frozen image is the disk's base) and forgets its own disk.
        var deleted = VmctlOk("delete-checkpoint", "ck", P("ckpt2"));
        Assert.Contains($"folded away {layer}", deleted, StringComparison.Ordinal);
        Assert.False(File.Exists(layer) || Directory.Exists(P("ckpt2")), $"the folded layer or the checkpoint is still there: {deleted}");
        Assert.Equal(disk, DiskAt(layer2).Backing);
        var listed = JsonSerializer.Deserialize(VmctlOk("disks", "--json"), KvmdJson.Default.DiskList)!.Disks.Select(d => d.Path).ToArray();
        Assert.DoesNotContain(layer, listed);
        Assert.Contains(Events("ck"), e => e.Kind == "vm.checkpoint-deleted" && e.Data.GetProperty("folded")[0].GetString() == layer);
        Assert.DoesNotContain("folded away", VmctlOk("delete-checkpoint", "ck", P("ckpt1")), StringComparison.Ordinal);
        Assert.False(Directory.Exists(P("ckpt1")));
        Refused("cannot delete the checkpoint", ["delete-checkpoint", "ck", P("ckpt1")]);
        Assert.Equal(frozen, Smaps.Sha256(disk));
        var check = TestEnvironment.RunProcess("qemu-img", ["check", layer2], Timeout);
        Assert.True(check.ExitCode == 0, $"qemu-img check {layer2}: {check.Stdout}{check.Stderr}");
        // The VM boots on what is left, and finds its number there.
        VmctlOk("start", "ck");
        Assert.True(SpinWait.SpinUntil(() => Show("ck").Vm.ActualState == "stopped", Timeout), VmctlOk("show", "ck", "--json"));
        Assert.Equal(3, Show("ck").LastExit?.Status);
    }
}
