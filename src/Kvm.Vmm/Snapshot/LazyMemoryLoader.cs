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
/// vCPU through KVM, or by a device worker) waits while a fault thread reads its chunk
/// (<see cref="ChunkSize"/>) from the memory file and fills it in; meanwhile a background
/// loader fills every chunk not yet there, in batches, and when all are there it unregisters the
/// regions and RAM is ordinary memory again. Pages of zeros in the file are filled with zeros
/// without a copy. Chunks named first (a working set recorded at the save) are loaded before the
/// vCPUs start.
/// </summary>
public sealed class LazyMemoryLoader : IDisposable
{
    /// <summary>What a touch brings in: 64 KiB around it (fewer faults for a guest that reads on).</summary>
    public const int ChunkSize = 64 << 10;

    private const int NotLoaded = 0, Loading = 1, Loaded = 2;

    private readonly GuestMemory _memory;
    private readonly SnapshotMemoryFile _file;
    private readonly Userfaultfd _uffd;
    private readonly ILogger _log;
    private readonly int[][] _chunks;          // per region, per chunk: NotLoaded, Loading, Loaded
    private readonly long _totalChunks;
    private long _loadedChunks;
    private long _faults, _bytesOnTouch, _bytesFirst, _bytesBackground;
    private readonly long _started = Stopwatch.GetTimestamp();
    private long _finished;
    private volatile bool _stopping;
    private Thread? _faultThread, _backgroundThread;
    private readonly ManualResetEventSlim _done = new();
    private int _unregistered;

