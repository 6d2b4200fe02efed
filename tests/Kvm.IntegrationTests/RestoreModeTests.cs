using Kvm.Hypervisor;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.IntegrationTests;

/// <summary>
/// The same saved guest restored each way guest RAM can come back (eager, lazy, mapped) gives the same
/// guest-visible result; a lazy restore brings RAM in on touch and in the background until all of
/// it is there. Through snapshot files (VmSnapshot), in-process. Needs /dev/kvm (the nested host).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class RestoreModeTests : BlkTestBase
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(120);

    private static VmSpec Spec(string cmdline, ulong memory = 64UL << 20) =>
        GuestKitRunner.Spec(cmdline) with { MemoryBytes = memory, Cpus = 2 };

    /// <summary>Runs <paramref name="spec"/> until <paramref name="until"/> shows, pauses and saves it into <paramref name="dir"/>, and ends it.</summary>
    private static string RunAndSave(VmSpec spec, string until, string dir)
    {
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(spec, serial.Write);
        vm.Start();
        Assert.True(serial.WaitFor(until, Wait), serial.Text);
        vm.Pause();
        VmSnapshot.Save(vm, dir);
        return serial.Text;
    }

    private static (VmStopReason Reason, string Console, LazyLoadStats? Stats) RestoreAndRun(string dir, MemoryLoad mode, long? background = null)
    {
        var serial = new SerialCapture();
        using var vm = VmSnapshot.Restore(dir, serial.Write, new RestoreOptions { Memory = mode, BackgroundBytesPerSecond = background });
        Assert.Equal(mode == MemoryLoad.Lazy, vm.MemoryLoader is not null);
        vm.Start();
        if (!vm.Stopped.Wait(Wait))
            Assert.Fail($"the restored guest did not finish ({mode}; {vm.MemoryLoader?.Stats}); console:\n{serial.Text}\n--- the VM now ---\n{vm.DescribeState()}");
        LazyLoadStats? stats = null;
        if (vm.MemoryLoader is { } loader)
        {
            if (background != 0)
                Assert.True(loader.WaitDone(Wait), $"the lazy loader did not finish: {loader.Stats}");
            stats = loader.Stats;
        }
        // The control socket's stats carry the loader's counters; nothing for an eager restore.
        using (var control = new Kvm.Control.VmControl(vm))
        {
            var load = control.Stats().Memory.Load;
            Assert.Equal(stats is not null, load is not null);
            if (stats is not null)
            {
                Assert.Equal(stats.BytesTotal, load!.BytesTotal);
                Assert.Equal(stats.Faults, load.Faults);
                Assert.Equal(stats.Seconds is null, load.Seconds is null);
            }
        }
        return (vm.Stopped.Result, serial.Text, stats);
    }

    /// <summary>
    /// A pattern over 48 of 64 MiB, written before the save and read back after it: every restore
    /// mode gives the guest the same bytes (its rounds pass), and prints the same rest of the run.
    /// A lazy restore took touches (the guest read pages not yet in), loaded the rest in the
    /// background, and all of RAM is in at the end.
    /// </summary>
    [SkippableTheory]
    [InlineData(MemoryLoad.Eager)]
    [InlineData(MemoryLoad.Lazy)]
    [InlineData(MemoryLoad.Mapped)]
    public void APatternSavedPartWayReadsBackTheSameEachWay(MemoryLoad mode)
    {
        GuestKitRunner.Require();
        if (mode == MemoryLoad.Lazy)
            RequireUserfaultfd();
        const string cmdline = "pattern size=48M rounds=12";
        string dir = P("snap");
        string before = RunAndSave(Spec(cmdline), "guestkit: pattern round 1\n", dir);
        Assert.DoesNotContain("pattern done", before);

        var (reason, after, stats) = RestoreAndRun(dir, mode);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"{reason.Describe()}; console:\n{after}");
        Assert.Contains("guestkit: pattern done rounds=12", after);
        Assert.DoesNotContain("guestkit: pattern written", after);
        if (mode == MemoryLoad.Lazy)
        {
            Assert.NotNull(stats);
            Assert.True(stats.Done, stats.ToString());
            Assert.True(stats.Faults > 0, $"no touch waited for its page: {stats}");
            Assert.Equal(stats.BytesTotal, stats.BytesOnTouch + stats.BytesInBackground + stats.BytesFirst);
        }
    }

    /// <summary>
    /// Two VMs restored mapped from one snapshot (MAP_PRIVATE of its memory file) at once: both read
    /// the 48 MiB pattern back and pass, nothing was copied up front (each VM's RAM mapping holds the
    /// pattern's pages, shared, and only a few MiB of its own written pages), a write into one VM's
    /// RAM is seen neither by the other nor in the file, which never changes. Such a VM cannot be
    /// checkpointed (its RAM cannot be write-protected), and says so.
    /// </summary>
    [SkippableFact]
    public void TwoVmsMappedFromOneSnapshotShareItsPagesAndKeepTheirWrites()
    {
        GuestKitRunner.Require();
        string dir = P("snap");
        RunAndSave(Spec("pattern size=48M rounds=6"), "guestkit: pattern round 1\n", dir);
        string memoryFile = Path.Combine(dir, SnapshotFormat.MemoryFileName);
        string sha = Smaps.Sha256(memoryFile);
        var serialA = new SerialCapture();
        var serialB = new SerialCapture();
        using var a = VmSnapshot.Restore(dir, serialA.Write, new RestoreOptions { Memory = MemoryLoad.Mapped });
        using var b = VmSnapshot.Restore(dir, serialB.Write, new RestoreOptions { Memory = MemoryLoad.Mapped });
        Assert.Equal(memoryFile, a.Memory.PrivateCopyOf);
        var region = a.Memory.Regions[0];
        long before = Smaps.Of(null, region.Host)["Rss"];
        Assert.True(before < 8 << 10, $"a mapped restore read {before} kB of RAM before the guest ran");

        // A host write into A's RAM (at the top of RAM, which the guest kit leaves alone) stays A's.
        ulong top = region.GuestAddress + region.Size - GuestMemory.PageSize;
        var original = new byte[16];
        b.Memory.Read(top, original);
        a.Memory.Write(top, "only in vm a.   "u8);
        var seen = new byte[16];
        b.Memory.Read(top, seen);
        Assert.Equal(original, seen);

        a.Start();
        b.Start();
        foreach (var (vm, serial) in new[] { (a, serialA), (b, serialB) })
        {
            if (!vm.Stopped.Wait(Wait))
                Assert.Fail($"a mapped guest did not finish; console:\n{serial.Text}\n--- the VM now ---\n{vm.DescribeState()}");
            Assert.True(vm.Stopped.Result is DebugExitStop { Status: 0 }, $"{vm.Stopped.Result.Describe()}; console:\n{serial.Text}");
            Assert.Contains("guestkit: pattern done rounds=6", serial.Text);
            var smaps = Smaps.Of(null, vm.Memory.Regions[0].Host);
            // Rss counts the file's pages the guest read (shared, in the page cache) and its own.
            Assert.True(smaps["Rss"] >= 48 << 10, $"the guest read 48 MiB but its mapping holds {smaps["Rss"]} kB: {string.Join(", ", smaps)}");
            Assert.True(smaps["Private_Dirty"] < 16 << 10, $"{smaps["Private_Dirty"]} kB of RAM copied for a guest that only read its pattern: {string.Join(", ", smaps)}");
        }
        a.Memory.Read(top, seen);
        Assert.Equal("only in vm a.   "u8.ToArray(), seen);
        b.Memory.Read(top, seen);
        Assert.Equal(original, seen);
        Assert.Equal(sha, Smaps.Sha256(memoryFile));

        var refused = Assert.Throws<InvalidOperationException>(() => VmCheckpoint.Take(a, P("ckpt")));
        Assert.Contains("private copy-on-write mapping", refused.Message, StringComparison.Ordinal);
    }

    /// <summary>
    /// Restored lazily with no background loading, the guest runs on its touches alone: the 48 MiB
    /// it reads (and the pages of its own code, stack and tables) come in on touch, and RAM it never
    /// touches is never loaded.
    /// </summary>
    [SkippableFact]
    public void OnTouchAloneTheGuestGetsWhatItReadsAndNothingElseIsLoaded()
    {
        GuestKitRunner.Require();
        RequireUserfaultfd();
        const string cmdline = "pattern size=48M rounds=4";
        string dir = P("snap");
        RunAndSave(Spec(cmdline, 256UL << 20), "guestkit: pattern round 1\n", dir);
        var (reason, after, stats) = RestoreAndRun(dir, MemoryLoad.Lazy, background: 0);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"{reason.Describe()}; console:\n{after}");
        Assert.NotNull(stats);
        Assert.False(stats.Done, stats.ToString());
        Assert.Equal(0, stats.BytesInBackground);
        Assert.True(stats.BytesOnTouch >= 48L << 20, $"the 48 MiB the guest read did not all come in on touch: {stats}");
        Assert.True(stats.BytesOnTouch < 96L << 20, $"far more than the guest touched was loaded: {stats}");
        Assert.True(stats.Faults >= (48L << 20) / LazyMemoryLoader.ChunkSize, stats.ToString());
    }

    /// <summary>A counter saved part way: eager and lazy restores print exactly the rest of an uninterrupted run.</summary>
    [SkippableFact]
    public void ACounterRestoredEagerlyAndLazilyPrintsTheSameRest()
    {
        GuestKitRunner.Require();
        RequireUserfaultfd();
        const string cmdline = "count n=200000000";
        var whole = GuestKitRunner.Run(Spec(cmdline), Wait);
        Assert.True(whole.Reason is DebugExitStop { Status: 0 }, whole.Serial.Text);
        string dir = P("snap");
        string before = RunAndSave(Spec(cmdline), "count 60000000/", dir);
        Assert.DoesNotContain("count done", before);

        var eager = RestoreAndRun(dir, MemoryLoad.Eager);
        var lazy = RestoreAndRun(dir, MemoryLoad.Lazy);
        Assert.True(eager.Reason is DebugExitStop { Status: 0 } && lazy.Reason is DebugExitStop { Status: 0 }, $"{eager.Reason.Describe()} / {lazy.Reason.Describe()}");
        Assert.Equal(whole.Serial.Text, before + eager.Console);
        Assert.Equal(whole.Serial.Text, before + lazy.Console);
    }

    /// <summary>
    /// A disk journal restored lazily: the virtio-blk worker's first touches of the rings and
    /// buffers wait for their pages as the vCPUs' do, and the journal goes on in the same boot.
    /// </summary>
    [SkippableFact]
    public void ADiskJournalRestoredLazilyGoesOn()
    {
        Require();
        RequireUserfaultfd();
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        var spec = Spec("blk-log period=5 n=50") with { Disks = [new DiskSpec { Path = disk }] };
        string dir = P("snap");
        string before = RunAndSave(spec, "guestkit: blk-log seq 10\n", dir);
        var (reason, after, stats) = RestoreAndRun(dir, MemoryLoad.Lazy);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"{reason.Describe()}; console:\n{after}");
        var seqs = (before + after).Split('\n').Where(l => l.StartsWith("guestkit: blk-log seq ", StringComparison.Ordinal)).ToArray();
        Assert.Equal(50, seqs.Distinct().Count());
        Assert.Equal(50, seqs.Length);
        Assert.True(stats!.Done);
        AssertCheckClean(disk);
    }

    private static void RequireUserfaultfd() =>
        TestEnvironment.SkipIf(Kvm.Hypervisor.Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (a lazy restore needs root, or access to /dev/userfaultfd)");
}
