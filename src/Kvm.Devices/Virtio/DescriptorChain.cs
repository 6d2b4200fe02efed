namespace Kvm.Devices.Virtio;

/// <summary>One buffer of a descriptor chain: a guest-physical range checked to lie inside guest RAM.</summary>
public readonly record struct ChainSegment(ulong Address, uint Length, bool Writable);

/// <summary>
/// A descriptor chain taken from a virtqueue, flattened (indirect tables followed) and checked:
/// every segment is inside guest RAM, device-readable segments come before device-writable ones,
/// and the chain is no longer than the queue. One instance per queue is reused for every chain.
/// </summary>
public sealed class DescriptorChain
{
    private ChainSegment[] _segments = new ChainSegment[16];

    /// <summary>The head descriptor index, which goes back in the used ring.</summary>
    public ushort Head { get; internal set; }

    public int Count { get; private set; }

    /// <summary>Segments before this index are device-readable; from it on, device-writable.</summary>
    public int FirstWritable { get; private set; }

    public ulong ReadableBytes { get; private set; }
    public ulong WritableBytes { get; private set; }

    public ReadOnlySpan<ChainSegment> Segments => _segments.AsSpan(0, Count);
    public ReadOnlySpan<ChainSegment> Readable => _segments.AsSpan(0, FirstWritable);
    public ReadOnlySpan<ChainSegment> Writable => _segments.AsSpan(FirstWritable, Count - FirstWritable);

    internal void Clear(ushort head)
    {
        Head = head;
        Count = 0;
        FirstWritable = 0;
        ReadableBytes = 0;
        WritableBytes = 0;
    }

    internal void Add(in ChainSegment segment)
    {
        if (Count == _segments.Length)
            Array.Resize(ref _segments, _segments.Length * 2);
        _segments[Count++] = segment;
        if (segment.Writable)
            WritableBytes += segment.Length;
        else
        {
            FirstWritable = Count;
            ReadableBytes += segment.Length;
        }
    }
}
