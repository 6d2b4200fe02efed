using System.Diagnostics;
using System.Text.Json;
using Kvm.Cluster.Supervision;
using Kvm.Control;
using Kvm.Inventory;
using Kvm.Rpc;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster;

/// <summary>
/// The host daemon: the inventory (opened, or started privately), this host's row and heartbeat,
/// the supervisor of this host's kvm-vmm processes, and the RPC socket vmctl talks to. Started by
/// <see cref="StartAsync"/>; disposing it stops serving and lets go of the VMs, which go on
/// running (a new kvmd finds them again).
/// </summary>
public sealed partial class Kvmd : IAsyncDisposable
{
    private readonly KvmdOptions _options;
    private readonly ILogger _logger;
    private readonly InventoryDatabase _db;
    private readonly VmSupervisor _supervisor;
    // Each VM's gate, while anyone holds or awaits it: one per name ever asked for would keep every
    // name a client sent (a request may name a VM of nearly 1 MiB) for as long as kvmd runs.
    private readonly Dictionary<string, VmGate> _vmGates = new(StringComparer.Ordinal);
    private readonly CancellationTokenSource _stopping = new();
    private readonly Stopwatch _uptime = Stopwatch.StartNew();
    private RpcServer? _server;
    private Task? _heartbeat;
    private InventoryView? _view;

    private Kvmd(KvmdOptions options, ILogger logger, InventoryDatabase db, HostRow host)
    {
        _options = options;
        _logger = logger;
        _db = db;
        Host = host;
        _supervisor = new VmSupervisor(options, logger) { OnExit = OnVmExitAsync };
    }

    /// <summary>This host's row in the inventory.</summary>
    public HostRow Host { get; }

    public InventoryDatabase Inventory => _db;

    public VmSupervisor Supervisor => _supervisor;

    /// <summary>The cached view of the inventory, kept current from its notifications (started before serving).</summary>
    public InventoryView View => _view ?? throw new InvalidOperationException("kvmd is not serving yet");

