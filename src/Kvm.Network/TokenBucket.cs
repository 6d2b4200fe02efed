using System.Diagnostics;

namespace Kvm.Network;

/// <summary>
/// A token bucket holding a rate: tokens (bytes) flow in at <see cref="BytesPerSecond"/> up to
/// <see cref="Burst"/>; a frame may go while the bucket is not in debt, and takes its bytes even
/// if that puts it in debt, so the long-run rate is exact whatever the frame sizes (a 64 KiB TSO
/// frame included). Thread-safe.
/// </summary>
public sealed class TokenBucket
{
    private readonly object _lock = new();
    private double _tokens;
    private long _last;

    public TokenBucket(long bitsPerSecond, TimeSpan? burst = null)
    {
        if (bitsPerSecond <= 0)
            throw new ArgumentOutOfRangeException(nameof(bitsPerSecond), bitsPerSecond, "a rate limit must be positive");
        BytesPerSecond = bitsPerSecond / 8.0;
        // A few milliseconds' worth, at least one largest frame: enough to keep a link busy, too
        // little to let a sender through far above its rate.
        Burst = Math.Max(BytesPerSecond * (burst ?? TimeSpan.FromMilliseconds(5)).TotalSeconds, VirtioNetHeader.MaxPacket);
        _tokens = Burst;
        _last = Stopwatch.GetTimestamp();
    }

    public double BytesPerSecond { get; }

    public double Burst { get; }

    /// <summary>
    /// Takes <paramref name="bytes"/> if the bucket is not in debt and returns zero; otherwise
    /// takes nothing and returns how long until it is out of debt.
    /// </summary>
    public TimeSpan TryTake(int bytes)
    {
        lock (_lock)
        {
            long now = Stopwatch.GetTimestamp();
            _tokens = Math.Min(Burst, _tokens + (now - _last) * BytesPerSecond / Stopwatch.Frequency);
            _last = now;
            if (_tokens < 0)
                return TimeSpan.FromSeconds(-_tokens / BytesPerSecond);
            _tokens -= bytes;
            return TimeSpan.Zero;
        }
    }

    /// <summary>Whether a frame would wait now (the bucket is in debt).</summary>
    public bool InDebt => TryTake(0) > TimeSpan.Zero;

    /// <summary>Takes <paramref name="bytes"/> that already went (a received frame), in debt if need be.</summary>
    public void Charge(int bytes)
    {
        lock (_lock)
        {
            long now = Stopwatch.GetTimestamp();
            _tokens = Math.Min(Burst, _tokens + (now - _last) * BytesPerSecond / Stopwatch.Frequency) - bytes;
            _last = now;
        }
    }

    /// <summary>Waits (sleeping) until the bucket lets <paramref name="bytes"/> through, and takes them.</summary>
    public void Take(int bytes)
    {
        TimeSpan wait;
        while ((wait = TryTake(bytes)) > TimeSpan.Zero)
            Sleep(wait);
    }

    /// <summary>Waits (sleeping) once until the bucket is out of debt, taking nothing (the caller charges what then goes).</summary>
    public void WaitOutOfDebt()
    {
        var wait = TryTake(0);
        if (wait > TimeSpan.Zero)
            Sleep(wait);
    }

    private static void Sleep(TimeSpan wait) => Thread.Sleep(wait < TimeSpan.FromMilliseconds(1) ? TimeSpan.FromMilliseconds(1) : wait);

    /// <summary>Parses a rate in bits per second: 10M, 1.5G, 800K, 64000 (decimal units, as network rates are given).</summary>
    public static long ParseRate(string text)
    {
        string s = text.Trim();
        if (s.EndsWith("bit", StringComparison.OrdinalIgnoreCase))
            s = s[..^3];
        double unit = 1;
        if (s.Length > 0)
        {
            unit = char.ToUpperInvariant(s[^1]) switch { 'K' => 1e3, 'M' => 1e6, 'G' => 1e9, _ => 1 };
            if (unit != 1)
                s = s[..^1];
        }
        if (!double.TryParse(s, System.Globalization.NumberStyles.AllowDecimalPoint, System.Globalization.CultureInfo.InvariantCulture, out double v) || v <= 0 || v * unit > 1e12)
            throw new FormatException($"'{text}' is not a rate in bits per second (examples: 10M, 1.5G, 800K)");
        return (long)(v * unit);
    }
}
