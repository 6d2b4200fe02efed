using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Network;

/// <summary>How a team spreads a VM's frames over its uplinks.</summary>
public enum TeamPolicy
{
    /// <summary>One uplink carries everything; the next live one takes over when it fails, and the first comes back after the failback delay.</summary>
    ActiveBackup,

    /// <summary>Each flow (IP addresses and TCP/UDP ports) on one live uplink by its hash: many flows use every uplink (the switches must treat the uplinks as one link aggregation).</summary>
    FlowHash,

    /// <summary>The VM's frames on one live uplink chosen by its MAC: VMs spread over the uplinks, each VM on one, with no switch configuration.</summary>
    VmPort,
}

/// <summary>Options of a <see cref="NicTeam"/>.</summary>
public sealed record TeamOptions
{
    public TeamPolicy Policy { get; init; } = TeamPolicy.ActiveBackup;

    /// <summary>Active-backup: go back to the first uplink once it is up again (after <see cref="FailbackDelay"/>).</summary>
    public bool Failback { get; init; } = true;

    /// <summary>How long the first uplink must stay up before traffic goes back to it (a flapping link does not pull traffic back and forth).</summary>
    public TimeSpan FailbackDelay { get; init; } = TimeSpan.Zero;

    /// <summary>How often each uplink's link state is read when the kernel's link changes cannot be heard (no netlink socket).</summary>
    public TimeSpan MonitorInterval { get; init; } = TimeSpan.FromMilliseconds(10);

    /// <summary>
    /// How long the monitor, hearing link changes from the kernel, waits for one before it reads
    /// every uplink's link state anyway (a netlink message can be lost when many come at once).
    /// </summary>
    public TimeSpan LinkRecheck { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>
    /// An IPv4 address (a gateway, or another host that is always up) each uplink sends ARP probes
    /// to: an uplink whose probes go unanswered is taken down even while its carrier is up (a
    /// failure past the first link, a port that stopped forwarding). Null: the carrier alone.
    /// </summary>
    public System.Net.IPAddress? ArpTarget { get; init; }

    /// <summary>How often each uplink sends a probe.</summary>
    public TimeSpan ArpInterval { get; init; } = TimeSpan.FromMilliseconds(100);

    /// <summary>How many probe intervals without an answer take an uplink down.</summary>
    public int ArpMisses { get; init; } = 3;

    /// <summary>Throws <see cref="ArgumentException"/> naming what is out of range.</summary>
    public void Validate()
    {
        if (ArpTarget is { } t && (t.AddressFamily != System.Net.Sockets.AddressFamily.InterNetwork || t.Equals(System.Net.IPAddress.Any) || t.Equals(System.Net.IPAddress.Broadcast)))
            throw new ArgumentException($"ARP target {t} is not a host's IPv4 address");
        if (ArpInterval < TimeSpan.FromMilliseconds(10) || ArpInterval > TimeSpan.FromSeconds(60))
            throw new ArgumentException($"ARP interval {ArpInterval.TotalMilliseconds} ms is outside 10 ms to 60 s");
        if (MonitorInterval < TimeSpan.FromMilliseconds(1) || LinkRecheck < TimeSpan.FromMilliseconds(1))
            throw new ArgumentException($"monitor interval {MonitorInterval.TotalMilliseconds} ms and link recheck {LinkRecheck.TotalMilliseconds} ms must be 1 ms at least");
        if (ArpMisses is < 1 or > 100)
            throw new ArgumentException($"ARP misses {ArpMisses} is outside 1 to 100");
    }
}

/// <summary>The state of one uplink of a team.</summary>
public sealed record UplinkStatus(string Name, bool Up, bool Active, long RxPackets, long RxBytes, long TxPackets, long TxBytes,
    long TxDropped, long RxDroppedOnBackup, int Failures, long ProbesSent = 0, long ProbesAnswered = 0);

/// <summary>A change of a team: which uplink went up or down and which carry the traffic now.</summary>
public sealed record TeamChange(string Uplink, bool Up, IReadOnlyList<string> Active, string Reason);

/// <summary>
/// A NIC team: several uplinks (each an <see cref="INetBackend"/> with the same queue pairs) seen by
/// the VM's device as one backend. The VMM, not the guest, picks the uplink for each outgoing frame
/// by the <see cref="TeamPolicy"/>, watches every uplink's link and moves traffic off a failed one
/// at once (failover) and back when it returns (failback); after a move the VM's MAC is announced
/// on the uplink that now carries it (a RARP broadcast, as a switch needs to learn the port, and
/// <see cref="Changed"/> for the device to ask the guest for its own gratuitous ARP). Frames come in
/// from every uplink through one epoll fd per queue pair; with active-backup, frames arriving on a
/// standby uplink are dropped (a switch floods broadcasts to both: the guest would see them twice),
/// with the other policies only broadcasts and multicasts from uplinks other than the first live one.
/// With an ARP target, each uplink also probes it (<see cref="TeamOptions.ArpTarget"/>): an ARP
/// request from an address of the uplink's own (the VM's MAC with a bit flipped and the uplink's
/// index, so switches do not move the VM's MAC to a standby port), sender IP 0.0.0.0 as in address
/// conflict detection (the target's cache is left alone; it answers to the MAC). A packet socket
/// on each uplink's host interface hears the answers whether or not the guest reads its frames (a
/// paused VM's team keeps watching); the answers themselves never reach the guest. An uplink is
/// down when its probes go unanswered while another's are answered; when no uplink gets answers,
/// the target is what failed, and the carrier alone decides.
/// </summary>
public sealed class NicTeam : INetBackend
{
    private readonly INetBackend[] _uplinks;
    private readonly TeamOptions _options;
    private readonly MacAddress _mac;
    private readonly EpollHandle[] _receive;
    private readonly int[] _nextReceive;
    private readonly Counters[] _counters;
    private readonly bool[] _up;
    private readonly long[] _upSince;
    private readonly Thread _monitor;
    private readonly EventFdHandle _stop;                    // written by Dispose: wakes the monitor
    private readonly object _lock = new();
    private volatile int[] _live;            // indices of uplinks up, in order
    private volatile int _active;            // active-backup: the uplink carrying traffic (-1: none)
    private volatile bool _stopping;
    private readonly MacAddress[] _probeMacs = [];            // empty without an ARP target
    private readonly PacketSocketHandle[] _probeSockets = [];
    private readonly long[] _lastAnswer = [];
    private readonly uint _arpTarget;                           // network order bytes as read from a frame

