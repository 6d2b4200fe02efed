using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using Kvm.Cluster.Supervision;
using Kvm.Control;
using Kvm.Inventory;
using Kvm.Rpc;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster;

/// <summary>
/// Leases: this host runs a VM only while it holds the VM's lease. kvmd renews every lease it holds
/// in one statement every <see cref="KvmdOptions.LeaseRenewInterval"/>; after each renewal it
/// re-arms each VM's fence in its kvm-vmm with the time the lease surely has left (counted on the
/// monotonic clock from when the renewal was sent, less <see cref="KvmdOptions.FenceMargin"/>). If
/// kvmd stops renewing (frozen, killed, cut off from the database), each kvm-vmm stops its VM on
/// its own before the lease can expire for anyone else. A lease found lost is fenced at once.
/// Writes under a lease carry its generation; the inventory refuses them once it has moved on.
/// </summary>
public sealed partial class Kvmd
{
    /// <summary>A lease this host holds, and when (Stopwatch timestamp) the request that last acquired or renewed it was sent.</summary>
    private sealed record HeldLease(LeaseToken Token, long SentAt);

    private readonly ConcurrentDictionary<string, HeldLease> _leases = new(StringComparer.Ordinal);

    /// <summary>VMs this kvmd is stopping because their lease is lost: their end is recorded as fenced.</summary>
    private readonly ConcurrentDictionary<string, bool> _fencing = new(StringComparer.Ordinal);
    private Task? _renewer;
    private Task? _takeover;

    /// <summary>The lease this host holds on VM <paramref name="name"/>, if any.</summary>
    public LeaseToken? LeaseOf(string name) => _leases.TryGetValue(name, out var h) ? h.Token : null;

    private async Task<LeaseToken> AcquireVmLeaseAsync(VmRow row, CancellationToken cancel)
    {
        long sent = Stopwatch.GetTimestamp();
        var grant = await _db.Leases.AcquireAsync(LeaseKind.Vm, row.Id, Host.Id, _options.LeaseDuration, cancel).ConfigureAwait(false);
        _leases[row.Name] = new HeldLease(grant.Token, sent);
        return grant.Token;
    }

    /// <summary>Seconds the lease acquired or renewed at <paramref name="sentAt"/> surely has left, less the fence margin.</summary>
    private double FenceSeconds(long sentAt) =>
        Math.Max(0, (_options.LeaseDuration - _options.FenceMargin - Stopwatch.GetElapsedTime(sentAt)).TotalSeconds);

    /// <summary>Arms VM <paramref name="name"/>'s fence in its kvm-vmm; false when it could not be reached.</summary>
    private async Task<bool> ArmFenceAsync(string name, long sentAt, CancellationToken cancel)
    {
        try
        {
            using var client = _supervisor.Connect(name);
            await client.CallAsync("fence", new FenceRequest(FenceSeconds(sentAt), _options.FenceAction),
                VmControlJson.Default.FenceRequest, VmControlJson.Default.FenceStatus, cancel).ConfigureAwait(false);
            return true;
        }
        catch (RpcException e)
        {
            LogFenceArmFailed(_logger, name, e.Message);
            return false;
        }
    }

    private async Task RenewLoopAsync()
    {
        while (!_stopping.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(_options.LeaseRenewInterval, _stopping.Token).ConfigureAwait(false);
                await RenewOnceAsync(_stopping.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e) when (e is RpcException or IOException)
            {
                // The VMs fence themselves if this goes on; nothing else to do here.
                LogRenewFailed(_logger, _leases.Count, e.Message);
            }
        }
    }

    /// <summary>One round: renew every held lease, re-arm the fences of those renewed, fence the VMs whose lease is lost.</summary>
    public async Task RenewOnceAsync(CancellationToken cancel)
    {
        var held = _leases.ToArray();
        if (held.Length == 0)
            return;
        long sent = Stopwatch.GetTimestamp();
        var renewed = await _db.Leases.RenewAsync(Host.Id, held.Select(h => h.Value.Token).ToList(), _options.LeaseDuration, cancel).ConfigureAwait(false);
        var kept = renewed.Select(g => g.Token).ToHashSet();
        foreach (var (name, lease) in held)
        {
            if (kept.Contains(lease.Token))
            {
                // Only if it is still the same lease (a stop may have released it meanwhile).
                if (_leases.TryUpdate(name, lease with { SentAt = sent }, lease) && _supervisor.Find(name) is not null)
                    await ArmFenceAsync(name, sent, cancel).ConfigureAwait(false);
            }
            else if (_leases.TryRemove(new KeyValuePair<string, HeldLease>(name, lease)))
            {
                await FenceNowAsync(name, lease.Token, "its lease was lost (expired before renewal, or taken by another host)").ConfigureAwait(false);
            }
        }
    }

