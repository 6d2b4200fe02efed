using System.Buffers.Binary;

namespace Kvm.Network;

/// <summary>
/// Finishes, for a guest that does not accept them, the offloads a received frame still carries:
/// a checksum left to compute (NEEDS_CSUM) and a segmentation left to do (GSO TCP over IPv4 or
/// IPv6, UDP segmentation). A tap does this in the kernel (TUNSETOFFLOAD); a packet socket hands
/// frames over as the host's stack holds them (a veth peer's TCP send is one 64 KiB frame), so
/// its backend finishes them here. One per receive queue: a segmented frame is kept and handed
/// out one segment per <see cref="Next"/>.
/// </summary>
/// <remarks>
/// The frames come from the host (not the guest) but are checked all the same: a frame whose
/// headers do not hold up is dropped (counted by the caller), never read past its end.
/// Segments follow what a NIC's TSO does: the headers copied, IPv4 total length, identification
/// (+1 per segment) and header checksum, IPv6 payload length, TCP sequence number (FIN and PSH on
/// the last segment only, CWR on the first only) and a full TCP or UDP checksum.
/// </remarks>
public sealed class OffloadFinisher
{
    public enum Result
    {
        /// <summary>The frame is ready in place (its checksum completed where needed): deliver it.</summary>
        Deliver,
        /// <summary>The frame was taken to be segmented: its segments come from <see cref="Next"/>.</summary>
        Segmented,
        /// <summary>The frame cannot be finished (headers that do not hold up, an offload not known): drop it.</summary>
        Drop,
    }

    private const int EtherTypeIPv4 = 0x0800, EtherTypeIPv6 = 0x86dd, EtherTypeVlan = 0x8100, EtherTypeQinQ = 0x88a8;
    private const byte ProtocolTcp = 6, ProtocolUdp = 17;
    private const byte GsoUdpL4 = 5;

    private readonly byte[] _frame = new byte[VirtioNetHeader.MaxPacket];
    private int _length;                        // of the frame held in _frame (header included); 0: none
    private int _l3, _l4, _headers, _segment, _next, _index;
    private bool _ipv4, _tcp;

    /// <summary>Whether segments of a frame are still to come from <see cref="Next"/>.</summary>
    public bool Pending => _length > 0;

    /// <summary>
    /// Makes <paramref name="packet"/> (virtio-net header and frame) fit a guest that accepts
    /// <paramref name="accepted"/>: completes its checksum in place, or takes it for segmenting.
    /// </summary>
    public Result Finish(Span<byte> packet, NetOffloads accepted)
    {
        if (packet.Length < VirtioNetHeader.Size + 14)
            return Result.Drop;
        byte flags = packet[0], gso = packet[1];
        byte gsoKind = (byte)(gso & ~VirtioNetHeader.GsoEcn);
        if (gsoKind != VirtioNetHeader.GsoNone)
        {
            bool takes = gsoKind switch
            {
                VirtioNetHeader.GsoTcpV4 => accepted.HasFlag(NetOffloads.Tso4),
                VirtioNetHeader.GsoTcpV6 => accepted.HasFlag(NetOffloads.Tso6),
                _ => false,
            } && ((gso & VirtioNetHeader.GsoEcn) == 0 || accepted.HasFlag(NetOffloads.TsoEcn));
            if (takes)
                return Result.Deliver;
            return gsoKind is VirtioNetHeader.GsoTcpV4 or VirtioNetHeader.GsoTcpV6 or GsoUdpL4 && Load(packet, gsoKind)
                ? Result.Segmented : Result.Drop;
        }
        if (accepted.HasFlag(NetOffloads.Checksum))
            return Result.Deliver;
        if ((flags & VirtioNetHeader.FlagNeedsCsum) != 0)
        {
            var frame = packet[VirtioNetHeader.Size..];
            int start = BinaryPrimitives.ReadUInt16LittleEndian(packet[6..]), offset = BinaryPrimitives.ReadUInt16LittleEndian(packet[8..]);
            if (start + offset + 2 > frame.Length)
                return Result.Drop;
            // The field holds the pseudo-header's sum already (CHECKSUM_PARTIAL): add the rest.
            ushort sum = Fold(Sum(frame[start..], 0));
            BinaryPrimitives.WriteUInt16BigEndian(frame[(start + offset)..], sum == 0xffff ? (ushort)0xffff : (ushort)~sum);
        }
        // Without GUEST_CSUM the header's flags must be zero (virtio 1.2, 5.1.6.4.1).
        packet[..10].Clear();
        return Result.Deliver;
    }

