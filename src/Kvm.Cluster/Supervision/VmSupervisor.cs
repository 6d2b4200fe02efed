using System.Collections.Concurrent;
using System.Diagnostics;
using Kvm.Control;
using Kvm.Interop.Native;
using Kvm.Rpc;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster.Supervision;

/// <summary>
/// The kvm-vmm processes of this host: starts them (one per VM, each in its own session so that
/// it outlives kvmd), finds them again after a restart of kvmd through their control sockets,
/// talks to them, and reports each one's end exactly once.
/// </summary>
public sealed partial class VmSupervisor(KvmdOptions options, ILogger logger) : IDisposable
{
    private readonly ConcurrentDictionary<string, VmProcess> _running = new(StringComparer.Ordinal);

    /// <summary>How long a new kvm-vmm may take to answer on its control socket.</summary>
    public TimeSpan StartTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Called once for each process that ends, after it has left <see cref="Running"/>.</summary>
    public Func<VmProcess, VmExit, Task>? OnExit { get; set; }

    public IReadOnlyCollection<VmProcess> Running => _running.Values.ToList();

    public VmProcess? Find(string name) => _running.TryGetValue(name, out var p) ? p : null;

    public VmFiles FilesOf(string name) => VmFiles.For(options, name);

    /// <summary>The kvm-vmm executable: as configured, else beside this program's own executable.</summary>
    public string VmmPath => options.Vmm
        ?? Path.Combine(Path.GetDirectoryName(Environment.ProcessPath) ?? ".", "kvm-vmm");

