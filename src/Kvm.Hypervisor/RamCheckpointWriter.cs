using Kvm.Interop.Native;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Hypervisor;

/// <summary>How far a checkpoint has saved guest RAM.</summary>
/// <param name="Faults">Writes (by a vCPU through KVM, by a device, by the VMM) that waited for their page to be saved first.</param>
/// <param name="BytesOnWrite">Bytes saved because they were about to be written.</param>
/// <param name="BytesInBackground">Bytes the background writer saved.</param>
/// <param name="BytesWritten">Bytes written to the file: the rest were pages of zeros, left as holes.</param>
/// <param name="BytesTotal">All of guest RAM.</param>
/// <param name="Seconds">From the protection to the last chunk saved, once done; null before.</param>
public sealed record RamCheckpointStats(long Faults, long BytesOnWrite, long BytesInBackground, long BytesWritten, long BytesTotal, double? Seconds)
{
    public bool Done => Seconds is not null;
}

/// <summary>
/// Guest RAM saved as it was at one instant while the guest runs on (a live checkpoint). Every
/// region is registered with a <see cref="Userfaultfd"/> in write-protect mode beforehand; at the
/// instant (the guest stopped), <see cref="Protect"/> write-protects it all, which takes a time
/// that grows with the RAM mapped, not with its content. From then on a write to a page not yet
/// saved, whoever makes it (a vCPU, through KVM; KVM itself; a device; the kernel reading a disk
/// into RAM for the VMM), waits while a fault thread saves the chunk holding it
/// (<see cref="ChunkSize"/>) and lifts its protection; a background writer saves the other chunks
/// in address order. So the file gets every page as it was at the instant. Pages are read from the
/// RAM's own file (<see cref="GuestMemory.BackingFd"/>), so a page never touched reads as zeros
/// without being allocated; pages of zeros are left as holes in the file.
/// <para>
/// The fault thread and the background writer are the shim's native threads
/// (<c>kvmshim_cow_*</c>), for the reason the lazy restore's are: a managed thread blocked in a
/// write fault cannot be stopped for a garbage collection, and a managed fault thread could wait
/// for that collection. On an error (the file cannot be written: a full or read-only disk) the
/// protection is lifted everywhere at once, so the guest never waits on a checkpoint that failed;
/// <see cref="WaitDone"/> then returns false and <see cref="Failure"/> says why.
/// </para>
/// </summary>
public sealed class RamCheckpointWriter : IDisposable
{
    /// <summary>What a write saves: 64 KiB around it (fewer faults for a guest that writes on), 2 MiB on hugetlb pages.</summary>
    public const int ChunkSize = 64 << 10;

    private const int WaitDoneResult = 1, WaitFailedResult = 2;

    private readonly GuestMemory _memory;
    private readonly Userfaultfd _uffd;
    private readonly SafeFileHandle _file;
    private readonly string _fileName;
    private readonly IntPtr _writer;
    private readonly ReaderWriterLockSlim _gate = new();    // readers use _writer; Dispose frees it under the write lock
    private bool _disposed;
    private int _disposing;
    private RamCheckpointStats? _final;

    private RamCheckpointWriter(GuestMemory memory, Userfaultfd uffd, SafeFileHandle file, string fileName, IntPtr writer)
    {
        _memory = memory;
        _uffd = uffd;
        _file = file;
        _fileName = fileName;
        _writer = writer;
    }

    /// <summary>Why this kernel or process cannot take a live checkpoint of RAM, or null when it can.</summary>
    public static string? Refusal()
    {
        try
        {
            using var u = Userfaultfd.Open(KvmShim.UffdFeatureWpHugetlbfsShmem);
            return null;
        }
        catch (Exception e) when (e is HypervisorException or KvmIoctlException)
        {
            return $"a live checkpoint needs userfaultfd write-protection of shared memory (Linux 5.19 or later): {e.Message}";
        }
    }

