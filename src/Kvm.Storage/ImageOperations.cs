using Kvm.Storage.Qcow2;
using Kvm.Storage.Raw;

namespace Kvm.Storage;

/// <summary>
/// Whole-image operations: external snapshot, commit, rebase, convert, resize. Long ones report
/// progress as the fraction of guest bytes done.
/// </summary>
public static class ImageOperations
{
    /// <summary>Bytes moved per step of a copy.</summary>
    public const int ChunkSize = 1 << 20;

    /// <summary>
    /// Makes <paramref name="childPath"/> a new qcow2 image backed by <paramref name="parentPath"/>
    /// and makes the parent read-only on disk: from now on the child takes the writes.
    /// </summary>
    public static void Snapshot(string parentPath, string childPath, int clusterSize = 65536)
    {
        parentPath = Path.GetFullPath(parentPath);
        childPath = Path.GetFullPath(childPath);
        string format = DiskImage.ProbeFormat(parentPath);
        ulong size;
        using (var parent = DiskImage.Open(parentPath, new ImageOpenOptions { ReadOnly = true }))
            size = parent.Size;
        string name = Path.GetDirectoryName(parentPath) == Path.GetDirectoryName(childPath) ? Path.GetFileName(parentPath) : parentPath;
        using (Qcow2Image.Create(childPath, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize, BackingFile = name, BackingFormat = format }))
        {
        }
        MakeReadOnly(parentPath);
    }

    /// <summary>Takes every write permission off an image that became a backing file: from now on only its children take writes.</summary>
    public static void MakeReadOnly(string path)
    {
        var mode = File.GetUnixFileMode(path);
        File.SetUnixFileMode(path, mode & ~(UnixFileMode.UserWrite | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite));
    }

    /// <summary>
    /// Folds a qcow2 child into its backing image: everything the child holds (data and zeroed
    /// ranges) is written into the parent, the parent is flushed, then the child file is deleted.
    /// The parent is made writable for the duration if its file mode forbids writing.
    /// </summary>
    public static void Commit(string childPath, IProgress<double>? progress = null)
    {
        childPath = Path.GetFullPath(childPath);
        string parentPath;
        ulong size;
        using (var child = Qcow2Image.Open(childPath, new ImageOpenOptions { ReadOnly = true }))
        {
            if (child.Backing is null)
                throw new ArgumentException($"image {childPath} has no backing image to commit into");
            parentPath = child.Backing.Path;
            size = child.Size;
        }
        var mode = File.GetUnixFileMode(parentPath);
        if ((mode & UnixFileMode.UserWrite) == 0)
            File.SetUnixFileMode(parentPath, mode | UnixFileMode.UserWrite);
        using (var child = Qcow2Image.Open(childPath, new ImageOpenOptions { ReadOnly = true }))
        using (var parent = DiskImage.Open(parentPath))
        {
            if (parent.Size < size)
                Resize(parent, size);
            var buffer = new byte[ChunkSize];
            foreach (var extent in child.GetAllocation(0, size))
            {
                if (extent.Depth != 0 || extent.Kind == ExtentKind.Unallocated)
                    continue;
                if (extent.Kind == ExtentKind.Zero)
                {
                    parent.WriteZeroes(extent.Offset, extent.Length);
                    continue;
                }
                for (ulong at = extent.Offset; at < extent.Offset + extent.Length; at += (ulong)buffer.Length)
                {
                    int n = (int)Math.Min((ulong)buffer.Length, extent.Offset + extent.Length - at);
                    child.Read(at, buffer.AsSpan(0, n));
                    parent.Write(at, buffer.AsSpan(0, n));
                    progress?.Report((double)(at + (ulong)n) / size);
                }
            }
            parent.Flush();
        }
        File.Delete(childPath);
        progress?.Report(1.0);
    }

    /// <summary>
    /// Points an image at a new backing file (or none). Safe mode first copies into the image every
    /// range it does not hold itself where the old and new backing content differ, so what the guest
    /// sees stays the same; unsafe mode only rewrites the name.
    /// </summary>
    public static void Rebase(string imagePath, string? newBacking, string? newBackingFormat, bool unsafeMode, IProgress<double>? progress = null)
    {
        imagePath = Path.GetFullPath(imagePath);
        if (newBacking is not null)
        {
            string resolved = DiskImage.ResolveBacking(imagePath, newBacking, new ImageOpenOptions());
            newBackingFormat ??= DiskImage.ProbeFormat(resolved);
        }
        using var image = Qcow2Image.Open(imagePath);
        if (!unsafeMode)
        {
            IBlockImage? target = newBacking is null
                ? null
                : DiskImage.Open(DiskImage.ResolveBacking(imagePath, newBacking, new ImageOpenOptions()), new ImageOpenOptions { ReadOnly = true }, newBackingFormat);
            try
            {
                var old = new byte[ChunkSize];
                var now = new byte[ChunkSize];
                foreach (var extent in image.GetAllocation(0, image.Size))
                {
                    if (extent.Depth == 0 && extent.Kind != ExtentKind.Unallocated)
                        continue; // the image's own data does not depend on the backing file
                    for (ulong at = extent.Offset; at < extent.Offset + extent.Length; at += (ulong)old.Length)
                    {
                        int n = (int)Math.Min((ulong)old.Length, extent.Offset + extent.Length - at);
                        image.Read(at, old.AsSpan(0, n)); // through the old chain
                        ReadOrZero(target, at, now.AsSpan(0, n));
                        if (!old.AsSpan(0, n).SequenceEqual(now.AsSpan(0, n)))
                            CopyDifferences(image, at, old.AsSpan(0, n), now.AsSpan(0, n));
                        progress?.Report((double)(at + (ulong)n) / image.Size);
                    }
                }
                image.Flush();
            }
            finally
            {
                target?.Dispose();
            }
        }
        image.SetBackingFile(newBacking, newBacking is null ? null : newBackingFormat);
        progress?.Report(1.0);
    }

    // Writes the old content of each differing cluster-sized piece into the image.
    private static void CopyDifferences(Qcow2Image image, ulong offset, ReadOnlySpan<byte> old, ReadOnlySpan<byte> now)
    {
        int step = image.ClusterSize;
        for (int i = 0; i < old.Length; i += step)
        {
            int n = Math.Min(step, old.Length - i);
            if (!old.Slice(i, n).SequenceEqual(now.Slice(i, n)))
                image.Write(offset + (ulong)i, old.Slice(i, n));
        }
    }

    private static void ReadOrZero(IBlockImage? image, ulong offset, Span<byte> dest)
    {
        if (image is null || offset >= image.Size)
        {
            dest.Clear();
            return;
        }
        int n = (int)Math.Min((ulong)dest.Length, image.Size - offset);
        image.Read(offset, dest[..n]);
        dest[n..].Clear();
    }

    /// <summary>
    /// Copies the guest-visible content of <paramref name="source"/> (its whole chain) into a new
    /// image of <paramref name="format"/> ("qcow2" or "raw"). Ranges that read as zeros are not
    /// written, so the new image stays sparse.
    /// </summary>
    public static void Convert(IBlockImage source, string destinationPath, string format, int clusterSize = 65536, IProgress<double>? progress = null)
    {
        using IBlockImage destination = format switch
        {
            "qcow2" => Qcow2Image.Create(destinationPath, new Qcow2CreateOptions { Size = source.Size, ClusterSize = clusterSize }),
            "raw" => RawImage.Create(destinationPath, source.Size),
            _ => throw new ArgumentException($"format '{format}' is not supported (qcow2 and raw are)"),
        };
        var buffer = new byte[ChunkSize];
        foreach (var extent in source.GetAllocation(0, source.Size))
        {
            if (extent.Kind != ExtentKind.Data)
                continue;
            for (ulong at = extent.Offset; at < extent.Offset + extent.Length; at += (ulong)buffer.Length)
            {
                int n = (int)Math.Min((ulong)buffer.Length, extent.Offset + extent.Length - at);
                var chunk = buffer.AsSpan(0, n);
                source.Read(at, chunk);
                WriteNonZero(destination, at, chunk, clusterSize);
                progress?.Report((double)(at + (ulong)n) / source.Size);
            }
        }
        destination.Flush();
        progress?.Report(1.0);
    }

    // Writes the pieces of a chunk that are not all zeros.
    private static void WriteNonZero(IBlockImage destination, ulong offset, ReadOnlySpan<byte> chunk, int step)
    {
        for (int i = 0; i < chunk.Length; i += step)
        {
            var piece = chunk.Slice(i, Math.Min(step, chunk.Length - i));
            if (piece.IndexOfAnyExcept((byte)0) >= 0)
                destination.Write(offset + (ulong)i, piece);
        }
    }

    /// <summary>Grows an image to <paramref name="newSize"/> bytes.</summary>
    public static void Resize(IBlockImage image, ulong newSize)
    {
        switch (image)
        {
            case Qcow2Image q:
                q.Resize(newSize);
                break;
            case RawImage r:
                r.Resize(newSize);
                break;
            default:
                throw new ArgumentException($"image {image.Path}: resizing {image.GetType().Name} is not supported");
        }
    }
}
