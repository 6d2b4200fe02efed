using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Network;

/// <summary>
/// A host interface (a NIC, a bond, a veth) as a VM's uplink, reached through packet sockets: the
/// VMM itself sends the VM's frames out of that interface and takes the frames addressed to the
/// VM's MAC (or a group address) as they arrive, without a tap or a bridge. One socket per queue
/// pair, in one fanout group, so that the kernel spreads flows over the sockets by hash; when the
/// guest uses fewer pairs, pair p serves the sockets j with j mod pairs = p (a flow stays on one
/// socket, so its frames stay in order). The sockets
/// carry the 10-byte virtio-net header (PACKET_VNET_HDR): the guest's checksum and segmentation
/// offloads go out as they are (the kernel finishes them for an interface that cannot), and
/// received frames the guest cannot take as they are (a checksum or a segmentation left to do)
/// are finished here (<see cref="OffloadFinisher"/>).
/// </summary>
/// <remarks>
/// The interface is told to accept the VM's MAC (its unicast filter) rather than being made
/// promiscuous. The host's own frames on the interface are not seen by the VM and the VM's are not
/// seen by the host: like macvtap's default, the host and the VM do not talk through it.
/// A VLAN tag the interface strips on receive is not put back.
/// </remarks>
public sealed class PacketBackend : INetBackend
{
    private readonly PacketSocketHandle[] _sockets;
    private readonly EpollHandle[] _wake;            // per pair: readable while a socket it serves is
    private readonly OffloadFinisher[] _finishers;
    private volatile int[][] _served;                // per pair: the sockets it reads
    private readonly int[] _next;                    // per pair: the socket it reads first next time
    private readonly long[] _frames;                 // per socket: frames read
    private readonly Lock _lock = new();
    private volatile NetOffloads _offloads;
    private long _unfinished, _segmented;

    private PacketBackend(string device, PacketSocketHandle[] sockets, EpollHandle[] wake)
    {
        Device = device;
        _sockets = sockets;
        _wake = wake;
        _finishers = sockets.Select(_ => new OffloadFinisher()).ToArray();
        _served = sockets.Select((_, i) => new[] { i }).ToArray();
        _next = new int[sockets.Length];
        _frames = new long[sockets.Length];
    }

    /// <summary>The host interface's name.</summary>
    public string Device { get; }

    public string Name => "interface " + Device;

    public int QueuePairs => _sockets.Length;

    public string? Interface => Device;

    /// <summary>Received frames dropped because their offloads could not be finished for the guest.</summary>
    public long Unfinished => Interlocked.Read(ref _unfinished);

    /// <summary>Frames read from each socket (the fanout's spread), for stats and tests.</summary>
    public long[] FramesPerSocket => Enumerable.Range(0, _frames.Length).Select(i => Interlocked.Read(ref _frames[i])).ToArray();

    /// <summary>Received GSO frames segmented here for a guest that does not take them whole.</summary>
    public long Segmented => Interlocked.Read(ref _segmented);

    /// <summary>
    /// Opens <paramref name="pairs"/> packet sockets on host interface <paramref name="device"/>
    /// for the VM whose MAC is <paramref name="mac"/>. The interface must exist; it is not brought
    /// up (that is the host's to decide). Throws <see cref="IOException"/> naming the interface and
    /// what failed.
    /// </summary>
    public static PacketBackend Open(string device, int pairs, MacAddress mac)
    {
        if (pairs < 1)
            throw new ArgumentOutOfRangeException(nameof(pairs), pairs, "an uplink needs at least one queue");
        if (device.Length == 0 || System.Text.Encoding.UTF8.GetByteCount(device) >= KvmShim.InterfaceNameSize || device.Contains('/'))
            throw new IOException($"'{device}' is not an interface name (1 to {KvmShim.InterfaceNameSize - 1} bytes, no '/')");
        Span<byte> bytes = stackalloc byte[6];
        mac.CopyTo(bytes);
        var handles = new List<SafeHandle>();
        try
        {
            int? fanout = pairs > 1 ? 0 : null;
            var sockets = new PacketSocketHandle[pairs];
            var wake = new EpollHandle[pairs];
            for (int i = 0; i < pairs; i++)
                handles.Add(sockets[i] = KvmShim.OpenPacketSocket(device, bytes, ref fanout));
            for (int i = 0; i < pairs; i++)
                handles.Add(wake[i] = KvmShim.EpollOf([sockets[i]]));
            return new PacketBackend(device, sockets, wake);
        }
        catch
        {
            foreach (var h in handles)
                h.Dispose();
            throw;
        }
    }

