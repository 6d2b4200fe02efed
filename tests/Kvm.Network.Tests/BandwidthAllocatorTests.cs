using Kvm.Network;

namespace Kvm.Network.Tests;

public class BandwidthAllocatorTests
{
    private const long M = 1_000_000;

    private static BandwidthClaim Wants(int shares, long reservation = 0, long? limit = null) => new(shares, reservation, limit, 0, Backlogged: true);

    private static BandwidthClaim Uses(int shares, long used, long reservation = 0, long? limit = null) => new(shares, reservation, limit, used, Backlogged: false);

    private static void Near(long expected, long actual) => Assert.InRange(actual, expected - 2, expected + 2);

    [Fact]
    public void TwoVmsThatBothWantMoreSplitTheUplinkByTheirShares()
    {
        var rates = BandwidthAllocator.Allocate(20 * M, [Wants(1), Wants(3)]);
        Near(5 * M, rates[0]);
        Near(15 * M, rates[1]);
    }

    [Fact]
    public void ALimitHoldsAndTheRestGoesToTheOthers()
    {
        var rates = BandwidthAllocator.Allocate(20 * M, [Wants(1, limit: 4 * M), Wants(1), Wants(2)]);
        Near(4 * M, rates[0]);
        Near(16 * M / 3, rates[1]);
        Near(32 * M / 3, rates[2]);
    }

    [Fact]
    public void AReservationIsKeptAboveTheSharesWhileTheVmWantsIt()
    {
        // Shares alone would give the first 2 Mbit/s.
        var rates = BandwidthAllocator.Allocate(20 * M, [Wants(1, reservation: 5 * M), Wants(1), Wants(8)]);
        Near(5 * M, rates[0]);
        Near(15 * M / 9, rates[1]);
        Near(15 * M * 8 / 9, rates[2]);
    }

    [Fact]
    public void AReservationNotWantedGoesToTheOthers()
    {
        // The first uses 1 Mbit/s of its 5 reserved: it keeps room to grow (Headroom), the rest is shared.
        var rates = BandwidthAllocator.Allocate(20 * M, [Uses(1, 1 * M, reservation: 5 * M), Wants(1), Wants(1)]);
        long first = (long)(1 * M * BandwidthAllocator.Headroom);
        Near(first, rates[0]);
        Near((20 * M - first) / 2, rates[1]);
        Near((20 * M - first) / 2, rates[2]);
    }

    [Fact]
    public void WhenNobodyIsShortTheSpareIsSpreadByShares()
    {
        var rates = BandwidthAllocator.Allocate(20 * M, [Uses(1, 1 * M), Uses(3, 2 * M)]);
        // Each gets at least its use with headroom; the whole capacity is handed out 1:3 where that is more.
        Assert.True(rates[0] >= 1.25 * M && rates[1] >= 2.5 * M);
        Near(20 * M, rates.Sum());
        Near(5 * M, rates[0]);
        Near(15 * M, rates[1]);
    }

    [Fact]
    public void ReservationsAboveTheCapacityAreScaledAlike()
    {
        var rates = BandwidthAllocator.Allocate(10 * M, [Wants(1, reservation: 10 * M), Wants(1, reservation: 5 * M), Wants(1)]);
        Near(10 * M * 2 / 3, rates[0]);
        Near(10 * M / 3, rates[1]);
        Assert.Equal(0, rates[2]);
    }

    [Fact]
    public void BadClaimsAreRefusedNamingTheClaim()
    {
        Assert.Contains("claim 1: shares", Assert.Throws<ArgumentOutOfRangeException>(() => BandwidthAllocator.Allocate(M, [Wants(1), Wants(0)])).Message);
        Assert.Contains("claim 0", Assert.Throws<ArgumentOutOfRangeException>(() => BandwidthAllocator.Allocate(M, [Wants(1, limit: 0)])).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => BandwidthAllocator.Allocate(0, [Wants(1)]));
        Assert.Empty(BandwidthAllocator.Allocate(M, []));
    }

    /// <summary>
    /// Seeded random claims: the rates never exceed the capacity, no VM is above its limit, a VM
    /// that wants its reservation has it (when the reservations fit), and VMs held back by the
    /// sharing itself (neither at a bound) get the same rate per share.
    /// </summary>
    [Fact]
    public void RandomClaimsKeepEveryRule()
    {
        var random = new Random(12);
        for (int round = 0; round < 2000; round++)
        {
            long capacity = random.NextInt64(1 * M, 10_000 * M);
            int n = random.Next(1, 12);
            var claims = new BandwidthClaim[n];
            for (int i = 0; i < n; i++)
            {
                long? limit = random.Next(3) == 0 ? random.NextInt64(1, capacity * 2) : null;
                long reservation = random.Next(3) == 0 ? random.NextInt64(0, capacity / n + 1) : 0;
                bool backlogged = random.Next(2) == 0;
                claims[i] = new BandwidthClaim(random.Next(1, 1000), reservation, limit, backlogged ? 0 : random.NextInt64(0, capacity), backlogged);
            }
            var rates = BandwidthAllocator.Allocate(capacity, claims);
            string what = $"round {round}: capacity {capacity}, claims {string.Join(", ", claims)}, rates {string.Join(", ", rates)}";
            Assert.True(rates.Sum() <= capacity + n, what);
            for (int i = 0; i < n; i++)
            {
                var c = claims[i];
                Assert.True(rates[i] >= 0 && (c.Limit is not { } l || rates[i] <= l), what);
                if (c.Backlogged)
                    Assert.True(rates[i] >= Math.Min(c.Reservation, c.Limit ?? long.MaxValue) - 2, what);
            }
            // Equal rate per share among backlogged VMs at neither bound.
            var free = Enumerable.Range(0, n).Where(i => claims[i].Backlogged && rates[i] > claims[i].Reservation + 2 &&
                (claims[i].Limit is not { } l || rates[i] < l - 2)).ToArray();
            foreach (int i in free)
                foreach (int j in free)
                    Assert.True(Math.Abs((double)rates[i] / claims[i].Shares - (double)rates[j] / claims[j].Shares) <= 2.0 + 1e-6 * rates[i] / claims[i].Shares, what);
        }
    }
}