    /// <summary>
    /// Starts VM <paramref name="name"/> and returns once its control socket answers: booted from
    /// <paramref name="spec"/>, or with <paramref name="restore"/> restored from a snapshot (which
    /// the caller has checked against <paramref name="spec"/>, still written as the spec started).
    /// </summary>
    public async Task<VmProcess> StartAsync(string name, VmSpec spec, CancellationToken cancel, VmRestore? restore = null)
    {
        if (Find(name) is not null)
            throw new RpcException(RpcErrorCode.InvalidState, $"VM '{name}' is already running on this host");
        var files = FilesOf(name);
        Directory.CreateDirectory(files.RunDirectory);
        Directory.CreateDirectory(files.StateDirectory);
        File.Delete(files.ExitFile);
        File.WriteAllText(files.Spec, VmSpecJsonContext.Format(spec));

        var start = new ProcessStartInfo(VmmPath)
        {
            UseShellExecute = false,
            RedirectStandardInput = true,
            WorkingDirectory = "/",
        };
        string[] source = restore switch
        {
            { Fork: true } f => ["--restore", f.Directory, "--fork-spec", files.Spec],
            { } r => ["--restore", r.Directory, "--memory", r.Memory],
            null => ["--spec", files.Spec],
        };
        foreach (var a in source.Concat(
                 [
                     "--control", files.ControlSocket, "--console", files.ConsoleSocket,
                     "--log", files.Log, "--exit-file", files.ExitFile, "--new-session",
                 ]))
            start.ArgumentList.Add(a);
        if (options.Group is { } group && Libc.GroupId(group) is not null)
        {
            start.ArgumentList.Add("--group");
            start.ArgumentList.Add(group);
        }
        File.AppendAllText(files.Log, $"--- {DateTimeOffset.UtcNow:O} kvmd starts {VmmPath} {string.Join(' ', start.ArgumentList)}{Environment.NewLine}");
        long logStart = files.LogLength();

        VmProcess process;
        try
        {
            process = VmProcess.Start(files, start);
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or IOException or InvalidOperationException)
        {
            throw new RpcException(RpcErrorCode.OperationFailed, $"cannot start VM '{name}': cannot run {VmmPath}", inner: e);
        }
        LogStarted(logger, name, process.Pid);

        // Ready when the control socket answers; failed when the process ends first.
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            if (process.Exited.IsCompleted)
            {
                var exit = await process.Exited.ConfigureAwait(false);
                process.Dispose();
                // What kvm-vmm said is the reason; its exit record only says that it did not start.
                string tail = files.LogTail(logStart);
                throw new RpcException(RpcErrorCode.OperationFailed,
                    $"VM '{name}' did not start: {(tail.Length > 0 ? tail : exit.Reason)} (log: {files.Log})");
            }
            if (await TryStatusAsync(files.ControlSocket, cancel).ConfigureAwait(false) is { } status && status.Pid == process.Pid)
                break;
            if (deadline.Elapsed > StartTimeout)
            {
                process.Signal(9);
                await process.Exited.ConfigureAwait(false);
                process.Dispose();
                throw new RpcException(RpcErrorCode.OperationFailed,
                    $"VM '{name}' did not answer on its control socket {files.ControlSocket} within {StartTimeout.TotalSeconds} s; kvm-vmm (pid {process.Pid}) was killed (its log: {files.Log})");
            }
            await Task.Delay(25, cancel).ConfigureAwait(false);
        }
        Track(process);
        return process;
    }

    /// <summary>
    /// Finds VM <paramref name="name"/> again after a restart of kvmd: its control socket answers
    /// with a pid, and a pidfd taken on that pid is confirmed by a second answer (so the pidfd is
    /// the process that answers, not a later one with its pid). Null when it does not run.
    /// </summary>
    public async Task<VmProcess?> AdoptAsync(string name, CancellationToken cancel)
    {
        if (Find(name) is { } known)
            return known;
        var files = FilesOf(name);
        if (await TryStatusAsync(files.ControlSocket, cancel).ConfigureAwait(false) is not { } first)
            return null;
        var process = VmProcess.Adopt(files, first.Pid);
        if (process is null)
            return null;
        if (await TryStatusAsync(files.ControlSocket, cancel).ConfigureAwait(false) is not { } second || second.Pid != first.Pid || process.Exited.IsCompleted)
        {
            process.Dispose();
            return null;
        }
        LogAdopted(logger, name, process.Pid, first.State);
        Track(process);
        return process;
    }

    /// <summary>
    /// Takes over the kvm-vmm (pid <paramref name="pid"/>) that <paramref name="old"/> handed VM
    /// <paramref name="name"/> to (control method handover): a pidfd on that pid, confirmed by the
    /// VM's control socket answering with it (the new process serves the same socket path), then
    /// tracked in the old one's place. Null when no such process answers there.
    /// </summary>
    public async Task<VmProcess?> AdoptSuccessorAsync(VmProcess old, int pid, CancellationToken cancel)
    {
        var files = old.Files;
        var process = VmProcess.Adopt(files, pid);
        if (process is null)
            return null;
        if (await TryStatusAsync(files.ControlSocket, cancel).ConfigureAwait(false) is not { } status || status.Pid != pid || process.Exited.IsCompleted)
        {
            process.Dispose();
            return null;
        }
        LogHandedOver(logger, old.Name, old.Pid, pid);
        Track(process);
        return process;
    }

    /// <summary>Names of the VM directories under the run directory (VMs that may still run, whatever the inventory says).</summary>
    public IEnumerable<string> NamesOnDisk()
    {
        string vms = Path.Combine(options.RunDirectory, "vms");
        return Directory.Exists(vms) ? Directory.EnumerateDirectories(vms).Select(Path.GetFileName).OfType<string>() : [];
    }

    /// <summary>Connects to the control socket of a VM that runs here.</summary>
    public RpcClient Connect(string name) =>
        RpcClient.Connect(FilesOf(name).ControlSocket, $"the VM '{name}'");

    /// <summary>The status VM <paramref name="name"/>'s kvm-vmm reports; null when it does not answer.</summary>
    public Task<VmStatus?> StatusAsync(string name, CancellationToken cancel) => TryStatusAsync(FilesOf(name).ControlSocket, cancel);

    private static async Task<VmStatus?> TryStatusAsync(string socket, CancellationToken cancel)
    {
        if (!File.Exists(socket))
            return null;
        try
        {
            using var client = RpcClient.Connect(socket, "kvm-vmm");
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancel);
            timeout.CancelAfter(TimeSpan.FromSeconds(10));
            return await client.CallAsync("status", VmControlJson.Default.VmStatus, timeout.Token).ConfigureAwait(false);
        }
        catch (RpcException)
        {
            return null;
        }
        catch (OperationCanceledException) when (!cancel.IsCancellationRequested)
        {
            return null;
        }
    }

    private void Track(VmProcess process)
    {
        _running[process.Name] = process;
        _ = process.Exited.ContinueWith(async t =>
        {
            _running.TryRemove(new KeyValuePair<string, VmProcess>(process.Name, process));
            var exit = t.Result;
            if (exit.HandedOverTo is { } successor)
            {
                // Not an end of the VM: it runs on in the new process, which is tracked instead.
                LogGaveUp(logger, process.Name, process.Pid, successor);
                process.Dispose();
                return;
            }
            LogExited(logger, process.Name, process.Pid, exit.Status?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "unknown", exit.Reason);
            try
            {
                if (OnExit is { } handler)
                    await handler(process, exit).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                LogExitHandlerFailed(logger, process.Name, e.Message);
            }
            finally
            {
                process.Dispose();
            }
        }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default).Unwrap();
    }

    /// <summary>Lets go of the processes without stopping them (they outlive kvmd).</summary>
    public void Dispose()
    {
        OnExit = null;
        _running.Clear();
    }

    // Event ids 2200-2299: supervision of kvm-vmm processes (2000-2099 are the devices', 2100-2199 kvmd's).
    [LoggerMessage(EventId = 2200, Level = LogLevel.Information, Message = "VM '{Name}': kvm-vmm started (pid {Pid})")]
    private static partial void LogStarted(ILogger logger, string name, int pid);

    [LoggerMessage(EventId = 2201, Level = LogLevel.Information, Message = "VM '{Name}': found running again (kvm-vmm pid {Pid}, {State})")]
    private static partial void LogAdopted(ILogger logger, string name, int pid, string state);

    [LoggerMessage(EventId = 2202, Level = LogLevel.Information, Message = "VM '{Name}': kvm-vmm (pid {Pid}) ended, status {Status}: {Reason}")]
    private static partial void LogExited(ILogger logger, string name, int pid, string status, string reason);

    [LoggerMessage(EventId = 2205, Level = LogLevel.Information, Message = "VM '{Name}': kvm-vmm pid {OldPid} handed it over to kvm-vmm pid {Pid}, tracked now")]
    private static partial void LogHandedOver(ILogger logger, string name, int oldPid, int pid);

    [LoggerMessage(EventId = 2206, Level = LogLevel.Information, Message = "VM '{Name}': kvm-vmm pid {Pid} exited after handing the VM over to pid {Successor}")]
    private static partial void LogGaveUp(ILogger logger, string name, int pid, int successor);

    [LoggerMessage(EventId = 2203, Level = LogLevel.Error, Message = "VM '{Name}': recording its end failed: {Error}")]
    private static partial void LogExitHandlerFailed(ILogger logger, string name, string error);
}

/// <summary>A start from a snapshot: the snapshot directory (absolute) and how guest RAM comes back ("eager" or "lazy").</summary>
/// <summary>A start from the snapshot in <paramref name="Directory"/>; a <paramref name="Fork"/> runs as a fork of it onto the VM's own spec (kvm-vmm --fork-spec; memory mapped).</summary>
public sealed record VmRestore(string Directory, string Memory, bool Fork = false);
