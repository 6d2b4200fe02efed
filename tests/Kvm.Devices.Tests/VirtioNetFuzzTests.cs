using System.Buffers.Binary;
using System.Diagnostics;
using Kvm.Devices.Virtio;
using Kvm.Network;
using Xunit.Abstractions;
using static Kvm.Devices.Tests.SplitQueue;
using static Kvm.Devices.Virtio.Net.VirtioNet;

namespace Kvm.Devices.Tests;

/// <summary>
/// Seeded fuzzing of virtio-net through the PCI transport and its real workers: random and
/// almost-valid transmit chains, and control commands of every class with right and wrong
/// lengths and table counts. Whatever the guest does, nothing but a protocol error (NEEDS_RESET)
/// comes out of the device, it writes no guest memory but the used ring (and, for a control
/// command, the ack byte), no frame leaves with a source MAC that is not the VM's (unless spoofing
/// is allowed), and every control command gets the ack the virtio 1.2 rules give it. Set
/// KVM_FUZZ_SEED to replay a seed; failures name the seed and the iteration.
/// </summary>
public sealed class VirtioNetFuzzTests(ITestOutputHelper output)
{
    private const ushort QSize = 16;
    private const ulong RamSize = 4UL << 20;
    private const int Mtu = 1500;

    private static int SeedFromEnvironment(int fallback) =>
        int.TryParse(Environment.GetEnvironmentVariable("KVM_FUZZ_SEED"), out int s) ? s : fallback;

    /// <summary>Guest RAM now, to compare after the device served a chain.</summary>
    private static byte[] Ram(NetRig rig) => rig.Memory.GetSpan(0, (int)RamSize).ToArray();

    /// <summary>Fails naming the first byte the device changed outside <paramref name="allowed"/>.</summary>
    private static void CheckUnchanged(NetRig rig, byte[] before, string where, params (ulong Start, ulong Length)[] allowed)
    {
        var now = rig.Memory.GetSpan(0, (int)RamSize);
        int at = 0;
        while (at < before.Length)
        {
            int same = now[at..].CommonPrefixLength(before.AsSpan(at));
            at += same;
            if (at >= before.Length)
                return;
            ulong a = (ulong)at;
            if (!allowed.Any(r => a >= r.Start && a < r.Start + r.Length))
                Assert.Fail($"{where}: the device wrote guest memory at 0x{a:x} (0x{before[at]:x2} -> 0x{now[at]:x2})");
            at++;
        }
    }

    private static (ulong, ulong) UsedRing(SplitQueue q) => (q.Used, 6 + 8UL * q.Size);

    private static IEnumerable<(ulong, ulong)> AllUsedRings(NetRig rig) => rig.Queues.Where(q => q is not null).Select(UsedRing);

    private static ulong RandomFeatures(Random rng, NetRig rig, params int[] optional)
    {
        ulong f = rig.AllFeatures;
        foreach (int b in optional)
            if (rng.Next(3) == 0)
                f &= ~NetRig.Bit(b);
        if (rng.Next(3) == 0)
            f &= ~NetRig.Bit(VirtioFeature.RingEventIdx);
        if (rng.Next(4) == 0)
            f &= ~NetRig.Bit(VirtioFeature.RingIndirectDesc);
        return f;
    }

    // ------------------------------------------------------------------ transmit