    public NicTeam(IReadOnlyList<INetBackend> uplinks, TeamOptions options, MacAddress mac)
    {
        if (uplinks.Count == 0)
            throw new ArgumentException("a team needs at least one uplink");
        int pairs = uplinks[0].QueuePairs;
        if (uplinks.Any(u => u.QueuePairs != pairs))
            throw new ArgumentException($"the uplinks of a team have different queue pairs: {string.Join(", ", uplinks.Select(u => $"{u.Name} {u.QueuePairs}"))}");
        options.Validate();
        _uplinks = [.. uplinks];
        _options = options;
        _mac = mac;
        _counters = _uplinks.Select(_ => new Counters()).ToArray();
        _up = _uplinks.Select(u => u.LinkUp).ToArray();
        _upSince = _up.Select(_ => 0L).ToArray();
        _receive = new EpollHandle[pairs];
        _nextReceive = new int[pairs];
        int stop = Libc.EventFd(0, Libc.EfdCloexec | Libc.EfdNonblock);
        if (stop < 0)
            throw new IOException($"eventfd failed: {Errno.Describe(Marshal.GetLastPInvokeError())}");
        _stop = new EventFdHandle(stop);
        try
        {
            for (int p = 0; p < pairs; p++)
                _receive[p] = KvmShim.EpollOf(_uplinks.Select(u => u.ReceiveHandle(p)));
            if (options.ArpTarget is { } target)
            {
                _arpTarget = BinaryPrimitives.ReadUInt32BigEndian(target.GetAddressBytes());
                _probeMacs = _uplinks.Select((_, i) => ProbeMac(mac, i)).ToArray();
                _probeSockets = new PacketSocketHandle[_uplinks.Length];
                long now = Stopwatch.GetTimestamp();
                _lastAnswer = _uplinks.Select(_ => now).ToArray();          // a first window's grace
                Span<byte> bytes = stackalloc byte[6];
                for (int i = 0; i < _uplinks.Length; i++)
                {
                    string device = _uplinks[i].Interface
                        ?? throw new ArgumentException($"uplink {_uplinks[i].Name} has no host interface to hear ARP probe answers on");
                    _probeMacs[i].CopyTo(bytes);
                    _probeSockets[i] = KvmShim.OpenArpSocket(device, bytes);
                }
            }
        }
        catch
        {
            _stop.Dispose();
            foreach (var e in _receive)
                e?.Dispose();
            foreach (var p in _probeSockets)
                p?.Dispose();
            throw;
        }
        _live = Live();
        _active = _live.Length > 0 ? _live[0] : -1;
        _monitor = new Thread(Monitor) { IsBackground = true, Name = "team monitor" };
        _monitor.Start();
    }