    /// <summary>
    /// Registers <paramref name="memory"/> for a checkpoint into <paramref name="file"/> (named
    /// <paramref name="fileName"/> in errors; the caller's, open until this writer is disposed),
    /// region i's bytes at <paramref name="fileOffsets"/>[i]. Nothing is protected yet: do this
    /// before stopping the guest, and <see cref="Protect"/> with it stopped. Refused while another
    /// userfaultfd holds the memory (a lazy restore, a working-set trace).
    /// </summary>
    public static RamCheckpointWriter Register(GuestMemory memory, SafeFileHandle file, string fileName, IReadOnlyList<ulong> fileOffsets)
    {
        var regions = memory.Regions;
        if (fileOffsets.Count != regions.Count)
            throw new ArgumentException($"{fileOffsets.Count} file offsets for {regions.Count} RAM regions", nameof(fileOffsets));
        var hosts = new ulong[regions.Count];
        var sizes = new ulong[regions.Count];
        var ramOffsets = new ulong[regions.Count];
        for (int i = 0; i < regions.Count; i++)
            (hosts[i], sizes[i], ramOffsets[i]) = ((ulong)regions[i].Host, regions[i].Size, regions[i].FileOffset);
        ulong chunk = memory.HugePages == HugePageMode.HugeTlb ? 2UL << 20 : ChunkSize;
        var uffd = Userfaultfd.Open(KvmShim.UffdFeatureWpHugetlbfsShmem);
        int registered = 0;
        try
        {
            foreach (var r in regions)
            {
                int rc = KvmShim.UffdRegister(uffd.Handle, (ulong)r.Host, r.Size, KvmShim.UffdRegisterWriteProtect, out _);
                if (rc == -Errno.EBUSY)
                    throw new InvalidOperationException("guest RAM is held by another userfaultfd (a lazy restore still loading, or a working-set trace): take the checkpoint once it is over");
                Errno.Check(rc, "UFFDIO_REGISTER (write-protect)");
                registered++;
            }
            Errno.Check(KvmShim.CowStart(uffd.Handle, memory.BackingFd, file, chunk, hosts, sizes, ramOffsets, fileOffsets.ToArray(), regions.Count,
                out IntPtr native), "start the checkpoint's fault thread");
            return new RamCheckpointWriter(memory, uffd, file, fileName, native);
        }
        catch
        {
            for (int i = 0; i < registered; i++)
                KvmShim.UffdUnregister(uffd.Handle, (ulong)regions[i].Host, regions[i].Size);
            uffd.Dispose();
            throw;
        }
    }

    /// <summary>Write-protects all of guest RAM: the file gets RAM as it is now. Call with the guest stopped.</summary>
    public void Protect() => Errno.Check(KvmShim.CowProtect(_writer), "UFFDIO_WRITEPROTECT (guest RAM)");

    /// <summary>
    /// Starts the background writer, at most <paramref name="bytesPerSecond"/> (null: as fast as
    /// it can). Until it is done, the guest's writes to pages not yet saved wait for their chunk.
    /// </summary>
    public void Start(long? bytesPerSecond = null)
    {
        if (bytesPerSecond <= 0)
            throw new ArgumentOutOfRangeException(nameof(bytesPerSecond), bytesPerSecond, "a checkpoint's write rate must be positive");
        Errno.Check(KvmShim.CowBackground(_writer, bytesPerSecond ?? -1), "start the checkpoint's background writer");
    }

    public RamCheckpointStats Stats
    {
        get
        {
            _gate.EnterReadLock();
            try
            {
                return _disposed ? _final! : StatsOf(Counters());
            }
            finally
            {
                _gate.ExitReadLock();
            }
        }
    }

    private RamCheckpointStats StatsOf(long[] c) =>
        new(c[0], c[1], c[2], c[3], (long)_memory.TotalSize, c[6] == 0 ? null : c[6] / 1e9);

    private long[] Counters()
    {
        var c = new long[KvmShim.CowStatCount];
        KvmShim.CowStats(_writer, c);
        return c;
    }

    /// <summary>Why the writing ended early (the file could not be written), or null.</summary>
    public Exception? Failure
    {
        get
        {
            long errno;
            _gate.EnterReadLock();
            try
            {
                errno = _disposed ? _finalErrno : Counters()[7];
            }
            finally
            {
                _gate.ExitReadLock();
            }
            return errno == 0 ? null
                : new IOException($"checkpoint of guest RAM into {_fileName} failed: {Errno.Describe((int)errno)} (errno {errno}); the guest runs on unprotected");
        }
    }

    private long _finalErrno;

    /// <summary>Waits until every chunk is saved; false on timeout, or when the writing failed (<see cref="Failure"/>) or was stopped.</summary>
    public bool WaitDone(TimeSpan timeout)
    {
        // Waiting in the shim (a P/Invoke) does not hold up a garbage collection; Dispose stops
        // the writer, which ends the wait, before it takes the write lock to free it.
        _gate.EnterReadLock();
        try
        {
            if (_disposed)
                return _final?.Done ?? false;
            return KvmShim.CowWait(_writer, timeout == Timeout.InfiniteTimeSpan ? -1 : (long)Math.Ceiling(timeout.TotalMilliseconds)) == WaitDoneResult;
        }
        finally
        {
            _gate.ExitReadLock();
        }
    }

    /// <summary>Stops writing (a checkpoint not done is then incomplete), lifts the protection and lets the memory go.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposing, 1) != 0)
            return;
        KvmShim.CowStop(_writer);           // lifts the protection, joins the native threads; waiters return
        _gate.EnterWriteLock();
        try
        {
            var c = Counters();
            _final = StatsOf(c);
            _finalErrno = c[7];
            _disposed = true;
            KvmShim.CowFree(_writer);
        }
        finally
        {
            _gate.ExitWriteLock();
        }
        _uffd.Dispose();
        GC.KeepAlive(_file);                // the caller's, used by the native threads until here
    }
}
