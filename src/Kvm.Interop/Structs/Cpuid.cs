using System.Runtime.InteropServices;

namespace Kvm.Interop.Structs;

/// <summary>struct kvm_cpuid_entry2: one CPUID leaf (and sub-leaf) as the guest sees it.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmCpuidEntry2
{
    /// <summary>The entry depends on the sub-leaf in ECX (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).</summary>
    public const uint FlagSignificantIndex = 1;

    public uint Function;
    public uint Index;
    public uint Flags;
    public uint Eax, Ebx, Ecx, Edx;
    public fixed uint Padding[3];
}
