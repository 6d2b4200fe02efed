using Kvm.Tests.Shared;
using Kvm.Hypervisor;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>Each guest-kit workload on real /dev/kvm, through the VM engine in this process.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class GuestKitWorkloadTests
{
    [SkippableFact]
    public void HelloPrintsAndExitsZero()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("hello"));
        Assert.Equal(new DebugExitStop(0), reason);
        Assert.Contains("guestkit: hello", serial.Lines);
    }

    [SkippableTheory]
    [InlineData(0)]
    [InlineData(7)]
    [InlineData(200)]
    [InlineData(255)]
    public void ExitReturnsTheGuestsStatus(int code)
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec($"exit code={code}"));
        Assert.Equal(new DebugExitStop((byte)code), reason);
        Assert.Contains($"guestkit: exit code={code}", serial.Lines);
    }

    [SkippableFact]
    public void CountReportsProgressAndFinishes()
    {
        GuestKitRunner.Require();
        const long n = 50_000_000;
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec($"count n={n}"));
        Assert.Equal(new DebugExitStop(0), reason);
        var progress = serial.Lines.Where(l => l.StartsWith("guestkit: count ") && l.Contains('/')).ToArray();
        Assert.Equal(10, progress.Length);
        Assert.Equal($"guestkit: count {n}/{n}", progress[^1]);
        Assert.Equal($"guestkit: count done n={n}", serial.Lines[^1]);
    }

    [SkippableFact]
    public void DirtyLogSeesEveryPageTheGuestWrote()
    {
        GuestKitRunner.Require();
        var serial = new SerialCapture();
        var spec = GuestKitRunner.Spec("dirty size=64M passes=1") with { TrackDirtyPages = true };
        using var vm = VirtualMachine.Create(spec, serial.Write);
        var reason = vm.Run(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token);
        Assert.Equal(new DebugExitStop(0), reason);

        var line = Assert.Single(serial.Lines, l => l.StartsWith("guestkit: dirty "));
        Assert.Contains("size=67108864 passes=1 pages=16384", line);
        ulong baseAddress = Convert.ToUInt64(line[(line.IndexOf("base=0x", StringComparison.Ordinal) + 7)..], 16);

        var logs = vm.ReadDirtyLog();
        long total = logs.Sum(l => l.CountDirty());
        Assert.True(total >= 16384, $"the dirty log has {total} pages, the guest wrote 16384");
        var low = logs.Single(l => l.GuestAddress == 0);
        for (ulong a = baseAddress; a < baseAddress + (64UL << 20); a += GuestMemory.PageSize)
            Assert.True(low.IsDirty(a / GuestMemory.PageSize), $"page 0x{a:x} written by the guest is not in the dirty log");
    }

    [SkippableFact]
    public void DirtyLogIsEmptyAfterAClear()
    {
        GuestKitRunner.Require();
        var serial = new SerialCapture();
        var spec = GuestKitRunner.Spec("dirty size=8M passes=2") with { TrackDirtyPages = true };
        using var vm = VirtualMachine.Create(spec, serial.Write);
        vm.Run(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token);
        var logs = vm.ReadDirtyLog();
        Assert.True(logs.Sum(l => l.CountDirty()) >= 2048);
        vm.ClearDirtyLog(logs);
        Assert.Equal(0, vm.ReadDirtyLog().Sum(l => l.CountDirty()));
    }

    [SkippableFact]
    public void TripleFaultIsReportedAsGuestShutdown()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("fault"));
        var shutdown = Assert.IsType<GuestShutdownStop>(reason);
        Assert.Equal("triple fault", shutdown.How);
        Assert.Contains("guest shut down (triple fault)", reason.Describe());
        Assert.Contains("guestkit: fault: causing a triple fault", serial.Lines);
    }

    [SkippableFact]
    public void UnknownWorkloadFailsInsideTheGuest()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("no-such-workload"));
        Assert.Equal(new DebugExitStop(2), reason);
        Assert.Contains("guestkit: error: unknown workload 'no-such-workload'", serial.Lines);
    }

    [SkippableFact]
    public void DirtyRegionLargerThanRamIsRefusedByTheGuest()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("dirty size=64M passes=1") with { MemoryBytes = 32UL << 20 });
        Assert.Equal(new DebugExitStop(2), reason);
        Assert.Contains(serial.Lines, l => l.Contains("does not fit in guest RAM"));
    }

    [SkippableFact]
    public void TwoVcpusBootAndStop()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("hello") with { Cpus = 2 });
        Assert.Equal(new DebugExitStop(0), reason);
        Assert.Contains("guestkit: hello", serial.Lines);
    }

    [SkippableFact]
    public void WithoutDebugExitTheGuestParksAndAStopRequestEndsTheVm()
    {
        GuestKitRunner.Require();
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(GuestKitRunner.Spec("hello", debugExit: false), serial.Write);
        vm.Start();
        Assert.True(serial.WaitFor("parking vCPU", TimeSpan.FromSeconds(30)), serial.Text);
        Assert.False(vm.Stopped.IsCompleted);
        vm.RequestStop(new HostStop("test"));
        Assert.True(vm.Stopped.Wait(TimeSpan.FromSeconds(10)));
        Assert.Equal(new HostStop("test"), vm.Stopped.Result);
    }

    [SkippableFact]
    public void PauseStopsTheGuestAndResumeContinuesIt()
    {
        GuestKitRunner.Require();
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(GuestKitRunner.Spec("count n=20000000000"), serial.Write);
        vm.Start();
        Assert.True(serial.WaitFor("guestkit: count 2000000000/", TimeSpan.FromSeconds(60)), serial.Text);

        vm.Pause();
        Assert.All(vm.Vcpus, t => Assert.Equal(VcpuRunState.Paused, t.State));
        var rip = vm.Vcpus[0].Vcpu.GetRegs().Rip;
        string atPause = serial.Text;
        Thread.Sleep(1500); // a running guest prints a line every ~3 s; paused, nothing may change
        Assert.Equal(atPause, serial.Text);
        Assert.Equal(rip, vm.Vcpus[0].Vcpu.GetRegs().Rip);

        vm.Resume();
        int lines = serial.Lines.Length;
        Assert.True(SpinWait.SpinUntil(() => serial.Lines.Length > lines, TimeSpan.FromSeconds(60)), "the guest made progress after resume");
        vm.RequestStop(new HostStop("test"));
        Assert.True(vm.Stopped.Wait(TimeSpan.FromSeconds(10)));
    }

    [SkippableFact]
    public void TheCmosClockShowsTheHostsTime()
    {
        GuestKitRunner.Require();
        var before = DateTime.UtcNow;
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("rtc"));
        var after = DateTime.UtcNow;
        Assert.Equal(new DebugExitStop(0), reason);
        var line = Assert.Single(serial.Lines, l => l.StartsWith("guestkit: rtc ", StringComparison.Ordinal));
        var guest = DateTime.ParseExact(line["guestkit: rtc ".Length..], "yyyy-MM-dd HH:mm:ss",
            System.Globalization.CultureInfo.InvariantCulture, System.Globalization.DateTimeStyles.AdjustToUniversal | System.Globalization.DateTimeStyles.AssumeUniversal);
        Assert.InRange(guest, before.AddSeconds(-1), after.AddSeconds(1));
    }

    [SkippableFact]
    public void TheI8042ResetLineEndsTheVmAsAReset()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("reset"));
        Assert.Equal(new GuestResetStop(0), reason);
        Assert.Contains("guestkit: reset: pulsing the i8042 reset line", serial.Lines);
        Assert.DoesNotContain(serial.Lines, l => l.Contains("still running", StringComparison.Ordinal));
    }
}
