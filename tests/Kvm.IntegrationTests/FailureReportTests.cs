using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// How the VMM reports a guest that KVM cannot run: a KVM internal error, provoked on purpose.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class FailureReportTests
{
    /// <summary>Guest RAM of the test guest: 16 MiB from address 0.</summary>
    private const ulong Memory = 16UL << 20;

    /// <summary>
    /// A guest-physical address with nothing behind it: above the 16 MiB of RAM, below the 32-bit
    /// MMIO hole (X86Layout.MmioHoleStart, where PCI BARs, the IOAPIC and the LAPIC live). No
    /// memory slot and no device.
    /// </summary>
    private const uint Nowhere = 0x0800_0000;

    /// <summary>
    /// A PVH guest (32-bit protected mode, paging off, CPL0) that jumps to <see cref="Nowhere"/>.
    /// The instruction fetch there faults to KVM as an access to an address with no memory slot,
    /// which KVM treats as MMIO and tries to emulate; it cannot read the instruction bytes, and an
    /// emulation failure at CPL0 ends KVM_RUN with KVM_EXIT_INTERNAL_ERROR, suberror 1
    /// (KVM_INTERNAL_ERROR_EMULATION), on VMX, SVM and PVM alike.
    /// </summary>
    private static string WriteGuest() => MiniElf.WriteTemp(MiniElf.Pvh(
    [
        0xB8, 0x44, 0x33, 0x22, 0x11,                   // mov eax, 0x11223344 (a marker for the register dump)
        0xB9, .. BitConverter.GetBytes(Nowhere),        // mov ecx, Nowhere
        0xFF, 0xE1,                                     // jmp ecx
    ]));

    [SkippableFact]
    public void ExecutingWhereNoMemoryIsIsAnEmulationFailureWithTheRegisters()
    {
        TestEnvironment.RequireKvm();
        string path = WriteGuest();
        try
        {
            var serial = new SerialCapture();
            using var vm = VirtualMachine.Create(new VmSpec { Kernel = path, MemoryBytes = Memory }, serial.Write);
            var reason = vm.Run(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token);

            var error = Assert.IsType<InternalErrorStop>(reason);
            Assert.Equal(0u, error.VcpuId);
            Assert.Equal(1u, error.Suberror);
            Assert.NotNull(error.Registers);
            string text = error.Describe();
            Assert.StartsWith("KVM internal error on vCPU 0: suberror 1 (emulation failure)", text);
            Assert.Contains("RAX=0000000011223344", text);
            Assert.Contains($"RCX={Nowhere:x16}", text);
            Assert.Contains($"RIP={Nowhere:x16}", text);
            Assert.Contains("CR0=", text);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [SkippableFact]
    public void VmctlReportsAKvmInternalErrorInOneLineThenTheRegisters()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.SkipIf(File.Exists(TestEnvironment.Vmctl) ? null : $"{TestEnvironment.Vmctl} is missing (run 'make' first)");
        string path = WriteGuest();
        try
        {
            var r = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["run", "--kernel", path, "--memory", "16M"], TimeSpan.FromSeconds(60));

            Assert.True(r.ExitCode == 1, $"vmctl exited {r.ExitCode}; stderr:\n{r.Stderr}");
            Assert.Equal("", r.Stdout);
            // The first line says what happened; the lines after it are the vCPU's registers.
            string[] lines = r.Stderr.TrimEnd('\n').Split('\n');
            Assert.Matches(@"^vmctl: KVM internal error on vCPU 0: suberror 1 \(emulation failure\)(, data( 0x[0-9a-f]+)+)?$", lines[0]);
            Assert.All(lines[1..], l => Assert.StartsWith("  ", l));
            Assert.Contains(lines, l => l.Contains("RAX=0000000011223344", StringComparison.Ordinal));
            Assert.Contains(lines, l => l.Contains($"RIP={Nowhere:x16}", StringComparison.Ordinal));
            Assert.Contains(lines, l => l.Contains("CR0=", StringComparison.Ordinal));
            Assert.DoesNotContain("   at ", r.Stderr);
            Assert.DoesNotContain("Exception", r.Stderr);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
