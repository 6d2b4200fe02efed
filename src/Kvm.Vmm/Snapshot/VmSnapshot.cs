using Kvm.Devices.Manager;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Snapshot;

/// <summary>How a restore brings guest RAM in.</summary>
public enum MemoryLoad
{
    /// <summary>Every page of the memory file is read into guest RAM before the vCPUs start.</summary>
    Eager,

    /// <summary>
    /// The vCPUs start at once; a page comes in when first touched, while a background loader brings
    /// the rest in (<see cref="LazyMemoryLoader"/>); a recorded working set is loaded first.
    /// </summary>
    Lazy,

    /// <summary>
    /// Guest RAM is a private copy-on-write mapping of the memory file: nothing is read up front,
    /// the vCPUs start at once, a page comes from the page cache when first touched (shared by
    /// every VM mapped from the same snapshot), and a guest write copies its page. The memory file
    /// must stay as it is while the VM runs; the VM cannot be handed over or checkpointed.
    /// </summary>
    Mapped,
}

/// <summary>What a restore may do besides reading the snapshot.</summary>
public sealed record RestoreOptions
{
    public MemoryLoad Memory { get; init; } = MemoryLoad.Eager;

    /// <summary>
    /// Changes to the saved spec that the guest cannot see (a disk image moved, or replaced by one
    /// of the same content and size); null keeps the saved spec. The machine built from the
    /// changed spec must still match the saved one device by device.
    /// </summary>
    public Func<VmSpec, VmSpec>? ChangeSpec { get; init; }

    /// <summary>
    /// For a lazy restore, how fast the background loader may read the memory file, in bytes per
    /// second: null as fast as it can, 0 not at all (only what the guest touches is loaded).
    /// </summary>
    public long? BackgroundBytesPerSecond { get; init; }

    /// <summary>Hears the bytes of guest RAM loaded so far and the total.</summary>
    public Action<long, long>? Progress { get; init; }

    /// <summary>Marks each step of the restore (to report where its time went); null: not timed.</summary>
    public StepClock? Clock { get; init; }

    /// <summary>
    /// The restored VM is a fork (<see cref="VmFork"/>): its NICs take the MACs of the spec the
    /// machine is built from, not the saved ones, and it gets a new VM generation id
    /// (<see cref="VirtualMachine.NewGenerationId"/>). Needs <see cref="MemoryLoad.Mapped"/>.
    /// </summary>
    public bool Fork { get; init; }
}

/// <summary>
/// A VM saved to, and restored from, a snapshot directory (<see cref="SnapshotFormat"/>): the
/// spec, every state record by id (<see cref="VirtualMachine.SaveState"/>) and guest RAM.
/// </summary>
public static class VmSnapshot
{
    /// <summary>A memory load by its name on command lines and in RPC: eager, lazy or mapped.</summary>
    public static MemoryLoad ParseMemoryLoad(string name) => name switch
    {
        "eager" => MemoryLoad.Eager,
        "lazy" => MemoryLoad.Lazy,
        "mapped" => MemoryLoad.Mapped,
        _ => throw new ArgumentException($"memory '{name}' is not one of eager, lazy, mapped"),
    };

    /// <summary>
    /// Writes the state and RAM of <paramref name="vm"/>, which must be paused
    /// (<see cref="VirtualMachine.Pause"/>), into <paramref name="directory"/>; an older snapshot
    /// there is replaced only once the new one is whole.
    /// </summary>
    public static SnapshotWriteResult Save(VirtualMachine vm, string directory, Action<long, long>? progress = null,
        CancellationToken cancellationToken = default)
    {
        var records = vm.SaveState();
        var memory = new GuestMemorySnapshotAccess(vm.Memory);
        var state = SnapshotState.Create(VmSpecJsonContext.Format(vm.Spec), memory.Ram, records);
        return SnapshotWriter.Write(directory, state, memory, progress, cancellationToken);
    }

