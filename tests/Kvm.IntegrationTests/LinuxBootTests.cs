using System.Globalization;
using System.Security.Cryptography;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;
using Kvm.Vmm.Acpi;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// Debian's unmodified cloud kernel (build/linux, from `make linux`) booted to its init on this
/// VMM. The initramfs's init (native/linux/init) runs the checks the kernel command line names
/// (kvmtest=...), prints what it found as "kvm-guest: ..." lines and ends the VM with its verdict
/// through the debug-exit port; the tests compare what the guest found with what the VMM built.
/// Without kvmtest= the guest runs a shell on the console, as for a user.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public partial class LinuxBootTests
{
    /// <summary>One boot to init and back; tens of seconds inside a nested KVM host.</summary>
    private static readonly TimeSpan BootTimeout = TimeSpan.FromSeconds(300);
    private const ulong Memory = 256UL << 20;
    private const string GuestPrefix = "kvm-guest: ";

    private static string LinuxDir => Path.Combine(TestEnvironment.BuildDir, "linux");

    private static string Require(string file)
    {
        TestEnvironment.RequireKvm();
        string path = Path.Combine(LinuxDir, file);
        if (!File.Exists(path))
            TestEnvironment.SkipIf($"{path} is missing (run 'make linux', which fetches Debian's kernel)");
        return path;
    }

    /// <summary>
    /// The configurations every boot check runs in: both ways into the kernel, 1, 2 and 4 vCPUs,
    /// and a disk with one request queue or four (Linux uses min(queues, CPUs) of them).
    /// </summary>
    public static TheoryData<string, int, int> Configurations => new()
    {
        { "bzImage", 1, 1 },
        { "bzImage", 2, 4 },
        { "bzImage", 4, 1 },
        { "vmlinux", 1, 1 },
        { "vmlinux", 2, 1 },
        { "vmlinux", 4, 4 },
    };

    [SkippableTheory]
    [MemberData(nameof(Configurations))]
    public void KernelBootsToInitAndPassesTheGuestChecks(string kernelFile, int cpus, int queues)
    {
        string kernel = Require(kernelFile);
        string initrd = Require("initramfs.cpio.gz");
        RequireDiskTools();
        using var disk = Ext4Disk.Create();
        int usedQueues = Math.Min(queues, cpus);
        string checks = $"cpus:{cpus},bootlog,memmap,acpi,blk,blkqueues:{usedQueues}";
        // quiet: each console byte costs VM exits, and tens of seconds of a boot in a nested KVM
        // host went to printing the kernel's log; "bootlog" prints the lines compared here.
        string cmdline = $"console=ttyS0 quiet panic=-1 kvmtest={checks}";
        var spec = new VmSpec
        {
            Kernel = kernel, Initrd = initrd, Cmdline = cmdline, Cpus = cpus, MemoryBytes = Memory, DebugExit = true,
            Disks = [new DiskSpec { Path = disk.Image, Queues = queues }],
        };

        var serial = new SerialCapture();
        string console;
        (ulong Address, ulong Size) initrdAt;
        IReadOnlyList<MemoryMapEntry> builtMap;
        AcpiTableSet acpi;
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            initrdAt = InitrdPlacement(vm);
            builtMap = PvhBoot.MemoryMap(vm.Memory);
            acpi = vm.Acpi!;
            using var cancel = new CancellationTokenSource(BootTimeout);
            var reason = vm.Run(cancel.Token);
            console = serial.Text.Replace("\r", "");
            Assert.True(reason == new DebugExitStop(0),
                $"the guest's verdict: {reason.Describe()} (0 = every check passed; N = check N of '{checks}' failed); console:\n{console}");
        }

        // Every check ran and passed, in order.
        string[] guest = GuestLines(console);
        string[] passed = guest.Where(l => l.StartsWith("PASS ", StringComparison.Ordinal)).Select(l => l[5..]).ToArray();
        Assert.Equal(checks.Split(','), passed);
        Assert.Contains("verdict 0", guest);
        Assert.Contains($"cpus online {(cpus == 1 ? "0" : $"0-{cpus - 1}")}", guest);
        Assert.Contains($"blkqueues {usedQueues}", guest);

        // What the kernel logged while booting: its command line, the initrd where the VMM put it
        // (zero page or PVH module 0), every CPU.
        string bootlog = string.Join('\n', guest.Where(l => l.StartsWith("bootlog ", StringComparison.Ordinal)).Select(l => l[8..]));
        ulong lastByte = ((initrdAt.Address + initrdAt.Size + 4095) & ~4095UL) - 1;
        AssertInOrder(bootlog, "Linux version 6.", $"Command line: {cmdline}", "BIOS-e820: ",
            $"RAMDISK: [mem 0x{initrdAt.Address:x8}-0x{lastByte:x8}]", "ACPI: RSDP 0x", $"smpboot: Allowing {cpus} CPUs",
            $"smpboot: Total of {cpus} processors activated");

        // The memory map the kernel was given, as it logged it while booting and as
        // /sys/firmware/memmap shows it to userspace, is the one the VMM built.
        var built = builtMap.Select(e => (e.Address, End: e.Address + e.Size - 1, e.Type)).ToArray();
        var logged = E820Line().Matches(bootlog)
            .Select(m => (Address: Hex(m.Groups[1].Value), End: Hex(m.Groups[2].Value), Type: E820Type(m.Groups[3].Value)))
            .ToArray();
        Assert.Equal(built, logged);
        var sysfs = guest.Select(l => MemmapLine().Match(l)).Where(m => m.Success)
            .Select(m => (Address: Hex(m.Groups[1].Value), End: Hex(m.Groups[2].Value), Type: E820Type(m.Groups[3].Value)))
            .ToArray();
        Assert.Equal(built, sysfs);

        // The ACPI tables: the kernel found each where the VMM put it, with its length, and the
        // ones it lists in /sys/firmware/acpi/tables (all but the RSDP and the XSDT) hold the
        // VMM's bytes.
        var placed = acpi.Tables.Select(t => $"{t.Signature} 0x{t.Address:X16} {t.Length:X6}").Order(StringComparer.Ordinal);
        var found = AcpiTableLine().Matches(bootlog).Select(m => m.Groups[1].Value).Order(StringComparer.Ordinal);
        Assert.Equal(placed, found);
        var expectedTables = acpi.Tables.Where(t => t.Signature is not ("RSDP" or "XSDT"))
            .Select(t => $"acpi {t.Signature} {t.Length} {Sha256(acpi.Table(t.Signature))}")
            .Order(StringComparer.Ordinal);
        var listed = guest.Where(l => l.StartsWith("acpi ", StringComparison.Ordinal)).Order(StringComparer.Ordinal);
        Assert.Equal(expectedTables, listed);

        // The disk: the guest's writes are in a consistent image and a clean file system.
        string wrote = guest.Select(l => WroteLine().Match(l)).Single(m => m.Success).Groups[1].Value;
        disk.AssertConsistent();
        Assert.Equal(wrote, Sha256(disk.ReadFile("/guest-wrote.bin")));
    }

    [SkippableFact]
    public void PoweroffInTheGuestsShellEndsVmctlWithStatus0()
    {
        string vmlinux = Require("vmlinux");
        string initrd = Require("initramfs.cpio.gz");
        RequireDiskTools();
        using var disk = Ext4Disk.Create();
        using var vmctl = StartVmctlToShell(vmlinux, initrd, ["--disk", disk.Image]);
        Assert.Contains("kvm-guest: mounted /dev/vda on /mnt", vmctl.Output);
        vmctl.Type("echo typed in the guest > /mnt/typed.txt\n");
        vmctl.Type("poweroff\n");

        AssertEndsWithStatus0(vmctl, "poweroff", @"^vmctl: guest powered off \(ACPI S5\) on vCPU [01]\n$");
        AssertInOrder(vmctl.Output, "The system is going down NOW!", "reboot: Power down");
        // init unmounted the disk on the way down: the file system is clean and holds what was typed.
        disk.AssertConsistent();
        Assert.Equal("typed in the guest\n", System.Text.Encoding.UTF8.GetString(disk.ReadFile("/typed.txt")));
    }

    [SkippableFact]
    public void RebootInTheGuestsShellEndsVmctlReportingTheReset()
    {
        // This VMM does not reset a VM: the kernel's reset (through the i8042, as this machine's
        // FADT offers no reset register) ends it, and vmctl says so.
        string bzImage = Require("bzImage");
        string initrd = Require("initramfs.cpio.gz");
        using var vmctl = StartVmctlToShell(bzImage, initrd, []);
        vmctl.Type("reboot\n");

        AssertEndsWithStatus0(vmctl, "reboot", @"^vmctl: guest requested a reset on vCPU [01]\n$");
        AssertInOrder(vmctl.Output, "The system is going down NOW!", "reboot: Restarting system");
    }

    [SkippableFact]
    public void AVmlinuxGetsItsInitrdAsThePvhModule()
    {
        // The guest kit stands in for the kernel: it reports hvm_start_info's module count, and the
        // module list points at the initrd's bytes in guest RAM.
        string initrd = Require("initramfs.cpio.gz");
        GuestKitRunner.Require();
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(GuestKitRunner.Spec("info") with { Initrd = initrd }, serial.Write);
        Assert.Equal(new DebugExitStop(0), vm.Run(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token));
        Assert.Contains(serial.Lines, l => l.Contains("nr_modules=1", StringComparison.Ordinal));

        ulong address = vm.Memory.ReadU64(X86Layout.PvhModlist), size = vm.Memory.ReadU64(X86Layout.PvhModlist + 8);
        byte[] expected = File.ReadAllBytes(initrd);
        Assert.Equal((ulong)expected.Length, size);
        Assert.Equal(0UL, address % 4096);
        Assert.True(address + size <= vm.Spec.MemoryBytes, $"the module at 0x{address:x}+0x{size:x} is outside RAM");
        Assert.True(vm.Memory.GetSpan(address, expected.Length).SequenceEqual(expected), "the module's bytes differ from the initrd file");
    }

    /// <summary>Where the VMM put the initrd, read back from the boot data before the kernel runs.</summary>
    private static (ulong Address, ulong Size) InitrdPlacement(VirtualMachine vm)
    {
        if (vm.BzKernel is not null)
        {
            // boot_params.hdr.ramdisk_image (0x218) and ramdisk_size (0x21c).
            ulong zeroPage = BzBootLayout.Default.ZeroPage;
            return (vm.Memory.ReadU32(zeroPage + 0x218), vm.Memory.ReadU32(zeroPage + 0x21c));
        }
        return (vm.Memory.ReadU64(X86Layout.PvhModlist), vm.Memory.ReadU64(X86Layout.PvhModlist + 8));
    }

    /// <summary>vmctl ends, after the command typed in the guest's shell, with status 0 and the one line on stderr that says why.</summary>
    private static void AssertEndsWithStatus0(LiveProcess vmctl, string command, string stderrPattern)
    {
        Assert.True(vmctl.WaitForExit(BootTimeout), $"vmctl still runs after {command}; console tail:\n{vmctl.Tail()}");
        string stderr = vmctl.Stderr.Result;
        Assert.True(vmctl.Process.ExitCode == 0, $"vmctl exited {vmctl.Process.ExitCode}; stderr:\n{stderr}\nconsole tail:\n{vmctl.Tail()}");
        Assert.Matches(stderrPattern, stderr);
    }

    /// <summary>Starts vmctl on a kernel without kvmtest= (a user's boot: quiet, with a shell) and waits for the prompt.</summary>
    private static LiveProcess StartVmctlToShell(string kernel, string initrd, string[] extra)
    {
        TestEnvironment.SkipIf(File.Exists(TestEnvironment.Vmctl) ? null : $"{TestEnvironment.Vmctl} is missing (run 'make' first)");
        var vmctl = LiveProcess.Start(TestEnvironment.Vmctl,
            ["run", "--kernel", kernel, "--initrd", initrd, "--cmdline", "console=ttyS0 quiet panic=-1", "--cpus", "2", "--memory", "256M", .. extra]);
        bool prompt = SpinWait.SpinUntil(() =>
        {
            string output = vmctl.Output;
            int ready = output.IndexOf("kvm-guest: ready", StringComparison.Ordinal);
            return (ready >= 0 && output.IndexOf("# ", ready, StringComparison.Ordinal) >= 0) || vmctl.Process.HasExited;
        }, BootTimeout);
        if (!prompt || vmctl.Process.HasExited)
        {
            string why = vmctl.Process.HasExited ? $"vmctl exited {vmctl.Process.ExitCode}: {vmctl.Stderr.Result}" : "no shell prompt";
            vmctl.Dispose();
            Assert.Fail($"{why} within {BootTimeout.TotalSeconds} s; console tail:\n{vmctl.Tail(30)}");
        }
        return vmctl;
    }

    private static void RequireDiskTools()
    {
        TestEnvironment.RequireProgram("mkfs.ext4", "e2fsprogs");
        TestEnvironment.RequireProgram("debugfs", "e2fsprogs");
        TestEnvironment.RequireProgram("e2fsck", "e2fsprogs");
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
    }

    /// <summary>What the guest's init printed, without the "kvm-guest: " prefix.</summary>
    private static string[] GuestLines(string console) =>
        console.Split('\n').Where(l => l.StartsWith(GuestPrefix, StringComparison.Ordinal)).Select(l => l[GuestPrefix.Length..]).ToArray();

    private static void AssertInOrder(string text, params string[] milestones)
    {
        int at = 0;
        foreach (var m in milestones)
        {
            int i = text.IndexOf(m, at, StringComparison.Ordinal);
            Assert.True(i >= 0, $"'{m}' is missing after position {at}; console:\n{text}");
            at = i + m.Length;
        }
    }

    private static ulong Hex(string s) => ulong.Parse(s.StartsWith("0x", StringComparison.Ordinal) ? s[2..] : s, NumberStyles.HexNumber, CultureInfo.InvariantCulture);

    /// <summary>The e820 type of a name as Linux prints it (dmesg: usable, reserved; sysfs: System RAM, Reserved).</summary>
    private static uint E820Type(string name) => name switch
    {
        "usable" or "System RAM" => MemoryMapEntry.Ram,
        "reserved" or "Reserved" => MemoryMapEntry.Reserved,
        _ => throw new FormatException($"unexpected memory type '{name}'"),
    };

    private static string Sha256(ReadOnlySpan<byte> bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    [GeneratedRegex(@"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)")]
    private static partial Regex E820Line();

    [GeneratedRegex(@"^ACPI: ([A-Z0-9]{4} 0x[0-9A-F]{16} [0-9A-F]{6})", RegexOptions.Multiline)]
    private static partial Regex AcpiTableLine();

    [GeneratedRegex(@"^memmap (0x[0-9a-f]+) (0x[0-9a-f]+) (.+)$")]
    private static partial Regex MemmapLine();

    [GeneratedRegex(@"^blk wrote guest-wrote\.bin ([0-9a-f]{64})$")]
    private static partial Regex WroteLine();

    /// <summary>
    /// A qcow2 image holding an ext4 file system made on the host (mkfs.ext4 -d, then qemu-img
    /// convert) with a few files and their SHA256SUMS, which the guest's "blk" check verifies.
    /// </summary>
    private sealed class Ext4Disk : IDisposable
    {
        private static readonly TimeSpan ToolTimeout = TimeSpan.FromSeconds(120);
        private readonly string _dir;

        private Ext4Disk(string dir) => _dir = dir;

        public string Image => Path.Combine(_dir, "disk.qcow2");

        public static Ext4Disk Create()
        {
            var disk = new Ext4Disk(Path.Combine(Path.GetTempPath(), $"kvm-linux-{Guid.NewGuid():N}"));
            try
            {
                string files = Path.Combine(disk._dir, "files");
                Directory.CreateDirectory(Path.Combine(files, "data"));
                var random = new Random(8);
                var content = new Dictionary<string, byte[]>
                {
                    ["hello.txt"] = "written on the host by LinuxBootTests\n"u8.ToArray(),
                    ["data/small.bin"] = RandomBytes(random, 300 << 10),
                    ["data/large.bin"] = RandomBytes(random, 3 << 20),
                };
                foreach (var (name, bytes) in content)
                    File.WriteAllBytes(Path.Combine(files, name), bytes);
                File.WriteAllLines(Path.Combine(files, "SHA256SUMS"), content.Select(f => $"{Sha256(f.Value)}  {f.Key}"));

                string raw = Path.Combine(disk._dir, "disk.raw");
                Run("mkfs.ext4", "-q", "-F", "-L", "kvmtest", "-d", files, raw, "64M");
                Run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk.Image);
                File.Delete(raw);
                return disk;
            }
            catch
            {
                disk.Dispose();
                throw;
            }
        }

        /// <summary>qemu-img finds the image clean, and e2fsck the file system in it.</summary>
        public void AssertConsistent()
        {
            Run("qemu-img", "check", Image);
            Run("e2fsck", "-f", "-n", RawCopy());
        }

        /// <summary>A file's bytes as the host reads them from the image (debugfs on a raw copy).</summary>
        public byte[] ReadFile(string path)
        {
            string output = Path.Combine(_dir, "read-back");
            File.Delete(output);
            Run("debugfs", "-R", $"dump {path} {output}", RawCopy());
            Assert.True(File.Exists(output), $"debugfs found no {path} in the image");
            return File.ReadAllBytes(output);
        }

        private string RawCopy()
        {
            string raw = Path.Combine(_dir, "after.raw");
            if (!File.Exists(raw))
                Run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", Image, raw);
            return raw;
        }

        private static byte[] RandomBytes(Random random, int size)
        {
            var b = new byte[size];
            random.NextBytes(b);
            return b;
        }

        private static void Run(string program, params string[] args)
        {
            var r = TestEnvironment.RunProcess(program, args, ToolTimeout);
            Assert.True(r.ExitCode == 0, $"{program} {string.Join(' ', args)} exited {r.ExitCode}:\n{r.Stdout}{r.Stderr}");
        }

        public void Dispose()
        {
            try
            {
                Directory.Delete(_dir, recursive: true);
            }
            catch (DirectoryNotFoundException)
            {
            }
        }
    }
}
