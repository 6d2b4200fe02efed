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
    public void Leaf1SetsTheHypervisorBitClearsWhatTheVmmDoesNotOfferAndKeepsTheRest()
    {
        var host = Find([.. Supported()], 1);
        var leaf = Find(VcpuSetup.CpuidFor(Supported(), 0, 1), 1);

        // ECX: DTES64, MONITOR, DS-CPL, VMX, SMX, EST, TM2, xTPR, PDCM and OSXSAVE (set by the guest's CR4) off.
        uint ecxCleared = (1u << 2) | (1u << 3) | (1u << 4) | (1u << 5) | (1u << 6) | (1u << 7) | (1u << 8) | (1u << 14) | (1u << 15) | (1u << 27);
        Assert.Equal(1u << 31, leaf.Ecx & (1u << 31));
        Assert.Equal(0u, leaf.Ecx & ecxCleared);
        Assert.Equal(host.Ecx & ~ecxCleared & 0x7fff_ffff, leaf.Ecx & 0x7fff_ffff);
        // EDX: DS, ACPI thermal, TM, PBE off; HTT off with one vCPU.
        uint edxCleared = (1u << 21) | (1u << 22) | (1u << 29) | (1u << 31) | (1u << 28);
        Assert.Equal(0u, leaf.Edx & edxCleared);
        Assert.Equal(host.Edx & ~edxCleared, leaf.Edx);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TscDeadlineFollowsTheInKernelLapic(bool offered)
    {
        var host = Supported();
        var h = host[1];
        h.Ecx &= ~(1u << 24);
        host[1] = h;
        var leaf = Find(VcpuSetup.CpuidFor(host, 0, 1, tscDeadline: offered), 1);
        Assert.Equal(offered, (leaf.Ecx & (1u << 24)) != 0);

        // A CPU model that hides it wins over the LAPIC's offer.
        var hidden = Find(VcpuSetup.CpuidFor(host, 0, 1, ["tsc_deadline_timer"], tscDeadline: true), 1);
        Assert.Equal(0u, hidden.Ecx & (1u << 24));
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
    [InlineData(0u, 1, 0)]
    [InlineData(1u, 2, 1)]
    [InlineData(2u, 3, 2)]
    [InlineData(3u, 4, 2)]
    [InlineData(7u, 8, 3)]
    [InlineData(200u, 255, 8)]
    public void ExtendedTopologyDescribesOneCorePerVcpu(uint vcpu, int count, int coreBits)
    {
        var table = VcpuSetup.CpuidFor(Supported(), vcpu, count);
        const uint flag = KvmCpuidEntry2.FlagSignificantIndex;

        // Level 0: one thread per core; level 1: the cores of the package; level 2: the end.
        AssertSame(Leaf(0xb, 0, 0, 1, 1 << 8, vcpu, flag), Find(table, 0xb, 0));
        AssertSame(Leaf(0xb, 1, (uint)coreBits, (uint)count, 1 | (2 << 8), vcpu, flag), Find(table, 0xb, 1));
        AssertSame(Leaf(0xb, 2, 0, 0, 2, vcpu, flag), Find(table, 0xb, 2));
        Assert.Equal(3, table.Count(e => e.Function == 0xb));
        Assert.Equal(coreBits, CpuidTable.CoreIdBits(count));
    }

    [Fact]
    public void Leaf0x1FIsBuiltOnlyWhenTheHostHasIt()
    {
        Assert.DoesNotContain(VcpuSetup.CpuidFor(Supported(), 1, 2), e => e.Function == 0x1f);

        var host = Supported();
        host[0] = Leaf(0, 0, 0x1f, host[0].Ebx, host[0].Ecx, host[0].Edx);
        host.Add(Leaf(0x1f, 0, 0, 0, 0, 1, KvmCpuidEntry2.FlagSignificantIndex));
        var table = VcpuSetup.CpuidFor(host, 1, 2);
        Assert.Equal(3, table.Count(e => e.Function == 0x1f));
        Assert.Equal((1u, 2u, 1u), (Find(table, 0x1f, 1).Eax, Find(table, 0x1f, 1).Ebx, Find(table, 0x1f, 1).Edx));
    }

    [Theory]
    [InlineData(1, 0u, 0u)]
    [InlineData(2, 1u, 1u)]
    [InlineData(6, 7u, 7u)]
    public void Leaf4CountsTheCoresAndSharesOnlyTheLastLevelCache(int count, uint coresMinusOne, uint l3Sharing)
    {
        var host = Supported();
        host.Add(Leaf(0x4, 1, 0x1c00_4163, 0x03c0_003f, 0x1fff, 0, KvmCpuidEntry2.FlagSignificantIndex)); // L3
        var table = VcpuSetup.CpuidFor(host, 0, count);

        var l1 = Find(table, 4, 0);
        Assert.Equal(coresMinusOne, l1.Eax >> 26);
        Assert.Equal(0u, (l1.Eax >> 14) & 0xfff);
        Assert.Equal(host[2].Eax & 0x3fff, l1.Eax & 0x3fff);   // type, level, self-initializing kept
        var l3 = Find(table, 4, 1);
        Assert.Equal(coresMinusOne, l3.Eax >> 26);
        Assert.Equal(l3Sharing, (l3.Eax >> 14) & 0xfff);
    }

    [Fact]
    public void NoPerformanceCountersNoThermalManagementNoNestedVirtualization()
    {
        var host = Supported();
        host.Add(Leaf(0x6, 0, 0x77, 0x2, 0x9, 0));
        host.Add(Leaf(0xa, 0, 0x0703_0805, 0, 0, 0x603));
        var table = VcpuSetup.CpuidFor(host, 0, 2);

        AssertSame(Leaf(0x6, 0, 0x4, 0, 0, 0), Find(table, 6));    // only ARAT
        AssertSame(Leaf(0xa, 0, 0, 0, 0, 0), Find(table, 0xa));
        Assert.Equal(0u, Find(table, 0x8000_0001).Ecx & (1u << 2)); // SVM
        Assert.Equal(0u, Find(table, 1).Ecx & (1u << 5));           // VMX
    }

    [Fact]
    public void AmdTopologyLeavesCarryTheCoreCountAndIds()
    {
        var host = Supported();
        host[0] = Leaf(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65);    // AuthenticAMD
        host.Add(Leaf(0x8000_0008, 0, 0x3030, 0x1000, 0x0000_700f, 0));
        host.Add(Leaf(0x8000_001e, 0, 0x55, 0x0103, 0x0303, 0));
        var table = VcpuSetup.CpuidFor(host, 5, 6);

        var size = Find(table, 0x8000_0008);
        Assert.Equal(5u, size.Ecx & 0xff);              // NC: cores - 1
        Assert.Equal(3u, (size.Ecx >> 12) & 0xf);       // ApicIdCoreIdSize
        Assert.Equal(0x3030u, size.Eax);                // address sizes kept
        AssertSame(Leaf(0x8000_001e, 0, 5, 5, 0, 0), Find(table, 0x8000_001e));
    }

    [Fact]
    public void IntelLeaf0x80000008EcxIsLeftAlone()
    {
        var host = Supported();
        host.Add(Leaf(0x8000_0008, 0, 0x3027, 0, 0, 0));
        Assert.Equal(0u, Find(VcpuSetup.CpuidFor(host, 1, 4), 0x8000_0008).Ecx);
    }

    [Fact]
    public void TheKvmLeavesAreKept()
    {
        var host = Supported();
        host.Add(Leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d));
        var table = VcpuSetup.CpuidFor(host, 1, 2);
        AssertSame(host[^1], Find(table, 0x4000_0000));
        AssertSame(Find([.. host], 0x4000_0001), Find(table, 0x4000_0001));

        // A host table whose signature leaf names a lower maximum still reaches the feature leaf.
        host[^1] = Leaf(0x4000_0000, 0, 0, 0x4b4d_564b, 0x564b_4d56, 0x4d);
        Assert.Equal(0x4000_0001u, Find(VcpuSetup.CpuidFor(host, 1, 2), 0x4000_0000).Eax);
    }

    [Fact]
    public void OtherLeavesAreUnchanged()
    {
        var host = Supported();
        var table = VcpuSetup.CpuidFor(host, 3, 4);

        foreach (var h in host)
        {
            if (h.Function is 1 or 4 or 0xb or 0x8000_0001)
                continue;
            AssertSame(h, Find(table, h.Function, h.Index));
        }
        Assert.Equal(host.Count - 2 + 3, table.Length); // 0xB: two host subleaves became three
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

    [Fact]
    public void InitialMsrsAreWhatFirmwareLeavesAndOnlyThoseKvmKnows()
    {
        var all = VcpuSetup.InitialMsrs([0x10, 0x174, 0x175, 0x176, 0x1a0, 0x277, 0x2ff, 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102]);
        Assert.Equal(12, all.Length);
        Assert.Equal(VcpuSetup.MtrrDefTypeEnabledWriteBack, all.Single(m => m.Index == 0x2ff).Data);
        Assert.Equal(0x806UL, VcpuSetup.MtrrDefTypeEnabledWriteBack);          // E (bit 11) | WB (6)
        Assert.Equal(1UL, all.Single(m => m.Index == 0x1a0).Data);              // fast strings
        Assert.Equal(0x0007_0406_0007_0406UL, all.Single(m => m.Index == 0x277).Data);
        Assert.All(all.Where(m => m.Index is not (0x2ff or 0x1a0 or 0x277)), m => Assert.Equal(0UL, m.Data));

        var some = VcpuSetup.InitialMsrs([0xc0000082, 0x12345]);
        Assert.Equal(0xc0000082u, Assert.Single(some).Index);
    }
}
