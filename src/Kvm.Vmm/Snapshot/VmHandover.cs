using System.Runtime.InteropServices;
using Kvm.Devices.Manager;
using Kvm.Hypervisor;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Snapshot;

/// <summary>
/// A suspended VM as one process gives it to another: its state (the state file's bytes: spec and
/// every record, no RAM), and its guest RAM left where it is, in the memfd whose
/// <see cref="Layout"/> the receiver maps (<see cref="GuestMemory.Attach"/>). Nothing of guest RAM
/// is copied.
/// </summary>
/// <param name="State">The state file's bytes (<see cref="SnapshotWriter.EncodeState"/>).</param>
/// <param name="Layout">Each RAM region's guest address, size and offset in the memfd.</param>
/// <param name="HugePages">How the memfd's pages are backed (hugetlb memfds are mapped differently).</param>
public sealed record SuspendedVm(byte[] State, IReadOnlyList<GuestMemoryRange> Layout, HugePageMode HugePages);

/// <summary>
/// Suspending a VM so that another process (a new kvm-vmm, perhaps a newer binary, perhaps with a
/// changed configuration) picks it up: the guest's RAM stays in its memfd, only the device and vCPU
/// state travels. <see cref="Suspend"/> in the giving process, <see cref="Resume"/> in the taking
/// one. Between the two, changes the guest cannot see are allowed (<see cref="CheckChanges"/>).
/// </summary>
public static class VmHandover
{
    /// <summary>
    /// Captures the state of <paramref name="vm"/>, which must be paused, and closes its disk
    /// images (written back and unlocked) so that the taking process can open them. From here
    /// on the VM cannot resume in this process; its RAM (<see cref="VirtualMachine.Memory"/>'s
    /// <see cref="GuestMemory.BackingFd"/>) must stay open until the taker has it.
    /// </summary>
    public static SuspendedVm Suspend(VirtualMachine vm, StepClock? clock = null)
    {
        var records = vm.SaveState(clock);
        var state = SnapshotState.Create(VmSpecJsonContext.Format(vm.Spec), vm.Memory.Regions.Select(r => (r.GuestAddress, r.Size)), records);
        byte[] bytes = SnapshotWriter.EncodeState(state);
        clock?.Mark("encode the state");
        vm.CloseDisks();
        clock?.Mark("close disks");
        return new SuspendedVm(bytes, vm.Memory.Layout, vm.Spec.HugePages);
    }

    /// <summary>
    /// What may change between a suspend and the resume, given the spec the VM was suspended with
    /// (<paramref name="saved"/>) and the one it resumes with (<paramref name="changed"/>): the VMM
    /// binary, a disk's image (moved, or another image of the same content and size), a disk's
    /// serial, and disks added after the existing ones. The guest's RAM, its CPUs, its other
    /// devices and the existing disks' read-only flag and queue count must stay. Returns the ids of
    /// the devices that are new (the added disks); throws <see cref="DeviceStateException"/>
    /// naming the first change that is not allowed.
    /// </summary>
    public static IReadOnlySet<string> CheckChanges(VmSpec saved, VmSpec changed)
    {
        void Same<T>(string field, T a, T b)
        {
            if (!EqualityComparer<T>.Default.Equals(a, b))
                throw new DeviceStateException($"{field} cannot change while the VM is suspended (it was {a}, the new configuration says {b})");
        }
        Same("memoryBytes", saved.MemoryBytes, changed.MemoryBytes);
        Same("cpus", saved.Cpus, changed.Cpus);
        Same("hugePages", saved.HugePages, changed.HugePages);
        Same("debugExit", saved.DebugExit, changed.DebugExit);
        if (changed.Disks.Count < saved.Disks.Count)
            throw new DeviceStateException(
                $"the new configuration has {changed.Disks.Count} disk(s), the suspended VM {saved.Disks.Count}: a disk the guest uses cannot be removed");
        for (int i = 0; i < saved.Disks.Count; i++)
        {
            Same($"disk {i}'s readOnly", saved.Disks[i].ReadOnly, changed.Disks[i].ReadOnly);
            Same($"disk {i}'s queues", saved.Disks[i].Queues, changed.Disks[i].Queues);
        }
        var added = new HashSet<string>(StringComparer.Ordinal);
        for (int i = saved.Disks.Count; i < changed.Disks.Count; i++)
            added.Add($"virtio-blk{i}");
        return added;
    }

    /// <summary>
    /// Builds, in this process, the machine of a VM another process still runs and will hand over:
    /// maps its guest RAM from <paramref name="memoryFd"/> (laid out as <paramref name="layout"/>),
    /// creates the VM, its vCPUs and every device of <paramref name="spec"/>, paused, but opens no
    /// disk image (the other process holds them) and restores nothing: that is
    /// <see cref="Resume"/>, once the other process has suspended the VM. Building the machine
    /// before the guest pauses keeps it out of the pause.
    /// </summary>
    public static VirtualMachine Prepare(VmSpec spec, SafeHandle memoryFd, IReadOnlyList<GuestMemoryRange> layout, HugePageMode hugePages,
        Action<ReadOnlySpan<byte>> serialOutput, ILogger? logger = null)
    {
        spec.Validate();
        if (hugePages != spec.HugePages)
            throw new DeviceStateException($"hugePages cannot change in a hand-over (the guest RAM is {hugePages}, the new configuration says {spec.HugePages})");
        var memory = GuestMemory.Attach(memoryFd, layout, hugePages);
        // The machine owns the memory from here, also when it cannot be built.
        return VirtualMachine.CreateForRestore(spec, serialOutput, logger: logger, memory: memory, disksLater: true);
    }

    /// <summary>
    /// Restores a suspended VM into the machine <see cref="Prepare"/> built: parses
    /// <paramref name="state"/> (refused as a damaged state file would be; <paramref name="origin"/>
    /// names it in errors), checks the machine's spec against the saved one
    /// (<see cref="CheckChanges"/>), opens the disk images (the other process has closed them) and
    /// restores every record. The caller starts the machine.
    /// </summary>
    public static void Resume(VirtualMachine vm, ReadOnlySpan<byte> state, string origin, StepClock? clock = null)
    {
        var parsed = SnapshotReader.ParseState(state, origin);
        var saved = VmSpecJsonContext.Parse(parsed.SpecJson, $"handed over in {origin}");
        var added = CheckChanges(saved, vm.Spec);
        clock?.Mark("parse state");
        vm.OpenPendingDisks();
        clock?.Mark("open disks");
        vm.RestoreState(parsed.Records, added);
        clock?.Mark("restore state");
    }
}
