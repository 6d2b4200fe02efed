namespace Kvm.Vmm.Snapshot;

/// <summary>
/// The rules a snapshot's contents follow, checked by the reader on every file and by the writer
/// before it writes, so that nothing is written that the reader would refuse. Each returns why a
/// value breaks a rule, or null.
/// </summary>
internal static class SnapshotRules
{
    private const ulong Page = SnapshotFormat.PageSize;

    /// <summary>Region <paramref name="r"/>, after <paramref name="previous"/> (null for the first).</summary>
    public static string? RegionProblem(SnapshotRegion r, SnapshotRegion? previous)
    {
        if (r.Size == 0)
            return "its size is 0";
        if (r.GuestAddress % Page != 0)
            return $"guest address 0x{r.GuestAddress:x} is not a multiple of the page size {Page}";
        if (r.Size % Page != 0)
            return $"size 0x{r.Size:x} is not a multiple of the page size {Page}";
        if (r.GuestAddress >= SnapshotFormat.MaxGuestAddress || r.Size > SnapshotFormat.MaxGuestAddress - r.GuestAddress)
            return $"guest range 0x{r.GuestAddress:x} + 0x{r.Size:x} ends beyond 0x{SnapshotFormat.MaxGuestAddress:x} (2^52)";
        if (previous is { } p && r.GuestAddress < p.GuestEnd)
            return $"guest address 0x{r.GuestAddress:x} is below the end 0x{p.GuestEnd:x} of the region before it (regions ascend without overlap)";
        ulong expected = previous is { } q ? q.FileOffset + q.Size : (ulong)SnapshotFormat.MemoryHeaderSize;
        if (r.FileOffset != expected)
            return $"file offset {r.FileOffset}, expected {expected} (regions lie back to back after the {SnapshotFormat.MemoryHeaderSize}-byte header page)";
        return null;
    }

    /// <summary>The memory data size <paramref name="dataSize"/> against the regions' sizes added up.</summary>
    public static string? DataSizeProblem(IReadOnlyList<SnapshotRegion> regions, ulong dataSize)
    {
        ulong sum = regions.Count == 0 ? 0 : regions[^1].FileOffset + regions[^1].Size - SnapshotFormat.MemoryHeaderSize;
        return sum == dataSize ? null : $"memory data size {dataSize} is not the {sum} bytes its regions add up to";
    }

    /// <summary>Working-set range <paramref name="r"/> after <paramref name="previous"/>, inside guest RAM <paramref name="regions"/>.</summary>
    public static string? RangeProblem(GuestPageRange r, GuestPageRange? previous, IReadOnlyList<SnapshotRegion> regions)
    {
        const ulong maxPage = SnapshotFormat.MaxGuestAddress / Page;
        if (r.PageCount == 0)
            return "its page count is 0";
        if (r.FirstPage >= maxPage || r.PageCount > maxPage - r.FirstPage)
            return $"pages 0x{r.FirstPage:x} + 0x{r.PageCount:x} end beyond page 0x{maxPage:x} (guest address 2^52)";
        if (previous is { } p && r.FirstPage < p.EndPage)
            return $"first page 0x{r.FirstPage:x} is below the end 0x{p.EndPage:x} of the range before it (ranges ascend without overlap)";
        ulong page = r.FirstPage, end = r.EndPage;
        int i = FirstRegionEndingAfter(regions, page * Page);
        while (page < end)
        {
            if (i >= regions.Count || regions[i].GuestAddress > page * Page)
                return $"guest page 0x{page:x} (address 0x{page * Page:x}) is not in guest RAM";
            page = Math.Min(end, regions[i].GuestEnd / Page);
            i++;
        }
        return null;
    }

    /// <summary>The index of the first region whose end lies above <paramref name="address"/> (regions ascend).</summary>
    private static int FirstRegionEndingAfter(IReadOnlyList<SnapshotRegion> regions, ulong address)
    {
        int lo = 0, hi = regions.Count;
        while (lo < hi)
        {
            int mid = (lo + hi) >>> 1;
            if (regions[mid].GuestEnd <= address)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo;
    }
}
