using System.Buffers.Binary;
using System.Diagnostics;

namespace Kvm.Network;

/// <summary>Which way a frame went, seen from the VM.</summary>
public enum TrafficDirection
{
    /// <summary>To the VM (received by the guest).</summary>
    In,

    /// <summary>From the VM (sent by the guest).</summary>
    Out,
}

/// <summary>What a <see cref="TrafficMonitor"/> does when a rule fires.</summary>
public enum DosAction
{
    /// <summary>Pause the VM until an operator resumes it.</summary>
    Suspend,

    /// <summary>Hold the direction the rule fired on to <see cref="DosRules.LimitTo"/>, dropping what is over it, until the traffic offered is back below the thresholds.</summary>
    Limit,
}

/// <summary>
/// Thresholds of denial-of-service detection for one NIC, each per second and per direction
/// (null: that rule is off), over a detection window: a rule fires when its rate over the window
/// is above the threshold and at least half of the window's tenths were (sustained, not a burst),
/// and clears (hysteresis) when every tenth of a window stays below <see cref="ClearFraction"/> of it.
/// </summary>
public sealed record DosRules
{
    /// <summary>Frames per second.</summary>
    public long? PacketsPerSecond { get; init; } = 200_000;

    /// <summary>TCP SYNs per second whose connection did not complete (no ACK of the same 4-tuple within <see cref="HandshakeTimeout"/>).</summary>
    public long? HalfOpenPerSecond { get; init; } = 2_000;

    /// <summary>UDP datagrams per second.</summary>
    public long? UdpPerSecond { get; init; } = 100_000;

    /// <summary>ICMP (and ICMPv6) messages per second.</summary>
    public long? IcmpPerSecond { get; init; } = 5_000;

    /// <summary>New IP destinations per second, each counted once per window (a scan, or a flood at many victims).</summary>
    public long? DestinationsPerSecond { get; init; } = 2_000;

    public TimeSpan Window { get; init; } = TimeSpan.FromSeconds(1);

    public double ClearFraction { get; init; } = 0.5;

    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(1);

    public DosAction Action { get; init; } = DosAction.Suspend;

    /// <summary>With <see cref="DosAction.Limit"/>: the rate (bit/s) the offending direction is held to.</summary>
    public long LimitTo { get; init; } = 1_000_000;

    /// <summary>Throws <see cref="ArgumentException"/> naming the bad value.</summary>
    public void Validate()
    {
        foreach (var (name, v) in Rules)
            if (v is <= 0)
                throw new ArgumentException($"dos rule {name}: threshold {v} must be positive");
        if (Window < TimeSpan.FromMilliseconds(100) || Window > TimeSpan.FromMinutes(10))
            throw new ArgumentException($"dos window {Window.TotalMilliseconds} ms is outside 100 ms to 10 minutes");
        if (ClearFraction is <= 0 or > 1)
            throw new ArgumentException($"dos clear fraction {ClearFraction} is outside (0, 1]");
        if (LimitTo <= 0)
            throw new ArgumentException($"dos limit {LimitTo} bit/s must be positive");
    }

    /// <summary>The rules by name, as events name them.</summary>
    public IEnumerable<(string Name, long? Threshold)> Rules =>
    [
        ("packets", PacketsPerSecond), ("half-open", HalfOpenPerSecond), ("udp", UdpPerSecond), ("icmp", IcmpPerSecond),
        ("destinations", DestinationsPerSecond),
    ];
}

/// <summary>A rule that fired (or cleared): which, which way, and the figures.</summary>
public sealed record DosAlarm(string Rule, TrafficDirection Direction, double Rate, long Threshold, TimeSpan Window, bool Cleared)
{
    public string Describe() => Cleared
        ? $"{Rule} {Direction.ToString().ToLowerInvariant()} back to {Rate:0} per second (threshold {Threshold})"
        : $"{Rule} {Direction.ToString().ToLowerInvariant()} at {Rate:0} per second for {Window.TotalSeconds:0.###} s (threshold {Threshold})";
}

/// <summary>
/// Watches one NIC's frames for signs of a denial-of-service attack, against the VM (direction
/// <see cref="TrafficDirection.In"/>) or by it (<see cref="TrafficDirection.Out"/>): frame, UDP and
/// ICMP rates, TCP handshakes that never complete, and the spread of destinations. Frames are
/// counted as they pass (<see cref="Observe"/>, from the queue workers); <see cref="Tick"/> (a
/// timer, or a test) closes each tenth of the window and judges the rules. Raises
/// <see cref="Alarm"/> when a rule fires and when it clears.
/// </summary>
public sealed class TrafficMonitor : IDisposable
{
    public const int Slots = 10;

