using Kvm.Hypervisor;
using Kvm.Tests.Shared;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// A live checkpoint of guest RAM (userfaultfd write-protect) on a memfd, without KVM: another
/// thread keeps writing RAM while the writer saves it, and the file holds RAM exactly as it was at
/// the protection, pages never touched included; a file that cannot be written ends the
/// checkpoint without leaving the writing thread waiting. Needs a userfaultfd with write-protect
/// of shared memory (root, Linux 5.19+), not /dev/kvm.
/// </summary>
public sealed class RamCheckpointWriterTests : IDisposable
{
    private const ulong Page = 4096, MiB = 1 << 20;
    private const long Header = 4096;
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-ckpt-test-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static void Require() => TestEnvironment.SkipIf(RamCheckpointWriter.Refusal());

    /// <summary>Two regions, the second at 16 MiB (host and guest offsets differ); every other page written, the rest never touched.</summary>
    private static GuestMemory Memory()
    {
        var m = GuestMemory.Create([(0UL, 8 * MiB), (16 * MiB, 4 * MiB)]);
        foreach (var r in m.Regions)
            for (ulong a = r.GuestAddress; a < r.End; a += 2 * Page)
                for (ulong o = 0; o < Page; o += 512)
                    m.WriteU64(a + o, a ^ o ^ 0x5a5a5a5a5a5a5a5aUL);
        return m;
    }

    /// <summary>Region i's bytes in the file: after a header page, one after the other.</summary>
    private static ulong[] FileOffsets(GuestMemory m)
    {
        var offsets = new ulong[m.Regions.Count];
        ulong at = (ulong)Header;
        for (int i = 0; i < offsets.Length; i++)
        {
            offsets[i] = at;
            at += m.Regions[i].Size;
        }
        return offsets;
    }

    private static byte[] Copy(GuestMemory m, GuestMemoryRegion r) => m.GetSpan(r.GuestAddress, (int)r.Size).ToArray();

    [SkippableFact]
    public void TheFileHoldsRamAsItWasAtTheProtectionWhileAnotherThreadWritesOn()
    {
        Require();
        using var m = Memory();
        var expected = m.Regions.Select(r => Copy(m, r)).ToArray();
        string path = Path.Combine(_dir, "memory");
        using var file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite);
        using var writer = RamCheckpointWriter.Register(m, file, path, FileOffsets(m));
        writer.Protect();

        // Writes anywhere, written pages and pages never touched alike, until told to stop; the
        // last value each page got is kept to check RAM afterwards.
        var last = new Dictionary<ulong, ulong>();
        bool stop = false;
        long writes = 0;
        var pages = m.Regions.SelectMany(r => Enumerable.Range(0, (int)(r.Size / Page)).Select(i => r.GuestAddress + (ulong)i * Page)).ToArray();
        var toucher = new Thread(() =>
        {
            var random = new Random(7);
            while (!Volatile.Read(ref stop))
            {
                ulong page = pages[random.Next(pages.Length)];
                ulong value = (ulong)random.NextInt64();
                m.WriteU64(page + 8 * (ulong)random.Next(512), 0);       // anywhere in the page
                m.WriteU64(page + 24, value);
                last[page] = value;
                writes++;
            }
        });
        toucher.Start();
        Thread.Sleep(50);                   // the toucher's first writes wait for the fault thread alone
        writer.Start(bytesPerSecond: 8 << 20);
        Assert.True(writer.WaitDone(TimeSpan.FromSeconds(60)), $"not done: {writer.Stats}, {writer.Failure?.Message}");
        Volatile.Write(ref stop, true);
        Assert.True(toucher.Join(TimeSpan.FromSeconds(30)), "the writing thread is stuck in a fault");

        var stats = writer.Stats;
        Assert.Null(writer.Failure);
        Assert.True(stats.Faults > 0 && stats.BytesOnWrite > 0, $"no write waited for its page: {stats}, {writes} writes");
        Assert.Equal(stats.BytesTotal, stats.BytesOnWrite + stats.BytesInBackground);
        Assert.True(stats.BytesWritten < stats.BytesTotal, $"pages of zeros were written: {stats}");

