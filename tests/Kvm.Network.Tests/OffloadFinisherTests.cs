using System.Buffers.Binary;
using Kvm.Network;

namespace Kvm.Network.Tests;

/// <summary>
/// The offloads a packet-socket uplink finishes for a guest that does not take them: segments
/// checked field by field and with a checksum written here independently (a plain sum of 16-bit
/// words, not the finisher's), checksums completed, and frames that do not hold up dropped. The
/// VM test with a host interface and offloads off (LinuxNetTests) has the guest's own TCP stack
/// as the oracle.
/// </summary>
public class OffloadFinisherTests
{
    private static readonly byte[] Src4 = [10, 0, 0, 1], Dst4 = [10, 0, 0, 2];

    /// <summary>The ones' complement sum of big-endian 16-bit words, written the plain way.</summary>
    private static int Sum16(IEnumerable<byte> bytes)
    {
        var b = bytes.ToArray();
        long sum = 0;
        for (int i = 0; i < b.Length; i += 2)
            sum += (b[i] << 8) | (i + 1 < b.Length ? b[i + 1] : 0);
        while (sum > 0xffff)
            sum = (sum & 0xffff) + (sum >> 16);
        return (int)sum;
    }

    private static byte[] Pseudo(byte[] src, byte[] dst, byte protocol, int length) =>
        src.Length == 4
            ? [.. src, .. dst, 0, protocol, (byte)(length >> 8), (byte)length]
            : [.. src, .. dst, 0, 0, (byte)(length >> 8), (byte)length, 0, 0, 0, protocol];

