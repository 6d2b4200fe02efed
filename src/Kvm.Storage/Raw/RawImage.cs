using System.Runtime.InteropServices;
using Kvm.Interop.Native;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Storage.Raw;

/// <summary>
/// A raw disk image: the guest-visible bytes are the file's bytes. I/O is positional
/// (<see cref="RandomAccess"/>), so any number of threads may read and write at once. Ranges that
/// read as zeros are kept as holes in the file where the filesystem allows it.
/// </summary>
public sealed class RawImage : IBlockImage
{
    /// <summary>The largest buffer written at once when a filesystem cannot punch holes.</summary>
    private const int ZeroChunk = 1 << 20;

    private readonly SafeFileHandle _handle;
    private int _punchUnsupported; // 1 once the filesystem has refused FALLOC_FL_PUNCH_HOLE

    private RawImage(string path, SafeFileHandle handle, ulong size, bool readOnly)
    {
        Path = path;
        _handle = handle;
        Size = size;
        ReadOnly = readOnly;
    }

    public string Path { get; }

    public ulong Size { get; private set; }

    public bool ReadOnly { get; }

    public IBlockImage? Backing => null;

    /// <summary>Grows the image; the new range reads as zeros (the file stays sparse).</summary>
    public void Resize(ulong newSize)
    {
        if (ReadOnly)
            throw new InvalidOperationException($"image {Path} is open read-only");
        if (newSize < Size)
            throw new ArgumentException($"image {Path}: shrinking from {Size} to {newSize} bytes is not supported");
        RandomAccess.SetLength(_handle, (long)newSize);
        Size = newSize;
    }

