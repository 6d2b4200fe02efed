using System.Text.RegularExpressions;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Storage;
using Kvm.Storage.Qcow2;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Snapshot;

/// <summary>How a live checkpoint is taken.</summary>
public sealed record CheckpointOptions
{
    /// <summary>How fast guest RAM is written out in the background, in bytes per second; null: as fast as it can.</summary>
    public long? BytesPerSecond { get; init; }

    /// <summary>
    /// Copy each writable disk's content at the checkpoint into the checkpoint directory, a whole
    /// image of its own; without it the checkpoint's disk is an empty copy-on-write child of the
    /// image the VM left at the checkpoint (frozen from then on, the VM writing to a new top image).
    /// </summary>
    public bool CopyDisks { get; init; }

    /// <summary>Hears the bytes of guest RAM saved so far and the total, while the VM runs on.</summary>
    public Action<long, long>? Progress { get; init; }
}

/// <summary>What <see cref="VmCheckpoint.Take"/> did.</summary>
/// <param name="Directory">The checkpoint: a snapshot directory, as <see cref="VmSnapshot.Save"/> writes, with the checkpoint's disks beside.</param>
/// <param name="StopSeconds">How long the guest was stopped.</param>
/// <param name="StopSteps">Where the stop went, step by step.</param>
/// <param name="Seconds">The whole checkpoint, from the first file made to the last renamed.</param>
/// <param name="Layers">Per disk, the new top image the VM writes to from the checkpoint on; null for a read-only disk (it stays).</param>
/// <param name="Disks">Per disk, the image the checkpoint's spec names.</param>
/// <param name="Memory">How guest RAM was saved: writes that waited, bytes saved on a write and in the background.</param>
/// <param name="Phases">Where the whole checkpoint went: preparing (the disks' children, the memory file, the write protection registered), the stop, writing RAM out (and copying disks), writing the state file.</param>
public sealed record CheckpointResult(string Directory, double StopSeconds, IReadOnlyList<PauseStep> StopSteps, double Seconds,
    IReadOnlyList<string?> Layers, IReadOnlyList<string> Disks, RamCheckpointStats Memory, SnapshotWriteResult Snapshot,
    IReadOnlyList<PauseStep> Phases);

/// <summary>
/// A live checkpoint: a snapshot of a running VM whose guest is stopped only for an instant. Before
/// the stop, a copy-on-write child of each writable disk is made (the VM's next top image), and
/// another for the checkpoint, and guest RAM is registered for write protection. The stop pauses
/// the vCPUs and devices (requests in flight finish, images flush), saves the device and vCPU
/// state, write-protects guest RAM (<see cref="RamCheckpointWriter"/>) and moves the disks onto
/// their children (<see cref="VirtualMachine.SwitchDisks"/>); then the VM runs on while RAM as it
/// was at the stop is written out (a write to a page not yet saved waits for its chunk), and the
/// state file completes the snapshot. The parent images hold the disks' content at the stop and
/// are read-only from then on; the checkpoint's disks are children of them (or copies, with
/// <see cref="CheckpointOptions.CopyDisks"/>), so restoring the checkpoint writes to its own
/// images and never to the chain the VM runs on. Taken again and again, the VM's disks form a
/// chain, one layer per checkpoint.
/// </summary>
public static partial class VmCheckpoint
{
    /// <summary>The name of checkpoint disk i in a checkpoint directory.</summary>
    public static string DiskFileName(int index) => $"disk{index}.qcow2";

    [GeneratedRegex(@"\.ckpt-[0-9a-f]{8}$")]
    private static partial Regex LayerSuffix();

    /// <summary>The VM's next top image for a disk on <paramref name="parent"/>: beside it, named after it and the checkpoint.</summary>
    public static string LayerPath(string parent, string tag)
    {
        string folder = Path.GetDirectoryName(parent) ?? "/";
        string stem = LayerSuffix().Replace(Path.GetFileNameWithoutExtension(parent), "");
        return Path.Combine(folder, $"{stem}.ckpt-{tag}.qcow2");
    }

