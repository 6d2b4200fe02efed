using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Structs;

namespace Kvm.Interop.Native;

// ioctls on a VM fd.
public static unsafe partial class KvmShim
{
    [LibraryImport(Library, EntryPoint = "kvm_set_user_memory_region")]
    public static partial int SetUserMemoryRegion(KvmVmHandle vm, uint slot, uint flags, ulong guestPhysAddr, ulong memorySize, ulong userspaceAddr);

    [LibraryImport(Library, EntryPoint = "kvm_set_tss_addr")]
    public static partial int SetTssAddr(KvmVmHandle vm, ulong addr);

    [LibraryImport(Library, EntryPoint = "kvm_set_identity_map_addr")]
    public static partial int SetIdentityMapAddr(KvmVmHandle vm, ulong addr);

    [LibraryImport(Library, EntryPoint = "kvm_create_irqchip")]
    public static partial int CreateIrqchip(KvmVmHandle vm);

    [LibraryImport(Library, EntryPoint = "kvm_create_pit2")]
    public static partial int CreatePit2(KvmVmHandle vm, uint flags);

    [LibraryImport(Library, EntryPoint = "kvm_irq_line")]
    public static partial int IrqLine(KvmVmHandle vm, uint irq, uint level);

    [LibraryImport(Library, EntryPoint = "kvm_irqfd")]
    public static partial int Irqfd(KvmVmHandle vm, EventFdHandle fd, uint gsi, uint flags, int resampleFd);

    [LibraryImport(Library, EntryPoint = "kvm_ioeventfd")]
    public static partial int Ioeventfd(KvmVmHandle vm, ulong addr, uint len, EventFdHandle fd, uint flags, ulong datamatch);

    [LibraryImport(Library, EntryPoint = "kvm_set_gsi_routing")]
    public static partial int SetGsiRouting(KvmVmHandle vm, uint count, KvmIrqRoutingEntry* entries);

    [LibraryImport(Library, EntryPoint = "kvm_get_dirty_log")]
    public static partial int GetDirtyLog(KvmVmHandle vm, uint slot, ulong* bitmap);

    [LibraryImport(Library, EntryPoint = "kvm_clear_dirty_log")]
    public static partial int ClearDirtyLog(KvmVmHandle vm, uint slot, ulong firstPage, uint numPages, ulong* bitmap);

    [LibraryImport(Library, EntryPoint = "kvm_enable_cap")]
    public static partial int EnableCap(SafeFdHandle fd, uint cap, uint flags, ulong* args4);

    [LibraryImport(Library, EntryPoint = "kvm_get_clock")]
    public static partial int GetClock(KvmVmHandle vm, out KvmClockData clock);

    [LibraryImport(Library, EntryPoint = "kvm_set_clock")]
    public static partial int SetClock(KvmVmHandle vm, in KvmClockData clock);

    [LibraryImport(Library, EntryPoint = "kvm_get_irqchip")]
    public static partial int GetIrqchip(KvmVmHandle vm, ref KvmIrqchip chip);

    [LibraryImport(Library, EntryPoint = "kvm_set_irqchip")]
    public static partial int SetIrqchip(KvmVmHandle vm, in KvmIrqchip chip);

    [LibraryImport(Library, EntryPoint = "kvm_get_pit2")]
    public static partial int GetPit2(KvmVmHandle vm, out KvmPitState2 pit);

    [LibraryImport(Library, EntryPoint = "kvm_set_pit2")]
    public static partial int SetPit2(KvmVmHandle vm, in KvmPitState2 pit);

    [LibraryImport(Library, EntryPoint = "kvm_create_vcpu")]
    public static partial int CreateVcpu(KvmVmHandle vm, uint id);
}
