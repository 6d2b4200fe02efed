using System.Diagnostics;
using Kvm.Hypervisor;
using Kvm.Interop.Native;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Snapshot;

/// <summary>How far a lazy restore has brought guest RAM in.</summary>
/// <param name="Faults">Touches (by a vCPU, through KVM, or by a device) that waited for their chunk.</param>
/// <param name="BytesOnTouch">Bytes loaded because they were touched.</param>
/// <param name="BytesFirst">Bytes loaded before the vCPUs started (the working set).</param>
/// <param name="BytesInBackground">Bytes the background loader brought in.</param>
/// <param name="BytesTotal">All of guest RAM.</param>
/// <param name="Seconds">From the start of loading to the last byte, once done; null before.</param>
public sealed record LazyLoadStats(long Faults, long BytesOnTouch, long BytesFirst, long BytesInBackground, long BytesTotal, double? Seconds)
{
    public bool Done => Seconds is not null;
}

/// <summary>
/// Guest RAM brought in from a snapshot's memory file while the guest runs. Every RAM region is
/// registered with a <see cref="Userfaultfd"/> in missing mode: the first touch of a page (by a
/// vCPU through KVM, by a device worker or by the VMM) waits while a fault thread reads its chunk
/// (<see cref="ChunkSize"/>) from the memory file and fills it in; meanwhile a background loader
/// fills every chunk not yet there, in address order, and when all are there the regions are
/// unregistered and RAM is ordinary memory again. Pages of zeros are filled without a copy. Chunks
/// named first (a working set recorded at the save) are loaded before the vCPUs start.
/// <para>
/// The fault thread and the background loader are the shim's native threads
/// (<c>kvmshim_lazy_*</c>), not managed ones: a managed thread of the VMM that touches a page not
/// yet loaded blocks in the fault where the runtime cannot stop it for a garbage collection, and a
/// managed fault thread could then wait for that collection, which waits for the blocked thread.
/// A managed watcher only waits (in the shim) for the end, to log it or report a failure.
/// </para>
/// </summary>
public sealed class LazyMemoryLoader : IDisposable
{
    /// <summary>What a touch brings in: 64 KiB around it (fewer faults for a guest that reads on).</summary>
    public const int ChunkSize = 64 << 10;

    private const int WaitDoneResult = 1, WaitFailedResult = 2;

    private readonly GuestMemory _memory;
    private readonly SnapshotMemoryFile _file;
    private readonly Userfaultfd _uffd;
    private readonly ILogger _log;
    private readonly IntPtr _loader;
    private readonly ReaderWriterLockSlim _gate = new();    // readers use _loader; Dispose frees it under the write lock
    private readonly Thread _watcher;
    private bool _disposed;
    private int _disposing;

    private LazyMemoryLoader(GuestMemory memory, SnapshotMemoryFile file, Userfaultfd uffd, IntPtr loader, ILogger log)
    {
        _memory = memory;
        _file = file;
        _uffd = uffd;
        _loader = loader;
        _log = log;
        _watcher = new Thread(Watch) { IsBackground = true, Name = "ram load watch" };
    }

    /// <summary>
    /// Registers <paramref name="memory"/> (fresh: nothing of it touched yet) for loading from
    /// <paramref name="file"/>, which this loader owns from here on. Nothing is loaded until
    /// <see cref="LoadFirst"/> or <see cref="Start"/>, but a page touched is loaded from here on:
    /// the fault thread starts at once, because restoring the vCPUs' state already touches guest
    /// RAM (KVM writes the kvmclock, steal-time and PV EOI pages a Linux guest set up, from inside
    /// the ioctls that restore their MSRs), and those writes would wait forever for a fault thread
    /// that starts only with the vCPUs.
    /// </summary>
    public static LazyMemoryLoader Register(GuestMemory memory, SnapshotMemoryFile file, ILogger log)
    {
        if (memory.HugePages == HugePageMode.HugeTlb)
            throw new ArgumentException("a guest on hugetlb pages cannot be restored lazily (its pages are filled 2 MiB at a time): restore it with --memory eager");
        var regions = memory.Regions;
        var hosts = new ulong[regions.Count];
        var sizes = new ulong[regions.Count];
        var offsets = new ulong[regions.Count];
        for (int i = 0; i < regions.Count; i++)
        {
            var r = regions[i];
            SnapshotRegion? found = null;
            foreach (var candidate in file.State.Regions)
                if (r.GuestAddress >= candidate.GuestAddress && r.End <= candidate.GuestAddress + candidate.Size)
                    found = candidate;
            if (found is not { } s)
                throw new ArgumentException($"guest RAM at 0x{r.GuestAddress:x} ({GuestMemory.FormatSize(r.Size)}) is not inside one region of the memory file {file.Path}");
            (hosts[i], sizes[i], offsets[i]) = ((ulong)r.Host, r.Size, s.FileOffset + (r.GuestAddress - s.GuestAddress));
        }
        var uffd = Userfaultfd.Open();
        try
        {
            foreach (var r in regions)
                uffd.Register(r.Host, r.Size, KvmShim.UffdRegisterMissing);
            Errno.Check(KvmShim.LazyStart(uffd.Handle, file.Handle, ChunkSize, hosts, sizes, offsets, regions.Count, out IntPtr native),
                "start the lazy restore's fault thread");
            var loader = new LazyMemoryLoader(memory, file, uffd, native, log);
            loader._watcher.Start();
            return loader;
        }
        catch
        {
            uffd.Dispose();
            throw;
        }
    }

