using System.Text.Json;
using Kvm.Control;
using Kvm.Rpc;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// Save and restore as a user does them: kvm-vmm with its control and console sockets, 'vmctl
/// control save' into a snapshot directory, 'vmctl restore' of it in a new process. The guest kit
/// reports on its console what it sees; qemu-img judges the disk.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class SaveRestoreTests : BlkTestBase
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(120);

    /// <summary>
    /// Records in the journal the save-with-stop test runs: 10 s of guest time, so that it is still
    /// running when 'vmctl control save' gets to it. With 120 (1.2 s) it had ended first once in CI
    /// (2026-12-04), when the vmctl call took seconds in a loaded nested host.
    /// </summary>
    private const int Journal = 1000;

    private static new void Require()
    {
        BlkTestBase.Require();
        if (!File.Exists(TestEnvironment.KvmVmm) || !File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.KvmVmm} or {TestEnvironment.Vmctl} is missing (run 'make' first)");
    }

    /// <summary>Starts kvm-vmm on the guest kit with both sockets (named after <paramref name="name"/>) and waits until it answers.</summary>
    private LiveProcess StartVm(string name, string cmdline, string? disk = null, int cpus = 2)
    {
        var spec = new Dictionary<string, object>
        {
            ["kernel"] = TestEnvironment.GuestKit,
            ["cmdline"] = cmdline,
            ["debugExit"] = true,
            ["cpus"] = cpus,
            ["memoryBytes"] = 64 << 20,
        };
        if (disk is not null)
            spec["disks"] = new[] { new Dictionary<string, object> { ["path"] = disk, ["serial"] = "d0" } };
        File.WriteAllText(P($"{name}.json"), JsonSerializer.Serialize(spec));
        return Started(LiveProcess.Start(TestEnvironment.KvmVmm,
            ["--spec", P($"{name}.json"), "--control", P($"{name}.control"), "--console", P($"{name}.console")]), name);
    }

    private LiveProcess Started(LiveProcess vm, string name)
    {
        if (!SpinWait.SpinUntil(() => File.Exists(P($"{name}.control")) && File.Exists(P($"{name}.console")) || vm.Process.HasExited, Wait))
            Assert.Fail($"{name} did not create its sockets");
        if (vm.Process.HasExited)
            Assert.Fail($"{name} exited early with status {vm.Process.ExitCode}: {vm.Stderr.Result}");
        return vm;
    }

    private static ProcessResult Vmctl(params string[] args) => TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Wait);

    /// <summary>
    /// Restores the snapshot in <paramref name="snapshot"/> with 'vmctl restore' (and
    /// <paramref name="options"/>) on sockets b.control and b.console, and waits until the guest
    /// ends: it must exit 0. Returns what the restored guest wrote.
    /// </summary>
    private string RestoreToTheEnd(string snapshot, params string[] options)
    {
        using var b = Started(LiveProcess.Start(TestEnvironment.Vmctl, ["restore", snapshot, .. options, "--control", P("b.control"), "--console", P("b.console")]), "b");
        string after;
        using (var console = new ConsoleClient(P("b.console")))
        {
            if (!b.WaitForExit(Wait))
                Assert.Fail($"the restored VM did not finish: {console.Text}");
            Assert.True(console.Closed(Wait));
            after = console.Text;
        }
        Assert.True(b.Process.ExitCode == 0, $"vmctl restore exited {b.Process.ExitCode}: {b.Stderr.Result}\n{after}");
        return after;
    }

    private static int[] Seqs(string console) => console.Split('\n')
        .Where(l => l.StartsWith("guestkit: blk-log seq ", StringComparison.Ordinal))
        .Select(l => int.Parse(l["guestkit: blk-log seq ".Length..].Trim(), System.Globalization.CultureInfo.InvariantCulture)).ToArray();

    /// <summary>
    /// A disk journal written every 10 ms by a 2-vCPU guest: saved with --stop through the control
    /// socket, then restored by 'vmctl restore' in a new process. The journal goes on in the same
    /// boot (one tag, records numbered on without a gap or a repeat), the guest ends with status 0,
    /// which becomes vmctl's, and the qcow2 image is clean.
    /// </summary>
    [SkippableFact]
    public void SavedWithStopThenRestoredByVmctlTheGuestCarriesOnAndItsDiskIsClean()
    {
        Require();
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        string snapshot = P("snap");
        string before;
        using (var a = StartVm("a", $"blk-log period=10 n={Journal}", disk))
        {
            using (var console = new ConsoleClient(P("a.console")))
            {
                Assert.True(console.WaitFor("guestkit: blk-log seq 15\n"), console.Text);
                var save = Vmctl("control", "save", P("a.control"), snapshot, "--stop");
                Assert.True(save.ExitCode == 0, $"vmctl control save: {save.Stdout}{save.Stderr}");
                Assert.Contains($"saved to {snapshot}", save.Stdout);
                Assert.Contains("the VM is stopping", save.Stdout);
                Assert.True(console.Closed(Wait), "the console did not close after the save with --stop");
                before = console.Text;
            }
            if (!a.WaitForExit(Wait))
                Assert.Fail("kvm-vmm did not exit after the save with --stop");
            Assert.Equal(0, a.Process.ExitCode);
        }
        Assert.DoesNotContain("blk-log done", before);
        Assert.True(File.Exists(Path.Combine(snapshot, "state")) && File.Exists(Path.Combine(snapshot, "memory")));

        string after = RestoreToTheEnd(snapshot);
        Assert.DoesNotContain("blk-log tag=", after);
        Assert.Equal(Enumerable.Range(1, Journal), Seqs(before + after).Distinct());
        Assert.Equal(Seqs(before + after).Length, Seqs(before + after).Distinct().Count());

        AssertCheckClean(disk);
        string raw = P("journal.raw");
        var convert = QemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw);
        Assert.True(convert.ExitCode == 0, convert.Stderr);
        var runs = BlkLogJournal.Runs(raw);
        Assert.True(runs.Count == 1 && runs[0].Records == Journal, string.Join(", ", runs));
    }

    /// <summary>
    /// Saved without --stop, the VM carries on (its ticks go on) and the reply says how long the
    /// guest was paused; the snapshot restored beside it runs too, from the tick it was saved at.
    /// </summary>
    [SkippableFact]
    public void SavedWithoutStopTheVmCarriesOnAndTheSnapshotRunsBesideIt()
    {
        Require();
        string snapshot = P("snap");
        using var a = StartVm("a", "tick period=20 pwrbtn=0", cpus: 1);
        using var console = new ConsoleClient(P("a.console"));
        Assert.True(console.WaitForTick(5), console.Text);
        int beforeSave = console.LastTick;
        SaveResult saved;
        using (var control = RpcClient.Connect(P("a.control"), "kvm-vmm"))
            saved = control.CallAsync("save", new SaveRequest(snapshot), VmControlJson.Default.SaveRequest, VmControlJson.Default.SaveResult)
                .WaitAsync(Wait).GetAwaiter().GetResult();
        Assert.Equal("running", saved.State);
        Assert.True(saved.PausedSeconds > 0 && saved.PausedSeconds <= saved.Seconds, JsonSerializer.Serialize(saved));
        Assert.Equal(64UL << 20, saved.MemoryBytes);
        Assert.True(saved.MemoryBytesWritten < saved.MemoryBytes, "zero pages were written out");
        int atSave = console.LastTick;
        Assert.True(console.WaitForTick(atSave + 5), "the VM did not carry on after the save");

        using var b = Started(LiveProcess.Start(TestEnvironment.Vmctl, ["restore", snapshot, "--control", P("b.control"), "--console", P("b.console")]), "b");
        using var restored = new ConsoleClient(P("b.console"));
        Assert.True(restored.WaitForTick(atSave + 3), restored.Text);
        // The save point lies between the last tick seen before the call and the last seen after it.
        var ticks = TickNumbers(restored.Text).Take(3).ToArray();
        Assert.True(ticks[0] > beforeSave && ticks[0] <= atSave + 1, $"the restored VM's first tick is {ticks[0]}, saved between {beforeSave} and {atSave}");
        Assert.Equal(Enumerable.Range(ticks[0], 3), ticks);
        Assert.Equal(0, Vmctl("control", "stop", P("b.control"), "--force").ExitCode);
        Assert.True(b.WaitForExit(Wait));

        // kvm-vmm --verbose says where a restore's time went, from the process's start.
        using (var c = Started(LiveProcess.Start(TestEnvironment.KvmVmm,
                   ["--restore", snapshot, "--verbose", "--control", P("c.control"), "--console", P("c.console")]), "c"))
        {
            using (var third = new ConsoleClient(P("c.console")))
                Assert.True(third.WaitForTick(atSave + 3), third.Text);
            Assert.Equal(0, Vmctl("control", "stop", P("c.control"), "--force").ExitCode);
            Assert.True(c.WaitForExit(Wait));
            string log = c.Stderr.Result;
            Assert.Matches($@"kvm-vmm: info: restored from {System.Text.RegularExpressions.Regex.Escape(snapshot)} \(eager\) [0-9.]+ ms after the process started: " +
                           @"start-up [0-9.]+ ms, read the state file and its spec [0-9.]+ ms, .*create VM [0-9.]+ ms, .*load guest RAM [0-9.]+ ms, restore state [0-9.]+ ms", log);
        }
        Assert.Equal(0, Vmctl("control", "stop", P("a.control"), "--force").ExitCode);
        Assert.True(a.WaitForExit(Wait));
    }

    /// <summary>
    /// 'vmctl control save --working-set 1 --stop' on a guest touching a known region: the VM runs
    /// for the window, then stops; the reply names the pages recorded; 'vmctl restore --memory lazy'
    /// loads them first and the guest finishes its rounds, checking both its regions whole. On a
    /// paused VM, a working set is refused and nothing is written.
    /// </summary>
    [SkippableFact]
    public void SavedWithAWorkingSetByVmctlThenRestoredLazilyTheGuestFinishes()
    {
        Require();
        TestEnvironment.SkipIf(Kvm.Hypervisor.Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (a working-set trace needs root)");
        string snapshot = P("snap");
        string before;
        using (var a = StartVm("a", "touch size=512K before=512K rounds=2000 period=10", cpus: 1))
        {
            using (var console = new ConsoleClient(P("a.console")))
            {
                Assert.True(console.WaitFor("guestkit: touch round 200/2000\n"), console.Text);
                Assert.Equal(0, Vmctl("control", "pause", P("a.control")).ExitCode);
                var refused = Vmctl("control", "save", P("a.control"), snapshot, "--working-set", "1");
                Assert.True(refused.ExitCode == 1, $"{refused.Stdout}{refused.Stderr}");
                Assert.Contains("the VM is paused, so a working set cannot be traced", refused.Stderr);
                Assert.False(Directory.Exists(snapshot));
                Assert.Equal(0, Vmctl("control", "resume", P("a.control")).ExitCode);

                var save = Vmctl("control", "save", P("a.control"), snapshot, "--working-set", "1", "--require-working-set", "--stop");
                Assert.True(save.ExitCode == 0, $"vmctl control save: {save.Stdout}{save.Stderr}");
                Assert.Matches(@"; working set: [1-9]\d* pages in \d+ ranges, traced over 1(\.\d+)? s", save.Stdout);
                Assert.Contains("the VM is stopping", save.Stdout);
                Assert.True(console.Closed(Wait), "the console did not close after the save with --stop");
                before = console.Text;
            }
            if (!a.WaitForExit(Wait))
                Assert.Fail("kvm-vmm did not exit after the save with --stop");
        }
        Assert.DoesNotContain("touch done", before);

        string after = RestoreToTheEnd(snapshot, "--memory", "lazy");
        Assert.Contains("guestkit: touch done rounds=2000", after);
        Assert.DoesNotContain("ready", after);
    }

    // Whole lines only: the last may still be arriving ("tick 1" of "tick 16").
    private static IEnumerable<int> TickNumbers(string text) => text.Split('\n').SkipLast(1)
        .Where(l => l.StartsWith("guestkit: tick ", StringComparison.Ordinal) && l.Length > 15 && char.IsAsciiDigit(l[15]))
        .Select(l => int.Parse(l[15..].Trim(), System.Globalization.CultureInfo.InvariantCulture));

    /// <summary>
    /// A snapshot whose state file is cut short, whose memory file belongs to another snapshot, or
    /// that is not there, is refused by 'vmctl restore' with a message naming the file and the
    /// problem, exit status 1, and no VM is started (no console socket appears).
    /// </summary>
    [SkippableFact]
    public void ABrokenSnapshotIsRefusedNamingTheFileAndNothingStarts()
    {
        Require();
        string one = P("one"), two = P("two");
        using (var a = StartVm("a", "tick period=50 pwrbtn=0", cpus: 1))
        {
            using var console = new ConsoleClient(P("a.console"));
            Assert.True(console.WaitForTick(2), console.Text);
            Assert.Equal(0, Vmctl("control", "save", P("a.control"), one).ExitCode);
            Assert.Equal(0, Vmctl("control", "save", P("a.control"), two, "--stop").ExitCode);
            Assert.True(a.WaitForExit(Wait));
        }

        void Refused(string dir, params string[] expected)
        {
            var r = Vmctl("restore", dir, "--console", P("x.console"));
            Assert.True(r.ExitCode == 1, $"vmctl restore {dir} exited {r.ExitCode}: {r.Stdout}{r.Stderr}");
            foreach (var e in expected)
                Assert.Contains(e, r.Stderr);
            Assert.False(File.Exists(P("x.console")), "a console socket appeared: a VM was started");
        }

        string cut = P("cut");
        Directory.CreateDirectory(cut);
        var state = File.ReadAllBytes(Path.Combine(one, "state"));
        File.WriteAllBytes(Path.Combine(cut, "state"), state[..(state.Length / 2)]);
        File.Copy(Path.Combine(one, "memory"), Path.Combine(cut, "memory"));
        Refused(cut, Path.Combine(cut, "state"));

        string mixed = P("mixed");
        Directory.CreateDirectory(mixed);
        File.Copy(Path.Combine(one, "state"), Path.Combine(mixed, "state"));
        File.Copy(Path.Combine(two, "memory"), Path.Combine(mixed, "memory"));
        Refused(mixed, Path.Combine(mixed, "memory"), "snapshot");

        Refused(P("nowhere"), Path.Combine(P("nowhere"), "state"));
    }
}
