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
    private readonly TimeSpan _burstTime;
    private double _tokens;
    private long _last;
    private long _passed, _held;

    public TokenBucket(long bitsPerSecond, TimeSpan? burst = null)
    {
        _burstTime = burst ?? TimeSpan.FromMilliseconds(5);
        SetRateLocked(bitsPerSecond);
        _tokens = Burst;
        _last = Stopwatch.GetTimestamp();
    }

    public double BytesPerSecond { get; private set; }

    public double Burst { get; private set; }

    /// <summary>Bytes that went through the bucket (taken or charged) since it was made.</summary>
    public long Passed => Interlocked.Read(ref _passed);

    /// <summary>How many times a frame found the bucket in debt (its sender was held back).</summary>
    public long Held => Interlocked.Read(ref _held);

    /// <summary>Changes the rate from now on (a bandwidth group's new share); tokens already in the bucket stay, up to the new burst.</summary>
    public void SetRate(long bitsPerSecond)
    {
        lock (_lock)
        {
            Refill(Stopwatch.GetTimestamp());
            SetRateLocked(bitsPerSecond);
            _tokens = Math.Min(_tokens, Burst);
            Monitor.PulseAll(_lock);            // a waiter's debt is paid sooner (or later) at the new rate
        }
    }

    private void SetRateLocked(long bitsPerSecond)
    {
        if (bitsPerSecond <= 0)
            throw new ArgumentOutOfRangeException(nameof(bitsPerSecond), bitsPerSecond, "a rate limit must be positive");
        BytesPerSecond = bitsPerSecond / 8.0;
        // A few milliseconds' worth, at least one largest frame: enough to keep a link busy, too
        // little to let a sender through far above its rate.
        Burst = Math.Max(BytesPerSecond * _burstTime.TotalSeconds, VirtioNetHeader.MaxPacket);
    }

    private void Refill(long now)
    {
        _tokens = Math.Min(Burst, _tokens + (now - _last) * BytesPerSecond / Stopwatch.Frequency);
        _last = now;
    }

    /// <summary>
    /// Takes <paramref name="bytes"/> if the bucket is not in debt and returns zero; otherwise
    /// takes nothing and returns how long until it is out of debt.
    /// </summary>
    public TimeSpan TryTake(int bytes)
    {
        lock (_lock)
        {
            Refill(Stopwatch.GetTimestamp());
            if (_tokens < 0)
                return TimeSpan.FromSeconds(-_tokens / BytesPerSecond);
            _tokens -= bytes;
            Interlocked.Add(ref _passed, bytes);
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
            Refill(Stopwatch.GetTimestamp());
            _tokens -= bytes;
            Interlocked.Add(ref _passed, bytes);
        }
    }

    /// <summary>
    /// Waits (sleeping) until the bucket lets <paramref name="bytes"/> through, and takes them. A
    /// new rate (<see cref="SetRate"/>) wakes the wait: a bucket whose group cut it to the least
    /// rate and then raised it again must not sleep out a debt reckoned at the old rate (one
    /// 64 KiB frame at 64 kbit/s is 8 s, and a TCP stream stalled that long in a nested-host test).
    /// </summary>
    public void Take(int bytes)
    {
        bool held = false;
        lock (_lock)
        {
            while (true)
            {
                Refill(Stopwatch.GetTimestamp());
                if (_tokens >= 0)
                {
                    _tokens -= bytes;
                    Interlocked.Add(ref _passed, bytes);
                    return;
                }
                if (!held)
                    Interlocked.Increment(ref _held);
                held = true;
                WaitLocked();
            }
        }
    }

    /// <summary>Waits (sleeping) until the bucket is out of debt, taking nothing (the caller charges what then goes); a new rate wakes the wait.</summary>
    public void WaitOutOfDebt()
    {
        bool held = false;
        lock (_lock)
        {
            while (true)
            {
                Refill(Stopwatch.GetTimestamp());
                if (_tokens >= 0)
                    return;
                if (!held)
                    Interlocked.Increment(ref _held);
                held = true;
                WaitLocked();
            }
        }
    }

    /// <summary>Sleeps, the lock released, until the debt is paid at the present rate (1 ms at least) or the rate changes.</summary>
    private void WaitLocked()
    {
        var wait = TimeSpan.FromSeconds(-_tokens / BytesPerSecond);
        Monitor.Wait(_lock, wait < TimeSpan.FromMilliseconds(1) ? TimeSpan.FromMilliseconds(1) : wait);
    }

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