        // The file is RAM at the protection, the pages never touched read as zeros (holes; the
        // file is as long as a snapshot writer makes it, the last pages of zeros included).
        var offsets = FileOffsets(m);
        RandomAccess.SetLength(file, (long)(offsets[^1] + m.Regions[^1].Size));
        for (int i = 0; i < m.Regions.Count; i++)
        {
            var got = new byte[m.Regions[i].Size];
            Assert.Equal(got.Length, RandomAccess.Read(file, got, (long)offsets[i]));
            if (!got.AsSpan().SequenceEqual(expected[i]))
            {
                int at = got.AsSpan().CommonPrefixLength(expected[i]);
                Assert.Fail($"region {i}: the file differs from RAM at the protection from byte 0x{at:x} (guest 0x{m.Regions[i].GuestAddress + (ulong)at:x}) on; {writes} writes");
            }
        }
        // And RAM has every write made meanwhile.
        foreach (var (page, value) in last)
            Assert.Equal(value, m.ReadU64(page + 24));
        Assert.True(writes > 100, $"only {writes} writes during the checkpoint");
    }

    [SkippableFact]
    public void AFileThatCannotBeWrittenEndsTheCheckpointAndTheWriterGoesOn()
    {
        Require();
        using var m = Memory();
        string path = Path.Combine(_dir, "memory");
        File.WriteAllBytes(path, []);
        using var readOnly = File.OpenHandle(path, FileMode.Open, FileAccess.Read);
        using var writer = RamCheckpointWriter.Register(m, readOnly, path, FileOffsets(m));
        writer.Protect();
        var toucher = new Thread(() =>
        {
            foreach (var r in m.Regions)
                for (ulong a = r.GuestAddress; a < r.End; a += Page)
                    m.WriteU64(a, a);
        });
        toucher.Start();
        Assert.True(toucher.Join(TimeSpan.FromSeconds(30)), "a write waits forever on a checkpoint that failed");
        Assert.False(writer.WaitDone(TimeSpan.FromSeconds(30)));
        var failure = Assert.IsType<IOException>(writer.Failure);
        Assert.Contains(path, failure.Message);
        Assert.Contains("errno 9", failure.Message);          // EBADF: not open for writing
        foreach (var r in m.Regions)
            for (ulong a = r.GuestAddress; a < r.End; a += Page)
                Assert.Equal(a, m.ReadU64(a));
    }

    [SkippableFact]
    public void RamHeldByAnotherUserfaultfdIsRefusedNamingIt()
    {
        Require();
        using var m = Memory();
        using var tracer = TouchTracer.Start(m);
        string path = Path.Combine(_dir, "memory");
        using var file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite);
        var e = Assert.Throws<InvalidOperationException>(() => RamCheckpointWriter.Register(m, file, path, FileOffsets(m)));
        Assert.Contains("another userfaultfd", e.Message);
        tracer.Stop();
    }

    [SkippableFact]
    public void DisposedBeforeItIsDoneItLiftsTheProtection()
    {
        Require();
        using var m = Memory();
        string path = Path.Combine(_dir, "memory");
        using var file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite);
        var writer = RamCheckpointWriter.Register(m, file, path, FileOffsets(m));
        writer.Protect();
        writer.Start(bytesPerSecond: 1 << 20);       // 12 s for all: far from done at the dispose
        writer.Dispose();
        Assert.False(writer.Stats.Done);
        Assert.False(writer.WaitDone(TimeSpan.Zero));
        // Ordinary memory again: this thread's writes do not wait.
        foreach (var r in m.Regions)
            for (ulong a = r.GuestAddress; a < r.End; a += Page)
                m.WriteU64(a, ~a);
        Assert.Equal(~(16 * MiB), m.ReadU64(16 * MiB));
    }
}
