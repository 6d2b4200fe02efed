using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>How the VMM reports a guest that KVM cannot run.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class FailureReportTests
{
    [SkippableFact]
    public void EmulationFailureIsReportedWithSuberrorAndRegisters()
    {
        TestEnvironment.RequireKvm();
        // int3 at CPL0 with no IDT. Under PVM the instruction emulator cannot execute it and KVM
        // stops the vCPU with an internal error (emulation failure). On VMX/SVM the CPU runs it,
        // finds no IDT and shuts down, which is the other outcome this VMM must report clearly.
        string path = MiniElf.WriteTemp(MiniElf.Pvh([0xB8, 0x44, 0x33, 0x22, 0x11, 0xCC])); // mov eax, 0x11223344; int3
        try
        {
            var serial = new SerialCapture();
            using var vm = VirtualMachine.Create(new VmSpec { Kernel = path, MemoryBytes = 16UL << 20 }, serial.Write);
            var reason = vm.Run(new CancellationTokenSource(TimeSpan.FromSeconds(30)).Token);
            Skip.If(reason is GuestShutdownStop, "this host runs int3 at CPL0 natively (no emulation failure to observe)");
            var error = Assert.IsType<InternalErrorStop>(reason);
            Assert.Equal(1u, error.Suberror);
            string text = error.Describe();
            Assert.StartsWith("KVM internal error on vCPU 0: suberror 1 (emulation failure)", text);
            Assert.NotNull(error.Registers);
            Assert.Contains("RAX=0000000011223344", text);
            Assert.Contains("RIP=", text);
            Assert.Contains("CR0=", text);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
