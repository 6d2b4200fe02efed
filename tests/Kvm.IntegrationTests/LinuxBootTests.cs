using System.Text.RegularExpressions;
using Kvm.Tests.Shared;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// Debian's unmodified cloud kernel (build/linux, from `make linux`) on this VMM, as far as hosts
/// whose KVM emulates CPL0 code let it go: the early-boot milestones on the serial console.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public partial class LinuxBootTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(150);
    private static string LinuxDir => Path.Combine(TestEnvironment.BuildDir, "linux");

    private static string Require(string file)
    {
        TestEnvironment.RequireKvm();
        string path = Path.Combine(LinuxDir, file);
        if (!File.Exists(path))
            throw new SkipException($"{path} is missing (run 'make linux', which fetches Debian's kernel)");
        return path;
    }

    /// <summary>Runs the VM until <paramref name="milestone"/> shows on the console (or the VM stops), then stops it.</summary>
    private static (string Console, VirtualMachine Vm) BootUntil(VmSpec spec, string milestone)
    {
        var serial = new SerialCapture();
        var vm = VirtualMachine.Create(spec, serial.Write);
        vm.Start();
        bool seen = SpinWait.SpinUntil(() => serial.Text.Contains(milestone, StringComparison.Ordinal) || vm.Stopped.IsCompleted, Timeout);
        vm.RequestStop(new Kvm.Vmm.Exits.HostStop("test done"));
        vm.Stopped.Wait();
        string text = serial.Text.Replace("\r", "");
        Assert.True(seen && text.Contains(milestone, StringComparison.Ordinal),
            $"'{milestone}' did not appear within {Timeout.TotalSeconds} s (VM: {(vm.Stopped.IsCompleted ? vm.Stopped.Result.Describe() : "running")}); console:\n{text}");
        return (text, vm);
    }

    [SkippableFact]
    public void PvhVmlinuxReachesSmpBootWithTheVmmsMemoryMapAndAcpiTables()
    {
        string vmlinux = Require("vmlinux");
        const string cmdline = "console=ttyS0 earlyprintk=ttyS0 kvm-test=pvh-42";
        string initrd = Require("initramfs.cpio.gz");
        var spec = new VmSpec { Kernel = vmlinux, Initrd = initrd, Cmdline = cmdline, Cpus = 2, MemoryBytes = 512UL << 20 };
        var (console, vm) = BootUntil(spec, "smpboot: Allowing 2 CPUs");
        using (vm)
        {
            // The milestones, in order.
            string[] milestones =
            [
                "Linux version 6.", $"Command line: {cmdline}", "BIOS-provided physical RAM map:",
                "ACPI: RSDP 0x00000000000E0000", "ACPI: XSDT", "ACPI: FACP", "ACPI: DSDT", "ACPI: APIC",
                "smpboot: Allowing 2 CPUs",
            ];
            int at = 0;
            foreach (var m in milestones)
            {
                int i = console.IndexOf(m, at, StringComparison.Ordinal);
                Assert.True(i >= 0, $"'{m}' is missing after position {at}; console:\n{console}");
                at = i + m.Length;
            }

            // The e820 map the kernel prints is the one the VMM built.
            var printed = E820Line().Matches(console)
                .Select(m => (Start: Convert.ToUInt64(m.Groups[1].Value, 16), End: Convert.ToUInt64(m.Groups[2].Value, 16), Kind: m.Groups[3].Value))
                .ToArray();
            var built = PvhBoot.MemoryMap(vm.Memory)
                .Select(e => (Start: e.Address, End: e.Address + e.Size - 1, Kind: e.Type == MemoryMapEntry.Ram ? "usable" : "reserved"))
                .ToArray();
            Assert.Equal(built, printed);

            // The initrd arrived as the PVH module: the kernel reserves it where the VMM put it.
            ulong address = vm.Memory.ReadU64(X86Layout.PvhModlist), size = vm.Memory.ReadU64(X86Layout.PvhModlist + 8);
            ulong lastByte = ((address + size + 4095) & ~4095UL) - 1;
            Assert.Contains($"RAMDISK: [mem 0x{address:x8}-0x{lastByte:x8}]", console);
        }
    }

    [GeneratedRegex(@"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)")]
    private static partial Regex E820Line();

    [SkippableFact]
    public void BzImageEntersThroughThe64BitBootProtocol()
    {
        // The decompressor prints this from the command line in the zero page, before it
        // decompresses: it proves the 64-bit entry, the page tables and the zero page.
        string bzImage = Require("bzImage");
        string initrd = Require("initramfs.cpio.gz");
        var spec = new VmSpec
        {
            Kernel = bzImage, Initrd = initrd, Cmdline = "console=ttyS0 earlyprintk=ttyS0 nokaslr", MemoryBytes = 512UL << 20,
        };
        var (_, vm) = BootUntil(spec, "KASLR disabled");
        vm.Dispose();
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
        Assert.Equal(new Kvm.Vmm.Exits.DebugExitStop(0), vm.Run(new CancellationTokenSource(Timeout).Token));
        Assert.Contains(serial.Lines, l => l.Contains("nr_modules=1", StringComparison.Ordinal));

        ulong address = vm.Memory.ReadU64(X86Layout.PvhModlist), size = vm.Memory.ReadU64(X86Layout.PvhModlist + 8);
        byte[] expected = File.ReadAllBytes(initrd);
        Assert.Equal((ulong)expected.Length, size);
        Assert.Equal(0UL, address % 4096);
        Assert.True(address + size <= vm.Spec.MemoryBytes, $"the module at 0x{address:x}+0x{size:x} is outside RAM");
        Assert.True(vm.Memory.GetSpan(address, expected.Length).SequenceEqual(expected), "the module's bytes differ from the initrd file");
    }

    [SkippableFact]
    public void WhateverStopsTheBootIsReportedAsAClearError()
    {
        // On this project's hosts (PVM: CPL0 code is emulated) the kernel stops on an instruction
        // KVM cannot emulate. vmctl must end with status 1 and say why, with the registers; never
        // hang. On a host with hardware virtualization the kernel instead reaches the initramfs.
        string vmlinux = Require("vmlinux");
        string initrd = Require("initramfs.cpio.gz");
        var limit = TimeSpan.FromSeconds(300);
        using var vmctl = LiveProcess.Start(TestEnvironment.Vmctl, ["run", "--kernel", vmlinux, "--initrd", initrd, "--cpus", "2",
            "--memory", "512M", "--cmdline", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]);

        if (vmctl.WaitFor("kvm-guest: ready", limit))
            return; // hardware virtualization: the boot did not stop at all
        Assert.True(vmctl.WaitForExit(TimeSpan.Zero),
            $"the kernel neither stopped nor reached its init within {limit.TotalSeconds} s; console tail:\n{vmctl.Tail()}");
        string error = vmctl.Stderr.Result;
        Assert.True(vmctl.Process.ExitCode == 1, $"vmctl exited {vmctl.Process.ExitCode}; stderr:\n{error}\nconsole tail:\n{vmctl.Tail()}");
        Assert.Contains("Linux version", vmctl.Output);
        // One line that names what happened, then the registers of the vCPU that hit it.
        string first = error.Split('\n')[0];
        Assert.Matches(@"^vmctl: (KVM internal error on vCPU \d: suberror \d+ \(\w[\w ]+\)|guest shut down|vCPU \d failed to enter)", first);
        Assert.Matches(@"RIP[ =:]+(0x)?[0-9a-f]{16}", error);
        Assert.Contains("CR0", error);
    }
}
