using System.Text;
using Kvm.Hypervisor;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Machine;

/// <summary>Formats a vCPU's registers for error reports.</summary>
public static class RegisterDump
{
    public static string Format(in KvmRegs r, in KvmSregs s)
    {
        var b = new StringBuilder();
        b.Append($"  RAX={r.Rax:x16} RBX={r.Rbx:x16} RCX={r.Rcx:x16} RDX={r.Rdx:x16}\n");
        b.Append($"  RSI={r.Rsi:x16} RDI={r.Rdi:x16} RSP={r.Rsp:x16} RBP={r.Rbp:x16}\n");
        b.Append($"  R8 ={r.R8:x16} R9 ={r.R9:x16} R10={r.R10:x16} R11={r.R11:x16}\n");
        b.Append($"  R12={r.R12:x16} R13={r.R13:x16} R14={r.R14:x16} R15={r.R15:x16}\n");
        b.Append($"  RIP={r.Rip:x16} RFLAGS={r.Rflags:x8} CPL={s.Cs.Dpl}\n");
        b.Append($"  CS={Seg(s.Cs)} SS={Seg(s.Ss)}\n");
        b.Append($"  DS={Seg(s.Ds)} ES={Seg(s.Es)}\n");
        b.Append($"  TR={Seg(s.Tr)} GDT={s.Gdt.Base:x}/{s.Gdt.Limit:x} IDT={s.Idt.Base:x}/{s.Idt.Limit:x}\n");
        b.Append($"  CR0={s.Cr0:x} CR2={s.Cr2:x} CR3={s.Cr3:x} CR4={s.Cr4:x} EFER={s.Efer:x}");
        return b.ToString();
    }

    /// <summary>Reads and formats the registers; null if the vCPU cannot be read.</summary>
    public static string? TryCapture(KvmVcpu vcpu)
    {
        try
        {
            return Format(vcpu.GetRegs(), vcpu.GetSregs());
        }
        catch (Exception e) when (e is HypervisorException or Kvm.Interop.Native.KvmIoctlException)
        {
            return null;
        }
    }

    private static string Seg(in KvmSegment g) =>
        $"{g.Selector:x4}[base {g.Base:x} limit {g.Limit:x} type {g.Type:x} dpl {g.Dpl}{(g.L != 0 ? " L" : "")}{(g.Db != 0 ? " D" : "")}]";
}
