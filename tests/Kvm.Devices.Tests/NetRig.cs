using System.Buffers.Binary;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Net;
using Kvm.Hypervisor;
using Kvm.Network;

namespace Kvm.Devices.Tests;

/// <summary>
/// An <see cref="INetBackend"/> over real sockets: each queue pair is an AF_UNIX SOCK_SEQPACKET
/// pair (one message, one frame with its virtio-net header), the device's end non-blocking, its fd
/// the receive queue's wake handle. The test holds the other end and plays the network: it injects
/// frames for the guest and reads what the guest sent. Offload and queue-pair calls are recorded.
/// </summary>
public sealed class SocketPairBackend : INetBackend
{
    private readonly Socket[] _device;
    private readonly Socket[] _network;
    private readonly List<NetOffloads> _offloads = [];
    private readonly List<int> _activePairs = [];
    private readonly byte[] _readBuffer = new byte[VirtioNetHeader.MaxPacket + 64];
    private long _sent;

    public SocketPairBackend(int pairs)
    {
        _device = new Socket[pairs];
        _network = new Socket[pairs];
        for (int i = 0; i < pairs; i++)
        {
            (_device[i], _network[i]) = CreatePair();
            _device[i].Blocking = false;
        }
    }

    /// <summary>A connected SOCK_SEQPACKET pair (an abstract-namespace listener stands in for socketpair(2)).</summary>
    public static (Socket A, Socket B) CreatePair()
    {
        var endpoint = new UnixDomainSocketEndPoint("\0kvm-net-test-" + Guid.NewGuid().ToString("N"));
        using var listener = new Socket(AddressFamily.Unix, SocketType.Seqpacket, ProtocolType.Unspecified);
        listener.Bind(endpoint);
        listener.Listen(1);
        var a = new Socket(AddressFamily.Unix, SocketType.Seqpacket, ProtocolType.Unspecified);
        a.Connect(endpoint);
        var b = listener.Accept();
        foreach (var s in new[] { a, b })
        {
            s.SendBufferSize = 4 << 20;
            s.ReceiveBufferSize = 4 << 20;
        }
        return (a, b);
    }

    public string Name => "socketpair";

    public int QueuePairs => _device.Length;

    /// <summary>While true, <see cref="Send"/> refuses every frame (a full or broken uplink).</summary>
    public bool RefuseSends { get; set; }

    public bool LinkUp { get; set; } = true;

    public bool Disposed { get; private set; }

    public IReadOnlyList<NetOffloads> OffloadCalls
    {
        get { lock (_offloads) return _offloads.ToArray(); }
    }

    public IReadOnlyList<int> ActivePairCalls
    {
        get { lock (_activePairs) return _activePairs.ToArray(); }
    }

    /// <summary>Frames the device handed to <see cref="Send"/> and that were accepted.</summary>
    public long Sent => Interlocked.Read(ref _sent);

    public SafeHandle ReceiveHandle(int pair) => _device[pair].SafeHandle;

    public int Receive(int pair, Span<byte> buffer)
    {
        int n = _device[pair].Receive(buffer, SocketFlags.None, out SocketError error);
        if (error is SocketError.WouldBlock or SocketError.Interrupted)
            return 0;
        if (error != SocketError.Success)
            throw new IOException($"socketpair {pair}: receive failed: {error}");
        return n;
    }

    public bool Send(int pair, ReadOnlySpan<byte> packet)
    {
        if (RefuseSends)
            return false;
        int n = _device[pair].Send(packet, SocketFlags.None, out SocketError error);
        if (error != SocketError.Success || n != packet.Length)
            return false;
        Interlocked.Increment(ref _sent);
        return true;
    }

    public void SetOffloads(NetOffloads offloads)
    {
        lock (_offloads)
            _offloads.Add(offloads);
    }

    public void SetActivePairs(int count)
    {
        lock (_activePairs)
            _activePairs.Add(count);
    }

    // ------------------------------------------------------------------ the network's end

