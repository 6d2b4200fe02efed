using System.Diagnostics;
using Kvm.Cluster.Supervision;
using Kvm.Vmm.Machine;

namespace Kvm.Cluster.Tests;

/// <summary>
/// What kvmd decides for save, start from a snapshot and upgrade in place without a VM: whether a
/// snapshot's machine fits a VM's spec, and how the end of a kvm-vmm that handed its VM over counts
/// (a real process stands in for kvm-vmm; no /dev/kvm needed).
/// </summary>
public sealed class KvmdSnapshotLogicTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvmd-snap-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static VmSpec Spec(params DiskSpec[] disks) => new()
    {
        Kernel = "/k/guestkit.elf",
        Cmdline = "tick",
        MemoryBytes = 64UL << 20,
        Cpus = 2,
        Disks = disks,
    };

    [Fact]
    public void A_snapshot_of_the_same_machine_matches_whatever_its_kernel_and_command_line()
    {
        var spec = Spec(new DiskSpec { Path = "/d/a.qcow2", Serial = "a" });
        Assert.Empty(Kvmd.SnapshotMismatches(spec, spec with { Kernel = "/other/kernel", Cmdline = "count", DebugExit = true }));
        // The same image named another way is the same image.
        Assert.Empty(Kvmd.SnapshotMismatches(spec, spec with { Disks = [new DiskSpec { Path = "/d/../d/a.qcow2", Serial = "a" }] }));
    }

    [Fact]
    public void Each_difference_in_memory_vcpus_and_disks_is_named()
    {
        var spec = Spec(new DiskSpec { Path = "/d/a.qcow2", Serial = "a" }, new DiskSpec { Path = "/d/b.qcow2" });
        var saved = spec with
        {
            MemoryBytes = 128UL << 20,
            Cpus = 1,
            Disks = [new DiskSpec { Path = "/d/other.qcow2", Serial = "x", ReadOnly = true, Queues = 2 }],
        };
        var problems = Kvmd.SnapshotMismatches(spec, saved);
        Assert.Contains(problems, p => p.StartsWith("memory: the VM has 64 MiB, the snapshot 128 MiB", StringComparison.Ordinal));
        Assert.Contains("vCPUs: the VM has 2, the snapshot 1", problems);
        Assert.Contains("disks: the VM has 2, the snapshot 1", problems);
        Assert.Contains("disk 0: the VM's is /d/a.qcow2, the snapshot's /d/other.qcow2", problems);
        Assert.Contains("disk 0: read-only in the snapshot only", problems);
        Assert.Contains("disk 0: the VM's has 1 queue(s), the snapshot's 2", problems);
        Assert.Contains("disk 0: serial 'a' in the VM's spec, 'x' in the snapshot", problems);
        Assert.Equal(7, problems.Count);
    }

    [Fact]
    public void A_fork_may_run_on_other_disk_images_and_macs_but_not_on_another_machine()
    {
        var nic = new NicSpec { Mac = Kvm.Network.MacAddress.Random(), Uplinks = [new UplinkSpec { Tap = "t0" }] };
        var saved = Spec(new DiskSpec { Path = "/d/a.qcow2", Serial = "a" }) with { Nics = [nic] };
        var fork = saved with
        {
            Disks = [new DiskSpec { Path = "/f/disk0.qcow2", Serial = "a" }],
            Nics = [nic with { Mac = Kvm.Network.MacAddress.Random(), Uplinks = [new UplinkSpec()] }],
        };
        Assert.Empty(Kvm.Vmm.Snapshot.VmFork.Mismatches(fork, saved));
        Assert.Contains("disk 0: the VM's is /f/disk0.qcow2, the snapshot's /d/a.qcow2", Kvmd.SnapshotMismatches(fork, saved));
        var problems = Kvm.Vmm.Snapshot.VmFork.Mismatches(fork with { Nics = [nic with { Queues = 2 }, nic] }, saved);
        Assert.Equal(["NICs: the VM has 2, the snapshot 1", "NIC 0: the VM's has 2 queue pair(s), the snapshot's 1"], problems);
    }

    [Fact]
    public void A_process_that_handed_its_vm_over_and_exited_0_without_a_record_of_its_own_gave_it_away()
    {
        var unrecorded = new VmExit(0, "kvm-vmm exited with status 0 without recording why", true);
        var judged = VmProcess.Judge(unrecorded, 4242, ownExitRecord: false);
        Assert.Equal(4242, judged.HandedOverTo);
        Assert.False(judged.Failed);
        Assert.Contains("pid 4242", judged.Reason, StringComparison.Ordinal);
        // Adopted (no status known): the same.
        Assert.Equal(4242, VmProcess.Judge(unrecorded with { Status = null }, 4242, ownExitRecord: false).HandedOverTo);
    }

    [Fact]
    public void Any_other_end_is_the_end_it_reported()
    {
        var crashed = new VmExit(137, "kvm-vmm was killed by signal 9", true);
        Assert.Same(crashed, VmProcess.Judge(crashed, 4242, ownExitRecord: false));
        var recorded = new VmExit(0, "VM stopped: stopped by request", false);
        Assert.Same(recorded, VmProcess.Judge(recorded, 4242, ownExitRecord: true));
        var plain = new VmExit(0, "kvm-vmm exited with status 0 without recording why", true);
        Assert.Same(plain, VmProcess.Judge(plain, null, ownExitRecord: false));
    }

    /// <summary>A child that exits 0 on SIGTERM, as a kvm-vmm exits once it has handed its VM over.</summary>
    private VmProcess StartChild()
    {
        var files = new VmFiles("vm", Path.Combine(_dir, "run"), Path.Combine(_dir, "state"));
        Directory.CreateDirectory(files.RunDirectory);
        var start = new ProcessStartInfo("/bin/sh") { UseShellExecute = false, RedirectStandardInput = true };
        start.ArgumentList.Add("-c");
        start.ArgumentList.Add("trap 'exit 0' TERM; while :; do sleep 0.05; done");
        var process = VmProcess.Start(files, start);
        Thread.Sleep(200); // the trap is set
        return process;
    }

    [Fact]
    public async Task An_exit_during_a_hand_over_waits_for_its_outcome_and_then_counts_as_handed_over()
    {
        using var process = StartChild();
        process.BeginHandover();
        Assert.True(process.Signal(15));
        // It has exited, but how that counts waits for the hand-over's outcome.
        await Task.Delay(500);
        Assert.False(process.Exited.IsCompleted);
        process.EndHandover(4242);
        var exit = await process.Exited.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(4242, exit.HandedOverTo);
        Assert.False(exit.Failed);
        Assert.Equal(4242, process.HandedOverTo);
    }

    [Fact]
    public async Task An_exit_during_a_hand_over_that_failed_is_an_end_as_any_other()
    {
        using var process = StartChild();
        process.BeginHandover();
        Assert.True(process.Signal(15));
        process.EndHandover(null);
        var exit = await process.Exited.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Null(exit.HandedOverTo);
        Assert.True(exit.Failed);
        Assert.Null(process.HandedOverTo);
    }

    [Fact]
    public async Task An_exit_after_a_hand_over_that_succeeded_counts_as_handed_over()
    {
        using var process = StartChild();
        process.BeginHandover();
        process.EndHandover(4242);
        Assert.True(process.Signal(15));
        var exit = await process.Exited.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(4242, exit.HandedOverTo);
    }
}
