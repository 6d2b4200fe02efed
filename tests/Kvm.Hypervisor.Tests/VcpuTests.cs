using Kvm.Interop.Structs;
using Kvm.Tests.Shared;

namespace Kvm.Hypervisor.Tests;

/// <summary>vCPUs, the run state machine and the dirty log on real /dev/kvm.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VcpuTests
{
    [SkippableFact]
    public void RegistersRoundTrip()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        var r = t.Vcpu.GetRegs();
        r.Rax = 0x1234;
        r.R15 = 0xfeed;
        t.Vcpu.SetRegs(r);
        var back = t.Vcpu.GetRegs();
        Assert.Equal(0x1234UL, back.Rax);
        Assert.Equal(0xfeedUL, back.R15);
        Assert.Equal(KvmTestVm.CodeAddress, back.Rip);
        Assert.Equal(1u, t.Vcpu.GetSregs().Cs.Db);
    }

    [SkippableFact]
    public void RunsGuestCodeToAPortExit()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        Assert.Equal(0x80, t.RunUntilPortIo());
        Assert.Equal(KvmIoDirection.Out, t.Vcpu.RunPage[KvmRunLayout.IoDirection]);
    }

    [SkippableFact]
    public void ImmediateExitReturnsEintrWithoutRunning()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        t.Vcpu.SetImmediateExit(true);
        Assert.Equal(-4, t.Vcpu.Run());
        Assert.Equal(KvmTestVm.CodeAddress, t.Vcpu.GetRegs().Rip);
    }

    [SkippableFact]
    public void ThreadPausesResumesAndStops()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        long exits = 0;
        var thread = new VcpuThread(t.Vcpu, _ =>
        {
            Interlocked.Increment(ref exits);
            return VcpuAction.Continue;
        });
        var states = new List<VcpuRunState>();
        thread.StateChanged += (_, s) => { lock (states) states.Add(s); };
        thread.Start();
        SpinWait.SpinUntil(() => Interlocked.Read(ref exits) > 10, TimeSpan.FromSeconds(10));
        Assert.Equal(VcpuRunState.Running, thread.State);

        thread.Pause(TimeSpan.FromSeconds(10));
        Assert.Equal(VcpuRunState.Paused, thread.State);
        long atPause = Interlocked.Read(ref exits);
        Thread.Sleep(200);
        Assert.Equal(atPause, Interlocked.Read(ref exits));

        thread.Resume();
        Assert.True(SpinWait.SpinUntil(() => Interlocked.Read(ref exits) > atPause + 10, TimeSpan.FromSeconds(10)), "the vCPU ran again after resume");

        thread.RequestStop();
        Assert.True(thread.Join(TimeSpan.FromSeconds(10)));
        Assert.Equal(VcpuRunState.Stopped, thread.State);
        Assert.Null(thread.Fault);
        lock (states)
            Assert.Equal([VcpuRunState.Running, VcpuRunState.Paused, VcpuRunState.Running, VcpuRunState.Stopped], states);
    }

    [SkippableFact]
    public void StopKicksAVcpuBlockedInTheKernel()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.HaltLoop, irqchip: true);
        var thread = new VcpuThread(t.Vcpu, _ => VcpuAction.Continue);
        thread.Start();
        Thread.Sleep(300);
        Assert.Equal(VcpuRunState.Running, thread.State);
        thread.RequestStop();
        Assert.True(thread.Join(TimeSpan.FromSeconds(10)), "the halted vCPU was kicked out of KVM_RUN");
        Assert.Null(thread.Fault);
    }

    [SkippableFact]
    public void DirtyLogReportsWrittenPages()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.DirtyPages, logDirty: true);
        t.RunUntilPortIo();
        var log = t.Vm.GetDirtyLog(t.Slot);
        for (ulong page = 0x100; page < 0x140; page++)
            Assert.True(log.IsDirty(page), $"page 0x{page:x} was written by the guest");
        Assert.False(log.IsDirty(0x140), "page 0x140 was not written");
        Assert.False(log.IsDirty(0x200), "page 0x200 was not written");
        Assert.InRange(log.CountDirty(), 64, 80);

        // Without manual protection the read cleared the log; nothing ran since.
        Assert.Equal(0, t.Vm.GetDirtyLog(t.Slot).CountDirty());
        t.RunUntilPortIo();
        Assert.True(t.Vm.GetDirtyLog(t.Slot).CountDirty() >= 64);
    }

    [SkippableFact]
    public void AVmRunsOnASecondMappingOfTheMemfd_AndTheFirstSeesItsWrites()
    {
        // As after a VMM upgrade in place or a restore: KVM maps guest RAM through a mapping
        // attached to a memfd another GuestMemory made; both see the vCPU's writes. KVM's dirty log
        // has them; the device-dirty bitmap (which only this process's writers fill) does not.
        TestEnvironment.RequireKvm();
        using var owner = GuestMemory.Create([(0UL, 4UL << 20)]);
        owner.TrackDeviceWrites = true;
        using var t = new KvmTestVm(KvmTestVm.DirtyPages, logDirty: true, memory: GuestMemory.Attach(owner.BackingFd, owner.Layout));
        Assert.Equal(KvmTestVm.DirtyPages, owner.GetSpan(KvmTestVm.CodeAddress, KvmTestVm.DirtyPages.Length).ToArray());
        var r = t.Vcpu.GetRegs();
        r.Rax = 0xfeedface;
        t.Vcpu.SetRegs(r);
        t.RunUntilPortIo();
        for (ulong page = 0x100; page < 0x140; page++)
            Assert.Equal(0xfeedfaceu, owner.ReadU32(page * GuestMemory.PageSize));
        Assert.True(t.Vm.GetDirtyLog(t.Slot).IsDirty(0x100));
        Assert.All(owner.TakeDeviceDirty(), b => Assert.Equal(0, b.CountDirty()));
    }

    [SkippableFact]
    public void ManualDirtyLogProtectNeedsAnExplicitClear()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.DirtyPages, logDirty: true, manualProtect: true);
        t.RunUntilPortIo();
        var first = t.Vm.GetDirtyLog(t.Slot);
        Assert.True(first.CountDirty() >= 64);
        var again = t.Vm.GetDirtyLog(t.Slot);
        Assert.Equal(first.Words, again.Words); // reading does not clear

        t.Vm.ClearDirtyLog(t.Slot, again);
        Assert.Equal(0, t.Vm.GetDirtyLog(t.Slot).CountDirty());

        t.RunUntilPortIo();
        var third = t.Vm.GetDirtyLog(t.Slot);
        Assert.True(third.IsDirty(0x100) && third.IsDirty(0x13f));
        Assert.Equal(0x100000UL, third.DirtyAddresses().First(a => a >= 0x100000));
    }

    [SkippableFact]
    public void DirtyLogOnASlotWithoutLoggingIsRefused()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop, logDirty: false);
        var e = Assert.Throws<HypervisorException>(() => t.Vm.GetDirtyLog(t.Slot));
        Assert.Contains("does not log dirty pages", e.Message);
    }

    [SkippableFact]
    public void EventFdsWireIntoIrqfdAndIoeventfd()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        vm.CreateIrqchip();
        using var irq = new EventFd();
        vm.AddIrqfd(irq, 5);
        vm.RemoveIrqfd(irq, 5);
        using var notify = new EventFd(nonBlocking: true);
        vm.AddIoeventfd(notify, 0xd000_0000, 4, pio: false);
        vm.RemoveIoeventfd(notify, 0xd000_0000, 4, pio: false);
        Assert.Equal(0UL, notify.Read());
        notify.Signal(3);
        Assert.Equal(3UL, notify.Read());
    }
}
