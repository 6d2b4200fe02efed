using Kvm.Hypervisor.State;
using Kvm.Interop.Native;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor;

/// <summary>
/// Everything KVM holds for one vCPU that a snapshot carries: general and special registers, the
/// XSAVE area (FPU, SSE, AVX...), XCR0, every MSR of KVM's save list that this vCPU can read, the
/// local APIC, the multiprocessing state, pending events, debug registers and the TSC rate. Taken
/// from a vCPU that is not running (and whose last port I/O or MMIO exit was completed by a
/// KVM_RUN with immediate_exit set), and restored into a fresh vCPU of a VM built the same way.
/// </summary>
public sealed class VcpuState
{
    public required uint Id { get; init; }
    public required KvmRegs Regs { get; init; }
    public required KvmSregs Sregs { get; init; }
    public required KvmXsave Xsave { get; init; }
    public required KvmXcrs Xcrs { get; init; }
    public required KvmMsrEntry[] Msrs { get; init; }
    public required KvmLapicState Lapic { get; init; }
    public required KvmMpState MpState { get; init; }
    public required KvmVcpuEvents Events { get; init; }
    public required KvmDebugregs Debugregs { get; init; }

    /// <summary>The TSC rate in kHz, or 0 where KVM does not report it.</summary>
    public required uint TscKhz { get; init; }

    /// <summary>
    /// The MSRs of <paramref name="candidates"/> (KVM's save list, <see cref="KvmSystem.GetMsrIndexList"/>)
    /// that <paramref name="vcpu"/> can read: KVM_GET_MSRS stops at the first one it cannot, which
    /// is dropped, and the rest is read again.
    /// </summary>
    public static uint[] ReadableMsrs(KvmVcpu vcpu, IReadOnlyList<uint> candidates)
    {
        var list = candidates.ToList();
        while (true)
        {
            int n = vcpu.GetMsrs(Entries(list));
            if (n == list.Count)
                return [.. list];
            list.RemoveAt(n);
        }
    }

    /// <summary>Reads the state of <paramref name="vcpu"/>, with the MSRs <paramref name="msrs"/> (see <see cref="ReadableMsrs"/>).</summary>
    public static VcpuState Save(KvmVcpu vcpu, IReadOnlyList<uint> msrs)
    {
        // The MP state first: reading it lets KVM settle a pending INIT or SIPI into the registers.
        var mp = vcpu.GetMpState();
        var entries = Entries(msrs);
        int read = vcpu.GetMsrs(entries);
        if (read != entries.Length)
            throw new HypervisorException($"vCPU {vcpu.Id}: KVM_GET_MSRS read {read} of {entries.Length} MSRs; MSR 0x{entries[read].Index:x} was refused");
        return new VcpuState
        {
            Id = vcpu.Id,
            Regs = vcpu.GetRegs(),
            Sregs = vcpu.GetSregs(),
            Xsave = vcpu.GetXsave(),
            Xcrs = vcpu.GetXcrs(),
            Msrs = entries,
            Lapic = vcpu.GetLapic(),
            MpState = mp,
            Events = vcpu.GetEvents(),
            Debugregs = vcpu.GetDebugregs(),
            TscKhz = TryTscKhz(vcpu),
        };
    }

    /// <summary>IA32_TSC_DEADLINE: the local APIC timer's deadline in TSC-deadline mode.</summary>
    public const uint MsrTscDeadline = 0x6e0;

    /// <summary>TR's descriptor types: a 64-bit TSS, available and busy.</summary>
    public const byte TssAvailable64 = 0x9, TssBusy64 = 0xb;