    public string Name => "team " + string.Join("+", _uplinks.Select(u => u.Name));

    public int QueuePairs => _receive.Length;

    public IReadOnlyList<INetBackend> Uplinks => _uplinks;

    public TeamOptions Options => _options;

    /// <summary>Raised (on the monitor thread) when an uplink went up or down and the traffic moved.</summary>
    public event Action<TeamChange>? Changed;

    /// <summary>Times traffic moved to another uplink because one failed.</summary>
    public int Failovers { get; private set; }

    public bool LinkUp => _live.Length > 0;

    /// <summary>Which uplinks carry traffic now (by name).</summary>
    public IReadOnlyList<string> ActiveUplinks => ActiveIndices().Select(i => _uplinks[i].Name).ToArray();

    public IReadOnlyList<UplinkStatus> Status()
    {
        var active = ActiveIndices();
        return _uplinks.Select((u, i) => _counters[i].Status(u.Name, Volatile.Read(ref _up[i]), active.Contains(i))).ToArray();
    }

    /// <summary>
    /// The source MAC of uplink <paramref name="uplink"/>'s probes: the VM's, locally administered,
    /// with bit 3 of the first byte flipped and the uplink's index in the last byte's low bits.
    /// </summary>
    public static MacAddress ProbeMac(MacAddress vm, int uplink)
    {
        Span<byte> b = stackalloc byte[6];
        vm.CopyTo(b);
        b[0] = (byte)(((b[0] ^ 0x08) | 0x02) & 0xfe);
        b[5] = (byte)(b[5] ^ uplink);
        return MacAddress.FromBytes(b);
    }

    private int[] ActiveIndices() => _options.Policy == TeamPolicy.ActiveBackup ? (_active < 0 ? [] : [_active]) : _live;

    private int[] Live() => Enumerable.Range(0, _uplinks.Length).Where(i => Volatile.Read(ref _up[i])).ToArray();

    public SafeHandle ReceiveHandle(int pair) => _receive[pair];

    public int Receive(int pair, Span<byte> buffer)
    {
        int n = _uplinks.Length;
        int start = _nextReceive[pair];
        for (int k = 0; k < n; k++)
        {
            int u = (start + k) % n;
            int got;
            while ((got = _uplinks[u].Receive(pair, buffer)) > 0)
            {
                if (IsProbeFrame(buffer[..got]) || IsEcho(buffer[..got]))
                    continue;                           // a probe's answer or another uplink's probe; the VM's own frame
                if (!Accepts(u, buffer[..got]))
                {
                    _counters[u].RxOnBackup();
                    continue;
                }
                _nextReceive[pair] = (u + 1) % n;       // the next call starts with the next uplink: none starves
                _counters[u].Rx(got - VirtioNetHeader.Size);
                return got;
            }
        }
        return 0;
    }

    /// <summary>
    /// Whether a frame (header first) is one of the VM's own coming back: sent out of one uplink
    /// and flooded back into another by switches that do not treat the uplinks as one link
    /// aggregation (a broadcast with flow-hash or vm-port). The guest must not see itself.
    /// </summary>
    private bool IsEcho(ReadOnlySpan<byte> packet) =>
        packet.Length >= VirtioNetHeader.Size + 12 && MacAddress.FromBytes(packet.Slice(VirtioNetHeader.Size + 6, 6)) == _mac;

