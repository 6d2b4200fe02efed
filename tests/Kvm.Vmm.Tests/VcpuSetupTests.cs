using Kvm.Interop.Structs;
using Kvm.Vmm.Cpu;

namespace Kvm.Vmm.Tests;

public class VcpuSetupTests
{
    private static KvmCpuidEntry2 Leaf(uint function, uint index, uint eax, uint ebx, uint ecx, uint edx, uint flags = 0) =>
        new() { Function = function, Index = index, Flags = flags, Eax = eax, Ebx = ebx, Ecx = ecx, Edx = edx };

    // Something like what KVM_GET_SUPPORTED_CPUID returns on a modern host.
    private static List<KvmCpuidEntry2> Supported() =>
    [
        Leaf(0x0, 0, 0x16, 0x756e6547, 0x6c65746e, 0x49656e69),
        Leaf(0x1, 0, 0x000906ea, 0xff10_0800 | 0x00ab, 0x7ffa_fbbf, 0x0f8b_fbff),
        Leaf(0x4, 0, 0x1c004121, 0x01c0003f, 0x3f, 0, KvmCpuidEntry2.FlagSignificantIndex),
        Leaf(0x7, 0, 0, 0x029c6fbf, 0x40000000, 0xbc000400, KvmCpuidEntry2.FlagSignificantIndex),
        Leaf(0xb, 0, 0x1, 0x2, 0x100, 0xdead, KvmCpuidEntry2.FlagSignificantIndex),
        Leaf(0xb, 1, 0x4, 0x8, 0x201, 0xbeef, KvmCpuidEntry2.FlagSignificantIndex),
        Leaf(0xd, 0, 0x7, 0x340, 0x340, 0),
        Leaf(0x8000_0001, 0, 0, 0, 0x121, 0x2c100800),
        Leaf(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
    ];

    private static KvmCpuidEntry2 Find(KvmCpuidEntry2[] table, uint function, uint index = 0) =>
        Assert.Single(table, e => e.Function == function && e.Index == index);

    private static void AssertSame(KvmCpuidEntry2 expected, KvmCpuidEntry2 actual)
    {
        Assert.Equal(
            (expected.Function, expected.Index, expected.Flags, expected.Eax, expected.Ebx, expected.Ecx, expected.Edx),
            (actual.Function, actual.Index, actual.Flags, actual.Eax, actual.Ebx, actual.Ecx, actual.Edx));
    }

    [Theory]
    [InlineData(0u, 1)]
    [InlineData(5u, 8)]
    [InlineData(254u, 255)]
    public void Leaf1CarriesTheApicIdAndLogicalCount(uint vcpu, int count)
    {
        var host = Find([.. Supported()], 1);
        var table = VcpuSetup.CpuidFor(Supported(), vcpu, count);
        var leaf = Find(table, 1);

        Assert.Equal(vcpu, leaf.Ebx >> 24);
        Assert.Equal((uint)count, (leaf.Ebx >> 16) & 0xff);
        Assert.Equal(host.Ebx & 0xffff, leaf.Ebx & 0xffff); // brand index, CLFLUSH size kept
        Assert.Equal(host.Eax, leaf.Eax);
    }

    [Fact]
    public void Leaf1SetsTheHypervisorBitAndKeepsTheOtherFeatureBits()
    {
        var host = Find([.. Supported()], 1);
        var leaf = Find(VcpuSetup.CpuidFor(Supported(), 0, 1), 1);

        Assert.Equal(1u << 31, leaf.Ecx & (1u << 31));
        Assert.Equal(host.Ecx & 0x7fff_ffff, leaf.Ecx & 0x7fff_ffff);
        Assert.Equal(host.Edx & ~(1u << 28), leaf.Edx & ~(1u << 28));
    }

    [Fact]
    public void Leaf1MarksTheLogicalCountValidWithSeveralCpus()
    {
        var leaf = Find(VcpuSetup.CpuidFor(Supported(), 1, 4), 1);
        Assert.Equal(1u << 28, leaf.Edx & (1u << 28)); // HTT
    }

    [Fact]
    public void EachVcpuGetsItsOwnApicId()
    {
        var ids = Enumerable.Range(0, 8)
            .Select(v => Find(VcpuSetup.CpuidFor(Supported(), (uint)v, 8), 1).Ebx >> 24)
            .ToList();
        Assert.Equal(Enumerable.Range(0, 8).Select(v => (uint)v), ids);
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(3u)]
    [InlineData(200u)]
    public void Leaf0xBCarriesTheX2ApicIdInEveryLevel(uint vcpu)
    {
        var host = Supported();
        var table = VcpuSetup.CpuidFor(host, vcpu, 256 - 1);

        foreach (uint sub in new uint[] { 0, 1 })
        {
            var before = Find([.. host], 0xb, sub);
            var after = Find(table, 0xb, sub);
            Assert.Equal(vcpu, after.Edx);
            Assert.Equal((before.Eax, before.Ebx, before.Ecx, before.Flags), (after.Eax, after.Ebx, after.Ecx, after.Flags));
        }
    }

    [Fact]
    public void OtherLeavesAreUnchanged()
    {
        var host = Supported();
        var table = VcpuSetup.CpuidFor(host, 3, 4);

        Assert.Equal(host.Count, table.Length);
        for (int i = 0; i < host.Count; i++)
        {
            if (host[i].Function is 1 or 0xb)
                continue;
            AssertSame(host[i], table[i]);
        }
    }

    [Fact]
    public void TheSupportedListIsNotModified()
    {
        var host = Supported();
        var copy = Supported();
        VcpuSetup.CpuidFor(host, 7, 8);
        for (int i = 0; i < host.Count; i++)
            AssertSame(copy[i], host[i]);
    }
}