    /// <summary>Writes the next segment (header and frame) into <paramref name="buffer"/>; its length, 0 when none is left.</summary>
    public int Next(Span<byte> buffer)
    {
        if (_length == 0)
            return 0;
        var frame = _frame.AsSpan(VirtioNetHeader.Size, _length - VirtioNetHeader.Size);
        int payload = frame.Length - _headers;
        int take = Math.Min(_segment, payload - _next);
        bool first = _next == 0, last = _next + take == payload;
        int length = _headers + take;
        buffer[..VirtioNetHeader.Size].Clear();
        var seg = buffer.Slice(VirtioNetHeader.Size, length);
        frame[.._headers].CopyTo(seg);
        frame.Slice(_headers + _next, take).CopyTo(seg[_headers..]);

        var ip = seg[_l3.._l4];
        if (_ipv4)
        {
            BinaryPrimitives.WriteUInt16BigEndian(ip[2..], (ushort)(length - _l3));
            BinaryPrimitives.WriteUInt16BigEndian(ip[4..], (ushort)(BinaryPrimitives.ReadUInt16BigEndian(ip[4..]) + _index));
            BinaryPrimitives.WriteUInt16BigEndian(ip[10..], 0);
            BinaryPrimitives.WriteUInt16BigEndian(ip[10..], (ushort)~Fold(Sum(ip, 0)));
        }
        else
            BinaryPrimitives.WriteUInt16BigEndian(ip[4..], (ushort)(length - _l4));
        var l4 = seg[_l4..];
        int checksumAt;
        if (_tcp)
        {
            uint seq = BinaryPrimitives.ReadUInt32BigEndian(l4[4..]);
            BinaryPrimitives.WriteUInt32BigEndian(l4[4..], seq + (uint)_next);
            if (!last)
                l4[13] &= unchecked((byte)~(0x01 | 0x08));      // FIN, PSH
            if (!first)
                l4[13] &= unchecked((byte)~0x80);               // CWR
            checksumAt = 16;
        }
        else
        {
            BinaryPrimitives.WriteUInt16BigEndian(l4[4..], (ushort)l4.Length);
            checksumAt = 6;
        }
        BinaryPrimitives.WriteUInt16BigEndian(l4[checksumAt..], 0);
        ushort sum = (ushort)~Fold(Sum(l4, PseudoHeader(ip, _ipv4, _tcp ? ProtocolTcp : ProtocolUdp, l4.Length)));
        BinaryPrimitives.WriteUInt16BigEndian(l4[checksumAt..], !_tcp && sum == 0 ? (ushort)0xffff : sum);

        _next += take;
        _index++;
        if (last)
            _length = 0;
        return VirtioNetHeader.Size + length;
    }

    /// <summary>Drops a frame whose segments were not all taken (the queue was reset).</summary>
    public void Clear() => _length = 0;

    /// <summary>Checks the headers of a GSO frame and keeps it for <see cref="Next"/>; false when they do not hold up.</summary>
    private bool Load(ReadOnlySpan<byte> packet, byte gsoKind)
    {
        var frame = packet[VirtioNetHeader.Size..];
        int segment = BinaryPrimitives.ReadUInt16LittleEndian(packet[4..]);
        int l3 = 14, type = BinaryPrimitives.ReadUInt16BigEndian(frame[12..]);
        while (type is EtherTypeVlan or EtherTypeQinQ)
        {
            if (frame.Length < l3 + 4)
                return false;
            type = BinaryPrimitives.ReadUInt16BigEndian(frame[(l3 + 2)..]);
            l3 += 4;
        }
        int l4, protocol;
        bool ipv4;
        if (type == EtherTypeIPv4 && gsoKind != VirtioNetHeader.GsoTcpV6)
        {
            if (frame.Length < l3 + 20 || frame[l3] >> 4 != 4)
                return false;
            l4 = l3 + (frame[l3] & 0xf) * 4;
            protocol = frame[l3 + 9];
            ipv4 = true;
        }
        else if (type == EtherTypeIPv6 && gsoKind != VirtioNetHeader.GsoTcpV4)
        {
            // (Extension headers are not followed: a frame with them is dropped.)
            if (frame.Length < l3 + 40 || frame[l3] >> 4 != 6)
                return false;
            l4 = l3 + 40;
            protocol = frame[l3 + 6];
            ipv4 = false;
        }
        else
            return false;
        bool tcp = gsoKind != GsoUdpL4;
        if (protocol != (tcp ? ProtocolTcp : ProtocolUdp) || l4 < l3 + 20)
            return false;
        int headers = tcp ? (frame.Length >= l4 + 20 ? l4 + (frame[l4 + 12] >> 4) * 4 : int.MaxValue) : l4 + 8;
        if (tcp && headers < l4 + 20 || headers > frame.Length || segment == 0 || headers + segment > VirtioNetHeader.MaxPacket - VirtioNetHeader.Size)
            return false;
        if (headers == frame.Length)
        {
            // No payload: one segment, as it is.
            segment = 1;
        }
        packet.CopyTo(_frame);
        (_length, _l3, _l4, _headers, _segment, _next, _index, _ipv4, _tcp) = (packet.Length, l3, l4, headers, segment, 0, 0, ipv4, tcp);
        return true;
    }

    /// <summary>The ones' complement sum of the pseudo-header for a TCP or UDP checksum (RFC 793, RFC 8200 8.1).</summary>
    private static uint PseudoHeader(ReadOnlySpan<byte> ip, bool ipv4, byte protocol, int length)
    {
        uint sum = ipv4 ? Sum(ip.Slice(12, 8), 0) : Sum(ip.Slice(8, 32), 0);
        return sum + protocol + (uint)(length >> 16) + (uint)(length & 0xffff);
    }

    /// <summary>Adds <paramref name="data"/> to a ones' complement sum as big-endian 16-bit words (an odd last byte padded with zero).</summary>
    public static uint Sum(ReadOnlySpan<byte> data, uint sum)
    {
        ulong s = sum;
        int i = 0;
        for (; i + 1 < data.Length; i += 2)
            s += BinaryPrimitives.ReadUInt16BigEndian(data[i..]);
        if (i < data.Length)
            s += (uint)data[i] << 8;
        while (s >> 32 != 0)
            s = (s & 0xffffffff) + (s >> 32);
        return (uint)s;
    }

    /// <summary>Folds a sum to 16 bits.</summary>
    public static ushort Fold(uint sum)
    {
        while (sum >> 16 != 0)
            sum = (sum & 0xffff) + (sum >> 16);
        return (ushort)sum;
    }
}
