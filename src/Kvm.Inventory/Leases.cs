using System.Globalization;

namespace Kvm.Inventory;

/// <summary>What a lease is on (leases.resource_kind).</summary>
public enum LeaseKind { Vm, Disk, Host }

/// <summary>
/// What a lease's holder carries: the lease (kind and resource), the holder, and the generation it
/// acquired. The generation is the fencing token: every write the holder makes under the lease
/// carries it, and the inventory refuses the write once the lease has moved on.
/// </summary>
public sealed record LeaseToken(LeaseKind Kind, Guid ResourceId, Guid Host, long Generation)
{
    public override string ToString() => $"{LeaseNames.Of(Kind)}/{ResourceId} by host {Host} at generation {Generation}";
}

/// <summary>
/// A lease acquired or renewed. <see cref="ExpiresAt"/> is by the database's clock: a holder should
/// not compare it with its own clock, but count its deadline from the moment it sent the request
/// (its monotonic clock, plus the duration it asked for), which ends no later than the database's.
/// </summary>
public sealed record LeaseGrant(LeaseToken Token, DateTimeOffset ExpiresAt);

/// <summary>
/// A row of leases, with its owner's host name: <see cref="OwnerHost"/>, <see cref="ExpiresAt"/> and
/// <see cref="AcquiredAt"/> are null while the lease is free. <see cref="Generation"/> is the
/// generation of the last acquisition (0: never acquired).
/// </summary>
public sealed record LeaseRow(
    LeaseKind Kind,
    Guid ResourceId,
    Guid? OwnerHost,
    string? OwnerName,
    DateTimeOffset? ExpiresAt,
    long Generation,
    DateTimeOffset? AcquiredAt)
{
    /// <summary>The token its owner holds (null when free): what a restarted kvmd takes back, if it can still renew it.</summary>
    public LeaseToken? Token => OwnerHost is { } owner ? new(Kind, ResourceId, owner, Generation) : null;
}

/// <summary>The text the database stores for each lease kind (leases.resource_kind).</summary>
public static class LeaseNames
{
    public static string Of(LeaseKind kind) => kind switch
    {
        LeaseKind.Vm => "vm",
        LeaseKind.Disk => "disk",
        LeaseKind.Host => "host",
        _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, "not a lease kind"),
    };

    public static LeaseKind Kind(string s) => s switch
    {
        "vm" => LeaseKind.Vm,
        "disk" => LeaseKind.Disk,
        "host" => LeaseKind.Host,
        _ => throw new InventoryException($"leases.resource_kind '{s}' is not a lease kind this kvmd knows"),
    };

    /// <summary>How a message names the resource: "VM", "disk", "host".</summary>
    internal static string Noun(LeaseKind kind) => kind == LeaseKind.Vm ? "VM" : Of(kind);
}

internal static class Times
{
    /// <summary>A timestamptz as Npgsql reads it (a DateTime of kind Utc) as a DateTimeOffset.</summary>
    public static DateTimeOffset Utc(DateTime t) => new(DateTime.SpecifyKind(t, DateTimeKind.Utc));

    /// <summary>A time for a message: UTC, to the millisecond.</summary>
    public static string Text(DateTime t) => DateTime.SpecifyKind(t, DateTimeKind.Utc).ToString("yyyy-MM-dd HH:mm:ss.fff'Z'", CultureInfo.InvariantCulture);

    /// <summary>A duration as the seconds a query multiplies by interval '1 second' (Dapper has no interval parameter).</summary>
    public static double Seconds(TimeSpan duration, string what)
    {
        if (duration <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(what, duration, $"{what} must be positive");
        return duration.TotalSeconds;
    }
}
