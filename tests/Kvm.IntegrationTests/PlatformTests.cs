using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Hypervisor;
using Kvm.Interop.Structs;
using Kvm.Tests.Shared;
using Kvm.Vmm.Cpu;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// The platform a guest finds, checked from inside the guest on real /dev/kvm: CPUID as the VMM
/// built it, APs waiting for SIPI, COM1 on IRQ 4, and ACPI S5 power-off.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public partial class PlatformTests
{
    [GeneratedRegex(@"^guestkit: cpuid ([0-9a-f]{8})\.(\d+) eax=([0-9a-f]{8}) ebx=([0-9a-f]{8}) ecx=([0-9a-f]{8}) edx=([0-9a-f]{8})$")]
    private static partial Regex CpuidLine();

    /// <summary>The leaves the guest kit's `cpuid` workload printed, as the guest saw them.</summary>
    private static KvmCpuidEntry2[] GuestCpuid(VmSpec spec)
    {
        var (reason, serial) = GuestKitRunner.Run(spec);
        Assert.Equal(new DebugExitStop(0), reason);
        Assert.Contains("guestkit: cpuid done", serial.Lines);
        return serial.Lines.Select(l => CpuidLine().Match(l)).Where(m => m.Success).Select(m => new KvmCpuidEntry2
        {
            Function = uint.Parse(m.Groups[1].Value, NumberStyles.HexNumber),
            Index = uint.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture),
            Eax = uint.Parse(m.Groups[3].Value, NumberStyles.HexNumber),
            Ebx = uint.Parse(m.Groups[4].Value, NumberStyles.HexNumber),
            Ecx = uint.Parse(m.Groups[5].Value, NumberStyles.HexNumber),
            Edx = uint.Parse(m.Groups[6].Value, NumberStyles.HexNumber),
        }).ToArray();
    }

    private static KvmCpuidEntry2 Leaf(KvmCpuidEntry2[] t, uint function, uint index = 0) =>
        Assert.Single(t, e => e.Function == function && e.Index == index);

    [SkippableTheory]
    [InlineData(1)]
    [InlineData(2)]
    public void TheGuestSeesTheTopologyAndHypervisorLeavesTheVmmBuilt(int cpus)
    {
        GuestKitRunner.Require();
        var guest = GuestCpuid(GuestKitRunner.Spec("cpuid") with { Cpus = cpus });
        using var kvm = KvmSystem.Open();
        var built = CpuidTable.For(kvm.GetSupportedCpuid(), 0, new CpuidOptions(cpus));

        // The guest kit runs on the BSP: APIC ID 0, and the VM's vCPU count.
        var leaf1 = Leaf(guest, 1);
        Assert.Equal(0u, leaf1.Ebx >> 24);
        Assert.Equal((uint)cpus, (leaf1.Ebx >> 16) & 0xff);
        Assert.NotEqual(0u, leaf1.Ecx & (1u << 31));         // hypervisor present
        Assert.Equal(0u, leaf1.Ecx & (1u << 5));             // no VMX

        foreach (var e in built.Where(e => e.Function is 0xb or 0x1f))
        {
            var seen = Leaf(guest, e.Function, e.Index);
            Assert.Equal((e.Eax, e.Ebx, e.Ecx, e.Edx), (seen.Eax, seen.Ebx, seen.Ecx, seen.Edx));
        }
        Assert.Contains(guest, e => e.Function == 0xb);

        var sig = Leaf(guest, 0x4000_0000);
        Assert.Equal("KVMKVMKVM\0\0\0", string.Concat(new[] { sig.Ebx, sig.Ecx, sig.Edx }.Select(r =>
            System.Text.Encoding.ASCII.GetString(BitConverter.GetBytes(r)))));
        Assert.Equal(Leaf(built, 0x4000_0001).Eax, Leaf(guest, 0x4000_0001).Eax);
        var pmu = Leaf(guest, 0xa);
        Assert.Equal((0u, 0u, 0u, 0u), (pmu.Eax, pmu.Ebx, pmu.Ecx, pmu.Edx));
    }

    [SkippableTheory]
    [InlineData("x86-64", "")]
    [InlineData("host", "-cx16,-lahf_lm")]
    public void FeaturesTheCpuModelHidesAreGoneInsideTheGuest(string model, string hidden)
    {
        GuestKitRunner.Require();
        var spec = GuestKitRunner.Spec("cpuid") with { CpuModel = model, HiddenCpuFeatures = CpuFeatures.ParseHidden(hidden) };
        using var kvm = KvmSystem.Open();
        var supported = kvm.GetSupportedCpuid();
        var names = spec.AllHiddenCpuFeatures();
        // Only features KVM would otherwise give the guest say anything (a host may show more than
        // KVM lists: PVM lets some host bits through).
        var offered = names.Where(n => CpuFeatures.IsSet(supported, n)).ToArray();
        if (offered.Length == 0)
            throw new SkipException($"this host's KVM offers none of {string.Join(", ", names)}, so hiding them shows nothing");

        var guest = GuestCpuid(spec);
        var baseline = GuestCpuid(GuestKitRunner.Spec("cpuid"));
        foreach (var name in offered)
        {
            Assert.True(CpuFeatures.IsSet(baseline, name), $"{name}: KVM offers it, yet the guest without a CPU model does not see it");
            Assert.False(CpuFeatures.IsSet(guest, name), $"{name}: hidden by --cpu-model {model} {hidden}, yet the guest sees it");
        }
    }

    [SkippableFact]
    public void ApplicationProcessorsWaitForSipiUntilTheGuestStartsThem()
    {
        GuestKitRunner.Require();
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(GuestKitRunner.Spec("hello") with { Cpus = 3 }, serial.Write);
        Assert.Equal(KvmMpState.Runnable, vm.Vcpus[0].Vcpu.GetMpState().MpState);
        for (int i = 1; i < 3; i++)
            Assert.Equal(KvmMpState.Uninitialized, vm.Vcpus[i].Vcpu.GetMpState().MpState);

        // The guest kit never sends INIT/SIPI: its APs never run an instruction.
        var reason = vm.Run(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token);
        Assert.Equal(new DebugExitStop(0), reason);
        for (int i = 1; i < 3; i++)
            Assert.Equal(KvmMpState.Uninitialized, vm.Vcpus[i].Vcpu.GetMpState().MpState);
    }

    [SkippableFact]
    public void Com1InterruptsArriveOnIsaIrq4ThroughTheIoApic()
    {
        GuestKitRunner.Require();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("uart-irq n=16"));
        Assert.True(reason == new DebugExitStop(0), $"{reason.Describe()}; console:\n{string.Join('\n', serial.Lines)}");
        Assert.Contains("guestkit: uart-irq ok n=16", serial.Lines);
    }

    [SkippableFact]
    public void AcpiS5PowersTheVmOff()
    {
        GuestKitRunner.Require();
        // The guest finds PM1a_CNT and \_S5 itself: RSDP -> XSDT -> FADT -> DSDT.
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("poweroff", debugExit: false));
        Assert.Equal(new GuestPowerOffStop(0), reason);
        Assert.False(reason.IsError);
        Assert.Contains("guestkit: poweroff: PM1a_CNT=0x604 SLP_TYP=5", serial.Lines);
    }

    [SkippableFact]
    public void VmctlReportsAnAcpiPowerOffAsASuccess()
    {
        GuestKitRunner.Require();
        var r = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["run", "-k", TestEnvironment.GuestKit, "-c", "poweroff"], TimeSpan.FromSeconds(60));
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("vmctl: guest powered off (ACPI S5) on vCPU 0", r.Stderr.Trim());
    }
}
