using System.Runtime.CompilerServices;
using Kvm.Interop.Structs;
using Kvm.Tests.Shared;

namespace Kvm.Hypervisor.Tests;

/// <summary>Every vCPU and VM state ioctl of the shim, read and written back on real /dev/kvm.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VcpuStateTests
{
    [SkippableFact]
    public void FpuRoundTrips()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        var fpu = t.Vcpu.GetFpu();
        fpu.Fcw = 0x27f;
        fpu.LastOpcode = 0x123;
        t.Vcpu.SetFpu(fpu);
        var back = t.Vcpu.GetFpu();
        Assert.Equal(0x27f, back.Fcw);
        Assert.Equal(0x123, back.LastOpcode);
    }

    [SkippableFact]
    public unsafe void XsaveRoundTripsTheLegacyArea()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        var x = t.Vcpu.GetXsave();
        // The first 512 bytes are the FXSAVE image: FCW at 0, MXCSR at 24.
        x.Region[0] = (x.Region[0] & 0xffff0000) | 0x37e;
        x.Region[6] = 0x1f80 | 0x2000;
        // XSTATE_BV (header at byte 512): mark x87 and SSE state as present, or the CPU's
        // restore treats both as being in their initial configuration and ignores the values.
        x.Region[128] |= 0b11;
        t.Vcpu.SetXsave(x);
        var back = t.Vcpu.GetXsave();
        Assert.Equal(0x37eu, back.Region[0] & 0xffff);
        Assert.Equal(0x3f80u, back.Region[6]);
        Assert.Equal(0x37e, t.Vcpu.GetFpu().Fcw);
    }

    [SkippableFact]
    public void XcrsReportXcr0WithX87()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        var xcrs = t.Vcpu.GetXcrs();
        Assert.True(xcrs.NrXcrs >= 1);
        var xcr0 = xcrs.Get(0);
        Assert.Equal(0u, xcr0.Xcr);
        Assert.Equal(1UL, xcr0.Value & 1); // x87 state is always enabled
        t.Vcpu.SetXcrs(xcrs);
    }

    [SkippableFact]
    public void MsrsRoundTrip()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        const uint sysenterCs = 0x174, tsc = 0x10;
        t.Vcpu.SetMsrs([new KvmMsrEntry { Index = sysenterCs, Data = 0x10 }]);
        Span<KvmMsrEntry> read = [new KvmMsrEntry { Index = sysenterCs }, new KvmMsrEntry { Index = tsc }];
        Assert.Equal(2, t.Vcpu.GetMsrs(read));
        Assert.Equal(0x10UL, read[0].Data);
        Assert.True(read[1].Data > 0, "the TSC runs");
    }

    [SkippableFact]
    public void RefusedMsrIsNamed()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        var e = Assert.ThrowsAny<Exception>(() => t.Vcpu.SetMsrs([new KvmMsrEntry { Index = 0xdead_beef, Data = 1 }]));
        Assert.Contains("0xdeadbeef", e.Message);
    }

    [SkippableFact]
    public void LapicMpStateAndEventsRoundTrip()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        vm.CreateIrqchip();
        using var vcpu = vm.CreateVcpu(0);

        var lapic = vcpu.GetLapic();
        lapic.SetRegister(0x350, 0x700); // LVT LINT0: ExtINT
        vcpu.SetLapic(lapic);
        Assert.Equal(0x700u, vcpu.GetLapic().GetRegister(0x350) & 0x700);

        Assert.Equal(KvmMpState.Runnable, vcpu.GetMpState().MpState);
        vcpu.SetMpState(new KvmMpState { MpState = KvmMpState.Halted });
        Assert.Equal(KvmMpState.Halted, vcpu.GetMpState().MpState);

        var events = vcpu.GetEvents();
        Assert.Equal(0, events.ExceptionInjected);
        vcpu.SetEvents(events);
    }

    [SkippableFact]
    public void SecondVcpuStartsWaitingForSipi()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        vm.CreateIrqchip();
        using var bsp = vm.CreateVcpu(0);
        using var ap = vm.CreateVcpu(1);
        Assert.Equal(KvmMpState.Uninitialized, ap.GetMpState().MpState);
    }

    [SkippableFact]
    public void ClockAdvancesAndCanBeSet()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        var a = vm.GetClock();
        Thread.Sleep(20);
        var b = vm.GetClock();
        Assert.True(b.Clock > a.Clock, $"kvmclock went from {a.Clock} to {b.Clock}");
        vm.SetClock(new KvmClockData { Clock = 5_000_000_000 });
        Assert.InRange(vm.GetClock().Clock, 5_000_000_000UL, 6_000_000_000UL);
    }

    [SkippableFact]
    public unsafe void IrqchipPicAndIoapicRoundTrip()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        vm.CreateIrqchip();

        var master = vm.GetIrqchip(KvmIrqchip.PicMaster);
        Assert.Equal(KvmIrqchip.PicMaster, master.ChipId);
        ref var pic = ref Unsafe.As<byte, KvmPicState>(ref master.Chip[0]);
        pic.Imr = 0xa5;
        pic.IrqBase = 0x20;
        vm.SetIrqchip(master);
        var picBack = vm.GetIrqchip(KvmIrqchip.PicMaster);
        var p = Unsafe.As<byte, KvmPicState>(ref picBack.Chip[0]);
        Assert.Equal((0xa5, 0x20), (p.Imr, p.IrqBase));
        // The slave is a chip of its own.
        var slave = vm.GetIrqchip(KvmIrqchip.PicSlave);
        Assert.NotEqual(0xa5, Unsafe.As<byte, KvmPicState>(ref slave.Chip[0]).Imr);

        var chip = vm.GetIrqchip(KvmIrqchip.Ioapic);
        ref var ioapic = ref Unsafe.As<byte, KvmIoapicState>(ref chip.Chip[0]);
        Assert.Equal(0xfec0_0000UL, ioapic.BaseAddress);
        ioapic.RedirTbl[5] = 0x0000_0000_0001_0031UL; // vector 0x31, masked
        vm.SetIrqchip(chip);
        var ioBack = vm.GetIrqchip(KvmIrqchip.Ioapic);
        Assert.Equal(0x0000_0000_0001_0031UL, Unsafe.As<byte, KvmIoapicState>(ref ioBack.Chip[0]).RedirTbl[5]);
    }

    [SkippableFact]
    public void PitRoundTrips()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        vm.CreateIrqchip();
        vm.CreatePit2();
        var pit = vm.GetPit2();
        pit.Channel2.Count = 1193;
        pit.Channel2.Mode = 3;
        pit.Channel2.RwMode = 3;
        vm.SetPit2(pit);
        var back = vm.GetPit2();
        Assert.Equal((1193u, (byte)3, (byte)3), (back.Channel2.Count, back.Channel2.Mode, back.Channel2.RwMode));
    }

    [SkippableFact]
    public unsafe void DebugRegistersRoundTrip()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        var r = t.Vcpu.GetDebugregs();
        r.Db[0] = 0x1000;
        r.Db[3] = 0x4000;
        r.Dr7 = 0x401; // L0, and bit 10, which always reads as 1
        t.Vcpu.SetDebugregs(r);
        var back = t.Vcpu.GetDebugregs();
        Assert.Equal((0x1000UL, 0x4000UL, 0x401UL), (back.Db[0], back.Db[3], back.Dr7));
    }

    [SkippableFact]
    public void TscFrequencyIsReported()
    {
        TestEnvironment.RequireKvm();
        using var t = new KvmTestVm(KvmTestVm.PortLoop);
        uint khz = t.Vcpu.GetTscKhz();
        Assert.InRange(khz, 100_000u, 10_000_000u);
        // Setting the rate it already has is always accepted, scaling or not.
        t.Vcpu.SetTscKhz(khz);
        Assert.Equal(khz, t.Vcpu.GetTscKhz());
    }

    [SkippableFact]
    public void GsiRoutingAndIrqLinesAreAccepted()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var vm = sys.CreateVm();
        vm.CreateIrqchip();
        vm.CreatePit2();
        // The PC routes: IOAPIC pins 0-23 plus one MSI route.
        var routes = Enumerable.Range(0, 24).Select(i => KvmIrqRoutingEntry.Irqchip((uint)i, 2, (uint)i)).ToList();
        routes.Add(KvmIrqRoutingEntry.Msi(24, 0xfee0_0000, 0x30));
        vm.SetGsiRouting(routes.ToArray());
        vm.SetIrqLine(4, true);
        vm.SetIrqLine(4, false);
        using var fd = new EventFd();
        vm.AddIrqfd(fd, 24);
        fd.Signal();
        vm.RemoveIrqfd(fd, 24);
    }
}
