using System.Text;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Exits;

/// <summary>Why a VM stopped running. Each kind says what happened in words a user can act on.</summary>
public abstract record VmStopReason
{
    /// <summary>A one-line description.</summary>
    public abstract string Describe();

    /// <summary>True when the guest ended normally (by its own request), false for failures.</summary>
    public virtual bool IsError => true;
}

/// <summary>The guest wrote <paramref name="Status"/> to the debug-exit port.</summary>
public sealed record DebugExitStop(byte Status) : VmStopReason
{
    public override string Describe() => $"guest exited through the debug-exit port with status {Status}";
    public override bool IsError => false;
}

/// <summary>The guest shut down: a triple fault (KVM_EXIT_SHUTDOWN) or a shutdown system event.</summary>
public sealed record GuestShutdownStop(uint VcpuId, string How) : VmStopReason
{
    public override string Describe() => $"guest shut down ({How}) on vCPU {VcpuId}";
}

/// <summary>The guest asked for a reset; this VMM ends the VM instead of rebooting it.</summary>
public sealed record GuestResetStop(uint VcpuId) : VmStopReason
{
    public override string Describe() => $"guest requested a reset on vCPU {VcpuId}";
    public override bool IsError => false;
}

/// <summary>The guest powered itself off through ACPI (S5: SLP_TYP and SLP_EN in PM1_CNT).</summary>
public sealed record GuestPowerOffStop(uint VcpuId) : VmStopReason
{
    public override string Describe() => $"guest powered off (ACPI S5) on vCPU {VcpuId}";
    public override bool IsError => false;
}

/// <summary>The host asked the VM to stop (Ctrl-C, a stop request).</summary>
public sealed record HostStop(string Why) : VmStopReason
{
    public override string Describe() => $"VM stopped: {Why}";
    public override bool IsError => false;
}

/// <summary>KVM could not go on with the vCPU: an internal error, such as an emulation failure.</summary>
public sealed record InternalErrorStop(uint VcpuId, uint Suberror, ulong[] Data, string? Registers) : VmStopReason
{
    public static string SuberrorName(uint suberror) => (KvmInternalError)suberror switch
    {
        KvmInternalError.Emulation => "emulation failure",
        KvmInternalError.SimulEx => "exception while delivering an exception",
        KvmInternalError.DeliveryEv => "event delivery failed",
        KvmInternalError.UnexpectedExitReason => "unexpected exit reason",
        _ => "unknown",
    };

    public override string Describe()
    {
        var sb = new StringBuilder($"KVM internal error on vCPU {VcpuId}: suberror {Suberror} ({SuberrorName(Suberror)})");
        if (Data.Length > 0)
            sb.Append(", data ").AppendJoin(' ', Data.Select(d => $"0x{d:x}"));
        if (Registers is not null)
            sb.Append('\n').Append(Registers);
        return sb.ToString();
    }
}

/// <summary>The hardware refused to enter the guest (KVM_EXIT_FAIL_ENTRY).</summary>
public sealed record FailEntryStop(uint VcpuId, ulong HardwareReason, uint Cpu, string? Registers) : VmStopReason
{
    public override string Describe() =>
        $"vCPU {VcpuId} failed to enter the guest: hardware entry failure reason 0x{HardwareReason:x} on host CPU {Cpu}"
        + (Registers is null ? "" : "\n" + Registers);
}

/// <summary>An exit this VMM does not handle.</summary>
public sealed record UnhandledExitStop(uint VcpuId, uint ExitReason, string? Registers) : VmStopReason
{
    public override string Describe() =>
        $"vCPU {VcpuId} stopped on an unhandled exit: {(KvmExitReason)ExitReason} ({ExitReason})"
        + (Registers is null ? "" : "\n" + Registers);
}

/// <summary>Guest RAM restored lazily could not be brought in from the snapshot's memory file.</summary>
public sealed record MemoryLoadStop(string Problem) : VmStopReason
{
    public override string Describe() => $"VM stopped: guest RAM could not be loaded from the snapshot: {Problem}";
}

/// <summary>The VMM itself failed while running a vCPU.</summary>
public sealed record VmmFaultStop(uint VcpuId, Exception Error) : VmStopReason
{
    public override string Describe() => $"vCPU {VcpuId} failed: {Error.Message}";
}
