using Kvm.Inventory.Schema;

namespace Kvm.Inventory.Tests;

/// <summary>Opening the inventory as kvmd does: its private cluster by default, a shared one by connection string.</summary>
[Collection(ClusterCollection.Name)]
public sealed class InventoryDatabaseTests(ClusterFixture cluster)
{
    [SkippableFact]
    public async Task Without_a_connection_string_the_private_cluster_is_made_migrated_and_found_again()
    {
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var options = new InventoryOptions { StateDirectory = state.Path, Embedded = o => PostgresTestKit.Options(o.StateDirectory) };
        await using (var inv = await InventoryDatabase.OpenAsync(options))
        {
            Assert.NotNull(inv.Embedded);
            Assert.Equal((0, SchemaMigrator.LatestVersion), (inv.Schema.FromVersion, inv.Schema.ToVersion));
            await inv.Vms.CreateAsync("web1", "{}");
        }
        await using (var inv = await InventoryDatabase.OpenAsync(options))
        {
            Assert.Empty(inv.Schema.Applied);
            Assert.Equal("web1", (await inv.Vms.GetAsync("web1")).Name);
        }
    }

    [SkippableFact]
    public async Task With_a_connection_string_the_shared_cluster_is_used_and_migrated()
    {
        var (_, cs) = await cluster.NewDatabaseAsync();
        await using var inv = await InventoryDatabase.OpenAsync(new InventoryOptions { ConnectionString = cs });
        Assert.Null(inv.Embedded);
        Assert.Equal(SchemaMigrator.LatestVersion, inv.Schema.ToVersion);
        var host = await inv.Hosts.RegisterAsync("host-1", "");
        Assert.Equal(host.Id, (await inv.Hosts.ListAsync()).Single().Id);
    }

    [Fact]
    public async Task Neither_a_connection_string_nor_a_state_directory_is_a_clear_error()
    {
        var e = await Assert.ThrowsAsync<InventoryException>(() => InventoryDatabase.OpenAsync(new InventoryOptions()));
        Assert.Contains("needs either a connection string", e.Message);
    }
}
