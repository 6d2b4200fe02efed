using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;
using static Kvm.Devices.Tests.VirtioDriver;
using static Kvm.Devices.Virtio.Block.VirtioBlock;

namespace Kvm.Devices.Tests;

/// <summary>The virtio 1.2 PCI transport (4.1) as a driver sees it: registers, negotiation, status, reset and interrupts.</summary>
public sealed class VirtioTransportTests
{
    private const int Sector = 512;
    private const byte Ack = VirtioStatus.Acknowledge, Drv = VirtioStatus.Driver, FeatOk = VirtioStatus.FeaturesOk,
        DrvOk = VirtioStatus.DriverOk, NeedsReset = VirtioStatus.DeviceNeedsReset;
    private static readonly ulong Version1 = VirtioFeature.Bit(VirtioFeature.Version1);

    [Fact]
    public void DeviceFeatures_OfferVersion1IndirectAndEventIdx_PlusTheDevicesOwn()
    {
        using var rig = BlockRig.Create(1 << 20);
        ulong f = rig.Driver.DeviceFeatures;
        Assert.Equal(rig.Block.Features | Version1 | VirtioFeature.Bit(VirtioFeature.RingIndirectDesc) |
                     VirtioFeature.Bit(VirtioFeature.RingEventIdx), f);
        Assert.Equal(0UL, f & VirtioFeature.Bit(VirtioFeature.RingPacked));   // split rings only
        rig.Driver.Write32(DeviceFeatureSelect, 2);
        Assert.Equal(0u, rig.Driver.Read32(DeviceFeature));
        Assert.Equal(2u, rig.Driver.Read32(DeviceFeatureSelect));
    }

    [Fact]
    public void FeaturesOk_Sticks_ForAnOfferedSubsetWithVersion1()
    {
        using var rig = BlockRig.Create(1 << 20);
        ulong wanted = Version1 | 1UL << FeatureFlush;
        Assert.True(rig.Driver.Negotiate(wanted));
        Assert.Equal(Ack | Drv | FeatOk, rig.Driver.Status);
        Assert.Equal(wanted, rig.Transport.NegotiatedFeatures);
        rig.Driver.Write32(DriverFeatureSelect, 0);
        Assert.Equal((uint)wanted, rig.Driver.Read32(DriverFeature));
        rig.Driver.Write32(DriverFeatureSelect, 1);
        Assert.Equal((uint)(wanted >> 32), rig.Driver.Read32(DriverFeature));
    }

    public static TheoryData<ulong> UnacceptableFeatures => new()
    {
        1UL << FeatureFlush,                                            // no VERSION_1: a legacy driver
        0,
        Version1 | VirtioFeature.Bit(VirtioFeature.RingPacked),         // not offered
        Version1 | 1UL << FeatureConfigWce,                             // not offered
        Version1 | VirtioFeature.Bit(VirtioFeature.AccessPlatform),     // not offered
        Version1 | 1UL << 63,
    };

    [Theory]
    [MemberData(nameof(UnacceptableFeatures))]
    public void FeaturesOk_DoesNotStick_ForUnofferedBitsOrWithoutVersion1_AndDriverOkThenFails(ulong features)
    {
        using var rig = BlockRig.Create(1 << 20);
        Assert.False(rig.Driver.Negotiate(features));
        Assert.Equal(Ack | Drv, rig.Driver.Status);

        // A driver that goes on anyway gets NEEDS_RESET, and no queue is served.
        var q = rig.Driver.SetupQueue(0, 16, BlockRig.RingBase);
        rig.Driver.DriverOk();
        Assert.Equal(NeedsReset, rig.Driver.Status & NeedsReset);
        var r = Blk.Build(rig.Arena, TypeIn, 0, inLength: Sector);
        q.AddChain(r.Buffers);
        rig.Driver.Kick(0);
        // The device has no worker to serve it, so nothing changes; a reset and a proper start recover.
        Assert.Equal(0, q.UsedIdx);
        rig.Driver.Reset();
        rig.Start();
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
    }

