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

/// <summary>A pidfd from pidfd_open(2): refers to one process, readable once it has exited.</summary>
public sealed class PidFdHandle : SafeFdHandle
{
    public PidFdHandle(int fd) : base(fd) { }

    /// <summary>Opens a pidfd for process <paramref name="pid"/>; null when there is no such process.</summary>
    public static PidFdHandle? Open(int pid)
    {
        int fd = Libc.PidfdOpen(pid, 0);
        if (fd >= 0)
            return new PidFdHandle(fd);
        int errno = Marshal.GetLastPInvokeError();
        if (errno == Errno.ESRCH)
            return null;
        throw new IOException($"pidfd_open({pid}) failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
    }

    /// <summary>Whether the process has exited, waiting up to <paramref name="timeoutMs"/> (-1: forever).</summary>
    public bool WaitForExit(int timeoutMs)
    {
        const short PollIn = 0x1;
        while (true)
        {
            int r = Libc.PollOne(this, PollIn, timeoutMs);
            if (r > 0)
                return true;
            if (r == 0)
                return false;
            int errno = Marshal.GetLastPInvokeError();
            if (errno != Errno.EINTR)
                throw new IOException($"poll on a pidfd failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
    }

    /// <summary>Sends <paramref name="signal"/> to the process; false when it has already exited.</summary>
    public bool Signal(int signal)
    {
        if (Libc.PidfdSendSignal(this, signal, IntPtr.Zero, 0) == 0)
            return true;
        int errno = Marshal.GetLastPInvokeError();
        if (errno == Errno.ESRCH)
            return false;
        throw new IOException($"pidfd_send_signal({signal}) failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
    }
}

/// <summary>A directory opened read-only (O_DIRECTORY), for fsync(2) after a rename inside it.</summary>
public sealed class DirectoryHandle : SafeFdHandle
{
    private DirectoryHandle(int fd) : base(fd) { }

    /// <summary>Opens the directory <paramref name="path"/>; throws <see cref="IOException"/> naming it and the errno.</summary>
    public static DirectoryHandle Open(string path)
    {
        const int ORdonly = 0, ODirectory = 0x10000, OCloexec = 0x80000;
        int fd = Libc.Open(path, ORdonly | ODirectory | OCloexec);
        if (fd < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new IOException($"open({path}) as a directory failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
        return new DirectoryHandle(fd);
    }

    /// <summary>
    /// fsync(2) on the directory, so that the names created or renamed in it survive a crash;
    /// throws <see cref="IOException"/> naming <paramref name="path"/> (the directory, for the message).
    /// </summary>
    public void Sync(string path)
    {
        if (Libc.Fsync(this) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new IOException($"fsync({path}) failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
    }
}

/// <summary>A userfaultfd: page faults on the ranges registered with it are reported to, and resolved by, this process.</summary>
public sealed class UserfaultfdHandle : SafeFdHandle
{
    public UserfaultfdHandle(int fd) : base(fd) { }
}

/// <summary>
/// An fd whose pages are guest RAM: a memfd (ordinary or hugetlb pages), or a file opened to hold
/// guest memory. Another process that gets it (over a unix socket, or through /proc/PID/fd) can
/// map the same pages.
/// </summary>
public sealed class MemoryFdHandle : SafeFdHandle
{
    public MemoryFdHandle(int fd) : base(fd) { }
}

/// <summary>
/// A descriptor received from another process over a unix socket (SCM_RIGHTS), until its
/// receiver hands it to what it is for (guest RAM, a listening socket), which takes its own copy.
/// </summary>
public sealed class ReceivedFdHandle : SafeFdHandle
{
    public ReceivedFdHandle(int fd) : base(fd) { }
}

/// <summary>A queue of a tap device: /dev/net/tun attached with TUNSETIFF.</summary>
public sealed class TapHandle : SafeFdHandle
{
    public TapHandle(int fd) : base(fd) { }
}

/// <summary>A packet socket (AF_PACKET) on one interface.</summary>
public sealed class PacketSocketHandle : SafeFdHandle
{
    public PacketSocketHandle(int fd) : base(fd) { }
}

/// <summary>A netlink route socket in the link group: readable when a host interface changes.</summary>
public sealed class LinkEventsHandle : SafeFdHandle
{
    public LinkEventsHandle(int fd) : base(fd) { }
}

/// <summary>An epoll instance.</summary>
public sealed class EpollHandle : SafeFdHandle
{
    public EpollHandle(int fd) : base(fd) { }
}
