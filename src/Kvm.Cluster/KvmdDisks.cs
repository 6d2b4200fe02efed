using Kvm.Inventory;
using Kvm.Rpc;
using Kvm.Storage;
using Kvm.Vmm.Machine;

namespace Kvm.Cluster;

/// <summary>
/// Disk reservations: a VM's disks are reserved before it starts, under its lease: each writable
/// image exclusively, read-only images and every backing image shared. A disk another VM holds in
/// a conflicting way stops the start, naming that VM and its host. Reservations go when the VM
/// ends; those made under a lease that has since moved on (the VM's host froze or died) are broken
/// by the host that takes the VM over.
/// </summary>
public sealed partial class Kvmd
{
    /// <summary>How long without a heartbeat before a reservation made without a lease may be broken.</summary>
    private TimeSpan ReservationHeartbeatTimeout => _options.LeaseDuration * 3;

    /// <summary>Registers every image of the VM's disks (with its backing chain) and reserves them all, or none.</summary>
    private async Task ReserveDisksAsync(VmRow row, VmSpec spec, LeaseToken token, CancellationToken cancel)
    {
        var tops = new List<(Guid Id, bool ReadOnly)>();
        foreach (var disk in spec.Disks)
            tops.Add((await RegisterChainAsync(row.Name, disk.Path, cancel).ConfigureAwait(false), disk.ReadOnly));
        try
        {
            foreach (var (id, readOnly) in tops)
            {
                // A reservation left by this VM's previous host, whose lease has moved on, is broken first.
                await _db.Reservations.BreakAsync(Host.Id, ReservationHeartbeatTimeout, id, cancel).ConfigureAwait(false);
                await _db.Reservations.ReserveChainAsync(id, Host.Id, row.Id, readOnly, token, cancel).ConfigureAwait(false);
            }
        }
        catch
        {
            await _db.Reservations.ReleaseAllAsync(Host.Id, row.Id, CancellationToken.None).ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>The inventory's id of the image at <paramref name="path"/>, registering it and its backing chain (bottom first) when new.</summary>
    private async Task<Guid> RegisterChainAsync(string vm, string path, CancellationToken cancel)
    {
        // Registered already (with its chain, when first registered): the image is not opened,
        // which a VM running on it may forbid (its kvm-vmm locks it), and the reservation decides.
        if (await _db.Disks.FindByPathAsync(Path.GetFullPath(path), cancel).ConfigureAwait(false) is { } known)
            return known.Id;
        ImageInfo top;
        try
        {
            using var image = DiskImage.Open(path, new ImageOpenOptions { ReadOnly = true });
            top = ImageInfo.Of(image);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ImageFormatException or InvalidDataException or ArgumentException)
        {
            throw new RpcException(RpcErrorCode.InvalidState, $"cannot start VM '{vm}': its disk {path} cannot be opened", inner: e);
        }
        Guid? below = null;
        foreach (var layer in top.Chain().Reverse())
        {
            string full = Path.GetFullPath(layer.Path);
            var row = await _db.Disks.FindByPathAsync(full, cancel).ConfigureAwait(false);
            if (row is null)
            {
                var format = layer.Format == "raw" ? DiskFormat.Raw : DiskFormat.Qcow2;
                try
                {
                    row = await _db.Disks.RegisterAsync(full, format, (long)layer.VirtualSize, below, null, cancel).ConfigureAwait(false);
                }
                catch (RpcException e) when (e.Code == RpcErrorCode.AlreadyExists)
                {
                    // Another host registered it at the same moment.
                    row = await _db.Disks.FindByPathAsync(full, cancel).ConfigureAwait(false)
                        ?? throw new RpcException(RpcErrorCode.OperationFailed, $"disk {full} is registered and gone at once", inner: e);
                }
            }
            below = row.Id;
        }
        return below!.Value;
    }

    /// <summary>Releases the VM's disk reservations (on this host).</summary>
    private async Task ReleaseDisksAsync(VmRow row, CancellationToken cancel)
    {
        try
        {
            await _db.Reservations.ReleaseAllAsync(Host.Id, row.Id, cancel).ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            LogStale(_logger, row.Name, $"its disk reservations stay until broken: {e.Message}");
        }
    }

    public async Task<DiskList> DisksAsync(CancellationToken cancel)
    {
        var disks = await _db.Disks.ListAsync(cancel).ConfigureAwait(false);
        var reservations = await _db.Reservations.ListAsync(null, cancel).ConfigureAwait(false);
        var paths = disks.ToDictionary(d => d.Id, d => d.Path);
        return new DiskList(disks.Select(d => new DiskInfo(d.Id, d.Path, StateNames.Of(d.Format), d.SizeBytes,
            d.Backing is { } b && paths.TryGetValue(b, out var bp) ? bp : null,
            reservations.Where(r => r.Disk == d.Id)
                .Select(r => new ReservationInfo(StateNames.Of(r.Mode), r.HolderHostName, r.HolderVmName, r.Lease?.Generation)).ToList())).ToList());
    }

    public async Task<LeaseList> LeasesAsync(CancellationToken cancel)
    {
        var leases = await _db.Leases.ListAsync(cancel).ConfigureAwait(false);
        var vms = (await _db.Vms.ListAsync(cancel).ConfigureAwait(false)).ToDictionary(v => v.Id, v => v.Name);
        var disks = (await _db.Disks.ListAsync(cancel).ConfigureAwait(false)).ToDictionary(d => d.Id, d => d.Path);
        return new LeaseList(leases.Select(l => new LeaseInfo(LeaseNames.Of(l.Kind), l.ResourceId,
            l.Kind == LeaseKind.Vm && vms.TryGetValue(l.ResourceId, out var vm) ? vm
                : l.Kind == LeaseKind.Disk && disks.TryGetValue(l.ResourceId, out var disk) ? disk : null,
            l.OwnerName, l.ExpiresAt, l.Generation)).ToList());
    }
}
