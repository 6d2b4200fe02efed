using Kvm.Hypervisor;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;

namespace Kvm.IntegrationTests;

/// <summary>Guest RAM on huge pages: the guest kit boots on THP and on reserved hugetlb pages.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class HugePageTests
{
    private const string NrHugePages = "/proc/sys/vm/nr_hugepages";

    [SkippableFact]
    public void GuestBootsOnTransparentHugePages()
    {
        // Guest RAM is a memfd: its transparent huge pages are shmem THP, off by default
        // (shmem_enabled 'never'); turned on for the test, as root, and back after.
        GuestKitRunner.Require();
        using var thp = ShmemThp.Advise();
        var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("dirty size=8M passes=1") with { HugePages = HugePageMode.Transparent });
        Assert.Equal(new DebugExitStop(0), reason);
        Assert.Contains(serial.Lines, l => l.Contains("pages=2048"));
    }

    [SkippableFact]
    public void GuestBootsOnReservedHugeTlbPages()
    {
        GuestKitRunner.Require();
        Skip.If(Environment.UserName != "root", $"needs root to reserve hugetlb pages through {NrHugePages}");
        string before = File.ReadAllText(NrHugePages).Trim();
        // Reserve 16 MiB (8 pages of 2 MiB) on top of whatever is reserved, and give it back after.
        int wanted = int.Parse(before) + 8;
        try
        {
            File.WriteAllText(NrHugePages, wanted.ToString());
            Skip.If(int.Parse(File.ReadAllText(NrHugePages).Trim()) < wanted, "the kernel could not reserve 8 hugetlb pages");
            var (reason, serial) = GuestKitRunner.Run(GuestKitRunner.Spec("dirty size=4M passes=2") with
            {
                HugePages = HugePageMode.HugeTlb,
                MemoryBytes = 16UL << 20,
            });
            Assert.Equal(new DebugExitStop(0), reason);
            Assert.Contains(serial.Lines, l => l.Contains("pages=1024"));
        }
        finally
        {
            File.WriteAllText(NrHugePages, before);
        }
    }
}
