using Kvm.Hypervisor;
using Kvm.Tests.Shared;
using Kvm.Vmm.Snapshot;
using Microsoft.Extensions.Logging.Abstractions;
using static Kvm.Vmm.Tests.Snapshot.SnapshotTestData;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>
/// The lazy loader on real guest RAM (a memfd) and a real snapshot memory file, without KVM:
/// managed threads of the VMM touch pages not yet loaded, as device workers do after a lazy
/// restore. Needs a userfaultfd (root, as CI runs), not /dev/kvm.
/// </summary>
public sealed class LazyMemoryLoaderTests
{
    private const int Page = 4096, Chunk = LazyMemoryLoader.ChunkSize;

    private static void Require() =>
        TestEnvironment.SkipIf(Userfaultfd.IsAvailable() ? null : "userfaultfd is not allowed here (needs root, or access to /dev/userfaultfd)");

    /// <summary>The snapshot's RAM: one page with data in every 64 KiB chunk of both regions, the rest zeros.</summary>
    private static PageMemory Content()
    {
        var m = new PageMemory();
        int seed = 1;
        foreach (var (start, size) in Layout)
            for (ulong a = start; a < start + size; a += Chunk)
                m.Fill(a + (ulong)(seed % 16) * Page, 1, seed++);
        return m;
    }

    private static readonly (ulong Start, ulong Size)[] Layout = [(0, 8UL << 20), (HighRam, 4UL << 20)];

    /// <summary>Writes the snapshot, opens its memory file and registers fresh RAM for it.</summary>
    private static (GuestMemory Ram, LazyMemoryLoader Loader, PageMemory Content, string MemoryPath) Restore(TempDir dir)
    {
        var content = Content();
        var state = State(workingSet: false);
        var written = SnapshotWriter.Write(dir.Path, state, content);
        var file = SnapshotMemoryFile.Open(dir.Path, SnapshotReader.Read(dir.Path));
        var ram = GuestMemory.Create(Layout);
        return (ram, LazyMemoryLoader.Register(ram, file, NullLogger.Instance), content, written.MemoryPath);
    }

    private static byte[] Expected(PageMemory content, ulong address, int length)
    {
        var bytes = new byte[length];
        content.Read(address, bytes);
        return bytes;
    }

    [SkippableFact]
    public void TouchedPagesComeFromTheFileAndTheBackgroundLoaderBringsTheRest()
    {
        Require();
        using var dir = new TempDir();
        var (ram, loader, content, _) = Restore(dir);
        using (ram)
        using (loader)
        {
            // A working set first: two chunks of the low region, one of the high.
            loader.LoadFirst([new GuestPageRange(16, 32), new GuestPageRange(HighRam / Page + 16, 1)]);
            Assert.Equal(3L * Chunk, loader.Stats.BytesFirst);

            // Touches from a managed thread: each waits for its chunk, which comes from the file.
            ulong[] touched = [5 * (ulong)Chunk + 7 * Page, HighRam + 33 * (ulong)Chunk, (8UL << 20) - 8];
            var seen = new Dictionary<ulong, byte[]>();
            var toucher = new Thread(() =>
            {
                foreach (ulong a in touched)
                {
                    var bytes = new byte[8];
                    ram.Read(a, bytes);
                    seen[a] = bytes;
                }
            });
            toucher.Start();
            Assert.True(toucher.Join(TimeSpan.FromSeconds(30)), "a thread touching guest RAM was never let go");
            foreach (ulong a in touched)
                Assert.Equal(Expected(content, a, 8), seen[a]);
            var stats = loader.Stats;
            Assert.Equal(3, stats.Faults);
            Assert.Equal(3L * Chunk, stats.BytesOnTouch);
            Assert.False(stats.Done);

            loader.Start();
            Assert.True(loader.WaitDone(TimeSpan.FromSeconds(60)), "the background loader did not finish");
            stats = loader.Stats;
            Assert.True(stats.Done);
            Assert.Equal(stats.BytesTotal, stats.BytesFirst + stats.BytesOnTouch + stats.BytesInBackground);
            foreach (var (start, size) in Layout)
                Assert.True(Expected(content, start, (int)size).AsSpan().SequenceEqual(ram.GetSpan(start, (int)size)),
                    $"the region at 0x{start:x} differs from the snapshot after the load");
        }
    }

