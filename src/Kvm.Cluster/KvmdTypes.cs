using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Control;

namespace Kvm.Cluster;

// The kvmd RPC's parameters and results (methods: see KvmdApi.Register).

// A request's members without a default are [JsonRequired]: a missing one is then an invalid-params
// error naming it, not a null that reaches the handlers (a null name failed inside them as an
// internal error).

/// <summary>Parameters naming one VM.</summary>
public sealed record VmNameRequest([property: JsonRequired] string Name);

/// <summary><c>vm.create</c>: a VM named <paramref name="Name"/> with <paramref name="Spec"/> (the kvm-vmm spec: absolute paths), started at once when <paramref name="Start"/>.</summary>
/// <param name="Restart">What kvmd does when the VM ends without being asked to: "no", "on-failure" or "always".</param>
public sealed record CreateVmRequest([property: JsonRequired] string Name, [property: JsonRequired] JsonElement Spec, bool Start = false, string Restart = "no");

/// <summary>
/// <c>vm.start</c>. When a disk the VM needs is reserved by another VM, the start waits up to
/// <paramref name="WaitSeconds"/> for it to be released (woken by the release's notification),
/// then tries again; 0 refuses at once, naming the holder.
/// </summary>
/// <param name="From">A snapshot directory (absolute; <c>vm.save</c> wrote it): the VM carries on where it was saved
/// instead of booting. Its saved machine must match the VM's spec in memory, vCPUs and disks.</param>
/// <param name="Memory">With <paramref name="From"/>: how guest RAM comes back, "eager" (the default) or "lazy".</param>
public sealed record StartVmRequest([property: JsonRequired] string Name, double WaitSeconds = 0, string? From = null, string? Memory = null);

/// <summary>
/// <c>vm.save</c>: the VM's kvm-vmm saves it into <paramref name="Directory"/> (absolute), as the
/// control method <c>save</c> does; with <paramref name="Stop"/> the VM then stops, recorded as a
/// stop asked for. <paramref name="WorkingSetSeconds"/> and <paramref name="RequireWorkingSet"/>: see <see cref="SaveRequest"/>.
/// </summary>
public sealed record SaveVmRequest([property: JsonRequired] string Name, [property: JsonRequired] string Directory, bool Stop = false,
    double? WorkingSetSeconds = null, bool RequireWorkingSet = false);

/// <summary><c>vm.save</c>'s result: what kvm-vmm's save replied, and the VM as it is now.</summary>
public sealed record VmSaved(string Name, SaveResult Save, VmInfo Vm);

/// <summary>
/// <c>vm.checkpoint</c>: the VM's kvm-vmm takes a live checkpoint into <paramref name="Directory"/>
/// (absolute; new or empty), as the control method <c>checkpoint</c> does; <paramref name="BytesPerSecond"/>
/// and <paramref name="CopyDisks"/>: see <see cref="CheckpointRequest"/>. kvmd then records the VM's
/// new top images in the inventory (its spec, the disks, their reservations).
/// </summary>
public sealed record CheckpointVmRequest([property: JsonRequired] string Name, [property: JsonRequired] string Directory,
    long? BytesPerSecond = null, bool CopyDisks = false);

/// <summary>
/// <c>vm.fork</c>: makes <paramref name="Count"/> new VMs, named <paramref name="Name"/>-1,
/// <paramref name="Name"/>-2... (the first free numbers), each a fork of one template: the
/// snapshot in <paramref name="From"/> (absolute; saved with stop, or a checkpoint), or else a
/// checkpoint of VM <paramref name="Name"/>, which must run here and goes on running. Each fork has
/// its own disks (qcow2 children of the template's, in its state directory), MACs and generation
/// id, is in the inventory like any VM, and is started on RAM mapped from the template.
/// </summary>
public sealed record ForkVmRequest([property: JsonRequired] string Name, int Count = 1, string? From = null);

/// <summary>One fork that <c>vm.fork</c> made: the VM, its disks, its NICs' MACs and its generation id.</summary>
public sealed record ForkedVmInfo(VmInfo Vm, IReadOnlyList<string> Disks, IReadOnlyList<string> Macs, Guid? GenerationId);

/// <summary><c>vm.fork</c>'s result: the template, the checkpoint taken for it (when forked from a running VM), and the forks.</summary>
public sealed record VmForked(string Template, CheckpointResult? Checkpoint, IReadOnlyList<ForkedVmInfo> Forks);

/// <summary><c>vm.checkpoint</c>'s result: what kvm-vmm's checkpoint replied, and the VM as it is now.</summary>
public sealed record VmCheckpointed(string Name, CheckpointResult Checkpoint, VmInfo Vm);

/// <summary>
/// <c>vm.delete-checkpoint</c>: deletes the checkpoint of VM <paramref name="Name"/> in
/// <paramref name="Directory"/> (absolute) and folds the disk layer it kept frozen, as 'vmctl
/// delete-checkpoint DIR' does, then records the fold in the inventory.
/// </summary>
public sealed record DeleteCheckpointRequest([property: JsonRequired] string Name, [property: JsonRequired] string Directory);

/// <summary><c>vm.delete-checkpoint</c>'s result: the layers folded away (gone from disk and from the inventory).</summary>
public sealed record CheckpointDeleted(string Name, string Directory, IReadOnlyList<string> Folded);

/// <summary>
/// <c>vm.upgrade</c>: the VM is handed to a new kvm-vmm process in place (control method
/// <c>handover</c>), <paramref name="Vmm"/> (absolute) or by default the kvm-vmm kvmd starts VMs with.
/// </summary>
public sealed record UpgradeVmRequest([property: JsonRequired] string Name, string? Vmm = null);

