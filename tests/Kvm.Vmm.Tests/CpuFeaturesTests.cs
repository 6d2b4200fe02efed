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

    [Fact]
    public void ModelsHideTheFeaturesAboveTheirLevel()
    {
        Assert.Empty(CpuFeatures.HiddenByModel("host"));
        var v3 = CpuFeatures.HiddenByModel("x86-64-v3");
        Assert.Contains("avx512f", v3);
        Assert.DoesNotContain("avx2", v3);
        var v2 = CpuFeatures.HiddenByModel("x86-64-v2");
        Assert.Contains("xsave", v2);
        Assert.Contains("avx2", v2);
        Assert.Contains("movbe", v2);
        Assert.DoesNotContain("cx16", v2);
        Assert.DoesNotContain("sse4_2", v2);
        var v1 = CpuFeatures.HiddenByModel("x86-64");
        Assert.Contains("cx16", v1);
        Assert.Contains("sse3", v1);
        Assert.Contains("xsave", v1);
        Assert.DoesNotContain("aes", v1);              // not part of any level: the host decides
        Assert.Superset(new HashSet<string>(v2), new HashSet<string>(v1));
        Assert.Superset(new HashSet<string>(v3), new HashSet<string>(v2));
    }

    [Fact]
    public void AModelAppliedToATableClearsItsBits()
    {
        var t = Table();
        CpuFeatures.Hide(t, CpuFeatures.HiddenByModel("x86-64-v2"));
        Assert.Equal(0u, t[0].Ecx & ((1u << 26) | (1u << 28) | (1u << 27)));   // xsave, avx, osxsave
        Assert.NotEqual(0u, t[0].Ecx & (1u << 13));                            // cx16 kept
        Assert.Equal(0u, t[1].Ebx & ((1u << 5) | (1u << 16) | (1u << 31)));     // avx2, avx512f, avx512vl
        Assert.Equal(0u, t[3].Ecx & (1u << 5));                                // abm (lzcnt)
        Assert.NotEqual(0u, t[3].Ecx & 1u);                                    // lahf_lm kept
    }

    [Fact]
    public void AnUnknownModelIsRefusedByName()
    {
        var e = Assert.Throws<ArgumentException>(() => CpuFeatures.HiddenByModel("pentium"));
        Assert.Contains("'pentium'", e.Message);
        Assert.Contains("x86-64-v2", e.Message);
        var spec = new Kvm.Vmm.Machine.VmSpec { Kernel = "k", CpuModel = "pentium" };
        Assert.Contains("'pentium'", Assert.Throws<ArgumentException>(spec.Validate).Message);
    }

    [Fact]
    public void HidingXsaveAlsoHidesTheXsaveVariants()
    {
        var t = Table().Append(new KvmCpuidEntry2 { Function = 0xd, Index = 1, Eax = 0xf }).ToArray();
        CpuFeatures.Hide(t, ["xsave"]);
        Assert.Equal(0x4u, t[^1].Eax);                   // xsaveopt, xsavec, xsaves off; bit 2 (xgetbv1) is not named
    }
}
