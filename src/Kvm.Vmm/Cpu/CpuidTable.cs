using Kvm.Interop.Structs;

namespace Kvm.Vmm.Cpu;

/// <summary>What the CPUID table of a VM depends on besides the host's supported leaves.</summary>
/// <param name="CpuCount">vCPUs in the VM: one package, one core per vCPU, one thread per core.</param>
/// <param name="HiddenFeatures">Feature names (see <see cref="CpuFeatures"/>) the guest is told its CPU lacks.</param>
/// <param name="TscDeadline">The in-kernel LAPIC offers the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER);
/// KVM emulates it but does not list it among the supported leaves.</param>
public sealed record CpuidOptions(int CpuCount, IReadOnlyCollection<string>? HiddenFeatures = null, bool TscDeadline = false);

/// <summary>
/// Builds one vCPU's CPUID table from KVM_GET_SUPPORTED_CPUID: the host's features minus those this
/// VMM does not give a guest (nested virtualization, the PMU, thermal and power management, debug
/// stores), the topology of the VM (APIC IDs, leaves 4, 0xB, 0x1F, 0x8000_0008, 0x8000_001E), the
/// KVM hypervisor leaves, and the features the VM's CPU model hides.
/// </summary>
public static class CpuidTable
{
    // Leaf 1 ECX.
    private const int Dtes64 = 2, Monitor = 3, DsCpl = 4, Vmx = 5, Smx = 6, Est = 7, Tm2 = 8, Xtpr = 14, Pdcm = 15,
        TscDeadlineBit = 24, OsXsave = 27, Hypervisor = 31;
    // Leaf 1 EDX.
    private const int Ds = 21, Acpi = 22, Htt = 28, Tm = 29, Pbe = 31;
    // Leaf 0x8000_0001 ECX.
    private const int Svm = 2;
    // Leaf 6 EAX: the APIC timer runs in deep C-states.
    private const int Arat = 2;
    // Leaf 0xB / 0x1F ECX[15:8] level types.
    private const uint LevelSmt = 1, LevelCore = 2;

    /// <summary>Bits of the APIC ID that number the cores of the package.</summary>
    public static int CoreIdBits(int cpuCount) => cpuCount <= 1 ? 0 : 32 - System.Numerics.BitOperations.LeadingZeroCount((uint)(cpuCount - 1));

    public static KvmCpuidEntry2[] For(IReadOnlyList<KvmCpuidEntry2> supported, uint vcpuId, CpuidOptions options)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(options.CpuCount, 1);
        int n = options.CpuCount;
        int coreBits = CoreIdBits(n);
        bool amd = IsAmd(supported);
        uint maxBasic = supported.FirstOrDefault(e => e.Function == 0).Eax;

        var table = new List<KvmCpuidEntry2>(supported.Count + 4);
        foreach (var source in supported)
        {
            var e = source;
            switch (e.Function)
            {
                case 1:
                    e.Ebx = (e.Ebx & 0x0000_ffff) | ((uint)Math.Min(n, 255) << 16) | ((vcpuId & 0xff) << 24);
                    e.Ecx &= ~Bits(Dtes64, Monitor, DsCpl, Vmx, Smx, Est, Tm2, Xtpr, Pdcm, OsXsave);
                    e.Ecx |= Bits(Hypervisor);
                    if (options.TscDeadline)
                        e.Ecx |= Bits(TscDeadlineBit);
                    e.Edx &= ~Bits(Ds, Acpi, Tm, Pbe, Htt);
                    if (n > 1)
                        e.Edx |= Bits(Htt); // the logical processor count in EBX is valid
                    break;

                case 4 when (e.Eax & 0x1f) != 0:
                    // Deterministic cache parameters: cores per package, and which caches all of them share.
                    uint cacheLevel = (e.Eax >> 5) & 7;
                    uint sharing = cacheLevel >= 3 ? (1u << coreBits) - 1 : 0;
                    e.Eax = (e.Eax & 0x3fff) | (sharing << 14) | ((uint)(((1 << coreBits) - 1) & 0x3f) << 26);
                    break;

                case 6:
                    e.Eax &= Bits(Arat);
                    e.Ebx = e.Ecx = e.Edx = 0;
                    break;

                case 0xa:
                    // No performance counters: their MSRs are not part of what a snapshot or a migration carries.
                    e.Eax = e.Ebx = e.Ecx = e.Edx = 0;
                    break;

                case 0xb or 0x1f:
                    continue; // rebuilt below

                case 0x4000_0000:
                    if (supported.Any(x => x.Function == 0x4000_0001))
                        e.Eax = Math.Max(e.Eax, 0x4000_0001);
                    break;

                case 0x8000_0001:
                    e.Ecx &= ~Bits(Svm);
                    break;

                case 0x8000_0008 when amd:
                    // Cores in the package, and the width of the core number in the APIC ID.
                    e.Ecx = (e.Ecx & ~0xf0ffu) | ((uint)coreBits << 12) | (uint)(n - 1);
                    break;

                case 0x8000_001e:
                    e.Eax = vcpuId;                        // extended APIC ID
                    e.Ebx = vcpuId & 0xff;                 // core ID; one thread per core
                    e.Ecx = 0;                             // node 0, one node
                    e.Edx = 0;
                    break;
            }
            table.Add(e);
        }

        foreach (uint leaf in new uint[] { 0xb, 0x1f })
        {
            if (maxBasic >= leaf && supported.Any(e => e.Function == leaf))
                table.AddRange(Topology(leaf, vcpuId, n, coreBits));
        }

        if (options.HiddenFeatures is { Count: > 0 } hidden)
        {
            var array = table.ToArray();
            CpuFeatures.Hide(array, hidden);
            return array;
        }
        return table.ToArray();
    }

    // Extended topology: level 0 the threads of a core (one), level 1 the cores of the package,
    // then an invalid level that ends the list. EDX is the x2APIC ID at every level.
    private static IEnumerable<KvmCpuidEntry2> Topology(uint leaf, uint vcpuId, int cpuCount, int coreBits)
    {
        const uint flags = KvmCpuidEntry2.FlagSignificantIndex;
        yield return new KvmCpuidEntry2 { Function = leaf, Index = 0, Flags = flags, Eax = 0, Ebx = 1, Ecx = LevelSmt << 8, Edx = vcpuId };
        yield return new KvmCpuidEntry2 { Function = leaf, Index = 1, Flags = flags, Eax = (uint)coreBits, Ebx = (uint)cpuCount, Ecx = 1 | (LevelCore << 8), Edx = vcpuId };
        yield return new KvmCpuidEntry2 { Function = leaf, Index = 2, Flags = flags, Eax = 0, Ebx = 0, Ecx = 2, Edx = vcpuId };
    }

    /// <summary>Whether CPUID <paramref name="supported"/> (KVM's, this host's vendor) is AMD's or Hygon's: KVM runs on SVM there.</summary>
    internal static bool IsAmd(IReadOnlyList<KvmCpuidEntry2> supported)
    {
        var leaf0 = supported.FirstOrDefault(e => e.Function == 0);
        // "AuthenticAMD" (EBX "Auth", EDX "enti", ECX "cAMD") or Hygon's "HygonGenuine".
        return (leaf0.Ebx == 0x6874_7541 && leaf0.Ecx == 0x444d_4163) || leaf0.Ebx == 0x6f67_7948;
    }

    private static uint Bits(params int[] bits)
    {
        uint m = 0;
        foreach (int b in bits)
            m |= 1u << b;
        return m;
    }
}
