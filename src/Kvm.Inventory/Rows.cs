namespace Kvm.Inventory;

/// <summary>What the user wants a VM to be (vms.desired_state).</summary>
public enum VmDesiredState { Stopped, Running, Paused }

/// <summary>What the VM's owner host last saw it be (vms.actual_state).</summary>
public enum VmActualState { Stopped, Starting, Running, Paused, Stopping, Migrating, Failed, Unknown }

/// <summary>A row of hosts: a host running kvmd; <see cref="LastSeen"/> is its last heartbeat.</summary>
public sealed record HostRow(Guid Id, string Name, string Address, DateTimeOffset RegisteredAt, DateTimeOffset LastSeen);

/// <summary>
/// A row of vms. <see cref="Spec"/> is the VM spec as JSON (a JSON object; the caller serializes
/// its spec record with its source-generated context); <see cref="OwnerHost"/> is the host that
/// runs it, if any.
/// </summary>
public sealed record VmRow(
    Guid Id,
    string Name,
    string Spec,
    VmDesiredState DesiredState,
    VmActualState ActualState,
    Guid? OwnerHost,
    DateTimeOffset CreatedAt,
    DateTimeOffset UpdatedAt);

/// <summary>A row of events: <see cref="Subject"/> names the object ('vm/web1'), <see cref="Data"/> is a JSON object.</summary>
public sealed record EventRow(long Id, DateTimeOffset At, string Kind, string Subject, Guid? Host, string Data);

/// <summary>The text the database stores for each state (the CHECK constraints of schema v1 list the same).</summary>
public static class StateNames
{
    public static string Of(VmDesiredState s) => s switch
    {
        VmDesiredState.Stopped => "stopped",
        VmDesiredState.Running => "running",
        VmDesiredState.Paused => "paused",
        _ => throw new ArgumentOutOfRangeException(nameof(s), s, "not a desired VM state"),
    };

    public static string Of(VmActualState s) => s switch
    {
        VmActualState.Stopped => "stopped",
        VmActualState.Starting => "starting",
        VmActualState.Running => "running",
        VmActualState.Paused => "paused",
        VmActualState.Stopping => "stopping",
        VmActualState.Migrating => "migrating",
        VmActualState.Failed => "failed",
        VmActualState.Unknown => "unknown",
        _ => throw new ArgumentOutOfRangeException(nameof(s), s, "not an actual VM state"),
    };

    public static VmDesiredState Desired(string s) =>
        Enum.GetValues<VmDesiredState>().FirstOrDefault(v => Of(v) == s, (VmDesiredState)(-1)) is var v && Enum.IsDefined(v)
            ? v : throw new InventoryException($"vms.desired_state '{s}' is not a state this kvmd knows");

    public static VmActualState Actual(string s) =>
        Enum.GetValues<VmActualState>().FirstOrDefault(v => Of(v) == s, (VmActualState)(-1)) is var v && Enum.IsDefined(v)
            ? v : throw new InventoryException($"vms.actual_state '{s}' is not a state this kvmd knows");
}
