using Kvm.Hypervisor;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Cpu;

/// <summary>What every vCPU is given before its first run: CPUID, initial MSRs, FPU defaults and LAPIC LINT pins.</summary>
public static class VcpuSetup
{
    private const int LapicLvtLint0 = 0x350, LapicLvtLint1 = 0x360;
    private const uint DeliveryModeExtInt = 0x700, DeliveryModeNmi = 0x400;

    /// <summary>The CPUID table for vCPU <paramref name="vcpuId"/> of <paramref name="cpuCount"/> (see <see cref="CpuidTable"/>).</summary>
    public static KvmCpuidEntry2[] CpuidFor(IReadOnlyList<KvmCpuidEntry2> supported, uint vcpuId, int cpuCount,
        IReadOnlyCollection<string>? hiddenFeatures = null, bool tscDeadline = false) =>
        CpuidTable.For(supported, vcpuId, new CpuidOptions(cpuCount, hiddenFeatures, tscDeadline));

    // MSR indices (Intel SDM vol. 4; the AMD64 syscall MSRs).
    public const uint MsrIa32Tsc = 0x10, MsrSysenterCs = 0x174, MsrSysenterEsp = 0x175, MsrSysenterEip = 0x176,
        MsrMiscEnable = 0x1a0, MsrPat = 0x277, MsrMtrrDefType = 0x2ff,
        MsrStar = 0xc000_0081, MsrLstar = 0xc000_0082, MsrCstar = 0xc000_0083, MsrSyscallMask = 0xc000_0084,
        MsrKernelGsBase = 0xc000_0102;

    /// <summary>Fast string operations enabled (IA32_MISC_ENABLE bit 0), as firmware leaves it.</summary>
    public const ulong MiscEnableFastStrings = 1;

    /// <summary>MTRRs enabled (bit 11) with write-back (6) as the default memory type: all RAM is cacheable.</summary>
    public const ulong MtrrDefTypeEnabledWriteBack = (1UL << 11) | 6;

    /// <summary>The power-on value of IA32_PAT.</summary>
    public const ulong PatPowerOn = 0x0007_0406_0007_0406;

    /// <summary>
    /// The MSRs a vCPU starts with, as firmware would leave them: the syscall and sysenter MSRs
    /// cleared, fast strings on, the power-on PAT, and MTRRs on with write-back as the default type
    /// (without it a kernel that reads the MTRRs maps RAM uncached). Only MSRs in
    /// <paramref name="supported"/> (KVM_GET_MSR_INDEX_LIST) are included.
    /// </summary>
    public static KvmMsrEntry[] InitialMsrs(IReadOnlyCollection<uint> supported)
    {
        (uint Index, ulong Value)[] wanted =
        [
            (MsrSysenterCs, 0), (MsrSysenterEsp, 0), (MsrSysenterEip, 0),
            (MsrStar, 0), (MsrLstar, 0), (MsrCstar, 0), (MsrSyscallMask, 0), (MsrKernelGsBase, 0),
            (MsrIa32Tsc, 0), (MsrMiscEnable, MiscEnableFastStrings), (MsrPat, PatPowerOn),
            (MsrMtrrDefType, MtrrDefTypeEnabledWriteBack),
        ];
        var set = supported as IReadOnlySet<uint> ?? new HashSet<uint>(supported);
        return wanted.Where(w => set.Contains(w.Index)).Select(w => new KvmMsrEntry { Index = w.Index, Data = w.Value }).ToArray();
    }

    public static void Configure(KvmVcpu vcpu, IReadOnlyList<KvmCpuidEntry2> supported, CpuidOptions cpuid,
        IReadOnlyCollection<uint> supportedMsrs, bool hasIrqchip)
    {
        vcpu.SetCpuid(CpuidTable.For(supported, vcpu.Id, cpuid));
        var msrs = InitialMsrs(supportedMsrs);
        if (msrs.Length > 0)
            vcpu.SetMsrs(msrs);

        var fpu = new KvmFpu { Fcw = 0x37f, Mxcsr = 0x1f80 };
        vcpu.SetFpu(fpu);

        if (hasIrqchip)
            SetLintPins(vcpu);
    }

    // LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs, as on a PC after the BIOS.
    private static void SetLintPins(KvmVcpu vcpu)
    {
        var lapic = vcpu.GetLapic();
        lapic.SetRegister(LapicLvtLint0, (lapic.GetRegister(LapicLvtLint0) & ~0x700u) | DeliveryModeExtInt);
        lapic.SetRegister(LapicLvtLint1, (lapic.GetRegister(LapicLvtLint1) & ~0x700u) | DeliveryModeNmi);
        vcpu.SetLapic(lapic);
    }
}
