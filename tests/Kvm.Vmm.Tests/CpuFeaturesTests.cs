using Kvm.Interop.Structs;
using Kvm.Vmm.Cpu;

namespace Kvm.Vmm.Tests;

public class CpuFeaturesTests
{
    private static KvmCpuidEntry2[] Table() =>
    [
        new() { Function = 1, Index = 0, Ecx = 0xffff_ffff, Edx = 0xffff_ffff, Ebx = 0x0000_0800 },
        new() { Function = 7, Index = 0, Ebx = 0xffff_ffff, Ecx = 0xffff_ffff },
        new() { Function = 7, Index = 1, Ebx = 0xffff_ffff },
        new() { Function = 0x8000_0001, Index = 0, Ecx = 0xffff_ffff, Edx = 0xffff_ffff },
    ];

    [Fact]
    public void HidingCx16ClearsOnlyItsBit()
    {
        var t = Table();
        CpuFeatures.Hide(t, ["cx16"]);
        Assert.Equal(0xffff_ffffu & ~(1u << 13), t[0].Ecx);
        Assert.Equal(0xffff_ffffu, t[0].Edx);
        Assert.Equal(0xffff_ffffu, t[1].Ebx);
    }

    [Fact]
    public void HidingXsaveHidesOsxsaveAndTheFeaturesThatNeedIt()
    {
        var t = Table();
        CpuFeatures.Hide(t, ["xsave"]);
        foreach (int bit in new[] { 26, 27, 28, 29, 12 })         // xsave, osxsave, avx, f16c, fma
            Assert.Equal(0u, t[0].Ecx & (1u << bit));
        Assert.Equal(0u, t[1].Ebx & (1u << 5));                    // avx2
        Assert.Equal(0u, t[1].Ebx & (1u << 16));                   // avx512f
        Assert.Equal(0xffff_ffffu, t[2].Ebx);                      // leaf 7 subleaf 1 untouched
        Assert.NotEqual(0u, t[0].Ecx & (1u << 13));                // cx16 kept
    }

    [Fact]
    public void ExtendedLeavesAreHiddenToo()
    {
        var t = Table();
        CpuFeatures.Hide(t, ["pdpe1gb", "lahf_lm"]);
        Assert.Equal(0u, t[3].Edx & (1u << 26));
        Assert.Equal(0u, t[3].Ecx & 1u);
    }

    [Theory]
    [InlineData("-cx16,-xsave", new[] { "cx16", "xsave" })]
    [InlineData(" -CX16 , -cx16 ", new[] { "cx16" })]
    [InlineData("", new string[0])]
    public void ParseReadsNamesToHide(string text, string[] expected) =>
        Assert.Equal(expected, CpuFeatures.ParseHidden(text));

    [Theory]
    [InlineData("cx16", "write '-NAME'")]
    [InlineData("+avx", "write '-NAME'")]
    [InlineData("-", "write '-NAME'")]
    [InlineData("-warp_drive", "unknown feature 'warp_drive'")]
    public void ParseRefusesWhatItCannotDo(string text, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => CpuFeatures.ParseHidden(text));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void CpuidForAppliesTheHiddenFeaturesOnEveryVcpu()
    {
        var supported = Table();
        for (uint id = 0; id < 3; id++)
        {
            var t = VcpuSetup.CpuidFor(supported, id, 3, ["cx16"]);
            var leaf1 = t.Single(e => e.Function == 1);
            Assert.Equal(0u, leaf1.Ecx & (1u << 13));
            Assert.Equal(id, leaf1.Ebx >> 24);
        }
        Assert.NotEqual(0u, supported[0].Ecx & (1u << 13));       // the host's table is not changed
    }

    [Fact]
    public void JsonSpecCarriesHiddenFeatures()
    {
        var spec = Kvm.Vmm.Machine.VmSpecJsonContext.Parse("""{ "kernel": "k", "hiddenCpuFeatures": ["cx16", "xsave"] }""", "c.json");
        Assert.Equal(["cx16", "xsave"], spec.HiddenCpuFeatures);
        var e = Assert.Throws<ArgumentException>(() =>
            Kvm.Vmm.Machine.VmSpecJsonContext.Parse("""{ "kernel": "k", "hiddenCpuFeatures": ["nope"] }""", "c.json"));
        Assert.Contains("nope", e.Message);
    }
}
