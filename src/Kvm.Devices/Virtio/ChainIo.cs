using Kvm.Hypervisor;

namespace Kvm.Devices.Virtio;

/// <summary>
/// Moving bytes between a device and the guest buffers of a descriptor chain's segments, which were
/// checked to lie in guest RAM when the chain was taken from its queue. Writes mark the guest pages
/// written (the dirty log sees only the vCPUs' writes).
/// </summary>
public static class ChainIo
{
    [ThreadStatic]
    private static List<Memory<byte>>? t_buffers;

    [ThreadStatic]
    private static List<ReadOnlyMemory<byte>>? t_sources;

    /// <summary>
    /// The guest RAM holding <paramref name="length"/> bytes of a chain's segments from
    /// <paramref name="skip"/> bytes in, as writable Memory pieces (the calling worker's list; clear
    /// it after use, and mark the range written once written: <see cref="MarkWritten"/>). The chain
    /// was checked to lie in guest RAM when it was taken from the queue.
    /// </summary>
    public static List<Memory<byte>> CollectWritable(GuestMemory memory, ReadOnlySpan<ChainSegment> segments, ulong skip, ulong length)
    {
        var list = t_buffers ??= new List<Memory<byte>>();
        list.Clear();
        ForEachRange(segments, skip, length, (memory, list), static (a, n, s) => s.memory.AppendWritableMemory(a, n, s.list));
        return list;
    }

    /// <summary>Like <see cref="CollectWritable"/>, read-only pieces (the calling worker's other list).</summary>
    public static List<ReadOnlyMemory<byte>> CollectReadable(GuestMemory memory, ReadOnlySpan<ChainSegment> segments, ulong skip, ulong length)
    {
        var list = t_sources ??= new List<ReadOnlyMemory<byte>>();
        list.Clear();
        ForEachRange(segments, skip, length, (memory, list), static (a, n, s) => s.memory.AppendMemory(a, n, s.list));
        return list;
    }

    /// <summary>Marks the guest pages of <paramref name="length"/> bytes of the segments from <paramref name="skip"/> in as written by the device.</summary>
    public static void MarkWritten(GuestMemory memory, ReadOnlySpan<ChainSegment> segments, ulong skip, ulong length) =>
        ForEachRange(segments, skip, length, memory, static (a, n, m) => m.MarkWritten(a, n));

    /// <summary>Calls <paramref name="action"/> with each guest range (address, length) holding <paramref name="length"/> bytes of the segments from <paramref name="skip"/> in.</summary>
    public static void ForEachRange<TState>(ReadOnlySpan<ChainSegment> segments, ulong skip, ulong length, TState state, Action<ulong, ulong, TState> action)
    {
        foreach (var seg in segments)
        {
            if (length == 0)
                break;
            if (skip >= seg.Length)
            {
                skip -= seg.Length;
                continue;
            }
            ulong take = Math.Min(seg.Length - skip, length);
            action(seg.Address + skip, take, state);
            length -= take;
            skip = 0;
        }
    }

    /// <summary>Copies bytes from the device-readable segments, starting <paramref name="skip"/> bytes in.</summary>
    public static void Gather(GuestMemory memory, ReadOnlySpan<ChainSegment> segments, ulong skip, Span<byte> into)
    {
        var pieces = CollectReadable(memory, segments, skip, (ulong)into.Length);
        foreach (var p in pieces)
        {
            p.Span.CopyTo(into);
            into = into[p.Length..];
        }
        pieces.Clear();
    }

    /// <summary>Copies bytes into the device-writable segments, starting <paramref name="skip"/> bytes in.</summary>
    public static void Scatter(GuestMemory memory, ReadOnlySpan<ChainSegment> segments, ulong skip, ReadOnlySpan<byte> from)
    {
        ulong length = (ulong)from.Length;
        var pieces = CollectWritable(memory, segments, skip, length);
        foreach (var p in pieces)
        {
            from[..p.Length].CopyTo(p.Span);
            from = from[p.Length..];
        }
        pieces.Clear();
        MarkWritten(memory, segments, skip, length);
    }

}
