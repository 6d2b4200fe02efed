using System.Runtime.InteropServices;
using Kvm.Interop.Native;

namespace Kvm.Interop.Handles;

/// <summary>Base of every fd-owning handle; each fd kind has its own sealed subclass.</summary>
public abstract class SafeFdHandle : SafeHandle
{
    protected SafeFdHandle() : base(new IntPtr(-1), ownsHandle: true)
    {
    }

    protected SafeFdHandle(int fd) : base(new IntPtr(-1), ownsHandle: true)
    {
        SetHandle(new IntPtr(fd));
    }

    public override bool IsInvalid => handle.ToInt64() < 0;

    /// <summary>The fd number, for diagnostics only.</summary>
    public int Fd => (int)handle.ToInt64();

    protected override bool ReleaseHandle() => Libc.Close((int)handle.ToInt64()) == 0;
}

/// <summary>An open /dev/kvm.</summary>
public sealed class KvmSystemHandle : SafeFdHandle
{
    public KvmSystemHandle(int fd) : base(fd) { }
}

/// <summary>A VM fd from KVM_CREATE_VM.</summary>
public sealed class KvmVmHandle : SafeFdHandle
{
    public KvmVmHandle(int fd) : base(fd) { }
}

/// <summary>A vCPU fd from KVM_CREATE_VCPU.</summary>
public sealed class KvmVcpuHandle : SafeFdHandle
{
    public KvmVcpuHandle(int fd) : base(fd) { }
}

/// <summary>An eventfd (ioeventfd, irqfd, worker wake-ups).</summary>
public sealed class EventFdHandle : SafeFdHandle
{
    public EventFdHandle(int fd) : base(fd) { }
}