    /// <summary>Whether a frame (header first) comes from or goes to one of the team's probe addresses.</summary>
    private bool IsProbeFrame(ReadOnlySpan<byte> packet)
    {
        if (_probeMacs.Length == 0 || packet.Length < VirtioNetHeader.Size + 12)
            return false;
        var destination = MacAddress.FromBytes(packet.Slice(VirtioNetHeader.Size, 6));
        var source = MacAddress.FromBytes(packet.Slice(VirtioNetHeader.Size + 6, 6));
        foreach (var m in _probeMacs)
            if (m == destination || m == source)
                return true;
        return false;
    }

    /// <summary>Whether a frame from uplink <paramref name="u"/> goes to the VM (see the class summary).</summary>
    private bool Accepts(int u, ReadOnlySpan<byte> packet)
    {
        if (_options.Policy == TeamPolicy.ActiveBackup)
            return u == _active;
        bool group = packet.Length > VirtioNetHeader.Size && (packet[VirtioNetHeader.Size] & 1) != 0;
        var live = _live;
        return !group || (live.Length > 0 ? live[0] == u : u == 0);
    }

    public bool Send(int pair, ReadOnlySpan<byte> packet)
    {
        int u = Choose(packet);
        if (u < 0)
        {
            Interlocked.Increment(ref _noUplinkDrops);
            return false;
        }
        if (_uplinks[u].Send(pair, packet))
        {
            _counters[u].Tx(packet.Length - VirtioNetHeader.Size);
            return true;
        }
        _counters[u].TxDropped();
        return false;
    }

    private long _noUplinkDrops;

    /// <summary>Frames dropped because no uplink was up.</summary>
    public long NoUplinkDrops => Interlocked.Read(ref _noUplinkDrops);

    /// <summary>The uplink a frame goes out of, or -1 when none is up.</summary>
    private int Choose(ReadOnlySpan<byte> packet)
    {
        if (_options.Policy == TeamPolicy.ActiveBackup)
            return _active;
        var live = _live;
        if (live.Length == 0)
            return -1;
        uint hash = _options.Policy == TeamPolicy.VmPort ? (uint)(_mac.Value ^ (_mac.Value >> 24)) : FlowHash(packet[VirtioNetHeader.Size..]);
        return live[(int)(hash % (uint)live.Length)];
    }

    /// <summary>A hash of a frame's flow: IPv4/IPv6 addresses and, for TCP and UDP, ports; the MAC addresses for anything else.</summary>
    public static uint FlowHash(ReadOnlySpan<byte> frame)
    {
        if (frame.Length < 14)
            return 0;
        int at = 12;
        ushort type = BinaryPrimitives.ReadUInt16BigEndian(frame[at..]);
        if (type == 0x8100 && frame.Length >= 18)
        {
            at += 4;
            type = BinaryPrimitives.ReadUInt16BigEndian(frame[at..]);
        }
        at += 2;
        var hash = new HashCode();
        int proto = -1, l4 = -1;
        if (type == 0x0800 && frame.Length >= at + 20)
        {
            int ihl = (frame[at] & 0xf) * 4;
            hash.AddBytes(frame.Slice(at + 12, 8));
            bool fragment = (BinaryPrimitives.ReadUInt16BigEndian(frame[(at + 6)..]) & 0x3fff) != 0;
            proto = fragment ? -1 : frame[at + 9];
            l4 = at + ihl;
        }
        else if (type == 0x86dd && frame.Length >= at + 40)
        {
            hash.AddBytes(frame.Slice(at + 8, 32));
            proto = frame[at + 6];
            l4 = at + 40;
        }
        else
            hash.AddBytes(frame[..12]);
        if (proto is 6 or 17 && frame.Length >= l4 + 4)
            hash.AddBytes(frame.Slice(l4, 4));
        // HashCode is seeded per process: a flow keeps its uplink for the life of the VMM.
        return (uint)hash.ToHashCode();
    }

    public void SetOffloads(NetOffloads offloads)
    {
        foreach (var u in _uplinks)
            u.SetOffloads(offloads);
    }

