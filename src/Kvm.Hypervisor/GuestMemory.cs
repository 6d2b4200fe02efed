using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Hypervisor;

/// <summary>Which pages back guest RAM.</summary>
public enum HugePageMode
{
    /// <summary>Ordinary 4 KiB pages.</summary>
    None,
    /// <summary>
    /// Transparent huge pages requested with madvise(MADV_HUGEPAGE). In a memfd they are shmem THP,
    /// which /sys/kernel/mm/transparent_hugepage/shmem_enabled must allow.
    /// </summary>
    Transparent,
    /// <summary>Pages from the hugetlb pool (a hugetlb memfd), reserved by the administrator.</summary>
    HugeTlb,
}

/// <summary>
/// Where guest RAM lives. By default one memfd holds every RAM region at consecutive offsets;
/// with <see cref="FilePath"/>, a file does. Either way the regions are MAP_SHARED mappings of
/// the fd, so another process given the fd maps the same bytes (<see cref="GuestMemory.Attach"/>).
/// </summary>
public sealed record GuestMemoryBacking
{
    /// <summary>Which pages: ordinary, transparent huge pages, or hugetlb pages.</summary>
    public HugePageMode HugePages { get; init; } = HugePageMode.None;

    /// <summary>
    /// A file that holds guest RAM instead of a memfd: created when missing, grown (sparsely) when
    /// shorter than guest RAM, never shrunk. Its bytes are guest RAM from the start, and guest
    /// writes reach it. For hugetlb pages it must be on hugetlbfs; for transparent huge pages on
    /// tmpfs (whose huge= mount option then decides). Null: a memfd.
    /// </summary>
    public string? FilePath { get; init; }

    /// <summary>A memfd (the default backing) on the given pages.</summary>
    public static GuestMemoryBacking Memfd(HugePageMode hugePages = HugePageMode.None) => new() { HugePages = hugePages };

    /// <summary>The file at <paramref name="path"/>, on the given pages.</summary>
    public static GuestMemoryBacking InFile(string path, HugePageMode hugePages = HugePageMode.None) =>
        new() { FilePath = path, HugePages = hugePages };
}

/// <summary>Where one RAM region sits: its guest-physical address, its size and its offset in the backing fd.</summary>
public readonly record struct GuestMemoryRange(ulong GuestAddress, ulong Size, ulong FileOffset);

/// <summary>One contiguous range of guest-physical RAM and the host mapping behind it.</summary>
public sealed class GuestMemoryRegion
{
    internal GuestMemoryRegion(ulong guestAddress, ulong size, IntPtr host, ulong fileOffset)
    {
        GuestAddress = guestAddress;
        Size = size;
        Host = host;
        FileOffset = fileOffset;
    }

    /// <summary>The guest-physical address of the region's first byte.</summary>
    public ulong GuestAddress { get; }

    /// <summary>The region's size in bytes.</summary>
    public ulong Size { get; }

    /// <summary>The guest-physical address just past the region.</summary>
    public ulong End => GuestAddress + Size;

    /// <summary>The region's mapping in this process.</summary>
    public IntPtr Host { get; }

    /// <summary>Where the region's bytes start in the backing fd (<see cref="GuestMemory.BackingFd"/>).</summary>
    public ulong FileOffset { get; }

    /// <summary>True when [gpa, gpa+length) lies inside the region.</summary>
    public bool Contains(ulong gpa, ulong length) =>
        gpa >= GuestAddress && length <= Size && gpa - GuestAddress <= Size - length;
}

/// <summary>A guest address or range that is not in guest RAM, or guest RAM that cannot be made.</summary>
public sealed class GuestMemoryException(string message) : Exception(message);

/// <summary>
/// Guest RAM: MAP_SHARED mappings of one fd (a memfd by default, a hugetlb memfd, or a file;
/// <see cref="GuestMemoryBacking"/>), or private copy-on-write mappings of a file
/// (<see cref="MapPrivate"/>), placed at guest-physical addresses. Every access is
/// bounds-checked, since addresses often come from the guest.
/// <para>
/// Reading is through <see cref="Read"/>, the ReadU* methods, <see cref="GetSpan"/> and
/// <see cref="AppendMemory"/>, which hand out read-only views. Everything that writes or hands
/// out writable memory (<see cref="Write"/>, the WriteU* methods, <see cref="Clear"/>,
/// <see cref="GetWritableSpan"/>, <see cref="AppendWritableMemory"/>) marks the pages it covers
/// in the device-dirty bitmap when <see cref="TrackDeviceWrites"/> is on: KVM's dirty log sees
/// only the vCPUs' writes, so devices write guest memory only through these.
/// </para>
/// </summary>
public sealed unsafe class GuestMemory : IDisposable
{
    /// <summary>The page size of the dirty bitmaps (and the smallest alignment of a region).</summary>
    public const ulong PageSize = 4096;

    /// <summary>The size of a huge page (transparent or hugetlb) on x86-64.</summary>
    public const ulong HugePageSize = 2UL << 20;

