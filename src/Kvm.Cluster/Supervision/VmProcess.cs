using System.Diagnostics;
using Kvm.Control;
using Kvm.Interop.Handles;

namespace Kvm.Cluster.Supervision;

/// <summary>How a kvm-vmm process ended.</summary>
/// <param name="Status">Its exit status; null when nobody could learn it (a process kvmd adopted, killed before it recorded one).</param>
/// <param name="Reason">Why: the VM's own account from its exit record, or what kvmd saw.</param>
/// <param name="Failed">A crash of the guest or the VMM, rather than a stop asked for or done by the guest.</param>
/// <param name="Fenced">The VM's fence stopped it: this host had stopped renewing its lease.</param>
public sealed record VmExit(int? Status, string Reason, bool Failed, bool Fenced = false)
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
        Exited = child is not null ? WaitChildAsync(child) : WaitAdoptedAsync();
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