    /// <summary>Sends <paramref name="packet"/> (header and frame) towards the guest on <paramref name="pair"/>.</summary>
    public void Inject(int pair, ReadOnlySpan<byte> packet)
    {
        int n = _network[pair].Send(packet);
        if (n != packet.Length)
            throw new IOException($"injected {n} of {packet.Length} bytes");
    }

    /// <summary>The next packet the guest sent on <paramref name="pair"/>, or null if none arrives within <paramref name="timeout"/>.</summary>
    public byte[]? Read(int pair, TimeSpan? timeout = null)
    {
        var s = _network[pair];
        if (!s.Poll(timeout ?? Wait.Timeout, SelectMode.SelectRead))
            return null;
        int n = s.Receive(_readBuffer);
        return _readBuffer.AsSpan(0, n).ToArray();
    }

    /// <summary>Whether a packet from the guest waits on <paramref name="pair"/> now.</summary>
    public bool HasSent(int pair) => _network[pair].Poll(0, SelectMode.SelectRead);

    /// <summary>Every packet waiting now on <paramref name="pair"/>.</summary>
    public List<byte[]> Drain(int pair)
    {
        var all = new List<byte[]>();
        while (HasSent(pair))
            all.Add(Read(pair, TimeSpan.Zero)!);
        return all;
    }

    public void Dispose()
    {
        Disposed = true;
        foreach (var s in _device.Concat(_network))
            s.Dispose();
    }
}

/// <summary>Ethernet frames and virtio-net headers for tests.</summary>
public static class Eth
{
    public const int HeaderSize = VirtioNetHeader.Size;

    public static readonly MacAddress VmMac = MacAddress.Parse("52:54:00:12:34:56");
    public static readonly MacAddress PeerMac = MacAddress.Parse("52:54:00:ab:cd:ef");
    public static readonly MacAddress OtherMac = MacAddress.Parse("52:54:00:99:99:99");
    public static readonly MacAddress Multicast = MacAddress.Parse("01:00:5e:00:00:fb");
    public static readonly MacAddress OtherMulticast = MacAddress.Parse("33:33:00:00:00:01");

    /// <summary>An Ethernet frame of <paramref name="length"/> bytes (header included) with seeded payload.</summary>
    public static byte[] Frame(MacAddress destination, MacAddress source, int length, int seed = 1, ushort etherType = 0x0800)
    {
        var f = new byte[length];
        new Random(seed).NextBytes(f);
        if (length >= 6)
            destination.CopyTo(f);
        if (length >= 12)
            source.CopyTo(f.AsSpan(6));
        if (length >= 14)
            BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(12), etherType);
        return f;
    }

    /// <summary>struct virtio_net_hdr_v1 followed by <paramref name="frame"/>.</summary>
    public static byte[] Packet(ReadOnlySpan<byte> frame, byte flags = 0, byte gso = 0, ushort hdrLen = 0, ushort gsoSize = 0,
        ushort csumStart = 0, ushort csumOffset = 0, ushort numBuffers = 0)
    {
        var p = new byte[HeaderSize + frame.Length];
        p[0] = flags;
        p[1] = gso;
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(2), hdrLen);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(4), gsoSize);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(6), csumStart);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(8), csumOffset);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(10), numBuffers);
        frame.CopyTo(p.AsSpan(HeaderSize));
        return p;
    }

    public static ushort NumBuffers(ReadOnlySpan<byte> packet) => BinaryPrimitives.ReadUInt16LittleEndian(packet[10..]);

    public static MacAddress Source(ReadOnlySpan<byte> packet) => MacAddress.FromBytes(packet.Slice(HeaderSize + 6, 6));
}

/// <summary>
/// A virtio-net device on a <see cref="SocketPairBackend"/>, its PCI transport (real worker threads)
/// over real guest memory, and a <see cref="VirtioDriver"/> playing the guest's driver. Queue i's
/// rings are at <see cref="RingBase"/> + i * <see cref="RingStride"/>; each queue has an arena of
/// its own for buffers.
/// </summary>
public sealed class NetRig : IDisposable
{
    public const ulong RingBase = 0x10000, RingStride = 0x8000;
    public const ulong DataBase = 0x100000;
    public const uint RxBufferSize = 1536;