    private const string ThpDirectory = "/sys/kernel/mm/transparent_hugepage/";
    private const string MemfdName = "kvm-guest-ram";

    private readonly GuestMemoryRegion[] _regions;
    private readonly MemoryFdHandle _fd;
    private readonly object _trackingLock = new();
    private ulong[][]? _deviceDirty;
    private bool _disposed;

    private GuestMemory(GuestMemoryRegion[] regions, HugePageMode mode, MemoryFdHandle fd, string? file, string? privateCopyOf = null)
    {
        _regions = regions;
        HugePages = mode;
        _fd = fd;
        BackingFile = file;
        PrivateCopyOf = privateCopyOf;
        // Every window is made up front: workers on several threads read them without a lock.
        _windows = new Memory<byte>[regions.Length][];
        for (int i = 0; i < regions.Length; i++)
        {
            var r = regions[i];
            var list = new Memory<byte>[(r.Size + MemoryWindow - 1) / MemoryWindow];
            for (ulong w = 0; w < (ulong)list.Length; w++)
            {
                ulong start = w * MemoryWindow;
                list[w] = new NativeMemory((byte*)r.Host + start, (int)Math.Min(MemoryWindow, r.Size - start)).Memory;
            }
            _windows[i] = list;
        }
    }

    /// <summary>The RAM regions, in guest-address order.</summary>
    public IReadOnlyList<GuestMemoryRegion> Regions => _regions;

    /// <summary>Which pages back guest RAM.</summary>
    public HugePageMode HugePages { get; }

    /// <summary>
    /// The fd holding guest RAM (a memfd or a file; close-on-exec). Give it to another process
    /// (SCM_RIGHTS, or /proc/PID/fd/N) with <see cref="Layout"/> and it can
    /// <see cref="Attach"/> the same bytes. It stays owned by this object.
    /// </summary>
    public MemoryFdHandle BackingFd => _fd;

    /// <summary>The file holding guest RAM when it was made on one (<see cref="GuestMemoryBacking.FilePath"/>), else null.</summary>
    public string? BackingFile { get; }

    /// <summary>
    /// What guest RAM is a private copy-on-write mapping of (<see cref="MapPrivate"/>: a snapshot's
    /// memory file), else null. Then <see cref="BackingFd"/> holds the content RAM started from,
    /// not the guest's writes: another process attaching it would not see this guest's RAM.
    /// </summary>
    public string? PrivateCopyOf { get; }

    /// <summary>Each region's guest address, size and offset in <see cref="BackingFd"/>, in guest-address order.</summary>
    public IReadOnlyList<GuestMemoryRange> Layout =>
        _regions.Select(r => new GuestMemoryRange(r.GuestAddress, r.Size, r.FileOffset)).ToArray();

    /// <summary>The sum of the regions' sizes.</summary>
    public ulong TotalSize
    {
        get
        {
            ulong total = 0;
            foreach (var r in _regions)
                total += r.Size;
            return total;
        }
    }

    /// <summary>Maps guest RAM for the given (guest address, size) ranges in a memfd on the given pages.</summary>
    public static GuestMemory Create(IReadOnlyList<(ulong GuestAddress, ulong Size)> layout, HugePageMode mode = HugePageMode.None) =>
        Create(layout, GuestMemoryBacking.Memfd(mode));

    /// <summary>
    /// Maps guest RAM for the given (guest address, size) ranges in <paramref name="backing"/>: one
    /// fd sized to the total, the regions at consecutive offsets in guest-address order, each
    /// mapped MAP_SHARED. Nothing is populated up front: pages are allocated when first touched.
    /// </summary>
    public static GuestMemory Create(IReadOnlyList<(ulong GuestAddress, ulong Size)> layout, GuestMemoryBacking backing)
    {
        var mode = backing.HugePages;
        ulong align = Alignment(mode);
        var sorted = layout.OrderBy(r => r.GuestAddress).ToArray();
        var ranges = new GuestMemoryRange[sorted.Length];
        ulong total = 0;
        for (int i = 0; i < sorted.Length; i++)
        {
            var (gpa, size) = sorted[i];
            if (size == 0 || size % align != 0 || gpa % align != 0)
                throw new GuestMemoryException($"guest RAM range 0x{gpa:x}+0x{size:x} is not aligned to {align} bytes");
            ranges[i] = new GuestMemoryRange(gpa, size, total);
            total += size;
        }
        CheckLayout(ranges);
        MemoryFdHandle fd;
        if (backing.FilePath is { } path)
            fd = OpenFile(path, total, mode);
        else
        {
            CheckHostCanGive(total, mode);
            fd = CreateMemfd(total, mode);
        }
        return MapAll(fd, ranges, mode, backing.FilePath);
    }

