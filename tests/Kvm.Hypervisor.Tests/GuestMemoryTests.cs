namespace Kvm.Hypervisor.Tests;

public class GuestMemoryTests
{
    [Fact]
    public void ReadsAndWritesInsideRegions()
    {
        using var m = GuestMemory.Create([(0UL, 1UL << 20), (4UL << 30, 1UL << 20)]);
        m.WriteU64(0x1000, 0x1122334455667788);
        m.WriteU32((4UL << 30) + 8, 0xdeadbeef);
        Assert.Equal(0x1122334455667788UL, m.ReadU64(0x1000));
        Assert.Equal(0xdeadbeefu, m.ReadU32((4UL << 30) + 8));
        Assert.Equal(2UL << 20, m.TotalSize);
    }

    [Theory]
    [InlineData(0x100000UL, 1)]          // just past the first region
    [InlineData(0xffffcUL, 8)]           // straddles its end
    [InlineData(0x200000UL, 4)]          // in the hole
    [InlineData(ulong.MaxValue - 3, 8)]  // wraps around
    public void RefusesAccessOutsideRam(ulong gpa, int length)
    {
        using var m = GuestMemory.Create([(0UL, 1UL << 20), (4UL << 30, 1UL << 20)]);
        Assert.Throws<GuestMemoryException>(() => m.GetSpan(gpa, length));
        Assert.Throws<GuestMemoryException>(() => m.GetWritableSpan(gpa, length));
        Assert.Throws<GuestMemoryException>(() => m.Write(gpa, new byte[length]));
        Assert.Throws<GuestMemoryException>(() => m.Read(gpa, new byte[length]));
        Assert.Throws<GuestMemoryException>(() => m.Clear(gpa, length));
        Assert.Throws<GuestMemoryException>(() => m.MarkWritten(gpa, (ulong)length));
        Assert.False(m.TryGetSpan(gpa, length, out _));
        Assert.False(m.IsValid(gpa, (ulong)length));
    }

    [Fact]
    public void RefusesNegativeLength()
    {
        using var m = GuestMemory.Create([(0UL, 1UL << 20)]);
        Assert.Throws<GuestMemoryException>(() => m.GetSpan(0, -1));
        Assert.Throws<GuestMemoryException>(() => m.GetWritableSpan(0, -1));
        Assert.Throws<GuestMemoryException>(() => m.Clear(0, -1));
    }

    [Fact]
    public void RefusesUnalignedRanges()
    {
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0x800UL, 1UL << 20)]));
        Assert.Contains("not aligned", e.Message);
    }

    [Fact]
    public void RefusesMoreMemoryThanTheHostHas()
    {
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 1UL << 46)]));
        Assert.Contains("larger than the host's memory", e.Message);
    }

    [Fact]
    public void HugeTlbBeyondTheReservedPoolIsExplained()
    {
        // No host reserves a terabyte of hugetlb pages; the error must say how to get more.
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 1UL << 40)], HugePageMode.HugeTlb));
        Assert.Contains("hugetlb pages", e.Message);
        Assert.Contains("nr_hugepages", e.Message);
    }

    [Fact]
    public void TransparentHugePagesMapWhereShmemThpIsOnAndAreRefusedClearlyElsewhere()
    {
        // Guest RAM is a memfd: its THP are shmem THP, which shmem_enabled governs (not enabled).
        if (GuestMemory.ShmemThpRefusal() is { } why)
        {
            var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 8UL << 20)], HugePageMode.Transparent));
            Assert.Contains("/sys/kernel/mm/transparent_hugepage/", e.Message);
            Assert.Contains("shmem_enabled is '", e.Message);
            Assert.Contains(why, e.Message);
            return;
        }
        using var m = GuestMemory.Create([(0UL, 8UL << 20)], HugePageMode.Transparent);
        Assert.Equal(0UL, (ulong)m.Regions[0].Host % GuestMemory.HugePageSize);
        m.WriteU64((6UL << 20) + 16, 42);
        Assert.Equal(42UL, m.ReadU64((6UL << 20) + 16));
    }

    [Fact]
    public void FreshMemoryReadsAsZero()
    {
        using var m = GuestMemory.Create([(0UL, 2UL << 20)]);
        Assert.True(m.GetSpan(0, 1 << 20).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public void AppendMemoryHandsOutGuestRamSplitAtGiBWindows()
    {
        // 3 GiB reserved, not touched beyond the pages this test writes (MAP_NORESERVE).
        using var m = GuestMemory.Create([(0UL, 3UL << 30), (4UL << 30, 1UL << 20)]);
        var pieces = new List<Memory<byte>>();
        ulong start = (1UL << 30) - 4096;
        m.AppendWritableMemory(start, 8192, pieces);
        Assert.Equal([4096, 4096], pieces.Select(p => p.Length));

        pieces[0].Span.Fill(0xaa);
        pieces[1].Span.Fill(0xbb);
        Assert.Equal(0xaa, m.ReadU8(start));
        Assert.Equal(0xaa, m.ReadU8(start + 4095));
        Assert.Equal(0xbb, m.ReadU8(start + 4096));
        Assert.Equal(0xbb, m.ReadU8(start + 8191));

        var readOnly = new List<ReadOnlyMemory<byte>>();
        m.AppendMemory(start + 4000, 200, readOnly);
        Assert.Equal([96, 104], readOnly.Select(p => p.Length));
        Assert.True(readOnly[0].Span.IndexOfAnyExcept((byte)0xaa) < 0 && readOnly[1].Span.IndexOfAnyExcept((byte)0xbb) < 0);

        pieces.Clear();
        m.AppendWritableMemory((4UL << 30) + 16, 100, pieces);
        pieces[0].Span[0] = 7;
        Assert.Equal(7, m.ReadU8((4UL << 30) + 16));
        Assert.Single(pieces);

        pieces.Clear();
        m.AppendWritableMemory(0x5000, 0, pieces);
        Assert.Empty(pieces);
    }

    [Theory]
    [InlineData(0xc0000000UL - 8, 16UL)]    // runs off the end of the low region into the hole
    [InlineData(0xd0000000UL, 4UL)]         // in the hole
    [InlineData(ulong.MaxValue - 3, 8UL)]   // wraps
    public void AppendMemoryRefusesRangesOutsideRam(ulong gpa, ulong length)
    {
        using var m = GuestMemory.Create([(0UL, 3UL << 30), (4UL << 30, 1UL << 20)]);
        var pieces = new List<Memory<byte>>();
        var readOnly = new List<ReadOnlyMemory<byte>>();
        Assert.Throws<GuestMemoryException>(() => m.AppendWritableMemory(gpa, length, pieces));
        Assert.Throws<GuestMemoryException>(() => m.AppendMemory(gpa, length, readOnly));
        Assert.Empty(pieces);
        Assert.Empty(readOnly);
    }

    [Fact]
    public void OverlappingRangesAreRefused()
    {
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 2UL << 20), (1UL << 20, 2UL << 20)]));
        Assert.Contains("overlap", e.Message);
    }
}
