using Kvm.Vmm.Snapshot;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>Names of the layers a live checkpoint adds to a VM's disks (the checkpoint itself runs on KVM: Kvm.IntegrationTests.CheckpointTests).</summary>
public sealed class VmCheckpointTests
{
    [Theory]
    [InlineData("/var/lib/vm/disk.qcow2", "0123abcd", "/var/lib/vm/disk.ckpt-0123abcd.qcow2")]
    [InlineData("/var/lib/vm/disk.raw", "0123abcd", "/var/lib/vm/disk.ckpt-0123abcd.qcow2")]
    [InlineData("/var/lib/vm/disk", "0123abcd", "/var/lib/vm/disk.ckpt-0123abcd.qcow2")]
    // A layer's own layer replaces the checkpoint part instead of piling names up.
    [InlineData("/var/lib/vm/disk.ckpt-0123abcd.qcow2", "89abcdef", "/var/lib/vm/disk.ckpt-89abcdef.qcow2")]
    // Only the project's own suffix goes: a name that merely looks alike stays.
    [InlineData("/d/web.ckpt-final.qcow2", "89abcdef", "/d/web.ckpt-final.ckpt-89abcdef.qcow2")]
    public void ALayerLivesBesideItsParentNamedAfterItAndTheCheckpoint(string parent, string tag, string expected) =>
        Assert.Equal(expected, VmCheckpoint.LayerPath(parent, tag));
}
