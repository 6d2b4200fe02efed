using Kvm.Hypervisor;
using Kvm.Network;
using Kvm.Storage;
using Kvm.Storage.Qcow2;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Snapshot;

/// <summary>
/// A fork made by <see cref="VmFork.Restore"/>: its machine (built and restored, not started),
/// its directory, per disk the image it writes (read-only disks: the template's own), per NIC its MAC.
/// </summary>
public sealed record ForkedVm(VirtualMachine Vm, string Directory, IReadOnlyList<string> Disks, IReadOnlyList<MacAddress> Macs);

/// <summary>
/// Forks: copies of a saved VM (a snapshot or a checkpoint, the template) that each carry on from
/// the template's instant with an identity of their own. A fork's RAM is a private copy-on-write
/// mapping of the template's memory file (<see cref="MemoryLoad.Mapped"/>): nothing is copied up
/// front, every fork shares the pages none of them wrote, and the file never changes. Each
/// writable disk becomes a new qcow2 child of the template's image in the fork's directory (the
/// template's image is made read-only: it backs the forks now); read-only disks are shared. Each
/// NIC gets a new random MAC and a tap of its own (named by the kernel, on the template's bridge),
/// and the VM a new generation id (ACPI VMGENID, GPE 0), so that a guest can tell it was copied.
/// A fork can be saved, and forked again from that snapshot.
/// </summary>
public static class VmFork
{
    /// <summary>The name of a fork's disk <paramref name="index"/> in its directory.</summary>
    public static string DiskFileName(int index) => $"disk{index}.qcow2";

    /// <summary>
    /// Builds a fork of the snapshot in <paramref name="template"/> with its disks in
    /// <paramref name="directory"/> (created if missing; <see cref="DiskFileName"/>). Refused before
    /// anything is made when the template is damaged (<see cref="SnapshotFormatException"/>) or a
    /// disk file is there already (<see cref="IOException"/>); a fork that fails later leaves no
    /// files behind.
    /// </summary>
    public static ForkedVm Restore(string template, string directory, Action<ReadOnlySpan<byte>> serialOutput, KvmSystem? kvm = null,
        ILogger? logger = null, StepClock? clock = null)
    {
        template = Path.GetFullPath(template);
        var state = SnapshotReader.Read(template);
        clock?.Mark("read the template");
        return Restore(template, state, directory, serialOutput, kvm, logger, clock);
    }

    /// <summary>The same, for a template whose state file was already read (<paramref name="state"/>).</summary>
    public static ForkedVm Restore(string template, SnapshotState state, string directory, Action<ReadOnlySpan<byte>> serialOutput, KvmSystem? kvm = null,
        ILogger? logger = null, StepClock? clock = null)
    {
        template = Path.GetFullPath(template);
        directory = Path.GetFullPath(directory);
        var saved = VmSnapshot.SpecOf(state, template);
        var (spec, made, madeDirectory) = MakeFork(saved, directory);
        try
        {
            clock?.Mark("make the fork's disks");
            var vm = VmSnapshot.Restore(template, state, spec, serialOutput,
                new RestoreOptions { Memory = MemoryLoad.Mapped, Fork = true, Clock = clock }, kvm, logger);
            return new ForkedVm(vm, directory, spec.Disks.Select(d => d.Path).ToArray(), spec.Nics.Select(n => n.Mac).ToArray());
        }
        catch
        {
            Undo(made, madeDirectory ? directory : null);
            throw;
        }
    }

    /// <summary>
    /// Makes a fork's files for the template whose saved spec is <paramref name="saved"/>: per
    /// writable disk a new qcow2 child of the template's image in <paramref name="directory"/>
    /// (<see cref="DiskFileName"/>; the template's image is made read-only), and returns the fork's
    /// spec: those disks, each NIC a new random MAC and a tap of its own. Nothing is left behind
    /// when it fails. For kvmd, which keeps the fork's spec and starts it with
    /// <see cref="RestoreWithSpec"/> (kvm-vmm --restore DIR --fork-spec FILE).
    /// </summary>
    public static VmSpec Prepare(VmSpec saved, string directory) => MakeFork(saved, Path.GetFullPath(directory)).Spec;

