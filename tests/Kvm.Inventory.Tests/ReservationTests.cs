using System.Text.Json;
using Dapper;
using Kvm.Rpc;
using static Kvm.Inventory.Tests.InventoryTestKit;

namespace Kvm.Inventory.Tests;

/// <summary>Disk reservations on a real server: conflicts named, whole chains all or nothing, fencing, release and breaking.</summary>
[Collection(ClusterCollection.Name)]
public sealed class ReservationTests(ClusterFixture cluster)
{
    private sealed record World(InventoryDatabase Inv, HostRow H1, HostRow H2, VmRow Web1, VmRow Web2, VmRow Db1) : IAsyncDisposable
    {
        public ValueTask DisposeAsync() => Inv.DisposeAsync();
    }

    private async Task<World> WorldAsync()
    {
        var inv = await OpenAsync(cluster);
        return new World(inv, await inv.Hosts.RegisterAsync("host-1", ""), await inv.Hosts.RegisterAsync("host-2", ""),
            await inv.Vms.CreateAsync("web1", "{}"), await inv.Vms.CreateAsync("web2", "{}"), await inv.Vms.CreateAsync("db1", "{}"));
    }

    [SkippableFact]
    public async Task Exclusive_conflicts_with_anything_and_is_refused_naming_the_holders_and_modes_while_shared_goes_with_shared()
    {
        await using var w = await WorldAsync();
        var inv = w.Inv;
        var disk = await inv.Disks.RegisterAsync("/d/data.qcow2", DiskFormat.Qcow2, 1);

        var mine = await inv.Reservations.ReserveAsync(disk.Id, w.H1.Id, w.Web1.Id, ReservationMode.Exclusive);
        Assert.Equal((disk.Id, "/d/data.qcow2", "host-1", "web1", ReservationMode.Exclusive, (LeaseToken?)null),
            (mine.Disk, mine.DiskPath, mine.HolderHostName, mine.HolderVmName, mine.Mode, mine.Lease));
        var xx = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveAsync(disk.Id, w.H2.Id, w.Web2.Id, ReservationMode.Exclusive));
        Assert.Equal(RpcErrorCode.Conflict, xx.Code);
        Assert.EndsWith("disk '/d/data.qcow2' is reserved exclusive by VM 'web1' on host 'host-1', and cannot be reserved exclusive by VM 'web2' on host 'host-2'", xx.Message);
        var xs = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveAsync(disk.Id, w.H2.Id, null, ReservationMode.Shared));
        Assert.EndsWith("is reserved exclusive by VM 'web1' on host 'host-1', and cannot be reserved shared by host 'host-2'", xs.Message);
        Assert.Equal([mine], await inv.Reservations.ListAsync(disk.Id));

        // The holder itself changes its mode in place; then shared goes with shared, and exclusive is refused naming every holder.
        var relaxed = await inv.Reservations.ReserveAsync(disk.Id, w.H1.Id, w.Web1.Id, ReservationMode.Shared);
        Assert.Equal((mine.Id, ReservationMode.Shared), (relaxed.Id, relaxed.Mode));
        await inv.Reservations.ReserveAsync(disk.Id, w.H2.Id, w.Web2.Id, ReservationMode.Shared);
        var sx = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveAsync(disk.Id, w.H2.Id, w.Db1.Id, ReservationMode.Exclusive));
        Assert.EndsWith("is reserved shared by VM 'web1' on host 'host-1', shared by VM 'web2' on host 'host-2', and cannot be reserved exclusive by VM 'db1' on host 'host-2'", sx.Message);
        Assert.Equal(["web1", "web2"], (await inv.Reservations.ListAsync(disk.Id)).Select(r => r.HolderVmName));
        var upgrade = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveAsync(disk.Id, w.H1.Id, w.Web1.Id, ReservationMode.Exclusive));
        Assert.Contains("shared by VM 'web2' on host 'host-2', and cannot be reserved exclusive by VM 'web1'", upgrade.Message);

        var missing = Guid.NewGuid();
        Assert.Equal(RpcErrorCode.NotFound, (await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveAsync(missing, w.H1.Id, null, ReservationMode.Shared))).Code);
        Assert.Equal(RpcErrorCode.NotFound, (await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveAsync(disk.Id, w.H1.Id, missing, ReservationMode.Shared))).Code);
    }

    [SkippableFact]
    public async Task A_chain_is_reserved_top_exclusive_and_backing_shared_all_or_nothing()
    {
        await using var w = await WorldAsync();
        var inv = w.Inv;
        var baseImage = await inv.Disks.RegisterAsync("/img/base.raw", DiskFormat.Raw, 1);
        var mid = await inv.Disks.RegisterAsync("/img/mid.qcow2", DiskFormat.Qcow2, 1, baseImage.Id);
        var top1 = await inv.Disks.RegisterAsync("/vm/web1.qcow2", DiskFormat.Qcow2, 1, mid.Id);
        var top2 = await inv.Disks.RegisterAsync("/vm/web2.qcow2", DiskFormat.Qcow2, 1, mid.Id);

        var chain1 = await inv.Reservations.ReserveChainAsync(top1.Id, w.H1.Id, w.Web1.Id, readOnly: false);
        Assert.Equal([(top1.Id, ReservationMode.Exclusive), (mid.Id, ReservationMode.Shared), (baseImage.Id, ReservationMode.Shared)],
            chain1.Select(r => (r.Disk, r.Mode)));
        var chain2 = await inv.Reservations.ReserveChainAsync(top2.Id, w.H2.Id, w.Web2.Id, readOnly: false);
        Assert.Equal(3, chain2.Count);

        // db1 wants web1's top image: refused, and none of its chain (mid, base: free to share) is reserved.
        var refused = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveChainAsync(top1.Id, w.H2.Id, w.Db1.Id, readOnly: false));
        Assert.Equal(RpcErrorCode.Conflict, refused.Code);
        Assert.Contains("disk '/vm/web1.qcow2' is reserved exclusive by VM 'web1' on host 'host-1', and cannot be reserved exclusive by VM 'db1' on host 'host-2'", refused.Message);
        // A conflict below the top: the top (reserved first) is rolled back too.
        var top3 = await inv.Disks.RegisterAsync("/vm/db1.qcow2", DiskFormat.Qcow2, 1, top1.Id);
        var below = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveChainAsync(top3.Id, w.H2.Id, w.Db1.Id, readOnly: false));
        Assert.Contains("disk '/vm/web1.qcow2' is reserved exclusive by VM 'web1' on host 'host-1', and cannot be reserved shared by VM 'db1'", below.Message);
        Assert.DoesNotContain(await inv.Reservations.ListAsync(), r => r.HolderVm == w.Db1.Id);

        // Read-only: every image shared, so another holder's writable use of the top is refused.
        var top4 = await inv.Disks.RegisterAsync("/vm/ro.qcow2", DiskFormat.Qcow2, 1, mid.Id);
        var ro = await inv.Reservations.ReserveChainAsync(top4.Id, w.H1.Id, w.Db1.Id, readOnly: true);
        Assert.All(ro, r => Assert.Equal(ReservationMode.Shared, r.Mode));
        var writer = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveChainAsync(top4.Id, w.H2.Id, null, readOnly: false));
        Assert.Contains("disk '/vm/ro.qcow2' is reserved shared by VM 'db1' on host 'host-1', and cannot be reserved exclusive by host 'host-2'", writer.Message);
        Assert.Equal(3, await inv.Reservations.ReleaseAllAsync(w.H1.Id, w.Db1.Id));
        Assert.Equal(6, (await inv.Reservations.ListAsync()).Count);
        Assert.Equal(3, (await EventsAsync(inv, "reservation.released")).Count);
    }

    [SkippableFact]
    public async Task A_reservation_under_a_stale_lease_is_refused_and_one_under_the_current_lease_keeps_its_token()
    {
        await using var w = await WorldAsync();
        var inv = w.Inv;
        var disk = await inv.Disks.RegisterAsync("/vm/web1.qcow2", DiskFormat.Qcow2, 1);
        var old = await inv.Leases.AcquireAsync(LeaseKind.Vm, w.Web1.Id, w.H1.Id, TimeSpan.FromMinutes(5));
        var now = await inv.Leases.AcquireAsync(LeaseKind.Vm, w.Web1.Id, w.H1.Id, TimeSpan.FromMinutes(5));

        var stale = await Assert.ThrowsAsync<InventoryException>(() => inv.Reservations.ReserveChainAsync(disk.Id, w.H1.Id, w.Web1.Id, false, old.Token));
        Assert.Equal(RpcErrorCode.StaleLease, stale.Code);
        Assert.Contains("lease generation 1 of host 'host-1' on vm/web1 is stale: the lease is held by host 'host-1' at generation 2", stale.Message);
        Assert.Empty(await inv.Reservations.ListAsync());

        var made = await inv.Reservations.ReserveAsync(disk.Id, w.H1.Id, w.Web1.Id, ReservationMode.Exclusive, now.Token);
        Assert.Equal(now.Token, made.Lease);
        Assert.Equal(now.Token, (await inv.Reservations.ListAsync()).Single().Lease);
        await Assert.ThrowsAsync<ArgumentException>(() => inv.Reservations.ReserveAsync(disk.Id, w.H2.Id, w.Web1.Id, ReservationMode.Exclusive, now.Token));
    }

    [SkippableFact]
    public async Task Releasing_and_breaking_record_events_and_only_lost_claims_are_broken()
    {
        await using var w = await WorldAsync();
        var inv = w.Inv;
        var a = await inv.Disks.RegisterAsync("/d/a.qcow2", DiskFormat.Qcow2, 1);
        var b = await inv.Disks.RegisterAsync("/d/b.qcow2", DiskFormat.Qcow2, 1);
        var c = await inv.Disks.RegisterAsync("/d/c.qcow2", DiskFormat.Qcow2, 1);
        var d = await inv.Disks.RegisterAsync("/d/d.qcow2", DiskFormat.Qcow2, 1);
        // Short, but long enough to be live at the first break below even on a loaded machine (1 s was not).
        var shortLease = await inv.Leases.AcquireAsync(LeaseKind.Vm, w.Web1.Id, w.H1.Id, TimeSpan.FromSeconds(6));
        var longLease = await inv.Leases.AcquireAsync(LeaseKind.Vm, w.Web2.Id, w.H1.Id, TimeSpan.FromMinutes(5));
        await inv.Reservations.ReserveAsync(a.Id, w.H1.Id, w.Web1.Id, ReservationMode.Exclusive, shortLease.Token);
        await inv.Reservations.ReserveAsync(b.Id, w.H1.Id, w.Web2.Id, ReservationMode.Exclusive, longLease.Token);
        await inv.Reservations.ReserveAsync(c.Id, w.H2.Id, null, ReservationMode.Exclusive);
        await inv.Reservations.ReserveAsync(d.Id, w.H1.Id, w.Db1.Id, ReservationMode.Shared);

        Assert.True(await inv.Reservations.ReleaseAsync(d.Id, w.H1.Id, w.Db1.Id));
        Assert.False(await inv.Reservations.ReleaseAsync(d.Id, w.H1.Id, w.Db1.Id));
        var released = Assert.Single(await EventsAsync(inv, "reservation.released"));
        Assert.Equal(($"disk/{d.Id}", w.H1.Id), (released.Subject, released.Host));

        // Nothing is lost yet: every lease is live and every heartbeat fresh.
        Assert.Empty(await inv.Reservations.BreakAsync(w.H2.Id, TimeSpan.FromMinutes(1)));
        await WaitUntilExpiredAsync(inv, LeaseKind.Vm, w.Web1.Id);
        await using (var conn = await inv.DataSource.OpenConnectionAsync())
            await conn.ExecuteAsync("update hosts set last_seen = now() - interval '1 hour' where id = @id", new { id = w.H2.Id });

        var broken = await inv.Reservations.BreakAsync(w.H1.Id, TimeSpan.FromMinutes(1));
        Assert.Equal([a.Id, c.Id], broken.Select(r => r.Disk));
        Assert.Equal([b.Id], (await inv.Reservations.ListAsync()).Select(r => r.Disk));
        var events = await EventsAsync(inv, "reservation.broken");
        Assert.Equal(new[] { $"disk/{a.Id}", $"disk/{c.Id}" }.Order(StringComparer.Ordinal), events.Select(e => e.Subject).Order(StringComparer.Ordinal));
        Assert.All(events, e => Assert.Equal(w.H1.Id, e.Host));
        Assert.Contains(events, e => JsonDocument.Parse(e.Data).RootElement.GetProperty("lease_generation").GetInt64() == shortLease.Token.Generation);

        // A disk's reservations only, when named.
        await inv.Reservations.ReserveAsync(a.Id, w.H2.Id, null, ReservationMode.Exclusive);
        Assert.Empty(await inv.Reservations.BreakAsync(w.H1.Id, TimeSpan.FromMinutes(1), b.Id));
        Assert.Single(await inv.Reservations.BreakAsync(w.H1.Id, TimeSpan.FromMinutes(1), a.Id));
    }
}