/// <summary><c>vm.upgrade</c>'s result: the process that ran the VM, the one that runs it now, and what the hand-over replied.</summary>
public sealed record VmUpgraded(string Name, int OldPid, HandoverResult Handover, VmInfo Vm);

/// <summary><c>vm.stop</c>: the ACPI power button, forced after <paramref name="TimeoutSeconds"/>; or forced at once.</summary>
public sealed record StopVmRequest([property: JsonRequired] string Name, bool Force = false, double TimeoutSeconds = VmControl.DefaultStopTimeoutSeconds);

/// <summary><c>vm.delete</c>: a running VM is refused unless <paramref name="Force"/> (which stops it first, forced).</summary>
public sealed record DeleteVmRequest([property: JsonRequired] string Name, bool Force = false);

/// <summary>A VM as the inventory and this host see it.</summary>
/// <param name="Host">The name of the host that runs it, if any.</param>
/// <param name="Pid">kvm-vmm's pid, when it runs on this host.</param>
/// <param name="Restart">The restart policy: "no", "on-failure" or "always".</param>
public sealed record VmInfo(string Name, Guid Id, string DesiredState, string ActualState, string? Host, int? Pid,
    DateTimeOffset CreatedAt, DateTimeOffset UpdatedAt, string Restart);

public sealed record VmList(IReadOnlyList<VmInfo> Vms);

/// <summary><c>vm.show</c>: the VM, its spec, and when it runs here, its live status and sockets; else how it last ended.</summary>
public sealed record VmDetail(VmInfo Vm, JsonElement Spec, VmStatus? Status, VmExitRecord? LastExit,
    string? ControlSocket, string? ConsoleSocket, string? Log);

/// <summary><c>vm.console</c>: where to attach to the VM's serial console.</summary>
public sealed record ConsoleEndpoint(string Name, string Socket);

/// <summary><c>vm.stop</c>'s result: how the VM stopped.</summary>
public sealed record VmStopped(string Name, string Outcome, string Reason, double Seconds);

/// <summary>
/// <c>events.wait</c>: events after id <paramref name="After"/>, waiting up to
/// <paramref name="TimeoutSeconds"/> for the first one; a negative <paramref name="After"/> means
/// that many before the newest (-20: the last 20; use 0 for all, and EventList.Newest to start after now).
/// </summary>
public sealed record EventsRequest(long After = 0, double TimeoutSeconds = 0, int Limit = 1000);

public sealed record EventInfo(long Id, DateTimeOffset At, string Kind, string Subject, string? Host, JsonElement Data);

/// <summary>Events in order; <paramref name="Last"/> is the id to ask after next time; <paramref name="Newest"/> the newest event's id when asked.</summary>
public sealed record EventList(IReadOnlyList<EventInfo> Events, long Last, long Newest);

public sealed record HostInfo(Guid Id, string Name, string Address, DateTimeOffset RegisteredAt, DateTimeOffset LastSeen, bool Self);

public sealed record HostList(IReadOnlyList<HostInfo> Hosts);

/// <summary>A reservation of a disk: how, and by whom (the VM and its host), under which lease generation.</summary>
public sealed record ReservationInfo(string Mode, string Host, string? Vm, long? Generation);

/// <summary>A disk image in the inventory, the image below it, and who holds it.</summary>
public sealed record DiskInfo(Guid Id, string Path, string Format, long SizeBytes, string? Backing, IReadOnlyList<ReservationInfo> Reservations);

public sealed record DiskList(IReadOnlyList<DiskInfo> Disks);

/// <summary>A lease: on what (and its name, for a VM), who holds it until when (null: free), its generation.</summary>
public sealed record LeaseInfo(string Kind, Guid ResourceId, string? Resource, string? Owner, DateTimeOffset? ExpiresAt, long Generation);

public sealed record LeaseList(IReadOnlyList<LeaseInfo> Leases);

/// <summary><c>daemon.status</c>.</summary>
public sealed record DaemonStatus(string Host, Guid HostId, int Pid, string Version, string Database, int RunningVms, double UptimeSeconds, ViewStatus View);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, WriteIndented = false,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow, RespectNullableAnnotations = true)]
[JsonSerializable(typeof(VmNameRequest))]
[JsonSerializable(typeof(CreateVmRequest))]
[JsonSerializable(typeof(StartVmRequest))]
[JsonSerializable(typeof(SaveVmRequest))]
[JsonSerializable(typeof(VmSaved))]
[JsonSerializable(typeof(CheckpointVmRequest))]
[JsonSerializable(typeof(VmCheckpointed))]
[JsonSerializable(typeof(DeleteCheckpointRequest))]
[JsonSerializable(typeof(ForkVmRequest))]
[JsonSerializable(typeof(VmForked))]
[JsonSerializable(typeof(CheckpointDeleted))]
[JsonSerializable(typeof(UpgradeVmRequest))]
[JsonSerializable(typeof(VmUpgraded))]
[JsonSerializable(typeof(StopVmRequest))]
[JsonSerializable(typeof(DeleteVmRequest))]
[JsonSerializable(typeof(VmInfo))]
[JsonSerializable(typeof(VmList))]
[JsonSerializable(typeof(VmDetail))]
[JsonSerializable(typeof(ConsoleEndpoint))]
[JsonSerializable(typeof(VmStopped))]
[JsonSerializable(typeof(EventsRequest))]
[JsonSerializable(typeof(EventList))]
[JsonSerializable(typeof(HostList))]
[JsonSerializable(typeof(DaemonStatus))]
[JsonSerializable(typeof(DiskList))]
[JsonSerializable(typeof(LeaseList))]
public sealed partial class KvmdJson : JsonSerializerContext;