    public void SetActivePairs(int count)
    {
        foreach (var u in _uplinks)
            u.SetActivePairs(count);
    }

    /// <summary>
    /// Whether the monitor hears link changes from the kernel (a netlink socket in the link group)
    /// and acts on them at once; false: it reads every uplink's link state each
    /// <see cref="TeamOptions.MonitorInterval"/> (the socket could not be opened).
    /// </summary>
    public bool HearsLinkChanges { get; private set; }

    /// <summary>
    /// Watches the uplinks: wakes when the kernel reports a link change (netlink), when a probe's
    /// answer arrives, and when something falls due (the next probe, a probe window running out,
    /// the failback delay, the periodic re-read), then reads every uplink's link state, hears and
    /// sends the probes, and moves the traffic when an uplink's state changed. Without netlink
    /// it reads the links every interval, as it did before.
    /// </summary>
    private void Monitor()
    {
        long intervalTicks = (long)(_options.MonitorInterval.TotalSeconds * Stopwatch.Frequency);
        long recheckTicks = (long)(_options.LinkRecheck.TotalSeconds * Stopwatch.Frequency);
        long delayTicks = (long)(_options.FailbackDelay.TotalSeconds * Stopwatch.Frequency);
        long probeTicks = (long)(_options.ArpInterval.TotalSeconds * Stopwatch.Frequency);
        long windowTicks = probeTicks * _options.ArpMisses;
        long nextProbe = 0;
        bool probing = _probeSockets.Length > 0;
        var carrier = new bool[_uplinks.Length];
        var answered = new bool[_uplinks.Length];
        var last = new long[_uplinks.Length];
        // Uplinks down because their probes went unanswered: they come back when their own probes
        // are answered (or their link went down meanwhile), not because the others' answers
        // paused too (a loaded host that read B's answers late made A flap once).
        var probeDown = new bool[_uplinks.Length];
        byte[] frame = new byte[2048];
        LinkEventsHandle? links = null;
        EpollHandle? wake = null;
        try
        {
            try
            {
                links = KvmShim.OpenLinkEvents();
            }
            catch (IOException)
            {
                // Polling at the interval instead.
            }
            HearsLinkChanges = links is not null;
            wake = KvmShim.EpollOf(new SafeHandle?[] { _stop, links }.Concat(_probeSockets).OfType<SafeHandle>());
            while (!_stopping)
            {
                long now = Stopwatch.GetTimestamp();
                long due = now + (links is null ? intervalTicks : recheckTicks);
                if (probing)
                {
                    due = Math.Min(due, nextProbe);
                    for (int i = 0; i < _uplinks.Length; i++)
                        if (answered[i])
                            due = Math.Min(due, last[i] + windowTicks + 1);      // its window runs out
                }
                if (FailbackPending)
                    due = Math.Min(due, _upSince[0] + delayTicks);
                Wait(wake, due - now);
                if (_stopping)
                    break;
                if (links is not null)
                {
                    try
                    {
                        KvmShim.DrainLinkEvents(links);      // a wake-up only: the links' states are read below
                    }
                    catch (IOException)
                    {
                        KvmShim.EpollRemove(wake, links);
                        links.Dispose();
                        links = null;
                        HearsLinkChanges = false;
                    }
                }
                now = Stopwatch.GetTimestamp();
                for (int i = 0; i < _uplinks.Length; i++)
                    carrier[i] = _uplinks[i].LinkUp;
                if (probing)
                {
                    for (int i = 0; i < _uplinks.Length; i++)
                    {
                        HearAnswers(i, frame, now);
                        last[i] = Volatile.Read(ref _lastAnswer[i]);
                        answered[i] = now - last[i] <= windowTicks;
                    }
                    if (now >= nextProbe)
                    {
                        for (int i = 0; i < _uplinks.Length; i++)
                            if (carrier[i])
                                SendProbe(i);
                        nextProbe = now + probeTicks;
                    }
                }
                for (int i = 0; i < _uplinks.Length; i++)
                {
                    if (!carrier[i] || answered[i])
                        probeDown[i] = false;
                    bool up = carrier[i] && !(probing && (probeDown[i] || ProbesFailed(i, carrier, answered, last, windowTicks)));
                    if (up == Volatile.Read(ref _up[i]))
                        continue;
                    probeDown[i] = carrier[i] && !up;
                    Volatile.Write(ref _up[i], up);
                    _upSince[i] = now;
                    if (!up)
                        _counters[i].Failed();
                    string reason = !carrier[i] ? "link down" : !probing ? "link up" : !up ? "probes unanswered"
                        : answered[i] ? "probe answered" : "link up";
                    Update(i, up, reason);
                }
                // Active-backup failback: the first uplink, up again for the delay, takes the traffic back.
                if (FailbackPending && now - _upSince[0] >= delayTicks)
                    Update(0, true, Failback);
            }
        }
        finally
        {
            wake?.Dispose();
            links?.Dispose();
        }
    }

