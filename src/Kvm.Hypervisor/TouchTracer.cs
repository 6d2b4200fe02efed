using System.Runtime.InteropServices;
using Kvm.Interop.Native;

namespace Kvm.Hypervisor;

/// <summary>Touches of guest RAM cannot be traced here: the kernel, the process's rights or the RAM's backing do not allow it.</summary>
public sealed class TouchTraceUnavailableException : HypervisorException
{
    public TouchTraceUnavailableException(string message) : base(message) { }
    public TouchTraceUnavailableException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>What a <see cref="TouchTracer"/> saw.</summary>
/// <param name="GuestPages">The guest page numbers (guest address / 4096) touched, ascending, each once.</param>
/// <param name="MinorFaults">Touches of pages that held data (resolved by mapping the page again).</param>
/// <param name="MissingFaults">Touches of pages never written before (resolved with a page of zeros).</param>
/// <param name="Error">Why the trace ended early (the pages after it were not seen), or null.</param>
public sealed record TouchTrace(ulong[] GuestPages, long MinorFaults, long MissingFaults, string? Error);

/// <summary>
/// Traces which pages of guest RAM are touched (read or written) while it runs, by anyone: the
/// vCPUs (KVM faults their pages in through get_user_pages, which takes the same path), device
/// threads and the VMM itself. It uses userfaultfd's minor mode on the shared mapping of the RAM's
/// memfd (or tmpfs or hugetlbfs file): <see cref="Start"/> registers every region (minor faults,
/// and missing faults for pages never written) and drops the page table entries with
/// MADV_DONTNEED, which keeps the pages in the page cache and makes KVM drop its own mappings
/// (MMU notifier). Each first touch of a page then waits while the fault thread records it and
/// maps the page again (UFFDIO_CONTINUE; a page never written gets zeros, as it would have), so a
/// page costs one fault and its content never moves. The fault thread is native (the shim's): a
/// managed one could wait for a garbage collection that waits for a managed thread blocked in a
/// traced fault. <see cref="Stop"/> unregisters the regions:
/// from then on RAM is ordinary memory again.
/// <para>
/// Needs a userfaultfd that handles the kernel's faults (root or CAP_SYS_PTRACE,
/// vm.unprivileged_userfaultfd=1, or /dev/userfaultfd), UFFD_FEATURE_MINOR_SHMEM (Linux 5.14) or,
/// on hugetlb pages, UFFD_FEATURE_MINOR_HUGETLBFS (5.13), and RAM on shmem or hugetlbfs: RAM in a
/// file on another file system cannot be traced. Each refusal is a
/// <see cref="TouchTraceUnavailableException"/> naming the reason, before anything is changed.
/// The regions must not be registered with another userfaultfd (a lazy restore still loading).
/// On hugetlb pages a touch maps, and so records, a whole 2 MiB page.
/// </para>
/// </summary>
public sealed unsafe class TouchTracer : IDisposable
{
    private readonly GuestMemory _memory;
    private readonly Userfaultfd _uffd;
    private readonly ulong _granule;
    private IntPtr _trace;                   // the native fault thread's trace (kvmshim_uffd_trace_*)
    private TouchTrace? _result;
    private readonly Lock _lock = new();

    private TouchTracer(GuestMemory memory, Userfaultfd uffd)
    {
        _memory = memory;
        _uffd = uffd;
        _granule = memory.HugePages == HugePageMode.HugeTlb ? GuestMemory.HugePageSize : GuestMemory.PageSize;
    }

    /// <summary>Touches so far (each a page's first touch since <see cref="Start"/>).</summary>
    public long Faults
    {
        get
        {
            lock (_lock)
                return _trace == IntPtr.Zero ? (_result is { } r ? r.MinorFaults + r.MissingFaults : 0) : KvmShim.UffdTraceFaults(_trace);
        }
    }

