using System.Runtime.InteropServices;

namespace Kvm.Interop.Native;

/// <summary>userfaultfd(2): guest RAM filled on first touch, touches traced. Each returns -errno on failure.</summary>
public static unsafe partial class KvmShim
{
    /// <summary>UFFDIO_REGISTER modes.</summary>
    public const ulong UffdRegisterMissing = 1, UffdRegisterWriteProtect = 2, UffdRegisterMinor = 4;

    /// <summary>uffd_msg.arg.pagefault.flags.</summary>
    public const ulong UffdPagefaultWrite = 1, UffdPagefaultWriteProtect = 2, UffdPagefaultMinor = 4;

    /// <summary>UFFDIO_API features.</summary>
    public const ulong UffdFeatureMissingHugetlbfs = 1 << 4, UffdFeatureMissingShmem = 1 << 5, UffdFeatureMinorHugetlbfs = 1 << 9,
        UffdFeatureMinorShmem = 1 << 10, UffdFeaturePagefaultFlagWp = 1 << 0, UffdFeatureWpHugetlbfsShmem = 1 << 12;

    /// <summary>UFFDIO_WRITEPROTECT modes: protect (else lift the protection and wake the waiters), do not wake.</summary>
    public const ulong UffdWriteProtectModeWp = 1, UffdWriteProtectModeDontWake = 2;

    /// <summary>UFFDIO_COPY/ZEROPAGE/CONTINUE mode: do not wake the faulting threads (a UFFDIO_WAKE follows).</summary>
    public const ulong UffdDontWake = 1;

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_create")]
    public static partial int UffdCreate();

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_api")]
    public static partial int UffdApi(Handles.UserfaultfdHandle fd, ref ulong features, out ulong ioctls);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_register")]
    public static partial int UffdRegister(Handles.UserfaultfdHandle fd, ulong start, ulong length, ulong mode, out ulong ioctls);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_unregister")]
    public static partial int UffdUnregister(Handles.UserfaultfdHandle fd, ulong start, ulong length);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_copy")]
    public static partial int UffdCopy(Handles.UserfaultfdHandle fd, ulong dst, ulong src, ulong length, ulong mode, out long done);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_zeropage")]
    public static partial int UffdZeropage(Handles.UserfaultfdHandle fd, ulong start, ulong length, ulong mode, out long done);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_continue")]
    public static partial int UffdContinue(Handles.UserfaultfdHandle fd, ulong start, ulong length, ulong mode, out long done);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_wake")]
    public static partial int UffdWake(Handles.UserfaultfdHandle fd, ulong start, ulong length);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_writeprotect")]
    public static partial int UffdWriteProtect(Handles.UserfaultfdHandle fd, ulong start, ulong length, ulong mode);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_read_faults")]
    public static partial int UffdReadFaults(Handles.UserfaultfdHandle fd, ulong* addresses, ulong* flags, int max);

    /// <summary>
    /// Starts a native thread that records and resolves the faults of <paramref name="fd"/> (its
    /// ranges registered for minor and missing faults); a native thread, because a managed one
    /// could wait for a garbage collection that waits for a thread blocked in a fault.
    /// </summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_trace_start")]
    public static partial int UffdTraceStart(Handles.UserfaultfdHandle fd, ulong granule, int hugetlb, ulong* starts, ulong* lengths, int nranges, out IntPtr trace);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_trace_faults")]
    public static partial long UffdTraceFaults(IntPtr trace);

    /// <summary>Ends the trace (and frees it): the pages recorded (free them with <see cref="UffdTraceFree"/>), the fault counts and the errno that ended it early.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_trace_stop")]
    public static partial int UffdTraceStop(IntPtr trace, out ulong* pages, out ulong count, out long minor, out long missing, out int error);

    [LibraryImport(Library, EntryPoint = "kvmshim_uffd_trace_free")]
    public static partial void UffdTraceFree(ulong* pages);

