using Kvm.Interop.Structs;
using Kvm.Tests.Shared;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// <see cref="VcpuState"/>: a vCPU saved in one VM and restored, with a copy of its memory, into a
/// fresh VM goes on exactly where it stopped.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VcpuStateRoundTripTests
{
    /// <summary>inc eax; out 0x80, al; jmp back: each port-I/O exit shows the next count in EAX.</summary>
    private static readonly byte[] Counter = [0x40, 0xE6, 0x80, 0xEB, 0xFB];

    [SkippableFact]
    public unsafe void ACounterSavedInOneVmGoesOnInAnotherFromTheNextCount()
    {
        TestEnvironment.RequireKvm();
        using var a = new KvmTestVm(Counter, irqchip: true);
        for (int i = 0; i < 10; i++)
            Assert.Equal(0x80, a.RunUntilPortIo());
        // Complete the pending port I/O (KVM finishes an exit's instruction on the next KVM_RUN),
        // so that the registers are those after it.
        a.Vcpu.SetImmediateExit(true);
        Assert.Equal(-4, a.Vcpu.Run());
        a.Vcpu.SetImmediateExit(false);
        // State the program does not touch, to see it carried over.
        var fpu = a.Vcpu.GetFpu();
        fpu.Fcw = 0x27f;
        a.Vcpu.SetFpu(fpu);
        var dr = a.Vcpu.GetDebugregs();
        dr.Db[1] = 0x7000;
        a.Vcpu.SetDebugregs(dr);

        var msrs = VcpuState.ReadableMsrs(a.Vcpu, a.System.GetMsrIndexList());
        Assert.NotEmpty(msrs);
        var saved = VcpuState.Save(a.Vcpu, msrs);
        Assert.Equal(10UL, saved.Regs.Rax & 0xffffffff);
        var image = new byte[4 << 20];
        a.Memory.Read(0, image);

        using var b = new KvmTestVm([0xF4], irqchip: true); // hlt, if the restore did nothing
        b.Memory.Write(0, image);
        saved.Restore(b.Vcpu);
        Assert.Equal(0x80, b.RunUntilPortIo());
        Assert.Equal(11UL, b.Vcpu.GetRegs().Rax & 0xffffffff);
        Assert.Equal(0x80, b.RunUntilPortIo());
        Assert.Equal(12UL, b.Vcpu.GetRegs().Rax & 0xffffffff);
        Assert.Equal(0x27f, b.Vcpu.GetFpu().Fcw);
        var drBack = b.Vcpu.GetDebugregs();
        Assert.Equal(0x7000UL, drBack.Db[1]);
        // The MSRs came along, the TSC among them: it did not restart from zero.
        var tsc = new KvmMsrEntry[] { new() { Index = 0x10 } };
        b.Vcpu.GetMsrs(tsc);
        Assert.True(tsc[0].Data >= saved.Msrs.Single(m => m.Index == 0x10).Data, "the TSC went back");
        // And A itself goes on too: saving changed nothing.
        Assert.Equal(0x80, a.RunUntilPortIo());
        Assert.Equal(11UL, a.Vcpu.GetRegs().Rax & 0xffffffff);
    }

    /// <summary>
    /// A LAPIC timer armed in TSC-deadline mode comes over armed: KVM takes IA32_TSC_DEADLINE only
    /// while the LAPIC's timer is in that mode, so the restore writes it after the LAPIC (written
    /// with the other MSRs into a fresh vCPU it was dropped, and a Linux guest waited for a timer
    /// interrupt that never came).
    /// </summary>
    [SkippableFact]
    public void AnArmedTscDeadlineTimerIsArmedAfterTheRestore()
    {
        TestEnvironment.RequireKvm();
        using var a = new KvmTestVm(KvmTestVm.HaltLoop, irqchip: true);
        Assert.True(a.System.CheckExtension(KvmCap.TscDeadlineTimer) > 0, "KVM offers no TSC-deadline timer");
        // The LAPIC has a TSC-deadline mode only for a CPU whose CPUID says so (leaf 1, ECX bit 24).
        var cpuid = a.System.GetSupportedCpuid();
        for (int i = 0; i < cpuid.Length; i++)
            if (cpuid[i].Function == 1)
                cpuid[i].Ecx |= 1u << 24;
        a.Vcpu.SetCpuid(cpuid);
        var lapic = a.Vcpu.GetLapic();
        lapic.SetRegister(0xf0, 0x1ff);          // SVR: APIC software-enabled
        lapic.SetRegister(0x320, 0x4_00ec);      // LVTT: TSC-deadline mode, vector 0xec
        a.Vcpu.SetLapic(lapic);
        var tsc = new KvmMsrEntry[] { new() { Index = 0x10 } };
        a.Vcpu.GetMsrs(tsc);
        ulong deadline = tsc[0].Data + (1UL << 40);  // far ahead: it does not fire meanwhile
        a.Vcpu.SetMsrs([new KvmMsrEntry { Index = VcpuState.MsrTscDeadline, Data = deadline }]);

        var msrs = VcpuState.ReadableMsrs(a.Vcpu, a.System.GetMsrIndexList());
        Assert.Contains(VcpuState.MsrTscDeadline, msrs);
        var saved = VcpuState.Save(a.Vcpu, msrs);
        Assert.Equal(deadline, saved.Msrs.Single(m => m.Index == VcpuState.MsrTscDeadline).Data);

        using var b = new KvmTestVm(KvmTestVm.HaltLoop, irqchip: true);
        b.Vcpu.SetCpuid(cpuid);
        saved.Restore(b.Vcpu);
        Assert.Equal(0x4_00ecu, b.Vcpu.GetLapic().GetRegister(0x320));
        var back = new KvmMsrEntry[] { new() { Index = VcpuState.MsrTscDeadline } };
        b.Vcpu.GetMsrs(back);
        Assert.Equal(deadline, back[0].Data);
    }

    [SkippableFact]
    public void AStateIsRefusedByAVcpuWithAnotherId()
    {
        TestEnvironment.RequireKvm();
        using var a = new KvmTestVm(Counter, irqchip: true);
        var saved = VcpuState.Save(a.Vcpu, []);
        using var vm = a.System.CreateVm();
        vm.CreateIrqchip();
        using var other = vm.CreateVcpu(1);
        var e = Assert.Throws<HypervisorException>(() => saved.Restore(other));
        Assert.Contains("vCPU 0", e.Message, StringComparison.Ordinal);
    }
}

