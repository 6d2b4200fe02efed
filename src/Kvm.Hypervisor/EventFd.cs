using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Hypervisor;

/// <summary>An eventfd: a counter the kernel and threads signal each other through (irqfd, ioeventfd).</summary>
public sealed unsafe class EventFd : IDisposable
{
    public EventFd(bool nonBlocking = false)
    {
        int fd = Libc.EventFd(0, Libc.EfdCloexec | (nonBlocking ? Libc.EfdNonblock : 0));
        if (fd < 0)
            throw new KvmIoctlException("eventfd", Marshal.GetLastPInvokeError());
        Handle = new EventFdHandle(fd);
    }

    public EventFdHandle Handle { get; }

    public void Signal(ulong value = 1)
    {
        if (Libc.Write(Handle, &value, 8) != 8)
            throw new KvmIoctlException("eventfd write", Marshal.GetLastPInvokeError());
    }

    /// <summary>Reads and resets the counter; blocks while it is zero unless the fd is non-blocking (then returns 0).</summary>
    public ulong Read()
    {
        ulong value;
        if (Libc.Read(Handle, &value, 8) == 8)
            return value;
        int errno = Marshal.GetLastPInvokeError();
        if (errno == Errno.EAGAIN)
            return 0;
        throw new KvmIoctlException("eventfd read", errno);
    }

    public void Dispose() => Handle.Dispose();
}
