using Kvm.Tests.Shared;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// Persistent dirty bitmaps under a running VM: the guest kit writes known ranges through
/// virtio-blk, and qemu (qemu-nbd exporting the bitmap, read by qemu-img map) must then see
/// exactly the granules those writes touched in each enabled bitmap, none in a disabled one, and
/// every bitmap saved (not in use) once the VM has ended.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VirtioBlkBitmapTests : BlkTestBase
{
    private const ulong DiskSize = 24UL << 20;

    // Five 5 KiB ranges 3 MiB + 12 KiB apart from 12 KiB: each starts and ends inside a 4 KiB
    // granule, and every one crosses a granule boundary; 4 KiB requests, two queues, four in flight.
    private const ulong Start = 12 << 10, Size = 5 << 10, Stride = (3 << 20) + (12 << 10);
    private const int Count = 5;
    private static readonly string Workload = $"blk-verify start={Start} size={Size} count={Count} stride={Stride} io=4K queues=2 qd=4 seed=21";

    private static IEnumerable<(ulong, ulong)> Writes() =>
        Enumerable.Range(0, Count).Select(i => (Start + (ulong)i * Stride, Size));

    [SkippableFact]
    public void GuestWritesSetExactlyTheirGranulesInEachEnabledBitmap()
    {
        Require();
        QemuDirtyBitmap.Require();
        string image = CreateImage("disk.qcow2", "qcow2", DiskSize.ToString(System.Globalization.CultureInfo.InvariantCulture));
        foreach (var args in new[]
                 {
                     new[] { "bitmap", "--add", "-g", "4096", image, "fine" },
                     ["bitmap", "--add", "-g", "1048576", image, "coarse"],
                     ["bitmap", "--add", "--disable", image, "off"],
                 })
        {
            var r = QemuImg(args);
            Assert.True(r.ExitCode == 0, r.Stderr);
        }
        var disk = new DiskSpec { Path = image, Queues = 2 };

        var write = RunOurs(Workload, disk);
        AssertGuestOk(write, $"guestkit: blk-verify ok disk=0 bytes={Count * (int)Size}");

        AssertCheckClean(image);
        var info = QemuImg("info", "--output=json", image);
        Assert.DoesNotContain("in-use", info.Stdout, StringComparison.Ordinal);
        Assert.Equal(QemuDirtyBitmap.Expected(Writes(), 4096, DiskSize), QemuDirtyBitmap.DirtyRanges(image, "fine"));
        Assert.Equal(QemuDirtyBitmap.Expected(Writes(), 1 << 20, DiskSize), QemuDirtyBitmap.DirtyRanges(image, "coarse"));
        Assert.Empty(QemuDirtyBitmap.DirtyRanges(image, "off"));

        // A VM that only reads changes nothing in the file: no bitmap is marked or rewritten.
        string before = Sha256(image);
        var read = RunOurs(Workload + " write=0", disk);
        AssertGuestOk(read, $"guestkit: blk-verify ok disk=0 bytes={Count * (int)Size}");
        Assert.Equal(before, Sha256(image));
    }
}
