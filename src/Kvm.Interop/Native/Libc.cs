using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Interop.Native;

/// <summary>The few libc calls the lower layers need. Each returns -1 and sets errno on failure.</summary>
public static unsafe partial class Libc
{
    private const string Lib = "libc";

    public const int ProtRead = 1, ProtWrite = 2;
    public const int MapShared = 0x01, MapPrivate = 0x02, MapAnonymous = 0x20, MapNoReserve = 0x4000,
        MapHugeTlb = 0x40000, MapPopulate = 0x8000;
    public const int MadvHugePage = 14, MadvDontDump = 16, MadvDontNeed = 4;
    public const int EfdCloexec = 0x80000, EfdNonblock = 0x800;
    public static readonly IntPtr MapFailed = new(-1);
    public const int FallocFlKeepSize = 0x01, FallocFlPunchHole = 0x02, FallocFlZeroRange = 0x10;
    public const int SeekSet = 0, SeekCur = 1, SeekEnd = 2, SeekData = 3, SeekHole = 4;
    public const int MapFixed = 0x10;
    public const int ProtNone = 0;
    /// <summary>memfd_create(2) flags: close on exec, hugetlb pages (with the size in bits 26..31), no exec permission (Linux 6.3).</summary>
    public const uint MfdCloexec = 0x1, MfdHugeTlb = 0x4, MfdNoExecSeal = 0x8, MfdHuge2Mb = 21u << 26;
    public const int ORdWr = 0x2, OCreat = 0x40, OCloexec = 0x80000;
    public const int FDupFdCloexec = 1030;
    /// <summary>statfs f_type values of the file systems guest memory may live on.</summary>
    public const long TmpfsMagic = 0x01021994, HugetlbfsMagic = 0x958458f6;

