using Kvm.Rpc;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Control;

/// <summary>How kvm-vmm (or vmctl run) exposes a VM: a control socket, a console socket, and who may use them.</summary>
public sealed record VmHostOptions
{
    /// <summary>The JSON-RPC control socket (status, pause, resume, stop, stats, devices); null for none.</summary>
    public string? ControlSocket { get; init; }

    /// <summary>The console socket; null keeps the console on this process's terminal.</summary>
    public string? ConsoleSocket { get; init; }

    /// <summary>Who may use the sockets besides root and this process's user.</summary>
    public RpcAccessPolicy Access { get; init; } = RpcAccessPolicy.OwnerOnly;

    /// <summary>
    /// Where to record how the VM ended (<see cref="VmExitRecord"/>, written atomically just before
    /// the process exits), for a supervisor that may not be this process's parent; null for none.
    /// </summary>
    public string? ExitFile { get; init; }

    /// <summary>Mode of both socket files.</summary>
    public UnixFileMode SocketMode { get; init; } = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite;
}

/// <summary>Runs a VM with its control and console sockets until it stops.</summary>
public static partial class VmHost
{
    /// <summary>
    /// Runs the VM in the foreground as <see cref="ForegroundRun"/> does (signals, exit status),
    /// with the sockets <paramref name="options"/> asks for; with none, exactly as ForegroundRun.
    /// </summary>
    public static int Execute(VmLaunch launch, string program, VmHostOptions options, ILogger logger)
    {
        VmStopReason? stopped = null;
        int status = options.ControlSocket is null && options.ConsoleSocket is null
            ? ForegroundRun.Execute(launch, program, logger)
            : ForegroundRun.Execute(launch, program, (s, cancel) => stopped = Run(s, options, logger, cancel), logger);
        // A VM handed over runs on in the new process, which records how it ends; one this process
        // failed to take over runs on in the giver, which does.
        if (options.ExitFile is { } file && stopped is not HandedOverStop && launch is not TakeOverLaunch { TookOver: false })
            WriteExitRecord(file, new VmExitRecord(status, stopped?.Describe() ?? "the VM did not start (see the log)",
                stopped is null || stopped.IsError, Environment.ProcessId, DateTimeOffset.UtcNow, stopped is FenceStop), logger);
        return status;
    }