    private LazyMemoryLoader(GuestMemory memory, SnapshotMemoryFile file, Userfaultfd uffd, ILogger log)
    {
        _memory = memory;
        _file = file;
        _uffd = uffd;
        _log = log;
        _chunks = memory.Regions.Select(r => new int[(r.Size + ChunkSize - 1) / ChunkSize]).ToArray();
        _totalChunks = _chunks.Sum(c => (long)c.Length);
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
        var uffd = Userfaultfd.Open();
        try
        {
            foreach (var r in memory.Regions)
                uffd.Register(r.Host, r.Size, KvmShim.UffdRegisterMissing);
            var loader = new LazyMemoryLoader(memory, file, uffd, log);
            loader._faultThread = new Thread(loader.FaultLoop) { IsBackground = true, Name = "ram faults" };
            loader._faultThread.Start();
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
        var buffer = AllocateBuffer();
        foreach (var range in ranges)
        {
            ulong start = range.FirstPage * SnapshotFormat.PageSize, end = range.EndPage * SnapshotFormat.PageSize;
            for (ulong gpa = start - start % ChunkSize; gpa < end; gpa += ChunkSize)
                if (Locate(gpa, out int region, out int chunk))
                    Interlocked.Add(ref _bytesFirst, Load(region, chunk, buffer));
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
        _backgroundThread = new Thread(() => BackgroundLoop(backgroundBytesPerSecond)) { IsBackground = true, Name = "ram loader", Priority = ThreadPriority.BelowNormal };
        _backgroundThread.Start();
    }

    public LazyLoadStats Stats
    {
        get
        {
            long finished = Interlocked.Read(ref _finished);
            return new LazyLoadStats(Interlocked.Read(ref _faults), Interlocked.Read(ref _bytesOnTouch), Interlocked.Read(ref _bytesFirst),
                Interlocked.Read(ref _bytesBackground), (long)_memory.TotalSize,
                finished == 0 ? null : Stopwatch.GetElapsedTime(_started, finished).TotalSeconds);
        }
    }

    /// <summary>
    /// Called (on a loader thread) when a chunk cannot be loaded: the guest cannot go on. Set after
    /// a failure, it is called at once with it.
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

    private void Fail(Exception e)
    {
        if (Interlocked.CompareExchange(ref _failure, e, null) is null)
            _failedHandler?.Invoke(e);
    }

    /// <summary>Waits until every chunk is in; false on timeout.</summary>
    public bool WaitDone(TimeSpan timeout) => _done.Wait(timeout);

    private bool Locate(ulong gpa, out int region, out int chunk)
    {
        var regions = _memory.Regions;
        for (region = 0; region < regions.Count; region++)
        {
            var r = regions[region];
            if (gpa >= r.GuestAddress && gpa < r.End)
            {
                chunk = (int)((gpa - r.GuestAddress) / ChunkSize);
                return true;
            }
        }
        chunk = -1;
        return false;
    }

    private bool LocateHost(ulong host, out int region, out int chunk)
    {
        var regions = _memory.Regions;
        for (region = 0; region < regions.Count; region++)
        {
            var r = regions[region];
            ulong start = (ulong)r.Host;
            if (host >= start && host < start + r.Size)
            {
                chunk = (int)((host - start) / ChunkSize);
                return true;
            }
        }
        chunk = -1;
        return false;
    }

    /// <summary>Loads one chunk unless another thread loads or loaded it; returns the bytes this call loaded.</summary>
    private long Load(int region, int chunk, byte[] buffer)
    {
        if (Interlocked.CompareExchange(ref _chunks[region][chunk], Loading, NotLoaded) != NotLoaded)
            return 0;
        var r = _memory.Regions[region];
        ulong offset = (ulong)chunk * ChunkSize;
        int length = (int)Math.Min(ChunkSize, r.Size - offset);
        var bytes = buffer.AsSpan(0, length);
        _file.Read(r.GuestAddress + offset, bytes);
        IntPtr host = r.Host + (nint)offset;
        bool zero = !bytes.ContainsAnyExcept((byte)0);
        ulong at = 0;
        while (at < (ulong)length)
        {
            long done = zero
                ? _uffd.Zero(host + (nint)at, (ulong)length - at)
                : _uffd.Copy(host + (nint)at, bytes[(int)at..]);
            at += (ulong)done;      // 0: the kernel asked to try again
        }
        Volatile.Write(ref _chunks[region][chunk], Loaded);
        if (Interlocked.Increment(ref _loadedChunks) == _totalChunks)
            Finish();
        return length;
    }

    private void Finish()
    {
        Interlocked.Exchange(ref _finished, Stopwatch.GetTimestamp());
        Unregister();
        _done.Set();
        SnapshotLog.LazyLoadDone(_log, GuestMemory.FormatSize(_memory.TotalSize), Stats.Seconds ?? 0, Interlocked.Read(ref _faults));
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

    private void FaultLoop()
    {
        var buffer = AllocateBuffer();
        Span<UserFault> faults = stackalloc UserFault[64];
        try
        {
            while (!_stopping)
            {
                if (!_uffd.WaitForFaults(100))
                    continue;
                int n = _uffd.ReadFaults(faults);
                for (int i = 0; i < n; i++)
                {
                    Interlocked.Increment(ref _faults);
                    ulong page = faults[i].Address & ~((ulong)SnapshotFormat.PageSize - 1);
                    if (!LocateHost(page, out int region, out int chunk))
                        continue;
                    long loaded = Load(region, chunk, buffer);
                    Interlocked.Add(ref _bytesOnTouch, loaded);
                    SnapshotLog.LazyFault(_log, faults[i].Address, faults[i].Write ? "write" : "read", loaded);
                    if (loaded == 0)
                    {
                        // Another thread loads it: its fill wakes the waiter. Once it is in, wake anyway.
                        var slot = _chunks[region];
                        int index = chunk;
                        SpinWait.SpinUntil(() => Volatile.Read(ref slot[index]) == Loaded || _stopping);
                        _uffd.Wake((IntPtr)(long)page, SnapshotFormat.PageSize);
                    }
                }
            }
        }
        catch (Exception e)
        {
            // Whatever went wrong, no thread may wait for a page forever: unregistering wakes every
            // waiter, whose fault then maps a page of zeros. The guest cannot go on (Failed stops
            // it), but the VMM does, and a restore still in progress ends.
            SnapshotLog.LazyLoadFailed(_log, "fault", $"{e.GetType().Name}: {e.Message}");
            Unregister();
            Fail(e);
        }
    }

    private void BackgroundLoop(long? bytesPerSecond)
    {
        var buffer = AllocateBuffer();
        long started = Stopwatch.GetTimestamp(), loaded = 0;
        try
        {
            for (int region = 0; region < _chunks.Length && !_stopping; region++)
                for (int chunk = 0; chunk < _chunks[region].Length && !_stopping; chunk++)
                {
                    long n = Load(region, chunk, buffer);
                    Interlocked.Add(ref _bytesBackground, n);
                    loaded += n;
                    if (bytesPerSecond is { } rate && n > 0)
                    {
                        var ahead = TimeSpan.FromSeconds((double)loaded / rate) - Stopwatch.GetElapsedTime(started);
                        if (ahead > TimeSpan.FromMilliseconds(1))
                            Thread.Sleep(ahead);
                    }
                }
        }
        catch (Exception e)
        {
            SnapshotLog.LazyLoadFailed(_log, "background", $"{e.GetType().Name}: {e.Message}");
            Unregister();
            Fail(e);
        }
    }

    private static byte[] AllocateBuffer() => GC.AllocateUninitializedArray<byte>(ChunkSize, pinned: true);

    /// <summary>Stops loading (the VM is going away) and gives the memory file back; RAM not loaded reads as zeros from then on.</summary>
    public void Dispose()
    {
        _stopping = true;
        _backgroundThread?.Join();
        _faultThread?.Join();
        Unregister();
        _uffd.Dispose();
        _file.Dispose();
        _done.Dispose();
    }
}

internal static partial class SnapshotLog
{
    [LoggerMessage(EventId = 1401, Level = LogLevel.Information, Message = "lazy restore: all {Size} of guest RAM loaded in {Seconds:0.###} s ({Faults} touches waited)")]
    public static partial void LazyLoadDone(ILogger logger, string size, double seconds, long faults);

    [LoggerMessage(EventId = 1403, Level = LogLevel.Trace, Message = "lazy restore: fault at 0x{Address:x} ({Flags}): {Bytes} bytes loaded")]
    public static partial void LazyFault(ILogger logger, ulong address, string flags, long bytes);

    [LoggerMessage(EventId = 1402, Level = LogLevel.Error, Message = "lazy restore: the {Thread} loader failed: {Error}")]
    public static partial void LazyLoadFailed(ILogger logger, string thread, string error);
}