    /// <summary>How often this host records that it is alive.</summary>
    public TimeSpan HeartbeatInterval { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// Opens the inventory, registers this host, finds again the VMs this host ran (they kept
    /// running while no kvmd did), records the end of those that stopped meanwhile, then serves.
    /// </summary>
    public static async Task<Kvmd> StartAsync(KvmdOptions options, ILogger logger, CancellationToken cancel = default)
    {
        Directory.CreateDirectory(options.StateDirectory);
        Directory.CreateDirectory(Path.Combine(options.RunDirectory, "vms"));
        var db = await InventoryDatabase.OpenAsync(new InventoryOptions
        {
            ConnectionString = options.Database,
            StateDirectory = options.StateDirectory,
        }, cancel).ConfigureAwait(false);
        Kvmd? kvmd = null;
        try
        {
            var host = await db.Hosts.RegisterAsync(options.HostName, "", cancel).ConfigureAwait(false);
            kvmd = new Kvmd(options, logger, db, host);
            await kvmd.RecoverAsync(cancel).ConfigureAwait(false);
            kvmd._view = await InventoryView.StartAsync(db, logger, cancel: cancel).ConfigureAwait(false);
            kvmd.Serve();
            return kvmd;
        }
        catch
        {
            if (kvmd is not null)
                await kvmd.DisposeAsync().ConfigureAwait(false);
            else
                await db.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    private void Serve()
    {
        var dispatcher = new RpcDispatcher(_logger);
        Register(dispatcher);
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(_options.Socket))!);
        _server = new RpcServer(new RpcServerOptions
        {
            SocketPath = _options.Socket,
            Access = _options.Group is { } g && Kvm.Interop.Native.Libc.GroupId(g) is not null ? RpcAccessPolicy.ForGroup(g) : RpcAccessPolicy.OwnerOnly,
        }, dispatcher, _logger);
        _server.Start();
        _heartbeat = Task.Run(HeartbeatLoopAsync);
        _renewer = Task.Run(RenewLoopAsync);
        if (_options.Takeover)
            _takeover = Task.Run(TakeoverLoopAsync);
        LogServing(_logger, _options.Socket, Host.Name, Host.Id);
    }

    private async Task HeartbeatLoopAsync()
    {
        while (!_stopping.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(HeartbeatInterval, _stopping.Token).ConfigureAwait(false);
                await _db.Hosts.HeartbeatAsync(Host.Id, _stopping.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
            {
                return;
            }
            catch (RpcException e)
            {
                LogHeartbeatFailed(_logger, e.Message);
            }
        }
    }

    /// <summary>
    /// After a start: every VM the inventory says this host runs is found again through its control
    /// socket, or its end (recorded in its exit file while no kvmd watched) is recorded now. A VM
    /// whose directory is here but whose start was not recorded (kvmd died in between) is found too.
    /// </summary>
    private async Task RecoverAsync(CancellationToken cancel)
    {
        var vms = await _db.Vms.ListAsync(cancel).ConfigureAwait(false);
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var vm in vms.Where(v => v.OwnerHost == Host.Id))
        {
            names.Add(vm.Name);
            var process = await _supervisor.AdoptAsync(vm.Name, cancel).ConfigureAwait(false);
            // Its lease: taken back if this host still holds it and can renew it; else the VM is not ours to run.
            var lease = await _db.Leases.FindAsync(LeaseKind.Vm, vm.Id, cancel).ConfigureAwait(false);
            if (lease?.Token is { } token && token.Host == Host.Id)
            {
                long sent = System.Diagnostics.Stopwatch.GetTimestamp();
                var renewed = await _db.Leases.RenewAsync(Host.Id, [token], _options.LeaseDuration, cancel).ConfigureAwait(false);
                if (renewed.Count == 1)
                {
                    _leases[vm.Name] = new HeldLease(token, sent);
                    if (process is not null)
                        await ArmFenceAsync(vm.Name, sent, cancel).ConfigureAwait(false);
                }
            }
            if (process is not null && LeaseOf(vm.Name) is null)
            {
                await FenceNowAsync(vm.Name, lease?.Token ?? new LeaseToken(LeaseKind.Vm, vm.Id, Host.Id, lease?.Generation ?? 0),
                    "found running after a restart of kvmd, but its lease had expired or moved on").ConfigureAwait(false);
                process = null; // its end is recorded by the supervisor's exit handler
            }
            else if (process is null)
            {
                var record = VmHost.ReadExitRecord(_supervisor.FilesOf(vm.Name).ExitFile);
                var exit = record is not null ? VmExit.Of(record)
                    : new VmExit(null, "kvm-vmm is gone and recorded no exit status (killed, or the host restarted)", true);
                await RecordExitAsync(vm.Name, exit, whileAway: true, cancel).ConfigureAwait(false);
            }
        }
        foreach (var name in _supervisor.NamesOnDisk().Where(n => !names.Contains(n)))
        {
            var row = vms.FirstOrDefault(v => v.Name == name);
            if (row is null || row.OwnerHost is not null)
                continue;
            if (await _supervisor.AdoptAsync(name, cancel).ConfigureAwait(false) is { } process)
            {
                LeaseToken token;
                try
                {
                    token = await AcquireVmLeaseAsync(row, cancel).ConfigureAwait(false);
                }
                catch (RpcException e) when (e.Code == RpcErrorCode.InvalidState)
                {
                    await FenceNowAsync(name, new LeaseToken(LeaseKind.Vm, row.Id, Host.Id, 0), $"found running unrecorded, but another host holds its lease: {e.Message}").ConfigureAwait(false);
                    continue;
                }
                await ArmFenceAsync(name, _leases[name].SentAt, cancel).ConfigureAwait(false);
                await _db.Vms.SetOwnerAsync(name, Host.Id, token, cancel).ConfigureAwait(false);
                var status = await _supervisor.StatusAsync(name, cancel).ConfigureAwait(false);
                await _db.Vms.SetActualStateAsync(name, status?.State == "paused" ? VmActualState.Paused : VmActualState.Running, token, cancel).ConfigureAwait(false);
                LogAdoptedUnrecorded(_logger, name, process.Pid);
            }
        }
    }

    private Task OnVmExitAsync(VmProcess process, VmExit exit) => WithVmAsync(process.Name, async () =>
    {
        // A VM handed over through its control socket ('vmctl control upgrade SOCKET') rather than
        // through kvmd runs on in a new process: followed there, it has not ended.
        if (process.TryMarkRecorded() && !await FollowHandoverAsync(process, exit).ConfigureAwait(false))
            await RecordExitAsync(process.Name, exit, whileAway: false, CancellationToken.None).ConfigureAwait(false);
        return 0;
    }, CancellationToken.None);

    private async Task RecordExitAsync(string name, VmExit exit, bool whileAway, CancellationToken cancel)
    {
        var row = await _db.Vms.FindAsync(name, cancel).ConfigureAwait(false);
        if (row is null || (row.OwnerHost is { } owner && owner != Host.Id))
        {
            _leases.TryRemove(name, out _);
            return; // deleted meanwhile, or another host has taken it over
        }
        bool fenced = exit.Fenced | _fencing.TryRemove(name, out _);
        await ReleaseDisksAsync(row, cancel).ConfigureAwait(false);
        await RecordEndUnderLeaseAsync(row, fenced ? VmActualState.Fenced : exit.Failed ? VmActualState.Failed : VmActualState.Stopped, cancel).ConfigureAwait(false);
        // A VM fenced because its lease could not be renewed is still wanted: its desired state
        // stays, and any host may start it again (TakeoverOnceAsync). One that ended unasked is
        // started again if its restart policy says so; else it is now wanted stopped.
        bool restart = !fenced && row.DesiredState != VmDesiredState.Stopped
            && (row.RestartPolicy == VmRestartPolicy.Always || (row.RestartPolicy == VmRestartPolicy.OnFailure && exit.Failed));
        if (row.DesiredState != VmDesiredState.Stopped && !fenced && !restart)
            await _db.Vms.SetDesiredStateAsync(name, VmDesiredState.Stopped, cancel).ConfigureAwait(false);
        await _db.Events.AppendAsync(exit.Failed ? "vm.failed" : "vm.exited", $"vm/{name}",
            JsonSerializer.Serialize(new EventData(exit.Status, exit.Reason, whileAway), KvmdEventJson.Default.EventData), Host.Id, cancel).ConfigureAwait(false);
        if (restart)
            await ScheduleRestartAsync(row, exit, cancel).ConfigureAwait(false);
    }

    /// <summary>Records a running VM's state under its lease (refused once the lease has moved on).</summary>
    private Task<VmRow> SetActualAsync(string name, VmActualState state, CancellationToken cancel) =>
        LeaseOf(name) is { } token
            ? _db.Vms.SetActualStateAsync(name, state, token, cancel)
            : throw new RpcException(RpcErrorCode.StaleLease, $"VM '{name}': this host no longer holds its lease");

    /// <summary>
    /// Runs <paramref name="action"/> holding VM <paramref name="name"/>'s gate: one operation on a
    /// VM at a time. The gate exists while it is held or awaited, and goes with its last user.
    /// </summary>
    private async Task<T> WithVmAsync<T>(string name, Func<Task<T>> action, CancellationToken cancel)
    {
        VmGate? gate;
        lock (_vmGates)
        {
            if (!_vmGates.TryGetValue(name, out gate))
                _vmGates.Add(name, gate = new VmGate());
            gate.Users++;
        }
        try
        {
            await gate.Semaphore.WaitAsync(cancel).ConfigureAwait(false);
            try
            {
                return await action().ConfigureAwait(false);
            }
            finally
            {
                gate.Semaphore.Release();
            }
        }
        finally
        {
            // Whatever the operation wrote, the next read sees it (its notification may come later).
            _view?.Invalidate();
            lock (_vmGates)
            {
                if (--gate.Users == 0)
                {
                    _vmGates.Remove(name);
                    gate.Semaphore.Dispose();
                }
            }
        }
    }

    private sealed class VmGate
    {
        public readonly SemaphoreSlim Semaphore = new(1, 1);

        /// <summary>Those holding or awaiting it (under the dictionary's lock).</summary>
        public int Users;
    }

    // ---- Operations (the RPC methods call these; tests may too) ----

    public Task<VmInfo> CreateAsync(CreateVmRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        var spec = CheckSpec(request.Name, request.Spec);
        var restart = StateNames.RestartPolicy(request.Restart)
            ?? throw new RpcException(RpcErrorCode.InvalidParams, $"VM '{request.Name}': restart policy '{request.Restart}' is not one of no, on-failure, always");
        var row = await _db.Vms.CreateAsync(request.Name, VmSpecJsonContext.Format(spec), restart, ct: cancel).ConfigureAwait(false);
        if (!request.Start)
            return Info(row);
        return await StartLockedAsync(row, cancel).ConfigureAwait(false);
    }, cancel);

