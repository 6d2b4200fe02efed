using Kvm.Network;

namespace Kvm.Network.Tests;

public sealed class BandwidthGroupTests : IDisposable
{
    private const long M = 1_000_000;
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-bwg-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private BandwidthGroupOptions Options(int shares = 100, long reserve = 0, TimeSpan? stale = null) => new()
    {
        Group = Path.Combine(_dir, "uplink0"), Capacity = 20 * M, Shares = shares, TxReservation = reserve, RxReservation = reserve,
        StaleAfter = stale ?? TimeSpan.FromSeconds(3),
    };

    private static void Near(long expected, long actual) => Assert.InRange(actual, expected - 2, expected + 2);

    [Fact]
    public void TwoMembersWantingMoreShareTheCapacityByTheirShares()
    {
        using var a = new BandwidthGroup(Options(shares: 1), "vm-a", null, null);
        Near(20 * M, a.Rates.Tx);                              // alone, it may have all of it
        using var b = new BandwidthGroup(Options(shares: 3), "vm-b", null, null);
        Near(15 * M, b.Rates.Tx);
        var ra = a.Update(20 * M, true, 0, false);
        var rb = b.Update(15 * M, true, 0, false);
        Near(5 * M, ra.Tx);
        Near(15 * M, rb.Tx);
        Assert.Equal(["vm-a", "vm-b"], b.Members.Select(m => m.Name));
        Assert.All(b.Members, m => Assert.Equal(Environment.ProcessId, m.Pid));
        // b stops sending: a has the uplink again, b keeps room to start.
        rb = b.Update(0, false, 0, false);
        ra = a.Update(5 * M, true, 0, false);
        Assert.True(ra.Tx > 19 * M, $"a has {ra.Tx} bit/s while b sends nothing");
        // b leaves: a alone.
        b.Dispose();
        Near(20 * M, a.Update(19 * M, true, 0, false).Tx);
        Assert.Single(a.Members);
    }

    [Fact]
    public void AReservationAndALimitAreKept()
    {
        using var a = new BandwidthGroup(Options(shares: 1, reserve: 8 * M), "reserved", null, null);
        using var b = new BandwidthGroup(Options(shares: 9), "limited", txLimit: 10 * M, rxLimit: null);
        using var c = new BandwidthGroup(Options(shares: 9), "flood", null, null);
        for (int round = 0; round < 2; round++)
        {
            a.Update(0, true, 0, true);
            b.Update(0, true, 0, true);
            c.Update(0, true, 0, true);
        }
        var ra = a.Update(0, true, 0, true);
        var rb = b.Update(0, true, 0, true);
        var rc = c.Update(0, true, 0, true);
        Near(8 * M, ra.Tx);
        Near(6 * M, rb.Tx);                                     // 12 left, 9:9
        Near(6 * M, rc.Tx);
        Near(8 * M, ra.Rx);
        Assert.True(rb.Tx <= 10 * M);
    }

    [Fact]
    public void AMemberThatStopsUpdatingDropsOutAndComesBackWhenItUpdatesAgain()
    {
        var stale = TimeSpan.FromMilliseconds(300);
        using var a = new BandwidthGroup(Options(stale: stale), "a", null, null);
        using var b = new BandwidthGroup(Options(stale: stale), "b", null, null);
        Near(10 * M, a.Update(10 * M, true, 0, true).Tx);
        Thread.Sleep(stale * 2);
        Near(20 * M, a.Update(10 * M, true, 0, true).Tx);        // b looks dead
        Near(10 * M, b.Update(0, true, 0, true).Tx);             // b is back (in a new place if need be)
        Assert.Equal(2, b.Members.Count);
    }

    [Fact]
    public void AGroupOfAnotherCapacityOrABrokenFileIsRefusedNamingTheFile()
    {
        using (new BandwidthGroup(Options(), "a", null, null))
        {
            var e = Assert.Throws<InvalidDataException>(() => new BandwidthGroup(Options() with { Capacity = 30 * M }, "b", null, null));
            Assert.Contains("shares 20000000 bit/s; this NIC says 30000000", e.Message);
            Assert.Contains("uplink0", e.Message);
        }
        string broken = Path.Combine(_dir, "broken");
        File.WriteAllText(broken, "not a group");
        var f = Assert.Throws<InvalidDataException>(() => new BandwidthGroup(Options() with { Group = broken }, "a", null, null));
        Assert.Contains(broken, f.Message);
        Assert.Contains("not a bandwidth group file", f.Message);
        Assert.Equal("not a group", File.ReadAllText(broken));   // left as it was
    }

    /// <summary>
    /// A slot that holds no member's claim (here: negative shares and use, as a stray write would
    /// leave) is left out and named, the members go on sharing, and the next member to join takes
    /// the slot.
    /// </summary>
    [Fact]
    public void ASlotThatIsNoClaimIsLeftOutAndTakenByTheNextMember()
    {
        using var a = new BandwidthGroup(Options(), "a", null, null);
        using var b = new BandwidthGroup(Options() with { Shares = 300 }, "b", null, null);
        string path = a.FilePath;
        // Slot 2 (after a's and b's): in use (an id, a fresh time stamp) but shares -5, use -1.
        byte[] file = File.ReadAllBytes(path);
        int slot = BandwidthGroup.HeaderSize + 2 * BandwidthGroup.SlotSize;
        System.Buffers.Binary.BinaryPrimitives.WriteInt64LittleEndian(file.AsSpan(slot), 12345);
        System.Buffers.Binary.BinaryPrimitives.WriteInt32LittleEndian(file.AsSpan(slot + 12), -5);
        System.Buffers.Binary.BinaryPrimitives.WriteInt64LittleEndian(file.AsSpan(slot + 16), DateTimeOffset.UtcNow.ToUnixTimeMilliseconds());
        System.Buffers.Binary.BinaryPrimitives.WriteInt64LittleEndian(file.AsSpan(slot + 56), -1);
        File.WriteAllBytes(path, file);

        var (tx, _) = a.Update(0, true, 0, false);
        b.Update(0, true, 0, false);
        Assert.Equal(["a", "b"], b.Members.Select(m => m.Name));
        Near(5 * M, tx);                                           // 1:3 of the uplink, the bad slot counted for nothing
        Assert.Equal(["slot 2: shares -5"], b.Malformed);

        using var c = new BandwidthGroup(Options(), "c", null, null);
        c.Update(0, true, 0, false);
        Assert.Empty(c.Malformed);
        Assert.Equal(["a", "b", "c"], c.Members.Select(m => m.Name));
        Assert.NotEqual(12345, System.Buffers.Binary.BinaryPrimitives.ReadInt64LittleEndian(File.ReadAllBytes(path).AsSpan(slot)));   // c's now
    }

    [Theory]
    [InlineData("", 20_000_000, 100, 0, "neither a name")]
    [InlineData("a b", 20_000_000, 100, 0, "neither a name")]
    [InlineData("g", 0, 100, 0, "capacity 0")]
    [InlineData("g", 20_000_000, 0, 0, "shares 0 is outside")]
    [InlineData("g", 20_000_000, 100, 30_000_000, "reservation")]
    public void BadOptionsAreRefused(string group, long capacity, int shares, long reserve, string message)
    {
        var o = new BandwidthGroupOptions { Group = group, Capacity = capacity, Shares = shares, TxReservation = reserve };
        Assert.Contains(message, Assert.Throws<ArgumentException>(o.Validate).Message);
    }
}