/// <summary><see cref="VmState"/>: the irqchip, PIT, clock and routes of one VM, restored into another.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VmStateRoundTripTests
{
    [SkippableFact]
    public unsafe void IrqchipPitClockAndRoutesCarryOverToAFreshVm()
    {
        TestEnvironment.RequireKvm();
        using var sys = KvmSystem.Open();
        using var a = sys.CreateVm();
        a.CreateIrqchip();
        a.CreatePit2();
        var routes = Enumerable.Range(0, 24).Select(i => KvmIrqRoutingEntry.Irqchip((uint)i, 2, (uint)i)).Append(KvmIrqRoutingEntry.Msi(24, 0xfee0_0000, 0x41)).ToArray();
        a.SetGsiRouting(routes);
        var io = a.GetIrqchip(KvmIrqchip.Ioapic);
        System.Runtime.CompilerServices.Unsafe.As<byte, KvmIoapicState>(ref io.Chip[0]).RedirTbl[9] = 0x1_0039;
        a.SetIrqchip(io);
        var pit = a.GetPit2();
        pit.Channel0.Count = 4242;
        a.SetPit2(pit);
        a.SetClock(new KvmClockData { Clock = 7_000_000_000 });
        var saved = VmState.Save(a);
        Assert.Equal(25, saved.Routes.Length);

        using var b = sys.CreateVm();
        b.CreateIrqchip();
        b.CreatePit2();
        saved.Restore(b);
        var ioBack = b.GetIrqchip(KvmIrqchip.Ioapic);
        Assert.Equal(0x1_0039UL, System.Runtime.CompilerServices.Unsafe.As<byte, KvmIoapicState>(ref ioBack.Chip[0]).RedirTbl[9]);
        Assert.Equal(4242u, b.GetPit2().Channel0.Count);
        Assert.InRange(b.GetClock().Clock, 7_000_000_000UL, 8_000_000_000UL);
        Assert.Equal(routes, b.GsiRoutes);

        using var bare = sys.CreateVm();
        var e = Assert.Throws<HypervisorException>(() => saved.Restore(bare));
        Assert.Contains("irqchip", e.Message, StringComparison.Ordinal);
    }
}
