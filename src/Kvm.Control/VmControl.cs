using System.Globalization;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Rpc;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.Control;

/// <summary>The VM's fence expired: its supervisor did not renew its lease in time (<see cref="VmControl.Fence"/>).</summary>
public sealed record FenceStop : VmStopReason
{
    public override string Describe() => "VM stopped: fenced: the supervisor did not renew the VM's lease in time";
    public override bool IsError => false;
}

/// <summary>
/// The operations of a running VM that kvm-vmm's control socket offers: status, pause, resume,
/// stop (the ACPI power button, then forced after a timeout, or forced at once), stats and
/// devices. Each is a plain method (tests call them directly); <see cref="Register"/> puts them
/// on an RPC dispatcher under those names.
/// </summary>
/// <param name="host">The sockets and options this process serves, which a VM handed over keeps (null: no hand-over).</param>
public sealed class VmControl(VirtualMachine vm, VmHostOptions? host = null) : IDisposable
{
    /// <summary>
    /// The socket paths a hand-over lets go to the new process and takes back if it fails after
    /// that (null: the files are the servers' own to the end).
    /// </summary>
    public HandoverPaths? Paths { get; set; }

    public const double DefaultStopTimeoutSeconds = 30;
    public const double MaxStopTimeoutSeconds = 3600;

    private readonly Lock _lock = new();
    private bool _paused;
    private string? _pausedBy;      // why the VM paused itself (a denial-of-service rule), until resumed
    private bool _stopping;

    private bool Stopped => vm.Stopped.IsCompleted;

    public string State
    {
        get
        {
            lock (_lock)
                return Stopped ? "stopped" : _stopping ? "stopping" : _suspended is not null ? "suspended" : _paused ? "paused" : "running";
        }
    }

    public VmStatus Status() => new(
        State,
        Environment.ProcessId,
        Math.Round(vm.Uptime.TotalSeconds, 3),
        vm.Vcpus.Select(t => new VcpuStatus((int)t.Vcpu.Id, t.State.ToString().ToLowerInvariant())).ToList(),
        vm.ExitCounts,
        vm.Stopped.IsCompleted ? vm.Stopped.Result.Describe() : null,
        Volatile.Read(ref _pausedBy),
        vm.Spec.Disks.Select(d => d.Path).ToList(),
        vm.GenerationId);

    /// <summary>A NIC's denial-of-service rule fired with the action suspend: the VM pauses until an operator resumes it.</summary>
    private void PauseForTraffic(string nic, Kvm.Network.DosAlarm alarm)
    {
        lock (_lock)
        {
            if (Stopped || _stopping || _suspended is not null || _paused)
                return;
            vm.Pause();
            _paused = true;
            _pausedBy = $"{nic}: denial-of-service rule {alarm.Describe()}";
        }
    }

    public StateChange Pause()
    {
        lock (_lock)
        {
            RequireRunning("pause");
            if (!_paused)
            {
                vm.Pause();
                _paused = true;
            }
            return new StateChange("paused");
        }
    }

    public StateChange Resume()
    {
        lock (_lock)
        {
            RequireRunning("resume");
            if (_suspended is not null)
                throw new RpcException(RpcErrorCode.InvalidState,
                    "resume: the VM is suspended, its disks closed: it resumes in a new kvm-vmm (method handover; 'vmctl control resume SOCKET')");
            if (_paused)
            {
                vm.Resume();
                _paused = false;
                _pausedBy = null;
            }
            return new StateChange("running");
        }
    }

    /// <summary>The longest working-set window a save takes, in seconds.</summary>
    public static double MaxWorkingSetSeconds => Kvm.Vmm.Snapshot.VmSnapshot.MaxWorkingSetWindow.TotalSeconds;

