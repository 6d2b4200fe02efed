using Dapper;

namespace Kvm.Inventory.Tests;

/// <summary>A migrated inventory on a fresh database of the shared test cluster, and waits that go by the database's clock.</summary>
public static class InventoryTestKit
{
    /// <summary>Generous: the machine running the tests may be loaded.</summary>
    public static readonly TimeSpan Patience = TimeSpan.FromSeconds(60);

    public static async Task<InventoryDatabase> OpenAsync(ClusterFixture cluster)
    {
        var (_, cs) = await cluster.NewDatabaseAsync();
        return await InventoryDatabase.OpenAsync(new InventoryOptions { ConnectionString = cs });
    }

    /// <summary>Waits until the lease on <paramref name="id"/> has expired by the database's clock.</summary>
    public static async Task WaitUntilExpiredAsync(InventoryDatabase inv, LeaseKind kind, Guid id)
    {
        var deadline = DateTime.UtcNow + Patience;
        var k = LeaseNames.Of(kind);
        while (true)
        {
            await using (var conn = await inv.DataSource.OpenConnectionAsync())
            {
                if (await conn.ExecuteScalarAsync<bool>(
                    "select coalesce(expires_at <= clock_timestamp(), false) from leases where resource_kind = @k and resource_id = @id", new { k, id }))
                    return;
            }
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"waited {Patience} for the lease on {kind} {id} to expire");
            await Task.Delay(100);
        }
    }

    /// <summary>Waits until <paramref name="condition"/> holds; false when <see cref="Patience"/> ran out.</summary>
    public static async Task<bool> EventuallyAsync(Func<bool> condition)
    {
        var deadline = DateTime.UtcNow + Patience;
        while (!condition())
        {
            if (DateTime.UtcNow > deadline)
                return false;
            await Task.Delay(50);
        }
        return true;
    }

    public static async Task<List<EventRow>> EventsAsync(InventoryDatabase inv, string? kindPrefix = null) =>
        (await inv.Events.ReadAfterAsync(0, 100000)).Where(e => kindPrefix is null || e.Kind.StartsWith(kindPrefix, StringComparison.Ordinal)).ToList();
}