    /// <summary>
    /// Maps guest RAM that already exists in <paramref name="fd"/> (another GuestMemory's
    /// <see cref="BackingFd"/>, received over a unix socket or opened again through /proc/PID/fd)
    /// with <paramref name="layout"/> (that memory's <see cref="Layout"/>): both see the same bytes.
    /// The new object keeps its own duplicate of the fd; the caller's stays the caller's.
    /// <paramref name="mode"/> must say HugeTlb exactly when the fd is on hugetlbfs.
    /// </summary>
    public static GuestMemory Attach(SafeHandle fd, IReadOnlyList<GuestMemoryRange> layout, HugePageMode mode = HugePageMode.None)
    {
        var (own, ranges) = Duplicate(fd, layout, Alignment(mode), "the guest memory fd", check: own =>
        {
            bool hugetlbfs = Libc.FileSystemType(own) == Libc.HugetlbfsMagic;
            if (hugetlbfs != (mode == HugePageMode.HugeTlb))
                throw new GuestMemoryException(hugetlbfs
                    ? "the guest memory fd is on hugetlbfs: attach it with hugetlb pages"
                    : $"the guest memory fd is not on hugetlbfs, so it cannot be attached with hugetlb pages");
        });
        return MapAll(own, ranges, mode, file: null);
    }

    /// <summary>
    /// Maps guest RAM as a private copy-on-write mapping of <paramref name="fd"/> (a file opened
    /// read-only will do: a snapshot's memory file) laid out as <paramref name="layout"/>: nothing
    /// is read up front, a page comes from the page cache when first touched (shared by every
    /// mapping of the file), and the first write to a page copies it into this process's memory;
    /// the file never changes. <paramref name="what"/> names the file in errors and in
    /// <see cref="PrivateCopyOf"/>. Small pages only.
    /// </summary>
    public static GuestMemory MapPrivate(SafeHandle fd, IReadOnlyList<GuestMemoryRange> layout, string what)
    {
        var (own, ranges) = Duplicate(fd, layout, PageSize, what);
        return MapAll(own, ranges, HugePageMode.None, file: null, privateCopyOf: what);
    }