    /// <summary>
    /// Saves the VM into <see cref="SaveRequest.Directory"/>: pauses it (vCPUs, then devices: no
    /// request in flight, images flushed), writes its state and RAM as one snapshot, then resumes
    /// it (unless it was paused before) or, with <see cref="SaveRequest.Stop"/>, stops it. A save
    /// that fails leaves the VM as it was and any older snapshot in the directory intact.
    /// With <see cref="SaveRequest.WorkingSetSeconds"/> the VM (which must be running) carries on
    /// for that long after the save point with its touches traced, and the pages touched are
    /// added to the snapshot as its working set (<see cref="Kvm.Vmm.Snapshot.VmSnapshot.SaveWithWorkingSet"/>);
    /// then it stops (with Stop) or runs on. A VM whose RAM a lazy restore is still loading is
    /// refused a working set before anything is paused or written.
    /// </summary>
    public SaveResult Save(SaveRequest request)
    {
        if (string.IsNullOrEmpty(request.Directory) || !Path.IsPathFullyQualified(request.Directory))
            throw new RpcException(RpcErrorCode.InvalidParams, $"save: directory '{request.Directory}' is not an absolute path");
        TimeSpan? window = null;
        if (request.WorkingSetSeconds is { } seconds)
        {
            if (double.IsNaN(seconds) || seconds <= 0 || seconds > MaxWorkingSetSeconds)
                throw new RpcException(RpcErrorCode.InvalidParams,
                    $"save: workingSetSeconds {seconds.ToString(CultureInfo.InvariantCulture)} is out of range (more than 0, at most {MaxWorkingSetSeconds})");
            window = TimeSpan.FromSeconds(seconds);
        }
        else if (request.RequireWorkingSet)
            throw new RpcException(RpcErrorCode.InvalidParams, "save: requireWorkingSet needs workingSetSeconds (the window to trace)");
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        bool wasPaused;
        double? resumedAfter = null;
        lock (_lock)
        {
            RequireRunning("save");
            if (_suspended is not null)
                throw new RpcException(RpcErrorCode.InvalidState, "save: the VM is suspended, its disks closed; hand it over (handover) and save it there");
            if (_saving)
                throw new RpcException(RpcErrorCode.InvalidState, "save: a save of this VM is already running");
            if (window is not null && _paused)
                throw new RpcException(RpcErrorCode.InvalidState, "save: the VM is paused, so a working set cannot be traced (it touches nothing): resume it first, or save without a working set");
            if (window is not null && Kvm.Vmm.Snapshot.WorkingSetTracer.Refusal(vm) is { } refusal)
                throw new RpcException(RpcErrorCode.InvalidState, $"save: {refusal}");
            _saving = true;
            wasPaused = _paused;
            if (!_paused)
            {
                vm.Pause();
                _paused = true;
            }
        }
        Kvm.Vmm.Snapshot.SnapshotWriteResult? written = null;
        Kvm.Vmm.Snapshot.WorkingSetSaveResult? traced = null;
        double paused;
        string state;
        try
        {
            try
            {
                if (window is { } w)
                {
                    // The VM runs again for the window: the guest's pause ends there.
                    traced = Kvm.Vmm.Snapshot.VmSnapshot.SaveWithWorkingSet(vm, request.Directory, w, request.RequireWorkingSet, () =>
                    {
                        lock (_lock)
                        {
                            vm.Resume();
                            _paused = false;
                        }
                        resumedAfter = System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds;
                    });
                    written = traced.Snapshot;
                }
                else
                    written = Kvm.Vmm.Snapshot.VmSnapshot.Save(vm, request.Directory);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or InvalidOperationException
                                          or Kvm.Vmm.Snapshot.WorkingSetUnavailableException or Kvm.Vmm.Snapshot.SnapshotFormatException)
            {
                throw new RpcException(RpcErrorCode.OperationFailed, $"save {request.Directory}: {e.Message}", inner: e);
            }
        }
        finally
        {
            lock (_lock)
            {
                _saving = false;
                if (request.Stop && written is not null)
                    _stopping = true;
                else if (!wasPaused && _paused)
                {
                    vm.Resume();
                    _paused = false;
                }
                state = _stopping ? "stopping" : _paused ? "paused" : "running";
            }
            paused = resumedAfter ?? System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds;
        }
        if (request.Stop)
            vm.RequestStop(new HostStop($"stopped after saving to {request.Directory}"));
        var ws = traced?.WorkingSet;
        return new SaveResult(request.Directory, state, wasPaused ? 0 : Math.Round(paused, 4),
            Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds, 4),
            written!.StateBytes, written.MemoryDataSize, written.MemoryBytesWritten,
            ws?.Pages, ws?.Ranges.Count, ws is null ? null : Math.Round(ws.Seconds, 3), traced?.WorkingSetSkipped);
    }

    private bool _saving;

    /// <summary>
    /// Takes a live checkpoint into <see cref="CheckpointRequest.Directory"/>
    /// (<see cref="Kvm.Vmm.Snapshot.VmCheckpoint.Take"/>): the guest stops only while its state is
    /// saved, its RAM write-protected and its disks moved onto new top images, then runs on (a VM
    /// paused before stays paused) while RAM as it was at the stop is written out. Refused while a
    /// save or checkpoint runs, when suspended, and where the kernel cannot write-protect RAM.
    /// </summary>
    public CheckpointResult Checkpoint(CheckpointRequest request)
    {
        if (string.IsNullOrEmpty(request.Directory) || !Path.IsPathFullyQualified(request.Directory))
            throw new RpcException(RpcErrorCode.InvalidParams, $"checkpoint: directory '{request.Directory}' is not an absolute path");
        if (request.BytesPerSecond is <= 0)
            throw new RpcException(RpcErrorCode.InvalidParams, $"checkpoint: bytesPerSecond {request.BytesPerSecond} must be positive");
        bool wasPaused;
        lock (_lock)
        {
            RequireRunning("checkpoint");
            if (_suspended is not null)
                throw new RpcException(RpcErrorCode.InvalidState, "checkpoint: the VM is suspended, its disks closed; hand it over (handover) and checkpoint it there");
            if (_saving)
                throw new RpcException(RpcErrorCode.InvalidState, "checkpoint: a save or checkpoint of this VM is already running");
            _saving = true;
            wasPaused = _paused;
        }
        try
        {
            var taken = Kvm.Vmm.Snapshot.VmCheckpoint.Take(vm, request.Directory,
                new Kvm.Vmm.Snapshot.CheckpointOptions { BytesPerSecond = request.BytesPerSecond, CopyDisks = request.CopyDisks },
                pause: () =>
                {
                    lock (_lock)
                    {
                        if (!_paused)
                        {
                            vm.Pause();
                            _paused = true;
                        }
                    }
                },
                resume: () =>
                {
                    lock (_lock)
                    {
                        if (!wasPaused && _paused)
                        {
                            vm.Resume();
                            _paused = false;
                        }
                    }
                });
            string state;
            lock (_lock)
                state = _stopping ? "stopping" : _paused ? "paused" : "running";
            var m = taken.Memory;
            return new CheckpointResult(taken.Directory, state, wasPaused ? 0 : Math.Round(taken.StopSeconds, 4), taken.StopSteps,
                Math.Round(taken.Seconds, 4), taken.Layers, taken.Disks, taken.Snapshot.MemoryDataSize, taken.Snapshot.MemoryBytesWritten,
                m.Faults, m.BytesOnWrite, taken.Phases);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or InvalidOperationException
                                      or Kvm.Vmm.Snapshot.SnapshotFormatException or Kvm.Hypervisor.HypervisorException)
        {
            throw new RpcException(e is InvalidOperationException ? RpcErrorCode.InvalidState : RpcErrorCode.OperationFailed,
                $"checkpoint {request.Directory}: {e.Message}", inner: e);
        }
        finally
        {
            lock (_lock)
                _saving = false;
        }
    }

    private void RequireRunning(string operation)
    {
        if (Stopped || _stopping)
            throw new RpcException(RpcErrorCode.InvalidState, $"{operation}: the VM is {(Stopped ? "stopped" : "stopping")}");
        if (_handingOver)
            throw new RpcException(RpcErrorCode.InvalidState, $"{operation}: the VM is being handed over to a new kvm-vmm");
    }

    private SuspendedVm? _suspended;
    private long _suspendedAt;      // Stopwatch timestamp of the pause that led to the suspend
    private bool _handingOver;

    /// <summary>
    /// Suspends the VM for a hand-over: pauses it (unless paused), captures its device and vCPU
    /// state and closes its disk images, leaving guest RAM where it is. The VM then resumes only in
    /// a new kvm-vmm (<see cref="Handover"/>), perhaps with a changed configuration.
    /// </summary>
    public SuspendResult Suspend()
    {
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        lock (_lock)
        {
            RequireRunning("suspend");
            if (_suspended is null)
                SuspendLocked("suspend");
            return new SuspendResult("suspended", Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds, 4), _suspended!.State.Length);
        }
    }

    private void SuspendLocked(string operation, StepClock? clock = null)
    {
        if (vm.MemoryLoader is { } loader && !loader.WaitDone(TimeSpan.FromSeconds(5)))
            throw new RpcException(RpcErrorCode.InvalidState,
                $"{operation}: guest RAM is still being loaded from the snapshot (lazy restore: {loader.Stats.BytesOnTouch + loader.Stats.BytesFirst + loader.Stats.BytesInBackground} of {loader.Stats.BytesTotal} bytes); try again once it is in");
        long pausedAt = System.Diagnostics.Stopwatch.GetTimestamp();
        clock?.Restart();
        bool wasPaused = _paused;
        if (!_paused)
        {
            vm.Pause();
            _paused = true;
            clock?.Mark("pause vCPUs and devices");
        }
        try
        {
            _suspended = VmHandover.Suspend(vm, clock);
            _suspendedAt = pausedAt;
        }
        catch (Exception e) when (!vm.DisksClosed && e is IOException or InvalidOperationException or ArgumentException or Kvm.Hypervisor.State.StateFormatException)
        {
            if (!wasPaused)
            {
                vm.Resume();
                _paused = false;
            }
            throw new RpcException(RpcErrorCode.OperationFailed, $"{operation}: {e.Message}", inner: e);
        }
    }

    /// <summary>
    /// Hands the VM to a new kvm-vmm process (<see cref="HandoverRequest.Vmm"/>, or this program),
    /// with the changes the request names: the new process starts first, then the VM is suspended
    /// (<see cref="Suspend"/>, unless it is already), its state and guest RAM's memfd go over, and
    /// once the new process has built and restored the machine, it takes the control and console
    /// socket paths and runs the VM; this process then stops. If the new process cannot take it,
    /// the VM stays suspended here (nothing is lost) and the error says why.
    /// </summary>
    public HandoverResult Handover(HandoverRequest request)
    {
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        if (host is null)
            throw new RpcException(RpcErrorCode.InvalidState, "handover: this VM is not served by a kvm-vmm with control and console sockets");
        string program = request.Vmm ?? DefaultSuccessor();
        if (!Path.IsPathFullyQualified(program))
            throw new RpcException(RpcErrorCode.InvalidParams, $"handover: vmm '{program}' is not an absolute path");
        VmSpec spec = vm.Spec;
        var changes = new List<string>();
        try
        {
            if (request.Disks is { } disks)
            {
                spec = spec with { Disks = disks.Select((d, i) => d.ToSpec("in the handover request", i)).ToArray() };
                spec.Validate();
            }
            VmHandover.CheckChanges(vm.Spec, spec);
        }
        catch (Exception e) when (e is ArgumentException or Kvm.Devices.Manager.DeviceStateException)
        {
            throw new RpcException(RpcErrorCode.InvalidParams, $"handover: {e.Message}", inner: e);
        }
        for (int i = 0; i < spec.Disks.Count; i++)
        {
            if (i >= vm.Spec.Disks.Count)
                changes.Add($"virtio-blk{i} added: {spec.Disks[i].Path}");
            else
            {
                if (spec.Disks[i].Path != vm.Spec.Disks[i].Path)
                    changes.Add($"virtio-blk{i}: image {vm.Spec.Disks[i].Path} -> {spec.Disks[i].Path}");
                if (spec.Disks[i].Serial != vm.Spec.Disks[i].Serial)
                    changes.Add($"virtio-blk{i}: serial '{vm.Spec.Disks[i].Serial}' -> '{spec.Disks[i].Serial}'");
            }
        }
        if (request.Vmm is not null)
            changes.Add($"vmm {program}");

        if (vm.Memory.PrivateCopyOf is { } copyOf)
            throw new RpcException(RpcErrorCode.InvalidState,
                $"handover: guest RAM is a private copy-on-write mapping of {copyOf} (a mapped restore), which another process cannot take over: save the VM and restore it there instead");
        lock (_lock)
        {
            RequireRunning("handover");
            _handingOver = true;
        }
        Successor? successor = null;
        bool released = false;
        try
        {
            // The new process starts and builds the machine (on this guest RAM) before the guest pauses.
            successor = Successor.Start(program, host);
            successor.Prepare(spec, vm.Memory.Layout, vm.Spec.HugePages, vm.Memory.BackingFd);
            var clock = new StepClock("old");
            lock (_lock)
            {
                if (_suspended is null)
                    SuspendLocked("handover", clock);
            }
            successor.Offer(_suspended!, clock);
            clock.Restart();
            Paths?.Release();
            released = true;
            clock.Mark("let the socket paths go");
            successor.Go(clock);
            Paths?.Forget();
            double paused = System.Diagnostics.Stopwatch.GetElapsedTime(_suspendedAt).TotalSeconds;
            lock (_lock)
                _stopping = true;
            vm.RequestStop(new HandedOverStop(successor.Pid, program));
            return new HandoverResult(successor.Pid, program, Math.Round(paused, 4),
                Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds, 4), changes, clock.Steps);
        }
        catch (Exception e) when (successor is { GuestStarted: true } && e is HandoverException or IOException or System.Net.Sockets.SocketException)
        {
            // The new process started the guest: the state here is stale, the VM cannot go on in this process.
            Paths?.Forget();
            lock (_lock)
                _stopping = true;
            if (successor.HasExited || !successor.WaitAlive(TimeSpan.FromSeconds(1)))
            {
                vm.RequestStop(new HandoverLostStop(successor.Pid, program, e.Message));
                throw new RpcException(RpcErrorCode.OperationFailed,
                    $"handover to {program}: the new kvm-vmm (pid {successor.Pid}) started the guest, then failed: {e.Message}; " +
                    "the VM is lost (what the guest did there is gone, and this process's state of it is older)", inner: e);
            }
            // It runs the guest, it only did not say so in time.
            vm.RequestStop(new HandedOverStop(successor.Pid, program));
            return new HandoverResult(successor.Pid, program, Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(_suspendedAt).TotalSeconds, 4),
                Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds, 4), [.. changes, $"the new kvm-vmm did not confirm its start: {e.Message}"]);
        }
        catch (Exception e) when (e is HandoverException or IOException or System.Net.Sockets.SocketException or UnauthorizedAccessException)
        {
            successor?.Reap(TimeSpan.FromSeconds(5));
            if (released)
            {
                // The new process may have taken the paths before it failed: clients must find this one again.
                try
                {
                    Paths?.Reclaim();
                }
                catch (Exception r) when (r is IOException or UnauthorizedAccessException)
                {
                    throw new RpcException(RpcErrorCode.OperationFailed, $"handover to {program}: {e.Message}; and the socket paths could not be taken back: {r.Message} " +
                        $"(the VM stays {State} in pid {Environment.ProcessId}, which no longer answers on them)", inner: e);
                }
            }
            throw new RpcException(RpcErrorCode.OperationFailed, $"handover to {program}: {e.Message} (the VM stays {State} in pid {Environment.ProcessId})", inner: e);
        }
        finally
        {
            successor?.Dispose();
            lock (_lock)
                _handingOver = false;
        }
    }

    /// <summary>The kvm-vmm a VM is handed to by default: this program if it is kvm-vmm, else the kvm-vmm beside it.</summary>
    public static string DefaultSuccessor()
    {
        string? self = Environment.ProcessPath;
        if (self is not null && Path.GetFileName(self) == "kvm-vmm")
            return self;
        return Path.Combine(AppContext.BaseDirectory, "kvm-vmm");
    }

    /// <summary>
    /// Stops the VM. Without force: presses the ACPI power button and waits up to the timeout for
    /// the guest to power off, then forces the stop. A paused VM cannot answer the power button:
    /// that is refused unless forced.
    /// </summary>
    public async Task<StopResult> StopAsync(StopRequest request, CancellationToken cancel)
    {
        if (request.TimeoutSeconds is < 0 or > MaxStopTimeoutSeconds || double.IsNaN(request.TimeoutSeconds))
            throw new RpcException(RpcErrorCode.InvalidParams, $"stop: timeoutSeconds {request.TimeoutSeconds.ToString(CultureInfo.InvariantCulture)} is out of range (0 to {MaxStopTimeoutSeconds})");
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        double Elapsed() => Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds, 3);
        lock (_lock)
        {
            if (Stopped)
                return new StopResult("already-stopped", vm.Stopped.Result.Describe(), 0);
            if (_paused && !request.Force)
                throw new RpcException(RpcErrorCode.InvalidState, "stop: the VM is paused, so the guest cannot answer the power button; resume it first, or force the stop");
            _stopping = true;
        }
        if (!request.Force)
        {
            vm.Pm.PressPowerButton();
            var done = await Task.WhenAny(vm.Stopped, Task.Delay(TimeSpan.FromSeconds(request.TimeoutSeconds), cancel)).ConfigureAwait(false);
            if (done == vm.Stopped)
                return new StopResult("guest", vm.Stopped.Result.Describe(), Elapsed());
        }
        string why = request.Force ? "stopped by request (forced)"
            : $"stopped by request: forced after the guest did not power off within {request.TimeoutSeconds.ToString(CultureInfo.InvariantCulture)} s of the power button";
        vm.RequestStop(new HostStop(why));
        var reason = await vm.Stopped.ConfigureAwait(false);
        return new StopResult(reason is HostStop ? "forced" : "guest", reason.Describe(), Elapsed());
    }

    private Timer? _fence;
    private long _fenceDeadline; // Stopwatch timestamp; 0: not armed
    private string _fenceAction = "stop";

    /// <summary>
    /// Arms (or re-arms) the fence: unless armed again within <see cref="FenceRequest.Seconds"/>,
    /// the VM stops (or pauses) by itself. A supervisor that holds the VM's lease re-arms it after
    /// each renewal with the time its lease still surely has; if the supervisor stops renewing (it
    /// froze, died, or lost the database), the VM is off before the lease can pass to another host.
    /// The deadline is on this process's monotonic clock, which no other process's stall can hold.
    /// </summary>
    public FenceStatus Fence(FenceRequest request)
    {
        if (request.Action is not ("stop" or "pause"))
            throw new RpcException(RpcErrorCode.InvalidParams, $"fence: action '{request.Action}' is not one of stop, pause");
        if (request.Seconds is < 0 or > 86400 || double.IsNaN(request.Seconds))
            throw new RpcException(RpcErrorCode.InvalidParams, $"fence: seconds {request.Seconds.ToString(CultureInfo.InvariantCulture)} is out of range (0 to 86400)");
        lock (_lock)
        {
            if (request.Disarm)
            {
                _fence?.Dispose();
                _fence = null;
                _fenceDeadline = 0;
                return new FenceStatus(false, 0, _fenceAction);
            }
            // Armed again during a hand-over too: the lease is still the host's while the VM moves
            // between processes, and a hand-over that outlasts the fence would otherwise stop the VM.
            if (Stopped || _stopping)
                throw new RpcException(RpcErrorCode.InvalidState, $"fence: the VM is {(Stopped ? "stopped" : "stopping")}");
            _fenceAction = request.Action;
            var due = TimeSpan.FromSeconds(request.Seconds);
            _fenceDeadline = System.Diagnostics.Stopwatch.GetTimestamp() + (long)(due.TotalSeconds * System.Diagnostics.Stopwatch.Frequency);
            _fence ??= new Timer(_ => FenceExpired());
            _fence.Change(due, Timeout.InfiniteTimeSpan);
            return new FenceStatus(true, request.Seconds, _fenceAction);
        }
    }

    private void FenceExpired()
    {
        string action;
        lock (_lock)
        {
            if (_fenceDeadline == 0 || Stopped)
                return;
            // Act only on a deadline that has passed. The timer may fire before it, because a re-arm
            // raced with this firing or because the timer's clock (milliseconds, coarse) runs a
            // little ahead of the Stopwatch's: then wait for the rest, or the one-shot timer would
            // never fire again and the fence would be silently gone.
            long left = _fenceDeadline - System.Diagnostics.Stopwatch.GetTimestamp();
            if (left > 0)
            {
                _fence?.Change(TimeSpan.FromSeconds((double)left / System.Diagnostics.Stopwatch.Frequency) + TimeSpan.FromMilliseconds(1), Timeout.InfiniteTimeSpan);
                return;
            }
            _fenceDeadline = 0;
            action = _fenceAction;
            if (action == "pause" && !_paused && !_stopping)
            {
                vm.Pause();
                _paused = true;
                return;
            }
            _stopping = true;
        }
        vm.RequestStop(new FenceStop());
    }

    public void Dispose()
    {
        lock (_lock)
        {
            _fence?.Dispose();
            _fence = null;
        }
    }

    public VmStats Stats() => new(
        new MemoryStats(vm.Spec.MemoryBytes, ResidentBytes(), vm.MemoryLoader?.Stats is { } l
            ? new MemoryLoadStats(l.Faults, l.BytesOnTouch, l.BytesFirst, l.BytesInBackground, l.BytesTotal, l.Seconds)
            : null),
        vm.Disks.Select((d, i) =>
        {
            var block = (VirtioBlock)d.Device;
            var s = block.Stats;
            return new DiskStats($"virtio-blk{i}", block.Image.Path, block.ReadOnly, s.Reads, s.Writes, s.Flushes, s.Discards,
                s.WriteZeroes, s.Other, s.Failed, s.BytesRead, s.BytesWritten, s.IoErrors, Math.Round(s.MeanMicroseconds, 1), s.MaxMicroseconds);
        }).ToList(),
        vm.Nics.Count == 0 ? null : vm.Nics.Select((n, i) => NicStatsOf($"virtio-net{i}", (Kvm.Devices.Virtio.Net.VirtioNet)n.Device)).ToList());

    private static NicStats NicStatsOf(string id, Kvm.Devices.Virtio.Net.VirtioNet net)
    {
        var s = net.Stats;
        var team = net.Backend as Kvm.Network.NicTeam;
        var uplinks = team is null
            ? [new UplinkStats(net.Backend.Name, net.Backend.LinkUp, true)]
            : team.Status().Select(u => new UplinkStats(u.Name, u.Up, u.Active, u.RxPackets, u.RxBytes, u.TxPackets, u.TxBytes,
                u.TxDropped, u.RxDroppedOnBackup, u.Failures, team.Options.ArpTarget is null ? null : u.ProbesSent,
                team.Options.ArpTarget is null ? null : u.ProbesAnswered)).ToList();
        return new NicStats(id, net.Mac.ToString(), net.Options.QueuePairs, net.ActivePairs, s.RxPackets, s.RxBytes, s.TxPackets,
            s.TxBytes, s.RxFiltered, s.RxDropped, s.TxSpoofed, s.TxTooLong, s.TxMalformed, s.TxBackendDropped,
            team is null ? null : Kvm.Vmm.Machine.NicSpec.PolicyName(team.Options.Policy), team?.Failovers ?? 0, uplinks,
            net.TxRate, net.RxRate, net.Bandwidth?.FilePath, net.Bandwidth?.Members.Count, s.RxDosLimited, s.TxDosLimited);
    }

    /// <summary>This process's resident set (VmRSS from /proc/self/status), in bytes.</summary>
    private static long ResidentBytes()
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
        {
            if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
            {
                var parts = line.Split(' ', '\t', StringSplitOptions.RemoveEmptyEntries);
                return long.Parse(parts[1], CultureInfo.InvariantCulture) * 1024;
            }
        }
        return 0;
    }

    /// <summary>Every device by its stable id (the ids snapshots carry), its kind and where the guest finds it.</summary>
    public VmDevices Devices() => new(vm.Devices.Devices.Select(d => new DeviceInfo(d.Id, d.Device.StateKind, vm.DeviceLocation(d.Id) ?? "",
        d.Device is VirtioPciTransport { Device: VirtioBlock block }
            ? $"{block.Image.Path}{(block.ReadOnly ? " (read-only)" : "")}, {block.QueueCount} queue(s), {block.Capacity} sectors"
            : null)).ToList());

    /// <summary>Puts the operations on <paramref name="dispatcher"/>: status, pause, resume, stop, stats, devices, fence, save, checkpoint, suspend, handover.</summary>
    public void Register(RpcDispatcher dispatcher)
    {
        vm.TrafficAlarm += (nic, alarm) =>
        {
            if (!alarm.Cleared && vm.NicDosAction(nic) == Kvm.Network.DosAction.Suspend)
                PauseForTraffic(nic, alarm);
        };
        // Each type's JSON metadata is made on the method's first call: the VM starts sooner.
        dispatcher.Add("status", static () => VmControlJson.Default.VmStatus, (_, _) => ValueTask.FromResult(Status()));
        dispatcher.Add("pause", static () => VmControlJson.Default.StateChange, (_, _) => ValueTask.FromResult(Pause()));
        dispatcher.Add("resume", static () => VmControlJson.Default.StateChange, (_, _) => ValueTask.FromResult(Resume()));
        dispatcher.Add("stop", static () => VmControlJson.Default.StopRequest, static () => VmControlJson.Default.StopResult,
            async (request, _, cancel) => await StopAsync(request, cancel).ConfigureAwait(false));
        dispatcher.Add("stats", static () => VmControlJson.Default.VmStats, (_, _) => ValueTask.FromResult(Stats()));
        dispatcher.Add("devices", static () => VmControlJson.Default.VmDevices, (_, _) => ValueTask.FromResult(Devices()));
        dispatcher.Add("fence", static () => VmControlJson.Default.FenceRequest, static () => VmControlJson.Default.FenceStatus,
            (r, _, _) => ValueTask.FromResult(Fence(r)));
        dispatcher.Add("save", static () => VmControlJson.Default.SaveRequest, static () => VmControlJson.Default.SaveResult,
            (r, _, _) => ValueTask.FromResult(Save(r)));
        // Blocking while guest RAM is written out (the VM runs meanwhile): off the dispatcher's thread.
        dispatcher.Add("checkpoint", static () => VmControlJson.Default.CheckpointRequest, static () => VmControlJson.Default.CheckpointResult,
            async (r, _, _) => await Task.Run(() => Checkpoint(r)).ConfigureAwait(false));
        dispatcher.Add("suspend", static () => VmControlJson.Default.SuspendResult, (_, _) => ValueTask.FromResult(Suspend()));
        // Blocking for as long as the new process takes to start and build the machine: off the dispatcher's thread.
        dispatcher.Add("handover", static () => VmControlJson.Default.HandoverRequest, static () => VmControlJson.Default.HandoverResult,
            async (r, _, _) => await Task.Run(() => Handover(r)).ConfigureAwait(false));
    }
}