    private readonly Dictionary<ushort, (ulong Address, uint Length)>[] _rxBuffers;
    private bool _disposed;

    private NetRig(GuestMemory memory, VirtioNet net, SocketPairBackend backend, VirtioPciTransport transport,
        RecordingMsiController msi, LevelRecorder intx, RecordingLogger log, ulong ramSize)
    {
        Memory = memory;
        Net = net;
        Backend = backend;
        Transport = transport;
        Msi = msi;
        Intx = intx;
        Log = log;
        RamSize = ramSize;
        Driver = new VirtioDriver(transport, memory);
        int queues = net.QueueCount;
        ulong per = (ramSize - DataBase) / (ulong)queues & ~4095UL;
        Arenas = Enumerable.Range(0, queues).Select(i => new GuestArena(memory, DataBase + (ulong)i * per, per)).ToArray();
        _rxBuffers = Enumerable.Range(0, queues).Select(_ => new Dictionary<ushort, (ulong, uint)>()).ToArray();
    }

    public GuestMemory Memory { get; }
    public VirtioNet Net { get; }
    public SocketPairBackend Backend { get; }
    public VirtioPciTransport Transport { get; }
    public RecordingMsiController Msi { get; }
    public LevelRecorder Intx { get; }
    public RecordingLogger Log { get; }
    public VirtioDriver Driver { get; }
    public ulong RamSize { get; }
    public GuestArena[] Arenas { get; }
    public SplitQueue[] Queues { get; private set; } = [];

    public int Pairs => Net.Options.QueuePairs;
    public static int RxQueue(int pair) => 2 * pair;
    public static int TxQueue(int pair) => 2 * pair + 1;
    public int ControlQueue => 2 * Pairs;

    public static VirtioNetOptions DefaultOptions => new() { Mac = Eth.VmMac };

    public static NetRig Create(VirtioNetOptions? options = null, ulong ramSize = 32UL << 20, TimeSpan? pollTime = null,
        string name = "vnet", SocketPairBackend? backend = null)
    {
        options ??= DefaultOptions;
        backend ??= new SocketPairBackend(options.QueuePairs);
        GuestMemory? memory = null;
        try
        {
            var net = new VirtioNet(name, backend, options);
            memory = GuestMemory.Create([(0, ramSize)]);
            var msi = new RecordingMsiController();
            var intx = new LevelRecorder();
            var log = new RecordingLogger();
            var transport = new VirtioPciTransport(net, memory, msi, intx, ioevents: null, log) { PollTime = pollTime ?? TimeSpan.Zero };
            return new NetRig(memory, net, backend, transport, msi, intx, log, ramSize);
        }
        catch
        {
            memory?.Dispose();
            backend.Dispose();
            throw;
        }
    }

    /// <summary>Every feature the device offers (a capable driver takes them all).</summary>
    public ulong AllFeatures => Driver.DeviceFeatures;

    public static ulong Bit(int feature) => 1UL << feature;

    /// <summary>All offered features but those named.</summary>
    public ulong AllBut(params int[] features) => features.Aggregate(AllFeatures, (f, b) => f & ~Bit(b));

    /// <summary>Negotiates, sets up every queue (queue i on MSI-X vector i+1, configuration changes on 0), DRIVER_OK.</summary>
    public void Start(ulong? features = null, ushort queueSize = 64, bool msix = true)
    {
        ulong f = features ?? AllFeatures;
        if (!Driver.Negotiate(f))
            throw new InvalidOperationException($"the device refused features 0x{f:x}");
        int n = Net.QueueCount;
        Queues = new SplitQueue[n];
        bool eventIdx = (f & Bit(VirtioFeature.RingEventIdx)) != 0;
        for (int i = 0; i < n; i++)
        {
            Queues[i] = Driver.SetupQueue(i, queueSize, RingBase + (ulong)i * RingStride, msix ? (ushort)(i + 1) : Virtqueue.NoVector);
            Queues[i].AutoUsedEvent = eventIdx;
            Queues[i].EventIdx = eventIdx;
        }
        if (msix)
        {
            Driver.Write16(VirtioDriver.ConfigMsixVector, 0);
            Driver.ProgramAllVectors(n + 1);
        }
        else
            Driver.SetMsix(false);
        Driver.DriverOk();
        byte status = Driver.Status;
        if ((status & VirtioStatus.DriverOk) == 0 || (status & VirtioStatus.DeviceNeedsReset) != 0)
            throw new InvalidOperationException($"device status 0x{status:x2} after DRIVER_OK");
        foreach (var a in Arenas)
            a.Reset();
        foreach (var d in _rxBuffers)
            d.Clear();
    }

