using System.Runtime.InteropServices;
using Kvm.Interop.Native;

namespace Kvm.Interop.Handles;

/// <summary>Base of every fd-owning handle; each fd kind has its own sealed subclass.</summary>
public abstract class SafeFdHandle : SafeHandle
{
    protected SafeFdHandle() : base(new IntPtr(-1), ownsHandle: true)
    {
    }

    protected SafeFdHandle(int fd, bool ownsHandle = true) : base(new IntPtr(-1), ownsHandle)
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

/// <summary>One of the process's standard fds (0, 1, 2), used but never closed.</summary>
public sealed class StdioHandle : SafeFdHandle
{
    private StdioHandle(int fd) : base(fd, ownsHandle: false) { }

    public static readonly StdioHandle Input = new(0), Output = new(1), Error = new(2);
}
