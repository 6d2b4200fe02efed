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
/// page costs one fault and its content never moves. <see cref="Stop"/> unregisters the regions:
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
public sealed class TouchTracer : IDisposable
{
    private readonly GuestMemory _memory;
    private readonly Userfaultfd _uffd;
    private readonly ulong _granule;
    private readonly bool _hugetlb;
    private readonly HashSet<ulong> _hostPages = [];   // the fault thread's alone until it ends
    private readonly byte[]? _zeros;                    // hugetlb: UFFDIO_ZEROPAGE does not exist there
    private readonly Thread _thread;
    private volatile bool _stopping;
    private long _minor, _missing;
    private string? _error;
    private int _unregistered;
    private TouchTrace? _result;

    private TouchTracer(GuestMemory memory, Userfaultfd uffd)
    {
        _memory = memory;
        _uffd = uffd;
        _hugetlb = memory.HugePages == HugePageMode.HugeTlb;
        _granule = _hugetlb ? GuestMemory.HugePageSize : GuestMemory.PageSize;
        if (_hugetlb)
            _zeros = GC.AllocateArray<byte>((int)GuestMemory.HugePageSize, pinned: true);
        _thread = new Thread(FaultLoop) { IsBackground = true, Name = "ram touch tracer" };
    }

    /// <summary>Touches so far (each a page's first touch since <see cref="Start"/>).</summary>
    public long Faults => Interlocked.Read(ref _minor) + Interlocked.Read(ref _missing);

    /// <summary>
    /// Starts tracing the touches of <paramref name="memory"/>. Best called while nothing touches
    /// it (the VM paused): a touch racing with the start may go unrecorded.
    /// </summary>
    public static TouchTracer Start(GuestMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        bool hugetlb = memory.HugePages == HugePageMode.HugeTlb;
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
        int registered = 0;
        try
        {
            foreach (var r in memory.Regions)
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
            // Drop the page table entries; the pages stay in the page cache, and KVM drops its
            // mappings of them (MMU notifier), so the next touch of each page by anyone faults.
            foreach (var r in memory.Regions)
                if (Libc.Madvise(r.Host, (nuint)r.Size, Libc.MadvDontNeed) != 0)
                    throw new TouchTraceUnavailableException(
                        $"madvise(MADV_DONTNEED) of guest RAM at 0x{r.GuestAddress:x} failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
        }
        catch
        {
            for (int i = 0; i < registered; i++)
            {
                var r = memory.Regions[i];
                try { uffd.Unregister(r.Host, r.Size); }
                catch (KvmIoctlException) { /* it goes with the fd */ }
            }
            uffd.Dispose();
            throw;
        }
        tracer._thread.Start();
        return tracer;
    }

    /// <summary>Ends the trace (RAM is ordinary memory again) and returns what it saw; called again, returns the same.</summary>
    public TouchTrace Stop()
    {
        if (_result is { } done)
            return done;
        _stopping = true;
        _thread.Join();
        Unregister();
        // Touches read after the end were woken by the unregister: they count, they need nothing more.
        Drain(resolve: false);
        var pages = new List<ulong>(_hostPages.Count * (int)(_granule / GuestMemory.PageSize));
        foreach (ulong host in _hostPages)
            if (GuestPageOf(host) is { } first)
                for (ulong p = 0; p < _granule / GuestMemory.PageSize; p++)
                    pages.Add(first + p);
        pages.Sort();
        _result = new TouchTrace([.. pages], Interlocked.Read(ref _minor), Interlocked.Read(ref _missing), _error);
        _uffd.Dispose();
        return _result;
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

    private void FaultLoop()
    {
        try
        {
            while (!_stopping)
                if (_uffd.WaitForFaults(50))
                    Drain(resolve: true);
            Drain(resolve: true);
        }
        catch (Exception e) when (e is KvmIoctlException or HypervisorException)
        {
            // Whoever waits on a fault must not wait for ever: RAM becomes ordinary memory again.
            _error = e.Message;
            Unregister();
        }
    }

    private void Drain(bool resolve)
    {
        Span<UserFault> faults = stackalloc UserFault[64];
        int n;
        while ((n = _uffd.ReadFaults(faults)) > 0)
        {
            for (int i = 0; i < n; i++)
            {
                ulong page = faults[i].Address & ~(_granule - 1);
                _hostPages.Add(page);
                Interlocked.Increment(ref faults[i].Minor ? ref _minor : ref _missing);
                if (resolve)
                    Resolve((IntPtr)(long)page, faults[i].Minor);
            }
        }
    }

    /// <summary>Maps the page again (minor) or fills it with zeros (missing), then wakes whoever waits there.</summary>
    private void Resolve(IntPtr page, bool minor)
    {
        if (minor)
        {
            try
            {
                _uffd.Continue(page, _granule);
            }
            catch (KvmIoctlException e) when (e.ErrorNumber is Errno.EFAULT or Errno.ENOENT)
            {
                minor = false;      // the page left the page cache meanwhile: it reads as zeros
            }
        }
        if (!minor)
        {
            if (_zeros is null)
                _uffd.Zero(page, _granule);
            else
                _uffd.Copy(page, _zeros);
        }
        // A page filled by another path meanwhile (EEXIST) woke nobody: wake them here.
        _uffd.Wake(page, _granule);
    }

    private void Unregister()
    {
        if (Interlocked.Exchange(ref _unregistered, 1) != 0)
            return;
        foreach (var r in _memory.Regions)
        {
            try { _uffd.Unregister(r.Host, r.Size); }
            catch (KvmIoctlException) { /* the mapping is going away */ }
        }
    }

    public void Dispose() => Stop();
}