    /// <summary>
    /// Starts tracing the touches of <paramref name="memory"/>. Best called while nothing touches
    /// it (the VM paused): a touch racing with the start may go unrecorded.
    /// </summary>
    public static TouchTracer Start(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        bool hugetlb = memory.HugePages == HugePageMode.HugeTlb;
        if (memory.PrivateCopyOf is { } copyOf)
            throw new TouchTraceUnavailableException($"guest RAM is a private copy-on-write mapping of {copyOf}: userfaultfd minor faults (how touches are traced) need shared memory");
        long fsType = Libc.FileSystemType(memory.BackingFd);
        if (fsType != Libc.TmpfsMagic && fsType != Libc.HugetlbfsMagic)
            throw new TouchTraceUnavailableException(memory.BackingFile is { } file
                ? $"guest RAM is in the file '{file}', which is not on tmpfs or hugetlbfs: userfaultfd minor faults (how touches are traced) need shared memory"
                : $"guest RAM's backing is not shared memory (statfs type 0x{fsType:x}): userfaultfd minor faults (how touches are traced) need tmpfs or hugetlbfs");

        ulong minorFeature = hugetlb ? KvmShim.UffdFeatureMinorHugetlbfs : KvmShim.UffdFeatureMinorShmem;
        ulong missingFeature = hugetlb ? KvmShim.UffdFeatureMissingHugetlbfs : KvmShim.UffdFeatureMissingShmem;
        Userfaultfd uffd;
        try
        {
            uffd = Userfaultfd.Open(minorFeature | missingFeature);
        }
        catch (Exception e) when (e is HypervisorException or KvmIoctlException)
        {
            string what = hugetlb ? "UFFD_FEATURE_MINOR_HUGETLBFS (Linux 5.13)" : "UFFD_FEATURE_MINOR_SHMEM (Linux 5.14)";
            throw new TouchTraceUnavailableException($"touches of guest RAM cannot be traced: a userfaultfd with {what}: {e.Message}", e);
        }

        var tracer = new TouchTracer(memory, uffd);
        var regions = memory.Regions;
        int registered = 0;
        try
        {
            foreach (var r in regions)
            {
                try
                {
                    uffd.Register(r.Host, r.Size, KvmShim.UffdRegisterMinor | KvmShim.UffdRegisterMissing);
                }
                catch (KvmIoctlException e)
                {
                    throw new TouchTraceUnavailableException(e.ErrorNumber == Errno.EBUSY
                        ? $"guest RAM at 0x{r.GuestAddress:x} is registered with another userfaultfd already (a lazy restore still loading it?)"
                        : $"guest RAM at 0x{r.GuestAddress:x} ({GuestMemory.FormatSize(r.Size)}) cannot be registered for minor faults: {e.Message}", e);
                }
                registered++;
            }
            var starts = new ulong[regions.Count];
            var lengths = new ulong[regions.Count];
            for (int i = 0; i < regions.Count; i++)
                (starts[i], lengths[i]) = ((ulong)regions[i].Host, regions[i].Size);
            fixed (ulong* s = starts, l = lengths)
                Errno.Check(KvmShim.UffdTraceStart(uffd.Handle, tracer._granule, hugetlb ? 1 : 0, s, l, regions.Count, out tracer._trace), "start the fault thread");
            // Drop the page table entries; the pages stay in the page cache, and KVM drops its
            // mappings of them (MMU notifier), so the next touch of each page by anyone faults.
            foreach (var r in regions)
                if (Libc.Madvise(r.Host, (nuint)r.Size, Libc.MadvDontNeed) != 0)
                    throw new TouchTraceUnavailableException(
                        $"madvise(MADV_DONTNEED) of guest RAM at 0x{r.GuestAddress:x} failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
        }
        catch (Exception e) when (e is TouchTraceUnavailableException or KvmIoctlException)
        {
            if (tracer._trace != IntPtr.Zero)
                tracer.Stop();      // unregisters and closes
            else
            {
                for (int i = 0; i < registered; i++)
                {
                    var r = regions[i];
                    try { uffd.Unregister(r.Host, r.Size); }
                    catch (KvmIoctlException) { /* it goes with the fd */ }
                }
                uffd.Dispose();
            }
            if (e is KvmIoctlException)
                throw new TouchTraceUnavailableException($"touches of guest RAM cannot be traced: {e.Message}", e);
            throw;
        }
        return tracer;
    }

    /// <summary>Ends the trace (RAM is ordinary memory again) and returns what it saw; called again, returns the same.</summary>
    public TouchTrace Stop()
    {
        lock (_lock)
        {
            if (_result is { } done)
                return done;
            Errno.Check(KvmShim.UffdTraceStop(_trace, out ulong* hostPages, out ulong count, out long minor, out long missing, out int error), "stop the fault thread");
            _trace = IntPtr.Zero;
            var seen = new HashSet<ulong>();
            try
            {
                for (ulong i = 0; i < count; i++)
                    if (GuestPageOf(hostPages[i]) is { } first)
                        for (ulong p = 0; p < _granule / GuestMemory.PageSize; p++)
                            seen.Add(first + p);
            }
            finally
            {
                KvmShim.UffdTraceFree(hostPages);
            }
            ulong[] pages = [.. seen];
            Array.Sort(pages);
            _result = new TouchTrace(pages, minor, missing, error == 0 ? null : $"the fault thread failed: {Errno.Describe(error)} (errno {error})");
            _uffd.Dispose();
            return _result;
        }
    }

    private ulong? GuestPageOf(ulong host)
    {
        foreach (var r in _memory.Regions)
        {
            ulong start = (ulong)r.Host;
            if (host >= start && host - start < r.Size)
                return (r.GuestAddress + (host - start)) / GuestMemory.PageSize;
        }
        return null;
    }

    public void Dispose() => Stop();
}