    /// <summary>
    /// Writes this state into <paramref name="vcpu"/> (a fresh vCPU with the same id, its CPUID
    /// already set). The order follows the dependencies between the pieces: the TSC rate before
    /// the TSC MSR; special registers (EFER, CR0/CR4, the APIC base) before the MSRs and the XSAVE
    /// features they enable; the MP state before the local APIC; pending events after the APIC;
    /// the TSC deadline after the local APIC, whose timer mode decides whether KVM takes it.
    /// </summary>
    /// <param name="vcpu">The vCPU to restore into.</param>
    /// <param name="availableTss">
    /// Load TR as an available 64-bit TSS (type 9) where the state has it busy (type 11). For AMD
    /// hosts only: KVM on SVM reports TR busy whatever the CPU holds (svm_get_segment sets the
    /// busy bit, for VMX, whose VM entry demands it), and SVM itself checks neither; but an
    /// emulated SVM that does check it (QEMU's TCG: its I/O permission check wants type 9) refuses
    /// a restored guest's user-space port I/O through the TSS I/O bitmap with #GP, so that Linux
    /// kills a process using ioperm(2) or iopl(2) with SIGSEGV. Never on Intel: VMX refuses to
    /// enter a 64-bit guest whose TR is not busy.
    /// </param>
    public void Restore(KvmVcpu vcpu, bool availableTss = false)
    {
        if (vcpu.Id != Id)
            throw new HypervisorException($"the state of vCPU {Id} cannot be restored into vCPU {vcpu.Id}");
        if (TscKhz != 0 && TryTscKhz(vcpu) != TscKhz)
            vcpu.SetTscKhz(TscKhz);
        var sregs = Sregs;
        if (availableTss && sregs.Tr.Type == TssBusy64)
            sregs.Tr.Type = TssAvailable64;
        vcpu.SetSregs(sregs);
        vcpu.SetXcrs(Xcrs);
        vcpu.SetXsave(Xsave);
        vcpu.SetRegs(Regs);
        vcpu.SetMsrs(Msrs.Where(m => m.Index != MsrTscDeadline).ToArray());
        vcpu.SetMpState(MpState);
        vcpu.SetLapic(Lapic);
        // KVM drops a write of IA32_TSC_DEADLINE unless the LAPIC timer (LVTT) is in TSC-deadline
        // mode, which it is only once the saved LAPIC is in: written with the other MSRs, into a
        // fresh vCPU, the armed timer was lost and the guest's next timer interrupt never came
        // (a Linux guest's idle CPU slept on with its timers due). A deadline already past fires
        // at once, which stands for an expiry KVM had pending at the save but not yet injected.
        var deadline = Msrs.Where(m => m.Index == MsrTscDeadline).ToArray();
        if (deadline.Length > 0)
            vcpu.SetMsrs(deadline);
        vcpu.SetEvents(Events);
        vcpu.SetDebugregs(Debugregs);
    }

    /// <summary>The most MSRs a record may hold (KVM's save list has a few hundred at most).</summary>
    public const int MaxMsrs = 4096;

    /// <summary>Writes this state as a record's fields (read back by <see cref="Read"/>).</summary>
    public void Write(StateWriter w) => w
        .U32(Id).U32(TscKhz)
        .Struct(Regs).Struct(Sregs).Struct(Xsave).Struct(Xcrs)
        .Structs<KvmMsrEntry>(Msrs)
        .Struct(Lapic).Struct(MpState).Struct(Events).Struct(Debugregs);

    public static VcpuState Read(ref StateReader r)
    {
        var state = new VcpuState
        {
            Id = r.U32("id"),
            TscKhz = r.U32("tsc_khz"),
            Regs = r.Struct<KvmRegs>("regs"),
            Sregs = r.Struct<KvmSregs>("sregs"),
            Xsave = r.Struct<KvmXsave>("xsave"),
            Xcrs = r.Struct<KvmXcrs>("xcrs"),
            Msrs = r.Structs<KvmMsrEntry>("msrs", MaxMsrs),
            Lapic = r.Struct<KvmLapicState>("lapic"),
            MpState = r.Struct<KvmMpState>("mp_state"),
            Events = r.Struct<KvmVcpuEvents>("events"),
            Debugregs = r.Struct<KvmDebugregs>("debugregs"),
        };
        return state;
    }

    /// <summary>MSR entries to read, one per index.</summary>
    private static KvmMsrEntry[] Entries(IReadOnlyList<uint> indices) => [.. indices.Select(i => new KvmMsrEntry { Index = i })];

    private static uint TryTscKhz(KvmVcpu vcpu)
    {
        try
        {
            return vcpu.GetTscKhz();
        }
        catch (KvmIoctlException)
        {
            return 0;
        }
    }
}
