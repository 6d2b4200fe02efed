using System.Text.Json.Serialization;

namespace Kvm.Control;

/// <summary>The reply to <c>status</c>: the VM's run state, each vCPU's, how long it has run, exits by reason.</summary>
/// <param name="State">running, paused, stopping or stopped.</param>
/// <param name="StopReason">Why it stopped (when stopped or stopping).</param>
/// <summary>The reply to <c>status</c>; <paramref name="PausedBy"/> says why a VM paused itself (a NIC's denial-of-service rule), until it is resumed.</summary>
/// <param name="Disks">The image each disk runs on now, in the spec's order (a checkpoint moves a disk onto a new top image).</param>
public sealed record VmStatus(string State, int Pid, double UptimeSeconds, IReadOnlyList<VcpuStatus> Vcpus,
    IReadOnlyDictionary<string, long> Exits, string? StopReason, string? PausedBy = null, IReadOnlyList<string>? Disks = null,
    Guid? GenerationId = null);

public sealed record VcpuStatus(int Id, string State);

/// <summary>Parameters of <c>stop</c>: the power button first and force after <paramref name="TimeoutSeconds"/>, or force at once.</summary>
public sealed record StopRequest(bool Force = false, double TimeoutSeconds = VmControl.DefaultStopTimeoutSeconds);

/// <summary>How a <c>stop</c> ended: <paramref name="Outcome"/> is "guest" (the guest powered off after the power button), "forced" or "already-stopped".</summary>
public sealed record StopResult(string Outcome, string Reason, double Seconds);

/// <summary>The reply to <c>pause</c> and <c>resume</c>.</summary>
public sealed record StateChange(string State);

/// <summary>
/// Parameters of <c>save</c>: the snapshot directory (absolute), and whether the VM stops once
/// saved. With <paramref name="WorkingSetSeconds"/>, the VM runs that long after the save point
/// while the guest pages it touches are traced, and they are recorded in the snapshot as its
/// working set (a lazy restore loads them first); where they cannot be traced the snapshot has
/// none (the reply says why), unless <paramref name="RequireWorkingSet"/> makes that an error.
/// </summary>
public sealed record SaveRequest([property: JsonRequired] string Directory, bool Stop = false, double? WorkingSetSeconds = null,
    bool RequireWorkingSet = false);

/// <summary>
/// The reply to <c>save</c>: where the snapshot went, the VM's state afterwards (running, paused,
/// stopping), how long the guest was paused for it and how long the whole save took, and the bytes
/// written (guest RAM in all, and what was not zero pages); with a working-set window, the pages
/// recorded (and in how many ranges, over how long), or why none was.
/// </summary>
public sealed record SaveResult(string Directory, string State, double PausedSeconds, double Seconds,
    long StateBytes, ulong MemoryBytes, ulong MemoryBytesWritten, ulong? WorkingSetPages = null, int? WorkingSetRanges = null,
    double? WorkingSetSeconds = null, string? WorkingSetSkipped = null);

/// <summary>
/// Parameters of <c>checkpoint</c>: the checkpoint directory (absolute, new or empty), how fast
/// guest RAM is written out while the VM runs (bytes per second; null: as fast as it can), and
/// whether each disk's content is copied into the checkpoint rather than kept as a child of the
/// image the VM leaves frozen at the checkpoint.
/// </summary>
public sealed record CheckpointRequest([property: JsonRequired] string Directory, long? BytesPerSecond = null, bool CopyDisks = false);

/// <summary>
/// The reply to <c>checkpoint</c>: where it went, the VM's state afterwards, how long the guest was
/// stopped (and where that went, step by step) and how long the whole checkpoint took (and where
/// that went: prepare, stop, write RAM, write state), per disk the
/// VM's new top image (null for a read-only disk) and the checkpoint's image, and guest RAM: its
/// size, the bytes written (the rest were zero pages), the guest writes that waited for their
/// page and the bytes saved because of them.
/// </summary>
public sealed record CheckpointResult(string Directory, string State, double StopSeconds, IReadOnlyList<Kvm.Vmm.Snapshot.PauseStep> StopSteps,
    double Seconds, IReadOnlyList<string?> Layers, IReadOnlyList<string> Disks, ulong MemoryBytes, ulong MemoryBytesWritten,
    long WritesWaited, long BytesSavedOnWrite, IReadOnlyList<Kvm.Vmm.Snapshot.PauseStep> Phases);

/// <summary>The reply to <c>suspend</c>: the VM's state ("suspended") and how long suspending took.</summary>
public sealed record SuspendResult(string State, double Seconds, long StateBytes);

/// <summary>
/// Parameters of <c>handover</c>: the kvm-vmm binary to hand the VM to (null: this one), and the
/// disks it runs with there (null: the same): the same disks in the same order, each perhaps with
/// another path (the image moved, or another of the same content) or serial, then any added.
/// </summary>
public sealed record HandoverRequest(string? Vmm = null, IReadOnlyList<Kvm.Vmm.Machine.DiskSpecDocument>? Disks = null);

