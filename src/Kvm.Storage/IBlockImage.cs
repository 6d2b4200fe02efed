namespace Kvm.Storage;

/// <summary>What a range of a disk image holds, as <see cref="IBlockImage.GetAllocation"/> reports it.</summary>
public enum ExtentKind
{
    /// <summary>Data stored in this image.</summary>
    Data,
    /// <summary>Reads as zeros and is recorded so in this image (a zero cluster, or a hole in a raw file).</summary>
    Zero,
    /// <summary>Not stored here: reads come from the backing image (or zeros when there is none).</summary>
    Unallocated,
}

/// <summary>A run of guest-visible bytes with one kind; <c>Depth</c> counts backing layers (0 = this image).</summary>
public readonly record struct Extent(ulong Offset, ulong Length, ExtentKind Kind, int Depth = 0);

/// <summary>
/// A virtual disk: a guest-visible byte range backed by an image file. Every call may run on any
/// thread, several at once. Offsets and lengths beyond <see cref="Size"/> are refused with
/// <see cref="ArgumentOutOfRangeException"/>; damaged images raise <see cref="ImageFormatException"/>.
/// </summary>
public interface IBlockImage : IDisposable
{
    /// <summary>The file this image lives in.</summary>
    string Path { get; }

    /// <summary>Guest-visible size in bytes.</summary>
    ulong Size { get; }

    bool ReadOnly { get; }

    /// <summary>The image this one reads unallocated ranges from, if any.</summary>
    IBlockImage? Backing { get; }

    void Read(ulong offset, Span<byte> destination);

    void Write(ulong offset, ReadOnlySpan<byte> source);

    /// <summary>
    /// Reads consecutive bytes from <paramref name="offset"/> into several buffers in turn
    /// (scatter). Formats without a vectored path read up to 1 MiB as one request into a bounce
    /// buffer: one request costs far less than one per buffer.
    /// </summary>
    void Read(ulong offset, IReadOnlyList<Memory<byte>> destinations)
    {
        long total = 0;
        foreach (var d in destinations)
            total += d.Length;
        if (destinations.Count > 1 && total <= VectorBounceLimit)
        {
            byte[] bounce = System.Buffers.ArrayPool<byte>.Shared.Rent((int)total);
            try
            {
                Read(offset, bounce.AsSpan(0, (int)total));
                int at = 0;
                foreach (var d in destinations)
                {
                    bounce.AsSpan(at, d.Length).CopyTo(d.Span);
                    at += d.Length;
                }
            }
            finally
            {
                System.Buffers.ArrayPool<byte>.Shared.Return(bounce);
            }
            return;
        }
        foreach (var d in destinations)
        {
            Read(offset, d.Span);
            offset += (ulong)d.Length;
        }
    }

    /// <summary>Writes several buffers in turn as consecutive bytes from <paramref name="offset"/> (gather).</summary>
    void Write(ulong offset, IReadOnlyList<ReadOnlyMemory<byte>> sources)
    {
        long total = 0;
        foreach (var s in sources)
            total += s.Length;
        if (sources.Count > 1 && total <= VectorBounceLimit)
        {
            byte[] bounce = System.Buffers.ArrayPool<byte>.Shared.Rent((int)total);
            try
            {
                int at = 0;
                foreach (var s in sources)
                {
                    s.Span.CopyTo(bounce.AsSpan(at));
                    at += s.Length;
                }
                Write(offset, bounce.AsSpan(0, (int)total));
            }
            finally
            {
                System.Buffers.ArrayPool<byte>.Shared.Return(bounce);
            }
            return;
        }
        foreach (var s in sources)
        {
            Write(offset, s.Span);
            offset += (ulong)s.Length;
        }
    }

    /// <summary>Vectored requests up to this size go through one bounce buffer in the default implementation.</summary>
    const int VectorBounceLimit = 1 << 20;

    /// <summary>Makes the range read as zeros (without writing zero bytes where the format can say so).</summary>
    void WriteZeroes(ulong offset, ulong length);

    /// <summary>
    /// Tells the image the range is no longer needed and may be freed. Afterwards the range reads
    /// as zeros where the format can record that (raw files, qcow2 version 3), as qemu does; in a
    /// qcow2 version 2 image with a backing file it reads as the backing image's data.
    /// </summary>
    void Discard(ulong offset, ulong length);

    /// <summary>Makes every completed write durable.</summary>
    void Flush();

    /// <summary>The extents of [offset, offset+length) in order, merged where adjacent and alike.</summary>
    IReadOnlyList<Extent> GetAllocation(ulong offset, ulong length);
}

/// <summary>An image file is malformed: the message names the file, the field or offset, and the value.</summary>
public sealed class ImageFormatException : Exception
{
    public ImageFormatException(string message) : base(message) { }
    public ImageFormatException(string message, Exception inner) : base(message, inner) { }
}