    /// <summary>A frame with its 12-byte header: Ethernet, IPv4 or IPv6, TCP (with 12 bytes of options) or UDP, and the payload.</summary>
    private static byte[] Frame(bool ipv6, bool tcp, byte[] payload, byte gso, int segment, byte tcpFlags = 0x18)
    {
        int l3 = 14, ipLength = ipv6 ? 40 : 20, l4 = l3 + ipLength, l4Header = tcp ? 32 : 8;
        var p = new byte[VirtioNetHeader.Size + l4 + l4Header + payload.Length];
        var f = p.AsSpan(VirtioNetHeader.Size);
        p[0] = VirtioNetHeader.FlagNeedsCsum;
        p[1] = gso;
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(2), (ushort)(l4 + l4Header));
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(4), (ushort)segment);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(6), (ushort)l4);
        BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(8), (ushort)(tcp ? 16 : 6));
        new byte[] { 2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1 }.CopyTo(f);
        BinaryPrimitives.WriteUInt16BigEndian(f[12..], (ushort)(ipv6 ? 0x86dd : 0x0800));
        var ip = f[l3..];
        int l4Length = l4Header + payload.Length;
        if (ipv6)
        {
            ip[0] = 0x60;
            BinaryPrimitives.WriteUInt16BigEndian(ip[4..], (ushort)l4Length);
            ip[6] = (byte)(tcp ? 6 : 17);
            ip[7] = 64;
            ip[8] = 0xfd;
            ip[23] = 1;
            ip[24] = 0xfd;
            ip[39] = 2;
        }
        else
        {
            ip[0] = 0x45;
            BinaryPrimitives.WriteUInt16BigEndian(ip[2..], (ushort)Math.Min(0xffff, ipLength + l4Length));
            BinaryPrimitives.WriteUInt16BigEndian(ip[4..], 0xfff0);   // wraps past 0xffff
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = (byte)(tcp ? 6 : 17);
            Src4.CopyTo(ip[12..]);
            Dst4.CopyTo(ip[16..]);
        }
        var t = f[l4..];
        BinaryPrimitives.WriteUInt16BigEndian(t, 40000);
        BinaryPrimitives.WriteUInt16BigEndian(t[2..], 5201);
        if (tcp)
        {
            BinaryPrimitives.WriteUInt32BigEndian(t[4..], 0xfffff000);  // wraps too
            BinaryPrimitives.WriteUInt32BigEndian(t[8..], 77);
            t[12] = 8 << 4;
            t[13] = tcpFlags;
            BinaryPrimitives.WriteUInt16BigEndian(t[14..], 502);
            t[20] = 1;
            t[21] = 1;
            t[22] = 8;
            t[23] = 10;
        }
        else
            BinaryPrimitives.WriteUInt16BigEndian(t[4..], (ushort)Math.Min(0xffff, l4Length));
        BinaryPrimitives.WriteUInt16BigEndian(t[(tcp ? 16 : 6)..], 0x1234);    // a partial sum the finisher must not trust
        payload.CopyTo(t[l4Header..]);
        return p;
    }

    private static List<byte[]> Segments(OffloadFinisher finisher)
    {
        var list = new List<byte[]>();
        var buffer = new byte[VirtioNetHeader.MaxPacket];
        int n;
        while ((n = finisher.Next(buffer)) > 0)
            list.Add(buffer[..n]);
        return list;
    }

    [Theory]
    [InlineData(false, true)]
    [InlineData(true, true)]
    [InlineData(false, false)]
    [InlineData(true, false)]
    public void AGsoFrameBecomesSegmentsAGuestWithoutOffloadsAccepts(bool ipv6, bool tcp)
    {
        var payload = new byte[5000];
        new Random(12).NextBytes(payload);
        byte gso = tcp ? (ipv6 ? VirtioNetHeader.GsoTcpV6 : VirtioNetHeader.GsoTcpV4) : (byte)5;
        var packet = Frame(ipv6, tcp, payload, gso, 1448, tcpFlags: 0x80 | 0x18 | 0x01);    // CWR, ACK, PSH, FIN
        var finisher = new OffloadFinisher();
        Assert.Equal(OffloadFinisher.Result.Segmented, finisher.Finish(packet, NetOffloads.None));
        var segments = Segments(finisher);
        Assert.False(finisher.Pending);
        Assert.Equal(4, segments.Count);        // 1448 * 3 + 656

        int l3 = 14, l4 = l3 + (ipv6 ? 40 : 20), headers = l4 + (tcp ? 32 : 8);
        var joined = new List<byte>();
        for (int i = 0; i < segments.Count; i++)
        {
            var seg = segments[i];
            Assert.All(seg[..VirtioNetHeader.Size], b => Assert.Equal(0, b));       // no offload left, no flags
            var f = seg.AsSpan(VirtioNetHeader.Size);
            int take = i < 3 ? 1448 : 656;
            Assert.Equal(headers + take, f.Length);
            Assert.True(f[..l3].SequenceEqual(packet.AsSpan(VirtioNetHeader.Size, l3)));
            var ip = f[l3..l4];
            var l4Bytes = f[l4..].ToArray();
            if (ipv6)
            {
                Assert.Equal(f.Length - l4, BinaryPrimitives.ReadUInt16BigEndian(ip[4..]));
                Assert.Equal(0xffff, Sum16([.. Pseudo(ip[8..24].ToArray(), ip[24..40].ToArray(), (byte)(tcp ? 6 : 17), l4Bytes.Length), .. l4Bytes]));
            }
            else
            {
                Assert.Equal(f.Length - l3, BinaryPrimitives.ReadUInt16BigEndian(ip[2..]));
                Assert.Equal((ushort)(0xfff0 + i), BinaryPrimitives.ReadUInt16BigEndian(ip[4..]));
                Assert.Equal(0xffff, Sum16(ip.ToArray()));
                Assert.Equal(0xffff, Sum16([.. Pseudo(Src4, Dst4, (byte)(tcp ? 6 : 17), l4Bytes.Length), .. l4Bytes]));
            }
            if (tcp)
            {
                Assert.Equal(unchecked(0xfffff000u + (uint)(1448 * i)), BinaryPrimitives.ReadUInt32BigEndian(l4Bytes.AsSpan(4)));
                byte flags = l4Bytes[13];
                Assert.Equal(i == 0, (flags & 0x80) != 0);                   // CWR on the first only
                Assert.Equal(i == 3, (flags & 0x01) != 0);                   // FIN and PSH on the last only
                Assert.Equal(i == 3, (flags & 0x08) != 0);
                Assert.True((flags & 0x10) != 0);                             // ACK on all
                Assert.True(l4Bytes.AsSpan(20, 12).SequenceEqual(packet.AsSpan(VirtioNetHeader.Size + l4 + 20, 12)));   // options copied
            }
            else
                Assert.Equal(l4Bytes.Length, BinaryPrimitives.ReadUInt16BigEndian(l4Bytes.AsSpan(4)));
            joined.AddRange(f[headers..].ToArray());
        }
        Assert.Equal(payload, joined.ToArray());
    }

    [Fact]
    public void AGuestThatTakesTheOffloadGetsTheFrameAsItIs()
    {
        var packet = Frame(false, true, new byte[3000], VirtioNetHeader.GsoTcpV4, 1448);
        var copy = packet.ToArray();
        var finisher = new OffloadFinisher();
        Assert.Equal(OffloadFinisher.Result.Deliver, finisher.Finish(packet, NetOffloads.Checksum | NetOffloads.Tso4));
        Assert.Equal(copy, packet);
        Assert.False(finisher.Pending);
        // IPv6 TSO is another feature: a guest with TSO4 only gets IPv6 frames segmented.
        Assert.Equal(OffloadFinisher.Result.Segmented, finisher.Finish(Frame(true, true, new byte[3000], VirtioNetHeader.GsoTcpV6, 1448), NetOffloads.Checksum | NetOffloads.Tso4));
        // ECN needs its own feature too.
        finisher.Clear();
        Assert.Equal(OffloadFinisher.Result.Segmented, finisher.Finish(Frame(false, true, new byte[3000], VirtioNetHeader.GsoTcpV4 | VirtioNetHeader.GsoEcn, 1448), NetOffloads.Checksum | NetOffloads.Tso4));
        Assert.Equal(3, Segments(finisher).Count);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AChecksumLeftToDoIsCompletedForAGuestWithoutChecksumOffload(bool tcp)
    {
        var payload = new byte[777];
        new Random(5).NextBytes(payload);
        var packet = Frame(false, tcp, payload, VirtioNetHeader.GsoNone, 0);
        // As the host's stack leaves it (CHECKSUM_PARTIAL): the field holds the pseudo-header's sum.
        int l4 = VirtioNetHeader.Size + 34, length = packet.Length - l4, at = l4 + (tcp ? 16 : 6);
        BinaryPrimitives.WriteUInt16BigEndian(packet.AsSpan(at), (ushort)Sum16(Pseudo(Src4, Dst4, (byte)(tcp ? 6 : 17), length)));
        var finisher = new OffloadFinisher();
        Assert.Equal(OffloadFinisher.Result.Deliver, finisher.Finish(packet, NetOffloads.None));
        Assert.All(packet[..10], b => Assert.Equal(0, b));
        Assert.Equal(0xffff, Sum16([.. Pseudo(Src4, Dst4, (byte)(tcp ? 6 : 17), length), .. packet[l4..]]));
        Assert.NotEqual(0, BinaryPrimitives.ReadUInt16BigEndian(packet.AsSpan(at)));

        // A guest with checksum offload gets it as it is.
        var again = Frame(false, tcp, payload, VirtioNetHeader.GsoNone, 0);
        var copy = again.ToArray();
        Assert.Equal(OffloadFinisher.Result.Deliver, finisher.Finish(again, NetOffloads.Checksum));
        Assert.Equal(copy, again);
    }

    [Fact]
    public void FramesWhoseHeadersDoNotHoldUpAreDropped()
    {
        var finisher = new OffloadFinisher();
        var good = Frame(false, true, new byte[3000], VirtioNetHeader.GsoTcpV4, 1448);
        // Cut inside the TCP header.
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(good.AsSpan(0, VirtioNetHeader.Size + 14 + 20 + 10).ToArray(), NetOffloads.None));
        // A GSO size of 0.
        var zero = good.ToArray();
        BinaryPrimitives.WriteUInt16LittleEndian(zero.AsSpan(4), 0);
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(zero, NetOffloads.None));
        // TCPv4 GSO on an IPv6 frame; a UDP frame said to be TCP; an IPv4 header length under 20.
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(Frame(true, true, new byte[3000], VirtioNetHeader.GsoTcpV4, 1448), NetOffloads.None));
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(Frame(false, false, new byte[3000], VirtioNetHeader.GsoTcpV4, 1448), NetOffloads.None));
        var ihl = good.ToArray();
        ihl[VirtioNetHeader.Size + 14] = 0x44;
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(ihl, NetOffloads.None));
        // UFO (IP fragmentation) is not done here.
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(Frame(false, false, new byte[3000], VirtioNetHeader.GsoUdp, 1448), NetOffloads.None));
        // A checksum position past the end.
        var csum = Frame(false, true, new byte[10], VirtioNetHeader.GsoNone, 0);
        BinaryPrimitives.WriteUInt16LittleEndian(csum.AsSpan(6), 60);
        Assert.Equal(OffloadFinisher.Result.Drop, finisher.Finish(csum, NetOffloads.None));
        Assert.False(finisher.Pending);
    }

    [Fact]
    public void RandomHeadersNeverThrowNorWritePastTheFrame()
    {
        var random = new Random(20261203);
        var finisher = new OffloadFinisher();
        var buffer = new byte[VirtioNetHeader.MaxPacket];
        for (int i = 0; i < 3000; i++)
        {
            var packet = Frame(random.Next(2) == 0, random.Next(2) == 0, new byte[random.Next(0, 4000)], (byte)random.Next(0, 6), random.Next(0, 3000));
            // Bytes of the header and the first 80 bytes of the frame at random.
            for (int k = random.Next(1, 6); k > 0; k--)
                packet[random.Next(Math.Min(packet.Length, VirtioNetHeader.Size + 80))] = (byte)random.Next(256);
            if (random.Next(4) == 0)
                packet = packet[..random.Next(packet.Length)];
            var result = finisher.Finish(packet, (NetOffloads)random.Next(16));
            if (result == OffloadFinisher.Result.Segmented)
            {
                int n, total = 0;
                while ((n = finisher.Next(buffer)) > 0)
                {
                    Assert.InRange(n, VirtioNetHeader.Size + 14, VirtioNetHeader.MaxPacket);
                    total++;
                    Assert.True(total <= 65535, "segments without end");
                }
            }
            Assert.False(finisher.Pending);
        }
    }
}
