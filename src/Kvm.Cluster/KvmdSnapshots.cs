using System.Globalization;
using System.Text.Json;
using Kvm.Cluster.Supervision;
using Kvm.Control;
using Kvm.Hypervisor;
using Kvm.Inventory;
using Kvm.Rpc;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster;

/// <summary>
/// Save, start from a snapshot, and upgrade in place, for the VMs kvmd runs: each is the VM's
/// kvm-vmm doing it (control methods save and handover, kvm-vmm --restore) under kvmd's
/// supervision, with the inventory saying what happened. A VM saved with stop is recorded as a
/// stop asked for; a VM upgraded in place goes on running in its new process, which kvmd tracks
/// instead of the old one (whose exit is not an end of the VM).
/// </summary>
public sealed partial class Kvmd
{
    /// <summary>How long a VM saved with stop, or an old kvm-vmm that handed its VM over, may take to exit.</summary>
    private static readonly TimeSpan ExitTimeout = TimeSpan.FromSeconds(60);

    public Task<VmSaved> SaveAsync(SaveVmRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        CheckSnapshotDirectory("vm.save", request.Directory);
        var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
        var process = RunningHere(row);
        if (request.Stop)
        {
            // Wanted stopped from here on: its end is a stop asked for, which no restart policy undoes.
            await _db.Vms.SetDesiredStateAsync(row.Name, VmDesiredState.Stopped, cancel).ConfigureAwait(false);
            await SetActualAsync(row.Name, VmActualState.Stopping, cancel).ConfigureAwait(false);
        }
        SaveResult result;
        try
        {
            // Not cancelled with the caller: a save under way ends as kvm-vmm ends it, and is recorded so.
            using var client = _supervisor.Connect(row.Name);
            result = await client.CallAsync("save", new SaveRequest(request.Directory, request.Stop, request.WorkingSetSeconds, request.RequireWorkingSet),
                VmControlJson.Default.SaveRequest, VmControlJson.Default.SaveResult, CancellationToken.None).ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            // A save that fails leaves the VM as it was.
            if (request.Stop && !process.Exited.IsCompleted)
            {
                await SetActualAsync(row.Name, row.ActualState, CancellationToken.None).ConfigureAwait(false);
                await _db.Vms.SetDesiredStateAsync(row.Name, row.DesiredState, CancellationToken.None).ConfigureAwait(false);
            }
            throw RpcException.Wrap($"VM '{row.Name}': save to {request.Directory} failed", e, e.Code);
        }
        LogSaved(_logger, row.Name, result.Directory, result.PausedSeconds * 1000, request.Stop);
        await _db.Events.AppendAsync("vm.saved", $"vm/{row.Name}",
            JsonSerializer.Serialize(new SavedEventData(result.Directory, request.Stop, Math.Round(result.PausedSeconds * 1000, 1), result.Seconds,
                result.StateBytes, result.MemoryBytesWritten, result.WorkingSetPages ?? 0), KvmdEventJson.Default.SavedEventData),
            Host.Id, CancellationToken.None).ConfigureAwait(false);
        if (request.Stop)
        {
            // kvm-vmm exits once stopped; its end (a stop asked for: "stopped after saving to DIR")
            // is recorded here, before the answer, as vm.stop does.
            var exit = await process.Exited.WaitAsync(ExitTimeout, CancellationToken.None).ConfigureAwait(false);
            if (process.TryMarkRecorded())
                await RecordExitAsync(row.Name, exit, whileAway: false, CancellationToken.None).ConfigureAwait(false);
        }
        var now = await _db.Vms.GetAsync(row.Name, CancellationToken.None).ConfigureAwait(false);
        return new VmSaved(row.Name, result, Info(now));
    }, cancel);

    /// <summary>
    /// vm.checkpoint: the VM's kvm-vmm takes a live checkpoint (control method checkpoint), then
    /// kvmd records what changed: each writable disk runs on a new top image (a child of the one it
    /// ran on, which the checkpoint keeps frozen), so the inventory registers that image (backed by
    /// the old top), reserves the chain again (the new top exclusive, the old one shared now) and
    /// stores the VM's spec naming it, so that a restart runs the VM on it and never writes the
    /// frozen layer. The disks are taken from what kvm-vmm reports after the call, so a checkpoint
    /// that failed after the stop (the VM moved on, the checkpoint did not complete) is recorded too.
    /// Records vm.checkpointed.
    /// </summary>
    public Task<VmCheckpointed> CheckpointAsync(CheckpointVmRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        CheckSnapshotDirectory("vm.checkpoint", request.Directory);
        if (request.BytesPerSecond is <= 0)
            throw new RpcException(RpcErrorCode.InvalidParams, $"vm.checkpoint: bytesPerSecond {request.BytesPerSecond} must be positive");
        var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
        RunningHere(row);
        var spec = VmSpecJsonContext.Parse(row.Spec, $"of VM '{row.Name}' in the inventory");
        Kvm.Control.CheckpointResult? result = null;
        RpcException? failure = null;
        try
        {
            // Not cancelled with the caller: a checkpoint under way ends as kvm-vmm ends it, and is recorded so.
            using var client = _supervisor.Connect(row.Name);
            result = await client.CallAsync("checkpoint", new CheckpointRequest(request.Directory, request.BytesPerSecond, request.CopyDisks),
                VmControlJson.Default.CheckpointRequest, VmControlJson.Default.CheckpointResult, CancellationToken.None).ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            failure = e;
        }
        // Where the disks are now: the reply's layers, or (after a failure, or a lost reply) what kvm-vmm says.
        IReadOnlyList<string>? now = result is not null
            ? spec.Disks.Select((d, i) => result.Layers[i] ?? d.Path).ToList()
            : (await _supervisor.StatusAsync(row.Name, CancellationToken.None).ConfigureAwait(false))?.Disks;
        var moved = await RecordNewLayersAsync(row, spec, now).ConfigureAwait(false);
        if (failure is not null)
            throw RpcException.Wrap($"VM '{row.Name}': checkpoint to {request.Directory} failed" +
                (moved.Count > 0 ? $" (after the stop: the VM runs on {string.Join(", ", moved)}, recorded in the inventory)" : ""), failure, failure.Code);
        LogCheckpointed(_logger, row.Name, result!.Directory, Math.Round(result.StopSeconds * 1000, 1), Math.Round(result.Seconds, 3));
        await _db.Events.AppendAsync("vm.checkpointed", $"vm/{row.Name}",
            JsonSerializer.Serialize(new CheckpointedEventData(result.Directory, Math.Round(result.StopSeconds * 1000, 1), result.Seconds,
                result.MemoryBytesWritten, result.Layers, result.Disks), KvmdEventJson.Default.CheckpointedEventData),
            Host.Id, CancellationToken.None).ConfigureAwait(false);
        return new VmCheckpointed(row.Name, result, Info(await _db.Vms.GetAsync(row.Name, CancellationToken.None).ConfigureAwait(false)));
    }, cancel);

    /// <summary>
    /// vm.delete-checkpoint: deletes VM <paramref name="request"/>.Name's checkpoint in its
    /// directory (<see cref="VmCheckpoint.Delete"/>: the layer it kept frozen is folded into the
    /// next, refused while a VM writes that layer or runs on the checkpoint), then records it: each
    /// folded layer leaves the inventory, the disks it backed backed by its own backing now
    /// (<c>disk.folded</c>), and the checkpoint's own disks are forgotten. Records vm.checkpoint-deleted.
    /// </summary>
    public Task<CheckpointDeleted> DeleteCheckpointAsync(DeleteCheckpointRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        CheckSnapshotDirectory("vm.delete-checkpoint", request.Directory);
        string directory = Path.GetFullPath(request.Directory);
        var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
        IReadOnlyList<string> own, folded;
        try
        {
            var state = SnapshotReader.Read(directory);
            own = VmSnapshot.SpecOf(state, directory).Disks.Select(d => Path.GetFullPath(d.Path))
                .Where(p => Path.GetDirectoryName(p) == directory).ToArray();
            folded = await Task.Run(() => VmCheckpoint.Delete(directory), CancellationToken.None).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or SnapshotFormatException or Kvm.Storage.ImageFormatException)
        {
            throw new RpcException(e is IOException ? RpcErrorCode.InvalidState : RpcErrorCode.OperationFailed,
                $"VM '{row.Name}': cannot delete the checkpoint in {directory}", inner: e);
        }
        foreach (var layer in folded)
            if (await _db.Disks.FindByPathAsync(Path.GetFullPath(layer), CancellationToken.None).ConfigureAwait(false) is { } disk)
                await _db.Disks.ForgetFoldedAsync(disk.Id, CancellationToken.None).ConfigureAwait(false);
        // The checkpoint's own disks are gone from disk: gone from the inventory too, where registered.
        foreach (var image in own)
            if (await _db.Disks.FindByPathAsync(image, CancellationToken.None).ConfigureAwait(false) is { } disk)
                await _db.Disks.DeleteAsync(disk.Id, CancellationToken.None).ConfigureAwait(false);
        await _db.Events.AppendAsync("vm.checkpoint-deleted", $"vm/{row.Name}",
            JsonSerializer.Serialize(new CheckpointDeletedEventData(directory, folded), KvmdEventJson.Default.CheckpointDeletedEventData),
            Host.Id, CancellationToken.None).ConfigureAwait(false);
        return new CheckpointDeleted(row.Name, directory, folded);
    }, cancel);

    /// <summary>
    /// The VM's disks run on <paramref name="now"/> (per disk, the image it writes): each that
    /// differs from the spec's is registered (backed by the spec's image), the chains reserved
    /// again for the VM under its lease, and the spec stored naming them; returns the new images.
    /// Nothing when <paramref name="now"/> is unknown (null) or unchanged.
    /// </summary>
    private async Task<IReadOnlyList<string>> RecordNewLayersAsync(VmRow row, VmSpec spec, IReadOnlyList<string>? now)
    {
        if (now is null || now.Count != spec.Disks.Count)
            return [];
        var disks = spec.Disks.ToList();
        var moved = new List<string>();
        var token = LeaseOf(row.Name)
            ?? throw new RpcException(RpcErrorCode.StaleLease, $"VM '{row.Name}': this host no longer holds its lease; its new disk layers ({string.Join(", ", now)}) are not recorded");
        for (int i = 0; i < disks.Count; i++)
        {
            string was = Path.GetFullPath(disks[i].Path), top = Path.GetFullPath(now[i]);
            if (string.Equals(was, top, StringComparison.Ordinal))
                continue;
            var below = await _db.Disks.FindByPathAsync(was, CancellationToken.None).ConfigureAwait(false)
                ?? throw new RpcException(RpcErrorCode.OperationFailed, $"VM '{row.Name}': disk {i}'s image {was} is not in the inventory; its new top image {top} is not recorded");
            // The new top is held by the running VM (locked): it is registered from what is known, not opened.
            var layer = await _db.Disks.FindByPathAsync(top, CancellationToken.None).ConfigureAwait(false)
                ?? await _db.Disks.RegisterAsync(top, DiskFormat.Qcow2, below.SizeBytes, below.Id, null, CancellationToken.None).ConfigureAwait(false);
            await _db.Reservations.ReserveChainAsync(layer.Id, Host.Id, row.Id, disks[i].ReadOnly, token, CancellationToken.None).ConfigureAwait(false);
            disks[i] = disks[i] with { Path = top };
            moved.Add(top);
        }
        if (moved.Count == 0)
            return [];
        var updated = spec with { Disks = disks };
        string json = VmSpecJsonContext.Format(updated);
        await _db.Vms.SetSpecAsync(row.Name, json, $"checkpoint: disks moved onto {string.Join(", ", moved)}", token, CancellationToken.None).ConfigureAwait(false);
        if (_supervisor.Find(row.Name) is { } process)
            File.WriteAllText(process.Files.Spec, json);
        return moved;
    }

    public Task<VmUpgraded> UpgradeAsync(UpgradeVmRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        // By default the kvm-vmm kvmd starts VMs with now (after a package upgrade, the new one).
        string vmm = request.Vmm ?? Path.GetFullPath(_supervisor.VmmPath);
        if (!Path.IsPathFullyQualified(vmm))
            throw new RpcException(RpcErrorCode.InvalidParams, $"vm.upgrade: vmm '{vmm}' is not an absolute path (kvm-vmm does not run in the client's directory)");
        if (!File.Exists(vmm))
            throw new RpcException(RpcErrorCode.InvalidParams, $"vm.upgrade: the kvm-vmm to hand VM '{request.Name}' to, {vmm}, does not exist");
        var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
        var old = RunningHere(row);
        var before = await _supervisor.StatusAsync(row.Name, cancel).ConfigureAwait(false)
            ?? throw new RpcException(RpcErrorCode.OperationFailed, $"VM '{row.Name}': its kvm-vmm (pid {old.Pid}) does not answer on its control socket");
        // A VM handed over runs in its new process: one paused would run again behind the inventory's back.
        // (One left suspended by an upgrade that failed may be upgraded again: that is how it resumes, also by vm.resume.)
        if (before.State == "paused")
            throw new RpcException(RpcErrorCode.InvalidState, $"VM '{row.Name}' is paused: resume it first ('vmctl resume {row.Name}'); a VM handed to a new kvm-vmm runs there");

        int? successor = null;
        HandoverResult? result = null;
        RpcException? failure = null;
        old.BeginHandover();
        try
        {
            try
            {
                // Not cancelled with the caller: once begun, the hand-over ends as kvm-vmm ends it, and kvmd follows.
                using var client = _supervisor.Connect(row.Name);
                result = await client.CallAsync("handover", new HandoverRequest(vmm), VmControlJson.Default.HandoverRequest,
                    VmControlJson.Default.HandoverResult, CancellationToken.None).ConfigureAwait(false);
                successor = result.Pid;
            }
            catch (RpcException e)
            {
                failure = e;
                // The answer may be lost though the hand-over happened: the control socket says who runs the VM now.
                if (await _supervisor.StatusAsync(row.Name, CancellationToken.None).ConfigureAwait(false) is { } now && now.Pid != old.Pid)
                    successor = now.Pid;
            }
        }
        finally
        {
            old.EndHandover(successor);
        }

        if (successor is not { } pid)
        {
            // The VM stays in the old process: suspended (its disks closed) if the hand-over got that far.
            var status = await _supervisor.StatusAsync(row.Name, CancellationToken.None).ConfigureAwait(false);
            if (status?.State == "suspended")
                await SetActualAsync(row.Name, VmActualState.Paused, CancellationToken.None).ConfigureAwait(false);
            throw RpcException.Wrap($"VM '{row.Name}': upgrade to {vmm} failed; the VM stays {status?.State ?? "as it was"} in kvm-vmm pid {old.Pid}" +
                (status?.State == "suspended" ? $" ('vmctl resume {row.Name}' or 'vmctl upgrade {row.Name}' tries again)" : ""), failure!, failure!.Code);
        }

        var adopted = await _supervisor.AdoptSuccessorAsync(old, pid, CancellationToken.None).ConfigureAwait(false);
        if (adopted is null)
        {
            // The new process took the VM and is gone (or does not answer): the VM has ended, and nobody recorded how.
            var exit = new VmExit(null, $"kvm-vmm pid {pid}, which took the VM over from pid {old.Pid}, does not answer on the control socket", true);
            await RecordExitAsync(row.Name, exit, whileAway: false, CancellationToken.None).ConfigureAwait(false);
            throw new RpcException(RpcErrorCode.OperationFailed, $"VM '{row.Name}': {exit.Reason}; recorded as failed");
        }
        // The old process is no longer the VM's: its exit is not recorded (the supervisor does not report it either).
        old.TryMarkRecorded();
        if (row.ActualState != VmActualState.Running)
            await SetActualAsync(row.Name, VmActualState.Running, CancellationToken.None).ConfigureAwait(false);
        await RecordUpgradeAsync(new UpgradedEventData(old.Pid, pid, vmm, result is null ? 0 : Math.Round(result.PausedSeconds * 1000, 1), result?.Seconds ?? 0,
            failure is null ? null : $"the hand-over's answer was lost ({failure.Message}); the control socket answers with pid {pid}"), row.Name).ConfigureAwait(false);
        // The old process exits now (status 0, no exit record): wait for it, so that it is gone when the caller looks.
        try
        {
            await old.Exited.WaitAsync(ExitTimeout, CancellationToken.None).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            LogOldStays(_logger, row.Name, old.Pid);
        }
        var info = Info(await _db.Vms.GetAsync(row.Name, CancellationToken.None).ConfigureAwait(false));
        return new VmUpgraded(row.Name, old.Pid, result ?? new HandoverResult(pid, vmm, 0, 0, []), info);
    }, cancel);

    /// <summary>
    /// After kvm-vmm <paramref name="process"/> ended unrecorded (status 0 or unknown, no exit
    /// record of its own), as a kvm-vmm does once it has handed its VM over without kvmd asking
    /// ('vmctl control upgrade SOCKET'): if another kvm-vmm now answers on the VM's control socket,
    /// it runs the VM; kvmd adopts it as after vm.upgrade and records vm.upgraded. False when not.
    /// </summary>
    private async Task<bool> FollowHandoverAsync(VmProcess process, VmExit exit)
    {
        if (exit.Status is not (null or 0) || exit.Fenced || _supervisor.Find(process.Name) is not null
            || VmHost.ReadExitRecord(process.Files.ExitFile) is { } record && record.Pid == process.Pid)
            return false;
        if (await _supervisor.StatusAsync(process.Name, CancellationToken.None).ConfigureAwait(false) is not { } status || status.Pid == process.Pid)
            return false;
        if (await _supervisor.AdoptSuccessorAsync(process, status.Pid, CancellationToken.None).ConfigureAwait(false) is null)
            return false;
        await RecordUpgradeAsync(new UpgradedEventData(process.Pid, status.Pid, ExecutableOf(status.Pid) ?? "", 0, 0,
            $"handed over through its control socket, not through kvmd; found running in pid {status.Pid} when pid {process.Pid} exited"), process.Name).ConfigureAwait(false);
        return true;
    }

    /// <summary>
    /// A VM runs on in the kvm-vmm it was handed to, which kvmd has adopted: the new process's
    /// fence is armed with the lease kvmd holds, and the upgrade is logged and recorded (vm.upgraded).
    /// </summary>
    private async Task RecordUpgradeAsync(UpgradedEventData upgrade, string name)
    {
        if (_leases.TryGetValue(name, out var held))
            await ArmFenceAsync(name, held.SentAt, CancellationToken.None).ConfigureAwait(false);
        LogUpgraded(_logger, name, upgrade.OldPid, upgrade.NewPid, upgrade.Vmm, upgrade.PausedMs);
        await _db.Events.AppendAsync("vm.upgraded", $"vm/{name}", JsonSerializer.Serialize(upgrade, KvmdEventJson.Default.UpgradedEventData),
            Host.Id, CancellationToken.None).ConfigureAwait(false);
    }

    /// <summary>The executable process <paramref name="pid"/> runs (/proc/PID/exe), if it can be read.</summary>
    private static string? ExecutableOf(int pid)
    {
        try
        {
            return new FileInfo($"/proc/{pid}/exe").LinkTarget;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>A snapshot directory from a client: absolute (kvm-vmm does not run in the client's directory), else invalid params.</summary>
    private static void CheckSnapshotDirectory(string method, string directory)
    {
        if (string.IsNullOrEmpty(directory) || !Path.IsPathFullyQualified(directory))
            throw new RpcException(RpcErrorCode.InvalidParams, $"{method}: directory '{directory}' is not an absolute path (kvm-vmm does not run in the client's directory)");
    }

    /// <summary>The start from a snapshot that a vm.start asks for, checked as far as it can be without the VM; null for a boot.</summary>
    private static VmRestore? RestoreOf(StartVmRequest request)
    {
        if (request.From is null)
        {
            if (request.Memory is not null)
                throw new RpcException(RpcErrorCode.InvalidParams, "vm.start: memory applies only to a start from a snapshot (from)");
            return null;
        }
        CheckSnapshotDirectory("vm.start", request.From);
        string memory = request.Memory ?? "eager";
        if (memory is not ("eager" or "lazy" or "mapped"))
            throw new RpcException(RpcErrorCode.InvalidParams, $"vm.start: memory '{memory}' is not one of eager, lazy, mapped");
        return new VmRestore(Path.GetFullPath(request.From), memory);
    }

    /// <summary>
    /// Reads the snapshot a VM is to start from and checks its machine against the VM's spec
    /// (<see cref="SnapshotMismatches"/>); refused, saying why, before anything about the VM changes.
    /// </summary>
    private static void CheckSnapshot(string name, VmSpec spec, VmRestore restore)
    {
        VmSpec saved;
        try
        {
            var state = SnapshotReader.Read(restore.Directory);
            saved = VmSnapshot.SpecOf(state, restore.Directory);
        }
        catch (Exception e) when (e is SnapshotFormatException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw RpcException.Wrap($"cannot start VM '{name}' from the snapshot in {restore.Directory}", e, RpcErrorCode.InvalidParams);
        }
        // A fork runs on disks of its own (children of the snapshot's) with MACs of its own.
        var problems = restore.Fork ? VmFork.Mismatches(spec, saved) : SnapshotMismatches(spec, saved);
        if (problems.Count > 0)
            throw new RpcException(RpcErrorCode.InvalidParams,
                $"cannot start VM '{name}' from the snapshot in {restore.Directory}: the saved machine does not match the VM's spec: {string.Join("; ", problems)}");
    }

    /// <summary>
    /// Where the machine saved in a snapshot (<paramref name="saved"/>) differs from a VM's spec in
    /// what a restore cannot change or kvmd's bookkeeping depends on (<see cref="VmSnapshot.MachineMismatches"/>
    /// with the same disk images: kvmd reserves the VM's disks, the restored guest uses the saved
    /// ones). The kernel and command line do not count: the guest booted long ago. Empty when they match.
    /// </summary>
    public static IReadOnlyList<string> SnapshotMismatches(VmSpec spec, VmSpec saved) =>
        VmSnapshot.MachineMismatches(spec, saved, sameDiskImages: true);

    [LoggerMessage(EventId = 2104, Level = LogLevel.Information, Message = "VM '{Name}': saved to {Directory}, guest paused {PausedMs} ms{Stop}")]
    private static partial void LogSavedCore(ILogger logger, string name, string directory, double pausedMs, string stop);

    private static void LogSaved(ILogger logger, string name, string directory, double pausedMs, bool stop) =>
        LogSavedCore(logger, name, directory, Math.Round(pausedMs, 1), stop ? ", then stopped" : "");

    [LoggerMessage(EventId = 2108, Level = LogLevel.Information, Message = "VM '{Name}': checkpoint in {Directory}, guest stopped {StopMs} ms, {Seconds} s in all")]
    private static partial void LogCheckpointed(ILogger logger, string name, string directory, double stopMs, double seconds);

    [LoggerMessage(EventId = 2105, Level = LogLevel.Information, Message = "VM '{Name}': upgraded in place from kvm-vmm pid {OldPid} to pid {Pid} ({Vmm}), guest paused {PausedMs} ms")]
    private static partial void LogUpgraded(ILogger logger, string name, int oldPid, int pid, string vmm, double pausedMs);

    [LoggerMessage(EventId = 2106, Level = LogLevel.Warning, Message = "VM '{Name}': the old kvm-vmm (pid {Pid}) has not exited after handing the VM over")]
    private static partial void LogOldStays(ILogger logger, string name, int pid);

    [LoggerMessage(EventId = 2107, Level = LogLevel.Information, Message = "VM '{Name}': starting from the snapshot in {Directory} (memory {Memory})")]
    private static partial void LogStartingFrom(ILogger logger, string name, string directory, string memory);
}

/// <summary>The data of a vm.saved event: where, whether the VM stopped, the guest's pause, the bytes written.</summary>
public sealed record SavedEventData(string Directory, bool Stop, double PausedMs, double Seconds, long StateBytes, ulong MemoryBytesWritten, ulong WorkingSetPages);

/// <summary>The data of a vm.restored event: the VM started from the snapshot in <paramref name="Directory"/>.</summary>
public sealed record RestoredEventData(string Directory, string Memory);

/// <summary>The data of a vm.upgraded event: the kvm-vmm that ran the VM, the one that runs it now, and the guest's pause.</summary>
public sealed record UpgradedEventData(int OldPid, int NewPid, string Vmm, double PausedMs, double Seconds, string? Note);

/// <summary>The data of a vm.checkpointed event: where, the guest's stop, the whole time, RAM bytes written, per disk the VM's new top image and the checkpoint's image.</summary>
public sealed record CheckpointedEventData(string Directory, double StopMs, double Seconds, ulong MemoryBytesWritten, IReadOnlyList<string?> Layers, IReadOnlyList<string> Disks);

/// <summary>The data of a vm.checkpoint-deleted event: the checkpoint's directory and the layers folded away.</summary>
public sealed record CheckpointDeletedEventData(string Directory, IReadOnlyList<string> Folded);
