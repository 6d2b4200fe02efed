using System.Buffers.Binary;
using Kvm.Devices.Manager;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;
using static Kvm.Devices.Virtio.Net.VirtioNet;

namespace Kvm.Devices.Tests;

/// <summary>
/// virtio-net through its PCI transport and real worker threads, with a driver playing the guest's
/// over guest memory and a socket-pair backend playing the network.
/// </summary>
public sealed class VirtioNetTests
{
    private static ulong Bit(int f) => 1UL << f;

    private static readonly int[] OffloadFeatures =
        [FeatureCsum, FeatureGuestCsum, FeatureGuestTso4, FeatureGuestTso6, FeatureGuestEcn, FeatureHostTso4, FeatureHostTso6, FeatureHostEcn];

    private static readonly int[] AlwaysOffered =
        [FeatureMac, FeatureMtu, FeatureMrgRxbuf, FeatureStatus, FeatureCtrlVq, FeatureCtrlRx, FeatureGuestAnnounce, FeatureCtrlMacAddr];

    // ------------------------------------------------------------------ identity, features, configuration

    [Theory]
    [InlineData(true, 1)]
    [InlineData(false, 1)]
    [InlineData(true, 4)]
    [InlineData(false, 2)]
    public void FeaturesFollowOffloadsAndQueuePairs(bool offloads, int pairs)
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Offloads = offloads, QueuePairs = pairs });
        ulong f = rig.Driver.DeviceFeatures;
        foreach (int b in AlwaysOffered)
            Assert.True((f & Bit(b)) != 0, $"feature {b} not offered");
        foreach (int b in OffloadFeatures)
            Assert.Equal(offloads, (f & Bit(b)) != 0);
        Assert.Equal(pairs > 1, (f & Bit(FeatureMq)) != 0);
        Assert.True((f & Bit(VirtioFeature.Version1)) != 0);
        Assert.Equal(2 * pairs + 1, rig.Driver.Read16(VirtioDriver.NumQueues));
        Assert.Equal((ushort)(VirtioPciTransport.ModernDeviceIdBase + TypeNet), (ushort)(rig.Transport.ReadConfig(0, 4) >> 16));
    }

    [Fact]
    public void ConfigurationSpaceHoldsMacStatusPairsAndMtu()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { QueuePairs = 3, Mtu = 9000 });
        var (mac, status, pairs, mtu) = rig.Config();
        Assert.Equal(Eth.VmMac, mac);
        Assert.Equal(StatusLinkUp, status);
        Assert.Equal(3, pairs);
        Assert.Equal(9000, mtu);

        // Byte by byte, as a driver may read it, and past the end (zeros).
        var one = new byte[1];
        var expected = Eth.VmMac.ToBytes();
        for (int i = 0; i < 6; i++)
        {
            rig.Driver.ReadDeviceConfig(i, one);
            Assert.Equal(expected[i], one[0]);
        }
        var beyond = new byte[4] { 1, 2, 3, 4 };
        rig.Driver.ReadDeviceConfig(12, beyond);
        Assert.Equal(new byte[4], beyond);

        // Writes change nothing.
        rig.Transport.WriteBar(0, VirtioPciTransport.DeviceConfigOffset, new byte[6]);
        Assert.Equal(Eth.VmMac, rig.Config().Mac);

        rig.Backend.LinkUp = false;
        Assert.Equal(0, rig.Config().Status & StatusLinkUp);
    }

    [Fact]
    public void ActivationTellsTheBackendTheGuestsOffloadsAndOnePair()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { QueuePairs = 2 });
        rig.Start();
        Assert.Equal(NetOffloads.Checksum | NetOffloads.Tso4 | NetOffloads.Tso6 | NetOffloads.TsoEcn, rig.Backend.OffloadCalls[^1]);
        Assert.Equal(1, rig.Backend.ActivePairCalls[^1]);

        rig.Start(rig.AllBut(FeatureGuestTso6, FeatureGuestEcn));
        Assert.Equal(NetOffloads.Checksum | NetOffloads.Tso4, rig.Backend.OffloadCalls[^1]);

        // Segmentation offloads without checksum offload mean nothing to the backend.
        rig.Start(rig.AllBut(FeatureGuestCsum));
        Assert.Equal(NetOffloads.None, rig.Backend.OffloadCalls[^1]);
    }

    // ------------------------------------------------------------------ transmit

    [Theory]
    [InlineData(1, true)]
    [InlineData(3, true)]
    [InlineData(1, false)]
    public void AGoodFrameReachesTheBackendUnchanged(int pieces, bool separateHeader)
    {
        using var rig = NetRig.Create();
        rig.Start();
        var packet = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 1514), flags: VirtioNetHeader.FlagNeedsCsum, csumStart: 34, csumOffset: 16);
        Assert.Equal(0u, rig.Transmit(packet, pieces: pieces, separateHeader: separateHeader));
        Assert.Equal(packet, rig.Backend.Read(0));
        var s = rig.Net.Stats;
        Assert.Equal(1, s.TxPackets);
        Assert.Equal(1514, s.TxBytes);
        Assert.Equal(0, s.TxDropped);
    }

    [Fact]
    public void ASegmentationOffloadFrameLongerThanTheMtuPasses()
    {
        using var rig = NetRig.Create();
        rig.Start();
        var frame = Eth.Frame(Eth.PeerMac, Eth.VmMac, 30000);
        foreach (byte gso in new[] { VirtioNetHeader.GsoTcpV4, VirtioNetHeader.GsoTcpV6, (byte)(VirtioNetHeader.GsoTcpV4 | VirtioNetHeader.GsoEcn) })
        {
            var packet = Eth.Packet(frame, VirtioNetHeader.FlagNeedsCsum, gso, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16);
            rig.Transmit(packet, pieces: 4);
            Assert.Equal(packet, rig.Backend.Read(0));
        }
        Assert.Equal(3, rig.Net.Stats.TxPackets);
    }

    [Fact]
    public void NumBuffersIsClearedOnTransmit()
    {
        using var rig = NetRig.Create();
        rig.Start();
        var packet = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 60), numBuffers: 0x1234);
        rig.Transmit(packet);
        var sent = rig.Backend.Read(0)!;
        Assert.Equal(0, Eth.NumBuffers(sent));
        Assert.Equal(packet.AsSpan(0, 10).ToArray(), sent.AsSpan(0, 10).ToArray());
        Assert.Equal(packet.AsSpan(12).ToArray(), sent.AsSpan(12).ToArray());
    }

    public enum TxCase { Spoofed, Short, TooLong, CsumNotNegotiated, Tso4NotNegotiated, Tso6NotNegotiated, GsoUdp, EcnNotNegotiated, UnknownFlag, BackendRefuses }

    [Theory]
    [InlineData(TxCase.Spoofed)]
    [InlineData(TxCase.Short)]
    [InlineData(TxCase.TooLong)]
    [InlineData(TxCase.CsumNotNegotiated)]
    [InlineData(TxCase.Tso4NotNegotiated)]
    [InlineData(TxCase.Tso6NotNegotiated)]
    [InlineData(TxCase.GsoUdp)]
    [InlineData(TxCase.EcnNotNegotiated)]
    [InlineData(TxCase.UnknownFlag)]
    [InlineData(TxCase.BackendRefuses)]
    public void ABadFrameIsDroppedAndCounted(TxCase c)
    {
        using var rig = NetRig.Create();
        ulong features = c switch
        {
            TxCase.CsumNotNegotiated => rig.AllBut(FeatureCsum, FeatureHostTso4, FeatureHostTso6, FeatureHostEcn),
            TxCase.Tso4NotNegotiated => rig.AllBut(FeatureHostTso4),
            TxCase.Tso6NotNegotiated => rig.AllBut(FeatureHostTso6),
            TxCase.EcnNotNegotiated => rig.AllBut(FeatureHostEcn),
            _ => rig.AllFeatures,
        };
        rig.Start(features);
        var good = Eth.Frame(Eth.PeerMac, Eth.VmMac, 100);
        byte[] packet = c switch
        {
            TxCase.Spoofed => Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.OtherMac, 100)),
            TxCase.Short => Eth.Packet(good.AsSpan(0, 13)),
            TxCase.TooLong => Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 1500 + 18 + 1)),
            TxCase.CsumNotNegotiated => Eth.Packet(good, VirtioNetHeader.FlagNeedsCsum, csumStart: 34, csumOffset: 16),
            TxCase.Tso4NotNegotiated => Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 5000), VirtioNetHeader.FlagNeedsCsum, VirtioNetHeader.GsoTcpV4, 54, 1448, 34, 16),
            TxCase.Tso6NotNegotiated => Eth.Packet(good, VirtioNetHeader.FlagNeedsCsum, VirtioNetHeader.GsoTcpV6, 74, 1428, 54, 16),
            TxCase.GsoUdp => Eth.Packet(good, VirtioNetHeader.FlagNeedsCsum, VirtioNetHeader.GsoUdp, 42, 1472, 34, 6),
            TxCase.EcnNotNegotiated => Eth.Packet(good, VirtioNetHeader.FlagNeedsCsum, VirtioNetHeader.GsoTcpV4 | VirtioNetHeader.GsoEcn, 54, 1448, 34, 16),
            TxCase.UnknownFlag => Eth.Packet(good, flags: 0x80),
            _ => Eth.Packet(good),
        };
        rig.Backend.RefuseSends = c == TxCase.BackendRefuses;
        Assert.Equal(0u, rig.Transmit(packet));
        Assert.False(rig.Backend.HasSent(0));
        var s = rig.Net.Stats;
        Assert.Equal(0, s.TxPackets);
        Assert.Equal(1, s.TxDropped);
        Assert.Equal(1, c switch
        {
            TxCase.Spoofed => s.TxSpoofed,
            TxCase.TooLong => s.TxTooLong,
            TxCase.BackendRefuses => s.TxBackendDropped,
            _ => s.TxMalformed,
        });

        // The queue goes on: a good frame passes after it.
        rig.Backend.RefuseSends = false;
        var ok = Eth.Packet(good);
        rig.Transmit(ok);
        Assert.Equal(ok, rig.Backend.Read(0));
        Assert.False(rig.NeedsReset);
    }

    [Fact]
    public void TheLongestFrameWithoutOffloadIsMtuPlus18()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 1400 });
        rig.Start();
        var packet = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 1418));
        rig.Transmit(packet);
        Assert.Equal(packet, rig.Backend.Read(0));
        rig.Transmit(Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 1419)));
        Assert.False(rig.Backend.HasSent(0));
        Assert.Equal(1, rig.Net.Stats.TxTooLong);
    }

    [Fact]
    public void ASpoofedFramePassesWhenSpoofingIsAllowed()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { AllowSpoofing = true });
        rig.Start();
        var packet = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.OtherMac, 200));
        rig.Transmit(packet);
        Assert.Equal(packet, rig.Backend.Read(0));
        Assert.Equal(0, rig.Net.Stats.TxSpoofed);
    }

    [Fact]
    public void ATransmitChainWithoutAnyByteIsUsedAndCounted()
    {
        using var rig = NetRig.Create();
        rig.Start();
        ulong a = rig.Arenas[1].Alloc(64);
        rig.Submit(NetRig.TxQueue(0), [new Buf(a, 0)]);
        Assert.True(rig.Queues[1].WaitAllUsed());
        Assert.Equal(1, rig.Net.Stats.TxMalformed);
        Assert.False(rig.NeedsReset);
    }

    /// <summary>Puts <paramref name="count"/> frames of <paramref name="length"/> bytes on pair 0's transmit ring with one notification at the end.</summary>
    private static void QueueFrames(NetRig rig, int count, int length)
    {
        int queue = NetRig.TxQueue(0);
        for (int i = 0; i < count; i++)
        {
            var packet = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, length, seed: i));
            ulong a = rig.Arenas[queue].Alloc((ulong)packet.Length);
            rig.Memory.Write(a, packet);
            rig.Submit(queue, [new Buf(a, (uint)packet.Length)], kick: i == count - 1);
        }
    }

    /// <summary>A long transmit ring is returned to the driver a batch at a time, not once it is empty.</summary>
    [Fact]
    public void AFullTransmitRingIsReturnedInBatches()
    {
        using var rig = NetRig.Create();
        rig.Start(rig.AllBut(VirtioFeature.RingEventIdx), queueSize: 128);
        int before = rig.Msi[2].Triggers;
        const int Frames = 100;
        QueueFrames(rig, Frames, 200);
        Assert.True(rig.Queues[1].WaitAllUsed());
        Assert.Equal(Frames, rig.Backend.Drain(0).Count);
        int triggers = rig.Msi[2].Triggers - before;
        int expected = (Frames + VirtioNet.TransmitBatch - 1) / VirtioNet.TransmitBatch;
        Assert.True(triggers >= expected, $"{triggers} interrupt(s) for {Frames} frames sent together; a batch is {VirtioNet.TransmitBatch} frames");
    }

    /// <summary>
    /// Under a transmit limit the driver hears of the frames that went before the device waits for
    /// the next ones: its stack frees them and goes on, as behind a slower link.
    /// </summary>
    [Fact]
    public void UnderATransmitLimitTheFramesThatWentAreReturnedBeforeTheWait()
    {
        // 100 kbit/s: the burst (one largest frame, 64 KiB and a header) lets 8 frames of 9018
        // bytes through at once; the 4 after them take seconds.
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 9000, TxLimit = 100_000 });
        rig.Start(rig.AllBut(VirtioFeature.RingEventIdx));
        int before = rig.Msi[2].Triggers;
        QueueFrames(rig, 12, 9018);
        Assert.True(Wait.Until(() => rig.Msi[2].Triggers > before), "no interrupt for the frames that went within the burst");
        long sent = rig.Backend.Sent;
        Assert.True(rig.Queues[1].UsedIdx >= 1 && sent < 12, $"used {rig.Queues[1].UsedIdx}, sent {sent} of 12 when the driver heard");
    }

    /// <summary>
    /// Two NICs in one bandwidth group (one file, as two VMMs would share it) take their rates from
    /// it by their shares (sending, b is held to its limit and a has the rest), and the one left
    /// takes the whole uplink when the other goes.
    /// </summary>
    [Fact]
    public void NicsInABandwidthGroupTakeTheirSharesAsRates()
    {
        string dir = Directory.CreateTempSubdirectory("kvm-bwg-").FullName;
        try
        {
            var group = new BandwidthGroupOptions { Group = Path.Combine(dir, "g"), Capacity = 20_000_000 };
            using var a = NetRig.Create(NetRig.DefaultOptions with { Bandwidth = group with { Shares = 1 } }, name: "bwa");
            var b = NetRig.Create(NetRig.DefaultOptions with { Mac = Eth.OtherMac, Bandwidth = group with { Shares = 3 }, TxLimit = 12_000_000 }, name: "bwb");
            bool Near(long? rate, long expected) => rate is { } r && Math.Abs(r - expected) <= 8;
            try
            {
                Assert.True(Wait.Until(() => Near(a.Net.TxRate, 8_000_000) && Near(b.Net.TxRate, 12_000_000) && Near(a.Net.RxRate, 5_000_000) &&
                    Near(b.Net.RxRate, 15_000_000)), $"rates a {a.Net.TxRate}/{a.Net.RxRate}, b {b.Net.TxRate}/{b.Net.RxRate}");
                Assert.Equal(2, a.Net.Bandwidth!.Members.Count);
            }
            finally
            {
                b.Dispose();
            }
            Assert.True(Wait.Until(() => Near(a.Net.TxRate, 20_000_000)), $"a's rate {a.Net.TxRate} after b left");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    // ------------------------------------------------------------------ receive

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AFrameLandsInOneBufferWithNumBuffersOne(bool mergeable)
    {
        using var rig = NetRig.Create();
        rig.Start(mergeable ? rig.AllFeatures : rig.AllBut(FeatureMrgRxbuf));
        rig.PostRx(4);
        var frame = Eth.Frame(Eth.VmMac, Eth.PeerMac, 1000);
        rig.Backend.Inject(0, Eth.Packet(frame, flags: VirtioNetHeader.FlagDataValid, numBuffers: 7));
        var (used, packet) = rig.Receive();
        var e = Assert.Single(used);
        Assert.Equal((uint)(12 + frame.Length), e.Length);
        Assert.Equal(1, Eth.NumBuffers(packet));
        Assert.Equal(VirtioNetHeader.FlagDataValid, packet[0]);
        Assert.Equal(frame, packet.AsSpan(12).ToArray());
        var s = rig.Net.Stats;
        Assert.Equal(1, s.RxPackets);
        Assert.Equal(1000, s.RxBytes);
        Assert.True(rig.Msi[NetRig.RxQueue(0) + 1].Triggers > 0, "no receive interrupt");
    }

    [Fact]
    public void WithMergeableBuffersA9000ByteFrameSpansSeveralBuffers()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 9000 });
        rig.Start();
        var heads = rig.PostRx(10);
        var frame = Eth.Frame(Eth.VmMac, Eth.PeerMac, 9000, seed: 9);
        rig.Backend.Inject(0, Eth.Packet(frame));
        var (used, packet) = rig.Receive();
        int expected = (12 + 9000 + 1535) / 1536;
        Assert.Equal(expected, used.Count);
        Assert.Equal(expected, Eth.NumBuffers(packet));
        Assert.Equal(heads.Take(expected).Select(h => (uint)h), used.Select(u => u.Id));
        for (int i = 0; i < used.Count - 1; i++)
            Assert.Equal(1536u, used[i].Length);
        Assert.Equal((uint)((12 + 9000) % 1536), used[^1].Length);
        Assert.Equal(frame, packet.AsSpan(12).ToArray());
        Assert.Equal(9000, rig.Net.Stats.RxBytes);

        // The next frame takes the next buffer.
        var small = Eth.Frame(Eth.VmMac, Eth.PeerMac, 64, seed: 2);
        rig.Backend.Inject(0, Eth.Packet(small));
        var (next, p2) = rig.Receive();
        Assert.Equal(heads[expected], (ushort)Assert.Single(next).Id);
        Assert.Equal(small, p2.AsSpan(12).ToArray());
    }

    [Fact]
    public void AFrameOverSeveralBuffersIsPublishedWhole()
    {
        // The driver may look at the used index at any moment: every value it reads must end on a
        // frame boundary, or it meets a frame whose num_buffers names buffers not yet used (Linux
        // drops such a frame as a length error). Frames of 3100 bytes take three 1536-byte buffers,
        // so every used index the driver can see is a multiple of three. A second thread reads the
        // index as fast as it can while the device receives.
        const int perFrame = 3, frames = 21, rounds = 40;
        using var rig = NetRig.Create();
        rig.Start();
        var q = rig.Queues[NetRig.RxQueue(0)];
        var seen = new List<ushort>();
        long reads = 0;
        bool stop = false;
        var observer = new Thread(() =>
        {
            while (!Volatile.Read(ref stop))
            {
                ushort idx = q.UsedIdx;
                reads++;
                if (idx % perFrame != 0)
                    lock (seen)
                        seen.Add(idx);
            }
        }) { IsBackground = true };
        observer.Start();
        try
        {
            for (int round = 0; round < rounds; round++)
            {
                rig.Arenas[NetRig.RxQueue(0)].Reset();
                rig.PostRx(perFrame * frames);
                for (int i = 0; i < frames; i++)
                    rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 3100, seed: round * frames + i)));
                for (int i = 0; i < frames; i++)
                {
                    var (used, packet) = rig.Receive();
                    Assert.Equal(perFrame, used.Count);
                    Assert.Equal(Eth.Frame(Eth.VmMac, Eth.PeerMac, 3100, seed: round * frames + i), packet.AsSpan(12).ToArray());
                }
            }
        }
        finally
        {
            Volatile.Write(ref stop, true);
            observer.Join();
        }
        Assert.True(reads > 0);
        lock (seen)
            Assert.True(seen.Count == 0,
                $"the driver could see a used index in the middle of a frame {seen.Count} times of {reads} reads (first: {string.Join(", ", seen.Take(5))})");
        Assert.Equal(rounds * frames, rig.Net.Stats.RxPackets);
    }

    [Fact]
    public void WithoutMergeableBuffersATooLongFrameIsDroppedAndCounted()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 9000 });
        rig.Start(rig.AllBut(FeatureMrgRxbuf));
        var heads = rig.PostRx(3);
        rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 9000)));
        var small = Eth.Frame(Eth.VmMac, Eth.PeerMac, 100);
        rig.Backend.Inject(0, Eth.Packet(small));

        var q = rig.Queues[NetRig.RxQueue(0)];
        Assert.True(q.WaitForUsedIdx(2));
        var used = q.TakeUsed();
        Assert.Equal(2, used.Count);
        Assert.Equal((heads[0], 0u), ((ushort)used[0].Id, used[0].Length));
        Assert.Equal(heads[1], (ushort)used[1].Id);
        var (a, _) = rig.RxBuffer(0, heads[1]);
        Assert.Equal(small, rig.Memory.GetSpan(a + 12, small.Length).ToArray());

        var s = rig.Net.Stats;
        Assert.Equal(1, s.RxTooLong);
        // The dropped frame was not received.
        Assert.Equal(1, s.RxPackets);
        Assert.Equal(100, s.RxBytes);
    }

    [Fact]
    public void AFrameLongerThanTheWholeRingIsDroppedNotWaitedFor()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 9000 });
        rig.Start(queueSize: 8);
        var heads = rig.PostRx(8, size: 64);
        rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 1000)));
        var small = Eth.Frame(Eth.VmMac, Eth.PeerMac, 40);
        rig.Backend.Inject(0, Eth.Packet(small));
        var (used, packet) = rig.Receive();
        Assert.Equal(heads[0], (ushort)Assert.Single(used).Id);
        Assert.Equal(small, packet.AsSpan(12).ToArray());
        var s = rig.Net.Stats;
        Assert.Equal(1, s.RxTooLong);
        Assert.Equal(1, s.RxPackets);
    }

    [Fact]
    public void AFrameShorterThanAnEthernetHeaderIsCountedAsAnError()
    {
        using var rig = NetRig.Create();
        rig.Start();
        rig.PostRx(2);
        rig.Backend.Inject(0, new byte[12 + 13]);
        var good = Eth.Frame(Eth.VmMac, Eth.PeerMac, 60);
        rig.Backend.Inject(0, Eth.Packet(good));
        var (_, packet) = rig.Receive();
        Assert.Equal(good, packet.AsSpan(12).ToArray());
        Assert.Equal(1, rig.Net.Stats.RxErrors);
    }

    [Fact]
    public void AFrameWaitsForABufferThenArrives()
    {
        using var rig = NetRig.Create();
        rig.Start();
        var frame = Eth.Frame(Eth.VmMac, Eth.PeerMac, 500);
        rig.Backend.Inject(0, Eth.Packet(frame));
        Thread.Sleep(100);
        Assert.Equal(0, rig.Queues[0].UsedIdx);
        rig.PostRx(1);
        var (_, packet) = rig.Receive();
        Assert.Equal(frame, packet.AsSpan(12).ToArray());
    }

    [Fact]
    public void AFrameTooBigForTheBuffersPostedWaitsAndTheBuffersAreGivenBack()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 9000 });
        rig.Start();
        var first = rig.PostRx(2);
        var frame = Eth.Frame(Eth.VmMac, Eth.PeerMac, 9000, seed: 3);
        rig.Backend.Inject(0, Eth.Packet(frame));
        // The device takes the frame, finds two buffers too few, gives them back and waits.
        Thread.Sleep(200);
        Assert.Equal(0, rig.Queues[0].UsedIdx);
        Assert.False(rig.NeedsReset);
        var more = rig.PostRx(6);
        var (used, packet) = rig.Receive();
        Assert.Equal(6, used.Count);
        Assert.Equal(first.Concat(more).Take(6).Select(h => (uint)h), used.Select(u => u.Id));
        Assert.Equal(frame, packet.AsSpan(12).ToArray());
        Assert.Equal(1, rig.Net.Stats.RxPackets);
    }

    /// <summary>
    /// A receive worker holding a frame the posted buffers cannot take must sleep until the driver
    /// posts more, not spin: a guest could otherwise keep a host CPU busy by posting too few buffers.
    /// Measured as the worker thread's CPU time (/proc/self/task/*/stat) while it waits.
    /// </summary>
    [Fact]
    public void AWorkerWaitingForMoreBuffersSleeps()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { Mtu = 9000 }, name: "vnspin");
        rig.Start();
        rig.PostRx(2);
        rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 9000)));
        Thread.Sleep(100);
        var task = ThreadCpu.Find("vnspin q0");
        Assert.NotNull(task);
        long before = ThreadCpu.Ticks(task);
        Thread.Sleep(1000);
        long spent = ThreadCpu.Ticks(task) - before;
        Assert.True(spent < 20, $"the receive worker used {spent} clock ticks of CPU in one second while waiting for buffers");
        rig.PostRx(6);
        Assert.Equal(6, rig.Receive().Used.Count);
    }

    [Fact]
    public void FramesArriveInOrderThroughARingSmallerThanTheStream()
    {
        using var rig = NetRig.Create();
        rig.Start(queueSize: 8);
        const int Frames = 100;
        var sender = new Thread(() =>
        {
            for (int i = 0; i < Frames; i++)
                rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 60 + i, seed: i)));
        });
        sender.Start();
        for (int i = 0; i < Frames; i++)
        {
            if (rig.Queues[0].FreeDescriptors > 0)
                rig.PostRx(rig.Queues[0].FreeDescriptors);
            var (_, packet) = rig.Receive();
            Assert.Equal(Eth.Frame(Eth.VmMac, Eth.PeerMac, 60 + i, seed: i), packet.AsSpan(12).ToArray());
        }
        sender.Join();
        Assert.Equal(Frames, rig.Net.Stats.RxPackets);
    }

    /// <summary>
    /// Frames waiting in the backend when buffers arrive are announced to the driver a batch at a
    /// time, not once the ring is full or the backend dry: under a steady stream the guest must get
    /// to work on the first frames (and give buffers back) while the rest still come in.
    /// </summary>
    [Fact]
    public void AStreamIsAnnouncedToTheDriverInBatches()
    {
        using var rig = NetRig.Create();
        rig.Start(rig.AllBut(VirtioFeature.RingEventIdx), queueSize: 128);
        const int Frames = 100;
        for (int i = 0; i < Frames; i++)
            rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 100, seed: i)));
        Thread.Sleep(100);
        int before = rig.Msi[1].Triggers;
        rig.PostRx(128);
        for (int i = 0; i < Frames; i++)
            Assert.Equal(Eth.Frame(Eth.VmMac, Eth.PeerMac, 100, seed: i), rig.Receive().Packet.AsSpan(12).ToArray());
        int expected = (Frames + VirtioNet.ReceiveBatch - 1) / VirtioNet.ReceiveBatch;
        int triggers = rig.Msi[1].Triggers - before;
        Assert.True(triggers >= expected,
            $"{triggers} interrupt(s) for {Frames} frames that waited together; a batch is {VirtioNet.ReceiveBatch} frames");
    }

    [Fact]
    public void AReceiveBufferTheDeviceMayNotWriteBreaksTheProtocol()
    {
        using var rig = NetRig.Create();
        rig.Start();
        ulong a = rig.Arenas[0].Alloc(1536);
        rig.Submit(0, [new Buf(a, 1536)]);
        rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 60)));
        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset));
        Assert.Empty(rig.Log.WorkerFailures);

        // A reset brings it back.
        rig.Start();
        rig.PostRx(1);
        rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 60)));
        Assert.Single(rig.Receive().Used);
    }

    [Fact]
    public void AReceiveBufferTooSmallForTheHeaderBreaksTheProtocol()
    {
        using var rig = NetRig.Create();
        rig.Start();
        rig.PostRx(1, size: 11);
        rig.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 60)));
        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset));
        Assert.Empty(rig.Log.WorkerFailures);
    }

    // ------------------------------------------------------------------ receive filter

    private static byte[] On => [1];
    private static byte[] Off => [0];

    /// <summary>Injects a frame to <paramref name="destination"/> and then a marker to the VM; true when the first one was delivered.</summary>
    private static bool Delivered(NetRig rig, MacAddress destination, MacAddress? own = null)
    {
        rig.PostRx(2);
        long filtered = rig.Net.Stats.RxFiltered;
        var probe = Eth.Frame(destination, Eth.PeerMac, 80, seed: 77);
        rig.Backend.Inject(0, Eth.Packet(probe));
        var marker = Eth.Frame(own ?? Eth.VmMac, Eth.PeerMac, 90, seed: 78);
        rig.Backend.Inject(0, Eth.Packet(marker));
        var (_, first) = rig.Receive();
        if (first.AsSpan(12).SequenceEqual(marker))
        {
            Assert.Equal(filtered + 1, rig.Net.Stats.RxFiltered);
            return false;
        }
        Assert.Equal(probe, first.AsSpan(12).ToArray());
        Assert.Equal(marker, rig.Receive().Packet.AsSpan(12).ToArray());
        return true;
    }

    [Fact]
    public void ReceiveFilterFollowsTheControlQueue()
    {
        using var rig = NetRig.Create();
        rig.Start();
        // Promiscuous after reset: everything passes.
        Assert.True(Delivered(rig, Eth.OtherMac));
        Assert.True(Delivered(rig, Eth.Multicast));

        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
        Assert.False(Delivered(rig, Eth.OtherMac));
        Assert.True(Delivered(rig, Eth.VmMac));
        Assert.True(Delivered(rig, MacAddress.Broadcast));
        Assert.False(Delivered(rig, Eth.Multicast));

        Assert.Equal(AckOk, rig.Control(CtrlRx, RxAllMulti, On));
        Assert.True(Delivered(rig, Eth.Multicast));
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxAllMulti, Off));
        Assert.False(Delivered(rig, Eth.Multicast));

        Assert.Equal(AckOk, rig.Control(CtrlMac, MacTableSet, NetRig.MacTable([Eth.OtherMac], [Eth.Multicast])));
        Assert.True(Delivered(rig, Eth.Multicast));
        Assert.False(Delivered(rig, Eth.OtherMulticast));
        Assert.True(Delivered(rig, Eth.OtherMac));
        Assert.False(Delivered(rig, Eth.PeerMac));

        Assert.Equal(AckOk, rig.Control(CtrlRx, RxNoBcast, On));
        Assert.False(Delivered(rig, MacAddress.Broadcast));
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxAllUni, On));
        Assert.True(Delivered(rig, Eth.PeerMac));
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, On));
        Assert.True(Delivered(rig, MacAddress.Broadcast));
    }

    [Fact]
    public void AMacTableLongerThanTheFilterAcceptsAllOfItsKind()
    {
        using var rig = NetRig.Create();
        rig.Start();
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
        var many = Enumerable.Range(0, MaxFilterEntries + 1).Select(i => new MacAddress(0x0100_5e00_0000UL + (ulong)i)).ToArray();
        Assert.Equal(AckOk, rig.Control(CtrlMac, MacTableSet, NetRig.MacTable([], many)));
        Assert.True(Delivered(rig, Eth.OtherMulticast));
        Assert.False(Delivered(rig, Eth.OtherMac));
    }

    [Theory]
    [InlineData(new byte[] { })]
    [InlineData(new byte[] { 1, 0, 0 })]
    [InlineData(new byte[] { 1, 0, 0, 0, 0, 0, 0, 0 })]                 // one unicast entry announced, none there
    [InlineData(new byte[] { 0, 0, 0, 0, 0, 0, 0, 0, 9 })]              // a byte too many
    [InlineData(new byte[] { 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0 })]
    public void AMalformedMacTableIsRefusedAndTheFilterKept(byte[] data)
    {
        using var rig = NetRig.Create();
        rig.Start();
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
        Assert.Equal(AckOk, rig.Control(CtrlMac, MacTableSet, NetRig.MacTable([Eth.OtherMac], [])));
        Assert.Equal(AckErr, rig.Control(CtrlMac, MacTableSet, data));
        Assert.True(Delivered(rig, Eth.OtherMac));
        Assert.Equal(1, rig.Net.Stats.ControlRefused);
    }

    [Theory]
    [InlineData("52:54:00:12:34:56", "52:54:00:12:34:56", true)]
    [InlineData("00:00:00:00:00:00", "00:00:00:00:00:00", true)]
    [InlineData("52:54:00:12:34:56", "33:33:00:00:00:01", false)]
    [InlineData("ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", true)]
    [InlineData("01:00:5e:00:00:fb", "01:00:5e:00:00:fb", true)]
    [InlineData("01:00:5e:00:00:fb", "01:00:5e:00:00:fc", false)]
    public void RxFilterAcceptsByDestination(string destination, string tableEntry, bool promiscOffAllMultiOffMatches)
    {
        var own = Eth.VmMac;
        var d = MacAddress.Parse(destination);
        var entry = MacAddress.Parse(tableEntry);
        Assert.True(RxFilter.Initial.Accepts(d, own));
        var f = RxFilter.Initial.With(RxPromisc, false) with
        {
            Unicast = entry.IsMulticast ? [] : [entry],
            Multicast = entry.IsMulticast ? [entry] : [],
        };
        bool expected = d == own || d.IsBroadcast || (d.IsMulticast ? promiscOffAllMultiOffMatches && d == entry : d == entry);
        Assert.Equal(expected, f.Accepts(d, own));
        Assert.False(f.With(RxNoUni, true).Accepts(own, own));
        Assert.False(f.With(RxNoBcast, true).Accepts(MacAddress.Broadcast, own));
        Assert.False(f.With(RxNoMulti, true).With(RxAllMulti, true).Accepts(Eth.Multicast, own));
        Assert.Throws<ArgumentOutOfRangeException>(() => f.With(6, true));
    }

    // ------------------------------------------------------------------ control queue

    [Fact]
    public void MacAddrSetIsRefusedUnlessSpoofingIsAllowed()
    {
        using var rig = NetRig.Create();
        rig.Start();
        Assert.Equal(AckErr, rig.Control(CtrlMac, MacAddrSet, Eth.OtherMac.ToBytes()));
        Assert.Equal(Eth.VmMac, rig.Config().Mac);
        Assert.Equal(Eth.VmMac, rig.Net.Mac);
        // Its own address is fine.
        Assert.Equal(AckOk, rig.Control(CtrlMac, MacAddrSet, Eth.VmMac.ToBytes()));
        // Frames from the refused address still do not leave.
        rig.Transmit(Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.OtherMac, 60)));
        Assert.False(rig.Backend.HasSent(0));
    }

    [Fact]
    public void MacAddrSetWithSpoofingAllowedChangesTheAddressTheFilterUses()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { AllowSpoofing = true });
        rig.Start();
        Assert.Equal(AckOk, rig.Control(CtrlMac, MacAddrSet, Eth.OtherMac.ToBytes()));
        Assert.Equal(Eth.OtherMac, rig.Config().Mac);
        Assert.Equal(AckErr, rig.Control(CtrlMac, MacAddrSet, Eth.Multicast.ToBytes()));
        Assert.Equal(AckErr, rig.Control(CtrlMac, MacAddrSet, new byte[5]));
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
        Assert.True(Delivered(rig, Eth.OtherMac, own: Eth.OtherMac));
        Assert.False(Delivered(rig, Eth.VmMac, own: Eth.OtherMac));
        // Frames from the new address leave.
        var tx = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.OtherMac, 60));
        rig.Transmit(tx);
        Assert.Equal(tx, rig.Backend.Read(0));

        // A reset brings back the configured address.
        rig.Start();
        Assert.Equal(Eth.VmMac, rig.Config().Mac);
    }

    [Theory]
    [InlineData(CtrlRx, RxPromisc, new byte[] { 1, 0 })]     // a 2-byte on/off
    [InlineData(CtrlRx, (byte)6, new byte[] { 1 })]          // no such mode
    [InlineData(CtrlMac, (byte)2, new byte[] { })]
    [InlineData(CtrlAnnounce, AnnounceAck, new byte[] { 0 })]
    [InlineData(CtrlAnnounce, (byte)1, new byte[] { })]
    [InlineData((byte)2, (byte)0, new byte[] { 0, 1 })]      // VLAN: not offered
    [InlineData((byte)5, (byte)0, new byte[] { 0, 0, 0, 0, 0, 0, 0, 0 })]    // GUEST_OFFLOADS: not offered
    [InlineData((byte)0xff, (byte)0xff, new byte[] { })]
    [InlineData(CtrlMq, MqVqPairsSet, new byte[] { 1, 0 })]  // MQ not offered with one pair
    public void AnUnsupportedOrMalformedCommandIsRefused(byte cls, byte command, byte[] data)
    {
        using var rig = NetRig.Create();
        rig.Start();
        Assert.Equal(AckErr, rig.Control(cls, command, data));
        var s = rig.Net.Stats;
        Assert.Equal(1, s.ControlCommands);
        Assert.Equal(1, s.ControlRefused);
        Assert.False(rig.NeedsReset);
    }

    [Fact]
    public void AControlCommandOverTheSizeLimitIsRefused()
    {
        using var rig = NetRig.Create();
        rig.Start();
        Assert.Equal(AckErr, rig.Control(CtrlMac, MacTableSet, new byte[MaxControlData + 1]));
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
    }

    [Theory]
    [InlineData(1, 1)]      // header only one byte
    [InlineData(2, 0)]      // no ack byte
    public void AControlChainWithoutRoomBreaksTheProtocol(int readable, int writable)
    {
        using var rig = NetRig.Create();
        rig.Start();
        var a = rig.Arenas[rig.ControlQueue];
        var bufs = new List<Buf> { new(a.Alloc(16), (uint)readable) };
        rig.Memory.Write(bufs[0].Address, [CtrlRx, RxPromisc]);
        if (writable > 0)
            bufs.Add(new Buf(a.Alloc(16), (uint)writable, Writable: true));
        rig.Submit(rig.ControlQueue, bufs);
        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset));
        Assert.Empty(rig.Log.WorkerFailures);
        rig.Start();
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
    }

    [Fact]
    public void VqPairsSetTellsTheBackendAndRefusesWhatIsOutOfRange()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { QueuePairs = 3 });
        rig.Start();
        Assert.Equal(1, rig.Net.ActivePairs);
        Assert.Equal(AckOk, rig.Control(CtrlMq, MqVqPairsSet, [2, 0]));
        Assert.Equal(2, rig.Net.ActivePairs);
        Assert.Equal(2, rig.Backend.ActivePairCalls[^1]);
        int calls = rig.Backend.ActivePairCalls.Count;
        Assert.Equal(AckErr, rig.Control(CtrlMq, MqVqPairsSet, [0, 0]));
        Assert.Equal(AckErr, rig.Control(CtrlMq, MqVqPairsSet, [4, 0]));
        Assert.Equal(AckErr, rig.Control(CtrlMq, MqVqPairsSet, [0, 1]));
        Assert.Equal(AckErr, rig.Control(CtrlMq, MqVqPairsSet, [2]));
        Assert.Equal(2, rig.Net.ActivePairs);
        Assert.Equal(calls, rig.Backend.ActivePairCalls.Count);
        Assert.Equal(AckOk, rig.Control(CtrlMq, MqVqPairsSet, [3, 0]));
        Assert.Equal(3, rig.Backend.ActivePairCalls[^1]);

        // Each pair moves its own frames.
        for (int pair = 0; pair < 3; pair++)
        {
            var tx = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 100 + pair));
            rig.Transmit(tx, pair);
            Assert.Equal(tx, rig.Backend.Read(pair));
            rig.PostRx(1, pair: pair);
            var rx = Eth.Frame(Eth.VmMac, Eth.PeerMac, 200 + pair);
            rig.Backend.Inject(pair, Eth.Packet(rx));
            Assert.Equal(rx, rig.Receive(pair).Packet.AsSpan(12).ToArray());
        }

        // A reset goes back to one pair (the backend hears it at the next activation).
        rig.Start();
        Assert.Equal(1, rig.Net.ActivePairs);
        Assert.Equal(1, rig.Backend.ActivePairCalls[^1]);
    }

    [Fact]
    public void VqPairsSetIsRefusedWithoutMq()
    {
        using var rig = NetRig.Create(NetRig.DefaultOptions with { QueuePairs = 2 });
        rig.Start(rig.AllBut(FeatureMq));
        Assert.Equal(AckErr, rig.Control(CtrlMq, MqVqPairsSet, [2, 0]));
        Assert.Equal(1, rig.Net.ActivePairs);
    }

    [Fact]
    public void AnnounceSetsTheStatusBitAndRaisesAConfigurationChangeUntilAcked()
    {
        using var rig = NetRig.Create();
        Assert.False(rig.Net.Announce());          // not active
        rig.Start();
        byte generation = rig.Driver.Read8(VirtioDriver.ConfigGeneration);
        int before = rig.Msi[0].Triggers;
        Assert.True(rig.Net.Announce());
        Assert.True(rig.Msi[0].WaitForTriggers(before + 1, Wait.Timeout));
        Assert.NotEqual(generation, rig.Driver.Read8(VirtioDriver.ConfigGeneration));
        Assert.Equal(StatusLinkUp | StatusAnnounce, rig.Config().Status);

        Assert.Equal(AckOk, rig.Control(CtrlAnnounce, AnnounceAck));
        Assert.Equal(StatusLinkUp, rig.Config().Status);

        // Without GUEST_ANNOUNCE the host has to announce the VM itself.
        rig.Start(rig.AllBut(FeatureGuestAnnounce));
        Assert.False(rig.Net.Announce());
        Assert.Equal(StatusLinkUp, rig.Config().Status);
        Assert.Equal(AckErr, rig.Control(CtrlAnnounce, AnnounceAck));
    }

    [Fact]
    public void AnnounceWithIntxSetsTheIsrConfigurationBit()
    {
        using var rig = NetRig.Create();
        rig.Start(msix: false);
        Assert.True(rig.Net.Announce());
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        Assert.Equal(2, rig.Driver.ReadIsr() & 2);
    }

    // ------------------------------------------------------------------ state

    private static NetRig Configured(VirtioNetOptions options)
    {
        var rig = NetRig.Create(options);
        rig.Start();
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxPromisc, Off));
        Assert.Equal(AckOk, rig.Control(CtrlRx, RxNoBcast, On));
        Assert.Equal(AckOk, rig.Control(CtrlMac, MacTableSet, NetRig.MacTable([Eth.OtherMac], [Eth.Multicast])));
        if (options.QueuePairs > 1)
            Assert.Equal(AckOk, rig.Control(CtrlMq, MqVqPairsSet, [2, 0]));
        Assert.True(rig.Net.Announce());
        return rig;
    }

    private static byte[] Bytes(VirtioNetState s)
    {
        var w = new Kvm.Hypervisor.State.StateWriter();
        s.Write(w);
        return w.ToArray();
    }

    [Fact]
    public void DeviceStateRoundTrips()
    {
        var options = NetRig.DefaultOptions with { QueuePairs = 2 };
        using var rig = Configured(options);
        var saved = rig.Net.Save();
        Assert.Equal(2, saved.ActivePairs);
        Assert.Equal(StatusAnnounce, saved.Announce);
        Assert.False(saved.Filter.Promiscuous);
        Assert.True(saved.Filter.NoBroadcast);
        Assert.Equal([Eth.OtherMac], saved.Filter.Unicast);
        Assert.Equal([Eth.Multicast], saved.Filter.Multicast);

        var bytes = Bytes(saved);
        var r = new Kvm.Hypervisor.State.StateReader(bytes, "virtio-net0");
        var read = VirtioNetState.Read(ref r);
        r.End();
        Assert.Equal(bytes, Bytes(read));

        using var fresh = new VirtioNet("fresh", new SocketPairBackend(2), options);
        var w = new Kvm.Hypervisor.State.StateWriter();
        rig.Net.SaveState(w);
        var reader = new Kvm.Hypervisor.State.StateReader(w.ToArray(), "virtio-net0");
        fresh.RestoreState(ref reader);
        reader.End();
        Assert.Equal(bytes, Bytes(fresh.Save()));
    }

    [Fact]
    public void ARestoreIntoADeviceWithAnotherMacOrPairCountIsRefused()
    {
        using var rig = Configured(NetRig.DefaultOptions with { QueuePairs = 2 });
        var w = new Kvm.Hypervisor.State.StateWriter();
        rig.Net.SaveState(w);
        var bytes = w.ToArray();
        foreach (var (options, what) in new[]
        {
            (NetRig.DefaultOptions with { QueuePairs = 2, Mac = Eth.OtherMac }, "MAC"),
            (NetRig.DefaultOptions with { QueuePairs = 3 }, "queue pairs"),
            (NetRig.DefaultOptions, "queue pairs"),
        })
        {
            using var other = new VirtioNet("other", new SocketPairBackend(options.QueuePairs), options);
            var e = Assert.Throws<DeviceStateException>(() =>
            {
                var r = new Kvm.Hypervisor.State.StateReader(bytes, "virtio-net0");
                other.RestoreState(ref r);
            });
            Assert.Contains(what, e.Message);
        }
    }


    /// <summary>
    /// A pause (every snapshot and checkpoint takes one) stops the receive workers; it must not
    /// leave their queues broken, raise NEEDS_RESET or interrupt the guest.
    /// </summary>
    [Fact]
    public void PauseAndResumeLeaveReceiveWorking()
    {
        using var rig = NetRig.Create();
        rig.Start();
        int configInterrupts = rig.Msi[0].Triggers;
        for (int round = 0; round < 3; round++)
        {
            rig.Transport.Pause();
            Assert.False(rig.NeedsReset, $"round {round}: NEEDS_RESET after a pause");
            rig.Transport.Resume();
            rig.PostRx(1);
            var frame = Eth.Frame(Eth.VmMac, Eth.PeerMac, 100 + round);
            rig.Backend.Inject(0, Eth.Packet(frame));
            Assert.Equal(frame, rig.Receive().Packet.AsSpan(12).ToArray());
        }
        Assert.Equal(configInterrupts, rig.Msi[0].Triggers);
        Assert.Equal(0, rig.Transport.ProtocolErrors);
    }

    [Fact]
    public void TheTransportRoundTripsAndTheRestoredDeviceCarriesOn()
    {
        var options = NetRig.DefaultOptions with { QueuePairs = 2 };
        using var rig = Configured(options);
        rig.PostRx(4);
        Assert.False(rig.NeedsReset, $"{string.Join("; ", rig.Log.Entries.Select(l => l.Message))}");
        rig.Transport.Pause();
        byte[] payload = StateBytes.Save(rig.Transport);

        using var restored = NetRig.Create(options);
        restored.Memory.Write(0, rig.Memory.GetSpan(0, (int)rig.RamSize));
        restored.Transport.Pause();
        StateBytes.Restore(restored.Transport, payload, "virtio-net0");
        // Activation on restore tells the backend what the guest had set up.
        Assert.Equal(2, restored.Backend.ActivePairCalls[^1]);
        Assert.Equal(NetOffloads.Checksum | NetOffloads.Tso4 | NetOffloads.Tso6 | NetOffloads.TsoEcn, restored.Backend.OffloadCalls[^1]);
        restored.Transport.Resume();
        Assert.Equal(StatusLinkUp | StatusAnnounce, restored.Config().Status);
        Assert.Equal(2, restored.Net.ActivePairs);

        // The receive buffers posted before the save take frames now; the filter still applies.
        var rxq = rig.Queues[0].CopyOnto(restored.Memory);
        restored.Backend.Inject(0, Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.PeerMac, 70)));
        var frame = Eth.Frame(Eth.VmMac, Eth.PeerMac, 300);
        restored.Backend.Inject(0, Eth.Packet(frame));
        Assert.True(rxq.WaitForUsedIdx(1), $"nothing received after the restore: status 0x{restored.Driver.Status:x2}, {string.Join("; ", restored.Log.Entries.Select(l => l.Message))}, {restored.Net.Stats}");
        var e = rxq.ReadUsedElement(0);
        var (addr, _) = rig.RxBuffer(0, (ushort)e.Id);
        Assert.Equal(frame, restored.Memory.GetSpan(addr + 12, frame.Length).ToArray());
        Assert.Equal(1, restored.Net.Stats.RxFiltered);
    }
}

/// <summary>CPU time of this process's threads, by name, from /proc/self/task.</summary>
internal static class ThreadCpu
{
    public static string? Find(string name)
    {
        foreach (var dir in Directory.GetDirectories("/proc/self/task"))
        {
            try
            {
                if (File.ReadAllText(Path.Combine(dir, "comm")).Trim() == name)
                    return dir;
            }
            catch (IOException)
            {
            }
        }
        return null;
    }

    /// <summary>utime + stime of the task, in clock ticks.</summary>
    public static long Ticks(string task)
    {
        string stat = File.ReadAllText(Path.Combine(task, "stat"));
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return long.Parse(fields[11], System.Globalization.CultureInfo.InvariantCulture) + long.Parse(fields[12], System.Globalization.CultureInfo.InvariantCulture);
    }
}
