using System.Runtime.InteropServices;

namespace Kvm.Interop.Native;

/// <summary>Errno values and the check that turns a shim's -errno into an exception.</summary>
public static class Errno
{
    public const int EPERM = 1, ENOENT = 2, ESRCH = 3, EINTR = 4, EIO = 5, ENXIO = 6, E2BIG = 7, EBADF = 9, EAGAIN = 11,
        ENOMEM = 12, EACCES = 13, EFAULT = 14, EBUSY = 16, EEXIST = 17, ENODEV = 19, EINVAL = 22,
        ENOSPC = 28, ESPIPE = 29, EPIPE = 32, ENOSYS = 38, ENODATA = 61, EMSGSIZE = 90, ENOTSUP = 95, EOPNOTSUPP = 95;

    /// <summary>The C library's text for an errno value.</summary>
    public static string Describe(int errno) => Marshal.GetPInvokeErrorMessage(errno);

    /// <summary>Returns <paramref name="rc"/> when it is non-negative, else throws naming the operation.</summary>
    public static int Check(int rc, string operation)
    {
        if (rc < 0)
            throw new KvmIoctlException(operation, -rc);
        return rc;
    }
}

/// <summary>A system call or ioctl failed; carries the operation's name and errno.</summary>
public sealed class KvmIoctlException(string operation, int errno)
    : Exception($"{operation} failed: {Native.Errno.Describe(errno)} (errno {errno})")
{
    public string Operation { get; } = operation;
    public int ErrorNumber { get; } = errno;
}
