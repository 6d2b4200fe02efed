using System.Diagnostics;
using System.Text.Json;
using Kvm.Control;
using Kvm.Rpc;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// A running VM handed to a new kvm-vmm process in place: 'vmctl control upgrade' to a second copy
/// of the binary, and 'vmctl control suspend' then 'resume' with a changed configuration (a disk
/// image moved, replaced by a copy of the same content in another format, a disk added). The guest
/// kit keeps a disk journal throughout (a record every 10 ms, each flushed): it must go on without
/// a gap or a repeat, in one boot, and end with status 0, which the new process records in the
/// exit file; qemu-img judges the images.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class HandoverTests : BlkTestBase, IDisposable
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(120);
    private readonly List<int> _taken = [];

    private static new void Require()
    {
        BlkTestBase.Require();
        if (!File.Exists(TestEnvironment.KvmVmm) || !File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.KvmVmm} or {TestEnvironment.Vmctl} is missing (run 'make' first)");
    }

    /// <summary>Ends the processes that took VMs over (not this test's children: the old kvm-vmm started them).</summary>
    public new void Dispose()
    {
        foreach (int pid in _taken)
        {
            try
            {
                using var p = Process.GetProcessById(pid);
                p.Kill();
                p.WaitForExit(10_000);
            }
            catch (ArgumentException)
            {
            }
            catch (InvalidOperationException)
            {
            }
        }
        base.Dispose();
    }

    private LiveProcess StartVm(string cmdline, string disk, string? kernel = null, string? initrd = null, long memory = 64 << 20)
    {
        var spec = new Dictionary<string, object>
        {
            ["kernel"] = kernel ?? TestEnvironment.GuestKit,
            ["cmdline"] = cmdline,
            ["debugExit"] = true,
            ["cpus"] = 2,
            ["memoryBytes"] = memory,
            ["disks"] = new[] { new Dictionary<string, object> { ["path"] = disk, ["serial"] = "d0" } },
        };
        if (initrd is not null)
            spec["initrd"] = initrd;
        File.WriteAllText(P("vm.json"), JsonSerializer.Serialize(spec));
        var vm = LiveProcess.Start(TestEnvironment.KvmVmm,
            ["--spec", P("vm.json"), "--control", P("vm.control"), "--console", P("vm.console"), "--exit-file", P("vm.exit")]);
        if (!SpinWait.SpinUntil(() => File.Exists(P("vm.control")) && File.Exists(P("vm.console")) || vm.Process.HasExited, Wait))
            Assert.Fail("kvm-vmm did not create its sockets");
        Assert.False(vm.Process.HasExited, "kvm-vmm exited early");
        return vm;
    }

    /// <summary>
    /// The journal length of the tests that call vmctl while it runs: at 10 ms a record, 10 s, so
    /// that it cannot end during the few vmctl calls (seconds each in a loaded nested host) that a
    /// test makes between seeing a record and suspending the VM (it once did, at 200 and 400).
    /// </summary>
    private const int Journal = 1000;

    private static ProcessResult Vmctl(params string[] args) => TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Wait);

    /// <summary>'vmctl control suspend' on the VM's control socket, which must succeed.</summary>
    private void SuspendOk()
    {
        var r = Vmctl("control", "suspend", P("vm.control"));
        Assert.True(r.ExitCode == 0, $"vmctl control suspend: status {r.ExitCode}: {r.Stdout}{r.Stderr}");
    }

    private static HandoverResult Parse(ProcessResult r, string what)
    {
        Assert.True(r.ExitCode == 0, $"{what} exited {r.ExitCode}: {r.Stdout}{r.Stderr}");
        return JsonSerializer.Deserialize(r.Stdout, VmControlJson.Default.HandoverResult)!;
    }

    /// <summary>The journal's record numbers in whole lines of <paramref name="console"/> (the last may still be arriving).</summary>
    private static int[] Seqs(string console) => System.Text.RegularExpressions.Regex.Matches(console, @"^guestkit: blk-log seq (\d+)\r?\n",
            System.Text.RegularExpressions.RegexOptions.Multiline)
        .Select(m => int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)).ToArray();

    /// <summary>The old process gives the VM up: it exits 0 and leaves the exit file to the new one.</summary>
    private static void AssertGivenUp(LiveProcess old)
    {
        Assert.True(old.Process.WaitForExit(Wait), "the old kvm-vmm did not exit after the hand-over");
        Assert.Equal(0, old.Process.ExitCode);
    }

    /// <summary>
    /// After a hand-over from <paramref name="old"/>: it gives the VM up, the journal (its console so
    /// far in <paramref name="text"/>) goes on in the new process to <paramref name="records"/>, each
    /// once, the VM ends with status 0, and the image is clean.
    /// </summary>
    private void FinishJournal(LiveProcess old, System.Text.StringBuilder text, string disk, int records)
    {
        AssertGivenUp(old);
        using (var console = new ConsoleClient(P("vm.console")))
        {
            var record = WaitForExitRecord();
            Assert.True(record.Status == 0 && !record.Failed, JsonSerializer.Serialize(record));
            Assert.True(console.Closed(Wait));
            text.Append(console.Text);
        }
        var seqs = Seqs(text.ToString());
        Assert.Equal(Enumerable.Range(1, records), seqs.Distinct());
        Assert.Equal(seqs.Length, seqs.Distinct().Count());
        AssertCheckClean(disk);
    }

    /// <summary>Waits for the VM's end as the process that ran it last recorded it.</summary>
    private VmExitRecord WaitForExitRecord()
    {
        VmExitRecord? record = null;
        Assert.True(SpinWait.SpinUntil(() => (record = VmHost.ReadExitRecord(P("vm.exit"))) is not null, Wait), "no exit record: the VM did not end");
        return record!;
    }

    /// <summary>
    /// A guest writing its disk journal is handed to a second copy of kvm-vmm ('vmctl control upgrade
    /// --vmm'): the reply names the new process and the pause; the old process exits 0 without an
    /// exit record (the new one may have written its own by then); the control and console sockets stay where they were and lead to the new process;
    /// the journal goes on in the same boot to its end (every record once), the guest ends with
    /// status 0 in the new process, and the image is clean.
    /// </summary>
    [SkippableFact]
    public void AnUpgradeToASecondCopyOfTheBinaryUnderADiskJournalIsUnnoticed()
    {
        Require();
        string copy = TestEnvironment.CopyKvmVmm(P("v2"));

        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        using var old = StartVm($"blk-log period=10 n={Journal}", disk);
        string before;
        int newPid;
        using (var console = new ConsoleClient(P("vm.console")))
        {
            Assert.True(console.WaitFor("guestkit: blk-log seq 20\n"), console.Text);
            var result = Parse(Vmctl("control", "upgrade", P("vm.control"), "--vmm", copy, "--json"), "vmctl control upgrade");
            _taken.Add(result.Pid);
            Assert.NotEqual(old.Process.Id, result.Pid);
            Assert.Equal(copy, result.Vmm);
            Assert.True(result.PausedSeconds > 0 && result.PausedSeconds <= result.Seconds, JsonSerializer.Serialize(result));
            // Where the pause went: both processes' steps, the machine built before the pause (so
            // not among them), and together no longer than the pause.
            var steps = result.Steps ?? [];
            foreach (var (process, step) in new[] { ("old", "pause vCPUs and devices"), ("old", "save the vCPUs"), ("old", "close disks"),
                         ("new", "open disks"), ("new", "restore state"), ("new", "start vCPUs") })
                Assert.True(steps.Any(x => x.Process == process && x.Name == step), $"no step '{step}' of the {process} process: {JsonSerializer.Serialize(result)}");
            Assert.DoesNotContain(steps, x => x.Name is "create VM" or "vCPUs" or "devices");
            Assert.True(steps.Sum(x => x.Milliseconds) <= result.PausedSeconds * 1000 + 1, JsonSerializer.Serialize(result));
            Assert.True(console.Closed(Wait), "the old console did not close");
            before = console.Text;
            newPid = result.Pid;
        }
        AssertGivenUp(old);
        // The new process may already have run the journal to its end and written its own record.
        var early = VmHost.ReadExitRecord(P("vm.exit"));
        Assert.True(early is null || early.Pid == newPid,
            $"the old kvm-vmm (pid {old.Process.Id}) wrote an exit record, but the VM ran on in pid {newPid}: {JsonSerializer.Serialize(early)}");

        var status = Vmctl("control", "status", P("vm.control"), "--json");
        Assert.True(status.ExitCode == 0, status.Stderr);
        var s = JsonSerializer.Deserialize(status.Stdout, VmControlJson.Default.VmStatus)!;
        Assert.NotEqual(old.Process.Id, s.Pid);
        Assert.True(s.State is "running" or "stopped", s.State);
        using var proc = Process.GetProcessById(s.Pid);
        Assert.Equal(copy, proc.MainModule?.FileName);

        string after;
        using (var console = new ConsoleClient(P("vm.console")))
        {
            var record = WaitForExitRecord();
            Assert.True(record.Status == 0 && !record.Failed, JsonSerializer.Serialize(record));
            Assert.Equal(s.Pid, record.Pid);
            Assert.True(console.Closed(Wait));
            after = console.Text;
        }
        Assert.DoesNotContain("blk-log tag=", after);
        Assert.Contains($"guestkit: blk-log done n={Journal}", after);
        var seqs = Seqs(before + after);
        Assert.Equal(Enumerable.Range(1, Journal), seqs.Distinct());
        Assert.Equal(seqs.Length, seqs.Distinct().Count());
        AssertCheckClean(disk);
        string raw = P("journal.raw");
        Assert.Equal(0, QemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw).ExitCode);
        var runs = BlkLogJournal.Runs(raw);
        Assert.True(runs.Count == 1 && runs[0].Records == Journal, string.Join(", ", runs));
    }

    /// <summary>
    /// Debian's kernel with two vCPUs, upgraded in place while its init runs a disk loop
    /// (native/linux/init diskloop: a file per round, synced, rounds alternating between the CPUs
    /// with a timer sleep each). The same boot goes on in the new process, and the init's verdict
    /// is 0: every file reads back after a remount, the uptime never went back, the clocksource
    /// stayed, and the kernel logged no RCU stall, lockup, hung task, clocksource or TSC trouble
    /// or I/O error (the init checks its log; the test checks it again). The image is clean.
    /// </summary>
    [SkippableFact]
    public void ALinuxGuestUpgradedInADiskLoopCarriesOnCleanly()
    {
        Require();
        string kernel = Path.Combine(TestEnvironment.BuildDir, "linux", "bzImage");
        string initrd = Path.Combine(TestEnvironment.BuildDir, "linux", "initramfs.cpio.gz");
        if (!File.Exists(kernel) || !File.Exists(initrd))
            TestEnvironment.SkipIf($"{kernel} or {initrd} is missing (run 'make linux', which fetches Debian's kernel)");
        TestEnvironment.RequireProgram("e2fsck", "e2fsprogs");
        string disk = CreateImage("linux.qcow2", "qcow2", "64M");
        const int loops = 30;
        using var old = StartVm($"console=ttyS0 quiet panic=-1 kvmtest=cpus:2,diskloop:{loops}", disk, kernel, initrd, 256 << 20);
        string before;
        using (var console = new ConsoleClient(P("vm.console")))
        {
            Assert.True(SpinWait.SpinUntil(() => console.Text.Contains("kvm-guest: loop 3 up", StringComparison.Ordinal), TimeSpan.FromSeconds(300)),
                $"the guest did not reach loop 3:\n{console.Text}");
            var result = Parse(Vmctl("control", "upgrade", P("vm.control"), "--json"), "vmctl control upgrade");
            _taken.Add(result.Pid);
            Assert.True(result.PausedSeconds > 0, JsonSerializer.Serialize(result));
            Assert.True(console.Closed(Wait));
            before = console.Text.Replace("\r", "");
        }
        AssertGivenUp(old);
        string after;
        using (var console = new ConsoleClient(P("vm.console")))
        {
            VmExitRecord? record = null;
            Assert.True(SpinWait.SpinUntil(() => (record = VmHost.ReadExitRecord(P("vm.exit"))) is not null, TimeSpan.FromSeconds(300)),
                $"the guest did not finish:\n{before}\n--- after the upgrade ---\n{console.Text}");
            Assert.True(console.Closed(Wait));
            after = console.Text.Replace("\r", "");
            Assert.True(record!.Status == 0, $"the guest's verdict {record.Status} ({record.Reason}); consoles:\n{before}\n--- after the upgrade ---\n{after}");
        }
        Assert.DoesNotContain("Linux version", after);
        Assert.DoesNotContain("kvm-guest: init running on", after);
        Assert.Contains($"kvm-guest: diskloop checked {loops} files, 0 wrong", after);
        var warnings = after.Split('\n').Where(l => l.StartsWith("kvm-guest: diskloop dmesg ", StringComparison.Ordinal)
            && System.Text.RegularExpressions.Regex.IsMatch(l, "rcu.*stall|lockup|blocked for more than|watchdog|unstable|skew|timed out|timeout|I/O error",
                System.Text.RegularExpressions.RegexOptions.IgnoreCase)).ToArray();
        Assert.True(warnings.Length == 0, string.Join('\n', warnings));
        AssertCheckClean(disk);
        string raw = P("linux.raw");
        Assert.Equal(0, QemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw).ExitCode);
        var fsck = TestEnvironment.RunProcess("e2fsck", ["-f", "-n", raw], Wait);
        Assert.True(fsck.ExitCode == 0, fsck.Stdout + fsck.Stderr);
    }

    /// <summary>
    /// Suspended, the VM's image is moved and it resumes from the new path with a disk added; then
    /// suspended again, it resumes on a raw copy of its qcow2 image (same content, another format)
    /// with a new serial. Each resume reports the changes and the pause; the journal goes on in one
    /// boot to its end on the raw copy; the added disk is there (devices).
    /// </summary>
    [SkippableFact]
    public void SuspendedTheVmResumesWithItsImageMovedOrCopiedAndADiskAdded()
    {
        Require();
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        string extra = CreateImage("extra.qcow2", "qcow2", "8M");
        // Long enough that it cannot end between the vmctl calls below (seconds each under load).
        using var old = StartVm($"blk-log period=10 n={Journal}", disk);
        var text = new System.Text.StringBuilder();
        string moved = P("moved/journal.qcow2");
        Directory.CreateDirectory(P("moved"));
        using (var console = new ConsoleClient(P("vm.console")))
        {
            Assert.True(console.WaitFor("guestkit: blk-log seq 20\n"), console.Text);
            var suspend = Vmctl("control", "suspend", P("vm.control"));
            Assert.True(suspend.ExitCode == 0, suspend.Stdout + suspend.Stderr);
            Assert.StartsWith("suspended", suspend.Stdout);
            Assert.Contains("suspended", Vmctl("control", "status", P("vm.control")).Stdout);
            int atSuspend = Seqs(console.Text).Max();
            Thread.Sleep(500);
            Assert.Equal(atSuspend, Seqs(console.Text).Max());     // it stands still
            // The image is closed: it can move, and another process may open it.
            File.Move(disk, moved);
            Assert.Equal(0, QemuImg("check", moved).ExitCode);

            var result = Parse(Vmctl("control", "resume", P("vm.control"), "--disk", $"{moved},serial=d0", "--disk", extra, "--json"),
                "vmctl control resume (moved, added)");
            _taken.Add(result.Pid);
            Assert.Contains($"virtio-blk0: image {disk} -> {moved}", result.Changes);
            Assert.Contains($"virtio-blk1 added: {extra}", result.Changes);
            Assert.True(result.PausedSeconds >= 0.5, $"the pause since the suspend is {result.PausedSeconds} s");
            Assert.True(console.Closed(Wait));
            text.Append(console.Text);
        }
        AssertGivenUp(old);

        var devices = Vmctl("control", "devices", P("vm.control"));
        Assert.Contains("virtio-blk1", devices.Stdout);
        Assert.Contains(extra, devices.Stdout);

        string copy = P("copy.raw");
        using (var console = new ConsoleClient(P("vm.console")))
        {
            Assert.True(SpinWait.SpinUntil(() => Seqs(console.Text).DefaultIfEmpty(0).Max() >= 150, Wait), console.Text);
            int pid = JsonSerializer.Deserialize(Vmctl("control", "status", P("vm.control"), "--json").Stdout, VmControlJson.Default.VmStatus)!.Pid;
            SuspendOk();
            Assert.Equal(0, QemuImg("convert", "-f", "qcow2", "-O", "raw", moved, copy).ExitCode);
            File.Delete(moved);
            var result = Parse(Vmctl("control", "resume", P("vm.control"), "--disk", $"{copy},serial=d9", "--disk", extra, "--json"),
                "vmctl control resume (copy)");
            _taken.Add(result.Pid);
            Assert.NotEqual(pid, result.Pid);
            Assert.Contains($"virtio-blk0: image {moved} -> {copy}", result.Changes);
            Assert.Contains("virtio-blk0: serial 'd0' -> 'd9'", result.Changes);
            Assert.True(console.Closed(Wait));
            text.Append(console.Text);
        }
        using (var console = new ConsoleClient(P("vm.console")))
        {
            var record = WaitForExitRecord();
            Assert.True(record.Status == 0 && !record.Failed, JsonSerializer.Serialize(record));
            Assert.True(console.Closed(Wait));
            text.Append(console.Text);
        }
        string all = text.ToString();
        Assert.Contains($"guestkit: blk-log done n={Journal}", all);
        var seqs = Seqs(all);
        Assert.Equal(Enumerable.Range(1, Journal), seqs.Distinct());
        Assert.Equal(seqs.Length, seqs.Distinct().Count());
        var runs = BlkLogJournal.Runs(copy);
        Assert.True(runs.Count == 1 && runs[0].Records == Journal, string.Join(", ", runs));
        AssertCheckClean(extra);
    }

    /// <summary>
    /// What a suspended VM cannot resume with is refused and it stays suspended, nothing lost: a
    /// changed queue count (refused before any process starts), an image of another size (the new
    /// process refuses the disk's state and says so), a missing binary. A plain resume then hands
    /// it on unchanged and its journal carries on to the end.
    /// </summary>
    [SkippableFact]
    public void AChangeTheGuestWouldSeeIsRefusedAndTheVmStaysSuspended()
    {
        Require();
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        string bigger = CreateImage("bigger.qcow2", "qcow2", "32M");
        using var old = StartVm($"blk-log period=10 n={Journal}", disk);
        var text = new System.Text.StringBuilder();
        using (var console = new ConsoleClient(P("vm.console")))
        {
            Assert.True(console.WaitFor("guestkit: blk-log seq 10\n"), console.Text);
            SuspendOk();

            var queues = Vmctl("control", "resume", P("vm.control"), "--disk", $"{disk},serial=d0,queues=2");
            Assert.True(queues.ExitCode == 1, queues.Stdout + queues.Stderr);
            Assert.Contains("queues", queues.Stderr);

            var size = Vmctl("control", "resume", P("vm.control"), "--disk", $"{bigger},serial=d0");
            Assert.True(size.ExitCode == 1, size.Stdout + size.Stderr);
            Assert.Contains("virtio-blk0", size.Stderr);
            Assert.Contains("sectors", size.Stderr);
            Assert.Contains("stays suspended", size.Stderr);

            var missing = Vmctl("control", "upgrade", P("vm.control"), "--vmm", P("nowhere/kvm-vmm"));
            Assert.True(missing.ExitCode == 1, missing.Stdout + missing.Stderr);
            Assert.Contains(P("nowhere/kvm-vmm"), missing.Stderr);

            var status = JsonSerializer.Deserialize(Vmctl("control", "status", P("vm.control"), "--json").Stdout, VmControlJson.Default.VmStatus)!;
            Assert.Equal("suspended", status.State);
            // The processes that could not take the VM left the exit file alone: the VM has not ended.
            Assert.False(File.Exists(P("vm.exit")), File.Exists(P("vm.exit")) ? File.ReadAllText(P("vm.exit")) : "");
            Assert.Equal(old.Process.Id, status.Pid);

            var result = Parse(Vmctl("control", "resume", P("vm.control"), "--json"), "vmctl control resume");
            _taken.Add(result.Pid);
            Assert.Empty(result.Changes);
            Assert.True(console.Closed(Wait));
            text.Append(console.Text);
        }
        FinishJournal(old, text, disk, Journal);
    }

    /// <summary>
    /// A stand-in for kvm-vmm that dies at a bad moment of a hand-over: it takes the offer, says
    /// ready, and once told "go" binds its own sockets over the control and console paths (as a
    /// real taker does); then, with <paramref name="saysStarting"/>, says its vCPUs start, as a
    /// real taker does just before they run; and exits without running the VM.
    /// </summary>
    private string WriteDyingTaker(bool saysStarting) =>
        StandInTaker.Write(P(saysStarting ? "starting-taker" : "dying-taker"),
            StandInTaker.TakesThePaths + (saysStarting ? "send(\"starting\")\n" : ""));

    /// <summary>
    /// The new process takes the socket paths and dies before it runs the VM: the resume fails
    /// saying so, the old process takes its paths back (its control and console answer there
    /// again) and keeps the VM suspended, nothing lost; a resume then hands it to a real kvm-vmm
    /// and the journal goes on to its end.
    /// </summary>
    [SkippableFact]
    public void ATakerThatDiesAfterTakingThePathsLeavesThemToTheOldProcess()
    {
        Require();
        string taker = WriteDyingTaker(saysStarting: false);
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        using var old = StartVm($"blk-log period=10 n={Journal}", disk);
        var text = new System.Text.StringBuilder();
        using (var console = new ConsoleClient(P("vm.console")))
        {
            Assert.True(console.WaitFor("guestkit: blk-log seq 10\n"), console.Text);
            // Suspended first, so that the guest cannot end its journal while the stand-in starts.
            SuspendOk();
            var failed = Vmctl("control", "resume", P("vm.control"), "--vmm", taker);
            if (old.Process.WaitForExit(1000))
                Assert.Fail($"the old kvm-vmm exited with status {old.Process.ExitCode} although the hand-over failed; vmctl said: " +
                            $"{failed.Stdout}{failed.Stderr}; kvm-vmm's error output: {old.Stderr.Result}");
            Assert.True(failed.ExitCode == 1 && failed.Stderr.Contains("closed the hand-over connection", StringComparison.Ordinal)
                        && failed.Stderr.Contains("stays suspended", StringComparison.Ordinal), failed.Stdout + failed.Stderr);

            // The paths lead to the old process again.
            var status = JsonSerializer.Deserialize(Vmctl("control", "status", P("vm.control"), "--json").Stdout, VmControlJson.Default.VmStatus)!;
            Assert.Equal("suspended", status.State);
            Assert.Equal(old.Process.Id, status.Pid);
            Assert.Empty(Directory.GetFiles(Path.GetDirectoryName(P("vm.control"))!, ".vm.*.giver-*"));
        }
        // The old console, reached through its path again: it replays what the guest wrote so far.
        using (var console = new ConsoleClient(P("vm.console")))
        {
            var result = Parse(Vmctl("control", "resume", P("vm.control"), "--json"), "vmctl control resume");
            _taken.Add(result.Pid);
            Assert.True(console.Closed(Wait));
            text.Append(console.Text);
        }
        FinishJournal(old, text, disk, Journal);
    }

    /// <summary>
    /// The new process says its vCPUs start, then dies: the guest may have run there, so the old
    /// process's state of it is stale and must not run again. The hand-over fails saying the VM
    /// is lost, the old process ends as a failure (its exit record says so), and a resume is not
    /// possible: nothing runs the guest from a state older than one it has already run past.
    /// </summary>
    [SkippableFact]
    public void ATakerThatDiesAfterStartingTheGuestLeavesNoStaleVmBehind()
    {
        Require();
        string taker = WriteDyingTaker(saysStarting: true);
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        // A journal long enough not to end while the stand-in starts (the guest runs meanwhile).
        using var old = StartVm("blk-log period=10 n=100000", disk);
        using (var console = new ConsoleClient(P("vm.console")))
            Assert.True(console.WaitFor("guestkit: blk-log seq 10\n"), console.Text);
        var failed = Vmctl("control", "upgrade", P("vm.control"), "--vmm", taker);
        Assert.True(old.Process.WaitForExit(Wait), $"the old kvm-vmm still runs a VM whose state is stale; vmctl said: {failed.Stdout}{failed.Stderr}");
        Assert.True(failed.ExitCode == 1 && failed.Stderr.Contains("started the guest", StringComparison.Ordinal)
                    && failed.Stderr.Contains("the VM is lost", StringComparison.Ordinal),
            $"vmctl said: {failed.Stdout}{failed.Stderr}; the old kvm-vmm exited {old.Process.ExitCode}: {old.Stderr.Result}");
        Assert.Equal(1, old.Process.ExitCode);
        var record = WaitForExitRecord();
        Assert.True(record.Failed && record.Reason.Contains("lost in the hand-over", StringComparison.Ordinal), JsonSerializer.Serialize(record));
        Assert.Empty(Directory.GetFiles(Path.GetDirectoryName(P("vm.control"))!, ".vm.*.giver-*"));
        // The image holds what the guest wrote up to the suspend: closed cleanly by the old process.
        AssertCheckClean(disk);
    }
}