    public Task<VmInfo> StartAsync(string name, CancellationToken cancel) => StartAsync(new StartVmRequest(name), cancel);

    /// <summary>
    /// Starts the VM; while a disk it needs is reserved by another VM, waits (up to the request's
    /// wait) for a reservation to be released or broken anywhere, then tries again.
    /// </summary>
    public async Task<VmInfo> StartAsync(StartVmRequest request, CancellationToken cancel)
    {
        CheckName(request.Name);
        if (request.WaitSeconds is < 0 or > 86400 || double.IsNaN(request.WaitSeconds))
            throw new RpcException(RpcErrorCode.InvalidParams, $"vm.start: waitSeconds {request.WaitSeconds} is out of range (0 to 86400)");
        var restore = RestoreOf(request);
        var deadline = Stopwatch.GetTimestamp() + (long)(request.WaitSeconds * Stopwatch.Frequency);
        bool waited = false;
        while (true)
        {
            var remaining = Stopwatch.GetElapsedTime(Stopwatch.GetTimestamp(), deadline);
            bool mayWait = remaining > TimeSpan.Zero;
            // Subscribed before trying, so that a release between the refusal and the wait is not missed.
            using var stopWaiting = CancellationTokenSource.CreateLinkedTokenSource(cancel);
            var released = mayWait
                ? View.WaitForAsync(e => e.Kind is "reservation.released" or "reservation.broken", remaining, stopWaiting.Token)
                : Task.FromResult<EventRow?>(null);
            try
            {
                return await WithVmAsync(request.Name, async () =>
                {
                    var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
                    if (_supervisor.Find(request.Name) is not null)
                        throw new RpcException(RpcErrorCode.InvalidState, $"VM '{request.Name}' is already running on this host");
                    if (row.OwnerHost is { } owner && owner != Host.Id)
                        throw new RpcException(RpcErrorCode.InvalidState, $"VM '{request.Name}' runs on host {await HostNameAsync(owner, cancel).ConfigureAwait(false)}");
                    return await StartLockedAsync(row, cancel, waitingForDisks: mayWait, restore).ConfigureAwait(false);
                }, cancel).ConfigureAwait(false);
            }
            catch (RpcException e) when (e.Code == RpcErrorCode.Conflict && mayWait)
            {
                if (!waited)
                {
                    waited = true;
                    LogWaitingForDisk(_logger, request.Name, e.Message);
                    await _db.Events.AppendAsync("vm.start-waiting", $"vm/{request.Name}",
                        JsonSerializer.Serialize(new EventData(null, e.Message, false), KvmdEventJson.Default.EventData), Host.Id, cancel).ConfigureAwait(false);
                }
                // Woken by a release or a broken reservation anywhere (or a resync, or the end of
                // the wait); then one more try, which at the end refuses naming the holder as it is.
                try
                {
                    await released.ConfigureAwait(false);
                }
                catch (OperationCanceledException) when (!cancel.IsCancellationRequested)
                {
                }
                cancel.ThrowIfCancellationRequested();
            }
            finally
            {
                await stopWaiting.CancelAsync().ConfigureAwait(false);
            }
        }
    }