    /// <summary>Creates a new sparse raw image of <paramref name="size"/> bytes; refuses an existing file.</summary>
    public static RawImage Create(string path, ulong size)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (size > long.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(size), size, $"raw image size {size} is larger than a file can be");
        var full = System.IO.Path.GetFullPath(path);
        if (File.Exists(full) || Directory.Exists(full))
            throw new IOException($"cannot create raw image {full}: the file already exists");
        var handle = File.OpenHandle(full, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.Read);
        try
        {
            RandomAccess.SetLength(handle, (long)size);
            return new RawImage(full, handle, size, readOnly: false);
        }
        catch
        {
            handle.Dispose();
            File.Delete(full);
            throw;
        }
    }

    /// <summary>Opens an existing raw image; its size is the file's length.</summary>
    public static RawImage Open(string path, bool readOnly = false)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = System.IO.Path.GetFullPath(path);
        return FromHandle(full, File.OpenHandle(full, FileMode.Open,
            readOnly ? FileAccess.Read : FileAccess.ReadWrite,
            readOnly ? FileShare.ReadWrite : FileShare.Read), readOnly);
    }

    /// <summary>A raw image on a file already opened (and locked) by <see cref="ImageFile.Open"/>; takes the handle.</summary>
    internal static RawImage FromHandle(string fullPath, SafeFileHandle handle, bool readOnly)
    {
        try
        {
            var length = RandomAccess.GetLength(handle);
            return new RawImage(fullPath, handle, (ulong)length, readOnly);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    public void Read(ulong offset, Span<byte> destination)
    {
        CheckRange(offset, (ulong)destination.Length);
        var done = 0;
        while (done < destination.Length)
        {
            var n = RandomAccess.Read(_handle, destination[done..], (long)offset + done);
            if (n <= 0)
                break; // end of file: the rest of a sparse (or shortened) file reads as zeros
            done += n;
        }
        if (done < destination.Length)
            destination[done..].Clear();
    }

    public void Write(ulong offset, ReadOnlySpan<byte> source)
    {
        CheckWritable();
        CheckRange(offset, (ulong)source.Length);
        if (source.IsEmpty)
            return;
        RandomAccess.Write(_handle, source, (long)offset);
    }

    /// <summary>One preadv for all the buffers; what lies past the end of the file reads as zeros.</summary>
    public void Read(ulong offset, IReadOnlyList<Memory<byte>> destinations)
    {
        long total = 0;
        foreach (var d in destinations)
            total += d.Length;
        CheckRange(offset, (ulong)total);
        long done = RandomAccess.Read(_handle, destinations, (long)offset);
        if (done >= total)
            return;
        // A short read: finish buffer by buffer (end of file zero-fills).
        long at = 0;
        foreach (var d in destinations)
        {
            if (at + d.Length > done)
            {
                int skip = (int)Math.Max(0, done - at);
                Read(offset + (ulong)(at + skip), d.Span[skip..]);
            }
            at += d.Length;
        }
    }

    /// <summary>One pwritev for all the buffers.</summary>
    public void Write(ulong offset, IReadOnlyList<ReadOnlyMemory<byte>> sources)
    {
        CheckWritable();
        long total = 0;
        foreach (var s in sources)
            total += s.Length;
        CheckRange(offset, (ulong)total);
        if (total > 0)
            RandomAccess.Write(_handle, sources, (long)offset);
    }

    public void WriteZeroes(ulong offset, ulong length)
    {
        CheckWritable();
        CheckRange(offset, length);
        if (length == 0)
            return;
        if (Volatile.Read(ref _punchUnsupported) == 0)
        {
            if (Libc.Fallocate(_handle, Libc.FallocFlPunchHole | Libc.FallocFlKeepSize, (long)offset, (long)length) == 0)
                return;
            var errno = Marshal.GetLastPInvokeError();
            if (errno != Errno.EOPNOTSUPP && errno != Errno.ENOSYS)
                throw new IOException($"fallocate(PUNCH_HOLE) on {Path} at offset {offset} length {length} failed: {Errno.Describe(errno)} (errno {errno})");
            Volatile.Write(ref _punchUnsupported, 1);
        }
        WriteZeroBytes(offset, length);
    }

    /// <summary>Frees the range; afterwards it reads as zeros (a raw file has nothing beneath it).</summary>
    public void Discard(ulong offset, ulong length) => WriteZeroes(offset, length);

    public void Flush()
    {
        if (!ReadOnly)
            RandomAccess.FlushToDisk(_handle);
    }

    public IReadOnlyList<Extent> GetAllocation(ulong offset, ulong length)
    {
        CheckRange(offset, length);
        var result = new List<Extent>();
        var end = offset + length;
        var pos = offset;
        while (pos < end)
        {
            var data = Libc.Lseek(_handle, (long)pos, Libc.SeekData);
            if (data < 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                if (errno == Errno.ENXIO)
                {
                    // No data at or after pos: the rest is a hole (or past the end of the file).
                    Add(result, pos, end - pos, ExtentKind.Zero);
                    break;
                }
                if (errno == Errno.EINVAL || errno == Errno.EOPNOTSUPP)
                {
                    // The filesystem cannot say: everything is data.
                    Add(result, pos, end - pos, ExtentKind.Data);
                    break;
                }
                throw new IOException($"lseek(SEEK_DATA) on {Path} at offset {pos} failed: {Errno.Describe(errno)} (errno {errno})");
            }
            var dataStart = (ulong)data;
            if (dataStart > pos)
            {
                Add(result, pos, Math.Min(dataStart, end) - pos, ExtentKind.Zero);
                pos = dataStart;
                if (pos >= end)
                    break;
            }
            var hole = Libc.Lseek(_handle, (long)pos, Libc.SeekHole);
            if (hole < 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                if (errno != Errno.ENXIO)
                    throw new IOException($"lseek(SEEK_HOLE) on {Path} at offset {pos} failed: {Errno.Describe(errno)} (errno {errno})");
                hole = (long)end; // the file shrank under us; treat the rest as data
            }
            var dataEnd = Math.Min((ulong)hole, end);
            if (dataEnd <= pos)
                dataEnd = end; // cannot happen on a sane filesystem; never loop forever
            Add(result, pos, dataEnd - pos, ExtentKind.Data);
            pos = dataEnd;
        }
        return result;
    }

    public void Dispose() => _handle.Dispose();

    public override string ToString() => $"raw image {Path} ({Size} bytes{(ReadOnly ? ", read-only" : "")})";

    private static void Add(List<Extent> list, ulong offset, ulong length, ExtentKind kind)
    {
        if (length == 0)
            return;
        if (list.Count > 0)
        {
            var last = list[^1];
            if (last.Kind == kind && last.Offset + last.Length == offset)
            {
                list[^1] = last with { Length = last.Length + length };
                return;
            }
        }
        list.Add(new Extent(offset, length, kind));
    }

    private void WriteZeroBytes(ulong offset, ulong length)
    {
        var buffer = new byte[(int)Math.Min(length, ZeroChunk)];
        while (length > 0)
        {
            var n = (int)Math.Min(length, (ulong)buffer.Length);
            RandomAccess.Write(_handle, buffer.AsSpan(0, n), (long)offset);
            offset += (ulong)n;
            length -= (ulong)n;
        }
    }

    private void CheckRange(ulong offset, ulong length)
    {
        if (offset > Size || length > Size - offset)
            throw new ArgumentOutOfRangeException(nameof(offset),
                $"range at offset {offset} with length {length} lies outside {Path}, whose size is {Size}");
    }

    private void CheckWritable()
    {
        if (ReadOnly)
            throw new InvalidOperationException($"raw image {Path} is open read-only");
    }
}
