using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Kvm.Devices.Manager;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Kvm.Network;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using static Kvm.Devices.Virtio.ChainIo;

namespace Kvm.Devices.Virtio.Net;

/// <summary>
/// A virtio network device (virtio 1.2, 5.1) on an <see cref="INetBackend"/>: receive and transmit
/// queue pairs (one or more, VIRTIO_NET_F_MQ) and a control queue (receive mode, MAC filter table,
/// MAC address, announcements, queue pairs). Frames keep their virtio-net header end to end, so
/// checksum and TCP segmentation offloads (CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6, ECN) pass to and
/// from the backend untouched; MRG_RXBUF spreads a received frame over several buffers.
/// <para>
/// The guest is untrusted: a transmitted frame shorter than an Ethernet header, longer than the MTU
/// (or 64 KiB with segmentation offload), asking for an offload that was not negotiated, or (unless
/// spoofing is allowed) carrying another source MAC than the VM's is dropped and counted, never
/// sent. A receive buffer that is not device-writable, or too small for the header, breaks the
/// protocol (NEEDS_RESET, as a <see cref="VirtqueueException"/>).
/// </para>
/// </summary>
public sealed class VirtioNet : IVirtioDevice
{
    public const ushort TypeNet = 1;

    // Feature bits (5.1.3)
    public const int FeatureCsum = 0, FeatureGuestCsum = 1, FeatureMtu = 3, FeatureMac = 5, FeatureGuestTso4 = 7,
        FeatureGuestTso6 = 8, FeatureGuestEcn = 9, FeatureHostTso4 = 11, FeatureHostTso6 = 12, FeatureHostEcn = 13,
        FeatureMrgRxbuf = 15, FeatureStatus = 16, FeatureCtrlVq = 17, FeatureCtrlRx = 18, FeatureGuestAnnounce = 21,
        FeatureMq = 22, FeatureCtrlMacAddr = 23;

    // Status bits (config `status`)
    public const ushort StatusLinkUp = 1, StatusAnnounce = 2;

    // Control classes and commands (5.1.6.5)
    public const byte CtrlRx = 0, CtrlMac = 1, CtrlAnnounce = 3, CtrlMq = 4;
    public const byte RxPromisc = 0, RxAllMulti = 1, RxAllUni = 2, RxNoMulti = 3, RxNoUni = 4, RxNoBcast = 5;
    public const byte MacTableSet = 0, MacAddrSet = 1, AnnounceAck = 0, MqVqPairsSet = 0;
    public const byte AckOk = 0, AckErr = 1;

    /// <summary>MAC filter entries kept per table; a longer table means "accept all" of its kind, as an overflowed hardware filter does.</summary>
    public const int MaxFilterEntries = 64;

    /// <summary>The longest control command accepted (a MAC table of 2 x 4 + 6 x entries bytes fits many times over).</summary>
    public const int MaxControlData = 16 * 1024;

    private const int EthHeader = 14;

    private readonly INetBackend _backend;
    private readonly VirtioNetOptions _options;
    private readonly ILogger _log;
    private readonly RxState[] _rx;
    private readonly byte[][] _tx;
    private readonly VirtioNetCounters _counters = new();
    private GuestMemory? _memory;
    private ulong _features;
    private Action _configChanged = () => { };
    private Action<int> _kick = _ => { };
    private volatile RxFilter _filter = RxFilter.Initial;
    private MacAddress _mac;
    private int _activePairs = 1;
    private int _status = StatusLinkUp;
    private readonly TokenBucket? _txLimit, _rxLimit;
    private readonly TrafficMonitor? _monitor;
    private volatile TokenBucket? _dosTx, _dosRx;     // a DoS rule's limit while it fires (DosAction.Limit)
    private readonly BandwidthGroup? _group;
    private readonly Thread? _groupThread;
    private readonly ManualResetEventSlim _stopGroup = new();

    /// <summary>How often a NIC in a bandwidth group publishes its use and takes its new rates.</summary>
    public static readonly TimeSpan BandwidthPeriod = TimeSpan.FromMilliseconds(100);

    /// <summary>The bandwidth group this NIC is in, if any (its members and this NIC's rates).</summary>
    public BandwidthGroup? Bandwidth => _group;

    /// <summary>The rate the guest may send at now, in bits per second (its limit, or its bandwidth group's share); null: no limit.</summary>
    public long? TxRate => _txLimit is { } b ? (long)(b.BytesPerSecond * 8) : null;

