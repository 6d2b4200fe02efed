using System.Globalization;
using System.Text.Json;
using Kvm.Cluster.Supervision;
using Kvm.Control;
using Kvm.Inventory;
using Kvm.Rpc;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster;

/// <summary>
/// Forks through kvmd: each fork of a template (a snapshot saved with stop, a checkpoint, or a
/// checkpoint kvmd takes of a running VM for it) is a VM of its own in the inventory, with disks
/// kvmd made for it (qcow2 children of the template's, registered and reserved as any VM's when it
/// starts), MACs of its own and a new generation id; kvm-vmm runs it on RAM mapped from the
/// template's memory file (kvm-vmm --restore DIR --fork-spec FILE).
/// </summary>
public sealed partial class Kvmd
{
    /// <summary>The most forks one vm.fork makes.</summary>
    public const int MaxForks = 64;

    public async Task<VmForked> ForkAsync(ForkVmRequest request, CancellationToken cancel)
    {
        CheckName(request.Name);
        if (request.Count is < 1 or > MaxForks)
            throw new RpcException(RpcErrorCode.InvalidParams, $"vm.fork: count {request.Count} is out of range (1 to {MaxForks})");
        string template;
        Kvm.Control.CheckpointResult? checkpoint = null;
        if (request.From is { } from)
        {
            CheckSnapshotDirectory("vm.fork", from);
            template = Path.GetFullPath(from);
        }
        else
        {
            // The running VM's state now, as a checkpoint in its state directory: it goes on running.
            if (_supervisor.Find(request.Name) is null)
                throw new RpcException(RpcErrorCode.InvalidState,
                    $"VM '{request.Name}' does not run on this host: fork a running VM, or a snapshot of it ('vmctl fork {request.Name} --from DIR')");
            template = Path.Combine(_supervisor.FilesOf(request.Name).StateDirectory,
                "fork-template-" + DateTimeOffset.UtcNow.ToString("yyyyMMdd-HHmmss-fff", CultureInfo.InvariantCulture));
            checkpoint = (await CheckpointAsync(new CheckpointVmRequest(request.Name, template), cancel).ConfigureAwait(false)).Checkpoint;
        }
        VmSpec saved;
        try
        {
            saved = VmSnapshot.SpecOf(SnapshotReader.Read(template), template);
        }
        catch (Exception e) when (e is SnapshotFormatException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw RpcException.Wrap($"vm.fork: cannot fork the snapshot in {template}", e, RpcErrorCode.InvalidParams);
        }
        var restart = (await _db.Vms.FindAsync(request.Name, cancel).ConfigureAwait(false))?.RestartPolicy ?? VmRestartPolicy.No;

        var forks = new List<ForkedVmInfo>();
        int next = 1;
        for (int n = 0; n < request.Count; n++)
        {
            string name;
            while (true)
            {
                name = $"{request.Name}-{next.ToString(CultureInfo.InvariantCulture)}";
                next++;
                if (!InventoryNames.IsValid(name))
                    throw new RpcException(RpcErrorCode.InvalidParams, $"vm.fork: {InventoryNames.NotAllowed("fork name", name)}");
                if (await _db.Vms.FindAsync(name, cancel).ConfigureAwait(false) is null && _supervisor.Find(name) is null)
                    break;
            }
            try
            {
                forks.Add(await MakeForkAsync(name, template, saved, restart, request.Name, cancel).ConfigureAwait(false));
            }
            catch (RpcException e) when (forks.Count > 0)
            {
                throw RpcException.Wrap($"vm.fork: made {string.Join(", ", forks.Select(f => f.Vm.Name))}, then", e, e.Code);
            }
        }
        return new VmForked(template, checkpoint, forks);
    }

    /// <summary>Makes fork <paramref name="name"/>'s disks and VM row, and starts it from <paramref name="template"/>.</summary>
    private Task<ForkedVmInfo> MakeForkAsync(string name, string template, VmSpec saved, VmRestartPolicy restart, string parent, CancellationToken cancel) =>
        WithVmAsync(name, async () =>
        {
            string directory = Path.Combine(_supervisor.FilesOf(name).StateDirectory, "fork");
            VmSpec spec;
            try
            {
                spec = await Task.Run(() => VmFork.Prepare(saved, directory), CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or Kvm.Storage.ImageFormatException or ArgumentException)
            {
                throw RpcException.Wrap($"cannot make fork '{name}' of the snapshot in {template}", e, RpcErrorCode.OperationFailed);
            }
            VmRow row;
            try
            {
                row = await _db.Vms.CreateAsync(name, VmSpecJsonContext.Format(spec), restart, ct: cancel).ConfigureAwait(false);
            }
            catch
            {
                foreach (var disk in spec.Disks.Where(d => Path.GetDirectoryName(Path.GetFullPath(d.Path)) == directory))
                    File.Delete(disk.Path);
                throw;
            }
            var info = await StartLockedAsync(row, cancel, restore: new VmRestore(template, "mapped", Fork: true)).ConfigureAwait(false);
            var status = await _supervisor.StatusAsync(name, CancellationToken.None).ConfigureAwait(false);
            var macs = spec.Nics.Select(n => n.Mac.ToString()).ToArray();
            var disks = spec.Disks.Select(d => d.Path).ToArray();
            LogForked(_logger, name, template, string.Join(", ", macs));
            await _db.Events.AppendAsync("vm.forked", $"vm/{name}",
                JsonSerializer.Serialize(new ForkedEventData(template, parent, disks, macs, status?.GenerationId), KvmdEventJson.Default.ForkedEventData),
                Host.Id, CancellationToken.None).ConfigureAwait(false);
            return new ForkedVmInfo(info, disks, macs, status?.GenerationId);
        }, cancel);

    [LoggerMessage(EventId = 2109, Level = LogLevel.Information, Message = "VM '{Name}': a fork of the snapshot in {Template}, MACs {Macs}")]
    private static partial void LogForked(ILogger logger, string name, string template, string macs);
}

/// <summary>The data of a vm.forked event: the template, the VM the fork is named after, its disks, MACs and generation id.</summary>
public sealed record ForkedEventData(string Template, string Parent, IReadOnlyList<string> Disks, IReadOnlyList<string> Macs, Guid? GenerationId);
