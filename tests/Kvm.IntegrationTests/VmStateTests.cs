using Kvm.Hypervisor.State;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// A whole machine's state (VM, vCPUs, every device by id) saved from a running guest-kit VM and
/// restored, with its RAM, into a second machine built from the same spec: the guest carries on
/// where it was, as if nothing happened. Needs /dev/kvm (the nested KVM host on these machines).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class VmStateTests : BlkTestBase
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(120);

    private static VmSpec Spec(string cmdline) => GuestKitRunner.Spec(cmdline) with { MemoryBytes = 64UL << 20 };

    /// <summary>A running machine, paused, saved (records and a copy of RAM) and then disposed of.</summary>
    private static (IReadOnlyList<StateRecord> Records, byte[][] Ram) SaveAndEnd(VirtualMachine vm)
    {
        vm.Pause();
        var records = vm.SaveState();
        // Through the bytes only, as a file would carry them: nothing of the first machine is shared.
        records = records.Select(r => r with { Payload = [.. r.Payload] }).ToArray();
        var ram = vm.Memory.Regions.Select(r =>
        {
            var bytes = new byte[r.Size];
            vm.Memory.Read(r.GuestAddress, bytes);
            return bytes;
        }).ToArray();
        vm.Dispose();
        return (records, ram);
    }

    private static VirtualMachine Restore(VmSpec spec, (IReadOnlyList<StateRecord> Records, byte[][] Ram) saved, SerialCapture serial)
    {
        var vm = VirtualMachine.CreateForRestore(spec, serial.Write);
        try
        {
            for (int i = 0; i < vm.Memory.Regions.Count; i++)
                vm.Memory.Write(vm.Memory.Regions[i].GuestAddress, saved.Ram[i]);
            vm.RestoreState(saved.Records);
            return vm;
        }
        catch
        {
            vm.Dispose();
            throw;
        }
    }

    private static VmStopReason WaitStopped(VirtualMachine vm, SerialCapture serial)
    {
        if (!vm.Stopped.Wait(Wait))
            Assert.Fail($"the restored guest did not finish; its console:\n{serial.Text}\n--- the VM now ---\n{vm.DescribeState()}");
        return vm.Stopped.Result;
    }

    /// <summary>
    /// The counter is saved part way; the restored machine prints exactly the rest: the two
    /// consoles joined are what an uninterrupted run prints, and the restored one ends with 0.
    /// </summary>
    [SkippableFact]
    public void ACounterSavedPartWayCountsOnFromWhereItWas()
    {
        GuestKitRunner.Require();
        const string cmdline = "count n=300000000";
        var whole = GuestKitRunner.Run(Spec(cmdline), Wait);
        Assert.True(whole.Reason is DebugExitStop { Status: 0 }, whole.Serial.Text);

        var first = new SerialCapture();
        var a = VirtualMachine.Create(Spec(cmdline), first.Write);
        a.Start();
        Assert.True(first.WaitFor("count 90000000/", Wait), first.Text);
        var saved = SaveAndEnd(a);
        Assert.DoesNotContain("count done", first.Text);

        var second = new SerialCapture();
        using var b = Restore(Spec(cmdline), saved, second);
        b.Start();
        var reason = WaitStopped(b, second);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"{reason.Describe()}; console:\n{second.Text}");
        Assert.False(second.Text.Contains("count 30000000/", StringComparison.Ordinal), $"the restored guest counted from the start again:\n{second.Text}");
        Assert.Equal(whole.Serial.Text, first.Text + second.Text);
    }

    /// <summary>
    /// 48 MiB of the 64 MiB RAM hold a pattern the guest wrote before the save and reads back,
    /// round after round, after it: the restored machine's rounds pass only if every page came over.
    /// </summary>
    [SkippableFact]
    public void AMemoryPatternOverTheRamReadsBackAfterARestore()
    {
        GuestKitRunner.Require();
        const string cmdline = "pattern size=48M rounds=40";
        var first = new SerialCapture();
        var a = VirtualMachine.Create(Spec(cmdline), first.Write);
        a.Start();
        Assert.True(first.WaitFor("guestkit: pattern round 2\n", Wait), first.Text);
        var saved = SaveAndEnd(a);
        Assert.DoesNotContain("pattern done", first.Text);

        var second = new SerialCapture();
        using var b = Restore(Spec(cmdline), saved, second);
        b.Start();
        var reason = WaitStopped(b, second);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"{reason.Describe()}; consoles:\n{first.Text}\n--- restored ---\n{second.Text}");
        Assert.Contains("guestkit: pattern done rounds=40", second.Text);
    }

    /// <summary>
    /// blk-log writes and flushes a journal record every 5 ms on a qcow2 disk, so the save finds
    /// requests coming and going. The restored machine goes on with the same boot (one tag, the
    /// records numbered on without a gap), the journal on disk holds one run, and the image is clean.
    /// </summary>
    [SkippableFact]
    public void ADiskJournalGoesOnAcrossARestoreAndTheImageIsClean()
    {
        Require();
        string disk = CreateImage("journal.qcow2", "qcow2", "16M");
        var spec = Spec("blk-log period=5 n=60") with { Disks = [new DiskSpec { Path = disk }] };
        var first = new SerialCapture();
        var a = VirtualMachine.Create(spec, first.Write);
        a.Start();
        Assert.True(first.WaitFor("guestkit: blk-log seq 20", Wait), first.Text);
        var saved = SaveAndEnd(a);
        Assert.DoesNotContain("blk-log done", first.Text);

        var second = new SerialCapture();
        using (var b = Restore(spec, saved, second))
        {
            b.Start();
            var reason = WaitStopped(b, second);
            Assert.True(reason is DebugExitStop { Status: 0 }, $"{reason.Describe()}; console:\n{second.Text}");
        }
        string both = first.Text + second.Text;
        Assert.Single(both.Split('\n'), l => l.StartsWith("guestkit: blk-log tag=", StringComparison.Ordinal));
        var seqs = both.Split('\n').Where(l => l.StartsWith("guestkit: blk-log seq ", StringComparison.Ordinal))
            .Select(l => int.Parse(l["guestkit: blk-log seq ".Length..].Trim(), System.Globalization.CultureInfo.InvariantCulture)).ToArray();
        Assert.Equal(Enumerable.Range(1, 60), seqs);

        AssertCheckClean(disk);
        string raw = P("journal.raw");
        var convert = QemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw);
        Assert.True(convert.ExitCode == 0, convert.Stderr);
        var runs = BlkLogJournal.Runs(raw);
        Assert.True(runs.Count == 1 && runs[0].Records == 60, string.Join(", ", runs));
    }

    /// <summary>
    /// A ticking guest with the ACPI power button armed: after the restore its ticks go on from
    /// the next number (timer and UART carry on), and the power button, enabled before the save,
    /// still powers it off.
    /// </summary>
    [SkippableFact]
    public void TicksGoOnAndThePowerButtonArmedBeforeTheSaveStillWorks()
    {
        GuestKitRunner.Require();
        const string cmdline = "tick period=20 pwrbtn=1 timeout=300";
        var first = new SerialCapture();
        var a = VirtualMachine.Create(Spec(cmdline), first.Write);
        a.Start();
        Assert.True(first.WaitFor("guestkit: tick 10\n", Wait), first.Text);
        var saved = SaveAndEnd(a);

        var second = new SerialCapture();
        using var b = Restore(Spec(cmdline), saved, second);
        b.Start();
        // The console may be cut mid-line at the save: the two joined read as one run, whose ticks
        // go on one by one from 1, five or more past the save.
        int last = Ticks(first.Text).Max();
        Assert.True(SpinWait.SpinUntil(() => Ticks(first.Text + second.Text).LastOrDefault() >= last + 5, Wait),
            $"after tick {last}:\n{second.Text}");
        var ticks = Ticks(first.Text + second.Text);
        Assert.Equal(Enumerable.Range(1, ticks.Length), ticks);
        b.Pm.PressPowerButton();
        var reason = WaitStopped(b, second);
        Assert.True(reason is GuestPowerOffStop, $"{reason.Describe()}; console:\n{second.Text}");
    }

    /// <summary>The tick numbers in whole lines of <paramref name="console"/> (the last line may still be arriving: "tick 1" of "tick 16").</summary>
    private static int[] Ticks(string console) => console.Split('\n').SkipLast(1)
        .Where(l => l.Length > 15 && l.StartsWith("guestkit: tick ", StringComparison.Ordinal) && char.IsAsciiDigit(l[15]))
        .Select(l => int.Parse(l[15..].Trim(), System.Globalization.CultureInfo.InvariantCulture)).ToArray();

    /// <summary>A saved state is refused by a machine of another shape, naming what differs, before anything runs.</summary>
    [SkippableFact]
    public void AStateFromAnotherMachineIsRefusedNamingTheDifference()
    {
        GuestKitRunner.Require();
        var a = VirtualMachine.Create(Spec("tick period=50 pwrbtn=0"), _ => { });
        a.Start();
        var saved = SaveAndEnd(a);

        using (var twoCpus = VirtualMachine.CreateForRestore(Spec("tick") with { Cpus = 2 }, _ => { }))
        {
            var e = Assert.Throws<Kvm.Devices.Manager.DeviceStateException>(() => twoCpus.RestoreState(saved.Records));
            Assert.Contains("vcpu1", e.Message);
        }
        using (var noDebugExit = VirtualMachine.CreateForRestore(Spec("tick") with { DebugExit = false }, _ => { }))
        {
            var e = Assert.Throws<Kvm.Devices.Manager.DeviceStateException>(() => noDebugExit.RestoreState(saved.Records));
            Assert.Contains("debug-exit", e.Message);
        }
        var broken = saved.Records.Select(r => r.Id == "serial0" ? r with { Payload = r.Payload[..5] } : r).ToArray();
        using (var same = VirtualMachine.CreateForRestore(Spec("tick"), _ => { }))
        {
            var e = Assert.Throws<StateFormatException>(() => same.RestoreState(broken));
            Assert.Contains("'serial0'", e.Message);
        }
    }

    /// <summary>
    /// The saved vCPUs' CPUID is restored as it was; a saved CPU that had a feature this host's
    /// KVM does not offer (here: one added to the record) is refused, naming the feature.
    /// </summary>
    [SkippableFact]
    public void ARestoreOntoAHostLackingAFeatureOfTheSavedCpuIsRefusedNamingIt()
    {
        GuestKitRunner.Require();
        using var kvm = Kvm.Hypervisor.KvmSystem.Open();
        var offered = Kvm.Vmm.Cpu.CpuidTable.For(kvm.GetSupportedCpuid(), 0,
            new Kvm.Vmm.Cpu.CpuidOptions(1, TscDeadline: kvm.CheckExtension(Kvm.Interop.Structs.KvmCap.TscDeadlineTimer) > 0));
        var absent = Kvm.Vmm.Cpu.CpuFeatures.Names.Order(StringComparer.Ordinal)
            .FirstOrDefault(n => !Kvm.Vmm.Cpu.CpuFeatures.IsSet(offered, n) && offered.Any(e => Kvm.Vmm.Cpu.CpuFeatures.Set([e], n)));
        if (absent is null)
            Assert.Fail("this host's KVM offers every CPU feature the VMM knows: no feature to take away");

        var a = VirtualMachine.Create(Spec("tick period=50 pwrbtn=0"), _ => { });
        a.Start();
        var saved = SaveAndEnd(a);
        var cpuid = saved.Records.Single(r => r.Id == "cpuid");
        var reader = new StateReader(cpuid.Payload, "cpuid");
        uint count = reader.U32("vcpus");
        var tables = new Kvm.Interop.Structs.KvmCpuidEntry2[count][];
        for (int i = 0; i < tables.Length; i++)
            tables[i] = reader.Structs<Kvm.Interop.Structs.KvmCpuidEntry2>("table", 1024);
        Assert.True(Kvm.Vmm.Cpu.CpuFeatures.Set(tables[0], absent));
        var w = new StateWriter().U32(count);
        foreach (var t in tables)
            w.Structs<Kvm.Interop.Structs.KvmCpuidEntry2>(t);
        var tampered = saved.Records.Select(r => r.Id == "cpuid" ? r with { Payload = w.ToArray() } : r).ToArray();

        using (var refused = VirtualMachine.CreateForRestore(Spec("tick"), _ => { }))
        {
            var e = Assert.Throws<Kvm.Devices.Manager.DeviceStateException>(() => refused.RestoreState(tampered));
            Assert.Contains(absent, e.Message);
        }
        // The untouched state restores and runs on.
        var serial = new SerialCapture();
        using var b = Restore(Spec("tick period=50 pwrbtn=0"), saved, serial);
        b.Start();
        Assert.True(serial.WaitFor("guestkit: tick ", Wait), serial.Text);
    }
}