    [Fact]
    public void DriverFeatures_AreFrozenOnceFeaturesOkIsSet()
    {
        using var rig = BlockRig.Create(1 << 20);
        Assert.True(rig.Driver.Negotiate(Version1));
        rig.Driver.WriteDriverFeatures(Version1 | 1UL << FeatureFlush | VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        Assert.Equal(Version1, rig.Transport.NegotiatedFeatures);
        rig.Driver.Write32(DriverFeatureSelect, 0);
        Assert.Equal(0u, rig.Driver.Read32(DriverFeature));
    }

    [Fact]
    public void DriverOk_WithoutFeaturesOk_SetsNeedsReset_AndSendsAConfigInterrupt()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Driver.Reset();
        rig.Driver.WriteStatus(Ack | Drv);
        rig.Driver.Write16(ConfigMsixVector, 0);
        rig.Driver.ProgramAllVectors(2);
        rig.Driver.WriteStatus(Ack | Drv | DrvOk);
        Assert.Equal(NeedsReset, rig.Driver.Status & NeedsReset);
        Assert.True(rig.Msi[0].WaitForTriggers(1, Wait.Timeout));
        Assert.Equal(MessageFor(0), rig.Msi[0].Sent[0]);
        // NEEDS_RESET stays whatever else the driver writes, until a reset.
        rig.Driver.WriteStatus(Ack | Drv | FeatOk | DrvOk);
        Assert.Equal(NeedsReset, rig.Driver.Status & NeedsReset);
        rig.Driver.Reset();
        Assert.Equal(0, rig.Driver.Status);
    }

