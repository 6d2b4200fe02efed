using Kvm.Storage.Qcow2;
using Kvm.Storage.Raw;

namespace Kvm.Storage;

/// <summary>A persistent bitmap as <c>vmctl disk info</c> shows it: name (escaped), granularity in bytes, the auto and in-use flags.</summary>
public sealed record ImageBitmap(string Name, ulong Granularity, bool Enabled, bool InUse);

/// <summary>What <c>vmctl disk info</c> reports about one image and, nested, its backing chain.</summary>
public sealed record ImageInfo
{
    public required string Path { get; init; }
    public required string Format { get; init; }
    public required ulong VirtualSize { get; init; }
    public required ulong FileSize { get; init; }
    public int? ClusterSize { get; init; }
    public int? Version { get; init; }
    public int? RefcountBits { get; init; }
    public uint? Snapshots { get; init; }
    public string? BackingFile { get; init; }
    public string? BackingFormat { get; init; }
    /// <summary>The persistent dirty bitmaps (qcow2 only), without their contents.</summary>
    public IReadOnlyList<ImageBitmap>? Bitmaps { get; init; }
    public ImageInfo? Backing { get; init; }

    public static ImageInfo Of(IBlockImage image) => image switch
    {
        Qcow2Image q => new ImageInfo
        {
            Path = q.Path,
            Format = "qcow2",
            VirtualSize = q.Size,
            FileSize = (ulong)new FileInfo(q.Path).Length,
            ClusterSize = q.ClusterSize,
            Version = q.Version,
            RefcountBits = q.RefcountBits,
            Snapshots = q.Header.SnapshotCount,
            BackingFile = q.BackingFile,
            BackingFormat = q.BackingFormat,
            Bitmaps = q.Bitmaps.Count == 0 ? null : q.Bitmaps.Select(b => new ImageBitmap(b.Name, 1UL << b.GranularityBits, b.Auto, b.InUse)).ToList(),
            Backing = q.Backing is null ? null : Of(q.Backing),
        },
        RawImage r => new ImageInfo { Path = r.Path, Format = "raw", VirtualSize = r.Size, FileSize = (ulong)new FileInfo(r.Path).Length },
        _ => new ImageInfo { Path = image.Path, Format = image.GetType().Name, VirtualSize = image.Size, FileSize = (ulong)new FileInfo(image.Path).Length },
    };

    /// <summary>Each layer from this image down, for printing.</summary>
    public IEnumerable<ImageInfo> Chain()
    {
        for (var i = this; i is not null; i = i.Backing)
            yield return i;
    }
}
