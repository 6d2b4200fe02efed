using System.Runtime.InteropServices;

namespace Kvm.Interop.Structs;

/// <summary>struct kvm_regs: the general-purpose registers, RIP and RFLAGS.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmRegs
{
    public ulong Rax, Rbx, Rcx, Rdx, Rsi, Rdi, Rsp, Rbp;
    public ulong R8, R9, R10, R11, R12, R13, R14, R15;
    public ulong Rip, Rflags;
}

/// <summary>struct kvm_segment: a segment register with its hidden descriptor.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmSegment
{
    public ulong Base;
    public uint Limit;
    public ushort Selector;
    public byte Type;
    public byte Present, Dpl, Db, S, L, G, Avl;
    public byte Unusable;
    public byte Padding;
}

/// <summary>struct kvm_dtable: GDTR or IDTR.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmDtable
{
    public ulong Base;
    public ushort Limit;
    public ushort Padding0, Padding1, Padding2;
}

/// <summary>struct kvm_sregs: segment, descriptor-table and control registers.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmSregs
{
    public KvmSegment Cs, Ds, Es, Fs, Gs, Ss;
    public KvmSegment Tr, Ldt;
    public KvmDtable Gdt, Idt;
    public ulong Cr0, Cr2, Cr3, Cr4, Cr8;
    public ulong Efer;
    public ulong ApicBase;
    public fixed ulong InterruptBitmap[4];
}

/// <summary>struct kvm_fpu: the legacy x87/SSE state in FXSAVE terms.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmFpu
{
    public fixed byte Fpr[128];
    public ushort Fcw;
    public ushort Fsw;
    public byte Ftwx;
    public byte Pad1;
    public ushort LastOpcode;
    public ulong LastIp;
    public ulong LastDp;
    public fixed byte Xmm[256];
    public uint Mxcsr;
    public uint Pad2;
}

/// <summary>struct kvm_xsave: the XSAVE area as KVM_GET_XSAVE returns it (4 KiB).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmXsave
{
    public fixed uint Region[1024];
}

/// <summary>struct kvm_xcr: one extended control register.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmXcr
{
    public uint Xcr;
    public uint Reserved;
    public ulong Value;
}

/// <summary>struct kvm_xcrs: up to 16 extended control registers.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmXcrs
{
    public const int MaxXcrs = 16;
    public uint NrXcrs;
    public uint Flags;
    public fixed ulong XcrWords[MaxXcrs * 2];
    public fixed ulong Padding[16];

    public readonly KvmXcr Get(int i)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual((uint)i, (uint)MaxXcrs);
        ulong w0 = XcrWords[i * 2];
        return new KvmXcr { Xcr = (uint)w0, Reserved = (uint)(w0 >> 32), Value = XcrWords[i * 2 + 1] };
    }

    public void Set(int i, KvmXcr xcr)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual((uint)i, (uint)MaxXcrs);
        XcrWords[i * 2] = xcr.Xcr | ((ulong)xcr.Reserved << 32);
        XcrWords[i * 2 + 1] = xcr.Value;
    }
}

/// <summary>struct kvm_msr_entry: one model-specific register.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmMsrEntry
{
    public uint Index;
    public uint Reserved;
    public ulong Data;
}

/// <summary>struct kvm_lapic_state: the local APIC register page (1 KiB).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmLapicState
{
    public fixed byte Regs[1024];

    /// <summary>Reads the 32-bit APIC register at <paramref name="offset"/> (e.g. 0x350 for LVT LINT0).</summary>
    public readonly uint GetRegister(int offset)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)offset, 1020u);
        fixed (byte* p = Regs)
            return *(uint*)(p + offset);
    }

    public void SetRegister(int offset, uint value)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)offset, 1020u);
        fixed (byte* p = Regs)
            *(uint*)(p + offset) = value;
    }
}

/// <summary>struct kvm_mp_state.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmMpState
{
    public const uint Runnable = 0, Uninitialized = 1, InitReceived = 2, Halted = 3, SipiReceived = 4;
    public uint MpState;
}

/// <summary>struct kvm_vcpu_events: pending and injected exceptions, interrupts, NMI, SMI.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmVcpuEvents
{
    public byte ExceptionInjected, ExceptionNr, ExceptionHasErrorCode, ExceptionPending;
    public uint ExceptionErrorCode;
    public byte InterruptInjected, InterruptNr, InterruptSoft, InterruptShadow;
    public byte NmiInjected, NmiPending, NmiMasked, NmiPad;
    public uint SipiVector;
    public uint Flags;
    public byte SmiSmm, SmiPending, SmiInsideNmi, SmiLatchedInit;
    public byte TripleFaultPending;
    public fixed byte Reserved[26];
    public byte ExceptionHasPayload;
    public ulong ExceptionPayload;
}

/// <summary>struct kvm_debugregs: DR0-DR3, DR6, DR7 of a vCPU (KVM_GET/SET_DEBUGREGS).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmDebugregs
{
    public fixed ulong Db[4];
    public ulong Dr6;
    public ulong Dr7;
    public ulong Flags;
    public fixed ulong Reserved[9];
}