    /// <summary>
    /// Starts VM <paramref name="row"/> here (the caller holds its gate): booted from its spec, or
    /// with <paramref name="restore"/> from a snapshot whose machine matches that spec.
    /// </summary>
    private async Task<VmInfo> StartLockedAsync(VmRow row, CancellationToken cancel, bool waitingForDisks = false, VmRestore? restore = null)
    {
        VmSpec spec;
        try
        {
            spec = VmSpecJsonContext.Parse(row.Spec, $"of VM '{row.Name}' in the inventory");
            spec.Validate();
        }
        catch (ArgumentException e)
        {
            throw new RpcException(RpcErrorCode.InvalidState, $"cannot start VM '{row.Name}': its spec is not valid", inner: e);
        }
        // A snapshot that does not fit is refused before anything about the VM changes.
        if (restore is not null)
            CheckSnapshot(row.Name, spec, restore);
        // The VM's lease first (a takeover has acquired it already): refused, naming the holder,
        // while another host holds it; every write about the VM from here on carries it.
        var token = LeaseOf(row.Name) ?? await AcquireVmLeaseAsync(row, cancel).ConfigureAwait(false);
        await _db.Vms.SetDesiredStateAsync(row.Name, VmDesiredState.Running, cancel).ConfigureAwait(false);
        await _db.Vms.SetOwnerAsync(row.Name, Host.Id, token, cancel).ConfigureAwait(false);
        await _db.Vms.SetActualStateAsync(row.Name, VmActualState.Starting, token, cancel).ConfigureAwait(false);
        try
        {
            await ReserveDisksAsync(row, spec, token, cancel).ConfigureAwait(false);
            if (restore is not null)
                LogStartingFrom(_logger, row.Name, restore.Directory, restore.Memory);
            await _supervisor.StartAsync(row.Name, spec, cancel, restore).ConfigureAwait(false);
            if (_leases.TryGetValue(row.Name, out var held))
                await ArmFenceAsync(row.Name, held.SentAt, cancel).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.Code == RpcErrorCode.Conflict)
        {
            // A disk is another VM's: the VM never started, and is back as it was, its lease released.
            await ReleaseDisksAsync(row, CancellationToken.None).ConfigureAwait(false);
            await RecordEndUnderLeaseAsync(row, row.ActualState is VmActualState.Running or VmActualState.Starting ? VmActualState.Stopped : row.ActualState, CancellationToken.None).ConfigureAwait(false);
            await _db.Vms.SetDesiredStateAsync(row.Name, row.DesiredState, CancellationToken.None).ConfigureAwait(false);
            if (!waitingForDisks)
                await _db.Events.AppendAsync("vm.start-failed", $"vm/{row.Name}",
                    JsonSerializer.Serialize(new EventData(null, e.Message, false), KvmdEventJson.Default.EventData), Host.Id, CancellationToken.None).ConfigureAwait(false);
            throw;
        }
        catch (Exception e)
        {
            await ReleaseDisksAsync(row, CancellationToken.None).ConfigureAwait(false);
            await RecordEndUnderLeaseAsync(row, VmActualState.Failed, CancellationToken.None).ConfigureAwait(false);
            await _db.Vms.SetDesiredStateAsync(row.Name, VmDesiredState.Stopped, CancellationToken.None).ConfigureAwait(false);
            await _db.Events.AppendAsync("vm.start-failed", $"vm/{row.Name}",
                JsonSerializer.Serialize(new EventData(null, e.Message, false), KvmdEventJson.Default.EventData), Host.Id, CancellationToken.None).ConfigureAwait(false);
            throw;
        }
        var now = await _db.Vms.SetActualStateAsync(row.Name, VmActualState.Running, token, cancel).ConfigureAwait(false);
        if (restore is not null)
            await _db.Events.AppendAsync("vm.restored", $"vm/{row.Name}",
                JsonSerializer.Serialize(new RestoredEventData(restore.Directory, restore.Memory), KvmdEventJson.Default.RestoredEventData), Host.Id, cancel).ConfigureAwait(false);
        _startedAt[row.Name] = Stopwatch.GetTimestamp();
        _fencing.TryRemove(row.Name, out _); // a mark left from a fence of an earlier run
        return Info(now);
    }

