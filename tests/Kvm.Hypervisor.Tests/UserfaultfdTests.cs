using System.Runtime.InteropServices;
using Kvm.Hypervisor;
using Kvm.Interop.Native;
using Kvm.Tests.Shared;

namespace Kvm.Hypervisor.Tests;

/// <summary>userfaultfd on guest RAM, without KVM: a thread that touches a registered page waits until the handler fills it.</summary>
public sealed class UserfaultfdTests
{
    private static void Require() =>
        TestEnvironment.SkipIf(Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (needs root, or access to /dev/userfaultfd)");

    [SkippableFact]
    public void ATouchedPageWaitsUntilItIsFilledAndReadsWhatWasCopied()
    {
        Require();
        using var memory = GuestMemory.Create([(0UL, 1UL << 20)]);
        using var uffd = Userfaultfd.Open();
        var r = memory.Regions[0];
        uffd.Register(r.Host, r.Size, KvmShim.UffdRegisterMissing);

        var reader = Task.Run(() => memory.ReadU64(5 * 4096 + 8));
        Assert.True(uffd.WaitForFaults(10_000), "no fault was reported");
        Span<UserFault> faults = stackalloc UserFault[8];
        int n = uffd.ReadFaults(faults);
        Assert.Equal(1, n);
        Assert.Equal((ulong)r.Host + 5 * 4096, faults[0].Address);
        Assert.False(faults[0].Write);
        Assert.False(reader.IsCompleted, "the reader did not wait for its page");

        var page = new byte[4096];
        BitConverter.TryWriteBytes(page.AsSpan(8), 0x1122334455667788UL);
        Assert.Equal(4096, uffd.Copy(r.Host + 5 * 4096, page));
        Assert.True(reader.Wait(10_000));
        Assert.Equal(0x1122334455667788UL, reader.Result);

        // Filled already: a second copy skips the page (counted as done) and leaves it as it is.
        page[8] = 0xff;
        Assert.Equal(4096, uffd.Copy(r.Host + 5 * 4096, page));
        Assert.Equal(0x1122334455667788UL, memory.ReadU64(5 * 4096 + 8));
        // A range of zeros, two pages.
        Assert.Equal(8192, uffd.Zero(r.Host + 6 * 4096, 8192));
        Assert.Equal(0UL, memory.ReadU64(7 * 4096));
    }
}
