using System.Text.Json;
using Kvm.Cluster;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>Forks through kvmd ('vmctl fork NAME --count N', 'vmctl fork NAME --from DIR'), in KvmdSnapshotTests' setting.</summary>
public sealed partial class KvmdSnapshotTests
{
    /// <summary>
    /// 'vmctl fork NAME --count 2' on a running VM (the guest kit's tick counter on a qcow2 disk):
    /// kvmd checkpoints it (it goes on counting) and makes VMs NAME-1 and NAME-2, running, each
    /// counting on from the checkpoint's instant (no new boot), with a generation id of its own, in
    /// the inventory like any VM: its spec names its own disk, a qcow2 child of the checkpoint's,
    /// which it reserves exclusively while the checkpoint's is shared; vm.forked is recorded. A
    /// second fork takes the next free number; 'vmctl fork X --from DIR' forks a snapshot; forks
    /// stop by name; bad requests are refused with their reason.
    /// </summary>
    [SkippableFact]
    public void ForksThroughKvmdAreVmsOfTheirOwnThatCarryOnFromTheCheckpoint()
    {
        Require();
        _kvmd.Start();
        string disk = P("fk.qcow2");
        Kvm.Storage.Qcow2.Qcow2Image.Create(disk, new Kvm.Storage.Qcow2.Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        VmctlOk("create", "fk", "--kernel", TestEnvironment.GuestKit, "--cmdline", "tick period=50", "--debug-exit", "--cpus", "2",
            "--memory", "64M", "--disk", disk);
        Refused("does not run on this host", ["fork", "fk"]);
        Refused("is not a VM name", ["fork", P("somewhere")], usage: true);
        Refused("--count 0", ["fork", "fk", "--count", "0"], usage: true);
        VmctlOk("start", "fk");

        VmForked forked;
        int atFork;
        using (var parent = Console("fk"))
        {
            Assert.True(parent.WaitForTick(20), parent.Text);
            forked = JsonSerializer.Deserialize(VmctlOk("fork", "fk", "--count", "2", "--json"), KvmdJson.Default.VmForked)!;
            atFork = Ticks(parent.Text).Max();
            Assert.True(parent.WaitForTick(atFork + 20), $"the parent did not go on after the fork: {parent.Text}");
        }
        var checkpoint = Assert.IsType<Kvm.Control.CheckpointResult>(forked.Checkpoint);
        Assert.Equal(checkpoint.Directory, forked.Template);
        string templateDisk = checkpoint.Disks[0];
        Assert.Equal(["fk-1", "fk-2"], forked.Forks.Select(f => f.Vm.Name));
        Assert.Equal(2, forked.Forks.Select(f => f.GenerationId).Distinct().Count());
        var events = new Dictionary<string, List<EventInfo>>();
        foreach (var fork in forked.Forks)
        {
            string name = fork.Vm.Name;
            Assert.Equal("running", fork.Vm.ActualState);
            Assert.NotNull(fork.GenerationId);
            string own = Assert.Single(fork.Disks);
            Assert.NotEqual(templateDisk, own);
            var shown = Show(name);
            Assert.Equal(own, shown.Spec.GetProperty("disks")[0].GetProperty("path").GetString());
            Assert.Equal(fork.GenerationId, shown.Status?.GenerationId);
            var mine = DiskAt(own);
            Assert.Equal(templateDisk, mine.Backing);
            Assert.Equal(("exclusive", name), Assert.Single(mine.Reservations) is var r ? (r.Mode, r.Vm) : default);
            Assert.Contains(DiskAt(templateDisk).Reservations, x => x.Mode == "shared" && x.Vm == name);
            using var console = Console(name);
            Assert.True(console.WaitForTick(atFork + 10), $"{name} did not count on: {console.Text}");
            var ticks = Ticks(console.Text);
            Assert.True(ticks.Min() > 15, $"{name} counted from {ticks.Min()}, the checkpoint was after tick 20: a new boot?\n{console.Text}");
            events[name] = Events(name);
            Assert.Contains(events[name], e => e.Kind == "vm.forked" && e.Data.GetProperty("template").GetString() == forked.Template
                                               && e.Data.GetProperty("parent").GetString() == "fk");
        }
        Assert.Equal("running", Show("fk").Vm.ActualState);

        // The next fork takes the next free number; a snapshot forks with --from.
        var third = JsonSerializer.Deserialize(VmctlOk("fork", "fk", "--json"), KvmdJson.Default.VmForked)!;
        Assert.Equal("fk-3", Assert.Single(third.Forks).Vm.Name);
        var fromDir = JsonSerializer.Deserialize(VmctlOk("fork", "copy", "--from", forked.Template, "--json"), KvmdJson.Default.VmForked)!;
        Assert.Null(fromDir.Checkpoint);
        var copy = Assert.Single(fromDir.Forks);
        Assert.Equal("copy-1", copy.Vm.Name);
        using (var console = Console("copy-1"))
        {
            Assert.True(console.WaitForTick(atFork + 5), console.Text);
            Assert.True(Ticks(console.Text).Min() > 15, console.Text);
        }
        Refused("cannot fork the snapshot", ["fork", "other", "--from", P("nothing")]);

        foreach (var name in new[] { "fk-1", "fk-2", "fk-3", "copy-1", "fk" })
        {
            VmctlOk("stop", name, "--force");
            Assert.Equal("stopped", Show(name).Vm.ActualState);
        }
        foreach (var fork in forked.Forks)
        {
            var check = TestEnvironment.RunProcess("qemu-img", ["check", fork.Disks[0]], Timeout);
            Assert.True(check.ExitCode == 0, $"qemu-img check {fork.Disks[0]}: {check.Stdout}{check.Stderr}");
        }
    }
}
