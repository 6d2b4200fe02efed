using Kvm.Devices.Virtio;
using static Kvm.Devices.Tests.SplitQueue;
using static Kvm.Devices.Virtio.Block.VirtioBlock;

namespace Kvm.Devices.Tests;

/// <summary>
/// A guest is not trusted: every way of breaking the virtqueue or virtio-blk protocol must end in
/// DEVICE_NEEDS_RESET (or, where the spec gives one, an error status), never in an exception out
/// of the transport, a hung or dead worker, or data written to the disk; and after a reset the
/// device must serve a correct request again.
/// </summary>
public sealed class VirtioMalformedTests
{
    private const ushort QSize = 16;
    private const int Sector = 512;

    /// <summary>What a case sets up in the queue before kicking it; a case may use the whole rig.</summary>
    private sealed class Case(BlockRig rig)
    {
        public BlockRig Rig => rig;
        public SplitQueue Q => rig.Queues[0];
        public GuestArena A => rig.Arena;

        public ulong Header(uint type = TypeOut, ulong sector = 8)
        {
            ulong h = A.Alloc(16);
            Blk.WriteHeader(rig.Memory, h, type, sector);
            return h;
        }

        /// <summary>A buffer of <paramref name="length"/> bytes of 0x5a (data an OUT would write).</summary>
        public ulong Data(int length = Sector)
        {
            ulong at = A.Alloc((ulong)length);
            rig.Memory.GetWritableSpan(at, length).Fill(0x5a);
            return at;
        }

        public ulong Status() => A.Alloc(1);

        public void D(int index, ulong address, uint length, ushort flags = 0, ushort next = 0) =>
            Q.WriteDescriptor(index, address, length, flags, next);

        public void T(ulong table, int index, ulong address, uint length, ushort flags = 0, ushort next = 0) =>
            Q.WriteDescriptorAt(table + 16UL * (uint)index, address, length, flags, next);

        public ulong Table(int entries = 4) => rig.Scratch.Alloc(16UL * (uint)entries);

        /// <summary>A well-formed OUT: header, one sector of data, status (descriptors 0, 1, 2).</summary>
        public void GoodOut(int first = 0)
        {
            D(first, Header(), 16, Next, (ushort)(first + 1));
            D(first + 1, Data(), Sector, Next, (ushort)(first + 2));
            D(first + 2, Status(), 1, Write);
        }
    }

    private static readonly ulong RamEnd = BlockRig.RamSize;

