using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Hypervisor;

/// <summary>A page fault on a range registered with a <see cref="Userfaultfd"/>: the page's host address and how it was touched.</summary>
public readonly record struct UserFault(ulong Address, bool Write, bool Minor, bool WriteProtect = false);

/// <summary>
/// A userfaultfd (userfaultfd(2)): page faults on the ranges registered with it, taken by any
/// thread, the kernel's own accesses included (KVM's, for a vCPU), wait until this process
/// resolves them: in missing mode by filling the page (<see cref="Copy"/>, <see cref="Zero"/>),
/// in minor mode (shared memory whose page is there but not mapped) by mapping it
/// (<see cref="Continue"/>), in write-protect mode by lifting the protection once the page is
/// dealt with (<see cref="WriteProtect"/>). Needs root or CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, or
/// access to /dev/userfaultfd.
/// </summary>
public sealed unsafe class Userfaultfd : IDisposable
{
    private Userfaultfd(UserfaultfdHandle handle, ulong features)
    {
        Handle = handle;
        Features = features;
    }

    public UserfaultfdHandle Handle { get; }

    /// <summary>The features the kernel offers (UFFD_FEATURE_*).</summary>
    public ulong Features { get; }

    /// <summary>Opens a userfaultfd asking for <paramref name="features"/>; refused naming what is missing.</summary>
    public static Userfaultfd Open(ulong features = 0)
    {
        int fd = KvmShim.UffdCreate();
        if (fd < 0)
            throw new HypervisorException(-fd == Errno.EPERM || -fd == Errno.EACCES
                ? "userfaultfd is not allowed for this process: run as root (or with CAP_SYS_PTRACE), set vm.unprivileged_userfaultfd=1, or give it access to /dev/userfaultfd"
                : $"userfaultfd: {Errno.Describe(-fd)}", new KvmIoctlException("userfaultfd", -fd));
        var handle = new UserfaultfdHandle(fd);
        ulong asked = features;
        int rc = KvmShim.UffdApi(handle, ref features, out _);
        if (rc < 0)
        {
            handle.Dispose();
            throw new KvmIoctlException("UFFDIO_API", -rc);
        }
        if ((features & asked) != asked)
        {
            handle.Dispose();
            throw new HypervisorException($"userfaultfd lacks features 0x{asked & ~features:x} this operation needs (this kernel offers 0x{features:x})");
        }
        return new Userfaultfd(handle, features);
    }

    /// <summary>Whether this process may open a userfaultfd (that handles the kernel's faults too).</summary>
    public static bool IsAvailable()
    {
        try
        {
            using var u = Open();
            return true;
        }
        catch (Exception e) when (e is HypervisorException or KvmIoctlException)
        {
            return false;
        }
    }

    /// <summary>Registers [start, start+length) in <paramref name="mode"/> (KvmShim.UffdRegister*).</summary>
    public void Register(IntPtr start, ulong length, ulong mode) =>
        Errno.Check(KvmShim.UffdRegister(Handle, (ulong)start, length, mode, out _), "UFFDIO_REGISTER");

    public void Unregister(IntPtr start, ulong length) =>
        Errno.Check(KvmShim.UffdUnregister(Handle, (ulong)start, length), "UFFDIO_UNREGISTER");

    /// <summary>
    /// Fills [dst, dst+src.Length) with <paramref name="src"/> (whole pages) and wakes the threads
    /// waiting there. Returns how far into the range it got: a page found filled already counts as
    /// done (it is skipped); fewer bytes when the kernel asks to try again (the caller goes on
    /// from there).
    /// </summary>
    public long Copy(IntPtr dst, ReadOnlySpan<byte> src)
    {
        fixed (byte* p = src)
            return Fill(KvmShim.UffdCopy(Handle, (ulong)dst, (ulong)p, (ulong)src.Length, 0, out long done), done, "UFFDIO_COPY");
    }

    /// <summary>Fills [start, start+length) with zeros (as <see cref="Copy"/>).</summary>
    public long Zero(IntPtr start, ulong length) => Fill(KvmShim.UffdZeropage(Handle, (ulong)start, length, 0, out long done), done, "UFFDIO_ZEROPAGE");

    /// <summary>Maps the pages already in the shared memory at [start, start+length) (minor faults), as <see cref="Copy"/>.</summary>
    public long Continue(IntPtr start, ulong length) => Fill(KvmShim.UffdContinue(Handle, (ulong)start, length, 0, out long done), done, "UFFDIO_CONTINUE");

    private const long Page = 4096;

    private static long Fill(int rc, long done, string operation)
    {
        done = Math.Max(done, 0);
        if (rc == 0 || rc == -Errno.EAGAIN)
            return done;
        if (rc == -Errno.EEXIST)
            return done + Page;     // the page at `done` is there already
        throw new KvmIoctlException(operation, -rc);
    }

    /// <summary>
    /// Write-protects [start, start+length) (registered in write-protect mode): a write there
    /// waits, reported as a fault, until the protection is lifted. With
    /// <paramref name="protect"/> false, lifts it and wakes the threads waiting there.
    /// </summary>
    public void WriteProtect(IntPtr start, ulong length, bool protect) =>
        Errno.Check(KvmShim.UffdWriteProtect(Handle, (ulong)start, length, protect ? KvmShim.UffdWriteProtectModeWp : 0), "UFFDIO_WRITEPROTECT");

    /// <summary>Wakes the threads waiting on faults in [start, start+length).</summary>
    public void Wake(IntPtr start, ulong length) => Errno.Check(KvmShim.UffdWake(Handle, (ulong)start, length), "UFFDIO_WAKE");

    /// <summary>Waits up to <paramref name="timeoutMs"/> for a fault to report; false on timeout.</summary>
    public bool WaitForFaults(int timeoutMs)
    {
        int r = Libc.PollOne(Handle, Libc.PollIn, timeoutMs);
        return r > 0;
    }

    /// <summary>Reads the faults waiting (up to the span's length); 0 when there is none.</summary>
    public int ReadFaults(Span<UserFault> into)
    {
        int max = Math.Min(into.Length, 64);
        ulong* addresses = stackalloc ulong[64];
        ulong* flags = stackalloc ulong[64];
        int n = Errno.Check(KvmShim.UffdReadFaults(Handle, addresses, flags, max), "read(userfaultfd)");
        for (int i = 0; i < n; i++)
            into[i] = new UserFault(addresses[i], (flags[i] & KvmShim.UffdPagefaultWrite) != 0, (flags[i] & KvmShim.UffdPagefaultMinor) != 0,
                (flags[i] & KvmShim.UffdPagefaultWriteProtect) != 0);
        return n;
    }

    public void Dispose() => Handle.Dispose();
}