    /// <summary>
    /// Checks <paramref name="layout"/> (aligned to <paramref name="align"/>, no overlaps) and
    /// duplicates <paramref name="fd"/> (<paramref name="what"/> in errors), which must hold every
    /// range (a page past its end would be SIGBUS when the guest touched it) and pass
    /// <paramref name="check"/>; returns the duplicate and the ranges by guest address.
    /// </summary>
    private static (MemoryFdHandle Fd, GuestMemoryRange[] Ranges) Duplicate(SafeHandle fd, IReadOnlyList<GuestMemoryRange> layout, ulong align,
        string what, Action<MemoryFdHandle>? check = null)
    {
        var ranges = layout.OrderBy(r => r.GuestAddress).ToArray();
        ulong needed = 0;
        foreach (var r in ranges)
        {
            if (r.Size == 0 || r.Size % align != 0 || r.GuestAddress % align != 0 || r.FileOffset % align != 0)
                throw new GuestMemoryException(
                    $"guest RAM range 0x{r.GuestAddress:x}+0x{r.Size:x} at offset 0x{r.FileOffset:x} of {what} is not aligned to {align} bytes");
            needed = Math.Max(needed, r.FileOffset + r.Size);
        }
        CheckLayout(ranges);
        int dup = Libc.Fcntl(fd, Libc.FDupFdCloexec, 0);
        if (dup < 0)
            throw new GuestMemoryException($"cannot duplicate {what}: fcntl(F_DUPFD_CLOEXEC) failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
        var own = new MemoryFdHandle(dup);
        try
        {
            check?.Invoke(own);
            long size = Libc.Lseek(own, 0, Libc.SeekEnd);
            if (size < 0)
                throw new GuestMemoryException($"cannot find the size of {what}: lseek failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
            if ((ulong)size < needed)
                throw new GuestMemoryException($"{what} holds {FormatSize((ulong)size)}, less than the {FormatSize(needed)} its layout needs");
        }
        catch
        {
            own.Dispose();
            throw;
        }
        return (own, ranges);
    }

    private static ulong Alignment(HugePageMode mode) => mode == HugePageMode.None ? PageSize : HugePageSize;

    /// <summary>Refuses ranges (sorted by guest address) that overlap or wrap around.</summary>
    private static void CheckLayout(GuestMemoryRange[] ranges)
    {
        for (int i = 0; i < ranges.Length; i++)
        {
            var r = ranges[i];
            if (r.GuestAddress + r.Size < r.GuestAddress || r.FileOffset + r.Size < r.FileOffset)
                throw new GuestMemoryException($"guest RAM range 0x{r.GuestAddress:x}+0x{r.Size:x} wraps around");
            if (i > 0 && r.GuestAddress < ranges[i - 1].GuestAddress + ranges[i - 1].Size)
                throw new GuestMemoryException(
                    $"guest RAM ranges 0x{ranges[i - 1].GuestAddress:x}+0x{ranges[i - 1].Size:x} and 0x{r.GuestAddress:x}+0x{r.Size:x} overlap");
        }
    }

    /// <summary>Maps every range of <paramref name="fd"/>; on failure unmaps what was mapped and closes the fd.</summary>
    private static GuestMemory MapAll(MemoryFdHandle fd, GuestMemoryRange[] ranges, HugePageMode mode, string? file, string? privateCopyOf = null)
    {
        var regions = new GuestMemoryRegion[ranges.Length];
        int mapped = 0;
        try
        {
            string what = privateCopyOf ?? (file is null ? "memfd" : $"file '{file}'");
            for (; mapped < ranges.Length; mapped++)
            {
                var r = ranges[mapped];
                regions[mapped] = new GuestMemoryRegion(r.GuestAddress, r.Size, MapRegion(fd, r.Size, r.FileOffset, mode, what, privateCopyOf is not null), r.FileOffset);
            }
            return new GuestMemory(regions, mode, fd, file, privateCopyOf);
        }
        catch
        {
            for (int i = 0; i < mapped; i++)
                Libc.Munmap(regions[i].Host, (nuint)regions[i].Size);
            fd.Dispose();
            throw;
        }
    }

    /// <summary>
    /// A memfd of <paramref name="size"/> bytes. memfd_create gives shmem (and hugetlb) files
    /// VM_NORESERVE: their size is not charged against overcommit, pages are allocated when
    /// touched, which is what MAP_NORESERVE gave the anonymous mappings before.
    /// </summary>
    private static MemoryFdHandle CreateMemfd(ulong size, HugePageMode mode)
    {
        uint flags = Libc.MfdCloexec;
        if (mode == HugePageMode.HugeTlb)
            flags |= Libc.MfdHugeTlb | Libc.MfdHuge2Mb;
        // MFD_NOEXEC_SEAL (Linux 6.3) keeps newer kernels from warning about, or refusing
        // (vm.memfd_noexec=2), an executable memfd; older kernels do not know it.
        int fd = Libc.MemfdCreate(MemfdName, flags | Libc.MfdNoExecSeal);
        if (fd < 0 && Marshal.GetLastPInvokeError() == Errno.EINVAL)
            fd = Libc.MemfdCreate(MemfdName, flags);
        if (fd < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new GuestMemoryException(mode == HugePageMode.HugeTlb
                ? $"cannot create a hugetlb memfd for {FormatSize(size)} of guest RAM: memfd_create failed: {Errno.Describe(errno)}"
                : $"cannot create a memfd for {FormatSize(size)} of guest RAM: memfd_create failed: {Errno.Describe(errno)}");
        }
        var handle = new MemoryFdHandle(fd);
        if (Libc.Ftruncate(handle, (long)size) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            handle.Dispose();
            throw new GuestMemoryException($"cannot size the guest RAM memfd to {FormatSize(size)}: ftruncate failed: {Errno.Describe(errno)}");
        }
        return handle;
    }

    /// <summary>Opens (or creates) the file that holds guest RAM and makes it at least <paramref name="size"/> bytes long.</summary>
    private static MemoryFdHandle OpenFile(string path, ulong size, HugePageMode mode)
    {
        int fd = Libc.Open(path, Libc.ORdWr | Libc.OCreat | Libc.OCloexec, 0x180 /* 0600 */);
        if (fd < 0)
            throw new GuestMemoryException($"cannot open guest memory file '{path}': {Errno.Describe(Marshal.GetLastPInvokeError())}");
        var handle = new MemoryFdHandle(fd);
        try
        {
            long fsType = Libc.FileSystemType(handle);
            if (mode == HugePageMode.HugeTlb && fsType != Libc.HugetlbfsMagic)
                throw new GuestMemoryException($"guest memory file '{path}' is not on hugetlbfs: hugetlb pages need a file on a hugetlbfs mount (or no file: a hugetlb memfd)");
            if (mode != HugePageMode.HugeTlb && fsType == Libc.HugetlbfsMagic)
                throw new GuestMemoryException($"guest memory file '{path}' is on hugetlbfs: it needs hugetlb pages");
            if (mode == HugePageMode.Transparent && fsType != Libc.TmpfsMagic)
                throw new GuestMemoryException(
                    $"guest memory file '{path}' is not on tmpfs: transparent huge pages of a file need tmpfs (mounted with huge=), or no file (a memfd)");
            long length = Libc.Lseek(handle, 0, Libc.SeekEnd);
            if (length < 0)
                throw new GuestMemoryException($"cannot find the size of guest memory file '{path}': lseek failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
            if ((ulong)length < size && Libc.Ftruncate(handle, (long)size) != 0)
                throw new GuestMemoryException(
                    $"guest memory file '{path}' holds {FormatSize((ulong)length)}, less than the {FormatSize(size)} of guest RAM, and cannot be grown: ftruncate failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
            return handle;
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Maps [offset, offset+size) of <paramref name="fd"/> MAP_SHARED (MAP_PRIVATE with
    /// <paramref name="copyOnWrite"/>). Outside hugetlb (where the
    /// kernel aligns the mapping itself) the mapping is placed at a 2 MiB-aligned address, so that
    /// shmem THP can map huge pages and KVM can use them in its page tables (guest and host
    /// addresses agree modulo 2 MiB).
    /// </summary>
    private static IntPtr MapRegion(MemoryFdHandle fd, ulong size, ulong offset, HugePageMode mode, string what, bool copyOnWrite = false)
    {
        int prot = Libc.ProtRead | Libc.ProtWrite;
        IntPtr p;
        if (mode == HugePageMode.HugeTlb)
        {
            // No MAP_NORESERVE: the pages are reserved now, so a pool that runs short fails here
            // rather than with SIGBUS when the guest touches a page.
            p = Libc.Mmap(IntPtr.Zero, (nuint)size, prot, Libc.MapShared, fd, (long)offset);
            if (p == Libc.MapFailed)
            {
                int errno = Marshal.GetLastPInvokeError();
                throw new GuestMemoryException(
                    $"cannot map {FormatSize(size)} of guest RAM from hugetlb pages ({what}, offset 0x{offset:x}): mmap failed: {Errno.Describe(errno)} (is /proc/sys/vm/nr_hugepages large enough?)");
            }
            return p;
        }

        p = MapAligned(fd, size, offset, prot, size >= HugePageSize ? HugePageSize : PageSize, out int mapErrno, copyOnWrite);
        if (p == Libc.MapFailed)
            throw new GuestMemoryException($"cannot map {FormatSize(size)} of guest RAM ({what}, offset 0x{offset:x}): mmap failed: {Errno.Describe(mapErrno)}");
        if (mode == HugePageMode.Transparent && Libc.Madvise(p, (nuint)size, Libc.MadvHugePage) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            Libc.Munmap(p, (nuint)size);
            throw new GuestMemoryException($"transparent huge pages are not available for {FormatSize(size)} of guest RAM ({what}): madvise(MADV_HUGEPAGE) failed: {Errno.Describe(errno)}");
        }
        return p;
    }

    /// <summary>mmap at an address aligned to <paramref name="align"/>: reserve more, map over it with MAP_FIXED, give back the rest.</summary>
    private static IntPtr MapAligned(MemoryFdHandle fd, ulong size, ulong offset, int prot, ulong align, out int errno, bool copyOnWrite = false)
    {
        errno = 0;
        // Private: the guest's writes copy pages into this process (MAP_NORESERVE: not charged up front).
        int flags = (copyOnWrite ? Libc.MapPrivate : Libc.MapShared) | Libc.MapNoReserve;
        if (align <= PageSize)
        {
            IntPtr plain = Libc.Mmap(IntPtr.Zero, (nuint)size, prot, flags, fd, (long)offset);
            if (plain == Libc.MapFailed)
                errno = Marshal.GetLastPInvokeError();
            return plain;
        }
        ulong span = size + align - PageSize;
        IntPtr reserved = Libc.Mmap(IntPtr.Zero, (nuint)span, Libc.ProtNone, Libc.MapPrivate | Libc.MapAnonymous | Libc.MapNoReserve, -1, 0);
        if (reserved == Libc.MapFailed)
        {
            errno = Marshal.GetLastPInvokeError();
            return reserved;
        }
        ulong start = (ulong)reserved, aligned = (start + align - 1) & ~(align - 1);
        IntPtr p = Libc.Mmap((IntPtr)(long)aligned, (nuint)size, prot, flags | Libc.MapFixed, fd, (long)offset);
        if (p == Libc.MapFailed)
        {
            errno = Marshal.GetLastPInvokeError();
            Libc.Munmap(reserved, (nuint)span);
            return p;
        }
        if (aligned > start)
            Libc.Munmap(reserved, (nuint)(aligned - start));
        ulong end = aligned + size;
        if (end < start + span)
            Libc.Munmap((IntPtr)(long)end, (nuint)(start + span - end));
        return p;
    }

    /// <summary>Refuses sizes the host cannot back in a memfd, before anything is mapped.</summary>
    public static void CheckHostCanGive(ulong size, HugePageMode mode)
    {
        if (mode == HugePageMode.HugeTlb)
        {
            // Pages reserved by other mappings count as free in HugePages_Free.
            ulong freePages = MeminfoValue("HugePages_Free"), reserved = MeminfoValue("HugePages_Rsvd");
            ulong free = (freePages > reserved ? freePages - reserved : 0) * MeminfoValue("Hugepagesize") * 1024;
            if (size > free)
                throw new GuestMemoryException(
                    $"guest memory {FormatSize(size)} needs hugetlb pages but only {FormatSize(free)} are free (raise /proc/sys/vm/nr_hugepages)");
            return;
        }
        if (mode == HugePageMode.Transparent && ShmemThpRefusal() is { } why)
            throw new GuestMemoryException(
                $"transparent huge pages for guest RAM in a memfd need shmem THP, but {why}: set it to 'advise' (or 'within_size', 'always'), or use hugetlb pages or none");
        ulong total = MeminfoValue("MemTotal") * 1024;
        if (total != 0 && size > total)
            throw new GuestMemoryException($"guest memory {FormatSize(size)} is larger than the host's memory ({FormatSize(total)})");
    }

    /// <summary>
    /// Why a memfd cannot get 2 MiB transparent huge pages on this host ("FILE is 'VALUE'"), or
    /// null when it can. The top-level shmem_enabled decides unless it says deny or force, or the
    /// 2 MiB size's own file (Linux 6.11 and later) says something other than inherit.
    /// </summary>
    public static string? ShmemThpRefusal()
    {
        string topFile = ThpDirectory + "shmem_enabled", sizeFile = ThpDirectory + "hugepages-2048kB/shmem_enabled";
        string? top = ReadBracketed(topFile);
        if (top is null)
            return $"{topFile} is missing (the kernel has no transparent huge pages)";
        if (top is "deny" or "force")
            return top == "deny" ? $"{topFile} is '{top}'" : null;
        if (ReadBracketed(sizeFile) is { } perSize && perSize != "inherit")
            return perSize is "always" or "within_size" or "advise" ? null : $"{sizeFile} is '{perSize}'";
        return top is "always" or "within_size" or "advise" ? null : $"{topFile} is '{top}'";
    }

    /// <summary>The number on a /proc/meminfo line ("MemTotal:  24576 kB" gives 24576); 0 if absent.</summary>
    private static ulong MeminfoValue(string key)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
            {
                if (line.Length <= key.Length || line[key.Length] != ':' || !line.StartsWith(key, StringComparison.Ordinal))
                    continue;
                var rest = line.AsSpan(key.Length + 1).Trim();
                int end = rest.IndexOf(' ');
                return ulong.TryParse(end < 0 ? rest : rest[..end], out ulong v) ? v : 0;
            }
        }
        catch (IOException)
        {
        }
        return 0;
    }

    /// <summary>The selected value of a sysfs choice file ("always [advise] never" gives "advise"), or null when it cannot be read.</summary>
    private static string? ReadBracketed(string path)
    {
        try
        {
            string s = File.ReadAllText(path);
            int a = s.IndexOf('['), b = s.IndexOf(']');
            return a >= 0 && b > a ? s[(a + 1)..b] : s.Trim();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>A size for messages: whole GiB or MiB when exact, else the byte count with an approximation.</summary>
    public static string FormatSize(ulong bytes) => bytes switch
    {
        >= 1UL << 30 when bytes % (1UL << 30) == 0 => $"{bytes >> 30} GiB",
        >= 1UL << 20 when bytes % (1UL << 20) == 0 => $"{bytes >> 20} MiB",
        >= 1UL << 30 => $"{bytes} bytes ({bytes / (double)(1UL << 30):0.0} GiB)",
        >= 1UL << 20 => $"{bytes} bytes ({bytes / (double)(1UL << 20):0.0} MiB)",
        _ => $"{bytes} bytes",
    };

    /// <summary>The region holding [gpa, gpa+length), or null.</summary>
    public GuestMemoryRegion? FindRegion(ulong gpa, ulong length = 1)
    {
        int i = IndexOf(gpa, length);
        return i < 0 ? null : _regions[i];
    }

    private int IndexOf(ulong gpa, ulong length)
    {
        for (int i = 0; i < _regions.Length; i++)
            if (_regions[i].Contains(gpa, length))
                return i;
        return -1;
    }

    /// <summary>True when [gpa, gpa+length) lies inside one RAM region.</summary>
    public bool IsValid(ulong gpa, ulong length) => IndexOf(gpa, length) >= 0;

    /// <summary>The host address of [gpa, gpa+length) and its region's index; throws when the range is not inside one region.</summary>
    private byte* Resolve(ulong gpa, int length, out int region)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (length < 0)
            throw new GuestMemoryException($"negative length {length} at guest address 0x{gpa:x}");
        region = IndexOf(gpa, (ulong)length);
        if (region < 0)
            throw new GuestMemoryException($"guest range 0x{gpa:x}+0x{length:x} is outside guest RAM");
        var r = _regions[region];
        return (byte*)r.Host + (gpa - r.GuestAddress);
    }

    /// <summary>A read-only span over guest RAM; throws when the range is not entirely inside one region.</summary>
    public ReadOnlySpan<byte> GetSpan(ulong gpa, int length) => new(Resolve(gpa, length, out _), length);

    /// <summary>Like <see cref="GetSpan"/>, without throwing.</summary>
    public bool TryGetSpan(ulong gpa, int length, out ReadOnlySpan<byte> span)
    {
        span = default;
        if (_disposed || length < 0)
            return false;
        var r = FindRegion(gpa, (ulong)length);
        if (r is null)
            return false;
        span = new ReadOnlySpan<byte>((byte*)r.Host + (gpa - r.GuestAddress), length);
        return true;
    }

    /// <summary>
    /// A writable span over guest RAM; throws when the range is not entirely inside one region.
    /// Its pages are marked written when it is handed out; a write that may still run when
    /// <see cref="TakeDeviceDirty"/> is called (another thread's) is marked again when done
    /// (<see cref="MarkWritten"/>), or made through <see cref="Write"/> and the WriteU* methods,
    /// which mark after writing.
    /// </summary>
    public Span<byte> GetWritableSpan(ulong gpa, int length)
    {
        byte* p = Resolve(gpa, length, out int region);
        Mark(region, gpa, (ulong)length);
        return new Span<byte>(p, length);
    }

    /// <summary>Guest RAM is handed out as Memory in windows of this size (Memory lengths are ints).</summary>
    private const ulong MemoryWindow = 1UL << 30;

    private readonly Memory<byte>[][] _windows;

    /// <summary>
    /// Appends guest RAM [gpa, gpa+length) to <paramref name="into"/> as one or more read-only
    /// Memory pieces (split where it crosses a 1 GiB window: Memory lengths are ints), for vectored
    /// I/O straight from guest RAM. Throws when the range is not inside one region. The pieces are
    /// only valid while this object is not disposed.
    /// </summary>
    public void AppendMemory(ulong gpa, ulong length, List<ReadOnlyMemory<byte>> into)
    {
        int region = RegionFor(gpa, length);
        if (length == 0)
            return;
        ulong offset = gpa - _regions[region].GuestAddress;
        while (length > 0)
        {
            ulong window = offset / MemoryWindow, within = offset % MemoryWindow;
            ulong take = Math.Min(length, MemoryWindow - within);
            into.Add(_windows[region][window].Slice((int)within, (int)take));
            offset += take;
            length -= take;
        }
    }

    /// <summary>
    /// Like <see cref="AppendMemory"/>, writable, for vectored I/O straight into guest RAM (a disk
    /// read). The pages are marked written when handed out; the writer marks them again with
    /// <see cref="MarkWritten"/> once the I/O is done, so that a <see cref="TakeDeviceDirty"/>
    /// that ran while it was in flight does not lose them.
    /// </summary>
    public void AppendWritableMemory(ulong gpa, ulong length, List<Memory<byte>> into)
    {
        int region = RegionFor(gpa, length);
        if (length == 0)
            return;
        Mark(region, gpa, length);
        ulong offset = gpa - _regions[region].GuestAddress;
        while (length > 0)
        {
            ulong window = offset / MemoryWindow, within = offset % MemoryWindow;
            ulong take = Math.Min(length, MemoryWindow - within);
            into.Add(_windows[region][window].Slice((int)within, (int)take));
            offset += take;
            length -= take;
        }
    }

    private int RegionFor(ulong gpa, ulong length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        int region = length == 0 ? 0 : IndexOf(gpa, length);
        if (region < 0)
            throw new GuestMemoryException($"guest range 0x{gpa:x}+0x{length:x} is outside guest RAM");
        return region;
    }

    /// <summary>A window of guest RAM as a Memory; the mapping outlives it (GuestMemory unmaps).</summary>
    private sealed class NativeMemory(byte* pointer, int length) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => new(pointer, length);
        public override MemoryHandle Pin(int elementIndex = 0) => new(pointer + elementIndex);
        public override void Unpin() { }
        protected override void Dispose(bool disposing) { }
    }

    /// <summary>Copies <paramref name="data"/> into guest RAM at <paramref name="gpa"/>, then marks its pages.</summary>
    public void Write(ulong gpa, ReadOnlySpan<byte> data)
    {
        data.CopyTo(new Span<byte>(Resolve(gpa, data.Length, out int region), data.Length));
        Mark(region, gpa, (ulong)data.Length);
    }

    /// <summary>Copies guest RAM at <paramref name="gpa"/> into <paramref name="destination"/>.</summary>
    public void Read(ulong gpa, Span<byte> destination) => GetSpan(gpa, destination.Length).CopyTo(destination);

    /// <summary>Zeroes guest RAM [gpa, gpa+length), then marks its pages.</summary>
    public void Clear(ulong gpa, int length)
    {
        new Span<byte>(Resolve(gpa, length, out int region), length).Clear();
        Mark(region, gpa, (ulong)length);
    }

    /// <summary>Reads a byte of guest RAM.</summary>
    public byte ReadU8(ulong gpa) => *Resolve(gpa, 1, out _);

    /// <summary>Reads a little-endian 16-bit value of guest RAM.</summary>
    public ushort ReadU16(ulong gpa) => BinaryPrimitives.ReadUInt16LittleEndian(GetSpan(gpa, 2));

    /// <summary>Reads a little-endian 32-bit value of guest RAM.</summary>
    public uint ReadU32(ulong gpa) => BinaryPrimitives.ReadUInt32LittleEndian(GetSpan(gpa, 4));

    /// <summary>Reads a little-endian 64-bit value of guest RAM.</summary>
    public ulong ReadU64(ulong gpa) => BinaryPrimitives.ReadUInt64LittleEndian(GetSpan(gpa, 8));

    /// <summary>Writes a byte of guest RAM, then marks its page.</summary>
    public void WriteU8(ulong gpa, byte v)
    {
        *Resolve(gpa, 1, out int region) = v;
        Mark(region, gpa, 1);
    }

    /// <summary>Writes a little-endian 16-bit value into guest RAM, then marks its page(s).</summary>
    public void WriteU16(ulong gpa, ushort v)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(new Span<byte>(Resolve(gpa, 2, out int region), 2), v);
        Mark(region, gpa, 2);
    }

    /// <summary>Writes a little-endian 32-bit value into guest RAM, then marks its page(s).</summary>
    public void WriteU32(ulong gpa, uint v)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(new Span<byte>(Resolve(gpa, 4, out int region), 4), v);
        Mark(region, gpa, 4);
    }

    /// <summary>Writes a little-endian 64-bit value into guest RAM, then marks its page(s).</summary>
    public void WriteU64(ulong gpa, ulong v)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(new Span<byte>(Resolve(gpa, 8, out int region), 8), v);
        Mark(region, gpa, 8);
    }

    /// <summary>Reads a 16-bit value of guest RAM with acquire semantics (Volatile.Read), for fields another CPU publishes.</summary>
    public ushort VolatileReadU16(ulong gpa) => Volatile.Read(ref *(ushort*)Resolve(gpa, 2, out _));

    /// <summary>Writes a 16-bit value into guest RAM with release semantics (Volatile.Write), then marks its page(s).</summary>
    public void VolatileWriteU16(ulong gpa, ushort v)
    {
        Volatile.Write(ref *(ushort*)Resolve(gpa, 2, out int region), v);
        Mark(region, gpa, 2);
    }

    /// <summary>
    /// Whether writes through this object are recorded in the device-dirty bitmap (off by default).
    /// Turning it on starts from a clean bitmap; turning it off drops the bitmap. KVM's dirty log
    /// does not see these writes, so whoever copies guest memory (a checkpoint, a migration round)
    /// takes both.
    /// </summary>
    public bool TrackDeviceWrites
    {
        get => Volatile.Read(ref _deviceDirty) is not null;
        set
        {
            lock (_trackingLock)
            {
                if (value == (_deviceDirty is not null))
                    return;
                Volatile.Write(ref _deviceDirty, value
                    ? _regions.Select(r => new ulong[(r.Size / PageSize + 63) / 64]).ToArray()
                    : null);
            }
        }
    }

    /// <summary>
    /// Records that [gpa, gpa+length) was written (when <see cref="TrackDeviceWrites"/> is on), for
    /// writes through a span or Memory handed out earlier that finished after being handed out.
    /// Throws when the range is not inside one region.
    /// </summary>
    public void MarkWritten(ulong gpa, ulong length)
    {
        if (length == 0)
            return;
        int region = IndexOf(gpa, length);
        if (region < 0)
            throw new GuestMemoryException($"guest range 0x{gpa:x}+0x{length:x} is outside guest RAM");
        Mark(region, gpa, length);
    }

    /// <summary>
    /// The pages written through this object since tracking started or since the last take, one
    /// bitmap per region (in <see cref="Regions"/> order, shaped like KVM's), cleared as they are
    /// read: each 64-page word is read and zeroed in one atomic step, so a page marked meanwhile is
    /// either in this result or in the next one. A page's mark follows its write (for handed-out
    /// spans: the writer's <see cref="MarkWritten"/>), so copying the pages after the take copies
    /// every write that was marked.
    /// </summary>
    public DirtyBitmap[] TakeDeviceDirty()
    {
        var dirty = Volatile.Read(ref _deviceDirty)
            ?? throw new InvalidOperationException("device writes to guest memory are not tracked (TrackDeviceWrites is off)");
        var result = new DirtyBitmap[_regions.Length];
        for (int i = 0; i < _regions.Length; i++)
        {
            var bitmap = new DirtyBitmap(_regions[i].GuestAddress, _regions[i].Size / PageSize);
            var words = dirty[i];
            for (int w = 0; w < words.Length; w++)
            {
                // Words nobody marked are not written: no locked instruction on a clean bitmap.
                if (Volatile.Read(ref words[w]) != 0)
                    bitmap.Words[w] = Interlocked.Exchange(ref words[w], 0);
            }
            result[i] = bitmap;
        }
        return result;
    }

    /// <summary>Sets the bits of the pages [gpa, gpa+length) of region <paramref name="region"/> covers, when tracking.</summary>
    private void Mark(int region, ulong gpa, ulong length)
    {
        var dirty = Volatile.Read(ref _deviceDirty);
        if (dirty is null || length == 0)
            return;
        var words = dirty[region];
        ulong offset = gpa - _regions[region].GuestAddress;
        ulong first = offset / PageSize, last = (offset + length - 1) / PageSize;
        for (ulong w = first / 64; w <= last / 64; w++)
        {
            int lo = w == first / 64 ? (int)(first % 64) : 0;
            int hi = w == last / 64 ? (int)(last % 64) : 63;
            ulong mask = (hi == 63 ? ulong.MaxValue : (1UL << (hi + 1)) - 1) & ~((1UL << lo) - 1);
            Interlocked.Or(ref words[w], mask);
        }
    }

    /// <summary>Unmaps guest RAM and closes this object's fd (the backing lives on while another process maps it).</summary>
    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        foreach (var r in _regions)
            Libc.Munmap(r.Host, (nuint)r.Size);
        _fd.Dispose();
    }
}