    public bool NeedsReset => (Driver.Status & VirtioStatus.DeviceNeedsReset) != 0;

    /// <summary>Publishes a chain on <paramref name="queue"/> and kicks if the device asked for it (as Linux does).</summary>
    public ushort Submit(int queue, IReadOnlyList<Buf> buffers, bool kick = true)
    {
        var q = Queues[queue];
        ushort head = q.AddChain(buffers);
        if (kick && q.NeedsKick())
            Driver.Kick(queue);
        return head;
    }

    // ------------------------------------------------------------------ transmit

    /// <summary>
    /// Puts <paramref name="packet"/> (header and frame) on the transmit queue of <paramref name="pair"/>, the
    /// header in a descriptor of its own and the frame in <paramref name="pieces"/> buffers, and waits
    /// until the device used it; returns the used length.
    /// </summary>
    public uint Transmit(ReadOnlySpan<byte> packet, int pair = 0, int pieces = 1, bool separateHeader = true)
    {
        int queue = TxQueue(pair);
        var arena = Arenas[queue];
        arena.Reset();
        var bufs = new List<Buf>();
        int at = 0;
        if (separateHeader && packet.Length >= Eth.HeaderSize)
        {
            ulong h = arena.Alloc(Eth.HeaderSize);
            Memory.Write(h, packet[..Eth.HeaderSize]);
            bufs.Add(new Buf(h, Eth.HeaderSize));
            at = Eth.HeaderSize;
        }
        int rest = packet.Length - at;
        int parts = Math.Max(1, Math.Min(pieces, rest));
        for (int i = 0; i < parts; i++)
        {
            int len = i == parts - 1 ? packet.Length - at : rest / parts;
            ulong a = arena.Alloc((ulong)len + 64);       // a gap after each piece
            Memory.Write(a, packet.Slice(at, len));
            bufs.Add(new Buf(a, (uint)len));
            at += len;
        }
        ushort head = Submit(queue, bufs);
        var q = Queues[queue];
        if (!q.WaitAllUsed())
            throw new TimeoutException($"transmit queue {queue}: chain {head} not used; status 0x{Driver.Status:x2}");
        var e = Assert.Single(q.TakeUsed());
        Assert.Equal(head, e.Id);
        return e.Length;
    }

    // ------------------------------------------------------------------ receive

    /// <summary>Posts <paramref name="count"/> receive buffers of <paramref name="size"/> bytes each (one descriptor a chain).</summary>
    public List<ushort> PostRx(int count = 1, uint size = RxBufferSize, int pair = 0, bool kick = true)
    {
        int queue = RxQueue(pair);
        var heads = new List<ushort>();
        for (int i = 0; i < count; i++)
        {
            ulong a = Arenas[queue].Alloc(size);
            Memory.GetWritableSpan(a, (int)size).Fill(0xcc);
            ushort head = Queues[queue].AddChain([new Buf(a, size, Writable: true)]);
            _rxBuffers[queue][head] = (a, size);
            heads.Add(head);
        }
        if (kick && Queues[queue].NeedsKick())
            Driver.Kick(queue);
        return heads;
    }

    /// <summary>Where a receive buffer posted by <see cref="PostRx"/> is.</summary>
    public (ulong Address, uint Length) RxBuffer(int pair, ushort head) => _rxBuffers[RxQueue(pair)][head];

