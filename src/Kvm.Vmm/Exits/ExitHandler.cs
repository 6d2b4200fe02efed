using Kvm.Devices.Bus;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Exits;

/// <summary>The result of handling one exit: go on, or stop the VM for a reason.</summary>
public readonly record struct ExitOutcome(VmStopReason? Stop)
{
    public static readonly ExitOutcome Continue = new(null);
    public bool ShouldStop => Stop is not null;
}

/// <summary>
/// Handles a vCPU exit: port I/O and MMIO go to the buses, everything else becomes a stop reason.
/// A plain function of the exit and the buses, so tests call it without /dev/kvm.
/// </summary>
public static class ExitHandler
{
    public static ExitOutcome Handle(in VcpuExit exit, IoBus pio, IoBus mmio, uint vcpuId)
    {
        if (exit.Malformed is not null)
            return new ExitOutcome(new VmmFaultStop(vcpuId, new InvalidOperationException($"malformed exit: {exit.Malformed}")));
        switch (exit.Reason)
        {
            case KvmExitReason.Io:
                for (int i = 0; i < exit.Count; i++)
                {
                    var element = exit.Data.Slice(i * exit.Size, exit.Size);
                    if (exit.IsWrite)
                        pio.Write(exit.Port, element, (int)vcpuId);
                    else
                        pio.Read(exit.Port, element, (int)vcpuId);
                }
                return ExitOutcome.Continue;

            case KvmExitReason.Mmio:
                if (exit.IsWrite)
                    mmio.Write(exit.Address, exit.Data, (int)vcpuId);
                else
                    mmio.Read(exit.Address, exit.Data, (int)vcpuId);
                return ExitOutcome.Continue;

            case KvmExitReason.Intr:
            case KvmExitReason.IrqWindowOpen:
            case KvmExitReason.Hlt:
                // Hlt reaches user space only without an in-kernel irqchip; the guest waits for an
                // interrupt that nothing here would send, so going on is the right thing either way.
                return ExitOutcome.Continue;

            case KvmExitReason.Shutdown:
                return new ExitOutcome(new GuestShutdownStop(vcpuId, "triple fault"));

            case KvmExitReason.SystemEvent:
                return exit.SystemEvent switch
                {
                    (uint)KvmSystemEvent.Shutdown => new ExitOutcome(new GuestShutdownStop(vcpuId, "shutdown event")),
                    (uint)KvmSystemEvent.Reset => new ExitOutcome(new GuestResetStop(vcpuId)),
                    (uint)KvmSystemEvent.Crash => new ExitOutcome(new GuestShutdownStop(vcpuId, "crash event")),
                    _ => ExitOutcome.Continue,
                };

            case KvmExitReason.InternalError:
                return new ExitOutcome(new InternalErrorStop(vcpuId, exit.Suberror, exit.InternalData ?? [], null));

            case KvmExitReason.FailEntry:
                return new ExitOutcome(new FailEntryStop(vcpuId, exit.HardwareReason, exit.FailCpu, null));

            default:
                return new ExitOutcome(new UnhandledExitStop(vcpuId, (uint)exit.Reason, null));
        }
    }
}
