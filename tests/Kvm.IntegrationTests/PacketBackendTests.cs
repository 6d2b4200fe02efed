using System.Buffers.Binary;
using System.Text;
using Kvm.Interop.Native;
using Kvm.Network;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// A host interface as a VM's uplink through packet sockets (as root; no VM): a veth whose other
/// end is a peer namespace. The peer's kernel is the oracle: it sends UDP datagrams to the VM's
/// address (a permanent neighbour entry with the VM's MAC) and to another MAC, and receives the
/// VMM's datagram only if its checksum, left for the kernel to finish (NEEDS_CSUM), is right.
/// </summary>
public class PacketBackendTests
{
    private const string PeerIp = "10.77.20.1", VmIp = "10.77.20.2", OtherIp = "10.77.20.3";

    /// <summary>Makes the peer send to <see cref="VmIp"/> as to <paramref name="mac"/> and to <see cref="OtherIp"/> as to another MAC.</summary>
    private static NetPeer Peer(NetTopology net, MacAddress mac)
    {
        var peer = net.AddPeer(null, PeerIp + "/24");
        Check(peer.Run("ip", "neigh", "replace", VmIp, "lladdr", mac.ToString(), "dev", peer.Interface, "nud", "permanent"));
        Check(peer.Run("ip", "neigh", "replace", OtherIp, "lladdr", MacAddress.Random().ToString(), "dev", peer.Interface, "nud", "permanent"));
        return peer;
    }

    private static void Check(ProcessResult r) => Assert.True(r.ExitCode == 0, $"status {r.ExitCode}: {r.Stdout}{r.Stderr}");

    /// <summary>Sends <paramref name="count"/> datagrams from the peer to <paramref name="address"/>:7000, each from its own source port (its own flow), payload "TAG-N".</summary>
    private static void Send(NetPeer peer, string address, string tag, int count) =>
        Check(peer.Run("python3", "-c",
            "import socket\n" +
            $"for i in range({count}):\n" +
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n" +
            $"    s.bind(('{PeerIp}', 20000 + i))\n" +
            $"    s.sendto(b'{tag}-%d' % i, ('{address}', 7000))\n" +
            "    s.close()\n"));

    /// <summary>The UDP payloads of the frames pair <paramref name="pair"/> gets within <paramref name="wait"/> (until <paramref name="count"/> came), with each frame's destination MAC.</summary>
    private static List<(MacAddress To, string Payload)> Read(PacketBackend backend, int pair, int count, TimeSpan wait)
    {
        var got = new List<(MacAddress, string)>();
        var buffer = new byte[VirtioNetHeader.MaxPacket];
        var end = DateTime.UtcNow + wait;
        while (got.Count < count && DateTime.UtcNow < end)
        {
            int n = backend.Receive(pair, buffer);
            if (n == 0)
            {
                KvmShim.PollRead(backend.ReceiveHandle(pair), null, 100);
                continue;
            }
            var frame = buffer.AsSpan(VirtioNetHeader.Size, n - VirtioNetHeader.Size);
            if (frame.Length >= 42 && BinaryPrimitives.ReadUInt16BigEndian(frame[12..]) == 0x0800 && frame[23] == 17)
                got.Add((MacAddress.FromBytes(frame), Encoding.ASCII.GetString(frame[42..])));
        }
        return got;
    }

    [SkippableFact]
    public void FramesForTheVmArriveOthersDoNotAndItsOwnFramesLeaveFinished()
    {
        using var net = NetTopology.Create();
        var mac = MacAddress.Random();
        var peer = Peer(net, mac);
        using var backend = PacketBackend.Open(peer.HostInterface, 1, mac);
        Assert.Equal("interface " + peer.HostInterface, backend.Name);
        Assert.True(backend.LinkUp);
        backend.SetOffloads(NetOffloads.Checksum);

        Send(peer, OtherIp, "other", 3);
        Send(peer, VmIp, "vm", 3);
        var got = Read(backend, 0, 3, TimeSpan.FromSeconds(10));
        Assert.Equal(["vm-0", "vm-1", "vm-2"], got.Select(g => g.Payload));
        Assert.All(got, g => Assert.Equal(mac, g.To));
        Assert.Empty(Read(backend, 0, 1, TimeSpan.FromMilliseconds(300)));

        // The VM's datagram to the peer with its UDP checksum left to do: the peer's kernel takes
        // it only when the checksum the sending kernel finished is right. (A veth carries an
        // unfinished checksum across as it is and the far end trusts it: with checksum offload off
        // on both ends the sending kernel computes it and the peer checks it. A datagram with a
        // wrong pseudo-header sum, sent first each time, shows the peer checks.)
        Check(NetTopology.Run("ethtool", "-K", peer.HostInterface, "tx", "off"));
        Check(peer.Run("ethtool", "-K", peer.Interface, "rx", "off"));
        var peerMac = MacAddress.Parse(peer.Run("cat", $"/sys/class/net/{peer.Interface}/address").Stdout.Trim());
        var listener = Task.Run(() => peer.Run(TimeSpan.FromSeconds(60), "python3", "-c",
            "import socket\n" +
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n" +
            $"s.bind(('{PeerIp}', 7001))\n" +
            "s.settimeout(30)\n" +
            "print(s.recv(100).decode())\n"));
        var datagram = Datagram(mac, peerMac, "from-the-vm");
        var wrong = Datagram(mac, peerMac, "wrong-check");
        wrong[VirtioNetHeader.Size + 34 + 6] ^= 0x55;
        while (!listener.Wait(200))
        {
            Assert.True(backend.Send(0, wrong), "the interface refused the frame");
            Assert.True(backend.Send(0, datagram), "the interface refused the frame");
        }
        var heard = listener.Result;
        Assert.True(heard.ExitCode == 0, $"the peer never took the VM's datagram: {heard.Stderr}");
        Assert.Equal("from-the-vm", heard.Stdout.Trim());
        // The VM's own frames do not come back to it.
        Assert.Empty(Read(backend, 0, 1, TimeSpan.FromMilliseconds(300)));
        Assert.Equal(0, backend.Unfinished);
    }