    /// <summary>The rate the guest may receive at now; null: no limit.</summary>
    public long? RxRate => _rxLimit is { } b ? (long)(b.BytesPerSecond * 8) : null;

    /// <summary>
    /// Every period: what went through each bucket (bits per second) and whether it held the
    /// guest back go to the group; the group's answer becomes the buckets' rates. A failing
    /// update (the group's file unreadable) keeps the last rates and is logged once.
    /// </summary>
    private void UpdateBandwidth()
    {
        long txPassed = _txLimit!.Passed, rxPassed = _rxLimit!.Passed, txHeld = _txLimit.Held, rxHeld = _rxLimit.Held;
        long last = System.Diagnostics.Stopwatch.GetTimestamp();
        bool failed = false;
        string reported = "";
        while (!_stopGroup.Wait(BandwidthPeriod))
        {
            long now = System.Diagnostics.Stopwatch.GetTimestamp();
            double seconds = Math.Max(1e-3, (now - last) / (double)System.Diagnostics.Stopwatch.Frequency);
            last = now;
            long tp = _txLimit.Passed, rp = _rxLimit.Passed, th = _txLimit.Held, rh = _rxLimit.Held;
            try
            {
                var (tx, rx) = _group!.Update((long)((tp - txPassed) * 8 / seconds), th != txHeld, (long)((rp - rxPassed) * 8 / seconds), rh != rxHeld);
                _txLimit.SetRate(tx);
                _rxLimit.SetRate(rx);
                failed = false;
                string malformed = string.Join("; ", _group.Malformed);
                if (malformed.Length > 0 && malformed != reported)
                    DeviceLog.BandwidthGroupMalformed(_log, Name, _group.FilePath, malformed);
                reported = malformed;
            }
            catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException)
            {
                if (!failed)
                    DeviceLog.BandwidthGroupFailed(_log, Name, e.Message);
                failed = true;
            }
            (txPassed, rxPassed, txHeld, rxHeld) = (tp, rp, th, rh);
        }
    }

    public VirtioNet(string name, INetBackend backend, VirtioNetOptions options, ILogger? logger = null)
    {
        options.Validate();
        if (backend.QueuePairs < options.QueuePairs)
            throw new ArgumentException($"{name}: {backend.Name} has {backend.QueuePairs} queue pairs, the device {options.QueuePairs}");
        Name = name;
        _backend = backend;
        _options = options;
        _log = logger ?? NullLogger.Instance;
        _mac = options.Mac;
        if (options.Bandwidth is { } bandwidth)
        {
            // In a group the buckets always run, at the rates the group gives (within the limits).
            _group = new BandwidthGroup(bandwidth, options.Mac.ToString(), options.TxLimit, options.RxLimit);
            _txLimit = new TokenBucket(_group.Rates.Tx);
            _rxLimit = new TokenBucket(_group.Rates.Rx);
            _groupThread = new Thread(UpdateBandwidth) { IsBackground = true, Name = name + " bandwidth" };
            _groupThread.Start();
        }
        else
        {
            _txLimit = options.TxLimit is { } tx ? new TokenBucket(tx) : null;
            _rxLimit = options.RxLimit is { } rx ? new TokenBucket(rx) : null;
        }
        if (options.Dos is { } rules)
        {
            _monitor = new TrafficMonitor(rules);
            _monitor.Alarm += OnAlarm;
        }
        _rx = new RxState[options.QueuePairs];
        _tx = new byte[options.QueuePairs][];
        for (int i = 0; i < _rx.Length; i++)
        {
            _rx[i] = new RxState(options.QueueSize);
            _tx[i] = new byte[VirtioNetHeader.MaxPacket];
        }
    }

    public string Name { get; }
    public ushort DeviceType => TypeNet;
    public int QueueCount => 2 * _options.QueuePairs + 1;
    public ushort MaxQueueSize => _options.QueueSize;
    public INetBackend Backend => _backend;
    public VirtioNetOptions Options => _options;

    /// <summary>The guest's address now (the configured one unless it changed it, which only <see cref="VirtioNetOptions.AllowSpoofing"/> permits).</summary>
    public MacAddress Mac => _mac;

    /// <summary>Queue pairs the driver uses (1 until it asks for more).</summary>
    public int ActivePairs => Volatile.Read(ref _activePairs);

    public ulong NegotiatedFeatures => _features;

    /// <summary>The denial-of-service detection watching this NIC, if any.</summary>
    public TrafficMonitor? Monitor => _monitor;

    /// <summary>
    /// Raised (on the monitor's timer thread) when a denial-of-service rule fires or clears. With
    /// <see cref="DosAction.Limit"/> the device has already limited that direction; with
    /// <see cref="DosAction.Suspend"/> the machine's owner pauses the VM.
    /// </summary>
    public event Action<VirtioNet, DosAlarm>? DosAlarm;

    private void OnAlarm(DosAlarm alarm)
    {
        if (_options.Dos!.Action == DosAction.Limit)
        {
            bool firing = _monitor!.Firing.Any(a => a.Direction == alarm.Direction);
            var bucket = firing ? new TokenBucket(_options.Dos.LimitTo) : null;
            if (alarm.Direction == TrafficDirection.Out)
                _dosTx = firing ? _dosTx ?? bucket : null;
            else
                _dosRx = firing ? _dosRx ?? bucket : null;
        }
        DosAlarm?.Invoke(this, alarm);
    }

    /// <summary>Frames, bytes and drops by cause since the device was made.</summary>
    public VirtioNetStats Stats => _counters.Snapshot();

    private bool Negotiated(int feature) => (_features & (1UL << feature)) != 0;

    private static ulong Bit(int feature) => 1UL << feature;

    public ulong Features
    {
        get
        {
            ulong f = Bit(FeatureMac) | Bit(FeatureMtu) | Bit(FeatureMrgRxbuf) | Bit(FeatureStatus) | Bit(FeatureCtrlVq) |
                      Bit(FeatureCtrlRx) | Bit(FeatureGuestAnnounce) | Bit(FeatureCtrlMacAddr);
            if (_options.QueuePairs > 1)
                f |= Bit(FeatureMq);
            if (_options.Offloads)
                f |= Bit(FeatureCsum) | Bit(FeatureGuestCsum) | Bit(FeatureGuestTso4) | Bit(FeatureGuestTso6) |
                     Bit(FeatureGuestEcn) | Bit(FeatureHostTso4) | Bit(FeatureHostTso6) | Bit(FeatureHostEcn);
            return f;
        }
    }

    /// <summary>struct virtio_net_config up to mtu: mac, status, max_virtqueue_pairs, mtu.</summary>
    public int ConfigSize => 12;

    public void ReadConfig(int offset, Span<byte> data)
    {
        Span<byte> c = stackalloc byte[12];
        _mac.CopyTo(c);
        ushort status = (ushort)Volatile.Read(ref _status);
        if (!_backend.LinkUp)
            status &= unchecked((ushort)~StatusLinkUp);
        BinaryPrimitives.WriteUInt16LittleEndian(c[6..], status);
        BinaryPrimitives.WriteUInt16LittleEndian(c[8..], (ushort)_options.QueuePairs);
        BinaryPrimitives.WriteUInt16LittleEndian(c[10..], (ushort)_options.Mtu);
        data.Clear();
        if (offset >= 0 && offset < c.Length)
            c.Slice(offset, Math.Min(data.Length, c.Length - offset)).CopyTo(data);
    }

    /// <summary>Nothing in the configuration space is writable once VERSION_1 is negotiated (the MAC changes through the control queue).</summary>
    public void WriteConfig(int offset, ReadOnlySpan<byte> data)
    {
    }

    public void BindConfigChange(Action notify) => _configChanged = notify;

    public void BindQueueKick(Action<int> kick) => _kick = kick;

    public void Activate(ulong features, GuestMemory memory)
    {
        _features = features;
        _memory = memory;
        var offloads = NetOffloads.None;
        if (Negotiated(FeatureGuestCsum))
        {
            offloads |= NetOffloads.Checksum;
            if (Negotiated(FeatureGuestTso4)) offloads |= NetOffloads.Tso4;
            if (Negotiated(FeatureGuestTso6)) offloads |= NetOffloads.Tso6;
            if (Negotiated(FeatureGuestEcn)) offloads |= NetOffloads.TsoEcn;
        }
        _backend.SetOffloads(offloads);
        _backend.SetActivePairs(ActivePairs);
    }

    public void Reset()
    {
        _memory = null;
        _features = 0;
        _filter = RxFilter.Initial;
        _mac = _options.Mac;
        Volatile.Write(ref _activePairs, 1);
        Volatile.Write(ref _status, StatusLinkUp);
        foreach (var rx in _rx)
            rx.Length = 0;
    }

    /// <summary>
    /// Asks the guest to announce itself (gratuitous ARP and the like) after it moved or its uplink
    /// changed: sets ANNOUNCE in the status and raises a configuration change; false when the
    /// driver did not negotiate GUEST_ANNOUNCE (the host must announce the MAC itself).
    /// </summary>
    public bool Announce()
    {
        if (_memory is null || !Negotiated(FeatureGuestAnnounce) || !Negotiated(FeatureCtrlVq))
            return false;
        Interlocked.Or(ref _status, StatusAnnounce);
        _configChanged();
        return true;
    }

    // ---------------------------------------------------------------- queues

    private bool IsControl(int queue) => queue == 2 * _options.QueuePairs;

    public SafeHandle? QueueWakeHandle(int queue) =>
        queue < 2 * _options.QueuePairs && queue % 2 == 0 ? _backend.ReceiveHandle(queue / 2) : null;

    public void ProcessQueue(Virtqueue queue)
    {
        if (IsControl(queue.Index))
            ProcessControl(queue);
        else if (queue.Index % 2 == 1)
            ProcessTransmit(queue, queue.Index / 2);
        else
            while (ProcessReceive(queue, queue.Index / 2) == BackendQueueState.Batch) { }
    }

    public BackendQueueState ProcessBackendQueue(Virtqueue queue) => ProcessReceive(queue, queue.Index / 2);

    private GuestMemory Memory => _memory ?? throw new InvalidOperationException($"{Name} is not active");

    /// <summary>Frames sent from a transmit ring before the driver hears of them.</summary>
    public const int TransmitBatch = 32;

    /// <summary>Frames put in a receive ring before the driver hears of them (a steady stream would otherwise fill the ring before the first interrupt).</summary>
    public const int ReceiveBatch = 32;

    /// <summary>
    /// Moves waiting frames into the receive ring, until the backend or the ring runs dry (the
    /// frame in hand then waits) or a batch went in. A pair the driver does not use is not read:
    /// its backend queue is detached (a multi-queue tap's detached fd reports errors, not frames).
    /// </summary>
    private BackendQueueState ProcessReceive(Virtqueue queue, int pair)
    {
        var memory = Memory;
        var rx = _rx[pair];
        if (pair >= ActivePairs)
            return BackendQueueState.Idle;
        for (int delivered = 0; ; )
        {
            if (delivered == ReceiveBatch)
                return BackendQueueState.Batch;
            if (rx.Length == 0)
            {
                if (queue.Pending == 0)
                    return BackendQueueState.RingEmpty;
                // Over its receive limit the VM reads no more for a while: frames wait in the
                // backend (the tap's queue), and drop there if the sender does not slow down.
                _rxLimit?.WaitOutOfDebt();
                int n = _backend.Receive(pair, rx.Buffer);
                if (n == 0)
                    return BackendQueueState.BackendEmpty;
                if (n < VirtioNetHeader.Size + EthHeader)
                {
                    _counters.RxErrors();
                    continue;
                }
                if (!_filter.Accepts(MacAddress.FromBytes(rx.Buffer.AsSpan(VirtioNetHeader.Size, 6)), _mac))
                {
                    _counters.RxFiltered();
                    continue;
                }
                // The monitor sees every frame offered to the VM, those a firing rule's limit then
                // drops included: it judges the traffic, not what the limit let through (else the
                // rule would clear while the flood goes on, and the flood come back in full).
                var frame = rx.Buffer.AsSpan(VirtioNetHeader.Size, n - VirtioNetHeader.Size);
                _monitor?.Observe(TrafficDirection.In, frame);
                if (_dosRx is { } dos)
                {
                    // Over a DoS rule's limit a frame is dropped, not held: holding would queue the
                    // flood in the backend and the VM's wanted traffic behind it.
                    if (dos.InDebt)
                    {
                        _counters.RxDosLimited();
                        continue;
                    }
                    dos.Charge(frame.Length);
                }
                rx.Length = n;
            }
            var delivery = Deliver(queue, memory, rx);
            if (delivery == Delivery.RingShort)
                return BackendQueueState.RingEmpty;
            if (delivery == Delivery.Delivered)
            {
                _counters.Rx(rx.Length - VirtioNetHeader.Size);
                _rxLimit?.Charge(rx.Length - VirtioNetHeader.Size);
                delivered++;
            }
            rx.Length = 0;
        }
    }

    /// <summary>The guest address of the byte <paramref name="offset"/> bytes into <paramref name="segments"/> (which hold it).</summary>
    private static ulong AddressOf(ReadOnlySpan<ChainSegment> segments, ulong offset)
    {
        foreach (var seg in segments)
        {
            if (offset < seg.Length)
                return seg.Address + offset;
            offset -= seg.Length;
        }
        throw new ArgumentOutOfRangeException(nameof(offset), offset, "beyond the chain's segments");
    }

    private enum Delivery { Delivered, Dropped, RingShort }

    /// <summary>
    /// Writes the frame in hand into as many chains as it needs (one without MRG_RXBUF) and pushes
    /// them; RingShort, with every chain given back, when the ring has too few; Dropped (counted)
    /// when the frame cannot fit the driver's buffers.
    /// </summary>
    private Delivery Deliver(Virtqueue queue, GuestMemory memory, RxState rx)
    {
        bool mergeable = Negotiated(FeatureMrgRxbuf);
        var packet = rx.Buffer.AsSpan(0, rx.Length);
        BinaryPrimitives.WriteUInt16LittleEndian(packet[10..], 1);    // num_buffers, for now
        int offset = 0, used = 0;
        ulong countLow = 0, countHigh = 0;                             // where num_buffers went
        while (offset < packet.Length)
        {
            if (!queue.TryPop(out var chain))
            {
                queue.Unpop(used);
                if (used < queue.Size)
                    return Delivery.RingShort;
                // Every chain the ring can hold is too little for the frame: waiting for more would wait forever.
                _counters.RxTooLong();
                return Delivery.Dropped;
            }
            if (chain.FirstWritable != 0)
                throw new VirtqueueException($"{Name}: receive buffer (head {chain.Head}) has device-readable descriptors");
            ulong room = chain.WritableBytes;
            if (used == 0 && room < VirtioNetHeader.Size)
                throw new VirtqueueException($"{Name}: receive buffer (head {chain.Head}) of {room} bytes has no room for the {VirtioNetHeader.Size}-byte header");
            if (!mergeable && room < (ulong)packet.Length)
            {
                // The driver's buffers are smaller than the frame (it did not take the offloads that
                // make frames this long): the frame is dropped, the buffer comes back empty.
                queue.Push(chain.Head, 0);
                _counters.RxTooLong();
                return Delivery.Dropped;
            }
            int take = (int)Math.Min(room, (ulong)(packet.Length - offset));
            Scatter(memory, chain.Writable, 0, packet.Slice(offset, take));
            if (used == 0)
            {
                countLow = AddressOf(chain.Writable, 10);
                countHigh = AddressOf(chain.Writable, 11);
            }
            rx.Used[used++] = (chain.Head, (uint)take);
            offset += take;
        }
        if (used > 1)
        {
            memory.WriteU8(countLow, (byte)used);
            memory.WriteU8(countHigh, (byte)(used >> 8));
        }
        queue.Push(rx.Used.AsSpan(0, used));
        return Delivery.Delivered;
    }

    private void ProcessTransmit(Virtqueue queue, int pair)
    {
        var memory = Memory;
        var buffer = _tx[pair];
        // Returning early lets the transport tell the driver what went (it frees those frames and
        // may queue more) and call again while chains remain: after a batch, and before a wait
        // for the rate limit, so the guest does not wait for the whole ring to drain.
        for (int sent = 0; sent < TransmitBatch; sent++)
        {
            if (sent > 0 && _txLimit?.InDebt == true)
                return;
            if (!queue.TryPop(out var chain))
                return;
            ulong length = chain.ReadableBytes;
            if (length < VirtioNetHeader.Size + EthHeader)
                _counters.TxMalformed();
            else if (length > VirtioNetHeader.MaxPacket)
                _counters.TxTooLong();
            else
            {
                var packet = buffer.AsSpan(0, (int)length);
                Gather(memory, chain.Readable, 0, packet);
                Transmit(pair, packet);
            }
            queue.Push(chain.Head, 0);
        }
    }

    /// <summary>Checks one frame from the guest and sends it, or drops and counts it.</summary>
    private void Transmit(int pair, Span<byte> packet)
    {
        byte flags = packet[0];
        byte gso = packet[1];
        int frame = packet.Length - VirtioNetHeader.Size;
        if ((flags & VirtioNetHeader.FlagNeedsCsum) != 0 && !Negotiated(FeatureCsum) ||
            (flags & ~(VirtioNetHeader.FlagNeedsCsum | VirtioNetHeader.FlagDataValid)) != 0)
        {
            _counters.TxMalformed();
            return;
        }
        switch (gso & ~VirtioNetHeader.GsoEcn)
        {
            case VirtioNetHeader.GsoNone:
                if (frame > _options.Mtu + 18)
                {
                    _counters.TxTooLong();
                    return;
                }
                break;
            case VirtioNetHeader.GsoTcpV4 when Negotiated(FeatureHostTso4) && ((gso & VirtioNetHeader.GsoEcn) == 0 || Negotiated(FeatureHostEcn)):
            case VirtioNetHeader.GsoTcpV6 when Negotiated(FeatureHostTso6) && ((gso & VirtioNetHeader.GsoEcn) == 0 || Negotiated(FeatureHostEcn)):
                break;
            default:
                _counters.TxMalformed();
                return;
        }
        var source = MacAddress.FromBytes(packet.Slice(VirtioNetHeader.Size + 6, 6));
        if (!_options.AllowSpoofing && source != _options.Mac)
        {
            _counters.TxSpoofed();
            return;
        }
        packet[10] = packet[11] = 0;        // num_buffers means nothing on transmit
        // The monitor sees every frame the guest offers (see ProcessReceive).
        _monitor?.Observe(TrafficDirection.Out, packet[VirtioNetHeader.Size..]);
        if (_dosTx is { } dos)
        {
            // Over a firing DoS rule's limit the frame is dropped: a flooding guest is not paced
            // like a well-behaved one, its excess simply does not leave.
            if (dos.InDebt)
            {
                _counters.TxDosLimited();
                return;
            }
            dos.Charge(frame);
        }
        // Over its limit the guest waits: its transmit ring fills and its stack slows down, as
        // behind a slower link (frames are not dropped).
        _txLimit?.Take(frame);
        if (_backend.Send(pair, packet))
            _counters.Tx(frame);
        else
            _counters.TxBackendDropped();
    }

    private void ProcessControl(Virtqueue queue)
    {
        var memory = Memory;
        Span<byte> head = stackalloc byte[2];
        while (queue.TryPop(out var chain))
        {
            if (chain.ReadableBytes < 2 || chain.WritableBytes < 1)
                throw new VirtqueueException($"{Name}: control command (head {chain.Head}) has {chain.ReadableBytes} device-readable and {chain.WritableBytes} device-writable bytes; it needs 2 and 1 at least");
            Gather(memory, chain.Readable, 0, head);
            ulong dataLength = chain.ReadableBytes - 2;
            byte ack;
            if (dataLength > MaxControlData)
                ack = AckErr;
            else
            {
                var data = new byte[(int)dataLength];
                Gather(memory, chain.Readable, 2, data);
                ack = Control(head[0], head[1], data);
            }
            _counters.Control(ack == AckOk);
            Scatter(memory, chain.Writable, 0, [ack]);
            queue.Push(chain.Head, 1);
        }
    }

    /// <summary>Carries out one control command; its ack.</summary>
    private byte Control(byte cls, byte command, ReadOnlySpan<byte> data)
    {
        switch (cls)
        {
            case CtrlRx when Negotiated(FeatureCtrlRx) && data.Length == 1 && command <= RxNoBcast:
                _filter = _filter.With(command, data[0] != 0);
                return AckOk;
            case CtrlMac when command == MacTableSet && Negotiated(FeatureCtrlRx):
                return SetMacTable(data);
            case CtrlMac when command == MacAddrSet && Negotiated(FeatureCtrlMacAddr) && data.Length == 6:
                var mac = MacAddress.FromBytes(data);
                if (mac.IsMulticast || (!_options.AllowSpoofing && mac != _options.Mac))
                    return AckErr;
                _mac = mac;
                return AckOk;
            case CtrlAnnounce when command == AnnounceAck && Negotiated(FeatureGuestAnnounce) && data.Length == 0:
                Interlocked.And(ref _status, ~StatusAnnounce);
                return AckOk;
            case CtrlMq when command == MqVqPairsSet && Negotiated(FeatureMq) && data.Length == 2:
                ushort pairs = BinaryPrimitives.ReadUInt16LittleEndian(data);
                if (pairs < 1 || pairs > _options.QueuePairs)
                    return AckErr;
                _backend.SetActivePairs(pairs);
                Volatile.Write(ref _activePairs, pairs);
                // Receive workers of pairs now in use sleep without watching the backend: wake them.
                for (int p = 0; p < pairs; p++)
                    _kick(2 * p);
                return AckOk;
            default:
                return AckErr;
        }
    }

    /// <summary>VIRTIO_NET_CTRL_MAC_TABLE_SET: a unicast and a multicast table, each a 32-bit count and that many addresses.</summary>
    private byte SetMacTable(ReadOnlySpan<byte> data)
    {
        var tables = new MacAddress[2][];
        var overflow = new bool[2];
        for (int t = 0; t < 2; t++)
        {
            if (data.Length < 4)
                return AckErr;
            uint entries = BinaryPrimitives.ReadUInt32LittleEndian(data);
            data = data[4..];
            if (entries > (uint)data.Length / 6)
                return AckErr;
            overflow[t] = entries > MaxFilterEntries;
            tables[t] = new MacAddress[overflow[t] ? 0 : entries];
            for (int i = 0; i < tables[t].Length; i++)
                tables[t][i] = MacAddress.FromBytes(data.Slice(6 * i, 6));
            data = data[(int)(6 * entries)..];
        }
        if (data.Length != 0)
            return AckErr;
        _filter = _filter with { Unicast = tables[0], Multicast = tables[1], UnicastOverflow = overflow[0], MulticastOverflow = overflow[1] };
        return AckOk;
    }

    // ---------------------------------------------------------------- state

    public string StateKind => "virtio-net";

    /// <summary>A frame read from the backend and not yet delivered is dropped at a pause (the network may lose frames; a snapshot must not hold half of one).</summary>
    public void Pause()
    {
        foreach (var rx in _rx)
            if (rx.Length != 0)
            {
                rx.Length = 0;
                _counters.RxDroppedAtPause();
            }
    }

    public VirtioNetState Save() => new(_options.Mac, _mac, _options.QueuePairs, ActivePairs,
        (ushort)(Volatile.Read(ref _status) & StatusAnnounce), _filter);

    public void SaveState(StateWriter writer) => Save().Write(writer);

    /// <summary>
    /// The next <see cref="RestoreState"/> makes this device a fork's (a copy of the saved VM
    /// with an identity of its own): it takes the saved device's state with this device's MAC,
    /// configured and in use, instead of refusing a MAC that differs. The guest's driver still
    /// holds the MAC it read at probe time until it probes the device again.
    /// </summary>
    public bool RestoreAsFork { get; set; }

    /// <summary>Takes the saved device if the guest cannot tell this one from it: same configured MAC and queue pairs (any MAC for a fork: <see cref="RestoreAsFork"/>).</summary>
    public void RestoreState(ref StateReader reader)
    {
        var saved = VirtioNetState.Read(ref reader);
        if (saved.ConfiguredMac != _options.Mac && !RestoreAsFork)
            throw new DeviceStateException($"{Name}: the saved device had MAC {saved.ConfiguredMac}, this one {_options.Mac}");
        if (saved.QueuePairs != _options.QueuePairs)
            throw new DeviceStateException($"{Name}: the saved device had {saved.QueuePairs} queue pairs, this one {_options.QueuePairs}");
        if (RestoreAsFork)
            _mac = _options.Mac;
        else if (saved.Mac.IsMulticast || (!_options.AllowSpoofing && saved.Mac != _options.Mac))
            throw new DeviceStateException($"{Name}: the saved device's MAC {saved.Mac} is not one this device may take (configured {_options.Mac}{(_options.AllowSpoofing ? "" : ", spoofing not allowed")})");
        else
            _mac = saved.Mac;
        Volatile.Write(ref _activePairs, saved.ActivePairs);
        Volatile.Write(ref _status, StatusLinkUp | saved.Announce);
        _filter = saved.Filter;
    }

    public void Dispose()
    {
        _monitor?.Dispose();
        _stopGroup.Set();
        _groupThread?.Join();
        _group?.Dispose();
        _backend.Dispose();
    }

    /// <summary>A receive queue's frame in hand and the chains a frame went into.</summary>
    private sealed class RxState(int queueSize)
    {
        public readonly byte[] Buffer = new byte[VirtioNetHeader.MaxPacket];
        public readonly (ushort Head, uint Length)[] Used = new (ushort, uint)[queueSize];
        public int Length;
    }
}