    /// <summary>Active-backup with failback: the first uplink is up but another carries the traffic.</summary>
    private bool FailbackPending => _options.Policy == TeamPolicy.ActiveBackup && _options.Failback && _active != 0 && Volatile.Read(ref _up[0]);

    /// <summary>Waits up to <paramref name="ticks"/> (stopwatch ticks) for <paramref name="wake"/> to turn readable.</summary>
    private static void Wait(EpollHandle wake, long ticks)
    {
        if (ticks <= 0)
            return;
        int ms = (int)Math.Min(int.MaxValue, Math.Ceiling(ticks * 1000.0 / Stopwatch.Frequency));
        KvmShim.PollRead(wake, null, ms);
    }

    /// <summary>
    /// Whether uplink <paramref name="i"/>'s probes failed: none answered for the window while
    /// another uplink with carrier still gets answers, and got some a whole window after this one's
    /// last. When the target itself goes silent, every uplink's answers stop within about one
    /// interval of each other: none is blamed, and the carrier alone decides.
    /// </summary>
    private static bool ProbesFailed(int i, bool[] carrier, bool[] answered, long[] last, long window)
    {
        if (answered[i])
            return false;
        for (int j = 0; j < carrier.Length; j++)
            if (j != i && carrier[j] && answered[j] && last[j] - last[i] > window)
                return true;
        return false;
    }

    /// <summary>Reads what uplink <paramref name="u"/>'s probe socket holds; an answer from the target to its probe address counts.</summary>
    private void HearAnswers(int u, byte[] frame, long now)
    {
        int n;
        while ((n = FdIo.Read(_probeSockets[u], frame)) > 0)
        {
            // Ethernet (14), then ARP: operation at 6, sender IP at 14, target MAC at 18.
            var arp = frame.AsSpan(14, Math.Max(0, n - 14));
            if (arp.Length >= 28 && BinaryPrimitives.ReadUInt16BigEndian(arp[6..]) == 2 &&
                BinaryPrimitives.ReadUInt32BigEndian(arp[14..]) == _arpTarget &&
                MacAddress.FromBytes(arp.Slice(18, 6)) == _probeMacs[u])
            {
                Volatile.Write(ref _lastAnswer[u], now);
                _counters[u].ProbeAnswered();
            }
        }
    }

    /// <summary>An ARP request for the target from uplink <paramref name="u"/>'s probe address, sender IP 0.0.0.0.</summary>
    private void SendProbe(int u)
    {
        Span<byte> packet = stackalloc byte[VirtioNetHeader.Size + 60];
        var frame = ArpBroadcast(packet, 0x0806, operation: 1, _probeMacs[u]);    // ARP request; sender IP 0
        BinaryPrimitives.WriteUInt32BigEndian(frame[38..], _arpTarget);         // target IP
        if (_uplinks[u].Send(0, packet))
            _counters[u].ProbeSent();
    }

    private void Update(int uplink, bool up, string reason)
    {
        bool activeBackup = _options.Policy == TeamPolicy.ActiveBackup;
        int before, after;
        lock (_lock)
        {
            before = _active;
            _live = Live();
            if (activeBackup)
            {
                if (reason == Failback)
                    _active = 0;
                else if (_active < 0 || !Volatile.Read(ref _up[_active]))
                {
                    _active = _live.Length > 0 ? _live[0] : -1;
                    if (before >= 0 && _active >= 0)
                        Failovers++;
                }
            }
            after = _active;
        }
        // The VM's MAC is announced where it is now reached, so switches move it to that port.
        if (activeBackup)
        {
            if (after != before && after >= 0)
                AnnounceOn(after);
        }
        else if (_live.Length > 0)
            AnnounceOn(_options.Policy == TeamPolicy.VmPort ? Choose(ReadOnlySpan<byte>.Empty) : _live[0]);
        Changed?.Invoke(new TeamChange(_uplinks[uplink].Name, up, ActiveUplinks, reason));
    }