    public Task<VmStopped> StopAsync(StopVmRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
        var process = RunningHere(row);
        await _db.Vms.SetDesiredStateAsync(row.Name, VmDesiredState.Stopped, cancel).ConfigureAwait(false);
        await SetActualAsync(row.Name, VmActualState.Stopping, cancel).ConfigureAwait(false);
        StopResult result;
        try
        {
            using var client = _supervisor.Connect(row.Name);
            result = await client.CallAsync("stop", new StopRequest(request.Force, request.TimeoutSeconds),
                VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult, cancel).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.Code == RpcErrorCode.InvalidState)
        {
            // A paused VM cannot answer the power button: it stays as it was.
            await SetActualAsync(row.Name, row.ActualState, CancellationToken.None).ConfigureAwait(false);
            await _db.Vms.SetDesiredStateAsync(row.Name, row.DesiredState, CancellationToken.None).ConfigureAwait(false);
            throw;
        }
        // kvm-vmm exits once stopped; its end is recorded here, before the answer, so that what
        // the caller reads next already says stopped (OnVmExitAsync then finds it recorded).
        var exit = await process.Exited.WaitAsync(TimeSpan.FromSeconds(30), cancel).ConfigureAwait(false);
        if (process.TryMarkRecorded())
            await RecordExitAsync(row.Name, exit, whileAway: false, cancel).ConfigureAwait(false);
        return new VmStopped(row.Name, result.Outcome, result.Reason, result.Seconds);
    }, cancel);

    public Task<VmInfo> PauseAsync(string name, CancellationToken cancel) => ChangeAsync(name, "pause", VmDesiredState.Paused, VmActualState.Paused, cancel);

    /// <summary>
    /// Resumes a paused VM; one left suspended in its kvm-vmm (its disks closed, by an upgrade
    /// whose new process failed) resumes only in a new kvm-vmm: it is handed to one, as
    /// <see cref="UpgradeAsync"/> does (kvm-vmm refuses a plain resume of it).
    /// </summary>
    public async Task<VmInfo> ResumeAsync(string name, CancellationToken cancel)
    {
        if (_supervisor.Find(CheckName(name)) is not null && await _supervisor.StatusAsync(name, cancel).ConfigureAwait(false) is { State: "suspended" })
            return (await UpgradeAsync(new UpgradeVmRequest(name), cancel).ConfigureAwait(false)).Vm;
        return await ChangeAsync(name, "resume", VmDesiredState.Running, VmActualState.Running, cancel).ConfigureAwait(false);
    }

    private Task<VmInfo> ChangeAsync(string name, string method, VmDesiredState desired, VmActualState actual, CancellationToken cancel) => WithVmAsync(CheckName(name), async () =>
    {
        var row = await _db.Vms.GetAsync(name, cancel).ConfigureAwait(false);
        RunningHere(row);
        using (var client = _supervisor.Connect(name))
            await client.CallAsync(method, VmControlJson.Default.StateChange, cancel).ConfigureAwait(false);
        await _db.Vms.SetDesiredStateAsync(name, desired, cancel).ConfigureAwait(false);
        return Info(await SetActualAsync(name, actual, cancel).ConfigureAwait(false));
    }, cancel);

    public Task<VmInfo> DeleteAsync(DeleteVmRequest request, CancellationToken cancel) => WithVmAsync(CheckName(request.Name), async () =>
    {
        var row = await _db.Vms.GetAsync(request.Name, cancel).ConfigureAwait(false);
        if (row.OwnerHost is { } owner && owner != Host.Id)
            throw new RpcException(RpcErrorCode.InvalidState, $"VM '{row.Name}' runs on host {await HostNameAsync(owner, cancel).ConfigureAwait(false)}; stop it there first");
        if (_supervisor.Find(row.Name) is { } process)
        {
            if (!request.Force)
                throw new RpcException(RpcErrorCode.InvalidState, $"VM '{row.Name}' is running; stop it first, or delete with force");
            process.TryMarkRecorded(); // the row goes: nothing to record
            process.Signal(9);
            await process.Exited.WaitAsync(TimeSpan.FromSeconds(30), cancel).ConfigureAwait(false);
        }
        if (_leases.TryRemove(row.Name, out var held))
            await _db.Leases.ReleaseAsync(held.Token, cancel).ConfigureAwait(false);
        await _db.Vms.DeleteAsync(row.Name, cancel).ConfigureAwait(false);
        var files = _supervisor.FilesOf(row.Name);
        foreach (var dir in new[] { files.RunDirectory, files.StateDirectory })
            if (Directory.Exists(dir))
                Directory.Delete(dir, recursive: true);
        return Info(row);
    }, cancel);

    public async Task<VmList> ListAsync(CancellationToken cancel)
    {
        var rows = await View.VmsAsync(cancel).ConfigureAwait(false);
        var hosts = await HostNamesAsync(cancel).ConfigureAwait(false);
        return new VmList(rows.Select(r => Info(r, hosts)).ToList());
    }

    public async Task<VmDetail> ShowAsync(string name, CancellationToken cancel)
    {
        CheckName(name);
        var row = await CachedVmAsync(name, cancel).ConfigureAwait(false);
        var hosts = await HostNamesAsync(cancel).ConfigureAwait(false);
        var files = _supervisor.FilesOf(name);
        bool here = _supervisor.Find(name) is not null;
        var status = here ? await _supervisor.StatusAsync(name, cancel).ConfigureAwait(false) : null;
        using var spec = JsonDocument.Parse(row.Spec);
        return new VmDetail(Info(row, hosts), spec.RootElement.Clone(), status,
            here ? null : VmHost.ReadExitRecord(files.ExitFile),
            here ? files.ControlSocket : null, here ? files.ConsoleSocket : null,
            File.Exists(files.Log) ? files.Log : null);
    }

    public async Task<ConsoleEndpoint> ConsoleAsync(string name, CancellationToken cancel)
    {
        CheckName(name);
        var row = await CachedVmAsync(name, cancel).ConfigureAwait(false);
        RunningHere(row);
        return new ConsoleEndpoint(name, _supervisor.FilesOf(name).ConsoleSocket);
    }

    public async Task<EventList> EventsAsync(EventsRequest request, CancellationToken cancel)
    {
        if (request.Limit is < 1 or > 10000)
            throw new RpcException(RpcErrorCode.InvalidParams, $"events: limit {request.Limit} is out of range (1 to 10000)");
        if (request.TimeoutSeconds is < 0 or > 3600 || double.IsNaN(request.TimeoutSeconds))
            throw new RpcException(RpcErrorCode.InvalidParams, "events: timeoutSeconds is out of range (0 to 3600)");
        long newest = await _db.Events.NewestIdAsync(cancel).ConfigureAwait(false);
        long after = request.After >= 0 ? request.After : Math.Max(0, newest + request.After);
        // A long poll, woken by the view's notification connection (one for all waiters, rather
        // than a connection held per waiter): subscribed before reading, so none is missed.
        var timeout = TimeSpan.FromSeconds(request.TimeoutSeconds);
        using var stopWaiting = CancellationTokenSource.CreateLinkedTokenSource(cancel);
        var arrived = timeout > TimeSpan.Zero ? View.WaitForAsync(e => e.Id > after, timeout, stopWaiting.Token) : null;
        var rows = await _db.Events.ReadAfterAsync(after, request.Limit, cancel).ConfigureAwait(false);
        if (rows.Count == 0 && arrived is not null)
        {
            await arrived.ConfigureAwait(false);
            rows = await _db.Events.ReadAfterAsync(after, request.Limit, cancel).ConfigureAwait(false);
        }
        await stopWaiting.CancelAsync().ConfigureAwait(false);
        var hosts = rows.Count == 0 ? new Dictionary<Guid, string>() : await HostNamesAsync(cancel).ConfigureAwait(false);
        var list = rows.Select(e =>
        {
            using var data = JsonDocument.Parse(e.Data);
            return new EventInfo(e.Id, e.At, e.Kind, e.Subject, e.Host is { } h && hosts.TryGetValue(h, out var n) ? n : null, data.RootElement.Clone());
        }).ToList();
        return new EventList(list, list.Count > 0 ? list[^1].Id : after, Math.Max(newest, list.Count > 0 ? list[^1].Id : 0));
    }

    public async Task<HostList> HostsAsync(CancellationToken cancel) =>
        new((await _db.Hosts.ListAsync(cancel).ConfigureAwait(false))
            .Select(h => new HostInfo(h.Id, h.Name, h.Address, h.RegisteredAt, h.LastSeen, h.Id == Host.Id)).ToList());

    public DaemonStatus Status() => new(Host.Name, Host.Id, Environment.ProcessId,
        typeof(Kvmd).Assembly.GetName().Version?.ToString() ?? "unknown",
        _db.Embedded is { } e ? $"private cluster ({e.Root})" : "shared cluster",
        _supervisor.Running.Count, Math.Round(_uptime.Elapsed.TotalSeconds, 3), View.Status());

    private VmProcess RunningHere(VmRow row)
    {
        if (_supervisor.Find(row.Name) is { } process)
            return process;
        if (row.OwnerHost is { } owner && owner != Host.Id)
            throw new RpcException(RpcErrorCode.InvalidState, $"VM '{row.Name}' runs on another host ({owner}); ask that host's kvmd");
        throw new RpcException(RpcErrorCode.InvalidState, $"VM '{row.Name}' is not running (it is {StateNames.Of(row.ActualState)})");
    }

    private async Task<string> HostNameAsync(Guid id, CancellationToken cancel) =>
        (await HostNamesAsync(cancel).ConfigureAwait(false)).GetValueOrDefault(id) ?? id.ToString();

    /// <summary>Every host's name by id.</summary>
    private Task<IReadOnlyDictionary<Guid, string>> HostNamesAsync(CancellationToken cancel) =>
        _view is { } view ? view.HostNamesAsync(cancel) : ReadHostNamesAsync(cancel);

    private async Task<IReadOnlyDictionary<Guid, string>> ReadHostNamesAsync(CancellationToken cancel) =>
        (await _db.Hosts.ListAsync(cancel).ConfigureAwait(false)).ToDictionary(h => h.Id, h => h.Name);

    /// <summary>VM <paramref name="name"/>'s row from the cached view; NotFound naming it when there is none.</summary>
    private async Task<VmRow> CachedVmAsync(string name, CancellationToken cancel) =>
        await View.FindVmAsync(name, cancel).ConfigureAwait(false)
        ?? throw new RpcException(RpcErrorCode.NotFound, $"VM '{name}' does not exist");

    private VmInfo Info(VmRow row, IReadOnlyDictionary<Guid, string>? hosts = null) => new(
        row.Name, row.Id, StateNames.Of(row.DesiredState), StateNames.Of(row.ActualState),
        row.OwnerHost is { } h ? (h == Host.Id ? Host.Name : hosts is not null && hosts.TryGetValue(h, out var n) ? n : h.ToString()) : null,
        _supervisor.Find(row.Name)?.Pid, row.CreatedAt, row.UpdatedAt, StateNames.Of(row.RestartPolicy));

    /// <summary>
    /// A VM name from a client, refused at once (invalid params, quoted short) when no VM can have
    /// it: it costs no lock, no query, and no answer that quotes a name of up to 1 MiB twice.
    /// </summary>
    private static string CheckName(string name) => InventoryNames.IsValid(name) ? name
        : throw new RpcException(RpcErrorCode.InvalidParams, InventoryNames.NotAllowed("VM name", name));

    /// <summary>Parses and checks a VM spec from a client: valid, and every path absolute (kvm-vmm does not run in the client's directory).</summary>
    private static VmSpec CheckSpec(string name, JsonElement json)
    {
        if (json.ValueKind != JsonValueKind.Object)
            throw new RpcException(RpcErrorCode.InvalidParams, $"the spec of VM '{name}' must be a JSON object, not {json.ValueKind.ToString().ToLowerInvariant()}");
        try
        {
            var spec = VmSpecJsonContext.Parse(json.GetRawText(), $"of VM '{name}'");
            spec.Validate();
            foreach (var (field, path) in new[] { ("kernel", spec.Kernel), ("initrd", spec.Initrd) }.Concat(spec.Disks.Select((d, i) => ($"disks[{i}].path", (string?)d.Path))))
                if (path is not null && !Path.IsPathRooted(path))
                    throw new ArgumentException($"{field} '{path}' is not an absolute path (kvmd starts the VM in another directory)");
            return spec;
        }
        catch (ArgumentException e)
        {
            throw new RpcException(RpcErrorCode.InvalidParams, $"the spec of VM '{name}' is not valid: {e.Message}", inner: e);
        }
    }

    public async ValueTask DisposeAsync()
    {
        _stopping.Cancel();
        if (_server is not null)
            await _server.DisposeAsync().ConfigureAwait(false);
        foreach (var loop in new[] { _heartbeat, _renewer, _takeover })
            if (loop is not null)
                await loop.ConfigureAwait(false);
        if (_view is not null)
            await _view.DisposeAsync().ConfigureAwait(false);
        _supervisor.Dispose();
        await _db.DisposeAsync().ConfigureAwait(false);
        _stopping.Dispose();
    }

    [LoggerMessage(EventId = 2100, Level = LogLevel.Information, Message = "kvmd serves {Socket} as host '{Host}' ({HostId})")]
    private static partial void LogServing(ILogger logger, string socket, string host, Guid hostId);

    [LoggerMessage(EventId = 2101, Level = LogLevel.Warning, Message = "cannot record this host's heartbeat: {Error}")]
    private static partial void LogHeartbeatFailed(ILogger logger, string error);

    [LoggerMessage(EventId = 2103, Level = LogLevel.Information, Message = "VM '{Name}': waiting for a disk: {Why}")]
    private static partial void LogWaitingForDisk(ILogger logger, string name, string why);

    [LoggerMessage(EventId = 2102, Level = LogLevel.Warning, Message = "VM '{Name}': found running (kvm-vmm pid {Pid}) though the inventory did not record its start; recorded now")]
    private static partial void LogAdoptedUnrecorded(ILogger logger, string name, int pid);
}

/// <summary>The data of a VM's vm.exited, vm.failed or vm.start-failed event.</summary>
/// <param name="WhileAway">The VM ended while no kvmd watched it (found at kvmd's start).</param>
public sealed record EventData(int? Status, string Reason, bool WhileAway);

[System.Text.Json.Serialization.JsonSourceGenerationOptions(PropertyNamingPolicy = System.Text.Json.Serialization.JsonKnownNamingPolicy.CamelCase)]
[System.Text.Json.Serialization.JsonSerializable(typeof(EventData))]
[System.Text.Json.Serialization.JsonSerializable(typeof(SavedEventData))]
[System.Text.Json.Serialization.JsonSerializable(typeof(CheckpointedEventData))]
[System.Text.Json.Serialization.JsonSerializable(typeof(CheckpointDeletedEventData))]
[System.Text.Json.Serialization.JsonSerializable(typeof(RestoredEventData))]
[System.Text.Json.Serialization.JsonSerializable(typeof(UpgradedEventData))]
[System.Text.Json.Serialization.JsonSerializable(typeof(ForkedEventData))]
public sealed partial class KvmdEventJson : System.Text.Json.Serialization.JsonSerializerContext;
