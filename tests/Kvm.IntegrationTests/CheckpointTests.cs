using System.Buffers.Binary;
using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Interop.Native;
using Kvm.Storage;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;
using Xunit.Abstractions;

namespace Kvm.IntegrationTests;

/// <summary>
/// Live checkpoints of guest RAM on KVM (issue 13): the guest is stopped only to write-protect its
/// RAM, runs on while the RAM is saved, and what is saved is RAM exactly as it was at the stop,
/// though the guest's vCPUs write it all the while through KVM. Needs /dev/kvm (the nested KVM host
/// on these machines) and userfaultfd write-protection of shared memory.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed partial class CheckpointTests(ITestOutputHelper output) : IDisposable
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(120);
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-ckpt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static void Require()
    {
        GuestKitRunner.Require();
        TestEnvironment.SkipIf(RamCheckpointWriter.Refusal());
    }

    [SkippableFact]
    public void WritesTheGuestMakesAfterTheStopDoNotReachTheCheckpoint()
    {
        Require();
        // `dirty` writes a word into every page of 32 MiB, pass after pass, each pass another value.
        var spec = GuestKitRunner.Spec("dirty size=33554432 passes=1000000") with { MemoryBytes = 64UL << 20 };
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(spec, serial.Write);
        vm.Start();
        Thread.Sleep(2000);                 // well into its passes
        Assert.False(vm.Stopped.IsCompleted, $"the guest stopped: {serial.Text}");

        string path = Path.Combine(_dir, "memory");
        using var file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite);
        var regions = vm.Memory.Regions;
        var offsets = new ulong[regions.Count];
        ulong at = 4096;
        for (int i = 0; i < regions.Count; i++)
        {
            offsets[i] = at;
            at += regions[i].Size;
        }
        using var writer = RamCheckpointWriter.Register(vm.Memory, file, path, offsets);

        // The stop: the guest paused, RAM as it is now kept aside to compare, RAM protected.
        vm.Pause();
        var expected = regions.Select(r =>
        {
            var bytes = new byte[r.Size];
            vm.Memory.Read(r.GuestAddress, bytes);
            return bytes;
        }).ToArray();
        writer.Protect();
        vm.Resume();

        // 64 MiB at 8 MiB/s: the guest sweeps its 32 MiB many times meanwhile.
        writer.Start(bytesPerSecond: 8 << 20);
        Assert.True(writer.WaitDone(Wait), $"the checkpoint did not finish: {writer.Stats}; {writer.Failure?.Message}");
        var stats = writer.Stats;
        Assert.Null(writer.Failure);
        Assert.False(vm.Stopped.IsCompleted, $"the guest stopped during the checkpoint: {serial.Text}");
        Assert.True(stats.Faults > 0 && stats.BytesOnWrite > 0, $"no guest write waited for its page: {stats}");
        Assert.Equal(stats.BytesTotal, stats.BytesOnWrite + stats.BytesInBackground);

        RandomAccess.SetLength(file, (long)at);
        for (int i = 0; i < regions.Count; i++)
        {
            var got = new byte[regions[i].Size];
            Assert.Equal(got.Length, RandomAccess.Read(file, got, (long)offsets[i]));
            int same = got.AsSpan().CommonPrefixLength(expected[i]);
            Assert.True(same == got.Length,
                $"region {i}: the checkpoint differs from RAM at the stop at guest 0x{regions[i].GuestAddress + (ulong)same:x}; {stats}");
        }

        // The guest ran on meanwhile: its region holds other values now than at the stop.
        vm.Pause();
        int changed = 0;
        for (int i = 0; i < regions.Count; i++)
        {
            var now = new byte[regions[i].Size];
            vm.Memory.Read(regions[i].GuestAddress, now);
            for (int page = 0; page < now.Length; page += 4096)
                if (!now.AsSpan(page, 4096).SequenceEqual(expected[i].AsSpan(page, 4096)))
                    changed++;
        }
        Assert.True(changed >= 8192, $"only {changed} pages changed after the stop: the guest did not run on");
        vm.Resume();
        vm.RequestStop(new HostStop("test over"));
        Assert.True(vm.Stopped.Wait(Wait));
    }
    [GeneratedRegex(@"guestkit: blk-seq state=0x([0-9a-f]+)")]
    private static partial Regex SeqState();

    [GeneratedRegex(@"guestkit: blk-seq (\d+)\r?$", RegexOptions.Multiline)]
    private static partial Regex SeqProgress();

    /// <summary>blk-seq's words in guest RAM: (magic, n being written, last done).</summary>
    private static (ulong Magic, ulong N, ulong Done) SeqInRam(VirtualMachine vm, ulong at)
    {
        var words = new byte[24];
        vm.Memory.Read(at, words);
        return (BinaryPrimitives.ReadUInt64LittleEndian(words), BinaryPrimitives.ReadUInt64LittleEndian(words.AsSpan(8)),
            BinaryPrimitives.ReadUInt64LittleEndian(words.AsSpan(16)));
    }

    /// <summary>blk-seq's sector 0 as the disk's device reads it: (magic, number, complement).</summary>
    private static (ulong Magic, ulong N, ulong Complement) SeqOnDisk(VirtualMachine vm)
    {
        var sector = new byte[512];
        ((VirtioBlock)vm.Disks[0].Device).Image.Read(0, sector);
        return (BinaryPrimitives.ReadUInt64LittleEndian(sector), BinaryPrimitives.ReadUInt64LittleEndian(sector.AsSpan(8)),
            BinaryPrimitives.ReadUInt64LittleEndian(sector.AsSpan(16)));
    }

    /// <summary>A blk-seq guest on a new 8 MiB qcow2 disk, running and past its 1000th number; the address of its words in RAM.</summary>
    private (VirtualMachine Vm, SerialCapture Serial, string Disk, ulong At) StartSeqGuest()
    {
        string disk = Path.Combine(_dir, "disk.qcow2");
        Qcow2Image.Create(disk, new Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        var spec = GuestKitRunner.Spec("blk-seq timeout=600") with { MemoryBytes = 64UL << 20, Disks = [new DiskSpec { Path = disk }] };
        var serial = new SerialCapture();
        var vm = VirtualMachine.Create(spec, serial.Write);
        vm.Start();
        Assert.True(SpinWait.SpinUntil(() => LastProgress(serial) >= 1000 || vm.Stopped.IsCompleted, Wait), $"blk-seq did not reach 1000: {serial.Text}");
        Assert.False(vm.Stopped.IsCompleted, $"the guest stopped: {serial.Text}");
        ulong at = ulong.Parse(SeqState().Match(serial.Text).Groups[1].Value, NumberStyles.HexNumber, CultureInfo.InvariantCulture);
        return (vm, serial, disk, at);
    }

    private static ulong LastProgress(SerialCapture serial) =>
        SeqProgress().Matches(serial.Text).Select(m => ulong.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)).DefaultIfEmpty(0UL).Max();

    /// <summary>
    /// The guest kit writes 1, 2, 3... to its disk without pause and keeps in RAM the number it is
    /// writing and the last one done. A checkpoint taken in the middle, restored, holds RAM and disk
    /// of one instant: the disk holds the number RAM says is being written, or the one before while
    /// that write had not completed; the parent went on past it on its new top image, the
    /// restored guest goes on from it, and every image is clean for qemu-img.
    /// </summary>
    [SkippableFact]
    public void ACheckpointHoldsMemoryAndDiskOfOneInstant()
    {
        Require();
        var (vm, serial, disk, at) = StartSeqGuest();
        using var _ = vm;

        string checkpoint = Path.Combine(_dir, "ckpt");
        var taken = VmCheckpoint.Take(vm, checkpoint, new CheckpointOptions { BytesPerSecond = 16 << 20 });
        output.WriteLine($"guest stopped {taken.StopSeconds * 1000:0.##} ms ({string.Join(", ", taken.StopSteps.Select(x => $"{x.Name} {x.Milliseconds} ms"))}); " +
                         $"checkpoint {taken.Seconds:0.###} s ({string.Join(", ", taken.Phases.Select(x => $"{x.Name} {x.Milliseconds} ms"))}); RAM: {taken.Memory}");
        string layer = Assert.IsType<string>(taken.Layers[0]);
        Assert.Equal(layer, vm.Spec.Disks[0].Path);
        Assert.Equal(Path.Combine(checkpoint, VmCheckpoint.DiskFileName(0)), taken.Disks[0]);
        Assert.True(taken.StopSeconds > 0 && taken.StopSteps.Count >= 4, $"stop {taken.StopSeconds} s: {string.Join(", ", taken.StopSteps)}");
        Assert.Equal(0, (int)(File.GetUnixFileMode(disk) & UnixFileMode.UserWrite));
        ulong progressAtCheckpoint = LastProgress(serial);

        // The parent goes on, on its new top image.
        Assert.True(SpinWait.SpinUntil(() => LastProgress(serial) >= progressAtCheckpoint + 2000 || vm.Stopped.IsCompleted, Wait),
            $"the parent did not go on after the checkpoint: {serial.Text}");
        Assert.False(vm.Stopped.IsCompleted, $"the parent stopped: {serial.Text}");

        // The checkpoint, restored (lazily: RAM comes in as it is touched) while the parent runs:
        // RAM and disk of one instant.
        var restoredSerial = new SerialCapture();
        using (var restored = VmSnapshot.Restore(checkpoint, restoredSerial.Write, new RestoreOptions { Memory = MemoryLoad.Lazy }))
        {
            var ram = SeqInRam(restored, at);
            var onDisk = SeqOnDisk(restored);
            string seen = $"RAM: n={ram.N} done={ram.Done}; disk: {onDisk.N}; the checkpoint took {taken.Seconds:0.###} s, stop {taken.StopSeconds * 1000:0.##} ms";
            Assert.True(ram.Magic == 0x5145534b47 && onDisk.Magic == 0x5145534b47 && onDisk.Complement == ~onDisk.N, seen);
            Assert.True(ram.N >= 1000 && (ram.Done == ram.N || ram.Done == ram.N - 1), seen);
            Assert.True(onDisk.N == ram.N || (onDisk.N == ram.N - 1 && ram.Done == ram.N - 1), $"RAM and disk are not of one instant: {seen}");
            var parentNow = SeqInRam(vm, at);
            Assert.True(parentNow.Done > ram.N + 1000, $"the parent is at {parentNow.Done}, not past the checkpoint: {seen}");

            restored.Start();
            ulong next = (ram.N / 1000 + 2) * 1000;
            Assert.True(SpinWait.SpinUntil(() => LastProgress(restoredSerial) >= next || restored.Stopped.IsCompleted, Wait),
                $"the restored guest did not go on to {next}: {restoredSerial.Text}");
            Assert.False(restored.Stopped.IsCompleted, $"the restored guest stopped: {restoredSerial.Text}");
            restored.RequestStop(new HostStop("test over"));
            Assert.True(restored.Stopped.Wait(Wait));
        }
        vm.RequestStop(new HostStop("test over"));
        Assert.True(vm.Stopped.Wait(Wait));
        vm.Dispose();
        foreach (var image in new[] { disk, layer, taken.Disks[0] })
        {
            var r = TestEnvironment.RunProcess("qemu-img", ["check", image], Wait);
            Assert.True(r.ExitCode == 0, $"qemu-img check {image}: {r.Stdout}{r.Stderr}");
        }
    }
    /// <summary>
    /// A checkpoint directory that cannot be written fails with an error naming it: one on a
    /// read-only file system before the guest is touched (its disk stays as it was, no layer left
    /// behind); one on a file system that fills while guest RAM is written out after the stop,
    /// leaving no checkpoint, while the VM runs on, on its new top image, and its chain stays
    /// whole (disk and RAM agree, qemu-img finds it clean).
    /// </summary>
    [SkippableFact]
    public void ACheckpointThatCannotBeWrittenFailsAndTheVmRunsOnAWholeChain()
    {
        Require();
        TestEnvironment.SkipIf(Libc.GetEuid() == 0 ? null : "file systems to fill and to make read-only (tmpfs) need root to mount");
        string readOnly = Path.Combine(_dir, "ro"), small = Path.Combine(_dir, "small");
        Directory.CreateDirectory(readOnly);
        Directory.CreateDirectory(small);
        Mount(readOnly, "ro,size=1m");
        try
        {
            Mount(small, "size=4m");
            try
            {
                var (vm, serial, disk, at) = StartSeqGuest();
                using var _ = vm;

                // Read-only: refused before the stop.
                string refused = Path.Combine(readOnly, "ckpt");
                var e = Assert.ThrowsAny<Exception>(() => VmCheckpoint.Take(vm, refused));
                Assert.True(e is IOException or UnauthorizedAccessException, e.ToString());
                Assert.Contains(refused, e.Message);
                Assert.Equal(disk, vm.Spec.Disks[0].Path);
                Assert.Equal(new[] { "disk.qcow2" }, Directory.GetFiles(_dir).Select(Path.GetFileName));

                // Full: 24 MiB of RAM the guest does not use, made not zero, do not fit in 4 MiB.
                var fill = new byte[24 << 20];
                new Random(13).NextBytes(fill);
                vm.Memory.Write(32UL << 20, fill);
                string full = Path.Combine(small, "ckpt");
                var f = Assert.Throws<IOException>(() => VmCheckpoint.Take(vm, full, new CheckpointOptions { BytesPerSecond = 64 << 20 }));
                Assert.Contains(full, f.Message);
                Assert.Contains($"errno {Errno.ENOSPC}", f.Message);
                Assert.False(Directory.Exists(full), $"the failed checkpoint left {string.Join(", ", Directory.Exists(full) ? Directory.GetFileSystemEntries(full) : [])}");
                string layer = vm.Spec.Disks[0].Path;
                Assert.NotEqual(disk, layer);
                Assert.True(File.Exists(layer));

                // The VM runs on, on its new top image.
                ulong before = LastProgress(serial);
                Assert.True(SpinWait.SpinUntil(() => LastProgress(serial) >= before + 2000 || vm.Stopped.IsCompleted, Wait),
                    $"the guest did not go on after the failed checkpoint: {serial.Text}");
                Assert.False(vm.Stopped.IsCompleted, $"the guest stopped: {serial.Text}");
                vm.Pause();
                var ram = SeqInRam(vm, at);
                var onDisk = SeqOnDisk(vm);
                Assert.True(onDisk.N == ram.N || (onDisk.N == ram.N - 1 && ram.Done == ram.N - 1), $"RAM n={ram.N} done={ram.Done}, disk {onDisk.N}");
                vm.Resume();
                vm.RequestStop(new HostStop("test over"));
                Assert.True(vm.Stopped.Wait(Wait));
                vm.Dispose();
                var r = TestEnvironment.RunProcess("qemu-img", ["check", layer], Wait);
                Assert.True(r.ExitCode == 0, $"qemu-img check {layer}: {r.Stdout}{r.Stderr}");
            }
            finally
            {
                TestEnvironment.RunProcess("umount", [small], Wait);
            }
        }
        finally
        {
            TestEnvironment.RunProcess("umount", [readOnly], Wait);
        }
    }

    /// <summary>
    /// Writes by a device after the stop do not reach the checkpoint: the guest keeps eight 64 KiB
    /// virtio-blk reads of random sectors in flight (a disk of random bytes), so the device writes
    /// other data into guest RAM all the time, and RAM is written out slowly (8 MiB/s for 64 MiB).
    /// The checkpoint's memory file equals RAM as it was at the stop, byte for byte; writes waited.
    /// </summary>
    [SkippableFact]
    public void WritesByADeviceDuringTheCheckpointDoNotReachIt()
    {
        Require();
        string disk = Path.Combine(_dir, "random.raw");
        var bytes = new byte[8 << 20];
        new Random(7).NextBytes(bytes);
        File.WriteAllBytes(disk, bytes);
        var spec = GuestKitRunner.Spec("blk-bench rw=randread bs=64K qd=8 time=600 timeout=60") with
        {
            MemoryBytes = 64UL << 20,
            Disks = [new DiskSpec { Path = disk, ReadOnly = true }],
        };
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(spec, serial.Write);
        vm.Start();
        var block = (VirtioBlock)vm.Disks[0].Device;
        Assert.True(SpinWait.SpinUntil(() => block.Stats.Reads > 200 || vm.Stopped.IsCompleted, Wait), $"the guest did not read: {serial.Text}");
        Assert.False(vm.Stopped.IsCompleted, $"the guest stopped: {serial.Text}");

        byte[][]? atStop = null;
        long readsAtStop = 0;
        string checkpoint = Path.Combine(_dir, "ckpt");
        var taken = VmCheckpoint.Take(vm, checkpoint, new CheckpointOptions { BytesPerSecond = 8 << 20 },
            pause: () =>
            {
                vm.Pause();
                readsAtStop = block.Stats.Reads;
                atStop = vm.Memory.Regions.Select(r =>
                {
                    var copy = new byte[r.Size];
                    vm.Memory.Read(r.GuestAddress, copy);
                    return copy;
                }).ToArray();
            });
        long readsDuring = block.Stats.Reads - readsAtStop;
        output.WriteLine($"{readsDuring} reads of 64 KiB while RAM was written out; {taken.Memory}");
        Assert.True(readsDuring > 50, $"only {readsDuring} device reads during the checkpoint: {taken.Memory}");
        Assert.True(taken.Memory.Faults > 0, $"no write waited for its page: {taken.Memory}");
        Assert.Null(taken.Layers[0]);                   // a read-only disk stays as it is
        Assert.Equal(disk, taken.Disks[0]);

        var state = SnapshotReader.Read(checkpoint);
        using var memory = File.OpenHandle(Path.Combine(checkpoint, "memory"));
        for (int i = 0; i < state.Regions.Count; i++)
        {
            var saved = new byte[state.Regions[i].Size];
            int n = RandomAccess.Read(memory, saved, (long)state.Regions[i].FileOffset);
            saved.AsSpan(n).Clear();                    // a tail of zero pages is a hole past the end
            int same = saved.AsSpan().CommonPrefixLength(atStop![i]);
            Assert.True(same == saved.Length,
                $"region {i}: the checkpoint differs from RAM at the stop at guest 0x{state.Regions[i].GuestAddress + (ulong)same:x}; {taken.Memory}");
        }
        vm.RequestStop(new HostStop("test over"));
        Assert.True(vm.Stopped.Wait(Wait));
    }

    /// <summary>
    /// Restores the checkpoint in <paramref name="directory"/> without starting it and checks that
    /// its RAM and disk are of one instant; returns the number blk-seq was writing then.
    /// </summary>
    private static ulong RestoredSeq(string directory, ulong at)
    {
        using var restored = VmSnapshot.Restore(directory, _ => { });
        var ram = SeqInRam(restored, at);
        var onDisk = SeqOnDisk(restored);
        Assert.True(ram.Magic == 0x5145534b47 && onDisk.Magic == 0x5145534b47 && onDisk.Complement == ~onDisk.N,
            $"{directory}: RAM n={ram.N} done={ram.Done}, disk {onDisk.N}");
        Assert.True(onDisk.N == ram.N || (onDisk.N == ram.N - 1 && ram.Done == ram.N - 1),
            $"{directory}: RAM and disk are not of one instant: RAM n={ram.N} done={ram.Done}, disk {onDisk.N}");
        return ram.N;
    }

    /// <summary>
    /// Three checkpoints of a guest writing its disk, one after another: the VM's disk becomes a
    /// chain of three layers, each checkpoint restores to its own instant. Deleting the middle one
    /// while the VM runs folds the layer it kept frozen into the next (what each remaining
    /// checkpoint and the VM see does not change); deleting the last one is refused while the VM
    /// writes to the layer it would fold into, and done once the VM stopped. qemu-img finds every
    /// image clean.
    /// </summary>
    [SkippableFact]
    public void ThreeCheckpointsInARowRestoreEachToItsInstantAndDeletingOneKeepsTheOthers()
    {
        Require();
        var (vm, serial, disk, at) = StartSeqGuest();
        using var _ = vm;
        var dirs = new List<string>();
        var layers = new List<string>();
        for (int k = 1; k <= 3; k++)
        {
            ulong before = LastProgress(serial);
            Assert.True(SpinWait.SpinUntil(() => LastProgress(serial) >= before + 1000 || vm.Stopped.IsCompleted, Wait), $"blk-seq stalled: {serial.Text}");
            Assert.False(vm.Stopped.IsCompleted, $"the guest stopped: {serial.Text}");
            string dir = Path.Combine(_dir, $"ckpt{k}");
            var taken = VmCheckpoint.Take(vm, dir);
            dirs.Add(dir);
            layers.Add(Assert.IsType<string>(taken.Layers[0]));
        }
        Assert.Equal(layers[2], vm.Spec.Disks[0].Path);
        var seqs = dirs.Select(d => RestoredSeq(d, at)).ToArray();
        Assert.True(seqs[0] < seqs[1] && seqs[1] < seqs[2], $"the checkpoints hold {string.Join(", ", seqs)}");

        // The middle one, while the VM runs on layer 3: layer 1 folds into layer 2.
        var folded = VmCheckpoint.Delete(dirs[1]);
        Assert.Equal([layers[0]], folded);
        Assert.False(File.Exists(layers[0]));
        Assert.False(Directory.Exists(dirs[1]));
        Assert.Equal(seqs[0], RestoredSeq(dirs[0], at));
        Assert.Equal(seqs[2], RestoredSeq(dirs[2], at));

        // The last one would fold layer 2 into layer 3, which the VM writes: refused, nothing changes.
        var refused = Assert.Throws<IOException>(() => VmCheckpoint.Delete(dirs[2]));
        Assert.Contains(layers[2], refused.Message);
        Assert.True(File.Exists(Path.Combine(dirs[2], "state")));
        ulong now = LastProgress(serial);
        Assert.True(SpinWait.SpinUntil(() => LastProgress(serial) >= now + 1000 || vm.Stopped.IsCompleted, Wait), $"the VM did not go on: {serial.Text}");
        vm.Pause();
        var last = SeqInRam(vm, at);
        vm.RequestStop(new HostStop("test over"));
        Assert.True(vm.Stopped.Wait(Wait));
        vm.Dispose();

        // Stopped, the VM's disk reads as it left it through the folded chain, and the last
        // checkpoint can go: layer 2 folds into layer 3.
        Assert.Equal(new[] { layers[1] }, VmCheckpoint.Delete(dirs[2]));
        using (var image = DiskImage.Open(layers[2], new ImageOpenOptions { ReadOnly = true }))
        {
            var sector = new byte[512];
            image.Read(0, sector);
            ulong n = BinaryPrimitives.ReadUInt64LittleEndian(sector.AsSpan(8));
            Assert.True(n == last.N || (n == last.N - 1 && last.Done == last.N - 1), $"the VM's disk holds {n}, its RAM n={last.N} done={last.Done}");
            Assert.Equal(disk, Path.GetFullPath(((Qcow2Image)image).Backing!.Path));
        }
        Assert.Equal(seqs[0], RestoredSeq(dirs[0], at));
        foreach (var image in new[] { disk, layers[2], Path.Combine(dirs[0], VmCheckpoint.DiskFileName(0)) })
        {
            var r = TestEnvironment.RunProcess("qemu-img", ["check", image], Wait);
            Assert.True(r.ExitCode == 0, $"qemu-img check {image}: {r.Stdout}{r.Stderr}");
        }
    }

    private static void Mount(string at, string options)
    {
        var r = TestEnvironment.RunProcess("mount", ["-t", "tmpfs", "-o", options, "tmpfs", at], Wait);
        Assert.True(r.ExitCode == 0, $"mount -t tmpfs -o {options} tmpfs {at}: {r.Stdout}{r.Stderr}");
    }
}