/// <summary>
/// The reply to <c>handover</c>: the process that runs the VM now, how long the guest was paused
/// (from the pause, or from the suspend that came before, until the new process's vCPUs ran), how
/// long the whole hand-over took, what changed, and where the pause went: each step of either
/// process while the guest was paused (a VM suspended before has no steps of its suspend here).
/// </summary>
public sealed record HandoverResult(int Pid, string Vmm, double PausedSeconds, double Seconds, IReadOnlyList<string> Changes,
    IReadOnlyList<Kvm.Vmm.Snapshot.PauseStep>? Steps = null);

/// <summary>The reply to <c>stats</c>.</summary>
public sealed record VmStats(MemoryStats Memory, IReadOnlyList<DiskStats> Disks, IReadOnlyList<NicStats>? Nics = null);

/// <summary>
/// Guest RAM as configured, this process's resident memory (VmRSS) now, and, for a VM restored
/// with lazy memory, how far its loader has come (null otherwise).
/// </summary>
public sealed record MemoryStats(ulong GuestBytes, long ResidentBytes, MemoryLoadStats? Load = null);

/// <summary>
/// A lazy restore's loader (<c>Kvm.Vmm.Snapshot.LazyLoadStats</c>): touches of guest RAM that waited
/// for their chunk, bytes loaded because they were touched, before the vCPUs started (a working
/// set), by the background loader, of all; seconds from the start of loading to the last byte,
/// null while it still loads.
/// </summary>
public sealed record MemoryLoadStats(long Faults, long BytesOnTouch, long BytesFirst, long BytesInBackground, long BytesTotal, double? Seconds);

/// <summary>
/// One virtio-net device: its MAC, the queue pairs the guest uses, frames and bytes each way,
/// drops by cause (Kvm.Devices.Virtio.Net.VirtioNetStats), and its uplinks (one, or a team's).
/// </summary>
public sealed record NicStats(string Id, string Mac, int QueuePairs, int ActivePairs, long RxPackets, long RxBytes, long TxPackets,
    long TxBytes, long RxFiltered, long RxDropped, long TxSpoofed, long TxTooLong, long TxMalformed, long TxBackendDropped,
    string? Policy, int Failovers, IReadOnlyList<UplinkStats> Uplinks, long? TxRate = null, long? RxRate = null, string? BandwidthGroup = null,
    int? BandwidthMembers = null, long? RxDosLimited = null, long? TxDosLimited = null);

/// <summary>One uplink of a NIC: its link, whether it carries traffic, what went through it (a team's counters; null for a lone tap).</summary>
public sealed record UplinkStats(string Name, bool Up, bool Active, long? RxPackets = null, long? RxBytes = null, long? TxPackets = null,
    long? TxBytes = null, long? TxDropped = null, long? RxDroppedOnStandby = null, int? Failures = null, long? ProbesSent = null,
    long? ProbesAnswered = null);

/// <summary>One virtio-blk device: its image and what it has served (service times in microseconds).</summary>
public sealed record DiskStats(string Id, string Image, bool ReadOnly, long Reads, long Writes, long Flushes, long Discards,
    long WriteZeroes, long Other, long Failed, long BytesRead, long BytesWritten, long IoErrors, double MeanMicroseconds, long MaxMicroseconds);

/// <summary>The reply to <c>devices</c>.</summary>
public sealed record VmDevices(IReadOnlyList<DeviceInfo> Devices);

/// <summary>A device by its stable id, its kind and where the guest finds it.</summary>
public sealed record DeviceInfo(string Id, string Kind, string Location, string? Detail);

/// <summary>Parameters of <c>fence</c>: stop (or pause) the VM unless fenced again within <paramref name="Seconds"/>; or disarm.</summary>
public sealed record FenceRequest(double Seconds = 0, string Action = "stop", bool Disarm = false);

/// <summary>The reply to <c>fence</c>.</summary>
public sealed record FenceStatus(bool Armed, double Seconds, string Action);

/// <summary>How a kvm-vmm process ended, as it recorded it in its exit file (--exit-file).</summary>
/// <param name="Status">The process's exit status.</param>
/// <param name="Reason">Why the VM stopped.</param>
/// <param name="Failed">Whether that was a failure (a crash of the guest or the VMM) rather than a requested or guest-initiated stop.</param>
/// <param name="Fenced">Whether the VM's fence stopped it (its supervisor stopped renewing its lease).</param>
public sealed record VmExitRecord(int Status, string Reason, bool Failed, int Pid, DateTimeOffset At, bool Fenced = false);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, WriteIndented = false,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow, RespectNullableAnnotations = true)]
[JsonSerializable(typeof(VmStatus))]
[JsonSerializable(typeof(StopRequest))]
[JsonSerializable(typeof(StopResult))]
[JsonSerializable(typeof(StateChange))]
[JsonSerializable(typeof(SaveRequest))]
[JsonSerializable(typeof(SaveResult))]
[JsonSerializable(typeof(SuspendResult))]
[JsonSerializable(typeof(CheckpointRequest))]
[JsonSerializable(typeof(CheckpointResult))]
[JsonSerializable(typeof(HandoverRequest))]
[JsonSerializable(typeof(HandoverResult))]
[JsonSerializable(typeof(VmStats))]
[JsonSerializable(typeof(VmDevices))]
[JsonSerializable(typeof(VmExitRecord))]
[JsonSerializable(typeof(FenceRequest))]
[JsonSerializable(typeof(FenceStatus))]
public sealed partial class VmControlJson : JsonSerializerContext;
