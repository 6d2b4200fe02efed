using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Structs;

namespace Kvm.Interop.Native;

// ioctls on the system fd (/dev/kvm).
public static unsafe partial class KvmShim
{
    [LibraryImport(Library, EntryPoint = "kvm_get_api_version")]
    public static partial int GetApiVersion(KvmSystemHandle sys);

    [LibraryImport(Library, EntryPoint = "kvm_check_extension")]
    public static partial int CheckExtension(SafeFdHandle fd, int extension);

    [LibraryImport(Library, EntryPoint = "kvm_get_vcpu_mmap_size")]
    public static partial int GetVcpuMmapSize(KvmSystemHandle sys);

    [LibraryImport(Library, EntryPoint = "kvm_get_supported_cpuid")]
    public static partial int GetSupportedCpuid(KvmSystemHandle sys, uint maxEntries, KvmCpuidEntry2* entries, out uint count);

    [LibraryImport(Library, EntryPoint = "kvm_get_msr_index_list")]
    public static partial int GetMsrIndexList(KvmSystemHandle sys, uint maxIndices, uint* indices, out uint count);

    [LibraryImport(Library, EntryPoint = "kvm_create_vm")]
    public static partial int CreateVm(KvmSystemHandle sys, uint type);
}
