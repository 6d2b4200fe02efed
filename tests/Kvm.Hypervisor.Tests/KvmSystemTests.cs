using Kvm.Interop.Structs;
using Kvm.Tests.Shared;

namespace Kvm.Hypervisor.Tests;

[Trait(Requires.Trait, Requires.Kvm)]
public class KvmSystemTests
{
    [SkippableFact]
    public void OpensKvmAndReportsCapabilities()
    {
        TestEnvironment.RequireKvm();
        using var kvm = KvmSystem.Open();
        Assert.True(kvm.VcpuMmapSize >= 4096);
        Assert.True(kvm.CheckExtension(KvmCap.UserMemory) > 0);
        Assert.True(kvm.CheckExtension(KvmCap.Irqchip) > 0);
        Assert.True(kvm.CheckExtension(KvmCap.MaxVcpus) >= 1);
    }

    [SkippableFact]
    public void SupportedCpuidHasBasicLeaves()
    {
        TestEnvironment.RequireKvm();
        using var kvm = KvmSystem.Open();
        var cpuid = kvm.GetSupportedCpuid();
        Assert.Contains(cpuid, e => e.Function == 0);
        Assert.Contains(cpuid, e => e.Function == 1);
        var leaf0 = cpuid.First(e => e.Function == 0);
        Assert.True(leaf0.Eax >= 1, "leaf 0 reports the highest basic leaf");
    }

    [SkippableFact]
    public void MsrIndexListIsNotEmpty()
    {
        TestEnvironment.RequireKvm();
        using var kvm = KvmSystem.Open();
        var msrs = kvm.GetMsrIndexList();
        Assert.NotEmpty(msrs);
        Assert.Contains(0x10u, msrs); // IA32_TIME_STAMP_COUNTER
    }

    [Fact]
    public void MissingDeviceGivesAClearError()
    {
        var e = Assert.Throws<HypervisorException>(() => KvmSystem.Open("/nonexistent/kvm"));
        Assert.Contains("/nonexistent/kvm is missing", e.Message);
    }

    [Fact]
    public void ANonKvmDeviceIsRefused()
    {
        var e = Assert.Throws<Kvm.Interop.Native.KvmIoctlException>(() => KvmSystem.Open("/dev/null"));
        Assert.Contains("KVM_GET_API_VERSION", e.Message);
    }
}