    [Theory]
    [InlineData(20261203, false, 2000)]
    [InlineData(777, true, 1500)]
    public void RandomTransmitChains_NeverEscape_WriteNothing_AndNeverSpoof(int defaultSeed, bool allowSpoofing, int iterations)
    {
        int seed = SeedFromEnvironment(defaultSeed);
        output.WriteLine($"seed {seed} (replay with KVM_FUZZ_SEED={seed})");
        var rng = new Random(seed);
        using var rig = NetRig.Create(NetRig.DefaultOptions with { QueuePairs = 2, AllowSpoofing = allowSpoofing, Mtu = Mtu, QueueSize = QSize }, RamSize);
        ulong features = 0;
        int sent = 0, dropped = 0, resets = 0, exact = 0;
        var clock = Stopwatch.StartNew();

        void Restart()
        {
            features = RandomFeatures(rng, rig, FeatureCsum, FeatureHostTso4, FeatureHostTso6, FeatureHostEcn);
            rig.Start(features, QSize);
        }

        bool Has(int f) => (features & NetRig.Bit(f)) != 0;
        // Indirect tables in the first 64 KiB of the data area; each piece of a packet in a slot of its own after it.
        ulong tableBase = NetRig.DataBase, dataBase = NetRig.DataBase + 0x10000, dataEnd = RamSize;
        ulong slotSize = (dataEnd - dataBase) / 4;

        ulong Address(ulong length)
        {
            int r = rng.Next(100);
            if (r < 85)
                return dataBase + (ulong)rng.NextInt64((long)(dataEnd - dataBase - Math.Min(length, dataEnd - dataBase - 1)));
            if (r < 90) return RamSize - (ulong)rng.Next(0, 100);
            if (r < 94) return (ulong)rng.NextInt64() * 2;
            if (r < 97) return 0xffff_ffff_ffff_f000UL + (ulong)rng.Next(4096);
            return (ulong)rng.Next(0, 0x10000);
        }

        Restart();
        for (int i = 0; i < iterations; i++)
        {
            string where = $"seed {seed} iteration {i}";
            int pair = rng.Next(2);
            var q = rig.Queues[NetRig.TxQueue(pair)];
            bool indirect = (features & NetRig.Bit(VirtioFeature.RingIndirectDesc)) != 0;

            // A packet: a header with plausible or random fields, a frame from the VM or another source.
            int frameLength = rng.Next(10) switch
            {
                0 => rng.Next(0, 14),
                1 => Mtu + 18 + rng.Next(-2, 3),
                2 => rng.Next(1600, 30000),
                _ => rng.Next(14, Mtu + 18),
            };
            var source = rng.Next(4) == 0 ? new MacAddress((ulong)rng.NextInt64(1L << 48)) : Eth.VmMac;
            var frame = Eth.Frame(Eth.PeerMac, source, frameLength, seed: i);
            byte flags = rng.Next(6) switch { 0 => (byte)rng.Next(256), 1 or 2 => VirtioNetHeader.FlagNeedsCsum, 3 => VirtioNetHeader.FlagDataValid, _ => 0 };
            byte gso = rng.Next(8) switch
            {
                0 => (byte)rng.Next(256),
                1 => VirtioNetHeader.GsoTcpV4,
                2 => VirtioNetHeader.GsoTcpV6,
                3 => (byte)(VirtioNetHeader.GsoTcpV4 | VirtioNetHeader.GsoEcn),
                4 => VirtioNetHeader.GsoUdp,
                _ => VirtioNetHeader.GsoNone,
            };
            var packet = Eth.Packet(frame, flags, gso, (ushort)rng.Next(100), (ushort)rng.Next(2000), (ushort)rng.Next(100), (ushort)rng.Next(100), (ushort)rng.Next(0x10000));

            // Laid out in 1 to 4 buffers, each at a random address; sometimes one is broken.
            var bufs = new List<(ulong Address, uint Length, ushort Flags)>();
            int pieces = rng.Next(1, 5), at = 0;
            for (int k = 0; k < pieces; k++)
            {
                int len = k == pieces - 1 ? packet.Length - at : rng.Next(0, packet.Length - at + 1);
                ulong a = dataBase + (ulong)k * slotSize + (ulong)rng.NextInt64((long)(slotSize - (ulong)len - 1));
                rig.Memory.Write(a, packet.AsSpan(at, len));
                bufs.Add((a, (uint)len, 0));
                at += len;
            }
            bool intact = true;
            if (rng.Next(5) == 0)
            {
                intact = false;
                int k = rng.Next(bufs.Count);
                var (a, l, f) = bufs[k];
                bufs[k] = rng.Next(4) switch
                {
                    0 => (Address(l), l, f),
                    1 => (a, rng.Next(2) == 0 ? (uint)rng.Next() : uint.MaxValue - (uint)rng.Next(16), f),
                    2 => (a, l, (ushort)(f | Write)),
                    _ => (a, l, (ushort)rng.Next(0x10000)),
                };
            }
            bool useIndirect = indirect ? rng.Next(4) == 0 : rng.Next(40) == 0;
            ushort head = (ushort)rng.Next(QSize);
            for (int d = 0; d < QSize; d++)
                if (rng.Next(2) == 0)
                    rig.Memory.WriteU64(q.Desc + 16UL * (uint)d, Address(16));
            if (useIndirect)
            {
                ulong table = tableBase + (ulong)rng.Next(0, 0x1000 - 8) * 16;
                for (int k = 0; k < bufs.Count; k++)
                {
                    var (a, l, f) = bufs[k];
                    bool last = k == bufs.Count - 1;
                    q.WriteDescriptorAt(table + 16UL * (uint)k, a, l, (ushort)(f | (last ? 0 : Next)), (ushort)(k + 1));
                }
                q.WriteDescriptor(head, table, 16u * (uint)bufs.Count, Indirect, 0);
            }
            else
            {
                var ids = Enumerable.Range(0, QSize).Select(x => (ushort)x).Where(x => x != head).OrderBy(_ => rng.Next()).ToList();
                ids.Insert(0, head);
                for (int k = 0; k < bufs.Count; k++)
                {
                    var (a, l, f) = bufs[k];
                    bool last = k == bufs.Count - 1;
                    // Sometimes the last descriptor chains on, into whatever the table holds.
                    bool chainOn = last && rng.Next(20) == 0;
                    if (chainOn)
                        intact = false;
                    ushort next = last ? (ushort)rng.Next(chainOn && rng.Next(2) == 0 ? 0x10000 : QSize) : ids[k + 1];
                    q.WriteDescriptor(ids[k], a, l, (ushort)(f | (last && !chainOn ? 0 : Next)), next);
                }
            }
            ushort slot = rng.Next(40) == 0 ? (ushort)rng.Next(QSize, 0x10000) : head;
            if (slot != head)
                intact = false;

            ushort usedBefore = q.UsedIdx;
            var before = Ram(rig);
            bool jump = rng.Next(60) == 0;
            if (jump)
            {
                intact = false;
                q.SetAvailIdx((ushort)(q.AvailIdx + QSize + 1 + rng.Next(0x7000)));
            }
            else
            {
                q.WriteAvailSlot(q.AvailIdx % QSize, slot);
                q.Publish(slot);
            }
            rig.Driver.Kick(NetRig.TxQueue(pair));
            bool needsReset = false;
            Assert.True(Wait.Until(() =>
            {
                needsReset = rig.NeedsReset;
                return needsReset || q.UsedIdx != usedBefore;
            }), $"{where}: neither used nor NEEDS_RESET");
            if (!needsReset)
                Assert.True(Wait.Until(() => q.UsedIdx == (ushort)(usedBefore + 1)), $"{where}: used index {q.UsedIdx}");

            // Nothing written but the used rings (avail_event and flags live there too: the other
            // pair's worker may still be turning its notifications back on after its poll); the
            // driver wrote the available ring.
            CheckUnchanged(rig, before, where, [.. AllUsedRings(rig), (q.Avail, 6 + 2UL * q.Size)]);

            var out_ = rig.Backend.Drain(pair);
            Assert.True(out_.Count <= 1, $"{where}: {out_.Count} frames sent for one chain");
            foreach (var p in out_)
            {
                Assert.True(p.Length >= 12 + 14, $"{where}: a {p.Length}-byte packet left");
                if (!allowSpoofing)
                    Assert.True(Eth.Source(p) == Eth.VmMac, $"{where}: a frame from {Eth.Source(p)} left");
                Assert.Equal(0, Eth.NumBuffers(p));
                Assert.True((p[0] & ~(VirtioNetHeader.FlagNeedsCsum | VirtioNetHeader.FlagDataValid)) == 0, $"{where}: flags 0x{p[0]:x2} left");
                if ((p[0] & VirtioNetHeader.FlagNeedsCsum) != 0)
                    Assert.True(Has(FeatureCsum), $"{where}: NEEDS_CSUM left without CSUM");
                int type = p[1] & ~VirtioNetHeader.GsoEcn;
                if (type == VirtioNetHeader.GsoNone)
                    Assert.True(p.Length - 12 <= Mtu + 18, $"{where}: a {p.Length - 12}-byte frame left without GSO");
                else
                    Assert.True(type == VirtioNetHeader.GsoTcpV4 && Has(FeatureHostTso4) || type == VirtioNetHeader.GsoTcpV6 && Has(FeatureHostTso6),
                        $"{where}: GSO type 0x{p[1]:x2} left, not negotiated");
                if ((p[1] & VirtioNetHeader.GsoEcn) != 0)
                    Assert.True(Has(FeatureHostEcn), $"{where}: ECN left without HOST_ECN");
                if (intact)
                {
                    var want = packet.ToArray();
                    want[10] = want[11] = 0;
                    Assert.True(want.AsSpan().SequenceEqual(p), $"{where}: the frame sent differs from the one the guest wrote");
                    exact++;
                }
            }
            sent += out_.Count;
            if (needsReset)
            {
                resets++;
                Assert.True(BlockRig.Within(rig.Driver.Reset), $"{where}: the reset did not return");
                Restart();
            }
            else if (out_.Count == 0)
                dropped++;
        }
        Assert.Empty(rig.Log.WorkerFailures);

        // After all that, a good frame leaves and a spoofed one does not.
        rig.Start(rig.AllFeatures, QSize);
        var good = Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.VmMac, 200));
        rig.Transmit(good);
        Assert.Equal(good, rig.Backend.Read(0));
        rig.Transmit(Eth.Packet(Eth.Frame(Eth.PeerMac, Eth.OtherMac, 200)));
        Assert.Equal(allowSpoofing, rig.Backend.HasSent(0));
        var stats = rig.Net.Stats;
        output.WriteLine($"{iterations} chains in {clock.Elapsed.TotalSeconds:0.0} s: {sent} sent ({exact} compared whole), {dropped} dropped, {resets} resets; {stats}");
        Assert.True(sent > iterations / 10 && dropped > iterations / 10 && resets > iterations / 50, $"seed {seed}: a weak mix");
        if (!allowSpoofing)
            Assert.True(stats.TxSpoofed > 0, "no spoofed frame reached the check");
    }

    // ------------------------------------------------------------------ control queue

    /// <summary>The ack virtio 1.2 (5.1.6.5) gives a command, for a device with <paramref name="pairs"/> pairs.</summary>
    private static byte ExpectedAck(byte cls, byte cmd, byte[] data, ulong features, bool allowSpoofing, int pairs)
    {
        bool Has(int f) => (features & NetRig.Bit(f)) != 0;
        if (data.Length > MaxControlData)
            return AckErr;
        switch (cls)
        {
            case CtrlRx:
                return Has(FeatureCtrlRx) && cmd <= RxNoBcast && data.Length == 1 ? AckOk : AckErr;
            case CtrlMac when cmd == MacTableSet:
                if (!Has(FeatureCtrlRx))
                    return AckErr;
                int at = 0;
                for (int t = 0; t < 2; t++)
                {
                    if (data.Length - at < 4)
                        return AckErr;
                    long n = BinaryPrimitives.ReadUInt32LittleEndian(data.AsSpan(at));
                    at += 4;
                    if (n * 6 > data.Length - at)
                        return AckErr;
                    at += (int)(n * 6);
                }
                return at == data.Length ? AckOk : AckErr;
            case CtrlMac when cmd == MacAddrSet:
                if (!Has(FeatureCtrlMacAddr) || data.Length != 6)
                    return AckErr;
                var mac = MacAddress.FromBytes(data);
                return !mac.IsMulticast && (allowSpoofing || mac == Eth.VmMac) ? AckOk : AckErr;
            case CtrlAnnounce:
                return Has(FeatureGuestAnnounce) && cmd == AnnounceAck && data.Length == 0 ? AckOk : AckErr;
            case CtrlMq:
                if (!Has(FeatureMq) || cmd != MqVqPairsSet || data.Length != 2)
                    return AckErr;
                int v = BinaryPrimitives.ReadUInt16LittleEndian(data);
                return v >= 1 && v <= pairs ? AckOk : AckErr;
            default:
                return AckErr;
        }
    }

    private static byte[] RandomCommandData(Random rng, byte cls, byte cmd)
    {
        if (rng.Next(10) == 0)
        {
            var junk = new byte[rng.Next(20) == 0 ? MaxControlData + rng.Next(-1, 3) : rng.Next(0, 40)];
            rng.NextBytes(junk);
            return junk;
        }
        switch (cls)
        {
            case CtrlRx:
                return rng.Next(6) == 0 ? new byte[rng.Next(0, 3)] : [(byte)rng.Next(2)];
            case CtrlMac when cmd == MacTableSet:
            {
                var b = new List<byte>();
                for (int t = 0; t < 2; t++)
                {
                    int n = rng.Next(8) switch { 0 => 64, 1 => 65, 2 => rng.Next(66, 200), _ => rng.Next(0, 4) };
                    uint announced = rng.Next(10) == 0 ? (uint)rng.Next() : (uint)(n + (rng.Next(8) == 0 ? rng.Next(-2, 3) : 0));
                    var c = new byte[4];
                    BinaryPrimitives.WriteUInt32LittleEndian(c, announced);
                    b.AddRange(c);
                    for (int i = 0; i < n; i++)
                    {
                        var m = new byte[6];
                        rng.NextBytes(m);
                        if (t == 0) m[0] &= 0xfe; else m[0] |= 1;
                        b.AddRange(m);
                    }
                }
                if (rng.Next(8) == 0)
                    b.Add((byte)rng.Next(256));
                if (rng.Next(8) == 0 && b.Count > 0)
                    b.RemoveAt(b.Count - 1);
                return [.. b];
            }
            case CtrlMac:
            {
                var mac = rng.Next(4) switch
                {
                    0 => Eth.VmMac, 1 => Eth.OtherMac, 2 => Eth.Multicast, _ => new MacAddress((ulong)rng.NextInt64(1L << 48)),
                };
                var b = mac.ToBytes();
                return rng.Next(8) == 0 ? b[..rng.Next(0, 6)] : b;
            }
            case CtrlAnnounce:
                return rng.Next(6) == 0 ? new byte[1] : [];
            case CtrlMq:
            {
                var b = new byte[rng.Next(8) == 0 ? rng.Next(0, 4) : 2];
                if (b.Length >= 2)
                    BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)(rng.Next(4) == 0 ? rng.Next(0x10000) : rng.Next(0, 5)));
                return b;
            }
            default:
                return new byte[rng.Next(0, 8)];
        }
    }

    [Theory]
    [InlineData(20261204, false, 2500)]
    [InlineData(99, true, 2000)]
    public void RandomControlCommands_GetTheRightAck_AndKeepTheDeviceSane(int defaultSeed, bool allowSpoofing, int iterations)
    {
        int seed = SeedFromEnvironment(defaultSeed);
        output.WriteLine($"seed {seed} (replay with KVM_FUZZ_SEED={seed})");
        var rng = new Random(seed);
        const int Pairs = 3;
        using var rig = NetRig.Create(NetRig.DefaultOptions with { QueuePairs = Pairs, AllowSpoofing = allowSpoofing, QueueSize = QSize }, RamSize);
        ulong features = 0;
        var mac = Eth.VmMac;
        int pairs = 1, ok = 0, err = 0, resets = 0;

        void Restart()
        {
            features = RandomFeatures(rng, rig, FeatureCtrlRx, FeatureCtrlMacAddr, FeatureMq, FeatureGuestAnnounce);
            rig.Start(features, QSize);
            mac = Eth.VmMac;
            pairs = 1;
        }

        Restart();
        for (int i = 0; i < iterations; i++)
        {
            string where = $"seed {seed} iteration {i}";
            var q = rig.Queues[rig.ControlQueue];
            var arena = rig.Arenas[rig.ControlQueue];
            arena.Reset();
            byte cls = rng.Next(10) switch { 0 => (byte)rng.Next(256), 1 => 2, 2 => 5, 3 => CtrlAnnounce, 4 or 5 => CtrlMq, 6 or 7 => CtrlMac, _ => CtrlRx };
            byte cmd = rng.Next(6) == 0 ? (byte)rng.Next(256) : (byte)rng.Next(0, cls == CtrlRx ? 7 : 3);
            var data = RandomCommandData(rng, cls, cmd);
            var readable = new byte[2 + data.Length];
            readable[0] = cls;
            readable[1] = cmd;
            data.CopyTo(readable, 2);

            // The readable bytes in 1 to 3 buffers, then 0 to 2 writable ones; sometimes broken.
            var bufs = new List<Buf>();
            int pieces = rng.Next(1, 4), at = 0;
            for (int k = 0; k < pieces; k++)
            {
                int len = k == pieces - 1 ? readable.Length - at : rng.Next(0, readable.Length - at + 1);
                ulong a = arena.Alloc((ulong)len + 32);
                rig.Memory.Write(a, readable.AsSpan(at, len));
                bufs.Add(new Buf(a, (uint)len));
                at += len;
            }
            int writables = rng.Next(12) == 0 ? 0 : rng.Next(1, 3);
            ulong ackAt = 0;
            for (int k = 0; k < writables; k++)
            {
                uint len = (uint)(rng.Next(12) == 0 ? 0 : rng.Next(1, 8));
                ulong a = arena.Alloc(len + 32);
                rig.Memory.GetWritableSpan(a, (int)len + 1).Fill(0xee);
                if (ackAt == 0 && len > 0)
                    ackAt = a;
                bufs.Add(new Buf(a, len, Writable: true));
            }
            if (rng.Next(25) == 0)
            {
                // Less than the class and command.
                bufs.RemoveAll(b => !b.Writable);
                bufs.Insert(0, new Buf(arena.Alloc(32), (uint)rng.Next(0, 2)));
            }
            bool outside = rng.Next(30) == 0;
            if (outside)
                bufs[rng.Next(bufs.Count)] = bufs[0] with { Address = RamSize - (ulong)rng.Next(0, 4), Length = 16 };
            int readableBytes = bufs.Where(b => !b.Writable).Sum(b => (int)b.Length);
            bool mustReset = outside || ackAt == 0 || readableBytes < 2;

            var before = Ram(rig);
            ushort usedBefore = q.UsedIdx;
            rig.Submit(rig.ControlQueue, bufs);
            bool needsReset = false;
            Assert.True(Wait.Until(() =>
            {
                needsReset = rig.NeedsReset;
                return needsReset || q.UsedIdx != usedBefore;
            }), $"{where}: neither used nor NEEDS_RESET");

            if (needsReset)
            {
                Assert.True(mustReset, $"{where}: a well-formed command chain was refused: {rig.Log.NeedsResetMessages.LastOrDefault()}");
                CheckUnchanged(rig, before, where, [.. AllUsedRings(rig), (q.Desc, 16UL * q.Size), (q.Avail, 6 + 2UL * q.Size)]);
                resets++;
                Assert.True(BlockRig.Within(rig.Driver.Reset), $"{where}: the reset did not return");
                Restart();
                continue;
            }
            Assert.False(mustReset, $"{where}: a broken command chain was served");
            var e = Assert.Single(q.TakeUsed());
            Assert.Equal(1u, e.Length);
            byte ack = rig.Memory.ReadU8(ackAt);
            // Every queue's used ring: a VQ_PAIRS_SET wakes the receive workers of the pairs it
            // turns on, which set their avail_event.
            CheckUnchanged(rig, before, where, [.. AllUsedRings(rig), (ackAt, 1), (q.Desc, 16UL * q.Size), (q.Avail, 6 + 2UL * q.Size)]);

            // Only whole commands are judged by the model (the device reads what the chain holds).
            byte want = ExpectedAck(cls, cmd, data, features, allowSpoofing, Pairs);
            Assert.True(want == ack, $"{where}: class {cls} command {cmd} with {data.Length} bytes: ack {ack}, expected {want}");
            if (ack == AckOk)
            {
                ok++;
                if (cls == CtrlMac && cmd == MacAddrSet)
                    mac = MacAddress.FromBytes(data);
                if (cls == CtrlMq)
                    pairs = BinaryPrimitives.ReadUInt16LittleEndian(data);
            }
            else
                err++;
            Assert.Equal(mac, rig.Net.Mac);
            Assert.Equal(mac, rig.Config().Mac);
            if (!allowSpoofing)
                Assert.Equal(Eth.VmMac, rig.Net.Mac);
            Assert.Equal(pairs, rig.Net.ActivePairs);
            Assert.Equal(pairs, rig.Backend.ActivePairCalls[^1]);
            var filter = rig.Net.Save().Filter;
            Assert.True(filter.Unicast.Count <= MaxFilterEntries && filter.Multicast.Count <= MaxFilterEntries);
        }
        Assert.Empty(rig.Log.WorkerFailures);
        output.WriteLine($"{iterations} commands: {ok} ok, {err} refused, {resets} resets; {rig.Net.Stats}");
        Assert.True(ok > iterations / 20 && err > iterations / 10 && resets > 0, $"seed {seed}: a weak mix");
    }
}