    /// <summary>
    /// Takes a checkpoint of <paramref name="vm"/> (running, or paused) into
    /// <paramref name="directory"/>, which must be new or empty. <paramref name="pause"/> and
    /// <paramref name="resume"/> stop and restart the guest (null: <see cref="VirtualMachine.Pause"/>
    /// and <see cref="VirtualMachine.Resume"/>). Refused before anything is made when the kernel
    /// cannot write-protect shared memory, or RAM is held by another userfaultfd (a lazy restore
    /// still loading): <see cref="InvalidOperationException"/>. A checkpoint that fails (the
    /// directory cannot be written, the disk fills) leaves no checkpoint and throws
    /// <see cref="IOException"/>; the VM runs on, on the disks it had or, when the stop was passed,
    /// on their new top images (each a whole chain).
    /// </summary>
    public static CheckpointResult Take(VirtualMachine vm, string directory, CheckpointOptions? options = null, Action? pause = null,
        Action? resume = null, CancellationToken cancellationToken = default)
    {
        options ??= new CheckpointOptions();
        if (options.BytesPerSecond <= 0)
            throw new ArgumentOutOfRangeException(nameof(options), options.BytesPerSecond, "a checkpoint's write rate must be positive");
        if (RamCheckpointWriter.Refusal() is { } refusal)
            throw new InvalidOperationException(refusal);
        if (vm.DisksClosed)
            throw new InvalidOperationException("the VM is suspended (its disks closed): it cannot be checkpointed in this process");
        if (vm.Memory.PrivateCopyOf is { } copyOf)
            throw new InvalidOperationException($"guest RAM is a private copy-on-write mapping of {copyOf} (a mapped restore), which cannot be write-protected: save the VM instead");
        directory = Path.GetFullPath(directory);
        if (Directory.Exists(directory) && Directory.EnumerateFileSystemEntries(directory).Any())
            throw new IOException($"checkpoint directory {directory} is not empty: a checkpoint goes into a new or empty directory");
        var phases = new StepClock("vmm");         // from here: the whole checkpoint's time is its phases
        bool madeDirectory = !Directory.Exists(directory);
        Directory.CreateDirectory(directory);

        var spec = vm.Spec;
        int n = spec.Disks.Count;
        Guid id = SnapshotState.NewId();
        string tag = id.ToString("N")[..8];
        var layers = new string?[n];
        var disks = new string[n];
        var parents = new string[n];
        var made = new List<string>();          // files to remove if the checkpoint fails
        string memoryTemp = SnapshotWriter.TempMemoryPath(directory);
        bool switched = false, done = false;
        var log = vm.Log;
        try
        {
            // While the VM runs: the children, the memory file, the write protection registered.
            for (int i = 0; i < n; i++)
            {
                var image = ((VirtioBlock)vm.Disks[i].Device).Image;
                parents[i] = Path.GetFullPath(image.Path);
                if (spec.Disks[i].ReadOnly)
                {
                    disks[i] = parents[i];
                    continue;
                }
                string format = image is Qcow2Image ? "qcow2" : "raw";
                string layer = LayerPath(parents[i], tag);
                Qcow2Image.CreateFile(layer, new Qcow2CreateOptions { Size = image.Size, BackingFile = Path.GetFileName(parents[i]), BackingFormat = format });
                made.Add(layer);
                layers[i] = layer;
                disks[i] = Path.Combine(directory, DiskFileName(i));
                if (!options.CopyDisks)
                {
                    Qcow2Image.CreateFile(disks[i], new Qcow2CreateOptions { Size = image.Size, BackingFile = parents[i], BackingFormat = format });
                    made.Add(disks[i]);
                }
            }
            var regions = SnapshotRegion.Layout(vm.Memory.Regions.Select(r => (r.GuestAddress, r.Size)));
            var stopClock = new StepClock("vmm");
            using var memoryFile = File.OpenHandle(memoryTemp, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
            made.Add(memoryTemp);
            string specJson = VmSpecJsonContext.Format(spec with { Disks = [.. spec.Disks.Select((d, i) => d with { Path = disks[i] })] });
            SnapshotState StateOf(IReadOnlyList<Kvm.Hypervisor.State.StateRecord> records) => new()
            {
                Id = id,
                Created = DateTimeOffset.UtcNow,
                SpecJson = specJson,
                Regions = regions,
                Records = [.. records],
            };
            var state = StateOf([]);
            RandomAccess.Write(memoryFile, SnapshotWriter.MemoryHeader(state), 0);
            using var writer = RamCheckpointWriter.Register(vm.Memory, memoryFile, memoryTemp, regions.Select(r => r.FileOffset).ToArray());
            cancellationToken.ThrowIfCancellationRequested();

            phases.Mark("prepare");

            // The stop.
            stopClock.Restart();
            (pause ?? vm.Pause)();
            stopClock.Mark("pause");
            try
            {
                state = StateOf(vm.SaveState());
                stopClock.Mark("save state");
                writer.Protect();
                stopClock.Mark("protect RAM");
                switched = true;        // from here the VM may run on a new top image
                vm.SwitchDisks(layers);
                stopClock.Mark("switch disks");
            }
            finally
            {
                (resume ?? vm.Resume)();
                stopClock.Mark("resume");
            }
            double stopSeconds = stopClock.TotalMilliseconds / 1000;
            phases.Mark("stop");
            // The parents hold the disks at the checkpoint: nobody writes them any more.
            foreach (var layer in layers.OfType<string>())
                made.Remove(layer);
            for (int i = 0; i < n; i++)
                if (layers[i] is not null)
                    MakeReadOnly(parents[i]);
            CheckpointLog.Stopped(log, directory, stopSeconds * 1000, stopClock.Describe());

            // The VM runs on; RAM as it was at the stop goes out.
            writer.Start(options.BytesPerSecond);
            if (options.CopyDisks)
                for (int i = 0; i < n; i++)
                    if (layers[i] is not null)
                        CopyDisk(parents[i], disks[i], made);
            long total = (long)vm.Memory.TotalSize;
            while (!writer.WaitDone(TimeSpan.FromMilliseconds(200)))
            {
                if (writer.Failure is { } failure)
                    throw failure;
                cancellationToken.ThrowIfCancellationRequested();
                var s = writer.Stats;
                options.Progress?.Invoke(s.BytesOnWrite + s.BytesInBackground, total);
            }
            if (writer.Failure is { } late)
                throw late;
            var stats = writer.Stats;
            options.Progress?.Invoke(total, total);
            phases.Mark(options.CopyDisks ? "write RAM and copy disks" : "write RAM");
            var written = SnapshotWriter.Finish(directory, state, memoryFile, memoryTemp, (ulong)stats.BytesWritten, cancellationToken);
            done = true;
            phases.Mark("write state");
            double seconds = phases.TotalMilliseconds / 1000;
            CheckpointLog.Taken(log, directory, seconds, GuestMemory.FormatSize((ulong)stats.BytesWritten), stats.Faults, phases.Describe());
            return new CheckpointResult(directory, stopSeconds, stopClock.Steps, seconds, layers, disks, stats, written, phases.Steps);
        }
        catch (Exception e) when (!done)
        {
            // A disk that moved (the switch may fail part way) runs on its new top image: it stays.
            var inUse = vm.Spec.Disks.Select(d => Path.GetFullPath(d.Path)).ToHashSet();
            foreach (var path in made.Where(p => !inUse.Contains(p)))
                SnapshotWriter.TryDelete(path);
            if (madeDirectory)
                TryDeleteDirectory(directory);
            CheckpointLog.Failed(log, directory, e.Message, switched ? "on its new top images" : "on the disks it had");
            throw;
        }
    }

    /// <summary>
    /// Deletes the checkpoint in <paramref name="directory"/> and folds the disk layer it kept
    /// frozen: for each disk whose checkpoint image is a child of a checkpoint layer L (made by an
    /// earlier checkpoint), the layer the VM went on with from this checkpoint takes in what it
    /// reads from L (a safe rebase onto L's own backing file: it keeps what the guest sees) and L
    /// is removed. A disk's first layer stays on its base image; a checkpoint taken with
    /// <see cref="CheckpointOptions.CopyDisks"/> has no link to its layer and leaves it. The VM may
    /// run meanwhile, as long as it no longer writes to the layer that takes L in (it was
    /// checkpointed again since, or it is stopped): the layer is only read by it, and the content
    /// it reads does not change. Refused, before anything changes, when the checkpoint's own image
    /// is in use (a VM restored from it runs) or the layer is held for writing
    /// (<see cref="IOException"/> naming it). Returns the layers folded away.
    /// </summary>
    public static IReadOnlyList<string> Delete(string directory, IProgress<double>? progress = null)
    {
        directory = Path.GetFullPath(directory);
        var state = SnapshotReader.Read(directory);
        var spec = VmSnapshot.SpecOf(state, directory);
        string tag = state.Id.ToString("N")[..8];
        var folds = new List<(string Layer, string Frozen, string? NewBacking, string? NewFormat)>();
        var own = new List<string>();
        foreach (var disk in spec.Disks)
        {
            string image = Path.GetFullPath(disk.Path);
            if (Path.GetDirectoryName(image) != directory)
                continue;                               // a read-only disk: not the checkpoint's
            // Made read-only when it came to back other images (forks of the checkpoint): they would lose their base.
            if (File.Exists(image) && (File.GetUnixFileMode(image) & UnixFileMode.UserWrite) == 0)
                throw new IOException($"cannot delete the checkpoint: its disk {image} is read-only, as an image that backs others (forks of the checkpoint) is");
            own.Add(image);
            string? frozen;
            using (var k = OpenForDelete(image, new ImageOpenOptions { Exclusive = true }, "the checkpoint's disk is in use (a VM restored from it runs?)"))
                frozen = (k as Qcow2Image)?.Backing?.Path;
            if (frozen is null || !LayerSuffix().IsMatch(Path.GetFileNameWithoutExtension(frozen)))
                continue;                               // copied disks, or a disk's first layer: nothing to fold
            string layer = LayerPath(frozen, tag);
            if (!File.Exists(layer))
                continue;
            using (OpenForDelete(layer, new ImageOpenOptions { ReadOnly = true },
                       "a VM writes to it: delete this checkpoint once the VM was checkpointed again, or is stopped"))
            {
            }
            string? newBacking, newFormat;
            using (var f = Qcow2Image.Open(frozen, new ImageOpenOptions { ReadOnly = true }))
                (newBacking, newFormat) = (f.BackingFile, f.BackingFormat);
            folds.Add((layer, frozen, newBacking, newFormat));
        }
        for (int i = 0; i < folds.Count; i++)
        {
            var (layer, frozen, newBacking, newFormat) = folds[i];
            var mode = File.GetUnixFileMode(layer);
            if ((mode & UnixFileMode.UserWrite) == 0)
                File.SetUnixFileMode(layer, mode | UnixFileMode.UserWrite);
            int at = i;
            ImageOperations.Rebase(layer, newBacking, newFormat, unsafeMode: false,
                progress is null ? null : new Progress<double>(x => progress.Report((at + x) / folds.Count)));
            File.SetUnixFileMode(layer, mode);
            File.Delete(frozen);
        }
        foreach (var path in own)
            File.Delete(path);
        File.Delete(Path.Combine(directory, SnapshotFormat.StateFileName));
        File.Delete(Path.Combine(directory, SnapshotFormat.MemoryFileName));
        TryDeleteDirectory(directory);
        progress?.Report(1.0);
        return folds.Select(f => f.Frozen).ToArray();
    }

    /// <summary>Opens <paramref name="path"/> to show it is not in use; "in use" becomes an <see cref="IOException"/> saying why that matters.</summary>
    private static IBlockImage OpenForDelete(string path, ImageOpenOptions options, string why)
    {
        try
        {
            return DiskImage.Open(path, options);
        }
        catch (ImageFormatException e) when (e.Message.Contains("in use", StringComparison.Ordinal))
        {
            throw new IOException($"cannot delete the checkpoint: {path} is in use: {why}", e);
        }
    }

    /// <summary>Copies what the guest sees of <paramref name="parent"/> (its whole chain) into a new qcow2 image at <paramref name="path"/>.</summary>
    private static void CopyDisk(string parent, string path, List<string> made)
    {
        using var source = DiskImage.Open(parent, new ImageOpenOptions { ReadOnly = true });
        made.Add(path);
        ImageOperations.Convert(source, path, "qcow2");
    }

    private static void MakeReadOnly(string path)
    {
        try
        {
            ImageOperations.MakeReadOnly(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Not ours to change (another owner): the lock and the layer above keep it unwritten.
        }
    }

    private static void TryDeleteDirectory(string path)
    {
        try
        {
            if (Directory.Exists(path) && !Directory.EnumerateFileSystemEntries(path).Any())
                Directory.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }
}

internal static partial class CheckpointLog
{
    [LoggerMessage(EventId = 1410, Level = LogLevel.Information, Message = "checkpoint {Directory}: the guest was stopped {Milliseconds:0.##} ms ({Steps})")]
    public static partial void Stopped(ILogger logger, string directory, double milliseconds, string steps);

    [LoggerMessage(EventId = 1411, Level = LogLevel.Information, Message = "checkpoint {Directory}: taken in {Seconds:0.###} s ({Phases}), {Written} of guest RAM written, {Faults} guest writes waited for their page")]
    public static partial void Taken(ILogger logger, string directory, double seconds, string written, long faults, string phases);

    [LoggerMessage(EventId = 1412, Level = LogLevel.Warning, Message = "checkpoint {Directory} failed: {Error}; the VM runs on {Where}")]
    public static partial void Failed(ILogger logger, string directory, string error, string where);
}