    /// <summary>
    /// Starts loading guest RAM lazily from a snapshot's memory file (<paramref name="file"/>,
    /// region i's bytes at <paramref name="fileOffsets"/>[i]) into the ranges registered with
    /// <paramref name="fd"/> in missing mode, <paramref name="chunk"/> bytes at a time: a native
    /// fault thread starts at once (a managed one could wait for a garbage collection that waits
    /// for a thread blocked in a fault). Both descriptors must stay open until <see cref="LazyStop"/>.
    /// </summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_start")]
    public static partial int LazyStart(Handles.UserfaultfdHandle fd, Microsoft.Win32.SafeHandles.SafeFileHandle file, ulong chunk,
        ulong[] hosts, ulong[] sizes, ulong[] fileOffsets, int nregions, out IntPtr loader);

    /// <summary>Loads the chunks holding [offset, offset + length) of region <paramref name="region"/> on the calling thread; the bytes this call loaded, or -errno.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_load")]
    public static partial long LazyLoad(IntPtr loader, int region, ulong offset, ulong length);

    /// <summary>Starts the background loader: at most <paramref name="bytesPerSecond"/> (negative: no limit).</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_background")]
    public static partial int LazyBackground(IntPtr loader, long bytesPerSecond);

    /// <summary>The loader's counters (<see cref="LazyStatCount"/> of them; see the shim).</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_stats")]
    public static partial void LazyStats(IntPtr loader, [Out] long[] counters);

    /// <summary>How many counters <see cref="LazyStats"/> fills.</summary>
    public const int LazyStatCount = 8;

    /// <summary>Waits up to <paramref name="timeoutMs"/> (negative: no limit): 1 all loaded, 2 failed, 3 stopped, 0 timed out.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_wait")]
    public static partial int LazyWait(IntPtr loader, long timeoutMs);

    /// <summary>Stops the loader's threads and unregisters its ranges; it stays valid for stats until <see cref="LazyFree"/>.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_stop")]
    public static partial void LazyStop(IntPtr loader);

    [LibraryImport(Library, EntryPoint = "kvmshim_lazy_free")]
    public static partial void LazyFree(IntPtr loader);

    /// <summary>
    /// Prepares a checkpoint of guest RAM: the ranges registered with <paramref name="fd"/> in
    /// write-protect mode, region i's RAM at <paramref name="ramOffsets"/>[i] in
    /// <paramref name="ram"/>, saved to <paramref name="file"/> at <paramref name="fileOffsets"/>[i],
    /// <paramref name="chunk"/> bytes at a time. Its native fault thread starts at once (see the
    /// shim); nothing is protected until <see cref="CowProtect"/>. The descriptors must stay open
    /// until <see cref="CowStop"/>.
    /// </summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_cow_start")]
    public static partial int CowStart(Handles.UserfaultfdHandle fd, Handles.MemoryFdHandle ram, Microsoft.Win32.SafeHandles.SafeFileHandle file,
        ulong chunk, ulong[] hosts, ulong[] sizes, ulong[] ramOffsets, ulong[] fileOffsets, int nregions, out IntPtr writer);

    /// <summary>Write-protects every range: RAM as it is now is what the file gets.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_cow_protect")]
    public static partial int CowProtect(IntPtr writer);

    /// <summary>Starts the background writer: at most <paramref name="bytesPerSecond"/> (negative: no limit).</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_cow_background")]
    public static partial int CowBackground(IntPtr writer, long bytesPerSecond);

    /// <summary>The writer's counters (<see cref="CowStatCount"/> of them; see the shim).</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_cow_stats")]
    public static partial void CowStats(IntPtr writer, [Out] long[] counters);

    public const int CowStatCount = 8;

    /// <summary>Waits up to <paramref name="timeoutMs"/> (negative: no limit): 1 all saved, 2 failed, 3 stopped, 0 timed out.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_cow_wait")]
    public static partial int CowWait(IntPtr writer, long timeoutMs);

    /// <summary>Stops the writer's threads, lifts the protection and unregisters the ranges; it stays valid for stats until <see cref="CowFree"/>.</summary>
    [LibraryImport(Library, EntryPoint = "kvmshim_cow_stop")]
    public static partial void CowStop(IntPtr writer);

    [LibraryImport(Library, EntryPoint = "kvmshim_cow_free")]
    public static partial void CowFree(IntPtr writer);
}
