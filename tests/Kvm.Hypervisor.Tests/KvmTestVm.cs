using Kvm.Hypervisor;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// A minimal VM for hypervisor-level tests: RAM at 0, one vCPU in flat 32-bit protected mode at
/// 0x1000 running the given machine code.
/// </summary>
public sealed class KvmTestVm : IDisposable
{
    public const ulong CodeAddress = 0x1000;

    /// <param name="memory">RAM at 0 to run on (owned from here on), instead of a new memfd of <paramref name="ramSize"/>.</param>
    public KvmTestVm(byte[] code, ulong ramSize = 4 << 20, bool logDirty = false, bool manualProtect = false, bool irqchip = false,
        GuestMemory? memory = null)
    {
        System = KvmSystem.Open();
        Memory = memory ?? GuestMemory.Create([(0UL, ramSize)]);
        Vm = System.CreateVm();
        if (irqchip)
            Vm.CreateIrqchip();
        if (manualProtect)
            Assert.True(Vm.EnableManualDirtyLogProtect(), "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is missing");
        Slot = Vm.MapMemory(0, Memory.Regions[0], logDirty);
        Memory.Write(CodeAddress, code);
        Vcpu = Vm.CreateVcpu(0);
        var s = Vcpu.GetSregs();
        var code32 = new KvmSegment { Base = 0, Limit = 0xffffffff, Selector = 0x8, Type = 0xb, Present = 1, Db = 1, S = 1, G = 1 };
        var data32 = code32 with { Selector = 0x10, Type = 0x3 };
        s.Cs = code32;
        s.Ds = s.Es = s.Fs = s.Gs = s.Ss = data32;
        s.Cr0 = 0x11;
        Vcpu.SetSregs(s);
        Vcpu.SetRegs(new KvmRegs { Rip = CodeAddress, Rflags = 2 });
    }

    public KvmSystem System { get; }
    public GuestMemory Memory { get; }
    public KvmVm Vm { get; }
    public MemorySlot Slot { get; }
    public KvmVcpu Vcpu { get; }

    /// <summary>Runs the vCPU until it exits to user space with port I/O; returns the port.</summary>
    public ushort RunUntilPortIo(int maxExits = 1000)
    {
        for (int i = 0; i < maxExits; i++)
        {
            int rc = Vcpu.Run();
            if (rc == -4)
                continue;
            Assert.Equal(0, rc);
            if (Vcpu.ExitReason == KvmExitReason.Io)
                return BitConverter.ToUInt16(Vcpu.RunPage.Slice(KvmRunLayout.IoPort, 2));
            Assert.Fail($"unexpected exit {Vcpu.ExitReason}");
        }
        throw new InvalidOperationException("no port I/O exit");
    }

    public void Dispose()
    {
        Vcpu.Dispose();
        Vm.Dispose();
        Memory.Dispose();
        System.Dispose();
    }

    /// <summary>cli; hlt; jmp back: with an in-kernel irqchip, KVM_RUN blocks in the kernel.</summary>
    public static readonly byte[] HaltLoop = [0xFA, 0xF4, 0xEB, 0xFC];

    /// <summary>mov dx, 0x80; out dx, al; jmp back: one port-I/O exit per iteration, forever.</summary>
    public static readonly byte[] PortLoop = [0x66, 0xBA, 0x80, 0x00, 0xEE, 0xEB, 0xF9];

    /// <summary>
    /// Writes one dword into each of 64 pages from 1 MiB up, then exits on port 0x80 and loops
    /// there (writing the pages again on each pass).
    /// </summary>
    public static readonly byte[] DirtyPages =
    [
        0xBB, 0x00, 0x00, 0x10, 0x00,             // 0x1000 mov ebx, 0x100000
        0xB9, 0x40, 0x00, 0x00, 0x00,             // 0x1005 mov ecx, 64
        0x89, 0x03,                               // 0x100a mov [ebx], eax
        0x81, 0xC3, 0x00, 0x10, 0x00, 0x00,       // 0x100c add ebx, 0x1000
        0x49,                                     // 0x1012 dec ecx
        0x75, 0xF5,                               // 0x1013 jnz 0x100a
        0x66, 0xBA, 0x80, 0x00,                   // 0x1015 mov dx, 0x80
        0xEE,                                     // 0x1019 out dx, al
        0xEB, 0xE4,                               // 0x101a jmp 0x1000 (0x101c - 0x1c)
    ];
}
