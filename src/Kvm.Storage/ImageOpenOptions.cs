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

    /// <summary>The most backing layers below an image before the chain is refused as too deep.</summary>
    public int MaxChainDepth { get; init; } = 64;
}
