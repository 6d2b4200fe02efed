using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;
using Xunit.Abstractions;

namespace Kvm.IntegrationTests;

/// <summary>
/// Debian's cloud kernel booted to its init (as <see cref="LinuxBootTests"/> does), saved while the
/// init runs a disk loop and restored eagerly or lazily into a new machine: the same boot carries on. The
/// init's "diskloop" check (native/linux/init) formats the virtio-blk disk, then writes and syncs
/// one numbered file per round and sleeps briefly, each round on the other CPU, printing "loop N up
/// UPTIME"; at the end it checks every file after a remount and reports what the kernel logged
/// meanwhile. The host judges the image afterwards.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed partial class LinuxSnapshotTests(ITestOutputHelper output) : IDisposable
{
    private static readonly TimeSpan BootTimeout = TimeSpan.FromSeconds(300);

    /// <summary>The rest of the loop after the restore: tens of seconds inside a nested KVM host.</summary>
    private static readonly TimeSpan RunTimeout = TimeSpan.FromSeconds(180);
    private static readonly TimeSpan ToolTimeout = TimeSpan.FromSeconds(120);
    private const ulong Memory = 256UL << 20;
    private const int Loops = 30;
    private const int SaveAfter = 3;

    /// <summary>
    /// The least time the guest spends saved (between the pause and the restored machine's start):
    /// long enough that a guest clock that ran on while it was saved shows as a jump.
    /// </summary>
    private static readonly TimeSpan MinPause = TimeSpan.FromSeconds(12);
    private const string GuestPrefix = "kvm-guest: ";

    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-linux-snap-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string P(string name) => Path.Combine(_dir, name);

    /// <summary>
    /// Two vCPUs and a qcow2 disk; saved (pause, VmSnapshot.Save) once "loop 3" is on the console,
    /// the first machine disposed of, the snapshot restored (VmSnapshot.Restore, eagerly or lazily) and started.
    /// The restored machine does not boot again, its loop goes on from the next number to the end,
    /// the files it wrote after the restore are on disk with their content (the guest checks them
    /// after a remount with the page cache dropped, and the host reads them from the image), the
    /// guest's clock went on from where it was saved, the kernel logged no RCU stall, lockup, hung
    /// task, clocksource or TSC trouble or I/O error, and the image and its file system are clean.
    /// </summary>
    [SkippableTheory]
    [InlineData(MemoryLoad.Eager)]
    [InlineData(MemoryLoad.Lazy)]
    public void ALinuxGuestSavedInADiskLoopAndRestoredCarriesOnCleanly(MemoryLoad memory)
    {
        TestEnvironment.RequireKvm();
        if (memory == MemoryLoad.Lazy)
            TestEnvironment.SkipIf(Kvm.Hypervisor.Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (a lazy restore needs root, or access to /dev/userfaultfd)");
        var (spec, disk, checks) = DiskLoopSpec();

        // A: boots, runs the loop; paused and saved part way, then gone.
        string snapshot = P("snapshot");
        var first = new SerialCapture();
        string before;
        Stopwatch paused;
        using (var a = VirtualMachine.Create(spec, first.Write))
        {
            StartToLoop(a, first);
            a.Pause();
            paused = Stopwatch.StartNew();
            before = first.Text.Replace("\r", "");
            VmSnapshot.Save(a, snapshot);
        }
        Assert.DoesNotContain($"{GuestPrefix}diskloop checked", before);
        var loopsBefore = LoopLines(before);
        Assert.True(loopsBefore.Length >= SaveAfter && loopsBefore[^1].N <= Loops - 20,
            $"saved after loop {loopsBefore.LastOrDefault().N}: too late for the test to mean much; console:\n{before}");

        // B: restored from the snapshot alone, and started.
        if (paused.Elapsed < MinPause)
            Thread.Sleep(MinPause - paused.Elapsed);
        var second = new SerialCapture();
        VmStopReason reason;
        TimeSpan pausedFor;
        using (var b = VmSnapshot.Restore(snapshot, second.Write, new RestoreOptions { Memory = memory }))
        {
            pausedFor = paused.Elapsed;
            b.Start();
            if (!b.Stopped.Wait(RunTimeout))
                Assert.Fail($"the restored guest did not finish within {RunTimeout.TotalSeconds} s ({memory}); before the save:\n{before}\n--- restored ---\n{second.Text}\n--- the restored VM now ---\n{b.DescribeState()}");
            reason = b.Stopped.Result;
        }
        string after = second.Text.Replace("\r", "");
        string both = $"{before}\n--- restored (the guest was paused {pausedFor.TotalSeconds:F1} s) ---\n{after}";
        output.WriteLine(both);
        Assert.True(reason == new DebugExitStop(0),
            $"the guest's verdict: {reason.Describe()} (0 = every check of '{checks}' passed); consoles:\n{both}");

        // The same boot went on: no kernel or init start in B, and the loop numbers run on from
        // where A's stopped, each once (a line cut by the save is whole in A's and B's joined).
        foreach (var start in new[] { "Linux version", "Run /init", $"{GuestPrefix}init running on", $"{GuestPrefix}loaded " })
            Assert.False(after.Contains(start, StringComparison.Ordinal), $"the restored guest booted again ('{start}'):\n{both}");
        var loops = LoopLines(before + after);
        Assert.True(loops.Select(l => l.N).SequenceEqual(Enumerable.Range(1, Loops)),
            $"the loop numbers are {string.Join(' ', loops.Select(l => l.N))}, not 1..{Loops}; consoles:\n{both}");
        int across = loopsBefore[^1].N;  // the step from loop `across` to the next spans the save
        var loopsAfter = LoopLines(after);
        Assert.True(loopsAfter.Length >= Loops - across - 1,  // all but one line the save may have cut
            $"the restored guest's loops: {string.Join(' ', loopsAfter.Select(l => l.N))}; consoles:\n{both}");

        // The guest's clock went on from the save: its uptime never went back, and the step across
        // the save is far from the time the guest spent saved (which is at least MinPause). It is
        // not quite like the other steps: a freshly restored guest runs slowly for a while, as the
        // host maps its memory into the new VM page by page (seconds in a nested KVM host).
        var ups = loops.Select(l => l.Up).ToArray();
        for (int i = 1; i < ups.Length; i++)
            Assert.True(ups[i] >= ups[i - 1], $"the uptime went back from {ups[i - 1]} s (loop {i}) to {ups[i]} s (loop {i + 1}); consoles:\n{both}");
        double step = ups[across] - ups[across - 1];
        double longestOther = Enumerable.Range(1, ups.Length - 1).Where(i => i != across).Max(i => ups[i] - ups[i - 1]);
        output.WriteLine($"uptime step across the save {step:F2} s, other steps at most {longestOther:F2} s, paused {pausedFor.TotalSeconds:F1} s");
        Assert.True(step < longestOther + pausedFor.TotalSeconds / 2,
            $"the guest's uptime moved {step:F2} s from loop {across} to {across + 1} across the save (other steps: at most {longestOther:F2} s; paused {pausedFor.TotalSeconds:F1} s); consoles:\n{both}");

        // What the guest found: every file, read back from disk after a remount, and its kernel log.
        string[] guest = GuestLines(after);
        Assert.Contains($"diskloop checked {Loops} files, 0 wrong", guest);
        Assert.Contains($"PASS diskloop:{Loops}", guest);
        var clocksources = guest.Where(l => l.StartsWith("diskloop clocksource ", StringComparison.Ordinal)).ToArray();
        var clocksourcesBefore = GuestLines(before).Where(l => l.StartsWith("diskloop clocksource ", StringComparison.Ordinal)).ToArray();
        Assert.True(clocksourcesBefore.Length == 1 && clocksources.Length == 1 && clocksources[0] == clocksourcesBefore[0],
            $"the clocksource changed: {string.Join(", ", clocksourcesBefore.Concat(clocksources))}; consoles:\n{both}");
        var dmesg = guest.Where(l => l.StartsWith("diskloop dmesg ", StringComparison.Ordinal)).Select(l => l["diskloop dmesg ".Length..]).ToArray();
        var warnings = dmesg.Where(l => KernelWarning().IsMatch(l)).ToArray();
        Assert.True(warnings.Length == 0, $"the kernel warned during the loop:\n{string.Join('\n', warnings)}\nconsoles:\n{both}");

        // The host's view: a clean image and file system holding every file the loop wrote,
        // those written after the restore included.
        AssertImageHoldsTheLoop(disk, "disk");
    }

    /// <summary>
    /// The host's view of a disk the loop ran on to its end: qemu-img finds the image (and its
    /// chain) clean, e2fsck the file system, and /loop holds every file with its content.
    /// </summary>
    private void AssertImageHoldsTheLoop(string image, string name)
    {
        Run("qemu-img", "check", image);
        string raw = P($"{name}.raw");
        Run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw);
        Run("e2fsck", "-f", "-n", raw);
        string files = P($"{name}-files");
        Directory.CreateDirectory(files);
        Run("debugfs", "-R", $"rdump /loop {files}", raw);
        for (int n = 1; n <= Loops; n++)
        {
            string file = Path.Combine(files, "loop", n.ToString(CultureInfo.InvariantCulture));
            Assert.True(File.Exists(file), $"{image} has no /loop/{n}");
            Assert.True(File.ReadAllText(file) == LoopContent(n), $"/loop/{n} in {image} differs from what loop {n} wrote");
        }
        File.Delete(raw);
    }

    /// <summary>The guest passed every check of <paramref name="checks"/> and its kernel logged no trouble.</summary>
    private static void AssertLoopPassed(VmStopReason reason, string console, string checks, string what)
    {
        Assert.True(reason == new DebugExitStop(0), $"{what}: the guest's verdict: {reason.Describe()} (0 = every check of '{checks}' passed); console:\n{console}");
        string[] guest = GuestLines(console);
        Assert.Contains($"diskloop checked {Loops} files, 0 wrong", guest);
        Assert.Contains($"PASS diskloop:{Loops}", guest);
        var warnings = guest.Where(l => l.StartsWith("diskloop dmesg ", StringComparison.Ordinal)).Select(l => l["diskloop dmesg ".Length..])
            .Where(l => KernelWarning().IsMatch(l)).ToArray();
        Assert.True(warnings.Length == 0, $"{what}: the kernel warned during the loop:\n{string.Join('\n', warnings)}\nconsole:\n{console}");
    }

    /// <summary>
    /// A live checkpoint of a Linux guest in its disk loop (issue 13): the guest is stopped only
    /// briefly and runs its loop to the end on its new disk layer without noticing (no stall, lockup
    /// or clock warning; every file checks); the checkpoint, restored into a new machine, goes on
    /// from where it was taken (no new boot; the loop numbers run on) and passes the same checks on
    /// its own disk; both disks are clean images and file systems holding every file.
    /// </summary>
    [SkippableFact]
    public void ALinuxGuestCheckpointedInADiskLoopRunsOnAndTheCheckpointCarriesOnCleanly()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.SkipIf(Kvm.Hypervisor.RamCheckpointWriter.Refusal());
        var (spec, disk, checks) = DiskLoopSpec();

        string checkpoint = P("checkpoint");
        var first = new SerialCapture();
        string atCheckpoint = "";
        CheckpointResult taken;
        VmStopReason parentReason;
        using (var a = VirtualMachine.Create(spec, first.Write))
        {
            StartToLoop(a, first);
            // The console as it was at the stop: the guest runs on while RAM is written out.
            taken = VmCheckpoint.Take(a, checkpoint, pause: () =>
            {
                a.Pause();
                atCheckpoint = first.Text.Replace("\r", "");
            });
            output.WriteLine($"checkpoint: guest stopped {taken.StopSeconds * 1000:0.##} ms ({string.Join(", ", taken.StopSteps.Select(x => $"{x.Name} {x.Milliseconds} ms"))}), " +
                             $"{taken.Seconds:0.###} s in all ({string.Join(", ", taken.Phases.Select(x => $"{x.Name} {x.Milliseconds} ms"))}); RAM: {taken.Memory}");
            if (!a.Stopped.Wait(RunTimeout))
                Assert.Fail($"the checkpointed guest did not finish within {RunTimeout.TotalSeconds} s; console:\n{first.Text}\n--- the VM now ---\n{a.DescribeState()}");
            parentReason = a.Stopped.Result;
        }
        string parent = first.Text.Replace("\r", "");
        AssertLoopPassed(parentReason, parent, checks, "the checkpointed guest");
        Assert.True(LoopLines(parent).Select(l => l.N).SequenceEqual(Enumerable.Range(1, Loops)), $"the parent's loops:\n{parent}");
        int across = LoopLines(atCheckpoint).Last().N;
        Assert.True(across <= Loops - 20, $"checkpointed after loop {across}: too late for the test to mean much");

        var second = new SerialCapture();
        VmStopReason reason;
        using (var b = VmSnapshot.Restore(checkpoint, second.Write))
        {
            b.Start();
            if (!b.Stopped.Wait(RunTimeout))
                Assert.Fail($"the restored checkpoint did not finish within {RunTimeout.TotalSeconds} s; console:\n{second.Text}\n--- the restored VM now ---\n{b.DescribeState()}");
            reason = b.Stopped.Result;
        }
        string after = second.Text.Replace("\r", "");
        string both = $"{atCheckpoint}\n--- restored from the checkpoint ---\n{after}";
        output.WriteLine(both);
        AssertLoopPassed(reason, after, checks, "the restored checkpoint");
        foreach (var start in new[] { "Linux version", "Run /init", $"{GuestPrefix}init running on" })
            Assert.False(after.Contains(start, StringComparison.Ordinal), $"the restored checkpoint booted again ('{start}'):\n{both}");
        var loopsAfter = LoopLines(after);
        Assert.True(loopsAfter.Length >= Loops - across - 1 && loopsAfter[^1].N == Loops && loopsAfter[0].N <= across + 2,
            $"the restored checkpoint's loops: {string.Join(' ', loopsAfter.Select(l => l.N))}, checkpointed after loop {across}:\n{both}");

        AssertImageHoldsTheLoop(Assert.IsType<string>(taken.Layers[0]), "parent");
        AssertImageHoldsTheLoop(taken.Disks[0], "checkpoint");
    }

    /// <summary>
    /// Two vCPUs, 256 MiB and a new 64 MiB qcow2 disk, for the init's disk loop; skips where the
    /// Linux guest or the tools the host's checks use are missing.
    /// </summary>
    private (VmSpec Spec, string Disk, string Checks) DiskLoopSpec()
    {
        string kernel = RequireLinux("bzImage");
        string initrd = RequireLinux("initramfs.cpio.gz");
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("e2fsck", "e2fsprogs");
        TestEnvironment.RequireProgram("debugfs", "e2fsprogs");
        string disk = P("disk.qcow2");
        Run("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M");
        string checks = $"cpus:2,diskloop:{Loops}";
        var spec = new VmSpec
        {
            Kernel = kernel, Initrd = initrd, Cmdline = $"console=ttyS0 quiet panic=-1 kvmtest={checks}",
            Cpus = 2, MemoryBytes = Memory, DebugExit = true,
            Disks = [new DiskSpec { Path = disk }],
        };
        return (spec, disk, checks);
    }

    /// <summary>Starts <paramref name="vm"/> and waits until its loop has reached <see cref="SaveAfter"/>.</summary>
    private static void StartToLoop(VirtualMachine vm, SerialCapture console)
    {
        vm.Start();
        bool reached = Poll(() => LoopLines(console.Text).Any(l => l.N >= SaveAfter) || vm.Stopped.IsCompleted, BootTimeout);
        Assert.True(reached && !vm.Stopped.IsCompleted,
            $"the guest did not reach loop {SaveAfter} ({(vm.Stopped.IsCompleted ? vm.Stopped.Result.Describe() : "timed out")}); console:\n{console.Text}");
    }

    /// <summary>
    /// Waits until <paramref name="done"/> holds or <paramref name="timeout"/> passes, looking every
    /// 50 ms (not spinning: the nested KVM host has two CPUs and the guest two vCPUs).
    /// </summary>
    private static bool Poll(Func<bool> done, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (!done())
        {
            if (clock.Elapsed > timeout)
                return false;
            Thread.Sleep(50);
        }
        return true;
    }

    /// <summary>What the init's loop writes to /mnt/loop/N.</summary>
    private static string LoopContent(int n)
    {
        var s = new StringBuilder();
        for (int j = 0; j < 2048; j++)
            s.Append(CultureInfo.InvariantCulture, $"file {n} line {j}\n");
        return s.ToString();
    }

    /// <summary>The whole "loop N up UPTIME" lines of a console, in order.</summary>
    private static (int N, double Up)[] LoopLines(string console) =>
        LoopLine().Matches(console).Select(m => (int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture),
            double.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture))).ToArray();

    /// <summary>What the guest's init printed, without the "kvm-guest: " prefix.</summary>
    private static string[] GuestLines(string console) =>
        console.Split('\n').Where(l => l.StartsWith(GuestPrefix, StringComparison.Ordinal)).Select(l => l[GuestPrefix.Length..]).ToArray();

    private static string LinuxDir => Path.Combine(TestEnvironment.BuildDir, "linux");

    private static string RequireLinux(string file)
    {
        string path = Path.Combine(LinuxDir, file);
        if (!File.Exists(path))
            TestEnvironment.SkipIf($"{path} is missing (run 'make linux', which fetches Debian's kernel)");
        return path;
    }

    private static void Run(string program, params string[] args)
    {
        var r = TestEnvironment.RunProcess(program, args, ToolTimeout);
        Assert.True(r.ExitCode == 0, $"{program} {string.Join(' ', args)} exited {r.ExitCode}:\n{r.Stdout}{r.Stderr}");
    }

    [GeneratedRegex(@"^kvm-guest: loop (\d+) up (\d+\.\d+)\r?\n", RegexOptions.Multiline)]
    private static partial Regex LoopLine();

    /// <summary>Kernel log lines that tell of trouble a restore can cause (native/linux/init's diskloop judges the same).</summary>
    [GeneratedRegex(@"rcu.*stall|lockup|blocked for more than|watchdog|unstable|skew|timed out|timeout|I/O error", RegexOptions.IgnoreCase)]
    private static partial Regex KernelWarning();
}