    /// <summary>
    /// Saves <paramref name="vm"/>, which must be paused, as <see cref="Save"/> does, then records
    /// its working set: the VM runs (<paramref name="resume"/> resumes it; null:
    /// <see cref="VirtualMachine.Resume"/>) for <paramref name="window"/> while every guest page it
    /// touches is traced (<see cref="WorkingSetTracer"/>), and those pages are added to the
    /// snapshot's state file (<see cref="RecordWorkingSet"/>), for a lazy restore to load first.
    /// The VM is left running. A VM whose RAM a lazy restore is still loading is refused before
    /// anything is written (<see cref="InvalidOperationException"/>). When the trace is not
    /// possible here (no userfaultfd minor faults, RAM in a plain file) or fails, the snapshot stays
    /// as written, without a working set, and the result says why; with
    /// <paramref name="required"/> that is a <see cref="WorkingSetUnavailableException"/> instead
    /// (the snapshot is written all the same, and the VM is not resumed if the trace never started).
    /// </summary>
    public static WorkingSetSaveResult SaveWithWorkingSet(VirtualMachine vm, string directory, TimeSpan window, bool required = false,
        Action? resume = null, CancellationToken cancellationToken = default)
    {
        if (window <= TimeSpan.Zero || window > MaxWorkingSetWindow)
            throw new ArgumentOutOfRangeException(nameof(window), window, $"a working-set window is more than 0 and at most {MaxWorkingSetWindow.TotalSeconds} s");
        if (WorkingSetTracer.Refusal(vm) is { } refusal)
            throw new InvalidOperationException(refusal);
        var written = Save(vm, directory, cancellationToken: cancellationToken);
        var log = vm.Log;
        WorkingSetTracer tracer;
        try
        {
            tracer = WorkingSetTracer.Start(vm);
        }
        catch (WorkingSetUnavailableException e)
        {
            if (required)
                throw new WorkingSetUnavailableException($"the snapshot in {directory} was written without a working set: {e.Message}", e);
            SnapshotLog.WorkingSetSkipped(log, directory, e.Message);
            return new WorkingSetSaveResult(written, null, e.Message);
        }
        WorkingSet workingSet;
        using (tracer)
        {
            (resume ?? vm.Resume)();
            try
            {
                cancellationToken.WaitHandle.WaitOne(window);
                workingSet = tracer.Stop();
            }
            catch (WorkingSetUnavailableException e)
            {
                if (required)
                    throw new WorkingSetUnavailableException($"the snapshot in {directory} was written without a working set: {e.Message}", e);
                SnapshotLog.WorkingSetSkipped(log, directory, e.Message);
                return new WorkingSetSaveResult(written, null, e.Message);
            }
        }
        cancellationToken.ThrowIfCancellationRequested();
        long stateBytes = RecordWorkingSet(directory, written.SnapshotId, workingSet.Ranges);
        SnapshotLog.WorkingSetRecorded(log, directory, workingSet.Pages, GuestMemory.FormatSize(workingSet.Pages * SnapshotFormat.PageSize),
            workingSet.Ranges.Count, workingSet.Seconds);
        return new WorkingSetSaveResult(written with { StateBytes = stateBytes }, workingSet, null);
    }

    /// <summary>The longest working-set window a save takes.</summary>
    public static readonly TimeSpan MaxWorkingSetWindow = TimeSpan.FromMinutes(10);

    /// <summary>
    /// Adds <paramref name="workingSet"/> (guest page ranges, ascending and disjoint, inside guest
    /// RAM) to the state file of the snapshot in <paramref name="directory"/>, which must be the
    /// snapshot <paramref name="snapshotId"/> (else <see cref="SnapshotFormatException"/>: it was
    /// replaced meanwhile). The state file is read (every check, its CRC included) and rewritten
    /// whole under a temporary name, then renamed over the old one; the memory file does not change.
    /// Returns the new state file's length.
    /// </summary>
    public static long RecordWorkingSet(string directory, Guid snapshotId, IReadOnlyList<GuestPageRange> workingSet)
    {
        string statePath = Path.Combine(directory, SnapshotFormat.StateFileName);
        var state = SnapshotReader.ReadState(statePath);
        if (state.Id != snapshotId)
            throw new SnapshotFormatException(statePath, 24, $"the snapshot there is {state.Id}, not {snapshotId} whose working set this is: it was replaced meanwhile");
        var updated = new SnapshotState
        {
            Id = state.Id,
            Created = state.Created,
            SpecJson = state.SpecJson,
            Regions = state.Regions,
            WorkingSet = [.. workingSet],
            Records = state.Records,
        };
        return SnapshotWriter.RewriteState(directory, updated);
    }