    /// <summary>Half-open handshakes tracked per direction; more count as half-open at once (a flood that fills the table is one).</summary>
    public const int MaxTracked = 65536;

    /// <summary>Distinct destinations counted per slot; more count as many.</summary>
    public const int MaxDestinations = 65536;

    private readonly DosRules _rules;
    private readonly Side[] _sides = [new(), new()];
    private readonly Timer? _timer;
    private readonly object _tickLock = new();

    private readonly Func<long> _clock;

    /// <summary>
    /// A monitor whose slots a timer closes, or (<paramref name="startTimer"/> false) the caller
    /// through <see cref="Tick"/>, with <paramref name="clock"/> (Stopwatch timestamps) telling
    /// when a handshake began.
    /// </summary>
    public TrafficMonitor(DosRules rules, bool startTimer = true, Func<long>? clock = null)
    {
        rules.Validate();
        _rules = rules;
        _clock = clock ?? Stopwatch.GetTimestamp;
        if (startTimer)
        {
            var slot = rules.Window / Slots;
            _timer = new Timer(_ => Tick(_clock()), null, slot, slot);
        }
    }

    public DosRules Rules => _rules;

    /// <summary>Raised on the timer's thread when a rule fires or clears.</summary>
    public event Action<DosAlarm>? Alarm;

    /// <summary>The rules firing now, by direction.</summary>
    public IReadOnlyList<DosAlarm> Firing
    {
        get
        {
            lock (_tickLock)
                return _sides.SelectMany(s => s.Firing.Values).ToArray();
        }
    }

    /// <summary>Counts one Ethernet frame (without its virtio-net header) that went <paramref name="direction"/>.</summary>
    public void Observe(TrafficDirection direction, ReadOnlySpan<byte> frame)
    {
        var side = _sides[(int)direction];
        Interlocked.Increment(ref side.Packets);
        if (frame.Length < 14)
            return;
        int at = 12;
        ushort type = BinaryPrimitives.ReadUInt16BigEndian(frame[at..]);
        if (type == 0x8100 && frame.Length >= 18)
        {
            at += 4;
            type = BinaryPrimitives.ReadUInt16BigEndian(frame[at..]);
        }
        at += 2;
        int proto, l4;
        ReadOnlySpan<byte> src, dst;
        if (type == 0x0800 && frame.Length >= at + 20)
        {
            int ihl = (frame[at] & 0xf) * 4;
            proto = frame[at + 9];
            src = frame.Slice(at + 12, 4);
            dst = frame.Slice(at + 16, 4);
            bool later = (BinaryPrimitives.ReadUInt16BigEndian(frame[(at + 6)..]) & 0x1fff) != 0;   // not the first fragment
            l4 = later || ihl < 20 ? -1 : at + ihl;
            if (proto == 1)
                Interlocked.Increment(ref side.Icmp);
        }
        else if (type == 0x86dd && frame.Length >= at + 40)
        {
            proto = frame[at + 6];
            src = frame.Slice(at + 8, 16);
            dst = frame.Slice(at + 24, 16);
            l4 = at + 40;
            if (proto == 58)
                Interlocked.Increment(ref side.Icmp);
        }
        else
            return;
        side.Destination(dst);
        if (proto == 17)
            Interlocked.Increment(ref side.Udp);
        else if (proto == 6 && l4 >= 0 && frame.Length >= l4 + 14)
        {
            byte flags = frame[l4 + 13];
            bool syn = (flags & 0x02) != 0, ack = (flags & 0x10) != 0, rst = (flags & 0x04) != 0;
            if (syn && !ack)
                side.SynSeen(Key(src, dst, frame.Slice(l4, 4)), _clock());
            else if (ack && !syn || rst)
                side.Completed(Key(src, dst, frame.Slice(l4, 4)));
        }
    }

    /// <summary>A flow's 4-tuple, folded into 128 bits.</summary>
    private static UInt128 Key(ReadOnlySpan<byte> src, ReadOnlySpan<byte> dst, ReadOnlySpan<byte> ports)
    {
        var h = new System.IO.Hashing.XxHash128();
        h.Append(src);
        h.Append(dst);
        h.Append(ports);
        return h.GetCurrentHashAsUInt128();
    }

