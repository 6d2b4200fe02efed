namespace Kvm.Inventory;

/// <summary>What the user wants a VM to be (vms.desired_state).</summary>
public enum VmDesiredState { Stopped, Running, Paused }

/// <summary>What the VM's owner host last saw it be (vms.actual_state).</summary>
public enum VmActualState { Stopped, Starting, Running, Paused, Stopping, Migrating, Failed, Unknown, Fenced }

/// <summary>What kvmd does when a VM ends without being asked to (vms.restart_policy).</summary>
public enum VmRestartPolicy { No, OnFailure, Always }

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
    DateTimeOffset UpdatedAt,
    VmRestartPolicy RestartPolicy = VmRestartPolicy.No);

/// <summary>A row of events: <see cref="Subject"/> names the object ('vm/web1'), <see cref="Data"/> is a JSON object.</summary>
public sealed record EventRow(long Id, DateTimeOffset At, string Kind, string Subject, Guid? Host, string Data);

/// <summary>An image's format (disks.format).</summary>
public enum DiskFormat { Qcow2, Raw }

/// <summary>
/// A row of disks: an image at <see cref="Path"/>; <see cref="Backing"/> is the image below it in
/// its backing chain; <see cref="Host"/> is where the file lives (null: storage every host reaches).
/// </summary>
public sealed record DiskRow(Guid Id, string Path, DiskFormat Format, long SizeBytes, Guid? Backing, Guid? Host, DateTimeOffset CreatedAt);

/// <summary>How a disk is reserved: a writable disk exclusively, a read-only one or a backing image shared.</summary>
public enum ReservationMode { Exclusive, Shared }

/// <summary>
/// A row of reservations, with the names of what it refers to: disk <see cref="Disk"/> (at
/// <see cref="DiskPath"/>) is used by VM <see cref="HolderVm"/> on host <see cref="HolderHost"/>
/// (no VM: the host itself, for a migration or a commit). <see cref="Lease"/> is the lease it was
/// made under, with the generation then held (null: made without a lease).
/// </summary>
public sealed record ReservationRow(
    long Id,
    Guid Disk,
    string DiskPath,
    Guid HolderHost,
    string HolderHostName,
    Guid? HolderVm,
    string? HolderVmName,
    ReservationMode Mode,
    LeaseToken? Lease,
    DateTimeOffset CreatedAt)
{
    /// <summary>"VM 'web1' on host 'h1'", or "host 'h1'".</summary>
    public string Holder => HolderVmName is null ? $"host '{HolderHostName}'" : $"VM '{HolderVmName}' on host '{HolderHostName}'";
}

/// <summary>The text the database stores for each state, format and mode (the CHECK constraints of the schema list the same).</summary>
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
        VmActualState.Fenced => "fenced",
        _ => throw new ArgumentOutOfRangeException(nameof(s), s, "not an actual VM state"),
    };

    public static string Of(VmRestartPolicy p) => p switch
    {
        VmRestartPolicy.No => "no",
        VmRestartPolicy.OnFailure => "on-failure",
        VmRestartPolicy.Always => "always",
        _ => throw new ArgumentOutOfRangeException(nameof(p), p, "not a restart policy"),
    };

    /// <summary>The policy named <paramref name="s"/> ('no', 'on-failure', 'always'); null for any other text.</summary>
    public static VmRestartPolicy? RestartPolicy(string s) =>
        Enum.GetValues<VmRestartPolicy>().Where(v => Of(v) == s).Select(v => (VmRestartPolicy?)v).FirstOrDefault();

    public static string Of(DiskFormat f) => f switch
    {
        DiskFormat.Qcow2 => "qcow2",
        DiskFormat.Raw => "raw",
        _ => throw new ArgumentOutOfRangeException(nameof(f), f, "not a disk format"),
    };

    public static string Of(ReservationMode m) => m switch
    {
        ReservationMode.Exclusive => "exclusive",
        ReservationMode.Shared => "shared",
        _ => throw new ArgumentOutOfRangeException(nameof(m), m, "not a reservation mode"),
    };

    public static DiskFormat Format(string s) => s switch
    {
        "qcow2" => DiskFormat.Qcow2,
        "raw" => DiskFormat.Raw,
        _ => throw new InventoryException($"disks.format '{s}' is not a format this kvmd knows"),
    };

    public static ReservationMode Mode(string s) => s switch
    {
        "exclusive" => ReservationMode.Exclusive,
        "shared" => ReservationMode.Shared,
        _ => throw new InventoryException($"reservations.mode '{s}' is not a mode this kvmd knows"),
    };

    public static VmDesiredState Desired(string s) =>
        Enum.GetValues<VmDesiredState>().FirstOrDefault(v => Of(v) == s, (VmDesiredState)(-1)) is var v && Enum.IsDefined(v)
            ? v : throw new InventoryException($"vms.desired_state '{s}' is not a state this kvmd knows");

    public static VmActualState Actual(string s) =>
        Enum.GetValues<VmActualState>().FirstOrDefault(v => Of(v) == s, (VmActualState)(-1)) is var v && Enum.IsDefined(v)
            ? v : throw new InventoryException($"vms.actual_state '{s}' is not a state this kvmd knows");
}
