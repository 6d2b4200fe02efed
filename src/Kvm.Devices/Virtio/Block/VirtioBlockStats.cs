using System.Diagnostics;

namespace Kvm.Devices.Virtio.Block;

/// <summary>
/// What a virtio-blk device has served: requests by type (failed ones counted apart), bytes moved
/// by successful reads and writes, and the time requests took from being taken off the queue to
/// their status being written (microseconds: the total, and the longest one).
/// </summary>
public sealed record VirtioBlockStats(
    long Reads, long Writes, long Flushes, long Discards, long WriteZeroes, long Other, long Failed,
    long BytesRead, long BytesWritten, long IoErrors, long TotalMicroseconds, long MaxMicroseconds)
{
    public long Requests => Reads + Writes + Flushes + Discards + WriteZeroes + Other;

    /// <summary>The mean time per request, in microseconds (0 before the first request).</summary>
    public double MeanMicroseconds => Requests == 0 ? 0 : (double)TotalMicroseconds / Requests;
}

/// <summary>The counters behind <see cref="VirtioBlockStats"/>, bumped by every queue worker at once.</summary>
internal sealed class VirtioBlockCounters
{
    private long _reads, _writes, _flushes, _discards, _writeZeroes, _other, _failed, _bytesRead, _bytesWritten, _ticks, _maxTicks;

    public void Count(uint type, byte status, ulong bytes, long ticks)
    {
        switch (type)
        {
            case VirtioBlock.TypeIn: Interlocked.Increment(ref _reads); break;
            case VirtioBlock.TypeOut: Interlocked.Increment(ref _writes); break;
            case VirtioBlock.TypeFlush: Interlocked.Increment(ref _flushes); break;
            case VirtioBlock.TypeDiscard: Interlocked.Increment(ref _discards); break;
            case VirtioBlock.TypeWriteZeroes: Interlocked.Increment(ref _writeZeroes); break;
            default: Interlocked.Increment(ref _other); break;
        }
        if (status != VirtioBlock.StatusOk)
            Interlocked.Increment(ref _failed);
        else if (type == VirtioBlock.TypeIn)
            Interlocked.Add(ref _bytesRead, (long)bytes);
        else if (type == VirtioBlock.TypeOut)
            Interlocked.Add(ref _bytesWritten, (long)bytes);
        Interlocked.Add(ref _ticks, ticks);
        long max = Volatile.Read(ref _maxTicks);
        while (ticks > max)
        {
            long seen = Interlocked.CompareExchange(ref _maxTicks, ticks, max);
            if (seen == max)
                break;
            max = seen;
        }
    }

    public VirtioBlockStats Snapshot(long ioErrors) => new(
        Interlocked.Read(ref _reads), Interlocked.Read(ref _writes), Interlocked.Read(ref _flushes),
        Interlocked.Read(ref _discards), Interlocked.Read(ref _writeZeroes), Interlocked.Read(ref _other),
        Interlocked.Read(ref _failed), Interlocked.Read(ref _bytesRead), Interlocked.Read(ref _bytesWritten), ioErrors,
        Micro(Interlocked.Read(ref _ticks)), Micro(Volatile.Read(ref _maxTicks)));

    private static long Micro(long ticks) => ticks * 1_000_000 / Stopwatch.Frequency;
}