    /// <summary>
    /// The deadlock the native fault thread exists for: managed threads blocked in faults on pages
    /// not loaded while garbage collections run. A managed fault thread could wait for a
    /// collection that waits for a thread blocked in a fault; the native one never does.
    /// </summary>
    [SkippableFact]
    public void ManagedThreadsTouchingUnloadedPagesDuringGarbageCollectionsAllGetTheirPages()
    {
        Require();
        using var dir = new TempDir();
        var (ram, loader, content, _) = Restore(dir);
        using (ram)
        using (loader)
        {
            // No background loader: every chunk comes in through a touch.
            const int Threads = 8;
            var errors = new List<string>();
            var done = new CountdownEvent(Threads);
            bool collecting = true;
            var collector = new Thread(() =>
            {
                while (Volatile.Read(ref collecting))
                {
                    _ = new byte[64 << 10];
                    GC.Collect(2, GCCollectionMode.Forced, blocking: true);
                }
            }) { IsBackground = true };
            collector.Start();
            for (int t = 0; t < Threads; t++)
            {
                int id = t;
                new Thread(() =>
                {
                    try
                    {
                        // Every chunk of the low region, each thread its own share, one page of data each.
                        for (ulong c = (ulong)id; c < (8UL << 20) / Chunk; c += Threads)
                        {
                            ulong a = c * Chunk + (ulong)((int)(c + 1) % 16) * Page;
                            // A managed read of guest RAM (one load, in code the runtime cannot stop
                            // anywhere but at its return): the fault is taken here.
                            ulong got = ram.ReadU64(a);
                            if (got != BitConverter.ToUInt64(Expected(content, a, 8)))
                                lock (errors)
                                    errors.Add($"0x{a:x}");
                            _ = new byte[1024];                        // keep the collector busy
                        }
                    }
                    finally
                    {
                        done.Signal();
                    }
                }) { IsBackground = true }.Start();
            }
            bool finished = done.Wait(TimeSpan.FromSeconds(120));
            Volatile.Write(ref collecting, false);
            Assert.True(finished, $"{done.CurrentCount} of {Threads} threads touching guest RAM never finished while garbage collections ran (a deadlock)");
            collector.Join();
            Assert.Empty(errors);
            Assert.Equal(8L << 20, loader.Stats.BytesOnTouch);
        }
    }

    [SkippableFact]
    public void AMemoryFileCutShortFailsTheLoadNamingTheFileAndNoThreadWaitsForever()
    {
        Require();
        using var dir = new TempDir();
        var (ram, loader, _, memoryPath) = Restore(dir);
        using (ram)
        using (loader)
        {
            Exception? failure = null;
            var failed = new ManualResetEventSlim();
            loader.Failed = e =>
            {
                failure = e;
                failed.Set();
            };
            // Cut the file in the middle of the high region (checked when it was opened): its last chunks cannot be read.
            long length = new FileInfo(memoryPath).Length;
            using (var f = new FileStream(memoryPath, FileMode.Open, FileAccess.Write))
                f.SetLength(length - (2L << 20));
            byte[]? read = null;
            var toucher = new Thread(() =>
            {
                read = new byte[8];
                ram.Read(HighRam + (4UL << 20) - 8, read);
            });
            toucher.Start();
            Assert.True(toucher.Join(TimeSpan.FromSeconds(30)), "the thread touching a page that cannot be loaded waits forever");
            Assert.True(failed.Wait(TimeSpan.FromSeconds(30)), "the failure was not reported");
            Assert.Contains(memoryPath, failure!.Message, StringComparison.Ordinal);
            Assert.Contains("cut short", failure.Message, StringComparison.Ordinal);
            Assert.Equal(new byte[8], read);    // RAM not loaded reads as zeros once the loader gave up
            Assert.False(loader.WaitDone(TimeSpan.Zero));
            // A handler set after the failure hears of it at once.
            Exception? late = null;
            loader.Failed = e => late = e;
            Assert.Same(failure, late);
        }
    }
}