    /// <summary>Closes the current slot at <paramref name="now"/> (a Stopwatch timestamp) and judges every rule.</summary>
    public void Tick(long now)
    {
        var alarms = new List<DosAlarm>();
        lock (_tickLock)
        {
            long timeout = (long)(_rules.HandshakeTimeout.TotalSeconds * Stopwatch.Frequency);
            for (int d = 0; d < 2; d++)
            {
                var side = _sides[d];
                side.Close(now - timeout);
                foreach (var (rule, threshold) in _rules.Rules)
                {
                    if (threshold is not { } limit)
                        continue;
                    var (rate, above, below) = side.Judge(rule, limit, _rules.ClearFraction, _rules.Window);
                    bool firing = side.Firing.ContainsKey(rule);
                    if (!firing && above)
                    {
                        var alarm = new DosAlarm(rule, (TrafficDirection)d, rate, limit, _rules.Window, Cleared: false);
                        side.Firing[rule] = alarm;
                        alarms.Add(alarm);
                    }
                    else if (firing && below)
                    {
                        side.Firing.Remove(rule);
                        alarms.Add(new DosAlarm(rule, (TrafficDirection)d, rate, limit, _rules.Window, Cleared: true));
                    }
                }
            }
        }
        foreach (var a in alarms)
            Alarm?.Invoke(a);
    }

    public void Dispose() => _timer?.Dispose();

    /// <summary>One direction's counters: the slot being filled, and the last <see cref="Slots"/> closed slots per rule.</summary>
    private sealed class Side
    {
        public long Packets, Udp, Icmp;
        private readonly object _lock = new();
        private readonly Dictionary<UInt128, long> _handshakes = [];
        private long _halfOpen;
        private HashSet<UInt128> _destinations = [];
        private long _destinationOverflow;
        private int _destinationsBefore, _slot;
        private readonly Dictionary<string, long[]> _history = [];
        private int _filled;
        public readonly Dictionary<string, DosAlarm> Firing = [];

        public void Destination(ReadOnlySpan<byte> address)
        {
            var key = (UInt128)System.IO.Hashing.XxHash128.HashToUInt128(address);
            lock (_lock)
            {
                if (_destinations.Count < MaxDestinations)
                    _destinations.Add(key);
                else if (!_destinations.Contains(key))
                    _destinationOverflow++;
            }
        }

        public void SynSeen(UInt128 key, long now)
        {
            lock (_lock)
            {
                if (_handshakes.Count < MaxTracked || _handshakes.ContainsKey(key))
                    _handshakes[key] = now;
                else
                    _halfOpen++;
            }
        }

        public void Completed(UInt128 key)
        {
            lock (_lock)
                _handshakes.Remove(key);
        }

        /// <summary>Ends the slot: handshakes older than <paramref name="expiredBefore"/> count as half-open; each rate goes into the history.</summary>
        public void Close(long expiredBefore)
        {
            long halfOpen, destinations;
            lock (_lock)
            {
                halfOpen = _halfOpen;
                _halfOpen = 0;
                List<UInt128>? expired = null;
                foreach (var (k, t) in _handshakes)
                    if (t < expiredBefore)
                        (expired ??= []).Add(k);
                if (expired is not null)
                {
                    halfOpen += expired.Count;
                    foreach (var k in expired)
                        _handshakes.Remove(k);
                }
                // New destinations in this slot: the set lasts a window, so a VM that talks to
                // the same many hosts all along counts them once per window, a scan every slot.
                destinations = _destinations.Count - _destinationsBefore + _destinationOverflow;
                _destinationOverflow = 0;
                if (++_slot == Slots)
                {
                    _slot = 0;
                    _destinations = [];
                }
                _destinationsBefore = _destinations.Count;
            }
            Push("packets", Interlocked.Exchange(ref Packets, 0));
            Push("udp", Interlocked.Exchange(ref Udp, 0));
            Push("icmp", Interlocked.Exchange(ref Icmp, 0));
            Push("half-open", halfOpen);
            Push("destinations", destinations);
            _filled = Math.Min(_filled + 1, Slots);
        }

        private void Push(string rule, long count)
        {
            if (!_history.TryGetValue(rule, out var h))
                _history[rule] = h = new long[Slots];
            Array.Copy(h, 1, h, 0, Slots - 1);
            h[^1] = count;
        }

        /// <summary>
        /// The rate over the window; whether it is above the threshold and sustained (at least half
        /// the slots above the threshold's share: not one burst, while frames that reach the VMM in
        /// bursts on a loaded host still count); and whether every slot was below the clearing level.
        /// </summary>
        public (double Rate, bool Above, bool Below) Judge(string rule, long threshold, double clear, TimeSpan window)
        {
            var h = _history[rule];
            double perSlot = threshold * window.TotalSeconds / Slots;
            double rate = h.Sum() / window.TotalSeconds;
            bool full = _filled == Slots;
            bool sustained = h.Count(c => c > perSlot) >= Slots / 2;
            return (rate, full && rate > threshold && sustained, h.All(c => c < perSlot * clear));
        }
    }
}