    /// <summary>Chains and rings that must put the device in NEEDS_RESET when kicked.</summary>
    private static readonly Dictionary<string, Action<Case>> Broken = new()
    {
        ["descriptor loop"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, c.Data(), Sector, Next, 2);
            c.D(2, c.Data(), Sector, Next, 1);
            c.Q.Publish(0);
        },
        ["descriptor pointing at itself"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 0);
            c.Q.Publish(0);
        },
        ["next beyond the queue"] = c =>
        {
            c.D(0, c.Header(), 16, Next, QSize);
            c.Q.Publish(0);
        },
        ["next 0xffff"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, c.Data(), Sector, Next, 0xffff);
            c.Q.Publish(0);
        },
        ["head beyond the queue"] = c =>
        {
            c.GoodOut();
            c.Q.WriteAvailSlot(0, QSize);
            c.Q.SetAvailIdx(1);
        },
        ["head 0xffff"] = c =>
        {
            c.Q.WriteAvailSlot(0, 0xffff);
            c.Q.SetAvailIdx(1);
        },
        ["data buffer outside guest RAM"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, RamEnd, Sector, Next, 2);
            c.D(2, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["data buffer across the end of guest RAM"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, RamEnd - 256, Sector, Next, 2);
            c.D(2, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["status buffer outside guest RAM"] = c =>
        {
            c.D(0, c.Header(TypeIn), 16, Next, 1);
            c.D(1, 0x40_0000_0000, 1, Write);
            c.Q.Publish(0);
        },
        ["buffer address wraps"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, 0xffff_ffff_ffff_fe00, 0x400, Next, 2);
            c.D(2, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["header address wraps"] = c =>
        {
            c.D(0, 0xffff_ffff_ffff_fff8, 16, Next, 1);
            c.D(1, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["nested indirect"] = c =>
        {
            ulong inner = c.Table(), outer = c.Table();
            c.T(inner, 0, c.Header(), 16, Next, 1);
            c.T(inner, 1, c.Status(), 1, Write);
            c.T(outer, 0, inner, 32, Indirect);
            c.D(0, outer, 16, Indirect);
            c.Q.Publish(0);
        },
        ["indirect with next"] = c =>
        {
            ulong t = c.Table();
            c.T(t, 0, c.Header(), 16, Next, 1);
            c.T(t, 1, c.Data(), Sector);
            c.D(0, t, 32, Indirect | Next, 1);
            c.D(1, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["indirect length 0"] = c =>
        {
            c.D(0, c.Table(), 0, Indirect);
            c.Q.Publish(0);
        },
        ["indirect length not a multiple of 16"] = c =>
        {
            ulong t = c.Table();
            c.T(t, 0, c.Header(), 16, Next, 1);
            c.T(t, 1, c.Status(), 1, Write);
            c.D(0, t, 40, Indirect);
            c.Q.Publish(0);
        },
        ["indirect table longer than the queue"] = c =>
        {
            ulong t = c.Table(QSize + 1);
            ulong h = c.Header(TypeIn, 0);
            for (int i = 0; i < QSize; i++)
                c.T(t, i, i == 0 ? h : c.Data(), i == 0 ? 16u : Sector, (ushort)(Next | (i == 0 ? 0 : Write)), (ushort)(i + 1));
            c.T(t, QSize, c.Status(), 1, Write);
            c.D(0, t, 16u * (QSize + 1), Indirect);
            c.Q.Publish(0);
        },
        ["indirect table outside guest RAM"] = c =>
        {
            c.D(0, RamEnd - 16, 48, Indirect);
            c.Q.Publish(0);
        },
        ["indirect next beyond its table"] = c =>
        {
            ulong t = c.Table(3);
            c.T(t, 0, c.Header(), 16, Next, 2);
            c.T(t, 1, c.Status(), 1, Write);
            c.T(t, 2, c.Status(), 1, Write);
            c.D(0, t, 32, Indirect);      // two entries: next 2 is outside, though in RAM
            c.Q.Publish(0);
        },
        ["indirect loop"] = c =>
        {
            ulong t = c.Table();
            c.T(t, 0, c.Header(), 16, Next, 1);
            c.T(t, 1, c.Data(), Sector, Next, 0);
            c.D(0, t, 32, Indirect);
            c.Q.Publish(0);
        },
        ["readable after writable"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, c.Status(), 1, Write | Next, 2);
            c.D(2, c.Data(), Sector);
            c.Q.Publish(0);
        },
        ["readable after writable inside an indirect table"] = c =>
        {
            ulong t = c.Table();
            c.T(t, 0, c.Header(), 16, Next, 1);
            c.T(t, 1, c.Status(), 1, Write | Next, 2);
            c.T(t, 2, c.Data(), Sector);
            c.D(0, t, 48, Indirect);
            c.Q.Publish(0);
        },
        ["no status byte"] = c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, c.Data(), Sector);
            c.Q.Publish(0);
        },
        ["only empty writable buffers"] = c =>
        {
            c.D(0, c.Header(TypeIn), 16, Next, 1);
            c.D(1, c.Status(), 0, Write);
            c.Q.Publish(0);
        },
        ["header shorter than 16 bytes"] = c =>
        {
            c.D(0, c.Header(), 15, Next, 1);
            c.D(1, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["split header shorter than 16 bytes"] = c =>
        {
            ulong h = c.Header();
            c.D(0, h, 8, Next, 1);
            c.D(1, h + 8, 7, Next, 2);
            c.D(2, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["no readable buffer at all"] = c =>
        {
            c.D(0, c.Status(), 1, Write);
            c.Q.Publish(0);
        },
        ["available index more than the queue size ahead"] = c =>
        {
            c.GoodOut();
            c.Q.WriteAvailSlot(0, 0);
            c.Q.SetAvailIdx(QSize + 1);
        },
        ["available index moved backwards"] = c =>
        {
            c.GoodOut();
            c.Q.SetAvailIdx(0xffff);
        },
        ["a good request followed by a bad one in the same kick"] = c =>
        {
            c.GoodOut(0);
            c.D(3, c.Header(), 16, Next, 3);
            c.Q.Publish(0);
            c.Q.Publish(3);
        },
    };

    /// <summary>Things a driver may do that the spec answers with a status, not NEEDS_RESET.</summary>
    private static readonly Dictionary<string, (Func<Case, ulong> Setup, byte Status)> Answered = new()
    {
        ["IN with device-readable data"] = (c =>
        {
            c.D(0, c.Header(TypeIn, 0), 16, Next, 1);
            c.D(1, c.Data(), Sector, Next, 2);
            ulong status = c.Status();
            c.D(2, status, 1, Write);
            c.Q.Publish(0);
            return status;
        }, StatusIoErr),
        ["unknown request type"] = (c =>
        {
            c.D(0, c.Header(0x7777, 0), 16, Next, 1);
            c.D(1, c.Data(), Sector, Next, 2);
            ulong status = c.Status();
            c.D(2, status, 1, Write);
            c.Q.Publish(0);
            return status;
        }, StatusUnsupported),
        ["discard without segments"] = (c =>
        {
            c.D(0, c.Header(TypeDiscard, 0), 16, Next, 1);
            ulong status = c.Status();
            c.D(1, status, 1, Write);
            c.Q.Publish(0);
            return status;
        }, StatusUnsupported),
        ["discard with a partial segment"] = (c =>
        {
            c.D(0, c.Header(TypeDiscard, 0), 16, Next, 1);
            c.D(1, c.Data(24), 24, Next, 2);
            ulong status = c.Status();
            c.D(2, status, 1, Write);
            c.Q.Publish(0);
            return status;
        }, StatusUnsupported),
        ["write-zeroes with more segments than max_write_zeroes_seg"] = (c =>
        {
            var seg = Blk.Segments(Enumerable.Repeat((8UL, 1u, 0u), (int)MaxWriteZeroesSegments + 1).ToArray());
            ulong at = c.A.Alloc((ulong)seg.Length);
            c.Rig.Memory.Write(at, seg);
            c.D(0, c.Header(TypeWriteZeroes, 0), 16, Next, 1);
            c.D(1, at, (uint)seg.Length, Next, 2);
            ulong status = c.Status();
            c.D(2, status, 1, Write);
            c.Q.Publish(0);
            return status;
        }, StatusUnsupported),
        ["OUT with an odd number of bytes"] = (c =>
        {
            c.D(0, c.Header(), 16, Next, 1);
            c.D(1, c.Data(Sector + 1), Sector + 1, Next, 2);
            ulong status = c.Status();
            c.D(2, status, 1, Write);
            c.Q.Publish(0);
            return status;
        }, StatusIoErr),
    };

    public static TheoryData<string> BrokenCases => new(Broken.Keys);
    public static TheoryData<string> AnsweredCases => new(Answered.Keys);

    private static BlockRig StartedRig(bool indirect = true)
    {
        var rig = BlockRig.Create(1 << 20, queueSize: QSize);
        Restart(rig, indirect);
        return rig;
    }

    private static void Restart(BlockRig rig, bool indirect = true)
    {
        ulong f = rig.AllFeatures;
        if (!indirect)
            f &= ~VirtioFeature.Bit(VirtioFeature.RingIndirectDesc);
        rig.Start(f);
    }

    /// <summary>After a reset, a correct write and read work and the data is in the file.</summary>
    private static void AssertWorksAfterReset(BlockRig rig)
    {
        Assert.True(BlockRig.Within(rig.Driver.Reset), "the reset did not return");
        Assert.Equal(0, rig.Driver.Status);
        Restart(rig);
        var data = new byte[2 * Sector];
        new Random(1).NextBytes(data);
        Assert.Equal(StatusOk, rig.Do(TypeOut, 40, data).Status(rig.Memory));
        var back = rig.Do(TypeIn, 40, inLength: data.Length);
        Assert.Equal(StatusOk, back.Status(rig.Memory));
        Assert.Equal(data, back.ReadData(rig.Memory));
        Assert.Equal(data, rig.ReadFile(40 * Sector, data.Length));
    }

    [Theory]
    [MemberData(nameof(BrokenCases))]
    public void BrokenChain_SetsNeedsReset_WithAConfigInterrupt_WritesNothing_AndTheDeviceRecovers(string name)
    {
        using var rig = StartedRig();
        var hash = rig.FileHash();
        var c = new Case(rig);
        Broken[name](c);
        rig.Driver.Kick(0);

        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset), $"{name}: NEEDS_RESET was not set (status 0x{rig.Driver.Status:x2})");
        Assert.True(rig.Msi[0].WaitForTriggers(1, Wait.Timeout), $"{name}: no configuration-change interrupt");
        // The other status bits are as the driver left them.
        Assert.Equal(VirtioStatus.Acknowledge | VirtioStatus.Driver | VirtioStatus.FeaturesOk | VirtioStatus.DriverOk,
            rig.Driver.Status & ~VirtioStatus.DeviceNeedsReset);
        // Kicking a broken device again changes nothing and breaks nothing.
        rig.Driver.Kick(0);
        Assert.Empty(rig.Log.WorkerFailures);
        Assert.NotEmpty(rig.Log.NeedsResetMessages);
        // Only a well-formed request before the bad one (if any) may have written.
        if (name.StartsWith("a good request", StringComparison.Ordinal))
            Assert.Equal(Enumerable.Repeat((byte)0x5a, Sector), rig.ReadFile(8 * Sector, Sector));
        else
            Assert.Equal(hash, rig.FileHash());

        AssertWorksAfterReset(rig);
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void AGuestThatBreaksTheProtocolOverAndOverIsLoggedOnlyTenTimes()
    {
        // Each break costs the guest a reset; it may still repeat it forever. The host's log must
        // not grow with it: the first ten are logged, the rest only counted.
        using var rig = StartedRig();
        const int Breaks = 13;
        for (int i = 1; i <= Breaks; i++)
        {
            var c = new Case(rig);
            c.D(0, c.Header(), 16, Next, 0);      // a descriptor pointing at itself
            c.Q.Publish(0);
            rig.Driver.Kick(0);
            Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset), $"break {i}: NEEDS_RESET was not set");
            Assert.True(BlockRig.Within(rig.Driver.Reset), "the reset did not return");
            Restart(rig);
        }
        Assert.Equal(Breaks, rig.Transport.ProtocolErrors);
        Assert.Equal(VirtioPciTransport.LoggedProtocolErrors, rig.Log.NeedsResetMessages.Count);
        Assert.Contains("not logged", rig.Log.NeedsResetMessages[^1]);
        AssertWorksAfterReset(rig);
    }

    [Fact]
    public void IndirectDescriptor_WithoutNegotiatingIt_SetsNeedsReset()
    {
        using var rig = StartedRig(indirect: false);
        var hash = rig.FileHash();
        var c = new Case(rig);
        ulong t = c.Table();
        c.T(t, 0, c.Header(), 16, Next, 1);
        c.T(t, 1, c.Data(), Sector, Next, 2);
        c.T(t, 2, c.Status(), 1, Write);
        c.D(0, t, 48, Indirect);
        c.Q.Publish(0);
        rig.Driver.Kick(0);
        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset));
        Assert.Equal(hash, rig.FileHash());
        Assert.Empty(rig.Log.WorkerFailures);
        AssertWorksAfterReset(rig);
    }

    [Theory]
    [MemberData(nameof(AnsweredCases))]
    public void ProtocolConformingButBadRequest_CompletesWithTheSpecifiedStatus_AndTheQueueGoesOn(string name)
    {
        using var rig = StartedRig();
        var hash = rig.FileHash();
        var (setup, expected) = Answered[name];
        ulong status = setup(new Case(rig));
        rig.Driver.Kick(0);
        Assert.True(rig.Queues[0].WaitAllUsed(), $"{name}: not completed (status 0x{rig.Driver.Status:x2})");
        var e = Assert.Single(rig.Queues[0].TakeUsed());
        Assert.Equal(0u, e.Id);
        Assert.Equal(1u, e.Length);
        Assert.Equal(expected, rig.Memory.ReadU8(status));
        Assert.Equal(0, rig.Driver.Status & VirtioStatus.DeviceNeedsReset);
        Assert.Equal(hash, rig.FileHash());
        // The same queue serves the next request without a reset.
        var ok = rig.Do(TypeIn, 0, inLength: Sector);
        Assert.Equal(StatusOk, ok.Status(rig.Memory));
        Assert.Empty(rig.Log.WorkerFailures);
    }

    public static TheoryData<string, ulong> BadRings => new()
    {
        { "desc outside RAM", RamEnd },
        { "desc misaligned", BlockRig.RingBase + 8 },
        { "avail misaligned", BlockRig.RingBase + 0x1001 },
        { "used misaligned", BlockRig.RingBase + 0x2002 },
        { "used across the end of RAM", RamEnd - 0x40 },
        { "avail far outside RAM", 0xffff_ffff_ffff_f000 },
    };

    [Theory]
    [MemberData(nameof(BadRings))]
    public void BadRingAddresses_AtDriverOk_SetNeedsReset_AndStartNoWorker(string name, ulong address)
    {
        using var rig = BlockRig.Create(1 << 20, queueSize: QSize);
        var d = rig.Driver;
        Assert.True(d.Negotiate(rig.AllFeatures));
        d.Write16(VirtioDriver.ConfigMsixVector, 0);
        d.ProgramAllVectors(2);
        var q = d.SetupQueue(0, QSize, BlockRig.RingBase, 1);
        int field = name.StartsWith("desc", StringComparison.Ordinal) ? VirtioDriver.QueueDesc
            : name.StartsWith("avail", StringComparison.Ordinal) ? VirtioDriver.QueueDriver : VirtioDriver.QueueDevice;
        d.Write64(field, address);
        d.DriverOk();
        // Synchronously: DRIVER_OK is where the rings are checked.
        Assert.Equal(VirtioStatus.DeviceNeedsReset, d.Status & VirtioStatus.DeviceNeedsReset);
        Assert.True(rig.Msi[0].WaitForTriggers(1, Wait.Timeout), $"{name}: no configuration-change interrupt");
        // No worker serves the queue.
        var r = Blk.Build(rig.Arena, TypeIn, 0, inLength: Sector);
        q.AddChain(r.Buffers);
        d.Kick(0);
        Assert.Equal(0, q.UsedIdx);
        Assert.Empty(rig.Log.WorkerFailures);
        AssertWorksAfterReset(rig);
    }

    [Theory]
    [InlineData((ushort)0)]
    [InlineData((ushort)12)]
    [InlineData((ushort)(QSize * 2))]
    public void BadQueueSize_AtDriverOk_SetsNeedsReset(ushort size)
    {
        using var rig = BlockRig.Create(1 << 20, queueSize: QSize);
        var d = rig.Driver;
        Assert.True(d.Negotiate(rig.AllFeatures));
        d.SetupQueue(0, QSize, BlockRig.RingBase);
        d.Write16(VirtioDriver.QueueSize, size);
        d.DriverOk();
        Assert.Equal(VirtioStatus.DeviceNeedsReset, d.Status & VirtioStatus.DeviceNeedsReset);
        AssertWorksAfterReset(rig);
    }

    [Fact]
    public void BrokenQueue_DoesNotStopTheOtherQueues()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2, queueSize: QSize);
        rig.Start();
        var q0 = rig.Queues[0];
        q0.WriteAvailSlot(0, 0xffff);
        q0.SetAvailIdx(1);
        rig.Driver.Kick(0);
        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset));
        // Until the driver resets, queue 1 may still be served; it must at least not be corrupted
        // or crash. A request on it either completes correctly or is left for after the reset.
        var r = rig.Submit(Blk.Build(rig.Arenas[1], TypeIn, 2, inLength: Sector), queue: 1);
        if (rig.Queues[1].WaitAllUsed(TimeSpan.FromSeconds(2)))
        {
            Assert.Equal(StatusOk, r.Status(rig.Memory));
            Assert.Equal(rig.ReadFile(2 * Sector, Sector), r.ReadData(rig.Memory));
        }
        Assert.Empty(rig.Log.WorkerFailures);
        AssertWorksAfterReset(rig);
    }
}
