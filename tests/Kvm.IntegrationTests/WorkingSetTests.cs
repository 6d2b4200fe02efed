using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.IntegrationTests;

/// <summary>
/// Working set first: a save with a window traces the guest pages touched after the save point
/// (userfaultfd minor faults on the memfd, through KVM), records them in the snapshot, and a lazy
/// restore loads them before the vCPUs start. The guest kit's `touch` workload is the known working
/// set. In-process, on real KVM (the nested host here) and root (userfaultfd).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed partial class WorkingSetTests : BlkTestBase
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(120);
    private const ulong Page = 4096;

    private static VmSpec Spec(string cmdline) => GuestKitRunner.Spec(cmdline) with { MemoryBytes = 64UL << 20, Cpus = 2 };

    [GeneratedRegex(@"guestkit: touch old=0x([0-9a-f]+)\+(\d+) hot=0x([0-9a-f]+)\+(\d+) ready")]
    private static partial Regex ReadyLine();

    /// <summary>The old and hot regions the kit announced, as guest page ranges [first, end).</summary>
    private static ((ulong First, ulong End) Old, (ulong First, ulong End) Hot) Regions(string console)
    {
        var m = ReadyLine().Match(console);
        Assert.True(m.Success, console);
        ulong U(int g, NumberStyles style) => ulong.Parse(m.Groups[g].Value, style, CultureInfo.InvariantCulture);
        ulong old = U(1, NumberStyles.HexNumber), oldSize = U(2, NumberStyles.None), hot = U(3, NumberStyles.HexNumber), hotSize = U(4, NumberStyles.None);
        return ((old / Page, (old + oldSize) / Page), (hot / Page, (hot + hotSize) / Page));
    }

    /// <summary>
    /// The guest pages that belong to the kit itself whatever its workload: its loaded image (from
    /// the ELF's program headers: .boot with the page tables, GDT, TSS and IDT, code, data, bss and
    /// the stack, as guest.ld lays them out from 0x100000 to __image_end) and the boot structures
    /// this VMM writes for it (boot GDT, hvm_start_info, the memory map, the command line, the ACPI
    /// tables; X86Layout).
    /// </summary>
    private static HashSet<ulong> KitFootprint()
    {
        var pages = new HashSet<ulong>();
        void Add(ulong start, ulong end)
        {
            for (ulong p = start / Page; p < (end + Page - 1) / Page; p++)
                pages.Add(p);
        }
        var image = ElfImage.Read(TestEnvironment.GuestKit);
        foreach (var s in image.Segments)
            Add(s.PhysicalAddress, s.PhysicalAddress + s.MemorySize);
        Add(X86Layout.BootGdt, X86Layout.BootGdt + 0x30);
        Add(X86Layout.PvhStartInfo, X86Layout.PvhModlist + 0x20);
        Add(X86Layout.PvhMemmap, X86Layout.PvhMemmap + (ulong)X86Layout.PvhMemmapMaxEntries * 24);
        Add(X86Layout.CmdlineStart, X86Layout.BootDataEnd);
        Add(X86Layout.AcpiTablesStart, X86Layout.AcpiTablesStart + 0x10000);
        return pages;
    }

    private static ulong[] Pages(IEnumerable<GuestPageRange> ranges) =>
        [.. ranges.SelectMany(r => Enumerable.Range(0, (int)r.PageCount).Select(i => r.FirstPage + (ulong)i))];

    /// <summary>
    /// The issue's test: a guest that, after the save point, touches only a known set of pages (the
    /// hot region) gets exactly those recorded, plus pages of its own footprint; the old region,
    /// written before the save and not after, is not recorded; and the state file holds it.
    /// </summary>
    [SkippableFact]
    public void TheTraceHoldsThePagesTouchedAfterTheSaveAndOnlyTheKitsOwnBesides()
    {
        GuestKitRunner.Require();
        RequireUserfaultfd();
        string dir = P("snap");
        var serial = new SerialCapture();
        WorkingSetSaveResult saved;
        using (var vm = VirtualMachine.Create(Spec("touch size=1M before=1M rounds=1000000 period=2"), serial.Write))
        {
            vm.Start();
            Assert.True(serial.WaitFor(" ready\n", Wait), serial.Text);
            vm.Pause();
            saved = VmSnapshot.SaveWithWorkingSet(vm, dir, TimeSpan.FromSeconds(2), required: true);
            Assert.False(vm.Stopped.IsCompleted, $"the guest stopped during the window: {serial.Text}");
        }
        var (old, hot) = Regions(serial.Text);
        Assert.Null(saved.WorkingSetSkipped);
        var ws = saved.WorkingSet;
        Assert.NotNull(ws);
        ulong[] recorded = Pages(ws.Ranges);
        Assert.Equal(ws.Pages, (ulong)recorded.Length);

        var missing = Enumerable.Range(0, (int)(hot.End - hot.First)).Select(i => hot.First + (ulong)i).Except(recorded).ToArray();
        Assert.True(missing.Length == 0, $"{missing.Length} hot pages were not recorded, the first 0x{missing.FirstOrDefault() * Page:x}; working set: {Describe(ws.Ranges)}");
        var footprint = KitFootprint();
        var stray = recorded.Where(p => (p < hot.First || p >= hot.End) && !footprint.Contains(p)).ToArray();
        Assert.True(stray.Length == 0, $"pages outside the hot region and the kit's footprint were recorded: {string.Join(", ", stray.Take(20).Select(p => $"0x{p * Page:x}"))}; working set: {Describe(ws.Ranges)}");
        Assert.DoesNotContain(recorded, p => p >= old.First && p < old.End);
        // The kit ran its own code and stack meanwhile: some of its image is there.
        var image = ElfImage.Read(TestEnvironment.GuestKit).Extent;
        Assert.Contains(recorded, p => p >= image.Start / Page && p < image.End / Page);

        var state = SnapshotReader.Read(dir);
        Assert.Equal(ws.Ranges, state.WorkingSet);
        Assert.Equal(new FileInfo(Path.Combine(dir, SnapshotFormat.StateFileName)).Length, saved.Snapshot.StateBytes);
    }

    /// <summary>
    /// Saved with a working set part way through its rounds, the guest restored eagerly and lazily
    /// (the working set loaded first) prints exactly the rest of an uninterrupted run and checks
    /// both regions whole at the end; the lazy restore loaded at least the hot region first.
    /// </summary>
    [SkippableFact]
    public void ALazyRestoreOfASnapshotWithAWorkingSetGivesTheSameResult()
    {
        GuestKitRunner.Require();
        RequireUserfaultfd();
        const string cmdline = "touch size=1M before=2M rounds=400 period=5";
        var whole = GuestKitRunner.Run(Spec(cmdline), Wait);
        Assert.True(whole.Reason is DebugExitStop { Status: 0 }, whole.Serial.Text);

        string dir = P("snap");
        string before;
        var serial = new SerialCapture();
        using (var vm = VirtualMachine.Create(Spec(cmdline), serial.Write))
        {
            vm.Start();
            Assert.True(serial.WaitFor("touch round 80/400\n", Wait), serial.Text);
            vm.Pause();
            before = serial.Text;
            var saved = VmSnapshot.SaveWithWorkingSet(vm, dir, TimeSpan.FromSeconds(1), required: true);
            Assert.True(saved.WorkingSet is { Pages: > 0 }, saved.ToString());
        }
        Assert.DoesNotContain("touch done", before);
        var (_, hot) = Regions(before);
        Assert.NotNull(SnapshotReader.Read(dir).WorkingSet);

        foreach (var mode in new[] { MemoryLoad.Eager, MemoryLoad.Lazy })
        {
            var restored = new SerialCapture();
            using var vm = VmSnapshot.Restore(dir, restored.Write, new RestoreOptions { Memory = mode });
            LazyLoadStats? first = vm.MemoryLoader?.Stats;
            vm.Start();
            if (!vm.Stopped.Wait(Wait))
                Assert.Fail($"the restored guest did not finish ({mode}); console:\n{restored.Text}\n--- the VM now ---\n{vm.DescribeState()}");
            Assert.True(vm.Stopped.Result is DebugExitStop { Status: 0 }, $"{mode}: {vm.Stopped.Result.Describe()}; console:\n{restored.Text}");
            Assert.Equal(whole.Serial.Text, before + restored.Text);
            if (mode == MemoryLoad.Lazy)
            {
                Assert.NotNull(first);
                Assert.True(first.BytesFirst >= (long)((hot.End - hot.First) * Page), $"the working set was not loaded first: {first}");
                Assert.True(first.BytesFirst < 16L << 20, $"far more than the working set was loaded first: {first}");
            }
        }
    }

    private static string Describe(IEnumerable<GuestPageRange> ranges) =>
        string.Join(", ", ranges.Select(r => $"0x{r.FirstPage * Page:x}+{r.PageCount}p"));

    private static void RequireUserfaultfd() =>
        TestEnvironment.SkipIf(Kvm.Hypervisor.Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (a working-set trace needs root, or access to /dev/userfaultfd)");
}