    /// <summary>
    /// Waits for the next received packet on <paramref name="pair"/>: its used elements (as many as
    /// its header's num_buffers says) and their bytes joined.
    /// </summary>
    public (List<(uint Id, uint Length)> Used, byte[] Packet) Receive(int pair = 0)
    {
        var q = Queues[RxQueue(pair)];
        if (!q.WaitForUsedIdx((ushort)(q.LastUsed + 1)))
            throw new TimeoutException($"receive queue {RxQueue(pair)}: nothing received; status 0x{Driver.Status:x2}");
        var first = q.ReadUsedElement(q.LastUsed);
        var (addr, _) = RxBuffer(pair, (ushort)first.Id);
        ushort count = first.Length >= Eth.HeaderSize ? Memory.ReadU16(addr + 10) : (ushort)1;
        if (!q.WaitForUsedIdx((ushort)(q.LastUsed + Math.Max((ushort)1, count))))
            throw new TimeoutException($"receive queue {RxQueue(pair)}: {count} buffers announced, fewer used");
        var used = new List<(uint Id, uint Length)>();
        var bytes = new List<byte>();
        for (int i = 0; i < Math.Max(1, (int)count); i++)
        {
            var e = q.ReadUsedElement((ushort)(q.LastUsed + i));
            used.Add(e);
            var (a, len) = RxBuffer(pair, (ushort)e.Id);
            Assert.True(e.Length <= len, $"used length {e.Length} is more than the buffer's {len}");
            bytes.AddRange(Memory.GetSpan(a, (int)e.Length).ToArray());
        }
        // Take exactly these: the device may have used more buffers for the frames after it.
        var taken = q.TakeUsed(used.Count);
        Assert.Equal(used, taken);
        return (used, bytes.ToArray());
    }

    /// <summary>Sends a control command (class, command, data) and waits for its ack.</summary>
    public byte Control(byte cls, byte command, ReadOnlySpan<byte> data = default)
    {
        int queue = ControlQueue;
        var arena = Arenas[queue];
        arena.Reset();
        ulong h = arena.Alloc(2);
        Memory.Write(h, [cls, command]);
        var bufs = new List<Buf> { new(h, 2) };
        if (!data.IsEmpty)
        {
            ulong d = arena.Alloc((ulong)data.Length);
            Memory.Write(d, data);
            bufs.Add(new Buf(d, (uint)data.Length));
        }
        ulong ack = arena.Alloc(1);
        Memory.WriteU8(ack, 0xee);
        bufs.Add(new Buf(ack, 1, Writable: true));
        ushort head = Submit(queue, bufs);
        var q = Queues[queue];
        if (!q.WaitAllUsed())
            throw new TimeoutException($"control command {cls}/{command} not used; status 0x{Driver.Status:x2}");
        var e = Assert.Single(q.TakeUsed());
        Assert.Equal(head, e.Id);
        Assert.Equal(1u, e.Length);
        return Memory.ReadU8(ack);
    }

    /// <summary>VIRTIO_NET_CTRL_MAC_TABLE_SET's payload.</summary>
    public static byte[] MacTable(IReadOnlyList<MacAddress> unicast, IReadOnlyList<MacAddress> multicast)
    {
        var b = new byte[8 + 6 * (unicast.Count + multicast.Count)];
        int at = 0;
        foreach (var table in new[] { unicast, multicast })
        {
            BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), (uint)table.Count);
            at += 4;
            foreach (var m in table)
            {
                m.CopyTo(b.AsSpan(at));
                at += 6;
            }
        }
        return b;
    }

    /// <summary>The device's configuration space as the driver reads it.</summary>
    public (MacAddress Mac, ushort Status, ushort MaxPairs, ushort Mtu) Config()
    {
        var c = new byte[12];
        Driver.ReadDeviceConfig(0, c);
        return (MacAddress.FromBytes(c), BinaryPrimitives.ReadUInt16LittleEndian(c.AsSpan(6)),
            BinaryPrimitives.ReadUInt16LittleEndian(c.AsSpan(8)), BinaryPrimitives.ReadUInt16LittleEndian(c.AsSpan(10)));
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        Transport.Dispose();
        Memory.Dispose();
    }
}