    /// <summary>Loads the chunks holding <paramref name="ranges"/> (guest page ranges) now, before the vCPUs start.</summary>
    public void LoadFirst(IEnumerable<GuestPageRange> ranges)
    {
        var regions = _memory.Regions;
        foreach (var range in ranges)
        {
            ulong start = range.FirstPage * SnapshotFormat.PageSize, end = range.EndPage * SnapshotFormat.PageSize;
            for (int i = 0; i < regions.Count; i++)
            {
                var r = regions[i];
                ulong from = Math.Max(start, r.GuestAddress), to = Math.Min(end, r.End);
                if (from >= to)
                    continue;
                long n = KvmShim.LazyLoad(_loader, i, from - r.GuestAddress, to - from);
                if (n < 0)
                    throw new IOException($"lazy restore from {_file.Path}: loading the working set at guest 0x{from:x} failed: {Errno.Describe((int)-n)}");
            }
        }
    }

    /// <summary>
    /// Starts the background loader, which brings in at most
    /// <paramref name="backgroundBytesPerSecond"/> (null: as fast as it can; 0: none, so only what
    /// is touched is ever loaded and the loader never finishes).
    /// </summary>
    public void Start(long? backgroundBytesPerSecond = null)
    {
        if (backgroundBytesPerSecond < 0)
            throw new ArgumentOutOfRangeException(nameof(backgroundBytesPerSecond), backgroundBytesPerSecond, "a rate is not negative");
        if (backgroundBytesPerSecond == 0)
            return;
        Errno.Check(KvmShim.LazyBackground(_loader, backgroundBytesPerSecond ?? -1), "start the lazy restore's background loader");
    }

    public LazyLoadStats Stats => Counters() is { } c
        ? new LazyLoadStats(c[0], c[1], c[2], c[3], (long)_memory.TotalSize, c[6] == 0 ? null : c[6] / 1e9)
        : _final!;

    /// <summary>The shim's counters (kvmshim_lazy_stats: [7] is the errno that ended the loading); null once disposed.</summary>
    private long[]? Counters()
    {
        _gate.EnterReadLock();
        try
        {
            if (_disposed)
                return null;
            var c = new long[KvmShim.LazyStatCount];
            KvmShim.LazyStats(_loader, c);
            return c;
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    private LazyLoadStats? _final;

    /// <summary>
    /// Called (on the watcher thread) when a chunk cannot be loaded: the guest cannot go on. Set
    /// after a failure, it is called at once with it.
    /// </summary>
    public Action<Exception>? Failed
    {
        get => _failedHandler;
        set
        {
            _failedHandler = value;
            if (value is not null && Volatile.Read(ref _failure) is { } failure)
                value(failure);
        }
    }

    private Action<Exception>? _failedHandler;
    private Exception? _failure;

    /// <summary>Waits until every chunk is in; false on timeout, or when the loading failed or was stopped.</summary>
    public bool WaitDone(TimeSpan timeout)
    {
        _gate.EnterReadLock();
        try
        {
            if (_disposed)
                return _final?.Done ?? false;
            return KvmShim.LazyWait(_loader, timeout == Timeout.InfiniteTimeSpan ? -1 : (long)Math.Ceiling(timeout.TotalMilliseconds)) == WaitDoneResult;
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    private void Watch()
    {
        int result;
        _gate.EnterReadLock();
        try
        {
            if (_disposed)
                return;
            // Returns when all is in, on a failure, or once Dispose stops the loader.
            result = KvmShim.LazyWait(_loader, -1);
        }
        finally
        {
            _gate.ExitReadLock();
        }
        if (result == WaitDoneResult)
        {
            var stats = Stats;
            SnapshotLog.LazyLoadDone(_log, GuestMemory.FormatSize(_memory.TotalSize), stats.Seconds ?? 0, stats.Faults);
        }
        else if (result == WaitFailedResult)
        {
            // Dispose frees the loader only after this thread ends (or on it, after this).
            int errno = (int)Counters()![7];
            // The shim unregistered guest RAM: a page not loaded reads as zeros, so the guest cannot go on.
            var e = new IOException($"lazy restore from {_file.Path} failed: {(errno == Errno.ENODATA ? "the memory file was cut short after it was checked" : Errno.Describe(errno))} " +
                                    $"(errno {errno}); guest RAM not loaded by then reads as zeros");
            SnapshotLog.LazyLoadFailed(_log, "native", e.Message);
            if (Interlocked.CompareExchange(ref _failure, e, null) is null)
                _failedHandler?.Invoke(e);
        }
    }

    /// <summary>Stops loading (the VM is going away) and gives the memory file back; RAM not loaded reads as zeros from then on.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposing, 1) != 0)
            return;
        KvmShim.LazyStop(_loader);          // joins the native threads; waiters return
        if (Thread.CurrentThread != _watcher)
            _watcher.Join();
        var final = Stats;
        _gate.EnterWriteLock();
        try
        {
            _final = final;
            _disposed = true;
            KvmShim.LazyFree(_loader);
        }
        finally
        {
            _gate.ExitWriteLock();
        }
        _uffd.Dispose();
        _file.Dispose();
    }
}

internal static partial class SnapshotLog
{
    [LoggerMessage(EventId = 1401, Level = LogLevel.Information, Message = "lazy restore: all {Size} of guest RAM loaded in {Seconds:0.###} s ({Faults} touches waited)")]
    public static partial void LazyLoadDone(ILogger logger, string size, double seconds, long faults);

    [LoggerMessage(EventId = 1402, Level = LogLevel.Error, Message = "lazy restore: the {Thread} loader failed: {Error}")]
    public static partial void LazyLoadFailed(ILogger logger, string thread, string error);
}
