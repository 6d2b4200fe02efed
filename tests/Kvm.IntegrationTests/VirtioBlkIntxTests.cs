using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// The guest kit's virtio-blk driver with irq=intx: MSI-X off, completions through the device's
/// legacy INTx line, which this VMM wires to IOAPIC pin 16 + slot % 8 (level-triggered) and names
/// in the Interrupt Line register. The kit routes that pin to vector 0x50 and only takes used
/// entries after the interrupt was counted, so a lost or misrouted interrupt fails the run
/// ("interrupt lost"), and one that is never deasserted never lets the guest back to CPL3.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VirtioBlkIntxTests : BlkTestBase
{
    private static void AssertIntxGsi((VmStopReason Reason, SerialCapture Serial) run, int disk, int gsi) =>
        Assert.Contains($"guestkit: blk-verify disk={disk} intx gsi={gsi} vector=0x50", run.Serial.Lines);

    // 32 KiB requests, 8 in flight per queue, over the shared ranges.
    private const string IntxRanges = Ranges + " io=32K qd=8";

    [SkippableTheory]
    [InlineData("raw", 1)]
    [InlineData("qcow2", 1)]
    [InlineData("qcow2", 2)]    // two queues share the one line
    public void IntxCompletionsWriteThePatternAndASecondVmReadsItBack(string format, int queues)
    {
        Require();
        string image = CreateImage($"disk.{format}", format, "32M");
        var disk = new DiskSpec { Path = image, Queues = queues };

        // The only disk sits in slot 1: GSI 17.
        var write = RunOurs($"blk-verify {IntxRanges} queues={queues} seed=13 irq=intx", disk);
        AssertGuestOk(write, "guestkit: blk-verify ok disk=0 bytes=3145728");
        AssertIntxGsi(write, 0, 17);

        if (format == "qcow2")
            AssertCheckClean(image);
        string reference = P("reference.raw");
        BlkPattern.CreateZeroRaw(reference, 32L << 20);
        WriteReferenceRanges(reference, 13);
        AssertQemuImgSame(image, reference);

        var read = RunOurs($"blk-verify {IntxRanges} queues={queues} seed=13 write=0 irq=intx", disk);
        AssertGuestOk(read, "guestkit: blk-verify ok disk=0 bytes=3145728");
        AssertQemuImgSame(image, reference);
    }

    [SkippableFact]
    public void EachSlotInterruptsOnItsOwnGsi()
    {
        // Disk 0 is in slot 1 (GSI 17), disk 1 in slot 2 (GSI 18). The kit routes only the pin
        // the disk under test names, so completions arrive only if its INTx is really on that pin.
        Require();
        string a = CreateImage("a.raw", "raw", "16M");
        string b = CreateImage("b.qcow2", "qcow2", "32M");
        var disks = new[] { new DiskSpec { Path = a, Serial = "first" }, new DiskSpec { Path = b, Serial = "second", Queues = 2 } };

        var second = RunOurs("blk-verify disk=1 start=64K size=2M count=2 stride=8M io=16K queues=2 qd=8 seed=31 irq=intx", disks);
        AssertGuestOk(second, "guestkit: blk-verify ok disk=1 bytes=4194304");
        AssertIntxGsi(second, 1, 18);
        Assert.Contains(second.Serial.Lines, l => l.StartsWith("guestkit: blk-verify disk=1 id=second capacity=65536 queues=2 ", StringComparison.Ordinal));

        var first = RunOurs("blk-verify disk=0 size=1M qd=4 seed=32 irq=intx", disks);
        AssertGuestOk(first, "guestkit: blk-verify ok disk=0 bytes=1048576");
        AssertIntxGsi(first, 0, 17);

        // Each disk holds only its own pattern.
        AssertCheckClean(b);
        string rb = P("rb.raw");
        BlkPattern.CreateZeroRaw(rb, 32L << 20);
        BlkPattern.WriteRange(rb, 31, 64UL << 10, 2UL << 20);
        BlkPattern.WriteRange(rb, 31, (64UL << 10) + (8UL << 20), 2UL << 20);
        AssertQemuImgSame(b, rb);
        string ra = P("ra.raw");
        BlkPattern.CreateZeroRaw(ra, 16L << 20);
        BlkPattern.WriteRange(ra, 32, 0, 1UL << 20);
        AssertQemuImgSame(a, ra);
    }

    [SkippableFact]
    public void UnderQemuQ35TheChipsetRoutedLineIsAClearUsageError()
    {
        // q35's SeaBIOS routes INTx through the ICH9 PIRQ links and puts an 8259 IRQ in the
        // Interrupt Line register: irq=intx does not guess the chipset's routing, it exits 2.
        Require();
        TestEnvironment.RequireProgram("qemu-system-x86_64", "qemu-system-x86");
        string image = CreateImage("q.raw", "raw", "16M");
        var qemu = VirtioBlkTests.RunQemu("blk-verify size=64K irq=intx", (image, "raw", ""));
        Assert.True(qemu.ExitCode == 2 * 2 + 1, $"QEMU exited {qemu.ExitCode} (the guest's status is (code-1)/2); console:\n{qemu.Stdout}{qemu.Stderr}");
        Assert.Contains("guestkit: error: blk-verify disk=0: irq=intx: Interrupt Line reads ", qemu.Stdout);
        Assert.Contains("not an IOAPIC pin (GSI) in 16..23", qemu.Stdout);
    }
}
