using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor;

/// <summary>A vCPU: its fd, its kvm_run page and its register state.</summary>
public sealed unsafe class KvmVcpu : IDisposable
{
    private readonly KvmVcpuHandle _handle;
    private readonly IntPtr _run;
    private readonly int _runSize;
    private bool _disposed;

    internal KvmVcpu(uint id, KvmVcpuHandle handle, int runSize)
    {
        Id = id;
        _handle = handle;
        _runSize = runSize;
        _run = Libc.Mmap(IntPtr.Zero, (nuint)runSize, Libc.ProtRead | Libc.ProtWrite, Libc.MapShared, handle, 0);
        if (_run == Libc.MapFailed)
        {
            int errno = Marshal.GetLastPInvokeError();
            handle.Dispose();
            throw new HypervisorException($"cannot map kvm_run of vCPU {id}", new KvmIoctlException("mmap(vcpu)", errno));
        }
    }

    public uint Id { get; }

    /// <summary>The kvm_run page shared with KVM; valid until the vCPU is disposed.</summary>
    public Span<byte> RunPage => new((void*)_run, _runSize);

    public KvmExitReason ExitReason => (KvmExitReason)Volatile.Read(ref *(uint*)((byte*)_run + KvmRunLayout.ExitReason));

    /// <summary>Sets kvm_run.immediate_exit, which makes KVM_RUN return -EINTR at once while set.</summary>
    public void SetImmediateExit(bool on) => Volatile.Write(ref *((byte*)_run + KvmRunLayout.ImmediateExit), on ? (byte)1 : (byte)0);

    public bool ImmediateExit => Volatile.Read(ref *((byte*)_run + KvmRunLayout.ImmediateExit)) != 0;

    /// <summary>KVM_RUN: 0 after an exit to user space, -EINTR after a kick, another -errno on failure.</summary>
    public int Run() => KvmShim.Run(_handle);

    public KvmRegs GetRegs()
    {
        Errno.Check(KvmShim.GetRegs(_handle, out var r), "KVM_GET_REGS");
        return r;
    }

    public void SetRegs(in KvmRegs regs) => Errno.Check(KvmShim.SetRegs(_handle, regs), "KVM_SET_REGS");

    public KvmSregs GetSregs()
    {
        Errno.Check(KvmShim.GetSregs(_handle, out var r), "KVM_GET_SREGS");
        return r;
    }

    public void SetSregs(in KvmSregs sregs) => Errno.Check(KvmShim.SetSregs(_handle, sregs), "KVM_SET_SREGS");

    public KvmFpu GetFpu()
    {
        Errno.Check(KvmShim.GetFpu(_handle, out var f), "KVM_GET_FPU");
        return f;
    }

    public void SetFpu(in KvmFpu fpu) => Errno.Check(KvmShim.SetFpu(_handle, fpu), "KVM_SET_FPU");

    public KvmXsave GetXsave()
    {
        KvmXsave x;
        Errno.Check(KvmShim.GetXsave(_handle, &x), "KVM_GET_XSAVE");
        return x;
    }

    public void SetXsave(in KvmXsave xsave)
    {
        fixed (KvmXsave* p = &xsave)
            Errno.Check(KvmShim.SetXsave(_handle, p), "KVM_SET_XSAVE");
    }

    public KvmXcrs GetXcrs()
    {
        Errno.Check(KvmShim.GetXcrs(_handle, out var x), "KVM_GET_XCRS");
        return x;
    }

    public void SetXcrs(in KvmXcrs xcrs) => Errno.Check(KvmShim.SetXcrs(_handle, xcrs), "KVM_SET_XCRS");

    /// <summary>Reads the given MSRs in place; returns how many were read.</summary>
    public int GetMsrs(Span<KvmMsrEntry> entries)
    {
        fixed (KvmMsrEntry* p = entries)
            return Errno.Check(KvmShim.GetMsrs(_handle, (uint)entries.Length, p), "KVM_GET_MSRS");
    }

    /// <summary>Writes the given MSRs; throws unless all were written.</summary>
    public void SetMsrs(ReadOnlySpan<KvmMsrEntry> entries)
    {
        int n;
        fixed (KvmMsrEntry* p = entries)
            n = Errno.Check(KvmShim.SetMsrs(_handle, (uint)entries.Length, p), "KVM_SET_MSRS");
        if (n != entries.Length)
            throw new HypervisorException($"KVM_SET_MSRS wrote {n} of {entries.Length} MSRs; MSR 0x{entries[n].Index:x} was refused");
    }

    public void SetCpuid(ReadOnlySpan<KvmCpuidEntry2> entries)
    {
        fixed (KvmCpuidEntry2* p = entries)
            Errno.Check(KvmShim.SetCpuid2(_handle, (uint)entries.Length, p), "KVM_SET_CPUID2");
    }

    public KvmLapicState GetLapic()
    {
        KvmLapicState s;
        Errno.Check(KvmShim.GetLapic(_handle, &s), "KVM_GET_LAPIC");
        return s;
    }

    public void SetLapic(in KvmLapicState lapic)
    {
        fixed (KvmLapicState* p = &lapic)
            Errno.Check(KvmShim.SetLapic(_handle, p), "KVM_SET_LAPIC");
    }

    public KvmDebugregs GetDebugregs()
    {
        Errno.Check(KvmShim.GetDebugregs(_handle, out var r), "KVM_GET_DEBUGREGS");
        return r;
    }

    public void SetDebugregs(in KvmDebugregs regs) => Errno.Check(KvmShim.SetDebugregs(_handle, regs), "KVM_SET_DEBUGREGS");

    /// <summary>The vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ).</summary>
    public uint GetTscKhz()
    {
        int khz = KvmShim.GetTscKhz(_handle);
        Errno.Check(khz, "KVM_GET_TSC_KHZ");
        return (uint)khz;
    }

    /// <summary>Sets the vCPU's TSC frequency (KVM_SET_TSC_KHZ); refused where the host cannot scale the TSC to it.</summary>
    public void SetTscKhz(uint khz) => Errno.Check(KvmShim.SetTscKhz(_handle, khz), "KVM_SET_TSC_KHZ");

    public KvmMpState GetMpState()
    {
        Errno.Check(KvmShim.GetMpState(_handle, out var s), "KVM_GET_MP_STATE");
        return s;
    }

    public void SetMpState(in KvmMpState state) => Errno.Check(KvmShim.SetMpState(_handle, state), "KVM_SET_MP_STATE");

    public KvmVcpuEvents GetEvents()
    {
        Errno.Check(KvmShim.GetVcpuEvents(_handle, out var e), "KVM_GET_VCPU_EVENTS");
        return e;
    }

    public void SetEvents(in KvmVcpuEvents events) => Errno.Check(KvmShim.SetVcpuEvents(_handle, events), "KVM_SET_VCPU_EVENTS");

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        Libc.Munmap(_run, (nuint)_runSize);
        _handle.Dispose();
    }
}
