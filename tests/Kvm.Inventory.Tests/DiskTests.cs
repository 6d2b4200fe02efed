using Kvm.Rpc;
using static Kvm.Inventory.Tests.InventoryTestKit;

namespace Kvm.Inventory.Tests;

/// <summary>Disks on a real server: registration, look-ups, backing chains, and deletion refused while in use.</summary>
[Collection(ClusterCollection.Name)]
public sealed class DiskTests(ClusterFixture cluster)
{
    [SkippableFact]
    public async Task Disks_register_and_are_found_by_id_and_path_listed_and_followed_down_their_backing_chain()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var baseImage = await inv.Disks.RegisterAsync("/img/base.raw", DiskFormat.Raw, 10L << 30);
        var mid = await inv.Disks.RegisterAsync("/img/mid.qcow2", DiskFormat.Qcow2, 10L << 30, baseImage.Id);
        var top = await inv.Disks.RegisterAsync("/vm/web1.qcow2", DiskFormat.Qcow2, 10L << 30, mid.Id, h1.Id);

        Assert.Equal(("/vm/web1.qcow2", DiskFormat.Qcow2, 10L << 30, mid.Id, h1.Id), (top.Path, top.Format, top.SizeBytes, top.Backing, top.Host));
        Assert.Equal(top, await inv.Disks.FindAsync(top.Id));
        Assert.Equal(baseImage, await inv.Disks.FindByPathAsync("/img/base.raw"));
        Assert.Null(await inv.Disks.FindByPathAsync("/img/none"));
        Assert.Null(await inv.Disks.FindAsync(Guid.NewGuid()));
        Assert.Equal(["/img/base.raw", "/img/mid.qcow2", "/vm/web1.qcow2"], (await inv.Disks.ListAsync()).Select(d => d.Path));
        Assert.Equal([top.Id, mid.Id, baseImage.Id], (await inv.Disks.ChainAsync(top.Id)).Select(d => d.Id));
        Assert.Equal([baseImage.Id], (await inv.Disks.ChainAsync(baseImage.Id)).Select(d => d.Id));
        Assert.Equal(RpcErrorCode.NotFound, (await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.ChainAsync(Guid.NewGuid()))).Code);

        var registered = await EventsAsync(inv, "disk.");
        Assert.Equal([$"disk/{baseImage.Id}", $"disk/{mid.Id}", $"disk/{top.Id}"], registered.Select(e => e.Subject));
        Assert.Equal(h1.Id, registered[2].Host);
    }

    [SkippableFact]
    public async Task Bad_registrations_name_what_is_wrong()
    {
        await using var inv = await OpenAsync(cluster);
        await inv.Disks.RegisterAsync("/img/a.qcow2", DiskFormat.Qcow2, 1);
        var dup = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.RegisterAsync("/img/a.qcow2", DiskFormat.Raw, 1));
        Assert.Equal((RpcErrorCode.AlreadyExists, "a disk at '/img/a.qcow2' is already registered"), (dup.Code, dup.Message));
        var relative = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.RegisterAsync("img/b.qcow2", DiskFormat.Raw, 1));
        Assert.Equal((RpcErrorCode.InvalidParams, "disk path 'img/b.qcow2' is not absolute"), (relative.Code, relative.Message));
        var negative = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.RegisterAsync("/img/b.qcow2", DiskFormat.Raw, -1));
        Assert.Equal(RpcErrorCode.InvalidParams, negative.Code);
        var missing = Guid.NewGuid();
        var noBacking = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.RegisterAsync("/img/b.qcow2", DiskFormat.Qcow2, 1, missing));
        Assert.Equal((RpcErrorCode.NotFound, $"backing disk {missing} of '/img/b.qcow2' does not exist"), (noBacking.Code, noBacking.Message));
        var noHost = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.RegisterAsync("/img/b.qcow2", DiskFormat.Qcow2, 1, host: missing));
        Assert.Equal(RpcErrorCode.NotFound, noHost.Code);
        Assert.Single(await inv.Disks.ListAsync());
    }

    [SkippableFact]
    public async Task A_disk_is_not_deleted_while_reserved_or_backing_another_and_is_once_free()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var baseImage = await inv.Disks.RegisterAsync("/img/base.raw", DiskFormat.Raw, 1);
        var top = await inv.Disks.RegisterAsync("/vm/web1.qcow2", DiskFormat.Qcow2, 1, baseImage.Id);
        await inv.Reservations.ReserveAsync(top.Id, h1.Id, vm.Id, ReservationMode.Exclusive);

        var reserved = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.DeleteAsync(top.Id));
        Assert.Equal((RpcErrorCode.InvalidState, "disk '/vm/web1.qcow2' is reserved by VM 'web1' on host 'host-1' (exclusive): it cannot be deleted until released"),
            (reserved.Code, reserved.Message));
        var backing = await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.DeleteAsync(baseImage.Id));
        Assert.Equal("disk '/img/base.raw' is the backing image of '/vm/web1.qcow2': it cannot be deleted", backing.Message);
        Assert.Equal(2, (await inv.Disks.ListAsync()).Count);

        await inv.Reservations.ReleaseAsync(top.Id, h1.Id, vm.Id);
        await inv.Disks.DeleteAsync(top.Id);
        await inv.Disks.DeleteAsync(baseImage.Id);
        Assert.Empty(await inv.Disks.ListAsync());
        Assert.Equal(2, (await EventsAsync(inv, "disk.deleted")).Count);
        Assert.Equal(RpcErrorCode.NotFound, (await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.DeleteAsync(top.Id))).Code);
    }

    /// <summary>
    /// A layer folded into the images it backed (a checkpoint deleted) leaves the inventory at once:
    /// they are backed by its backing image now, its reservations end though a VM held it, and
    /// 'disk.folded' names it and them; a disk that is not there is NotFound.
    /// </summary>
    [SkippableFact]
    public async Task A_folded_layer_is_forgotten_and_what_it_backed_is_backed_by_its_backing()
    {
        await using var inv = await OpenAsync(cluster);
        var h1 = await inv.Hosts.RegisterAsync("host-1", "");
        var vm = await inv.Vms.CreateAsync("web1", "{}");
        var baseImage = await inv.Disks.RegisterAsync("/img/base.raw", DiskFormat.Raw, 1 << 20);
        var frozen = await inv.Disks.RegisterAsync("/vm/web1.ckpt-1.qcow2", DiskFormat.Qcow2, 1 << 20, baseImage.Id);
        var top = await inv.Disks.RegisterAsync("/vm/web1.ckpt-2.qcow2", DiskFormat.Qcow2, 1 << 20, frozen.Id);
        var sibling = await inv.Disks.RegisterAsync("/ckpt/disk0.qcow2", DiskFormat.Qcow2, 1 << 20, frozen.Id);
        await inv.Reservations.ReserveChainAsync(top.Id, h1.Id, vm.Id, readOnly: false);

        var backed = await inv.Disks.ForgetFoldedAsync(frozen.Id);
        Assert.Equal(["/ckpt/disk0.qcow2", "/vm/web1.ckpt-2.qcow2"], backed);
        Assert.Null(await inv.Disks.FindAsync(frozen.Id));
        Assert.Equal(baseImage.Id, (await inv.Disks.FindAsync(top.Id))!.Backing);
        Assert.Equal(baseImage.Id, (await inv.Disks.FindAsync(sibling.Id))!.Backing);
        Assert.Equal([top.Id, baseImage.Id], (await inv.Disks.ChainAsync(top.Id)).Select(d => d.Id));
        Assert.Equal(new[] { top.Id, baseImage.Id }.Order(), (await inv.Reservations.ListAsync()).Select(r => r.Disk).Order());
        var folded = Assert.Single(await EventsAsync(inv, "disk.folded"));
        Assert.Equal($"disk/{frozen.Id}", folded.Subject);
        Assert.Contains("/vm/web1.ckpt-2.qcow2", folded.Data, StringComparison.Ordinal);
        Assert.Equal(RpcErrorCode.NotFound, (await Assert.ThrowsAsync<InventoryException>(() => inv.Disks.ForgetFoldedAsync(frozen.Id))).Code);
    }
}
