using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Structs;

namespace Kvm.Interop.Native;

// ioctls on a vCPU fd.
public static unsafe partial class KvmShim
{
    [LibraryImport(Library, EntryPoint = "kvm_run")]
    public static partial int Run(KvmVcpuHandle vcpu);

    [LibraryImport(Library, EntryPoint = "kvm_get_regs")]
    public static partial int GetRegs(KvmVcpuHandle vcpu, out KvmRegs regs);

    [LibraryImport(Library, EntryPoint = "kvm_set_regs")]
    public static partial int SetRegs(KvmVcpuHandle vcpu, in KvmRegs regs);

    [LibraryImport(Library, EntryPoint = "kvm_get_sregs")]
    public static partial int GetSregs(KvmVcpuHandle vcpu, out KvmSregs sregs);

    [LibraryImport(Library, EntryPoint = "kvm_set_sregs")]
    public static partial int SetSregs(KvmVcpuHandle vcpu, in KvmSregs sregs);

    [LibraryImport(Library, EntryPoint = "kvm_get_fpu")]
    public static partial int GetFpu(KvmVcpuHandle vcpu, out KvmFpu fpu);

    [LibraryImport(Library, EntryPoint = "kvm_set_fpu")]
    public static partial int SetFpu(KvmVcpuHandle vcpu, in KvmFpu fpu);

    [LibraryImport(Library, EntryPoint = "kvm_get_xsave")]
    public static partial int GetXsave(KvmVcpuHandle vcpu, KvmXsave* xsave);

    [LibraryImport(Library, EntryPoint = "kvm_set_xsave")]
    public static partial int SetXsave(KvmVcpuHandle vcpu, KvmXsave* xsave);

    [LibraryImport(Library, EntryPoint = "kvm_get_xcrs")]
    public static partial int GetXcrs(KvmVcpuHandle vcpu, out KvmXcrs xcrs);

    [LibraryImport(Library, EntryPoint = "kvm_set_xcrs")]
    public static partial int SetXcrs(KvmVcpuHandle vcpu, in KvmXcrs xcrs);

    [LibraryImport(Library, EntryPoint = "kvm_get_msrs")]
    public static partial int GetMsrs(KvmVcpuHandle vcpu, uint count, KvmMsrEntry* entries);

    [LibraryImport(Library, EntryPoint = "kvm_set_msrs")]
    public static partial int SetMsrs(KvmVcpuHandle vcpu, uint count, KvmMsrEntry* entries);

    [LibraryImport(Library, EntryPoint = "kvm_set_cpuid2")]
    public static partial int SetCpuid2(KvmVcpuHandle vcpu, uint count, KvmCpuidEntry2* entries);

    [LibraryImport(Library, EntryPoint = "kvm_get_lapic")]
    public static partial int GetLapic(KvmVcpuHandle vcpu, KvmLapicState* lapic);

    [LibraryImport(Library, EntryPoint = "kvm_set_lapic")]
    public static partial int SetLapic(KvmVcpuHandle vcpu, KvmLapicState* lapic);

    [LibraryImport(Library, EntryPoint = "kvm_get_mp_state")]
    public static partial int GetMpState(KvmVcpuHandle vcpu, out KvmMpState state);

    [LibraryImport(Library, EntryPoint = "kvm_set_mp_state")]
    public static partial int SetMpState(KvmVcpuHandle vcpu, in KvmMpState state);

    [LibraryImport(Library, EntryPoint = "kvm_get_vcpu_events")]
    public static partial int GetVcpuEvents(KvmVcpuHandle vcpu, out KvmVcpuEvents events);

    [LibraryImport(Library, EntryPoint = "kvm_set_vcpu_events")]
    public static partial int SetVcpuEvents(KvmVcpuHandle vcpu, in KvmVcpuEvents events);

    [LibraryImport(Library, EntryPoint = "kvm_get_debugregs")]
    public static partial int GetDebugregs(KvmVcpuHandle vcpu, out KvmDebugregs regs);

    [LibraryImport(Library, EntryPoint = "kvm_set_debugregs")]
    public static partial int SetDebugregs(KvmVcpuHandle vcpu, in KvmDebugregs regs);

    /// <summary>The vCPU's TSC frequency in kHz, or -errno.</summary>
    [LibraryImport(Library, EntryPoint = "kvm_get_tsc_khz")]
    public static partial int GetTscKhz(KvmVcpuHandle vcpu);

    [LibraryImport(Library, EntryPoint = "kvm_set_tsc_khz")]
    public static partial int SetTscKhz(KvmVcpuHandle vcpu, uint khz);
}
