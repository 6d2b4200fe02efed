using Kvm.Hypervisor;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Cpu;

/// <summary>What every vCPU is given before its first run: CPUID, FPU defaults and LAPIC LINT pins.</summary>
public static class VcpuSetup
{
    private const int LapicLvtLint0 = 0x350, LapicLvtLint1 = 0x360;
    private const uint DeliveryModeExtInt = 0x700, DeliveryModeNmi = 0x400;

    /// <summary>
    /// The CPUID table for vCPU <paramref name="vcpuId"/> of <paramref name="cpuCount"/>: the host's
    /// supported leaves with this vCPU's APIC ID, the logical processor count, and the hypervisor bit.
    /// </summary>
    public static KvmCpuidEntry2[] CpuidFor(IReadOnlyList<KvmCpuidEntry2> supported, uint vcpuId, int cpuCount,
        IReadOnlyCollection<string>? hiddenFeatures = null)
    {
        var table = supported.ToArray();
        if (hiddenFeatures is { Count: > 0 })
            CpuFeatures.Hide(table, hiddenFeatures);
        for (int i = 0; i < table.Length; i++)
        {
            ref var e = ref table[i];
            switch (e.Function)
            {
                case 1:
                    e.Ebx = (e.Ebx & 0x0000_ffff) | ((uint)Math.Min(cpuCount, 255) << 16) | (vcpuId << 24);
                    e.Ecx |= 1u << 31; // running under a hypervisor
                    if (cpuCount > 1)
                        e.Edx |= 1u << 28; // HTT: the logical count field is valid
                    break;
                case 0xb:
                case 0x1f:
                    e.Edx = vcpuId; // x2APIC ID
                    break;
            }
        }
        return table;
    }

    public static void Configure(KvmVcpu vcpu, IReadOnlyList<KvmCpuidEntry2> supported, int cpuCount, bool hasIrqchip,
        IReadOnlyCollection<string>? hiddenFeatures = null)
    {
        vcpu.SetCpuid(CpuidFor(supported, vcpu.Id, cpuCount, hiddenFeatures));

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
