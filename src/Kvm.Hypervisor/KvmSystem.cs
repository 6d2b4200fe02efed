using Kvm.Interop.Handles;
using Kvm.Interop.Native;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor;

/// <summary>The host's KVM: an open /dev/kvm, its capabilities, and the factory of VMs.</summary>
public sealed class KvmSystem : IDisposable
{
    public const int ExpectedApiVersion = 12;
    public const string DefaultPath = "/dev/kvm";

    private readonly KvmSystemHandle _handle;

    private KvmSystem(KvmSystemHandle handle, string path, int vcpuMmapSize)
    {
        _handle = handle;
        Path = path;
        VcpuMmapSize = vcpuMmapSize;
    }

    public string Path { get; }

    /// <summary>Size of the kvm_run mapping of each vCPU.</summary>
    public int VcpuMmapSize { get; }

    internal KvmSystemHandle Handle => _handle;

    /// <summary>Opens /dev/kvm (or <paramref name="path"/>) with errors that say what to do about it.</summary>
    public static KvmSystem Open(string path = DefaultPath)
    {
        int fd = KvmShim.Open(path);
        if (fd < 0)
        {
            int errno = -fd;
            throw errno switch
            {
                Errno.ENOENT or Errno.ENODEV => new HypervisorException(
                    $"{path} is missing: this host has no KVM (enable virtualization and load the kvm module)"),
                Errno.EACCES or Errno.EPERM => new HypervisorException(
                    $"{path}: permission denied (run as root or add the user to the 'kvm' group)"),
                _ => new HypervisorException($"cannot open {path}: {Errno.Describe(errno)} (errno {errno})"),
            };
        }
        var handle = new KvmSystemHandle(fd);
        try
        {
            int version = Errno.Check(KvmShim.GetApiVersion(handle), "KVM_GET_API_VERSION");
            if (version != ExpectedApiVersion)
                throw new HypervisorException($"{path}: KVM API version {version}, expected {ExpectedApiVersion}");
            int mmapSize = Errno.Check(KvmShim.GetVcpuMmapSize(handle), "KVM_GET_VCPU_MMAP_SIZE");
            return new KvmSystem(handle, path, mmapSize);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>KVM_CHECK_EXTENSION on the system fd: 0 when absent, else a capability-specific value.</summary>
    public int CheckExtension(KvmCap cap) => Math.Max(0, KvmShim.CheckExtension(_handle, (int)cap));

    /// <summary>The CPUID leaves KVM can give a guest on this host.</summary>
    public unsafe KvmCpuidEntry2[] GetSupportedCpuid()
    {
        for (uint max = 128; ; max *= 2)
        {
            var entries = new KvmCpuidEntry2[max];
            int rc;
            uint count;
            fixed (KvmCpuidEntry2* p = entries)
                rc = KvmShim.GetSupportedCpuid(_handle, max, p, out count);
            if (rc == -Errno.E2BIG && max < 4096)
                continue;
            Errno.Check(rc, "KVM_GET_SUPPORTED_CPUID");
            return entries.AsSpan(0, (int)count).ToArray();
        }
    }

    /// <summary>The MSR indices KVM saves and restores for a vCPU.</summary>
    public unsafe uint[] GetMsrIndexList()
    {
        for (uint max = 256; ; max *= 2)
        {
            var indices = new uint[max];
            int rc;
            uint count;
            fixed (uint* p = indices)
                rc = KvmShim.GetMsrIndexList(_handle, max, p, out count);
            if (rc == -Errno.E2BIG && max < 65536)
                continue;
            Errno.Check(rc, "KVM_GET_MSR_INDEX_LIST");
            return indices.AsSpan(0, (int)count).ToArray();
        }
    }

    public KvmVm CreateVm()
    {
        int fd = KvmShim.CreateVm(_handle, 0);
        if (fd < 0)
        {
            var why = new KvmIoctlException("KVM_CREATE_VM", -fd);
            throw new HypervisorException($"cannot create a VM: {why.Message}", why);
        }
        return new KvmVm(this, new KvmVmHandle(fd));
    }

    public void Dispose() => _handle.Dispose();
}
