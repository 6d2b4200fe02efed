using Kvm.Devices.Manager;
using Kvm.Hypervisor;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>
/// <see cref="VmHandover.CheckChanges"/>: what a suspended VM may resume with (another image path,
/// another serial, disks added, kernel and command line, which a running guest no longer reads)
/// and what it may not (anything the guest has seen), each refusal naming the field.
/// </summary>
public class VmHandoverTests
{
    private static readonly VmSpec Saved = new()
    {
        Kernel = "/k", Cmdline = "a", MemoryBytes = 256UL << 20, Cpus = 2, DebugExit = true,
        Disks = [new DiskSpec { Path = "/d0.qcow2", Serial = "s0" }, new DiskSpec { Path = "/d1.raw", ReadOnly = true, Queues = 2 }],
    };

    [Fact]
    public void TheSameSpecChangesNothing() => Assert.Empty(VmHandover.CheckChanges(Saved, Saved));

    [Fact]
    public void AnotherImagePathASerialAndAddedDisksAreAllowed_TheAddedAreNew()
    {
        var changed = Saved with
        {
            Kernel = "/other-kernel",
            Cmdline = "b",
            Disks = [Saved.Disks[0] with { Path = "/moved.qcow2", Serial = "s9" }, Saved.Disks[1] with { Path = "/copy.qcow2" },
                new DiskSpec { Path = "/new.qcow2" }, new DiskSpec { Path = "/new2.qcow2", Queues = 4 }],
        };
        Assert.Equal(["virtio-blk2", "virtio-blk3"], VmHandover.CheckChanges(Saved, changed).Order());
    }

    public static TheoryData<string, string> Refusals => new()
    {
        { "memory", "memoryBytes" },
        { "cpus", "cpus" },
        { "hugepages", "hugePages" },
        { "debugexit", "debugExit" },
        { "readonly", "disk 1's readOnly" },
        { "queues", "disk 0's queues" },
        { "removed", "a disk the guest uses cannot be removed" },
    };

    [Theory]
    [MemberData(nameof(Refusals))]
    public void AChangeTheGuestHasSeenIsRefusedNamingIt(string change, string named)
    {
        var changed = change switch
        {
            "memory" => Saved with { MemoryBytes = 512UL << 20 },
            "cpus" => Saved with { Cpus = 1 },
            "hugepages" => Saved with { HugePages = HugePageMode.Transparent },
            "debugexit" => Saved with { DebugExit = false },
            "readonly" => Saved with { Disks = [Saved.Disks[0], Saved.Disks[1] with { ReadOnly = false }] },
            "queues" => Saved with { Disks = [Saved.Disks[0] with { Queues = 2 }, Saved.Disks[1]] },
            "removed" => Saved with { Disks = [Saved.Disks[0]] },
            _ => throw new ArgumentException(change),
        };
        var e = Assert.Throws<DeviceStateException>(() => VmHandover.CheckChanges(Saved, changed));
        Assert.Contains(named, e.Message);
    }
}