    public SafeHandle ReceiveHandle(int pair) => _wake[pair];

    public int Receive(int pair, Span<byte> buffer)
    {
        var finisher = _finishers[pair];
        if (finisher.Pending)
            return finisher.Next(buffer);
        const int Short = VirtioNetHeader.Size - PacketHeaderSize;
        var served = _served[pair];
        for (int tried = 0; tried < served.Length; )
        {
            // The sockets this pair serves in turn, so that none starves the others.
            int socket = served[_next[pair] % served.Length];
            // The socket's 10-byte header lands 2 bytes in, then moves to the front; the 2 bytes
            // after it (num_buffers) are the device's to fill.
            int n = FdIo.ReceiveDatagram(_sockets[socket], buffer[Short..]);
            _next[pair]++;
            if (n < 0)
            {
                if (n == -Errno.EAGAIN || n == -Errno.EINTR)
                {
                    tried++;
                    continue;
                }
                throw new IOException($"interface '{Device}' socket {socket}: read failed: {Errno.Describe(-n)}");
            }
            tried = 0;
            Interlocked.Increment(ref _frames[socket]);
            if (n < PacketHeaderSize)
                continue;
            if (n > buffer.Length - Short)
            {
                // Larger than any frame the device takes (a BIG TCP frame past 64 KiB): cut, so dropped.
                Interlocked.Increment(ref _unfinished);
                continue;
            }
            buffer.Slice(Short, PacketHeaderSize).CopyTo(buffer);
            BinaryPrimitives.WriteUInt16LittleEndian(buffer[PacketHeaderSize..], 0);
            int length = n + Short;
            switch (finisher.Finish(buffer[..length], _offloads))
            {
                case OffloadFinisher.Result.Deliver:
                    return length;
                case OffloadFinisher.Result.Segmented:
                    Interlocked.Increment(ref _segmented);
                    return finisher.Next(buffer);
                default:
                    Interlocked.Increment(ref _unfinished);
                    continue;
            }
        }
        return 0;
    }

    /// <summary>The socket's header: virtio_net_hdr without num_buffers.</summary>
    private const int PacketHeaderSize = 10;

    public bool Send(int pair, ReadOnlySpan<byte> packet)
    {
        if (packet.Length < VirtioNetHeader.Size)
            return false;
        int n = FdIo.Write(_sockets[pair], packet[..PacketHeaderSize], packet[VirtioNetHeader.Size..]);
        return n == packet.Length - (VirtioNetHeader.Size - PacketHeaderSize);
    }

    public void SetOffloads(NetOffloads offloads) => _offloads = offloads;

    /// <summary>
    /// The fanout spreads flows over every socket whatever the guest uses (a packet socket cannot
    /// leave its group), so the pairs the guest uses take over the sockets of those it does not:
    /// socket j goes to pair j mod <paramref name="count"/>, its fd moved to that pair's epoll.
    /// </summary>
    public void SetActivePairs(int count)
    {
        count = Math.Clamp(count, 1, _sockets.Length);
        lock (_lock)
        {
            var old = _served;
            var served = Enumerable.Range(0, _sockets.Length)
                .Select(p => p < count ? Enumerable.Range(0, _sockets.Length).Where(j => j % count == p).ToArray() : [])
                .ToArray();
            for (int p = 0; p < _sockets.Length; p++)
            {
                foreach (int j in old[p].Except(served[p]))
                    KvmShim.EpollRemove(_wake[p], _sockets[j]);
                foreach (int j in served[p].Except(old[p]))
                    KvmShim.EpollAdd(_wake[p], _sockets[j]);
            }
            _served = served;
        }
    }

    public bool LinkUp
    {
        get
        {
            int flags = KvmShim.InterfaceFlags(Device);
            return flags >= 0 && (flags & KvmShim.InterfaceUp) != 0 && (flags & KvmShim.InterfaceRunning) != 0;
        }
    }

    public void Dispose()
    {
        foreach (var w in _wake)
            w.Dispose();
        foreach (var s in _sockets)
            s.Dispose();
    }
}