    [LibraryImport(Lib, EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport(Lib, EntryPoint = "mmap", SetLastError = true)]
    public static partial IntPtr Mmap(IntPtr addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport(Lib, EntryPoint = "mmap", SetLastError = true)]
    public static partial IntPtr Mmap(IntPtr addr, nuint length, int prot, int flags, SafeFdHandle fd, long offset);

    [LibraryImport(Lib, EntryPoint = "munmap", SetLastError = true)]
    public static partial int Munmap(IntPtr addr, nuint length);

    [LibraryImport(Lib, EntryPoint = "madvise", SetLastError = true)]
    public static partial int Madvise(IntPtr addr, nuint length, int advice);

    [LibraryImport(Lib, EntryPoint = "eventfd", SetLastError = true)]
    public static partial int EventFd(uint initval, int flags);

    [LibraryImport(Lib, EntryPoint = "read", SetLastError = true)]
    public static partial nint Read(SafeFdHandle fd, void* buf, nuint count);

    [LibraryImport(Lib, EntryPoint = "write", SetLastError = true)]
    public static partial nint Write(SafeFdHandle fd, void* buf, nuint count);

    [LibraryImport(Lib, EntryPoint = "isatty")]
    public static partial int IsATty(int fd);

    /// <summary>fallocate(2) on a regular file: allocate, punch holes or zero a byte range.</summary>
    [LibraryImport(Lib, EntryPoint = "fallocate", SetLastError = true)]
    public static partial int Fallocate(SafeFileHandle fd, int mode, long offset, long length);

    /// <summary>lseek(2); with <see cref="SeekData"/>/<see cref="SeekHole"/> it finds a sparse file's extents.</summary>
    [LibraryImport(Lib, EntryPoint = "lseek", SetLastError = true)]
    public static partial long Lseek(SafeFileHandle fd, long offset, int whence);

    /// <summary>open(2) without a mode (no O_CREAT): returns the fd or -1.</summary>
    [LibraryImport(Lib, EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path, int flags);

    /// <summary>link(2): a second name for a file (a unix socket's too: connecting through either reaches the same listener).</summary>
    [LibraryImport(Lib, EntryPoint = "link", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Link(string existing, string newName);

    /// <summary>fsync(2): the file's (or directory's) data and metadata reach the disk.</summary>
    [LibraryImport(Lib, EntryPoint = "fsync", SetLastError = true)]
    public static partial int Fsync(SafeFdHandle fd);

    /// <summary>memfd_create(2): an anonymous file in memory (shmem, or hugetlbfs with <see cref="MfdHugeTlb"/>).</summary>
    [LibraryImport(Lib, EntryPoint = "memfd_create", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int MemfdCreate(string name, uint flags);

    /// <summary>open(2) with a mode for <see cref="OCreat"/>; returns the new fd or -1.</summary>
    [LibraryImport(Lib, EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path, int flags, uint mode);

    [LibraryImport(Lib, EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int Ftruncate(SafeHandle fd, long length);

    /// <summary>lseek(2) on any fd (<see cref="SeekEnd"/> with offset 0 gives the file's size).</summary>
    [LibraryImport(Lib, EntryPoint = "lseek", SetLastError = true)]
    public static partial long Lseek(SafeHandle fd, long offset, int whence);

    /// <summary>fcntl(2) with an int argument (F_DUPFD_CLOEXEC and the like).</summary>
    [LibraryImport(Lib, EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(SafeHandle fd, int command, int argument);

    [LibraryImport(Lib, EntryPoint = "fstatfs", SetLastError = true)]
    private static partial int Fstatfs(SafeHandle fd, byte* buf);

    /// <summary>
    /// The type of the file system holding <paramref name="fd"/> (statfs f_type: <see cref="TmpfsMagic"/>,
    /// <see cref="HugetlbfsMagic"/>, ...), or -1 with errno set. struct statfs on x86-64 is 120 bytes,
    /// f_type its first field (a long).
    /// </summary>
    public static long FileSystemType(SafeHandle fd)
    {
        byte* buf = stackalloc byte[128];
        if (Fstatfs(fd, buf) != 0)
            return -1;
        return *(long*)buf;
    }

    [LibraryImport(Lib, EntryPoint = "geteuid")]
    public static partial uint GetEuid();

    [LibraryImport(Lib, EntryPoint = "getegid")]
    public static partial uint GetEgid();

    /// <summary>chown(2); pass uint.MaxValue (-1) to leave the owner or the group as it is.</summary>
    [LibraryImport(Lib, EntryPoint = "chown", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Chown(string path, uint owner, uint group);

    /// <summary>setsid(2): a new session and process group, so the caller's terminal and its signals no longer reach this process.</summary>
    [LibraryImport(Lib, EntryPoint = "setsid", SetLastError = true)]
    public static partial int SetSid();

    [LibraryImport(Lib, EntryPoint = "kill", SetLastError = true)]
    public static partial int Kill(int pid, int signal);

    [LibraryImport(Lib, EntryPoint = "dup2", SetLastError = true)]
    public static partial int Dup2(SafeHandle oldFd, int newFd);

    /// <summary>pidfd_open(2) (glibc 2.36): a file descriptor that refers to process <paramref name="pid"/> and becomes readable when it exits.</summary>
    [LibraryImport(Lib, EntryPoint = "pidfd_open", SetLastError = true)]
    public static partial int PidfdOpen(int pid, uint flags);

    /// <summary>pidfd_send_signal(2): a signal to the process a pidfd refers to, never to a later process that reused its pid.</summary>
    [LibraryImport(Lib, EntryPoint = "pidfd_send_signal", SetLastError = true)]
    public static partial int PidfdSendSignal(SafeFdHandle pidfd, int signal, IntPtr info, uint flags);

    /// <summary>poll(2) events.</summary>
    public const short PollIn = 1;

    /// <summary>poll(2) on one descriptor for <paramref name="events"/>; returns the revents, 0 on timeout, or -1.</summary>
    public static int PollOne(SafeFdHandle fd, short events, int timeoutMs)
    {
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            long entry = (uint)fd.DangerousGetHandle().ToInt32() | ((long)(ushort)events << 32); // struct pollfd { int fd; short events; short revents; }
            int n = Poll(&entry, 1, timeoutMs);
            return n <= 0 ? n : (int)(ushort)(entry >> 48);
        }
        finally
        {
            if (added)
                fd.DangerousRelease();
        }
    }

    [LibraryImport(Lib, EntryPoint = "poll", SetLastError = true)]
    private static partial int Poll(long* fds, nuint count, int timeoutMs);

    [LibraryImport(Lib, EntryPoint = "getgrnam", StringMarshalling = StringMarshalling.Utf8)]
    private static partial IntPtr GetGrNam(string name);

    [LibraryImport(Lib, EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Statx(int dirfd, string path, int flags, uint mask, byte* statxbuf);

    /// <summary>
    /// Whether <paramref name="path"/> itself (a final symlink not followed) is a unix socket; null
    /// when it cannot be examined. statx(2): struct statx is 256 bytes on every architecture, its
    /// __u16 stx_mode at offset 28; STATX_TYPE asks for the file type only.
    /// </summary>
    public static bool? IsSocket(string path)
    {
        const int AtFdCwd = -100, AtSymlinkNoFollow = 0x100;
        const uint StatxType = 0x1;
        byte* buf = stackalloc byte[256];
        if (Statx(AtFdCwd, path, AtSymlinkNoFollow, StatxType, buf) != 0)
            return null;
        ushort mode = *(ushort*)(buf + 28);
        return (mode & 0xF000) == 0xC000; // S_IFMT, S_IFSOCK
    }

    /// <summary>
    /// The id of a group by name (through NSS, as getgrnam(3) finds it), or null. struct group on
    /// x86-64 glibc: char *gr_name, char *gr_passwd, gid_t gr_gid, char **gr_mem.
    /// </summary>
    public static uint? GroupId(string name)
    {
        IntPtr g = GetGrNam(name);
        return g == IntPtr.Zero ? null : (uint)Marshal.ReadInt32(g, 16);
    }
}
