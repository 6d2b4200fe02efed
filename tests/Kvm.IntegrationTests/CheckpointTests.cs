using Kvm.Hypervisor;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// Live checkpoints of guest RAM on KVM (issue 13): the guest is stopped only to write-protect its
/// RAM, runs on while the RAM is saved, and what is saved is RAM exactly as it was at the stop,
/// though the guest's vCPUs write it all the while through KVM. Needs /dev/kvm (the nested KVM host
/// on these machines) and userfaultfd write-protection of shared memory.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class CheckpointTests : IDisposable
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
}
