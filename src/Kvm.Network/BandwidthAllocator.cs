namespace Kvm.Network;

/// <summary>
/// What one VM asks of a shared uplink in one direction: its weight against the others
/// (<see cref="Shares"/>), the rate it is guaranteed while it wants it (<see cref="Reservation"/>),
/// the most it may have (<see cref="Limit"/>), and what it used in the last period
/// (<see cref="Used"/>, and whether its bucket held it back: <see cref="Backlogged"/>). Rates in bits
/// per second.
/// </summary>
public readonly record struct BandwidthClaim(int Shares, long Reservation, long? Limit, long Used, bool Backlogged)
{
    /// <summary>The weight a claim has when none is given.</summary>
    public const int DefaultShares = 100;
}

/// <summary>
/// Divides an uplink's capacity among the VMs that share it, by weighted max-min fairness: each VM
/// gets the capacity in proportion to its shares, never above its limit, never below its
/// reservation while it wants that much; what a VM does not use (it sent less than its rate and
/// was not held back) goes to the others in proportion to their shares, and comes back to it as
/// soon as its bucket holds it back again. Reservations that together exceed the capacity are all
/// scaled down alike. A pure function of its inputs: every VMM sharing an uplink computes the same
/// rates from the same claims.
/// </summary>
public static class BandwidthAllocator
{
    /// <summary>
    /// How far above what it used a VM not held back may still grow within one period: its rate
    /// is at least this much more than its use, so demand that rises is seen as held back soon.
    /// </summary>
    public const double Headroom = 1.25;

    /// <summary>The rate of each claim, in order, for an uplink of <paramref name="capacity"/> bits per second.</summary>
    public static long[] Allocate(long capacity, IReadOnlyList<BandwidthClaim> claims)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(capacity);
        int n = claims.Count;
        var rates = new long[n];
        if (n == 0)
            return rates;
        var weight = new double[n];
        var ceiling = new double[n];     // the most this claim can take: its limit, and its demand when not held back
        var floor = new double[n];       // its reservation, as far as it wants it
        for (int i = 0; i < n; i++)
        {
            var c = claims[i];
            if (c.Shares <= 0)
                throw new ArgumentOutOfRangeException(nameof(claims), c.Shares, $"claim {i}: shares must be positive");
            if (c.Reservation < 0 || c.Used < 0 || c.Limit is <= 0)
                throw new ArgumentOutOfRangeException(nameof(claims), $"claim {i}: reservation {c.Reservation}, use {c.Used} or limit {c.Limit} out of range");
            weight[i] = c.Shares;
            double limit = c.Limit ?? capacity;
            double demand = c.Backlogged ? double.PositiveInfinity : Math.Max(c.Used * Headroom, MinimumRate);
            ceiling[i] = Math.Min(Math.Min(limit, demand), capacity);
            floor[i] = Math.Min(c.Reservation, ceiling[i]);
        }
        double floors = floor.Sum();
        if (floors >= capacity)
        {
            // Reservations alone fill the uplink: each keeps the same fraction of its own.
            for (int i = 0; i < n; i++)
                rates[i] = (long)(floor[i] * capacity / floors);
            return rates;
        }
        if (ceiling.Sum() <= capacity)
        {
            // Nobody is short: each gets what it can take, and the rest is spread by shares (up to
            // the limits) so that demand that grows meets a rate already there.
            var given = (double[])ceiling.Clone();
            var headroom = new double[n];
            for (int i = 0; i < n; i++)
                headroom[i] = Math.Min(claims[i].Limit ?? capacity, capacity);
            Fill(capacity, weight, given, headroom, rates);
            return rates;
        }
        Fill(capacity, weight, floor, ceiling, rates);
        return rates;
    }

    /// <summary>The least rate a VM that used nothing keeps (so its first frames are not held back long): 64 kbit/s.</summary>
    public const double MinimumRate = 64_000;

    /// <summary>
    /// Water-filling: the level L at which the sum of clamp(weight * L, low, high) is the capacity
    /// (or every claim is at its high), found by bisection; the rates are those clamps.
    /// </summary>
    private static void Fill(long capacity, double[] weight, double[] low, double[] high, long[] rates)
    {
        int n = weight.Length;
        double Total(double level)
        {
            double sum = 0;
            for (int i = 0; i < n; i++)
                sum += Math.Clamp(weight[i] * level, low[i], Math.Max(low[i], high[i]));
            return sum;
        }
        double lo = 0, hi = 0;
        for (int i = 0; i < n; i++)
            hi = Math.Max(hi, Math.Max(low[i], high[i]) / weight[i]);
        if (Total(hi) > capacity)
        {
            for (int k = 0; k < 200 && hi - lo > hi * 1e-12; k++)
            {
                double mid = (lo + hi) / 2;
                if (Total(mid) > capacity)
                    hi = mid;
                else
                    lo = mid;
            }
        }
        else
            lo = hi;
        for (int i = 0; i < n; i++)
            rates[i] = (long)Math.Clamp(weight[i] * lo, low[i], Math.Max(low[i], high[i]));
    }
}