    /// <summary>
    /// Builds the machine the snapshot in <paramref name="directory"/> describes, loads its RAM
    /// and restores every record into it; the caller starts it (<see cref="VirtualMachine.Start"/>).
    /// A snapshot that is damaged, of another version, or whose memory file does not belong to it
    /// is refused (<see cref="SnapshotFormatException"/>) before anything is built; a machine that
    /// does not match the saved one is refused (<see cref="DeviceStateException"/>) before it runs.
    /// </summary>
    public static VirtualMachine Restore(string directory, Action<ReadOnlySpan<byte>> serialOutput, RestoreOptions? options = null,
        KvmSystem? kvm = null, ILogger? logger = null)
    {
        options ??= new RestoreOptions();
        var state = SnapshotReader.Read(directory);
        VmSpec spec = SpecOf(state, directory);
        if (options.ChangeSpec is { } change)
            spec = change(spec);
        return Restore(directory, state, spec, serialOutput, options, kvm, logger);
    }

    /// <summary>
    /// Restores the snapshot whose state file was already read (<paramref name="state"/>) into a
    /// machine built from <paramref name="spec"/> (the saved spec, or one changed as the guest
    /// cannot see).
    /// </summary>
    public static VirtualMachine Restore(string directory, SnapshotState state, VmSpec spec, Action<ReadOnlySpan<byte>> serialOutput,
        RestoreOptions options, KvmSystem? kvm = null, ILogger? logger = null)
    {
        if (options.Fork && options.Memory != MemoryLoad.Mapped)
            throw new ArgumentException("a fork maps the template's memory (MemoryLoad.Mapped)", nameof(options));
        string statePath = Path.Combine(directory, SnapshotFormat.StateFileName);
        var clock = options.Clock;
        var memoryFile = SnapshotMemoryFile.Open(directory, state);
        clock?.Mark("open the memory file");
        VirtualMachine? vm = null;
        try
        {
            GuestMemory? mapped = null;
            if (options.Memory == MemoryLoad.Mapped)
            {
                mapped = GuestMemory.MapPrivate(memoryFile.Handle,
                    state.Regions.Select(r => new GuestMemoryRange(r.GuestAddress, r.Size, r.FileOffset)).ToArray(), memoryFile.Path);
                clock?.Mark("map guest RAM");
            }
            vm = VirtualMachine.CreateForRestore(spec, serialOutput, kvm, logger, memory: mapped, clock: clock);
            CheckLayout(vm.Memory, state, statePath);
            if (options.Fork)
                foreach (var nic in vm.Nics)
                    ((Kvm.Devices.Virtio.Net.VirtioNet)nic.Device).RestoreAsFork = true;
            if (options.Memory == MemoryLoad.Mapped)
            {
                vm.RestoreState(state.Records);
                clock?.Mark("restore state");
                if (options.Fork)
                    vm.NewGenerationId();
            }
            else if (options.Memory == MemoryLoad.Lazy)
            {
                var loader = LazyMemoryLoader.Register(vm.Memory, memoryFile, logger ?? Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance);
                memoryFile = null;      // the loader owns it
                vm.Own(loader);
                var machine = vm;
                loader.Failed = e => machine.RequestStop(new Kvm.Vmm.Exits.MemoryLoadStop(e.Message));
                clock?.Mark("register the lazy loader");
                vm.RestoreState(state.Records);
                clock?.Mark("restore state");
                if (state.WorkingSet is { } workingSet)
                {
                    loader.LoadFirst(workingSet);
                    clock?.Mark("load the working set");
                }
                vm.MemoryLoader = loader;
                loader.Start(options.BackgroundBytesPerSecond);
                clock?.Mark("start the background loader");
            }
            else
            {
                memoryFile.CopyTo(new GuestMemorySnapshotAccess(vm.Memory), targetIsZeroed: true, options.Progress);
                clock?.Mark("load guest RAM");
                vm.RestoreState(state.Records);
                clock?.Mark("restore state");
            }
            return vm;
        }
        catch
        {
            vm?.Dispose();
            throw;
        }
        finally
        {
            memoryFile?.Dispose();
        }
    }

