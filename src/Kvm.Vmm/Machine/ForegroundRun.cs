using Kvm.Hypervisor;
using Kvm.Interop.Native;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Exits;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Machine;

/// <summary>
/// Runs one VM in the foreground with its console on this terminal, and turns the way it ended
/// into an exit status: the guest's own status for a debug exit, 130 for Ctrl-C (143 for SIGTERM), 1 for a failure
/// (with one line on stderr naming it).
/// </summary>
public static class ForegroundRun
{
    public const int ExitFailure = 1;
    public const int ExitInterrupted = 130;
    public const int ExitTerminated = 143;

    public static int Execute(VmLaunch launch, string program, ILogger? logger = null) =>
        Execute(launch, program, runner: null, logger);

    /// <summary>
    /// Runs the VM through <paramref name="runner"/> (for example with control and console sockets,
    /// which a layer above this one provides) or, when null, with its console on this terminal;
    /// either way Ctrl-C and SIGTERM stop it and the way it ended becomes the exit status.
    /// </summary>
    public static int Execute(VmLaunch launch, string program, Func<VmLaunch, CancellationToken, VmStopReason>? runner, ILogger? logger = null)
    {
        using var cancel = new CancellationTokenSource();
        int signalExit = 0;
        void Stop(System.Runtime.InteropServices.PosixSignalContext c, int status)
        {
            c.Cancel = true;
            Interlocked.CompareExchange(ref signalExit, status, 0);
            cancel.Cancel();
        }
        using var sigint = System.Runtime.InteropServices.PosixSignalRegistration.Create(
            System.Runtime.InteropServices.PosixSignal.SIGINT, c => Stop(c, ExitInterrupted));
        using var sigterm = System.Runtime.InteropServices.PosixSignalRegistration.Create(
            System.Runtime.InteropServices.PosixSignal.SIGTERM, c => Stop(c, ExitTerminated));
        try
        {
            VmStopReason reason;
            if (runner is null)
            {
                using var console = ForegroundConsole.Attach();
                using var vm = launch.Create(console.Write, logger);
                vm.TrafficAlarm += (nic, alarm) =>
                {
                    // No control socket here: a VM a rule pauses stays paused until Ctrl-C.
                    if (alarm.Cleared)
                        return;
                    Console.Error.WriteLine($"{program}: {nic}: denial-of-service rule fired: {alarm.Describe()}");
                    if (vm.NicDosAction(nic) == Kvm.Network.DosAction.Suspend)
                    {
                        vm.Pause();
                        Console.Error.WriteLine($"{program}: the VM is paused (run it with a control socket to resume it: vmctl control resume)");
                    }
                };
                console.PumpInput(vm.Serial);
                reason = vm.Run(cancel.Token);
            }
            else
            {
                reason = runner(launch, cancel.Token);
            }
            return Report(reason, program, signalExit);
        }
        catch (Exception e) when (IsUserFacing(e))
        {
            Console.Error.WriteLine($"{program}: {Describe(e)}");
            return ExitFailure;
        }
    }

    private static int Report(VmStopReason reason, string program, int signalExit)
    {
        switch (reason)
        {
            case DebugExitStop d:
                return d.Status;
            case HostStop when signalExit != 0:
                Console.Error.WriteLine($"{program}: VM stopped ({(signalExit == ExitInterrupted ? "interrupted" : "terminated")})");
                return signalExit;
            case { IsError: false }:
                Console.Error.WriteLine($"{program}: {reason.Describe()}");
                return 0;
            default:
                Console.Error.WriteLine($"{program}: {reason.Describe()}");
                return ExitFailure;
        }
    }

    /// <summary>Errors that come from bad input or the host, reported as one line without a stack trace.</summary>
    public static bool IsUserFacing(Exception e) =>
        e is BootException or HypervisorException or GuestMemoryException or KvmIoctlException or ArgumentException
            or FormatException or IOException or UnauthorizedAccessException
            or Kvm.Devices.Bus.BusException or Snapshot.SnapshotFormatException or Kvm.Devices.Manager.DeviceStateException
            or Kvm.Hypervisor.State.StateFormatException;

    /// <summary>The message chain: what failed, then what it failed because of.</summary>
    public static string Describe(Exception e)
    {
        var parts = new List<string>();
        for (Exception? x = e; x is not null; x = x.InnerException)
        {
            if (parts.Count == 0 || !parts[^1].Contains(x.Message, StringComparison.Ordinal))
                parts.Add(x.Message);
        }
        return string.Join(": ", parts);
    }
}
