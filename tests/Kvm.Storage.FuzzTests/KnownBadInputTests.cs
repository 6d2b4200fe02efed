using System.Buffers.Binary;
using Kvm.Storage.Qcow2;

namespace Kvm.Storage.FuzzTests;

/// <summary>
/// Inputs the fuzzer found (or that follow from what it found), pinned as exact reproductions so
/// that each one has a test of its own. Each runs the same read-only (and, where it matters,
/// read-write) case as the fuzzer and must pass the same criteria.
/// </summary>
public sealed class KnownBadInputTests : IDisposable
{
    private readonly string _dir = Corpus.Dir($"known-bad-{Guid.NewGuid():N}");

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Image(string name, ulong size, int clusterSize, Action<IBlockImage>? fill = null)
    {
        var path = Path.Combine(_dir, name);
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize }))
            fill?.Invoke(img);
        return path;
    }

    private static void Poke64(byte[] b, long at, ulong v) => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan((int)at), v);
    private static void Poke32(byte[] b, long at, uint v) => BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan((int)at), v);

    private static void AssertPasses(string path, bool readWriteToo = false)
    {
        var failures = new List<string>();
        var ro = FuzzHarness.RunReadOnly(path, [new WatchedFile(path, fullHash: true)], new Random(1));
        if (ro.Failure is not null)
            failures.Add($"read-only: outcome '{ro.Outcome}': {ro.Failure}");
        if (readWriteToo)
        {
            var rw = FuzzHarness.RunReadWrite(path, [], new Random(1));
            if (rw.Failure is not null)
                failures.Add($"read-write: outcome '{rw.Outcome}': {rw.Failure}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    /// <summary>
    /// A refcount table entry of 0xfffffffffffff000 passes the open-time bounds check because
    /// offset + cluster size wraps to 0 (Qcow2Image.Refcounts.cs, LoadRefcountTable); the first
    /// refcount lookup (Check, or any allocating write) then reads at a negative file offset.
    /// </summary>
    [Fact]
    public void RefcountBlockOffsetThatWrapsAround()
    {
        var path = Image("rt-wrap.qcow2", 1 << 20, 4096, img => img.Write(0, new byte[5000]));
        var b = File.ReadAllBytes(path);
        ulong rt = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan(48));
        Poke64(b, (long)rt, ulong.MaxValue - 4095); // refcount table entry 0
        File.WriteAllBytes(path, b);
        AssertPasses(path, readWriteToo: true);
    }

    /// <summary>
    /// A snapshot whose l1_table_offset is 2^64 - 4096 with l1_size 1024: offset + size wraps, so
    /// Check's bounds test passes (Qcow2Image.Check.cs, CountSnapshots) and CountL1 reads at a
    /// negative file offset.
    /// </summary>
    [Fact]
    public void SnapshotL1TableOffsetThatWrapsAround()
    {
        var path = Image("snap-wrap.qcow2", 1 << 20, 4096, img => img.Write(0, new byte[5000]));
        var b = File.ReadAllBytes(path);
        int table = b.Length;
        Array.Resize(ref b, b.Length + 4096); // a snapshot table in a cluster of its own at the end
        Poke64(b, table, ulong.MaxValue - 4095);  // l1_table_offset
        Poke32(b, table + 8, 1024);               // l1_size
        Poke32(b, 60, 1);                         // nb_snapshots
        Poke64(b, 64, (ulong)table);              // snapshots_offset
        File.WriteAllBytes(path, b);
        AssertPasses(path);
    }

    /// <summary>
    /// Every entry of the L1 table's cluster points at the same L2 table (l1_size raised to match).
    /// Check reads that L2 table again, into a new cluster-sized buffer, for every L1 entry: 8192
    /// entries x 64 KiB = 512 MiB allocated for a 1 MiB file (with 2 MiB clusters, 262144 entries
    /// x 2 MiB = 512 GiB, minutes of work).
    /// </summary>
    [Fact]
    public void L1EntriesAliasingOneL2Table()
    {
        var path = Image("l1-alias.qcow2", 4 << 20, 65536, img => img.Write(0, new byte[5000]));
        var b = File.ReadAllBytes(path);
        ulong l1 = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan(40));
        ulong l2 = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan((int)l1));
        for (int i = 0; i < 8192; i++)
            Poke64(b, (long)l1 + i * 8, l2);
        Poke32(b, 36, 8192);
        File.WriteAllBytes(path, b);
        AssertPasses(path);
    }

    /// <summary>
    /// The same aliasing with 2 MiB clusters, over the whole L1 cluster: 262144 L1 entries naming
    /// one L2 table in a 12 MiB file. Before the check stopped re-walking aliased tables this took
    /// minutes (the table was parsed 262144 times); now each alias adds one line to
    /// CheckResult.Problems, ~350 bytes apiece, ~91 MiB in all, kept in the result: the problem
    /// list has no cap, so its size grows with the file (a 32 MiB L1 table would be ~1.4 GiB).
    /// </summary>
    [Fact]
    public void L1EntriesAliasingOneL2Table_2MiBClusters()
    {
        var path = Image("l1-alias-2m.qcow2", 64 << 20, 2 << 20, img => img.Write(0, new byte[4096]));
        var b = File.ReadAllBytes(path);
        ulong l1 = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan(40));
        ulong l2 = BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan((int)l1));
        const int entries = (2 << 20) / 8;
        for (int i = 0; i < entries; i++)
            Poke64(b, (long)l1 + i * 8, l2);
        Poke32(b, 36, entries);
        File.WriteAllBytes(path, b);
        AssertPasses(path);
    }

    /// <summary>
    /// A valid, empty image of 512 TiB with 2 MiB clusters (an 8 MiB file): GetAllocation walks the
    /// range one cluster at a time (2^28 iterations, about 3 s here), even where whole L1 entries
    /// are empty; at the largest size the header allows (2^62 bytes) that is hours.
    /// </summary>
    [Fact]
    public void AllocationMapOfAHugeSparseImage()
    {
        var path = Image("huge.qcow2", 1UL << 49, 2 << 20);
        AssertPasses(path);
    }
}
