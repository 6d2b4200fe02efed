namespace Kvm.Hypervisor.Tests;

/// <summary>
/// The device-dirty bitmap: every GuestMemory method that writes or hands out writable memory
/// marks exactly the pages it covers while tracking is on; reads mark nothing; take-and-clear
/// loses no mark under concurrent writers.
/// </summary>
public class DeviceDirtyTests
{
    private const ulong Page = GuestMemory.PageSize;
    private const ulong High = 4UL << 30;

    /// <summary>1 MiB at 0 and 1 MiB at 4 GiB (256 pages each).</summary>
    private static GuestMemory TwoRegions(bool track = true)
    {
        var m = GuestMemory.Create([(0UL, 1UL << 20), (High, 1UL << 20)]);
        m.TrackDeviceWrites = track;
        return m;
    }

    /// <summary>The dirty pages' guest addresses over every region's bitmap.</summary>
    private static ulong[] Dirty(GuestMemory m) => m.TakeDeviceDirty().SelectMany(b => b.DirtyAddresses()).ToArray();

    private static ulong[] Pages(params ulong[] addresses) => addresses;

    private static ulong[] PageRange(ulong first, int count) =>
        Enumerable.Range(0, count).Select(i => first + (ulong)i * Page).ToArray();

    public static TheoryData<string> Writers => new()
    {
        "Write", "WriteU8", "WriteU16", "WriteU32", "WriteU64", "VolatileWriteU16", "Clear",
        "GetWritableSpan", "AppendWritableMemory", "MarkWritten",
    };

    /// <summary>Writes <paramref name="length"/> bytes at <paramref name="gpa"/> the way <paramref name="method"/> does.</summary>
    private static void WriteWith(GuestMemory m, string method, ulong gpa, int length)
    {
        switch (method)
        {
            case "Write": m.Write(gpa, new byte[length]); break;
            case "WriteU8": Assert.Equal(1, length); m.WriteU8(gpa, 1); break;
            case "WriteU16": Assert.Equal(2, length); m.WriteU16(gpa, 1); break;
            case "WriteU32": Assert.Equal(4, length); m.WriteU32(gpa, 1); break;
            case "WriteU64": Assert.Equal(8, length); m.WriteU64(gpa, 1); break;
            case "VolatileWriteU16": Assert.Equal(2, length); m.VolatileWriteU16(gpa, 1); break;
            case "Clear": m.Clear(gpa, length); break;
            case "GetWritableSpan": m.GetWritableSpan(gpa, length).Fill(3); break;
            case "AppendWritableMemory":
                var pieces = new List<Memory<byte>>();
                m.AppendWritableMemory(gpa, (ulong)length, pieces);
                foreach (var p in pieces)
                    p.Span.Fill(4);
                break;
            case "MarkWritten": m.MarkWritten(gpa, (ulong)length); break;
            default: throw new ArgumentException(method);
        }
    }

    private static int FixedLength(string method) => method switch
    {
        "WriteU8" => 1,
        "WriteU16" or "VolatileWriteU16" => 2,
        "WriteU32" => 4,
        "WriteU64" => 8,
        _ => 0,
    };

    [Theory]
    [MemberData(nameof(Writers))]
    public void EachWriterMarksExactlyThePagesItCovers(string method)
    {
        using var m = TwoRegions();
        int fixedLength = FixedLength(method);

        // Inside one page, in each region.
        WriteWith(m, method, 0x3010, fixedLength == 0 ? 16 : fixedLength);
        Assert.Equal(Pages(0x3000), Dirty(m));
        WriteWith(m, method, High + 0x5ff0, fixedLength == 0 ? 16 : fixedLength);
        Assert.Equal(Pages(High + 0x5000), Dirty(m));

        // Across a page boundary: both pages; across a 64-page word of the bitmap too (a byte cannot).
        if (fixedLength != 1)
        {
            WriteWith(m, method, 0x7fff, fixedLength == 0 ? 2 : fixedLength);
            Assert.Equal(Pages(0x7000, 0x8000), Dirty(m));
            WriteWith(m, method, 64 * Page - 1, fixedLength == 0 ? 2 : fixedLength);
            Assert.Equal(Pages(63 * Page, 64 * Page), Dirty(m));
        }
        // The last bytes of a region: its last page.
        WriteWith(m, method, High + (1UL << 20) - (ulong)Math.Max(fixedLength, 1), Math.Max(fixedLength, 1));
        Assert.Equal(Pages(High + (1UL << 20) - Page), Dirty(m));

        if (fixedLength == 0)
        {
            // Many pages over several words, starting and ending inside pages.
            WriteWith(m, method, 60 * Page + 100, (int)(70 * Page));
            Assert.Equal(PageRange(60 * Page, 71), Dirty(m));
            // A whole region.
            WriteWith(m, method, High, 1 << 20);
            Assert.Equal(PageRange(High, 256), Dirty(m));
            // Nothing written, nothing marked.
            WriteWith(m, method, 0x9000, 0);
            Assert.Empty(Dirty(m));
        }
        Assert.Empty(Dirty(m)); // the take cleared what it returned
    }

    [Theory]
    [MemberData(nameof(Writers))]
    public void RefusedWritesMarkNothing(string method)
    {
        using var m = TwoRegions();
        int length = FixedLength(method) is var n and > 0 ? n : 16;
        // Off the end of the low region (its last page is RAM), in the gap, and wrapping around.
        Assert.Throws<GuestMemoryException>(() => WriteWith(m, method, (1UL << 20) - (ulong)length + 1, length));
        Assert.Throws<GuestMemoryException>(() => WriteWith(m, method, High - 1, length));
        Assert.Throws<GuestMemoryException>(() => WriteWith(m, method, ulong.MaxValue - 3, length));
        Assert.Empty(Dirty(m));
    }

