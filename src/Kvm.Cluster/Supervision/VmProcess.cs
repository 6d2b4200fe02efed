using System.Diagnostics;
using Kvm.Control;
using Kvm.Interop.Handles;

namespace Kvm.Cluster.Supervision;

/// <summary>How a kvm-vmm process ended.</summary>
/// <param name="Status">Its exit status; null when nobody could learn it (a process kvmd adopted, killed before it recorded one).</param>
/// <param name="Reason">Why: the VM's own account from its exit record, or what kvmd saw.</param>
/// <param name="Failed">A crash of the guest or the VMM, rather than a stop asked for or done by the guest.</param>
/// <param name="Fenced">The VM's fence stopped it: this host had stopped renewing its lease.</param>
/// <param name="HandedOverTo">The process gave the VM to a new kvm-vmm (this pid), where it runs on: not an end of the VM.</param>
public sealed record VmExit(int? Status, string Reason, bool Failed, bool Fenced = false, int? HandedOverTo = null)
{
    public static VmExit Of(VmExitRecord record) => new(record.Status, record.Reason, record.Failed, record.Fenced);
}

/// <summary>
/// One running kvm-vmm: started by this kvmd (its child) or found again after a restart of kvmd
/// (adopted). Either way a pidfd refers to exactly that process, so a later process that reuses
/// its pid is never signalled or mistaken for it; <see cref="Exited"/> completes when it ends.
/// </summary>
public sealed class VmProcess : IDisposable
{
    private readonly PidFdHandle _pidfd;
    private readonly Process? _child;

    private VmProcess(VmFiles files, int pid, PidFdHandle pidfd, Process? child)
    {
        Files = files;
        Pid = pid;
        _pidfd = pidfd;
        _child = child;
        Exited = DescribeAsync(child is not null ? WaitChildAsync(child) : WaitAdoptedAsync());
    }

    public VmFiles Files { get; }
    public string Name => Files.Name;
    public int Pid { get; }

    /// <summary>Whether this kvmd started it (else it was found again after a restart).</summary>
    public bool Adopted => _child is null;

    /// <summary>Completes with how the process ended.</summary>
    public Task<VmExit> Exited { get; }

    /// <summary>Starts kvm-vmm as a child; it leaves kvmd's session, so it outlives kvmd.</summary>
    public static VmProcess Start(VmFiles files, ProcessStartInfo start)
    {
        var child = Process.Start(start) ?? throw new InvalidOperationException($"cannot start {start.FileName}");
        // kvm-vmm reads nothing from kvmd: close its standard input (it gets end-of-file, not kvmd's terminal).
        if (start.RedirectStandardInput)
            child.StandardInput.Close();
        var pidfd = PidFdHandle.Open(child.Id);
        if (pidfd is null)
        {
            // It has already exited: a pidfd can no longer be had, but its status can.
            child.WaitForExit();
            pidfd = new PidFdHandle(-1);
        }
        return new VmProcess(files, child.Id, pidfd, child);
    }

    /// <summary>Takes over the process <paramref name="pid"/> (not a child of this kvmd); null when it no longer exists.</summary>
    public static VmProcess? Adopt(VmFiles files, int pid)
    {
        var pidfd = PidFdHandle.Open(pid);
        return pidfd is null ? null : new VmProcess(files, pid, pidfd, null);
    }

    private int _recorded;

    // While a hand-over (control method handover) is under way: completes with the new process's
    // pid once it runs the VM, or null when the hand-over failed.
    private TaskCompletionSource<int?>? _handover;

    /// <summary>
    /// A hand-over of the VM to a new kvm-vmm begins: if this process ends meanwhile, its end is
    /// judged only once <see cref="EndHandover"/> says how the hand-over went. A process that exits
    /// having handed the VM over (status 0, no exit record of its own: the new process records the
    /// VM's end) then reports <see cref="VmExit.HandedOverTo"/>, not a failure.
    /// </summary>
    public void BeginHandover()
    {
        if (Interlocked.CompareExchange(ref _handover, new TaskCompletionSource<int?>(TaskCreationOptions.RunContinuationsAsynchronously), null) is not null)
            throw new InvalidOperationException($"a hand-over of kvm-vmm pid {Pid} is already under way");
    }

    /// <summary>The hand-over ended: <paramref name="newPid"/> runs the VM now, or null when it failed (the VM stays here).</summary>
    public void EndHandover(int? newPid)
    {
        if (newPid is { } pid)
            Volatile.Write(ref _handedOverTo, pid);
        Interlocked.Exchange(ref _handover, null)?.TrySetResult(newPid);
    }

    private int _handedOverTo; // 0: not handed over

    /// <summary>The pid this process handed its VM to, once a hand-over succeeded.</summary>
    public int? HandedOverTo => Volatile.Read(ref _handedOverTo) is var pid and not 0 ? pid : null;

    /// <summary>The end as seen, or a hand-over when this process gave the VM away (waiting for the hand-over's outcome if it is under way).</summary>
    private async Task<VmExit> DescribeAsync(Task<VmExit> ended)
    {
        var exit = await ended.ConfigureAwait(false);
        if (Volatile.Read(ref _handover) is { } pending)
            await pending.Task.ConfigureAwait(false);
        return Judge(exit, HandedOverTo, HasOwnExitRecord());
    }

    private bool HasOwnExitRecord() => VmHost.ReadExitRecord(Files.ExitFile) is { } record && record.Pid == Pid;

    /// <summary>
    /// How a process's end counts, given the pid it handed its VM to (if it did) and whether it
    /// recorded an end of its own: a process that handed the VM over and exited 0 (or, adopted,
    /// with no status known) without a record of its own gave the VM away; anything else is the
    /// end it reported.
    /// </summary>
    public static VmExit Judge(VmExit exit, int? handedOverTo, bool ownExitRecord) =>
        handedOverTo is { } pid && !ownExitRecord && exit.Status is null or 0
            ? new VmExit(exit.Status, $"handed the VM over to kvm-vmm pid {pid}, where it runs on", false, HandedOverTo: pid)
            : exit;

    /// <summary>True the first time only: whoever gets true records this process's end in the inventory.</summary>
    public bool TryMarkRecorded() => Interlocked.Exchange(ref _recorded, 1) == 0;

    /// <summary>Sends a signal to exactly this process; false when it has exited.</summary>
    public bool Signal(int signal) => !_pidfd.IsInvalid && !Exited.IsCompleted && _pidfd.Signal(signal);

    private async Task<VmExit> WaitChildAsync(Process child)
    {
        await child.WaitForExitAsync().ConfigureAwait(false);
        int status = child.ExitCode;
        var record = VmHost.ReadExitRecord(Files.ExitFile);
        if (record is not null && record.Pid == Pid)
            return VmExit.Of(record) with { Status = status };
        // .NET reports death by signal N as 128 + N.
        string reason = status > 128 ? $"kvm-vmm was killed by signal {status - 128}" : $"kvm-vmm exited with status {status} without recording why";
        return new VmExit(status, reason, true);
    }

    private Task<VmExit> WaitAdoptedAsync() => Task.Factory.StartNew(() =>
    {
        _pidfd.WaitForExit(-1);
        // The exit record is written just before the process exits; it is there now if it ever will be.
        var record = VmHost.ReadExitRecord(Files.ExitFile);
        return record is not null && record.Pid == Pid
            ? VmExit.Of(record)
            : new VmExit(null, "kvm-vmm ended without recording why (killed?)", true);
    }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    public void Dispose()
    {
        _pidfd.Dispose();
        _child?.Dispose();
    }
}