    private const string Failback = "failback";

    /// <summary>A RARP broadcast from the VM's MAC out of uplink <paramref name="u"/>, so switches learn where it is now.</summary>
    private void AnnounceOn(int u)
    {
        if (u < 0)
            return;
        Span<byte> packet = stackalloc byte[VirtioNetHeader.Size + 60];
        var frame = ArpBroadcast(packet, 0x8035, operation: 3, _mac);          // RARP reverse request
        _mac.CopyTo(frame[32..]);                                               // target MAC
        if (_uplinks[u].Send(0, packet))
            _counters[u].Announced();
    }

    /// <summary>
    /// Clears <paramref name="packet"/> (a zero virtio-net header and a 60-byte frame) and writes a
    /// broadcast of <paramref name="etherType"/> (ARP or RARP, for IPv4 over Ethernet) from
    /// <paramref name="sender"/>, its operation and sender MAC; returns the frame, addresses zero.
    /// </summary>
    private static Span<byte> ArpBroadcast(Span<byte> packet, ushort etherType, ushort operation, MacAddress sender)
    {
        packet.Clear();
        var frame = packet[VirtioNetHeader.Size..];
        MacAddress.Broadcast.CopyTo(frame);
        sender.CopyTo(frame[6..]);
        BinaryPrimitives.WriteUInt16BigEndian(frame[12..], etherType);
        BinaryPrimitives.WriteUInt16BigEndian(frame[14..], 1);              // hardware: Ethernet
        BinaryPrimitives.WriteUInt16BigEndian(frame[16..], 0x0800);         // protocol: IPv4
        frame[18] = 6;
        frame[19] = 4;
        BinaryPrimitives.WriteUInt16BigEndian(frame[20..], operation);
        sender.CopyTo(frame[22..]);                                         // sender MAC
        return frame;
    }

    public void Dispose()
    {
        _stopping = true;
        FdIo.Write(_stop, BitConverter.GetBytes(1UL));
        if (_monitor.IsAlive && Thread.CurrentThread != _monitor)
            _monitor.Join();
        _stop.Dispose();
        foreach (var e in _receive)
            e.Dispose();
        foreach (var p in _probeSockets)
            p.Dispose();
        foreach (var u in _uplinks)
            u.Dispose();
    }

    private sealed class Counters
    {
        private long _rxPackets, _rxBytes, _txPackets, _txBytes, _txDropped, _rxBackup, _announced, _probes, _answers;
        private int _failures;

        public void Rx(int bytes)
        {
            Interlocked.Increment(ref _rxPackets);
            Interlocked.Add(ref _rxBytes, bytes);
        }

        public void Tx(int bytes)
        {
            Interlocked.Increment(ref _txPackets);
            Interlocked.Add(ref _txBytes, bytes);
        }

        public void TxDropped() => Interlocked.Increment(ref _txDropped);
        public void RxOnBackup() => Interlocked.Increment(ref _rxBackup);
        public void Announced() => Interlocked.Increment(ref _announced);
        public void Failed() => Interlocked.Increment(ref _failures);
        public void ProbeSent() => Interlocked.Increment(ref _probes);
        public void ProbeAnswered() => Interlocked.Increment(ref _answers);

        public UplinkStatus Status(string name, bool up, bool active) => new(name, up, active,
            Interlocked.Read(ref _rxPackets), Interlocked.Read(ref _rxBytes), Interlocked.Read(ref _txPackets),
            Interlocked.Read(ref _txBytes), Interlocked.Read(ref _txDropped), Interlocked.Read(ref _rxBackup), Volatile.Read(ref _failures),
            Interlocked.Read(ref _probes), Interlocked.Read(ref _answers));
    }
}