    /// <summary>Writes <paramref name="record"/> to <paramref name="path"/> through a temporary file and a rename: a reader sees all of it or none.</summary>
    public static void WriteExitRecord(string path, VmExitRecord record, ILogger logger)
    {
        string temporary = $"{path}.{Environment.ProcessId}.tmp";
        try
        {
            File.WriteAllText(temporary, System.Text.Json.JsonSerializer.Serialize(record, VmControlJson.Default.VmExitRecord));
            File.Move(temporary, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            LogExitRecordFailed(logger, path, e.Message);
        }
    }

    /// <summary>Reads an exit record; null when the file is missing or not a record (a process killed before writing it).</summary>
    public static VmExitRecord? ReadExitRecord(string path)
    {
        try
        {
            return System.Text.Json.JsonSerializer.Deserialize(File.ReadAllText(path), VmControlJson.Default.VmExitRecord);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Text.Json.JsonException)
        {
            return null;
        }
    }

    public static VmStopReason Run(VmLaunch launch, VmHostOptions options, ILogger logger, CancellationToken cancel)
    {
        if (launch is TakeOverLaunch takeOver)
            return RunTakenOver(takeOver, options, logger, cancel);
        Kvm.Devices.Legacy.Serial.Serial16550? serial = null;
        ConsoleServer? console = null;
        ForegroundConsole? terminal = null;
        RpcServer? control = null;
        VmControl? vmControl = null;
        try
        {
            if (options.ConsoleSocket is { } consolePath)
                console = new ConsoleServer(consolePath, options.Access, options.SocketMode,
                    bytes => serial is { } s ? s.EnqueueInput(bytes.Span) : bytes.Length, logger);
            else
                terminal = ForegroundConsole.Attach();

            using var vm = launch.Create(console is not null ? console.Write : terminal!.Write, logger);
            serial = vm.Serial;
            terminal?.PumpInput(vm.Serial);
            console?.Start();
            if (options.ControlSocket is { } controlPath)
                (vmControl, control) = ServeControl(vm, options, controlPath, console, takeOver: false, logger);
            // The socket is bound (a client that connects now waits in its backlog); it accepts
            // once the vCPUs run, so the guest does not wait for the server's threads.
            var server = control;
            var reason = vm.Run(cancel, started: () => server?.Start());
            // A stop request answers once the VM has stopped: let it before the socket goes.
            control?.DisposeAsync().AsTask().GetAwaiter().GetResult();
            control = null;
            return reason;
        }
        finally
        {
            control?.DisposeAsync().AsTask().GetAwaiter().GetResult();
            vmControl?.Dispose();
            console?.DisposeAsync().AsTask().GetAwaiter().GetResult();
            terminal?.Dispose();
        }
    }

    /// <summary>
    /// The VM's control operations on a control socket at <paramref name="path"/> (not started
    /// yet); a hand-over leaves this server's and <paramref name="console"/>'s socket files to the
    /// new process. <paramref name="takeOver"/>: take the path from a live server handing it over.
    /// </summary>
    private static (VmControl Control, RpcServer Server) ServeControl(VirtualMachine vm, VmHostOptions options, string path,
        ConsoleServer? console, bool takeOver, ILogger logger)
    {
        var dispatcher = new RpcDispatcher(logger);
        RpcServer server;
        var vmControl = new VmControl(vm, options);
        vmControl.Register(dispatcher);
        try
        {
            server = new RpcServer(new RpcServerOptions
            {
                SocketPath = path,
                Access = options.Access,
                SocketMode = options.SocketMode,
                TakeOver = takeOver,
            }, dispatcher, logger);
        }
        catch
        {
            vmControl.Dispose();
            throw;
        }
        vmControl.Paths = new HandoverPaths(server, console);
        return (vmControl, server);
    }

    /// <summary>
    /// Runs a VM taken over from another kvm-vmm: builds its machine and its sockets (under hidden
    /// names) while the guest still runs in the giver, restores the state the giver sends once it
    /// has suspended the VM, takes the control and console socket paths over once the giver lets
    /// them go, starts the vCPUs and tells the giver, which then exits.
    /// </summary>
    private static VmStopReason RunTakenOver(TakeOverLaunch launch, VmHostOptions options, ILogger logger, CancellationToken cancel)
    {
        if (options.ControlSocket is not { } controlPath || options.ConsoleSocket is not { } consolePath)
            throw new ArgumentException("--take-over needs --control and --console: the sockets the VM is served on");
        ConsoleServer? console = null;
        RpcServer? control = null;
        VmControl? vmControl = null;
        try
        {
            // The guest writes nothing until it runs, and by then the console server is there.
            using var vm = launch.Create(bytes => console?.Write(bytes), logger);
            try
            {
                console = new ConsoleServer(consolePath, options.Access, options.SocketMode,
                    bytes => vm.Serial.EnqueueInput(bytes.Span), logger, takeOver: true);
                (vmControl, control) = ServeControl(vm, options, controlPath, console, takeOver: true, logger);
                // Serving under hidden names, nobody connects yet; started now, their threads are
                // there before the guest pauses.
                console.Start();
                control.Start();
                launch.Take();
                control.TakePath();
                console.TakePath();
                launch.Mark("take the socket paths");
            }
            catch (Exception e)
            {
                launch.Fail(e);
                throw;
            }
            launch.Starting();
            var reason = vm.Run(cancel, started: launch.Running);
            control.DisposeAsync().AsTask().GetAwaiter().GetResult();
            control = null;
            return reason;
        }
        finally
        {
            control?.DisposeAsync().AsTask().GetAwaiter().GetResult();
            vmControl?.Dispose();
            console?.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
    }

    [LoggerMessage(EventId = 1310, Level = LogLevel.Error, Message = "cannot record the exit status in {Path}: {Error}")]
    private static partial void LogExitRecordFailed(ILogger logger, string path, string error);
}