    [Fact]
    public void QueueRegisters_ReadBack_AndAreFrozenOnceDriverOk()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2, queueSize: 64);
        var d = rig.Driver;
        Assert.True(d.Negotiate(rig.AllFeatures));
        d.Write16(QueueSelect, 1);
        Assert.Equal(64, d.Read16(QueueSize));                 // the maximum until the driver writes less
        Assert.Equal(0, d.Read16(QueueEnable));
        Assert.Equal(Virtqueue.NoVector, d.Read16(QueueMsixVector));
        Assert.Equal(1, d.Read16(QueueNotifyOff));
        d.Write16(QueueSize, 32);
        d.Write64(QueueDesc, 0x10000);
        d.Write64(QueueDriver, 0x10200);
        d.Write64(QueueDevice, 0x11000);
        d.Write16(QueueMsixVector, 2);
        d.Write16(QueueEnable, 1);
        Assert.Equal(32, d.Read16(QueueSize));
        Assert.Equal(0x10000UL, d.Read64(QueueDesc));
        Assert.Equal(0x10200UL, d.Read64(QueueDriver));
        Assert.Equal(0x11000UL, d.Read64(QueueDevice));
        Assert.Equal(2, d.Read16(QueueMsixVector));
        Assert.Equal(1, d.Read16(QueueEnable));
        // Queue 0 kept its own values.
        d.Write16(QueueSelect, 0);
        Assert.Equal(64, d.Read16(QueueSize));
        Assert.Equal(0UL, d.Read64(QueueDesc));
        Assert.Equal(0, d.Read16(QueueNotifyOff));

        d.DriverOk();
        Assert.Equal(0, d.Status & NeedsReset);
        d.Write16(QueueSelect, 1);
        d.Write16(QueueSize, 16);
        d.Write64(QueueDesc, 0x20000);
        Assert.Equal(32, d.Read16(QueueSize));
        Assert.Equal(0x10000UL, d.Read64(QueueDesc));
    }

    [Fact]
    public void QueueSelect_BeyondNumQueues_ShowsSizeZero_AndIgnoresWrites()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2);
        var d = rig.Driver;
        Assert.Equal(2, d.Read16(NumQueues));
        d.Write16(QueueSelect, 2);
        Assert.Equal(0, d.Read16(QueueSize));
        Assert.Equal(Virtqueue.NoVector, d.Read16(QueueMsixVector));
        d.Write16(QueueSize, 8);
        d.Write16(QueueEnable, 1);
        Assert.Equal(0, d.Read16(QueueSize));
        Assert.Equal(0, d.Read16(QueueEnable));
    }

    [Fact]
    public void MsixVectors_TheTableDoesNotHave_ReadBackAsNoVector()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2);     // 3 vectors: config + 2 queues
        var d = rig.Driver;
        d.Write16(ConfigMsixVector, 2);
        Assert.Equal(2, d.Read16(ConfigMsixVector));
        d.Write16(ConfigMsixVector, 3);
        Assert.Equal(Virtqueue.NoVector, d.Read16(ConfigMsixVector));
        d.Write16(QueueSelect, 0);
        d.Write16(QueueMsixVector, 0x7ff);
        Assert.Equal(Virtqueue.NoVector, d.Read16(QueueMsixVector));
        d.Write16(QueueMsixVector, 1);
        Assert.Equal(1, d.Read16(QueueMsixVector));
    }

    [Fact]
    public void Reset_ReturnsEveryDriverSetRegisterToItsInitialValue()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2, queueSize: 64);
        rig.Start(queueSize: 16);
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        var d = rig.Driver;
        d.Write32(DeviceFeatureSelect, 1);
        d.Reset();
        Assert.Equal(0, d.Status);
        Assert.Equal(0u, d.Read32(DeviceFeatureSelect));
        Assert.Equal(0UL, rig.Transport.NegotiatedFeatures);
        Assert.Equal(Virtqueue.NoVector, d.Read16(ConfigMsixVector));
        Assert.Equal(0, d.Read16(QueueSelect));
        for (ushort q = 0; q < 2; q++)
        {
            d.Write16(QueueSelect, q);
            Assert.Equal(64, d.Read16(QueueSize));
            Assert.Equal(0, d.Read16(QueueEnable));
            Assert.Equal(Virtqueue.NoVector, d.Read16(QueueMsixVector));
            Assert.Equal(0UL, d.Read64(QueueDesc));
            Assert.Equal(0UL, d.Read64(QueueDriver));
            Assert.Equal(0UL, d.Read64(QueueDevice));
        }
        // The MSI-X table belongs to PCI, not to the virtio device: it survives.
        Assert.Equal(MessageFor(1), rig.Transport.Msix.GetMessage(1));
    }

    [Fact]
    public void RequestsPublishedBeforeDriverOk_WaitForDriverOk()
    {
        using var rig = BlockRig.Create(1 << 20);
        Assert.True(rig.Driver.Negotiate(rig.AllFeatures));
        var q = rig.Driver.SetupQueue(0, 16, BlockRig.RingBase, 1);
        rig.Driver.Write16(ConfigMsixVector, 0);
        rig.Driver.ProgramAllVectors(2);
        var r = Blk.Build(rig.Arena, TypeIn, 3, inLength: Sector);
        q.AddChain(r.Buffers);
        rig.Driver.Kick(0);
        Assert.Equal(0, q.UsedIdx);                 // no device activity before DRIVER_OK (3.1.1)
        Assert.Equal(Blk.NotWritten, r.Status(rig.Memory));
        rig.Driver.DriverOk();
        rig.Driver.Kick(0);
        Assert.True(q.WaitAllUsed());
        Assert.Equal(StatusOk, r.Status(rig.Memory));
        Assert.Equal(rig.ReadFile(3 * Sector, Sector), r.ReadData(rig.Memory));
    }

    [Fact]
    public void MsixVectorPerQueue_EachQueueTriggersItsOwnVector_WithTheProgrammedMessage()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 3, queueSize: 16);
        rig.Start();
        for (int q = 0; q < 3; q++)
        {
            var before = rig.Msi.Vectors.Select(v => v.Triggers).ToArray();
            Assert.Equal(StatusOk, rig.Do(TypeIn, (ulong)q, inLength: Sector, queue: q).Status(rig.Memory));
            Assert.True(rig.Msi[q + 1].WaitForTriggers(before[q + 1] + 1, Wait.Timeout), $"queue {q} did not trigger vector {q + 1}");
            Assert.Equal(MessageFor(q + 1), rig.Msi[q + 1].Sent[^1]);
        }
        // Resetting joins the workers: every interrupt decision has been made.
        rig.Driver.Reset();
        Assert.Equal([0, 1, 1, 1], rig.Msi.Vectors.Select(v => v.Triggers));
        Assert.False(rig.Intx.Level);
        Assert.Empty(rig.Intx.Levels);                 // MSI-X on: INTx is never used
    }

    [Fact]
    public void MaskedQueueVector_HoldsTheInterruptPending_UntilUnmasked()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start();
        var (address, data) = MessageFor(1);
        rig.Driver.ProgramMsixEntry(1, address, data, masked: true);
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(Wait.Until(() => rig.Transport.Msix.IsPending(1)), "the masked vector's interrupt should be pending");
        Assert.Equal(0, rig.Msi[1].Triggers);
        rig.Driver.ProgramMsixEntry(1, address, data, masked: false);
        Assert.Equal(1, rig.Msi[1].Triggers);
        Assert.False(rig.Transport.Msix.IsPending(1));
    }

    [Fact]
    public void Intx_WhenMsixIsOff_IsrReadsOneAndClears_AndTheLineIsDeasserted()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(msix: false);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(StatusOk, rig.Do(TypeIn, (ulong)i, inLength: Sector).Status(rig.Memory));
            Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout), "INTx was not asserted");
            Assert.Equal(1, rig.Driver.ReadIsr());      // bit 0: a queue interrupt
            Assert.False(rig.Intx.Level);               // reading the ISR deasserts the line
            Assert.Equal(0, rig.Driver.ReadIsr());      // and clears it
        }
        Assert.Equal(0, rig.Msi.TotalTriggers);

        // A reset takes back an interrupt the driver has not read yet.
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        rig.Driver.Reset();
        Assert.False(rig.Intx.Level);
        Assert.Equal(0, rig.Driver.ReadIsr());
    }

    [Fact]
    public void NeedsReset_WithIntx_SetsIsrBit1_AndAssertsTheLine()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(msix: false);
        var q = rig.Queues[0];
        q.WriteAvailSlot(0, 0x7fff);                    // a head index beyond the queue
        q.SetAvailIdx(1);
        rig.Driver.Kick(0);
        Assert.True(rig.Driver.WaitForStatusBits(NeedsReset), "NEEDS_RESET was not set");
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        Assert.Equal(2, rig.Driver.ReadIsr() & 2);     // bit 1: configuration change
        Assert.False(rig.Intx.Level);
    }

    [Fact]
    public void NoInterruptFlag_SuppressesEveryQueueInterrupt_WithoutEventIdx()
    {
        using var rig = BlockRig.Create(1 << 20);
        ulong features = rig.AllFeatures & ~VirtioFeature.Bit(VirtioFeature.RingEventIdx);

        // Without the flag: one interrupt per request served one at a time.
        rig.Start(features);
        for (int i = 1; i <= 5; i++)
        {
            Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
            Assert.True(rig.Msi[1].WaitForTriggers(i, Wait.Timeout), $"request {i} did not interrupt");
        }
        rig.Driver.Reset();                         // joins the worker: no decision is left to make
        Assert.Equal(5, rig.Msi[1].Triggers);

        // With VIRTQ_AVAIL_F_NO_INTERRUPT: none.
        rig.Start(features);
        rig.Queues[0].AvailFlags = SplitQueue.AvailNoInterrupt;
        for (int i = 0; i < 5; i++)
            Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        rig.Driver.Reset();
        Assert.Equal(5, rig.Msi[1].Triggers);
    }

    [Fact]
    public void EventIdx_InterruptsOnlyWhenUsedEventIsPassed_AndPublishesAvailEvent()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(rig.AllFeatures | VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        Assert.NotEqual(0UL, rig.Transport.NegotiatedFeatures & VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        var q = rig.Queues[0];
        q.AutoUsedEvent = false;       // this test sets used_event itself

        // used_event = 0: the first used buffer (index 0) passes it.
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Msi[1].WaitForTriggers(1, Wait.Timeout));
        Assert.True(Wait.Until(() => q.AvailEvent == 1), $"avail_event is {q.AvailEvent}, not 1");

        // used_event far ahead: no interrupts for the next two.
        q.UsedEvent = 0x4000;
        for (ushort i = 2; i <= 3; i++)
        {
            Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
            // avail_event is written after the interrupt decision: once it moves, the decision is made.
            Assert.True(Wait.Until(() => q.AvailEvent == i), $"avail_event is {q.AvailEvent}, not {i}");
        }
        Assert.Equal(1, rig.Msi[1].Triggers);

        // used_event = 3: the next used buffer (index 3) passes it.
        q.UsedEvent = 3;
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Msi[1].WaitForTriggers(2, Wait.Timeout), "passing used_event did not interrupt");
        Assert.True(Wait.Until(() => q.AvailEvent == 4));
        rig.Driver.Reset();
        Assert.Equal(2, rig.Msi[1].Triggers);
    }

    [Fact]
    public void EventIdx_BatchOfRequests_InterruptsOnce_WhenUsedEventNamesTheLast()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(rig.AllFeatures | VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        var q = rig.Queues[0];
        q.AutoUsedEvent = false;
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Msi[1].WaitForTriggers(1, Wait.Timeout));
        // Eight requests, published together; the driver wants to hear about the last only.
        q.UsedEvent = 8;
        var batch = Enumerable.Range(0, 8).Select(i => rig.Submit(Blk.Build(rig.Arena, TypeIn, (ulong)i, inLength: Sector), kick: i == 7)).ToList();
        Assert.True(rig.Msi[1].WaitForTriggers(2, Wait.Timeout), "passing used_event did not interrupt");
        Assert.Equal(9, q.UsedIdx);
        Assert.All(batch, r => Assert.Equal(StatusOk, r.Status(rig.Memory)));
        rig.Driver.Reset();
        Assert.Equal(2, rig.Msi[1].Triggers);
    }

    [Theory]
    [InlineData(false, 0)]
    [InlineData(false, 50)]
    [InlineData(true, 0)]
    [InlineData(true, 50)]
    public void ADriverThatNotifiesOnlyWhenAsked_IsNeverLeftWaiting(bool eventIdx, int pollMicroseconds)
    {
        // The driver kicks only when the device asks for it (NO_NOTIFY clear, or avail_event
        // passed): a device that stops looking at the ring after saying "don't notify" stalls it.
        using var rig = BlockRig.Create(1 << 20, queueSize: 32, pollTime: TimeSpan.FromMicroseconds(pollMicroseconds));
        ulong f = rig.AllFeatures & ~VirtioFeature.Bit(VirtioFeature.RingEventIdx);
        rig.Start(eventIdx ? f | VirtioFeature.Bit(VirtioFeature.RingEventIdx) : f);
        var q = rig.Queues[0];
        var rng = new Random(pollMicroseconds);
        for (int i = 0; i < 300; i++)
        {
            rig.Arena.Reset();
            int n = rng.Next(1, 4);
            var batch = Enumerable.Range(0, n)
                .Select(k => rig.Submit(Blk.Build(rig.Arena, TypeIn, (ulong)rng.Next(0, 2000), inLength: Sector), kick: k == n - 1))
                .ToList();
            Assert.True(q.WaitAllUsed(), $"batch {i} was not served (used {q.UsedIdx}, avail {q.AvailIdx}, flags {q.UsedFlags}, avail_event {q.AvailEvent})");
            Assert.Equal(n, q.TakeUsed().Count);
            Assert.All(batch, r => Assert.Equal(StatusOk, r.Status(rig.Memory)));
            if (i % 3 == 0)
                Thread.Yield();
        }
        // Idle, the device asks to be notified of the next chain.
        if (eventIdx)
            Assert.True(Wait.Until(() => q.AvailEvent == q.AvailIdx), $"avail_event {q.AvailEvent}, avail idx {q.AvailIdx}");
        else
            Assert.True(Wait.Until(() => q.UsedFlags == 0), "VIRTQ_USED_F_NO_NOTIFY stays set on an idle queue");
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void ResetWhileRequestsAreInFlight_StopsTheDevice_WhichThenLeavesTheOldRingsAlone_AndWorksAfterReinit()
    {
        using var rig = BlockRig.Create(8 << 20, queues: 2, queueSize: 128);
        var rng = new Random(3);
        for (int round = 0; round < 5; round++)
        {
            rig.Start();
            // Fill both queues with large writes and kick, then reset at once.
            for (int q = 0; q < 2; q++)
            {
                rig.Arenas[q].Reset();
                for (int i = 0; i < 100; i++)
                {
                    var data = new byte[16 * Sector];
                    rng.NextBytes(data);
                    rig.Submit(Blk.Build(rig.Arenas[q], TypeOut, (ulong)rng.Next(0, 16000), data, segments: 2), q, indirect: true, kick: i % 10 == 9);
                }
            }
            Assert.True(BlockRig.Within(() => rig.Driver.WriteStatus(0)), "reset did not return");
            Assert.Equal(0, rig.Driver.Status);

            // The device is stopped: the old used rings do not move any more, even when kicked and
            // while the device serves new rings elsewhere.
            var oldUsed = rig.Queues.Select(q => rig.Memory.GetSpan(q.Used, 4 + 8 * 128).ToArray()).ToArray();
            var oldQueues = rig.Queues;
            rig.Driver.Kick(0);
            rig.Driver.Kick(1);
            rig.Start(queueSize: 64, ringBase: 0x180000);
            var payload = new byte[2 * Sector];
            rng.NextBytes(payload);
            Assert.Equal(StatusOk, rig.Do(TypeOut, 10000, payload).Status(rig.Memory));
            var back = rig.Do(TypeIn, 10000, inLength: payload.Length, queue: 1);
            Assert.Equal(StatusOk, back.Status(rig.Memory));
            Assert.Equal(payload, back.ReadData(rig.Memory));
            rig.Driver.Reset();
            for (int q = 0; q < 2; q++)
                Assert.True(oldUsed[q].AsSpan().SequenceEqual(rig.Memory.GetSpan(oldQueues[q].Used, oldUsed[q].Length)),
                    $"round {round}: queue {q}'s old used ring changed after the reset");
        }
        Assert.Empty(rig.Log.WorkerFailures);
        Assert.Empty(rig.Log.NeedsResetMessages);
    }

    [Fact]
    public void DriverOk_ClearedAndSetAgain_DoesNotLeaveTheDeviceUnresettable()
    {
        // A driver must not clear status bits (2.1.2), but the guest is not trusted: whatever the
        // device makes of it, a later reset must return and the device must work after it.
        var rig = BlockRig.Create(1 << 20);
        bool clean = false;     // a device that failed here may have a worker nobody can stop: never dispose it then
        try
        {
            for (int i = 0; i < 20; i++)
            {
                rig.Start();
                Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
                rig.Driver.WriteStatus(Ack | Drv | FeatOk);
                rig.Driver.DriverOk();
                var r = rig.Submit(Blk.Build(rig.Arena, TypeIn, 1, inLength: Sector));
                // Either the request is served once, correctly, or the device asks for a reset.
                Assert.True(Wait.Until(() => rig.Queues[0].UsedIdx == 2 || (rig.Driver.Status & NeedsReset) != 0),
                    $"round {i}: neither served nor NEEDS_RESET: used idx {rig.Queues[0].UsedIdx}, status 0x{rig.Driver.Status:x2}");
                if ((rig.Driver.Status & NeedsReset) == 0)
                {
                    Assert.Equal(StatusOk, r.Status(rig.Memory));
                    Assert.Equal(2, rig.Queues[0].UsedIdx);
                }
                Assert.True(BlockRig.Within(() => rig.Driver.WriteStatus(0)),
                    $"round {i}: a reset after DRIVER_OK was cleared and set again never returned");
            }
            rig.Start();
            Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
            clean = true;
        }
        finally
        {
            if (clean)
                rig.Dispose();
            else
                rig.Abandon();
        }
    }

    [Fact]
    public void Intx_InterruptDisable_DeassertsTheLine_AndClearingItReassertsAPendingInterrupt()
    {
        // PCI 3.0, 6.2.2: the function asserts INTx# only while Interrupt Status is set and
        // Interrupt Disable is clear.
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(msix: false);
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        uint command = rig.Transport.ReadConfig(PciFunction.CommandRegister, 2);
        rig.Transport.WriteConfig(PciFunction.CommandRegister, 2, command | PciFunction.CommandInterruptDisable);
        Assert.False(rig.Intx.Level, "INTx stays asserted after Interrupt Disable was set");
        rig.Transport.WriteConfig(PciFunction.CommandRegister, 2, command & ~(uint)PciFunction.CommandInterruptDisable);
        Assert.True(rig.Intx.Level, "the pending interrupt is not asserted again when Interrupt Disable is cleared");
        Assert.Equal(1, rig.Driver.ReadIsr());
        Assert.False(rig.Intx.Level);
    }

    [Fact]
    public void Intx_PendingInterrupt_ShowsInTheStatusRegister()
    {
        // PCI 3.0, 6.2.3: Status bit 3 (Interrupt Status) reflects the function's INTx state.
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(msix: false);
        Assert.Equal(0u, rig.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusInterrupt);
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        Assert.Equal((uint)PciFunction.StatusInterrupt, rig.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusInterrupt);
        rig.Driver.ReadIsr();
        Assert.Equal(0u, rig.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusInterrupt);
    }

    [Fact]
    public void OnlyEnabledQueues_AreServed()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2, queueSize: 16);
        var d = rig.Driver;
        Assert.True(d.Negotiate(rig.AllFeatures));
        var q1 = d.SetupQueue(1, 16, BlockRig.RingBase + BlockRig.RingStride, 2);
        // Queue 0 gets rings but is never enabled.
        var q0 = new SplitQueue(rig.Memory, 16, BlockRig.RingBase);
        q0.Clear();
        d.Write16(QueueSelect, 0);
        d.Write64(QueueDesc, q0.Desc);
        d.Write64(QueueDriver, q0.Avail);
        d.Write64(QueueDevice, q0.Used);
        d.DriverOk();
        Assert.Equal(0, d.Status & NeedsReset);
        var r0 = Blk.Build(rig.Arenas[0], TypeIn, 0, inLength: Sector);
        q0.AddChain(r0.Buffers);
        d.Kick(0);
        var r1 = Blk.Build(rig.Arenas[1], TypeIn, 1, inLength: Sector);
        q1.AddChain(r1.Buffers);
        d.Kick(1);
        Assert.True(q1.WaitAllUsed());
        Assert.Equal(StatusOk, r1.Status(rig.Memory));
        d.Reset();                              // joins every worker there is
        Assert.Equal(0, q0.UsedIdx);
        Assert.Equal(Blk.NotWritten, r0.Status(rig.Memory));
    }

    [Fact]
    public void QueueAddresses_Accept64BitAccesses()
    {
        using var rig = BlockRig.Create(1 << 20);
        var d = rig.Driver;
        var q = new byte[8];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(q, 0x0000_0001_2345_6000);
        rig.Transport.WriteBar(0, QueueDevice, q);
        Assert.Equal(0x0000_0001_2345_6000UL, d.Read64(QueueDevice));
        var back = new byte[8];
        rig.Transport.ReadBar(0, QueueDevice, back);
        Assert.Equal(q, back);
        // A field written with the wrong width is left alone (4.1.3.1: the driver uses the field's width).
        rig.Transport.WriteBar(0, QueueSize, [0x08, 0, 0, 0]);
        Assert.Equal(rig.Block.MaxQueueSize, d.Read16(QueueSize));
    }

    [Fact]
    public void Dispose_AfterTheDriverBrokeAQueue_Returns()
    {
        var rig = BlockRig.Create(1 << 20);
        rig.Start();
        rig.Queues[0].WriteAvailSlot(0, 0xffff);
        rig.Queues[0].SetAvailIdx(1);
        rig.Driver.Kick(0);
        Assert.True(rig.Driver.WaitForStatusBits(NeedsReset));
        Assert.True(BlockRig.Within(rig.Dispose), "Dispose did not return");
    }

    [Fact]
    public void Dispose_StopsTheWorkers_AndReleasesTheVectors()
    {
        var rig = BlockRig.Create(1 << 20, queues: 2);
        rig.Start();
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        var vectors = rig.Msi.Vectors;
        Assert.True(BlockRig.Within(rig.Dispose), "Dispose did not return");
        Assert.All(vectors, v => Assert.True(v.Disposed));
    }
}