    /// <summary>A UDP datagram from <see cref="VmIp"/>:7001 to the peer:7001, its checksum left to the kernel (the field holds the pseudo-header's sum).</summary>
    private static byte[] Datagram(MacAddress from, MacAddress to, string text)
    {
        var payload = Encoding.ASCII.GetBytes(text);
        var packet = new byte[VirtioNetHeader.Size + 42 + payload.Length];
        packet[0] = VirtioNetHeader.FlagNeedsCsum;
        BinaryPrimitives.WriteUInt16LittleEndian(packet.AsSpan(6), 34);
        BinaryPrimitives.WriteUInt16LittleEndian(packet.AsSpan(8), 6);
        var f = packet.AsSpan(VirtioNetHeader.Size);
        to.CopyTo(f);
        from.CopyTo(f[6..]);
        BinaryPrimitives.WriteUInt16BigEndian(f[12..], 0x0800);
        var ip = f[14..34];
        ip[0] = 0x45;
        BinaryPrimitives.WriteUInt16BigEndian(ip[2..], (ushort)(28 + payload.Length));
        ip[8] = 64;
        ip[9] = 17;
        byte[] src = [10, 77, 20, 2], dst = [10, 77, 20, 1];
        src.CopyTo(ip[12..]);
        dst.CopyTo(ip[16..]);
        BinaryPrimitives.WriteUInt16BigEndian(ip[10..], (ushort)~OffloadFinisher.Fold(OffloadFinisher.Sum(ip, 0)));
        var udp = f[34..];
        BinaryPrimitives.WriteUInt16BigEndian(udp, 7001);
        BinaryPrimitives.WriteUInt16BigEndian(udp[2..], 7001);
        BinaryPrimitives.WriteUInt16BigEndian(udp[4..], (ushort)(8 + payload.Length));
        uint pseudo = OffloadFinisher.Sum(src, OffloadFinisher.Sum(dst, 0)) + 17 + (uint)(8 + payload.Length);
        BinaryPrimitives.WriteUInt16BigEndian(udp[6..], OffloadFinisher.Fold(pseudo));
        payload.CopyTo(udp[8..]);
        return packet;
    }

    [SkippableFact]
    public void FlowsSpreadOverThePairsAndThePairsInUseTakeOverTheOthers()
    {
        using var net = NetTopology.Create();
        var mac = MacAddress.Random();
        var peer = Peer(net, mac);
        using var backend = PacketBackend.Open(peer.HostInterface, 2, mac);
        Assert.Equal(2, backend.QueuePairs);

        // 64 flows: the fanout hashes them over both sockets, each flow to one.
        Send(peer, VmIp, "a", 64);
        var first = Read(backend, 0, 64, TimeSpan.FromSeconds(2));
        var second = Read(backend, 1, 64 - first.Count, TimeSpan.FromSeconds(5));
        Assert.Equal(64, first.Count + second.Count);
        Assert.NotEmpty(first);
        Assert.NotEmpty(second);
        Assert.Empty(first.Select(g => g.Payload).Intersect(second.Select(g => g.Payload)));

        // The guest uses one pair: pair 0 serves both sockets, and wakes for either.
        backend.SetActivePairs(1);
        Send(peer, VmIp, "b", 64);
        var all = Read(backend, 0, 64, TimeSpan.FromSeconds(10));
        Assert.Equal(Enumerable.Range(0, 64).Select(i => $"b-{i}").Order(), all.Select(g => g.Payload).Order());
        Assert.Equal(0, backend.Receive(1, new byte[VirtioNetHeader.MaxPacket]));

        // Both again.
        backend.SetActivePairs(2);
        Send(peer, VmIp, "c", 64);
        first = Read(backend, 0, 64, TimeSpan.FromSeconds(2));
        second = Read(backend, 1, 64 - first.Count, TimeSpan.FromSeconds(5));
        Assert.Equal(64, first.Count + second.Count);
        Assert.NotEmpty(second);
    }

    [SkippableFact]
    public void AMissingInterfaceIsNamed()
    {
        using var net = NetTopology.Create();
        var e = Assert.Throws<IOException>(() => PacketBackend.Open(net.Prefix + "none", 1, MacAddress.Random()));
        Assert.Contains($"cannot find interface '{net.Prefix}none'", e.Message);
    }
}
