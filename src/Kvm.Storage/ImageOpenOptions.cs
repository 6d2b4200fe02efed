namespace Kvm.Storage;

/// <summary>How an image (and its backing chain) is opened.</summary>
public sealed record ImageOpenOptions
{
    /// <summary>Open for reading only. Backing images are always opened read-only.</summary>
    public bool ReadOnly { get; init; }

    /// <summary>
    /// Whether a backing file may live outside the image's own folder (an absolute path elsewhere,
    /// or a relative name that climbs out with ".."). Images from untrusted sources should be
    /// opened with this off.
    /// </summary>
    public bool AllowBackingOutsideFolder { get; init; } = true;

    /// <summary>How many L2 tables each qcow2 image keeps in memory.</summary>
    public int L2CacheTables { get; init; } = 64;

    /// <summary>
    /// Lock the image against other users while it is open: a writable image is locked
    /// exclusively (no one else using these locks may open it at all), while read-only images and
    /// backing files are always locked shared (so no one may open them for exclusive writing).
    /// The locks are flock(2) locks on the file, which every program of this project takes; a VM
    /// opens its disks this way, so two VMs, or one VM and a disk operation, cannot write one image.
    /// </summary>
    public bool Exclusive { get; init; }

    /// <summary>The most backing layers below an image before the chain is refused as too deep.</summary>
    public int MaxChainDepth { get; init; } = 64;
}
