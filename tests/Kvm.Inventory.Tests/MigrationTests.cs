using Dapper;
using Kvm.Inventory.Schema;
using Npgsql;

namespace Kvm.Inventory.Tests;

/// <summary>The schema migrations against a real server: once, idempotent, serialized, and refusing a newer schema.</summary>
[Collection(ClusterCollection.Name)]
public sealed class MigrationTests(ClusterFixture cluster)
{
    [Fact]
    public void The_known_migrations_are_embedded_and_numbered_from_one_without_gaps()
    {
        Assert.NotEmpty(SchemaMigrator.Known);
        Assert.Equal(Enumerable.Range(1, SchemaMigrator.Known.Count), SchemaMigrator.Known.Select(m => m.Version));
        Assert.Equal("initial", SchemaMigrator.Known[0].Name);
        Assert.Contains("create table vms", SchemaMigrator.Known[0].Sql);
    }

    [SkippableFact]
    public async Task Migrations_apply_once_in_order_and_a_second_run_applies_nothing()
    {
        var (db, _) = await cluster.NewDatabaseAsync();
        var first = await SchemaMigrator.ApplyAsync(db);
        Assert.Equal(0, first.FromVersion);
        Assert.Equal(SchemaMigrator.LatestVersion, first.ToVersion);
        Assert.Equal(SchemaMigrator.Known, first.Applied);

        var second = await SchemaMigrator.ApplyAsync(db);
        Assert.Equal(SchemaMigrator.LatestVersion, second.FromVersion);
        Assert.Empty(second.Applied);

        var applied = await SchemaMigrator.AppliedAsync(db);
        Assert.Equal(SchemaMigrator.Known.Select(m => (m.Version, m.Name)), applied.Select(a => (a.Version, a.Name)));
        await using var conn = await db.OpenConnectionAsync();
        var tables = (await conn.QueryAsync<string>("select table_name::text from information_schema.tables where table_schema = 'public' order by 1")).ToList();
        Assert.Equal(["disks", "events", "hosts", "leases", "reservations", "schema_migrations", "vms"], tables);
    }

    [SkippableFact]
    public async Task Concurrent_appliers_are_serialized_by_the_advisory_lock_and_apply_each_migration_once()
    {
        var (db, _) = await cluster.NewDatabaseAsync();
        // A slow first migration keeps the lock held while the others arrive.
        Migration[] slow = [new(1, "slow", "select pg_sleep(0.5); create table t (v int)"), new(2, "more", "alter table t add column w int")];
        var results = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Task.Run(() => SchemaMigrator.ApplyAsync(db, slow))));
        Assert.Single(results, r => r.Applied.Count == 2);
        Assert.Equal(3, results.Count(r => r.Applied.Count == 0 && r.FromVersion == 2));
        Assert.Equal(2, (await SchemaMigrator.AppliedAsync(db)).Count);
    }

    [SkippableFact]
    public async Task A_schema_newer_than_this_code_knows_is_refused_and_left_untouched()
    {
        var (db, _) = await cluster.NewDatabaseAsync();
        await SchemaMigrator.ApplyAsync(db);
        var next = SchemaMigrator.LatestVersion + 1;
        await using (var conn = await db.OpenConnectionAsync())
            await conn.ExecuteAsync("insert into schema_migrations (version, name) values (@next, 'from_the_future')", new { next });

        var e = await Assert.ThrowsAsync<InventoryException>(() => SchemaMigrator.ApplyAsync(db));
        Assert.Contains($"is version {next} (from_the_future), newer than this kvmd knows (version {SchemaMigrator.LatestVersion})", e.Message);
        Assert.Equal(next, (await SchemaMigrator.AppliedAsync(db))[^1].Version);
    }

    [SkippableFact]
    public async Task A_failing_migration_applies_nothing_and_names_itself()
    {
        var (db, _) = await cluster.NewDatabaseAsync();
        Migration[] broken = [new(1, "good", "create table a (v int)"), new(2, "bad", "create table b (v no_such_type)")];
        var e = await Assert.ThrowsAsync<InventoryException>(() => SchemaMigrator.ApplyAsync(db, broken));
        Assert.Contains("schema migration 0002_bad", e.Message);
        Assert.Contains(e.Observations, o => o.Contains("no_such_type"));
        Assert.Empty(await SchemaMigrator.AppliedAsync(db));
        await using var conn = await db.OpenConnectionAsync();
        Assert.Null(await conn.ExecuteScalarAsync<string?>("select to_regclass('a')::text"));
    }
}
