using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// The guest kit's virtio-blk driver against this VMM's virtio-blk, with qemu-img and QEMU's own
/// virtio-blk-pci as the judges.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VirtioBlkTests : BlkTestBase
{
    [SkippableTheory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public void GuestPatternLandsInTheImageAndASecondVmReadsItBack(string format)
    {
        Require();
        string image = CreateImage($"disk.{format}", format);
        var write = RunOurs($"blk-verify {Ranges} seed=7", new DiskSpec { Path = image });
        AssertGuestOk(write, "guestkit: blk-verify ok disk=0");

        if (format == "qcow2")
            AssertCheckClean(image);
        string reference = P("reference.raw");
        BlkPattern.CreateZeroRaw(reference, 64L << 20);
        WriteReferenceRanges(reference, 7);
        AssertQemuImgSame(image, reference);

        var read = RunOurs($"blk-verify {Ranges} seed=7 write=0", new DiskSpec { Path = image });
        AssertGuestOk(read, "guestkit: blk-verify ok disk=0");
        AssertQemuImgSame(image, reference);
    }

    [SkippableFact]
    public void NotificationsArriveThroughIoeventfdsNotVcpuExits()
    {
        Require();
        string image = CreateImage("disk.raw", "raw", "16M");
        var serial = new SerialCapture();
        var spec = GuestKitRunner.Spec("blk-verify size=2M io=4K qd=1 queues=2 irq=1") with
        {
            Disks = [new DiskSpec { Path = image, Queues = 2 }],
        };
        using var vm = VirtualMachine.Create(spec, serial.Write);
        using var cancel = new CancellationTokenSource(Timeout);
        var reason = vm.Run(cancel.Token);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"guest ended with {reason.Describe()}; console:\n{serial.Text}");
        // 1024 requests, each after its own notification check: none reached a vCPU thread.
        Assert.Equal(0, vm.Disks[0].NotificationsByExit);
    }

    [SkippableFact]
    public void AWritableImageBelongsToOneVmAtATime()
    {
        Require();
        string image = CreateImage("disk.qcow2", "qcow2", "16M");
        var serial = new SerialCapture();

        // The same image twice in one VM.
        var twice = Assert.Throws<ArgumentException>(() => VirtualMachine.Create(
            GuestKitRunner.Spec("hello") with { Disks = [new DiskSpec { Path = image }, new DiskSpec { Path = image }] }, serial.Write));
        Assert.Contains($"disk '{image}'", twice.Message);
        Assert.Contains("in use", twice.Message);

        using (var first = VirtualMachine.Create(GuestKitRunner.Spec("hello") with { Disks = [new DiskSpec { Path = image }] }, serial.Write))
        {
            // A second VM can neither write it nor read it while the first one writes.
            foreach (var readOnly in new[] { false, true })
            {
                var e = Assert.Throws<ArgumentException>(() => VirtualMachine.Create(
                    GuestKitRunner.Spec("hello") with { Disks = [new DiskSpec { Path = image, ReadOnly = readOnly }] }, serial.Write));
                Assert.Contains("in use", e.Message);
            }
            // Nor can it take the image as the backing file of a child it writes.
            string child = CreateImage("child.qcow2", "qcow2", backing: "disk.qcow2");
            Assert.Throws<ArgumentException>(() => VirtualMachine.Create(
                GuestKitRunner.Spec("hello") with { Disks = [new DiskSpec { Path = child }] }, serial.Write));
        }

        // Once the first VM is gone, the image is free again; read-only users share it.
        var ro = new DiskSpec { Path = image, ReadOnly = true };
        using (VirtualMachine.Create(GuestKitRunner.Spec("hello") with { Disks = [ro] }, serial.Write))
        using (VirtualMachine.Create(GuestKitRunner.Spec("hello") with { Disks = [ro, ro] }, serial.Write))
        {
        }
        AssertGuestOk(RunOurs("blk-verify size=64K", new DiskSpec { Path = image }), "guestkit: blk-verify ok");
    }

    [SkippableFact]
    public void AWrongPatternIsCaughtByTheGuest()
    {
        // The verifier itself must be able to fail: reading seed 7's data as seed 8 is a mismatch.
        Require();
        string image = CreateImage("disk.raw", "raw", "16M");
        AssertGuestOk(RunOurs("blk-verify size=64K seed=7", new DiskSpec { Path = image }), "guestkit: blk-verify ok");
        var wrong = RunOurs("blk-verify size=64K seed=8 write=0", new DiskSpec { Path = image });
        Assert.Equal(new DebugExitStop(3), wrong.Reason);
        Assert.Contains(wrong.Serial.Lines, l => l.StartsWith("guestkit: error: blk-verify mismatch disk=0 lba=0", StringComparison.Ordinal));
    }

    [SkippableFact]
    public void SerialIsWhatTheGuestReadsAsTheId()
    {
        Require();
        string image = CreateImage("disk.raw", "raw", "16M");
        var run = RunOurs("blk-verify size=4K", new DiskSpec { Path = image, Serial = "kvm-disk-0042" });
        AssertGuestOk(run, "guestkit: blk-verify ok");
        Assert.Contains(run.Serial.Lines, l => l.StartsWith("guestkit: blk-verify disk=0 id=kvm-disk-0042 capacity=32768 ", StringComparison.Ordinal));
    }

    [SkippableFact]
    public void ReadOnlyDiskRefusesWritesAndStaysUnchanged()
    {
        Require();
        string image = CreateImage("disk.qcow2", "qcow2", "16M");
        AssertGuestOk(RunOurs("blk-verify size=256K seed=3", new DiskSpec { Path = image }), "guestkit: blk-verify ok");
        string before = Sha256(image);

        var run = RunOurs("blk-verify size=256K seed=3 expect-ro=1", new DiskSpec { Path = image, ReadOnly = true });
        AssertGuestOk(run, "guestkit: blk-verify ok");
        Assert.Equal(before, Sha256(image));
    }

    [SkippableFact]
    public void BackingChainDiskLeavesItsParentUntouched()
    {
        Require();
        string parent = CreateImage("parent.qcow2", "qcow2", "64M");
        AssertGuestOk(RunOurs($"blk-verify {Ranges} seed=1", new DiskSpec { Path = parent }), "guestkit: blk-verify ok");
        string parentHash = Sha256(parent);
        string child = CreateImage("child.qcow2", "qcow2", backing: "parent.qcow2");

        // Overwrite half of the first range in the child (it straddles a cluster the parent holds).
        AssertGuestOk(RunOurs("blk-verify start=704K size=512K seed=2", new DiskSpec { Path = child }), "guestkit: blk-verify ok");
        Assert.Equal(parentHash, Sha256(parent));
        AssertCheckClean(child);
        AssertCheckClean(parent);

        string reference = P("reference.raw");
        BlkPattern.CreateZeroRaw(reference, 64L << 20);
        WriteReferenceRanges(reference, 1);
        BlkPattern.WriteRange(reference, 2, 704UL << 10, 512UL << 10);
        AssertQemuImgSame(child, reference);
    }

    [SkippableFact]
    public void MultiQueueRequestsInFlightOnEveryQueueAreCorrect()
    {
        Require();
        string image = CreateImage("disk.qcow2", "qcow2", "64M");
        var run = RunOurs("blk-verify start=0 size=4M count=4 stride=8M io=16K queues=4 qd=16 seed=11",
            new DiskSpec { Path = image, Queues = 4 });
        AssertGuestOk(run, "guestkit: blk-verify ok disk=0 bytes=16777216");
        Assert.Contains(run.Serial.Lines, l => l.Contains(" queues=4 ", StringComparison.Ordinal));
        AssertCheckClean(image);

        string reference = P("reference.raw");
        BlkPattern.CreateZeroRaw(reference, 64L << 20);
        for (int i = 0; i < 4; i++)
            BlkPattern.WriteRange(reference, 11, (ulong)i * (8UL << 20), 4UL << 20);
        AssertQemuImgSame(image, reference);
    }

    [SkippableTheory]
    [InlineData("irq=1")]
    [InlineData("irq=1 event-idx=0")]
    [InlineData("irq=0 event-idx=0 indirect=0")]
    [InlineData("irq=1 indirect=0 queues=2 qd=8")]
    public void InterruptAndRingFeatureVariantsAllWork(string options)
    {
        Require();
        string image = CreateImage("disk.raw", "raw", "32M");
        var run = RunOurs($"blk-verify start=0 size=2M count=2 stride=4M io=32K seed=5 {options}",
            new DiskSpec { Path = image, Queues = 2 });
        AssertGuestOk(run, "guestkit: blk-verify ok disk=0 bytes=4194304");
    }

    [SkippableFact]
    public void SeveralDisksAreSeparateDevices()
    {
        Require();
        string a = CreateImage("a.raw", "raw", "16M");
        string b = CreateImage("b.qcow2", "qcow2", "32M");
        var disks = new[] { new DiskSpec { Path = a, Serial = "first" }, new DiskSpec { Path = b, Serial = "second" } };
        AssertGuestOk(RunOurs("blk-verify disk=0 size=1M seed=21", disks), "guestkit: blk-verify ok disk=0");
        var second = RunOurs("blk-verify disk=1 size=1M seed=22", disks);
        AssertGuestOk(second, "guestkit: blk-verify ok disk=1");
        Assert.Contains(second.Serial.Lines, l => l.StartsWith("guestkit: blk-verify disk=1 id=second capacity=65536 ", StringComparison.Ordinal));

        // Each disk holds only its own pattern.
        string ra = P("ra.raw"), rb = P("rb.raw");
        BlkPattern.CreateZeroRaw(ra, 16L << 20);
        BlkPattern.WriteRange(ra, 21, 0, 1UL << 20);
        BlkPattern.CreateZeroRaw(rb, 32L << 20);
        BlkPattern.WriteRange(rb, 22, 0, 1UL << 20);
        AssertQemuImgSame(a, ra);
        AssertQemuImgSame(b, rb);
    }

    [SkippableFact]
    public void EvilGuestIsRefusedAndTheVmmKeepsServing()
    {
        Require();
        string a = CreateImage("a.raw", "raw", "16M");
        string b = CreateImage("b.raw", "raw", "16M");
        var serial = new SerialCapture();
        var spec = GuestKitRunner.Spec("blk-evil disk=0 other=1") with
        {
            Disks = [new DiskSpec { Path = a }, new DiskSpec { Path = b }],
        };
        using var vm = VirtualMachine.Create(spec, serial.Write);
        using var cancel = new CancellationTokenSource(Timeout);
        var reason = vm.Run(cancel.Token);
        Assert.True(reason is DebugExitStop { Status: 0 }, $"guest ended with {reason.Describe()}; console:\n{serial.Text}");
        Assert.Contains(serial.Lines, l => l.StartsWith("guestkit: blk-evil ok cases=", StringComparison.Ordinal));
        Assert.DoesNotContain(serial.Lines, l => l.Contains("outcome=skipped", StringComparison.Ordinal));
        // Every case that needed a reset reached the device (it raised NEEDS_RESET), and the other disk was not touched.
        Assert.Contains(serial.Lines, l => l.Contains("outcome=needs-reset", StringComparison.Ordinal));
        Assert.Contains("guestkit: blk-evil other disk=1 ok", serial.Lines);
        // The malformed requests left disk 0's device needing a reset each time; the kit reset it.
        // Disk 1 never saw one: it is still live (DRIVER_OK without NEEDS_RESET).
        Assert.Equal(0, vm.Disks[1].Status & 0x40);
        Assert.NotEqual(0, vm.Disks[1].Status & 0x04);
    }

    /// <summary>QEMU with the guest kit on q35 (PCI) and one virtio-blk-pci per image (modern only).</summary>
    internal static ProcessResult RunQemu(string cmdline, params (string Path, string Format, string DeviceOptions)[] disks)
    {
        var args = new List<string>
        {
            "-accel", "kvm", "-M", "q35", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", TestEnvironment.GuestKit, "-append", cmdline,
        };
        for (int i = 0; i < disks.Length; i++)
        {
            args.AddRange(["-drive", $"file={disks[i].Path},if=none,id=d{i},format={disks[i].Format},cache=none"]);
            args.AddRange(["-device", $"virtio-blk-pci,drive=d{i},disable-legacy=on,addr=0x{i + 3:x}{disks[i].DeviceOptions}"]);
        }
        return TestEnvironment.RunProcess("qemu-system-x86_64", args, Timeout);
    }

    [SkippableTheory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public void QemuAndThisVmmWriteIdenticalImages(string format)
    {
        Require();
        TestEnvironment.RequireProgram("qemu-system-x86_64", "qemu-system-x86");
        string cmd = $"blk-verify {Ranges} seed=9 io=48K qd=8";
        string theirs = CreateImage($"qemu.{format}", format);
        string ours = CreateImage($"ours.{format}", format);

        var qemu = RunQemu(cmd, (theirs, format, ""));
        Assert.True(qemu.ExitCode == 1, $"QEMU exited {qemu.ExitCode} (the guest's status is (code-1)/2); console:\n{qemu.Stdout}{qemu.Stderr}");
        AssertGuestOk(RunOurs(cmd, new DiskSpec { Path = ours }), "guestkit: blk-verify ok");

        var compare = QemuImg("compare", "-f", format, "-F", format, theirs, ours);
        Assert.True(compare.ExitCode == 0, $"images differ: {compare.Stdout}{compare.Stderr}");
        if (format == "qcow2")
        {
            AssertCheckClean(theirs);
            AssertCheckClean(ours);
        }

        // And QEMU's driver-side view of our image: the kit under QEMU reads back what we wrote.
        var readBack = RunQemu($"blk-verify {Ranges} seed=9 write=0", (ours, format, ""));
        Assert.True(readBack.ExitCode == 1, $"QEMU could not verify the image this VMM wrote:\n{readBack.Stdout}");
    }

    private static ProcessResult Vmctl(params string[] args)
    {
        if (!File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.Vmctl} is missing (run 'make' first)");
        return TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Timeout);
    }

    [SkippableFact]
    public void VmctlRunGivesTheGuestItsDisks()
    {
        Require();
        string a = CreateImage("a.qcow2", "qcow2", "16M");
        string b = CreateImage("b.raw", "raw", "8M");
        var r = Vmctl("run", "-k", TestEnvironment.GuestKit, "--debug-exit", "-c", "blk-verify disk=1 size=1M queues=2 seed=4",
            "--disk", $"{a},serial=alpha", "--disk", $"{b},serial=beta,queues=2");
        Assert.True(r.ExitCode == 0, $"vmctl exited {r.ExitCode}: {r.Stdout}{r.Stderr}");
        Assert.Contains("guestkit: blk-verify disk=1 id=beta capacity=16384 queues=2 ", r.Stdout);
        Assert.Contains("guestkit: blk-verify ok disk=1 bytes=1048576", r.Stdout);

        string reference = P("reference.raw");
        BlkPattern.CreateZeroRaw(reference, 8L << 20);
        BlkPattern.WriteRange(reference, 4, 0, 1UL << 20);
        AssertQemuImgSame(b, reference);
    }

    [SkippableTheory]
    [InlineData("{0},queues=0", "queues 0 is out of range")]
    [InlineData("{0},queues=two", "queues 'two' is not a whole number")]
    [InlineData("{0},serial=this-serial-is-longer-than-20", "must be at most 20")]
    [InlineData("{0},cache=none", "unknown option 'cache=none'")]
    [InlineData(",readonly", "no image path")]
    public void BadDiskOptionsAreUsageErrors(string disk, string message)
    {
        Require();
        string image = CreateImage("a.raw", "raw", "1M");
        var r = Vmctl("run", "-k", TestEnvironment.GuestKit, "--debug-exit", "-c", "hello", "--disk", string.Format(disk, image));
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(message, r.Stderr);
        Assert.DoesNotContain("guestkit", r.Stdout);
    }

    [SkippableFact]
    public void AMissingOrDamagedImageIsNamedAndNothingRuns()
    {
        Require();
        var missing = Vmctl("run", "-k", TestEnvironment.GuestKit, "--debug-exit", "-c", "hello", "--disk", P("nope.qcow2"));
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains($"disk '{P("nope.qcow2")}'", missing.Stderr);
        Assert.Contains("no such file", missing.Stderr);
        Assert.DoesNotContain("guestkit", missing.Stdout);

        string bad = P("bad.qcow2");
        File.WriteAllBytes(bad, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3, .. new byte[100]]);
        var damaged = Vmctl("run", "-k", TestEnvironment.GuestKit, "--debug-exit", "-c", "hello", "--disk", bad);
        Assert.Equal(1, damaged.ExitCode);
        Assert.Contains($"disk '{bad}'", damaged.Stderr);
        Assert.Equal(108, new FileInfo(bad).Length);
    }
}
