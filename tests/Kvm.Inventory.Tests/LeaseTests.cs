using System.Text.Json;
using Dapper;
using Kvm.Rpc;
using static Kvm.Inventory.Tests.InventoryTestKit;

namespace Kvm.Inventory.Tests;

/// <summary>Leases on a real server: generations, refusal, expiry and breaking by the database's clock, renewal, release, fenced writes.</summary>
[Collection(ClusterCollection.Name)]
public sealed class LeaseTests(ClusterFixture cluster)
{
    private static readonly TimeSpan Long = TimeSpan.FromMinutes(5);
    private static readonly TimeSpan Short = TimeSpan.FromSeconds(4); // live for a few statements even on a loaded machine, then waited out

    [SkippableFact]
    public async Task The_generation_grows_by_one_at_every_acquisition_including_reacquisition_and_break()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var h2 = await inv.Hosts.RegisterAsync("host-2", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");

        var first = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Long);
        Assert.Equal(new LeaseToken(LeaseKind.Vm, vm.Id, h1.Id, 1), first.Token);
        var again = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Long);
        Assert.Equal(2, again.Token.Generation);
        Assert.True(await inv.Leases.ReleaseAsync(again.Token));
        var free = await inv.Leases.FindAsync(LeaseKind.Vm, vm.Id);
        Assert.Equal(new LeaseRow(LeaseKind.Vm, vm.Id, null, null, null, 2, null), free);

        var taken = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h2.Id, Short);
        Assert.Equal(3, taken.Token.Generation);
        await WaitUntilExpiredAsync(inv, LeaseKind.Vm, vm.Id);
        var broken = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Long);
        Assert.Equal(4, broken.Token.Generation);

        var row = await inv.Leases.FindAsync(LeaseKind.Vm, vm.Id);
        Assert.Equal((h1.Id, "host-1", 4L), (row!.OwnerHost, row.OwnerName, row.Generation));
        Assert.Equal(broken.ExpiresAt, row.ExpiresAt);
        Assert.Equal(broken.Token, row.Token);
        Assert.Equal([row], await inv.Leases.ListAsync());

        var log = await EventsAsync(inv, "lease.");
        Assert.Equal(["lease.acquired", "lease.acquired", "lease.released", "lease.acquired", "lease.broken", "lease.acquired"], log.Select(e => e.Kind));
        Assert.All(log, e => Assert.Equal("vm/web1", e.Subject));
        Assert.Equal([1L, 2, 3, 4], log.Where(e => e.Kind == "lease.acquired").Select(e => Data(e).GetProperty("generation").GetInt64()));
        var breakEvent = log.Single(e => e.Kind == "lease.broken");
        Assert.Equal(h1.Id, breakEvent.Host);
        Assert.Equal("host-2", Data(breakEvent).GetProperty("previous_owner_name").GetString());
        Assert.Equal(h2.Id, Data(breakEvent).GetProperty("previous_owner").GetGuid());
        Assert.Equal(3, Data(breakEvent).GetProperty("previous_generation").GetInt64());
    }

    [SkippableFact]
    public async Task A_host_holding_a_lease_cannot_be_deleted_and_one_whose_leases_are_free_can()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var held = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Long);

        {
            var e = await Assert.ThrowsAsync<Npgsql.PostgresException>(() => DeleteHostAsync(inv, h1.Id));
            Assert.Equal("23503", e.SqlState); // foreign_key_violation, not the lease's own check
            Assert.Equal("leases_owner_host_fkey", e.ConstraintName);
        }
        Assert.Equal(held.Token, (await inv.Leases.FindAsync(LeaseKind.Vm, vm.Id))!.Token);

        Assert.True(await inv.Leases.ReleaseAsync(held.Token));
        Assert.Equal(1, await DeleteHostAsync(inv, h1.Id));
        var free = await inv.Leases.FindAsync(LeaseKind.Vm, vm.Id);
        Assert.Equal((null, 1L), (free!.OwnerHost, free.Generation));
    }

    private static async Task<int> DeleteHostAsync(InventoryDatabase inv, Guid id)
    {
        await using var cmd = inv.DataSource.CreateCommand("delete from hosts where id = $1");
        cmd.Parameters.Add(new Npgsql.NpgsqlParameter { Value = id });
        return await cmd.ExecuteNonQueryAsync();
    }

    [SkippableFact]
    public async Task A_lease_held_and_unexpired_is_refused_naming_the_holder_and_the_expiry_and_stays_as_it_was()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var h2 = await inv.Hosts.RegisterAsync("host-2", "");
        var disk = await inv.Disks.RegisterAsync("/d/a.qcow2", DiskFormat.Qcow2, 1 << 20);
        var held = await inv.Leases.AcquireAsync(LeaseKind.Disk, disk.Id, h1.Id, Long);

        var e = await Assert.ThrowsAsync<InventoryException>(() => inv.Leases.AcquireAsync(LeaseKind.Disk, disk.Id, h2.Id, Long));
        Assert.Equal(RpcErrorCode.InvalidState, e.Code);
        Assert.Contains($"the lease on disk/{disk.Id} is held by host 'host-1' until {held.ExpiresAt.UtcDateTime:yyyy-MM-dd HH:mm:ss.fff}Z", e.Message);
        Assert.Contains("generation 1", e.Message);
        Assert.Equal(held.Token, (await inv.Leases.FindAsync(LeaseKind.Disk, disk.Id))!.Token);
        Assert.DoesNotContain(await EventsAsync(inv, "lease."), x => x.Host == h2.Id);
    }

    [SkippableFact]
    public async Task Leases_on_missing_resources_or_for_missing_hosts_are_NotFound_errors()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var missing = Guid.NewGuid();
        var noVm = await Assert.ThrowsAsync<InventoryException>(() => inv.Leases.AcquireAsync(LeaseKind.Vm, missing, h1.Id, Long));
        Assert.Equal((RpcErrorCode.NotFound, $"VM {missing} does not exist"), (noVm.Code, noVm.Message));
        var noHost = await Assert.ThrowsAsync<InventoryException>(() => inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, missing, Long));
        Assert.Equal((RpcErrorCode.NotFound, $"host {missing} does not exist"), (noHost.Code, noHost.Message));
        Assert.Equal(1, (await inv.Leases.AcquireAsync(LeaseKind.Host, h1.Id, h1.Id, Long)).Token.Generation);
        Assert.Equal("host/host-1", (await EventsAsync(inv, "lease.")).Single().Subject);
    }

    [SkippableFact]
    public async Task Renewal_extends_only_the_leases_still_held_at_their_generation_and_unexpired()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var a = await inv.Vms.CreateAsync("a", "{}");
        var b = await inv.Vms.CreateAsync("b", "{}");
        var c = await inv.Vms.CreateAsync("c", "{}");
        var ga = await inv.Leases.AcquireAsync(LeaseKind.Vm, a.Id, h1.Id, TimeSpan.FromSeconds(30));
        var gbOld = await inv.Leases.AcquireAsync(LeaseKind.Vm, b.Id, h1.Id, Long);
        var gb = await inv.Leases.AcquireAsync(LeaseKind.Vm, b.Id, h1.Id, Long);
        var gc = await inv.Leases.AcquireAsync(LeaseKind.Vm, c.Id, h1.Id, Short);
        await WaitUntilExpiredAsync(inv, LeaseKind.Vm, c.Id);

        var renewed = await inv.Leases.RenewAsync(h1.Id, [ga.Token, gbOld.Token, gc.Token], Long);
        // a: renewed, same generation, later expiry. b: the token's generation is stale. c: expired, nobody took it: refused all the same.
        var r = Assert.Single(renewed);
        Assert.Equal(ga.Token, r.Token);
        Assert.True(r.ExpiresAt > ga.ExpiresAt, $"{r.ExpiresAt:O} is not after {ga.ExpiresAt:O}");
        Assert.Equal(r.ExpiresAt, (await inv.Leases.FindAsync(LeaseKind.Vm, a.Id))!.ExpiresAt);
        Assert.Equal(gb.ExpiresAt, (await inv.Leases.FindAsync(LeaseKind.Vm, b.Id))!.ExpiresAt);
        var cRow = await inv.Leases.FindAsync(LeaseKind.Vm, c.Id);
        Assert.Equal((gc.ExpiresAt, 1L), (cRow!.ExpiresAt, cRow.Generation));

        // The current token of b renews; the holder takes c again with a new generation.
        Assert.Equal([gb.Token], (await inv.Leases.RenewAsync(h1.Id, [gb.Token], Long)).Select(g => g.Token));
        Assert.Equal(2, (await inv.Leases.AcquireAsync(LeaseKind.Vm, c.Id, h1.Id, Long)).Token.Generation);
        Assert.Empty(await inv.Leases.RenewAsync(h1.Id, [gc.Token], Long));
        Assert.Empty(await inv.Leases.RenewAsync(h1.Id, [], Long));
    }

    [SkippableFact]
    public async Task Release_frees_only_at_the_current_generation_and_a_stale_release_is_no_error()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var h2 = await inv.Hosts.RegisterAsync("host-2", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var old = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Short);
        await WaitUntilExpiredAsync(inv, LeaseKind.Vm, vm.Id);
        var now = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h2.Id, Long);

        Assert.False(await inv.Leases.ReleaseAsync(old.Token));
        Assert.Equal(now.Token, (await inv.Leases.FindAsync(LeaseKind.Vm, vm.Id))!.Token);
        Assert.True(await inv.Leases.ReleaseAsync(now.Token));
        Assert.Null((await inv.Leases.FindAsync(LeaseKind.Vm, vm.Id))!.OwnerHost);
        Assert.False(await inv.Leases.ReleaseAsync(now.Token));
        Assert.Single(await EventsAsync(inv, "lease.released"));
    }

    [SkippableFact]
    public async Task Fenced_VM_writes_with_a_stale_or_expired_token_are_refused_naming_the_holder_and_change_nothing()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var h2 = await inv.Hosts.RegisterAsync("host-2", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var old = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Short);

        var owned = await inv.Vms.SetOwnerAsync("web1", h1.Id, old.Token);
        Assert.Equal(h1.Id, owned.OwnerHost);
        Assert.Equal(VmActualState.Running, (await inv.Vms.SetActualStateAsync("web1", VmActualState.Running, old.Token)).ActualState);

        // Expired, nobody has taken it: refused already.
        await WaitUntilExpiredAsync(inv, LeaseKind.Vm, vm.Id);
        var expired = await Assert.ThrowsAsync<InventoryException>(() => inv.Vms.SetActualStateAsync("web1", VmActualState.Paused, old.Token));
        Assert.Equal(RpcErrorCode.StaleLease, expired.Code);
        Assert.Contains("lease generation 1 of host 'host-1' on vm/web1 is stale: the lease expired at", expired.Message);

        var now = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h2.Id, Long);
        var before = await inv.Vms.GetAsync("web1");
        var eventsBefore = (await EventsAsync(inv)).Count;
        var stale = await Assert.ThrowsAsync<InventoryException>(() => inv.Vms.SetActualStateAsync("web1", VmActualState.Stopped, old.Token));
        Assert.Equal(RpcErrorCode.StaleLease, stale.Code);
        Assert.Equal("set actual state of VM 'web1' to stopped: lease generation 1 of host 'host-1' on vm/web1 is stale: " +
            $"the lease is held by host 'host-2' at generation 2, until {now.ExpiresAt.UtcDateTime:yyyy-MM-dd HH:mm:ss.fff}Z", stale.Message);
        var staleOwner = await Assert.ThrowsAsync<InventoryException>(() => inv.Vms.SetOwnerAsync("web1", null, old.Token));
        Assert.Equal(RpcErrorCode.StaleLease, staleOwner.Code);
        Assert.Equal(before, await inv.Vms.GetAsync("web1"));
        Assert.Equal(eventsBefore, (await EventsAsync(inv)).Count);

        // The current holder writes.
        var moved = await inv.Vms.SetOwnerAsync("web1", h2.Id, now.Token);
        Assert.Equal(h2.Id, moved.OwnerHost);
        var ownerEvent = (await EventsAsync(inv, "vm.owner")).Last();
        Assert.Equal(2, Data(ownerEvent).GetProperty("generation").GetInt64());

        // After a release the lease is free: the token is stale.
        await inv.Leases.ReleaseAsync(now.Token);
        var free = await Assert.ThrowsAsync<InventoryException>(() => inv.Vms.SetOwnerAsync("web1", null, now.Token));
        Assert.Contains("the lease is free (generation 2)", free.Message);
        var missing = await Assert.ThrowsAsync<InventoryException>(() => inv.Vms.SetOwnerAsync("nope", null, now.Token));
        Assert.Equal(RpcErrorCode.NotFound, missing.Code);
    }

    [SkippableFact]
    public async Task A_fenced_write_racing_a_lease_change_waits_for_it_and_is_refused_once_it_commits()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var h2 = await inv.Hosts.RegisterAsync("host-2", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var held = await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h1.Id, Long);

        // Another host takes the lease over in a transaction not committed yet (as an acquisition
        // does, with the row locked): the write under the old token must not slip in before it.
        await using var conn = await inv.DataSource.OpenConnectionAsync();
        await using var tx = await conn.BeginTransactionAsync();
        await conn.ExecuteAsync("select 1 from leases where resource_id = @id for update", new { id = vm.Id }, tx);
        await conn.ExecuteAsync("update leases set owner_host = @h, generation = generation + 1 where resource_id = @id", new { h = h2.Id, id = vm.Id }, tx);
        var write = inv.Vms.SetActualStateAsync("web1", VmActualState.Failed, held.Token);
        await Task.Delay(500);
        Assert.False(write.IsCompleted, "the fenced write did not wait for the lease's row lock");
        await tx.CommitAsync();

        var stale = await Assert.ThrowsAsync<InventoryException>(() => write.WaitAsync(Patience));
        Assert.Equal(RpcErrorCode.StaleLease, stale.Code);
        Assert.Contains("held by host 'host-2' at generation 2", stale.Message);
        Assert.Equal(VmActualState.Stopped, (await inv.Vms.GetAsync("web1")).ActualState);
    }

    [SkippableFact]
    public async Task Concurrent_acquisitions_by_many_hosts_give_exactly_one_winner_per_generation()
    {
        await using var inv = await OpenAsync(cluster);
        var hosts = new List<HostRow>();
        for (int i = 0; i < 8; i++)
            hosts.Add(await inv.Hosts.RegisterAsync($"host-{i}", ""));
        var vm = await inv.Vms.CreateAsync("web1", "{}");

        for (int round = 1; round <= 5; round++)
        {
            using var go = new ManualResetEventSlim();
            var attempts = hosts.Select(h => Task.Run(async () =>
            {
                go.Wait();
                try
                {
                    return await inv.Leases.AcquireAsync(LeaseKind.Vm, vm.Id, h.Id, Long);
                }
                catch (InventoryException e) when (e.Code == RpcErrorCode.InvalidState)
                {
                    return null;
                }
            })).ToList();
            go.Set();
            var results = await Task.WhenAll(attempts);
            var winner = Assert.Single(results, r => r is not null)!;
            Assert.Equal(round, winner.Token.Generation);
            Assert.True(await inv.Leases.ReleaseAsync(winner.Token));
        }
        Assert.Equal(5, (await EventsAsync(inv, "lease.acquired")).Count);
    }

    private static JsonElement Data(EventRow e) => JsonDocument.Parse(e.Data).RootElement;
}