    /// <summary>The machine's RAM must be laid out as the saved one's: same regions at the same guest addresses.</summary>
    private static void CheckLayout(GuestMemory memory, SnapshotState state, string statePath)
    {
        var have = memory.Regions.Select(r => (r.GuestAddress, r.Size)).ToArray();
        var saved = state.Regions.Select(r => (r.GuestAddress, r.Size)).ToArray();
        if (!have.SequenceEqual(saved))
            throw new DeviceStateException(
                $"{statePath}: the saved RAM ({Describe(saved)}) is not laid out as this machine's ({Describe(have)})");
    }

    private static string Describe(IEnumerable<(ulong GuestAddress, ulong Size)> regions) =>
        string.Join(", ", regions.Select(r => $"0x{r.GuestAddress:x}+{GuestMemory.FormatSize(r.Size)}"));

    /// <summary>
    /// Where the machine <paramref name="spec"/> describes differs from the one saved in a snapshot
    /// (<paramref name="saved"/>) in what a restore cannot change: guest RAM, vCPUs, the disks (in
    /// number, each with the same read-only flag, queues and serial, and with
    /// <paramref name="sameDiskImages"/> the same image: a fork runs on children of the saved
    /// ones) and the NICs (in number, queues and offloads; MACs and uplinks may differ). The
    /// kernel and command line do not count. Empty when they match.
    /// </summary>
    public static IReadOnlyList<string> MachineMismatches(VmSpec spec, VmSpec saved, bool sameDiskImages)
    {
        var problems = new List<string>();
        if (spec.MemoryBytes != saved.MemoryBytes)
            problems.Add($"memory: the VM has {GuestMemory.FormatSize(spec.MemoryBytes)}, the snapshot {GuestMemory.FormatSize(saved.MemoryBytes)}");
        if (spec.Cpus != saved.Cpus)
            problems.Add($"vCPUs: the VM has {spec.Cpus}, the snapshot {saved.Cpus}");
        if (spec.Disks.Count != saved.Disks.Count)
            problems.Add($"disks: the VM has {spec.Disks.Count}, the snapshot {saved.Disks.Count}");
        for (int i = 0; i < Math.Min(spec.Disks.Count, saved.Disks.Count); i++)
        {
            DiskSpec a = spec.Disks[i], b = saved.Disks[i];
            if (sameDiskImages && !string.Equals(Path.GetFullPath(a.Path), Path.GetFullPath(b.Path), StringComparison.Ordinal))
                problems.Add($"disk {i}: the VM's is {a.Path}, the snapshot's {b.Path}");
            if (a.ReadOnly != b.ReadOnly)
                problems.Add($"disk {i}: read-only in {(a.ReadOnly ? "the VM's spec" : "the snapshot")} only");
            if (a.Queues != b.Queues)
                problems.Add($"disk {i}: the VM's has {a.Queues} queue(s), the snapshot's {b.Queues}");
            if (!string.Equals(a.Serial, b.Serial, StringComparison.Ordinal))
                problems.Add($"disk {i}: serial '{a.Serial}' in the VM's spec, '{b.Serial}' in the snapshot");
        }
        if (spec.Nics.Count != saved.Nics.Count)
            problems.Add($"NICs: the VM has {spec.Nics.Count}, the snapshot {saved.Nics.Count}");
        for (int i = 0; i < Math.Min(spec.Nics.Count, saved.Nics.Count); i++)
        {
            NicSpec a = spec.Nics[i], b = saved.Nics[i];
            if (a.Queues != b.Queues)
                problems.Add($"NIC {i}: the VM's has {a.Queues} queue pair(s), the snapshot's {b.Queues}");
            if (a.Offloads != b.Offloads)
                problems.Add($"NIC {i}: offloads {(a.Offloads ? "on" : "off")} in the VM's spec, {(b.Offloads ? "on" : "off")} in the snapshot");
        }
        return problems;
    }

    /// <summary>The spec saved in <paramref name="state"/> (read from <paramref name="directory"/>).</summary>
    public static VmSpec SpecOf(SnapshotState state, string directory) =>
        VmSpecJsonContext.Parse(state.SpecJson, $"saved in {Path.Combine(directory, SnapshotFormat.StateFileName)}");
}
