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