    private static (VmSpec Spec, List<string> Made, bool MadeDirectory) MakeFork(VmSpec spec, string directory)
    {
        for (int i = 0; i < spec.Disks.Count; i++)
            if (!spec.Disks[i].ReadOnly && Path.Combine(directory, DiskFileName(i)) is var taken && Path.Exists(taken))
                throw new IOException($"{taken} exists: a fork makes its disks anew (another fork's directory?)");
        bool madeDirectory = !Directory.Exists(directory);
        Directory.CreateDirectory(directory);
        var made = new List<string>();
        try
        {
            var disks = new List<DiskSpec>();
            for (int i = 0; i < spec.Disks.Count; i++)
            {
                var disk = spec.Disks[i];
                if (disk.ReadOnly)
                {
                    disks.Add(disk);
                    continue;
                }
                string parent = Path.GetFullPath(disk.Path);
                var (size, format) = Probe(parent, i);
                string child = Path.Combine(directory, DiskFileName(i));
                Qcow2Image.CreateFile(child, new Qcow2CreateOptions { Size = size, BackingFile = parent, BackingFormat = format });
                made.Add(child);
                // It backs forks from now on: nothing may write it under them.
                ImageOperations.MakeReadOnly(parent);
                disks.Add(disk with { Path = child });
            }
            // A new MAC, and a tap of its own: a named tap is the template's, so the fork's is one
            // the kernel names, on the same bridge (uplinks on host interfaces are shared).
            var nics = spec.Nics.Select(n => n with
            {
                Mac = MacAddress.Random(),
                Uplinks = n.Uplinks.Select(u => u.Tap.Length > 0 ? u with { Tap = "" } : u).ToArray(),
            }).ToArray();
            return (spec with { Disks = disks, Nics = nics }, made, madeDirectory);
        }
        catch
        {
            Undo(made, madeDirectory ? directory : null);
            throw;
        }
    }

    private static void Undo(List<string> made, string? directory)
    {
        foreach (var file in made)
            SnapshotWriter.TryDelete(file);
        if (directory is null)
            return;
        try
        {
            Directory.Delete(directory);
        }
        catch (IOException)
        {
        }
    }

    /// <summary>
    /// Restores the template (its state file read: <paramref name="state"/>) as a fork onto the
    /// machine <paramref name="spec"/> describes (made by <see cref="Prepare"/>: the fork's disks
    /// and MACs): RAM mapped from the template's memory file, a new generation id. The spec must
    /// describe the saved machine (<see cref="CheckSpec"/>); its disks must hold the template's
    /// content (children of its images).
    /// </summary>
    public static VirtualMachine RestoreWithSpec(string template, SnapshotState state, VmSpec spec, Action<ReadOnlySpan<byte>> serialOutput,
        KvmSystem? kvm = null, ILogger? logger = null, StepClock? clock = null)
    {
        CheckSpec(template, state, spec);
        return VmSnapshot.Restore(template, state, spec, serialOutput, new RestoreOptions { Memory = MemoryLoad.Mapped, Fork = true, Clock = clock }, kvm, logger);
    }

    /// <summary>Refuses (<see cref="ArgumentException"/>, naming each difference) a fork's spec that does not describe the machine saved in the template.</summary>
    public static void CheckSpec(string template, SnapshotState state, VmSpec spec)
    {
        var problems = Mismatches(spec, VmSnapshot.SpecOf(state, template));
        if (problems.Count > 0)
            throw new ArgumentException($"the fork's spec does not describe the machine saved in {template}: {string.Join("; ", problems)}");
    }

    /// <summary>Where a fork's spec differs from the template's saved one in what a fork cannot change (all but disk images, MACs and uplinks).</summary>
    public static IReadOnlyList<string> Mismatches(VmSpec fork, VmSpec saved) =>
        VmSnapshot.MachineMismatches(fork, saved, sameDiskImages: false);

    /// <summary>A template disk's virtual size and format ("raw" or "qcow2"), read without writing it.</summary>
    private static (ulong Size, string Format) Probe(string path, int index)
    {
        try
        {
            using var image = DiskImage.Open(path, new ImageOpenOptions { ReadOnly = true });
            return (image.Size, image is Qcow2Image ? "qcow2" : "raw");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ImageFormatException or ArgumentException)
        {
            throw new IOException($"the template's disk {index} ({path}) cannot be opened to fork it (if a VM runs on it: fork a checkpoint of that VM, or save it with stop, so that the disk no longer changes): {e.Message}", e);
        }
    }
}
