using Kvm.Hypervisor;
using Kvm.Interop.Native;
using Kvm.Tests.Shared;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// The touch tracer (userfaultfd minor mode) on guest RAM in a memfd, without KVM: another thread's
/// reads and writes are recorded page by page, as guest pages, and the content stays as it was.
/// Needs a userfaultfd (root, as CI runs), not /dev/kvm.
/// </summary>
public sealed class TouchTracerTests
{
    private const ulong Page = 4096, MiB = 1 << 20;

    private static void Require() =>
        TestEnvironment.SkipIf(Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (needs root, or access to /dev/userfaultfd)");

    /// <summary>Two regions, the second at 16 MiB (so host and guest offsets differ); every 4th page written beforehand.</summary>
    private static GuestMemory Memory()
    {
        var m = GuestMemory.Create([(0UL, 2 * MiB), (16 * MiB, 1 * MiB)]);
        foreach (var r in m.Regions)
            for (ulong a = r.GuestAddress; a < r.End; a += 4 * Page)
                m.WriteU64(a + 8, a ^ 0x5a5a5a5a5a5a5a5aUL);
        return m;
    }

    [SkippableFact]
    public void PagesTouchedByAnotherThreadAreRecordedAsGuestPagesAndKeepTheirContent()
    {
        Require();
        using var m = Memory();
        using var tracer = TouchTracer.Start(m);
        // Written before (minor faults): read page 4, write page 8 twice, read page 16 MiB + 12;
        // never written (missing faults): read page 1, write page 16 MiB + 3.
        ulong[] minorRead = [4 * Page, 16 * MiB + 12 * Page], minorWrite = [8 * Page], missingRead = [1 * Page], missingWrite = [16 * MiB + 3 * Page];
        var reads = new List<ulong>();
        var toucher = new Thread(() =>
        {
            foreach (ulong a in minorRead)
                reads.Add(m.ReadU64(a + 8));
            foreach (ulong a in minorWrite)
            {
                m.WriteU64(a + 16, 0x1234);
                m.WriteU64(a + 24, 0x5678);
            }
            foreach (ulong a in missingRead)
                reads.Add(m.ReadU64(a + 8));
            foreach (ulong a in missingWrite)
                m.WriteU64(a, 0x9abc);
        });
        toucher.Start();
        Assert.True(toucher.Join(TimeSpan.FromSeconds(30)), "the touching thread did not finish: its faults were not resolved");
        var trace = tracer.Stop();

        ulong[] expected = [.. minorRead.Concat(minorWrite).Concat(missingRead).Concat(missingWrite).Select(a => a / Page).Order()];
        Assert.Equal(expected, trace.GuestPages);
        Assert.Null(trace.Error);
        Assert.Equal(3, trace.MinorFaults);
        Assert.Equal(2, trace.MissingFaults);
        Assert.Equal([4 * Page ^ 0x5a5a5a5a5a5a5a5aUL, (16 * MiB + 12 * Page) ^ 0x5a5a5a5a5a5a5a5aUL, 0UL], reads);
        // The content of every page is what it was, with the writes made during the trace.
        foreach (var r in m.Regions)
            for (ulong a = r.GuestAddress; a < r.End; a += 4 * Page)
                Assert.Equal(a ^ 0x5a5a5a5a5a5a5a5aUL, m.ReadU64(a + 8));
        Assert.Equal(0x1234UL, m.ReadU64(8 * Page + 16));
        Assert.Equal(0x9abcUL, m.ReadU64(16 * MiB + 3 * Page));
    }

    [SkippableFact]
    public void AfterTheTraceRamIsOrdinaryAndCanBeTracedAgain()
    {
        Require();
        using var m = Memory();
        var first = TouchTracer.Start(m);
        m.ReadU64(0);
        Assert.Equal([0UL], first.Stop().GuestPages);
        Assert.Same(first.Stop(), first.Stop());
        // Untraced now: touches are not waited for (this thread would hang otherwise) nor seen.
        for (ulong a = 0; a < 2 * MiB; a += Page)
            m.ReadU64(a);
        first.Dispose();

        using var second = TouchTracer.Start(m);
        m.ReadU64(16 * MiB + 5 * Page);
        Assert.Equal([(16 * MiB + 5 * Page) / Page], second.Stop().GuestPages);
    }

    [SkippableFact]
    public void RamRegisteredWithAnotherUserfaultfdIsRefusedByName()
    {
        Require();
        using var m = Memory();
        using var other = Userfaultfd.Open();
        other.Register(m.Regions[1].Host, m.Regions[1].Size, KvmShim.UffdRegisterMissing);
        var e = Assert.Throws<TouchTraceUnavailableException>(() => TouchTracer.Start(m));
        Assert.Contains("guest RAM at 0x1000000 is registered with another userfaultfd already", e.Message);
        // Nothing was left registered: the first region is ordinary memory.
        Assert.Equal(0UL ^ 0x5a5a5a5a5a5a5a5aUL, m.ReadU64(8));
    }

    [SkippableFact]
    public void RamInAFileOutsideShmemIsRefusedByName()
    {
        string? dir = new[] { AppContext.BaseDirectory, "/var/tmp", "/tmp" }
            .FirstOrDefault(d => Directory.Exists(d) && IsPlainFileSystem(FileSystemType(d)));
        TestEnvironment.SkipIf(dir is null ? "no directory here is on a file system other than tmpfs" : null);
        string path = Path.Combine(dir!, $"kvm-touch-{Guid.NewGuid():N}.ram");
        try
        {
            using var m = GuestMemory.Create([(0UL, 1 * MiB)], GuestMemoryBacking.InFile(path));
            var e = Assert.Throws<TouchTraceUnavailableException>(() => TouchTracer.Start(m));
            Assert.Contains($"guest RAM is in the file '{path}', which is not on tmpfs or hugetlbfs", e.Message);
        }
        finally
        {
            File.Delete(path);
        }
    }

    private static bool IsPlainFileSystem(long type) => type != -1 && type != Libc.TmpfsMagic && type != Libc.HugetlbfsMagic;

    private static long FileSystemType(string dir)
    {
        string probe = Path.Combine(dir, $".fstype-{Guid.NewGuid():N}");
        try
        {
            using var h = File.OpenHandle(probe, FileMode.CreateNew, FileAccess.ReadWrite);
            return Libc.FileSystemType(h);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return -1;
        }
        finally
        {
            File.Delete(probe);
        }
    }
}
