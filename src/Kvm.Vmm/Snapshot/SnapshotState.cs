using Kvm.Hypervisor.State;

namespace Kvm.Vmm.Snapshot;

/// <summary>
/// A RAM region of the guest and where its bytes lie in the memory file: <paramref name="Size"/>
/// bytes from guest address <paramref name="GuestAddress"/>, at <paramref name="FileOffset"/> in the
/// memory file (page-aligned, so that a restore can mmap it there).
/// </summary>
public readonly record struct SnapshotRegion(ulong GuestAddress, ulong Size, ulong FileOffset)
{
    /// <summary>The guest address just past the region.</summary>
    public ulong GuestEnd => GuestAddress + Size;

    /// <summary>
    /// The layout of guest RAM <paramref name="ram"/> (guest address and size of each region, in
    /// ascending guest order) in the memory file: the regions back to back after the header page.
    /// </summary>
    public static SnapshotRegion[] Layout(IEnumerable<(ulong GuestAddress, ulong Size)> ram)
    {
        var regions = new List<SnapshotRegion>();
        ulong offset = SnapshotFormat.MemoryHeaderSize;
        foreach (var (address, size) in ram)
        {
            regions.Add(new SnapshotRegion(address, size, offset));
            offset += size;
        }
        return [.. regions];
    }
}

/// <summary>
/// <paramref name="PageCount"/> guest pages (of <see cref="SnapshotFormat.PageSize"/> bytes) from
/// guest page number <paramref name="FirstPage"/> (the guest address divided by the page size).
/// </summary>
public readonly record struct GuestPageRange(ulong FirstPage, ulong PageCount)
{
    /// <summary>The page number just past the range.</summary>
    public ulong EndPage => FirstPage + PageCount;

    /// <summary>Guest page numbers, in any order and with repeats, as the fewest ascending disjoint ranges.</summary>
    public static GuestPageRange[] FromPages(IEnumerable<ulong> pages)
    {
        var sorted = pages.ToArray();
        Array.Sort(sorted);
        var ranges = new List<GuestPageRange>();
        int i = 0;
        while (i < sorted.Length)
        {
            ulong first = sorted[i], next = first + 1;
            i++;
            while (i < sorted.Length && sorted[i] <= next)
            {
                if (sorted[i] == next)
                    next++;
                i++;
            }
            ranges.Add(new GuestPageRange(first, next - first));
        }
        return [.. ranges];
    }
}

/// <summary>
/// What a snapshot's state file holds: its id (shared with its memory file), when it was taken,
/// the VM spec (JSON, as the caller serialised it), the layout of guest RAM in the memory file,
/// the working set recorded while saving (if any), and the state records by id.
/// </summary>
public sealed class SnapshotState
{
    /// <summary>128 random bits naming this snapshot; the memory file carries the same.</summary>
    public required Guid Id { get; init; }

    /// <summary>When the snapshot was taken (kept to 100 ns; read back in UTC).</summary>
    public required DateTimeOffset Created { get; init; }

    /// <summary>The VM spec as JSON (see <c>VmSpecJson</c>); the snapshot format does not look inside it.</summary>
    public required string SpecJson { get; init; }

    /// <summary>Guest RAM and where each region lies in the memory file (see <see cref="SnapshotRegion.Layout"/>).</summary>
    public required IReadOnlyList<SnapshotRegion> Regions { get; init; }

    /// <summary>
    /// The guest pages touched while the snapshot was saved, ascending and disjoint, for a restore
    /// to load first; null when none was recorded.
    /// </summary>
    public IReadOnlyList<GuestPageRange>? WorkingSet { get; init; }

    /// <summary>
    /// The state records (each owner's <see cref="StateRecord"/>), in the order they were written:
    /// ids unique, ids and kinds 1 to <see cref="SnapshotFormat.MaxNameBytes"/> characters of
    /// A-Z a-z 0-9 . _ : / -, payloads at most <see cref="SnapshotFormat.MaxPayloadBytes"/>.
    /// </summary>
    public required IReadOnlyList<StateRecord> Records { get; init; }

    /// <summary>The bytes of guest RAM in the memory file after its header page: the regions' sizes added up.</summary>
    public ulong MemoryDataSize
    {
        get
        {
            ulong total = 0;
            foreach (var r in Regions)
                total += r.Size;
            return total;
        }
    }

    /// <summary>The record with id <paramref name="id"/>, or null.</summary>
    public StateRecord? FindRecord(string id)
    {
        foreach (var r in Records)
            if (r.Id == id)
                return r;
        return null;
    }

    /// <summary>
    /// A new snapshot's state: a fresh random id, the current time, and guest RAM
    /// <paramref name="ram"/> laid out back to back in the memory file.
    /// </summary>
    public static SnapshotState Create(
        string specJson,
        IEnumerable<(ulong GuestAddress, ulong Size)> ram,
        IEnumerable<StateRecord> records,
        IReadOnlyList<GuestPageRange>? workingSet = null) => new()
        {
            Id = NewId(),
            Created = DateTimeOffset.UtcNow,
            SpecJson = specJson,
            Regions = SnapshotRegion.Layout(ram),
            WorkingSet = workingSet,
            Records = [.. records],
        };

    /// <summary>
    /// 128 random bits (not a version-4 GUID, whose version and variant bits are fixed). An id
    /// tells snapshots apart, it guards no secret: <see cref="Random.Shared"/> (seeded from the
    /// kernel's random source) serves, where RandomNumberGenerator would load OpenSSL on first use,
    /// 70-80 ms measured in the nested host, inside the pause of a hand-over.
    /// </summary>
    public static Guid NewId()
    {
        Span<byte> bytes = stackalloc byte[16];
        Random.Shared.NextBytes(bytes);
        return new Guid(bytes, bigEndian: true);
    }
}