    [Fact]
    public void ReadsMarkNothing()
    {
        using var m = TwoRegions();
        var buffer = new byte[3 * Page];
        m.Read(0x1000, buffer);
        _ = m.ReadU8(0x2000) + m.ReadU16(0x2ffe) + m.ReadU32(High + 8) + (int)m.ReadU64(High + 0x3ffc) + m.VolatileReadU16(0x4000);
        _ = m.GetSpan(0x5000, 8192).IndexOfAnyExcept((byte)0);
        Assert.True(m.TryGetSpan(High + 0x6000, 100, out var span) && span.Length == 100);
        var pieces = new List<ReadOnlyMemory<byte>>();
        m.AppendMemory(0x7000, 3 * Page, pieces);
        Assert.True(m.IsValid(0x8000, 1));
        Assert.NotNull(m.FindRegion(High, 1));
        Assert.Empty(Dirty(m));
    }

    [Fact]
    public void TrackingIsOffUntilTurnedOnAndStartsCleanEachTime()
    {
        using var m = TwoRegions(track: false);
        Assert.False(m.TrackDeviceWrites);
        m.WriteU64(0x1000, 1);
        Assert.Throws<InvalidOperationException>(() => m.TakeDeviceDirty());

        m.TrackDeviceWrites = true;
        var bitmaps = m.TakeDeviceDirty();
        Assert.Equal([0UL, High], bitmaps.Select(b => b.GuestAddress));
        Assert.Equal([256UL, 256UL], bitmaps.Select(b => b.Pages));
        Assert.All(bitmaps, b => Assert.Equal(0, b.CountDirty())); // the write before tracking is not there

        m.WriteU64(0x2000, 1);
        m.TrackDeviceWrites = true;                                 // already on: keeps its marks
        Assert.Equal(Pages(0x2000), Dirty(m));
        m.WriteU64(0x3000, 1);
        m.TrackDeviceWrites = false;
        m.TrackDeviceWrites = true;                                 // off and on: starts clean
        Assert.Empty(Dirty(m));
    }

    [Fact]
    public void MarksOfOneMappingAreItsOwn()
    {
        // The bitmap belongs to the GuestMemory a device writes through, not to the memfd.
        using var m = TwoRegions();
        using var view = GuestMemory.Attach(m.BackingFd, m.Layout);
        view.WriteU64(0x1000, 5);
        Assert.Empty(Dirty(m));
        Assert.Equal(5UL, m.ReadU64(0x1000));
    }

    [Fact]
    public void TakeAndClearLosesNoMarkUnderConcurrentWriters()
    {
        // Four writers each write every fourth page of 64 MiB exactly once, in order, so the pages
        // of one 64-page word are marked by all four threads; a fifth thread takes all the while.
        // Every page must show up in exactly one take: a take that read a word and cleared it in
        // two steps would lose the marks made in between.
        const int Writers = 4;
        const ulong Size = 64UL << 20;
        using var m = GuestMemory.Create([(0UL, Size)]);
        m.TrackDeviceWrites = true;
        ulong pages = Size / Page;
        var seen = new int[pages];
        int running = Writers;
        var writers = Enumerable.Range(0, Writers).Select(t => new Thread(() =>
        {
            for (ulong p = (ulong)t; p < pages; p += Writers)
                m.WriteU32(p * Page + (p % 1000), (uint)p);
            Interlocked.Decrement(ref running);
        })).ToArray();

        void Collect()
        {
            foreach (var bitmap in m.TakeDeviceDirty())
                foreach (var address in bitmap.DirtyAddresses())
                    seen[address / Page]++;
        }

        int takes = 0;
        foreach (var w in writers)
            w.Start();
        while (Volatile.Read(ref running) > 0)
        {
            Collect();
            takes++;
        }
        foreach (var w in writers)
            w.Join();
        Collect();

        Assert.True(takes > 1, "the taker ran while the writers did");
        var wrong = Enumerable.Range(0, (int)pages).Where(p => seen[p] != 1).Take(10).ToArray();
        Assert.True(wrong.Length == 0, $"pages not seen exactly once: {string.Join(", ", wrong.Select(p => $"{p} ({seen[p]}x)"))}");
    }

    [Fact]
    public void ConcurrentWritersToOnePageLeaveItMarked()
    {
        // Several threads keep writing the same few pages while one takes: after they stop, the
        // last writes are in the final take or an earlier one, and a write after a take marks again.
        using var m = TwoRegions();
        bool stop = false;
        var writers = Enumerable.Range(0, 3).Select(t => new Thread(() =>
        {
            while (!Volatile.Read(ref stop))
                m.WriteU16(High + (ulong)t * Page + 2, (ushort)t);
        })).ToArray();
        foreach (var w in writers)
            w.Start();
        var union = new HashSet<ulong>();
        var until = DateTime.UtcNow.AddMilliseconds(200);
        while (DateTime.UtcNow < until)
            union.UnionWith(Dirty(m));
        Volatile.Write(ref stop, true);
        foreach (var w in writers)
            w.Join();
        union.UnionWith(Dirty(m));
        Assert.Equal(PageRange(High, 3), union.Order());
        m.WriteU16(High + 2, 9);
        Assert.Equal(Pages(High), Dirty(m));
    }
}