    /// <summary>Stops VM <paramref name="name"/> at once because this host no longer holds its lease.</summary>
    private async Task FenceNowAsync(string name, LeaseToken token, string why)
    {
        LogFenced(_logger, name, token.Generation, why);
        if (_supervisor.Find(name) is { } process && !process.Exited.IsCompleted)
        {
            _fencing[name] = true;
            try
            {
                // The fence fired at once: kvm-vmm stops the VM and records the end as fenced.
                using var client = _supervisor.Connect(name);
                using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(5));
                await client.CallAsync("fence", new FenceRequest(0, "stop"), VmControlJson.Default.FenceRequest, VmControlJson.Default.FenceStatus, timeout.Token).ConfigureAwait(false);
                await process.Exited.WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
            }
            catch (Exception e) when (e is RpcException or OperationCanceledException or TimeoutException)
            {
                process.Signal(9);
            }
        }
        try
        {
            await _db.Events.AppendAsync("vm.fenced", $"vm/{name}",
                JsonSerializer.Serialize(new EventData(null, $"generation {token.Generation}: {why}", false), KvmdEventJson.Default.EventData), Host.Id).ConfigureAwait(false);
        }
        catch (RpcException)
        {
        }
    }

    /// <summary>
    /// Releases the VM's lease after recording its end under it. Without a lease (lost, or found
    /// again after a restart), the end is recorded only if this host can acquire the lease, that is
    /// when no other host has taken the VM over.
    /// </summary>
    private async Task RecordEndUnderLeaseAsync(VmRow row, VmActualState state, CancellationToken cancel)
    {
        LeaseToken token;
        if (_leases.TryRemove(row.Name, out var held))
        {
            token = held.Token;
        }
        else
        {
            try
            {
                token = (await _db.Leases.AcquireAsync(LeaseKind.Vm, row.Id, Host.Id, _options.LeaseDuration, cancel).ConfigureAwait(false)).Token;
            }
            catch (RpcException e) when (e.Code == RpcErrorCode.InvalidState)
            {
                return; // another host holds it: the VM is theirs now
            }
        }
        try
        {
            await _db.Vms.SetOwnerAsync(row.Name, null, token, cancel).ConfigureAwait(false);
            await _db.Vms.SetActualStateAsync(row.Name, state, token, cancel).ConfigureAwait(false);
            await _db.Leases.ReleaseAsync(token, cancel).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.Code == RpcErrorCode.StaleLease)
        {
            LogStale(_logger, row.Name, e.Message);
        }
    }

    /// <summary>
    /// VMs that should run but whose lease has expired (their host froze, died or lost the
    /// database): this host acquires the lease, which moves the generation on, and starts them.
    /// </summary>
    private async Task TakeoverLoopAsync()
    {
        while (!_stopping.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(_options.TakeoverInterval, _stopping.Token).ConfigureAwait(false);
                await TakeoverOnceAsync(_stopping.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e) when (e is RpcException or IOException)
            {
                LogTakeoverFailed(_logger, e.Message);
            }
        }
    }

    private async Task TakeoverOnceAsync(CancellationToken cancel)
    {
        // The candidates from the cached view (no query while nothing changes), then each one's
        // lease from the database, whose expiry no notification announces.
        var vms = await View.VmsAsync(cancel).ConfigureAwait(false);
        foreach (var vm in vms)
        {
            if (!MayTakeOver(vm))
                continue;
            var lease = await _db.Leases.FindAsync(LeaseKind.Vm, vm.Id, cancel).ConfigureAwait(false);
            // A cheap look first (the acquisition decides, by the database's clock).
            if (lease?.ExpiresAt is { } expires && expires > DateTimeOffset.UtcNow)
                continue;
            await WithVmAsync(vm.Name, async () =>
            {
                var row = await _db.Vms.FindAsync(vm.Name, cancel).ConfigureAwait(false);
                if (row is null || !MayTakeOver(row))
                    return 0;
                try
                {
                    await AcquireVmLeaseAsync(row, cancel).ConfigureAwait(false);
                }
                catch (RpcException e) when (e.Code == RpcErrorCode.InvalidState)
                {
                    return 0; // renewed after all, or another host was quicker
                }
                var previous = row.OwnerHost is { } p ? await HostNameAsync(p, cancel).ConfigureAwait(false) : "none (it was fenced)";
                LogTakingOver(_logger, row.Name, previous, LeaseOf(row.Name)?.Generation ?? 0);
                await _db.Events.AppendAsync("vm.takeover", $"vm/{row.Name}",
                    JsonSerializer.Serialize(new EventData(null, $"from host {previous}", false), KvmdEventJson.Default.EventData), Host.Id, cancel).ConfigureAwait(false);
                await StartLockedAsync(row, cancel).ConfigureAwait(false);
                return 0;
            }, cancel).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Wanted running, and not running here: either owned by another host (taken once its lease
    /// has expired) or left fenced by its host (taken once its lease is free, by any host).
    /// </summary>
    private bool MayTakeOver(VmRow vm) =>
        vm.DesiredState != VmDesiredState.Stopped && vm.OwnerHost != Host.Id && _supervisor.Find(vm.Name) is null
        && (vm.OwnerHost is not null || vm.ActualState == VmActualState.Fenced);

    // ---- The restart policy ----

    /// <summary>Starts of each VM by its restart policy in a row that ran less than <see cref="StableRun"/>.</summary>
    private readonly ConcurrentDictionary<string, int> _quickRestarts = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, long> _startedAt = new(StringComparer.Ordinal);

    /// <summary>A run this long resets the count of quick restarts.</summary>
    private static readonly TimeSpan StableRun = TimeSpan.FromSeconds(60);

    /// <summary>Quick restarts in a row after which kvmd gives up (as systemd's start limit).</summary>
    private const int MaxQuickRestarts = 5;

    /// <summary>
    /// Starts VM <paramref name="row"/> again after it ended unasked, as its restart policy says:
    /// after 1 s, doubling with each quick end in a row (up to 16 s); after
    /// <see cref="MaxQuickRestarts"/> quick ends in a row it stays down, wanted stopped.
    /// </summary>
    private async Task ScheduleRestartAsync(VmRow row, VmExit exit, CancellationToken cancel)
    {
        string name = row.Name;
        bool quick = !_startedAt.TryRemove(name, out var started) || Stopwatch.GetElapsedTime(started) < StableRun;
        int attempt = quick ? _quickRestarts.AddOrUpdate(name, 1, (_, n) => n + 1) : _quickRestarts[name] = 1;
        if (attempt > MaxQuickRestarts)
        {
            _quickRestarts.TryRemove(name, out _);
            await _db.Vms.SetDesiredStateAsync(name, VmDesiredState.Stopped, cancel).ConfigureAwait(false);
            await _db.Events.AppendAsync("vm.restart-abandoned", $"vm/{name}",
                JsonSerializer.Serialize(new EventData(exit.Status, $"ended {MaxQuickRestarts} times in a row within {StableRun.TotalSeconds} s of its start; restart policy '{StateNames.Of(row.RestartPolicy)}' gives up", false), KvmdEventJson.Default.EventData),
                Host.Id, cancel).ConfigureAwait(false);
            LogRestartAbandoned(_logger, name, MaxQuickRestarts);
            return;
        }
        var delay = TimeSpan.FromSeconds(1 << (attempt - 1));
        await _db.Events.AppendAsync("vm.restarting", $"vm/{name}",
            JsonSerializer.Serialize(new EventData(exit.Status, $"restart policy '{StateNames.Of(row.RestartPolicy)}': attempt {attempt} in {delay.TotalSeconds} s after: {exit.Reason}", false), KvmdEventJson.Default.EventData),
            Host.Id, cancel).ConfigureAwait(false);
        _ = Task.Run(async () =>
        {
            try
            {
                await Task.Delay(delay, _stopping.Token).ConfigureAwait(false);
                await WithVmAsync(name, async () =>
                {
                    // Still wanted, still not running anywhere (the user may have stopped or deleted it meanwhile).
                    var now = await _db.Vms.FindAsync(name, _stopping.Token).ConfigureAwait(false);
                    if (now is null || now.DesiredState == VmDesiredState.Stopped || now.OwnerHost is not null || _supervisor.Find(name) is not null)
                        return 0;
                    await StartLockedAsync(now, _stopping.Token).ConfigureAwait(false);
                    return 0;
                }, _stopping.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
            {
            }
            catch (Exception e) when (e is RpcException or IOException)
            {
                LogRestartFailed(_logger, name, e.Message);
            }
        });
    }

    [LoggerMessage(EventId = 2116, Level = LogLevel.Warning, Message = "VM '{Name}': its restart policy gave up after {Count} quick ends in a row")]
    private static partial void LogRestartAbandoned(ILogger logger, string name, int count);

    [LoggerMessage(EventId = 2117, Level = LogLevel.Warning, Message = "VM '{Name}': the restart its policy asked for failed: {Error}")]
    private static partial void LogRestartFailed(ILogger logger, string name, string error);

    [LoggerMessage(EventId = 2110, Level = LogLevel.Warning, Message = "VM '{Name}': cannot arm its fence: {Error}")]
    private static partial void LogFenceArmFailed(ILogger logger, string name, string error);

    [LoggerMessage(EventId = 2111, Level = LogLevel.Error, Message = "cannot renew the {Count} lease(s) this host holds: {Error} (each VM stops by itself before its lease could expire)")]
    private static partial void LogRenewFailed(ILogger logger, int count, string error);

    [LoggerMessage(EventId = 2112, Level = LogLevel.Error, Message = "VM '{Name}': fenced (lease generation {Generation}): {Why}")]
    private static partial void LogFenced(ILogger logger, string name, long generation, string why);

    [LoggerMessage(EventId = 2113, Level = LogLevel.Warning, Message = "VM '{Name}': its end is not recorded by this host: {Error}")]
    private static partial void LogStale(ILogger logger, string name, string error);

    [LoggerMessage(EventId = 2114, Level = LogLevel.Warning, Message = "looking for VMs to take over failed: {Error}")]
    private static partial void LogTakeoverFailed(ILogger logger, string error);

    [LoggerMessage(EventId = 2115, Level = LogLevel.Warning, Message = "VM '{Name}': taking over from host {Previous}, whose lease expired (generation {Generation})")]
    private static partial void LogTakingOver(ILogger logger, string name, string previous, long generation);
}
