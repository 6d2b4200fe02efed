using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Storage;
using static Kvm.Devices.Tests.VirtioDriver;
using static Kvm.Devices.Virtio.Block.VirtioBlock;

namespace Kvm.Devices.Tests;

/// <summary>
/// The machine a saved virtio-blk transport is restored into: guest RAM of its own holding a copy
/// of the saved machine's, a fresh virtio-blk device (on the saved one's image file unless told
/// otherwise), a fresh transport, and the driver carrying on with copies of its queues.
/// </summary>
public sealed class RestoredBlock : IDisposable
{
    private RestoredBlock(GuestMemory memory, VirtioBlock block, VirtioPciTransport transport, RecordingMsiController msi,
        LevelRecorder intx, RecordingLogger log)
    {
        Memory = memory;
        Block = block;
        Transport = transport;
        Msi = msi;
        Intx = intx;
        Log = log;
        // Buffers for requests made after the restore: away from the saved machine's arenas,
        // whose requests may still be in flight in the copied rings.
        Arena = new GuestArena(memory, BlockRig.DataBase + 0x100_0000, 0x40_0000);
    }

    public GuestMemory Memory { get; }
    public VirtioBlock Block { get; }
    public VirtioPciTransport Transport { get; }
    public RecordingMsiController Msi { get; }
    public LevelRecorder Intx { get; }
    public RecordingLogger Log { get; }
    public GuestArena Arena { get; }
    public SplitQueue[] Queues { get; private set; } = [];
    public VirtioDriver Driver => _driver ??= new VirtioDriver(Transport, Memory);
    private VirtioDriver? _driver;

    /// <summary>
    /// Builds the machine. The saved rig's device must be closed first (its image is locked while
    /// open): <see cref="BlockRig.CloseDevice"/>. <paramref name="image"/> replaces the rig's image
    /// file; <paramref name="bus"/> plugs the transport into a PCI bus as firmware would.
    /// </summary>
    public static RestoredBlock Create(BlockRig from, int? queues = null, ushort? queueSize = null, bool readOnly = false,
        IBlockImage? image = null, IIoEventRegistrar? ioevents = null, PciBus? bus = null)
    {
        var memory = GuestMemory.Create([(0, BlockRig.RamSize)]);
        memory.Write(0, from.Memory.GetSpan(0, (int)BlockRig.RamSize));
        image ??= DiskImage.Open(from.ImagePath, new ImageOpenOptions { ReadOnly = readOnly });
        var block = new VirtioBlock("virtio-blk-restored", image, new VirtioBlockOptions
        {
            Queues = queues ?? from.Block.QueueCount,
            QueueSize = queueSize ?? from.Block.MaxQueueSize,
        });
        var msi = new RecordingMsiController();
        var intx = new LevelRecorder();
        var log = new RecordingLogger();
        var transport = new VirtioPciTransport(block, memory, msi, intx, ioevents, log);
        bus?.Add(transport, interruptLine: 11);
        return new RestoredBlock(memory, block, transport, msi, intx, log)
        {
            Queues = from.Queues.Select(q => q.CopyOnto(memory)).ToArray(),
        };
    }

    /// <summary>Pauses the fresh transport, restores <paramref name="payload"/> into it and, if asked, resumes it.</summary>
    public void Restore(byte[] payload, bool resume = true)
    {
        Transport.Pause();
        StateBytes.Restore(Transport, payload, "virtio-blk0");
        if (resume)
            Transport.Resume();
    }

    /// <summary>Publishes a request and notifies the device if it asked for it, as Linux does.</summary>
    public BlkRequest Submit(BlkRequest request, int queue = 0, bool kick = true)
    {
        var q = Queues[queue];
        request.Head = q.AddChain(request.Buffers);
        if (kick && q.NeedsKick())
            Driver.Kick(queue);
        return request;
    }

    /// <summary>Runs one request to completion: exactly one new used element, naming it.</summary>
    public BlkRequest Do(uint type, ulong sector, ReadOnlySpan<byte> outData = default, int inLength = 0, int queue = 0)
    {
        var r = Submit(Blk.Build(Arena, type, sector, outData, inLength), queue);
        var q = Queues[queue];
        if (!q.WaitAllUsed())
            throw new TimeoutException($"queue {queue}: request not used after the restore; status 0x{Driver.Status:x2}");
        var e = Assert.Single(q.TakeUsed());
        Assert.Equal(r.Head, e.Id);
        return r;
    }

    public void Dispose()
    {
        Transport.Dispose();
        Memory.Dispose();
    }
}

/// <summary>
/// Pausing, saving and restoring the virtio PCI transport with virtio-blk behind it, driven by the
/// test's driver: the restored device continues the rings, the interrupts and the negotiation
/// where the saved one left them, and refuses a saved device the guest would find different.
/// </summary>
public sealed class TransportStateTests
{
    private const int Sector = 512;
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    private static byte[] Pattern(int seed, int length = Sector)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>Pauses the rig's transport, saves it, and closes its device (so its image can be opened again).</summary>
    private static byte[] PauseSaveClose(BlockRig rig)
    {
        rig.Transport.Pause();
        byte[] payload = StateBytes.Save(rig.Transport);
        rig.CloseDevice();
        return payload;
    }

    [Fact]
    public void Pause_WhileTheDriverKeepsSubmitting_StopsConsumingTheRing_AndResumeServesEveryRequestOnce()
    {
        using var rig = BlockRig.Create(1 << 20, queueSize: 64);
        rig.Start();
        var q = rig.Queues[0];
        var device = rig.Transport.Queues[0];
        var requests = new List<(BlkRequest Request, ulong Sector, byte[] Data)>();
        var used = new List<(uint Id, uint Length)>();
        int submitted = 0;
        int maxInFlight = 8;            // raised while paused, so the driver has room to publish more
        int cap = 100;                  // raised while paused too: a slow Pause must not find the driver done
        bool stop = false;
        Exception? failure = null;
        var submitter = new Thread(() =>
        {
            try
            {
                while (!Volatile.Read(ref stop))
                {
                    used.AddRange(q.TakeUsed());
                    if ((ushort)(q.AvailIdx - q.LastUsed) < Volatile.Read(ref maxInFlight) && submitted < Volatile.Read(ref cap))
                    {
                        ulong sector = (ulong)(submitted % 2048);
                        var data = Pattern(submitted);
                        requests.Add((rig.Submit(Blk.Build(rig.Arena, TypeOut, sector, data)), sector, data));
                        Volatile.Write(ref submitted, submitted + 1);
                    }
                    else
                        Thread.Yield();
                }
            }
            catch (Exception e)
            {
                failure = e;
            }
        }) { IsBackground = true, Name = "driver" };
        submitter.Start();
        try
        {
            Assert.True(Wait.Until(() => q.UsedIdx >= 40), "the device did not serve the first requests");
            rig.Transport.Pause();
            Assert.True(rig.Transport.Paused);
            // Nothing is in flight: every chain the device took is in the used ring.
            ushort consumed = device.Save().LastAvail;
            ushort usedAtPause = q.UsedIdx;
            Assert.Equal(consumed, usedAtPause);
            // The driver goes on publishing (and kicking): nothing more is taken or completed.
            int submittedAtPause = Volatile.Read(ref submitted);
            Volatile.Write(ref maxInFlight, 20);
            Volatile.Write(ref cap, 600);
            Assert.True(Wait.Until(() => Volatile.Read(ref submitted) >= submittedAtPause + 5),
                "the driver could not publish more requests while the device was paused");
            Thread.Sleep(Quiet);
            Assert.Equal(usedAtPause, q.UsedIdx);
            Assert.Equal(consumed, device.Save().LastAvail);
            Assert.True((ushort)(q.AvailIdx - usedAtPause) >= 5);

            rig.Transport.Resume();
            Assert.False(rig.Transport.Paused);
            Assert.True(Wait.Until(() => Volatile.Read(ref submitted) >= 200), "the device did not carry on after Resume");
        }
        finally
        {
            Volatile.Write(ref stop, true);
            submitter.Join();
        }
        Assert.Null(failure);
        Assert.True(q.WaitAllUsed(), "requests published while paused were not served after Resume");
        used.AddRange(q.TakeUsed());
        Thread.Sleep(50);
        Assert.Equal(q.AvailIdx, q.UsedIdx);                   // none served twice
        Assert.Equal(submitted, used.Count);
        Assert.Equal(requests.Count, used.Count);
        Assert.All(requests, r => Assert.Equal(StatusOk, r.Request.Status(rig.Memory)));
        // The last write to each sector is in the file.
        foreach (var g in requests.GroupBy(r => r.Sector))
            Assert.Equal(g.Last().Data, rig.ReadFile(g.Key * Sector, Sector));
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void Pause_FlushesTheImage_AndPauseAndResumeAreIdempotent()
    {
        using var memory = GuestMemory.Create([(0, 1UL << 20)]);
        var image = new MemoryImage(1 << 20);
        using var t = new VirtioPciTransport(new VirtioBlock("blk", image, new VirtioBlockOptions()), memory, null, null, null);
        Assert.False(t.Paused);
        t.Pause();
        Assert.Equal(1, image.Flushes);
        t.Pause();
        Assert.Equal(1, image.Flushes);
        t.Resume();
        t.Resume();
        Assert.False(t.Paused);
        t.Pause();
        Assert.Equal(2, image.Flushes);
    }

    [Fact]
    public void SaveState_OrRestoreState_OnAnUnpausedTransport_Throw()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start();
        Assert.Throws<InvalidOperationException>(() => StateBytes.Save(rig.Transport));
        rig.Transport.Pause();
        byte[] payload = StateBytes.Save(rig.Transport);
        rig.Transport.Resume();
        Assert.Throws<InvalidOperationException>(() => StateBytes.Restore(rig.Transport, payload));
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
    }

    [Fact]
    public void Restored_IntoAFreshTransport_ServesWhatWasPublishedWhilePaused_AndContinuesTheRings()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2, queueSize: 64);
        // Without EVENT_IDX every completion interrupts, so the interrupts are deterministic here
        // (suppression has a test of its own).
        rig.Start(rig.AllFeatures & ~VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        for (int i = 0; i < 5; i++)
        {
            Assert.Equal(StatusOk, rig.Do(TypeOut, (ulong)i, Pattern(i)).Status(rig.Memory));
            Assert.Equal(StatusOk, rig.Do(TypeOut, (ulong)(100 + i), Pattern(100 + i), queue: 1).Status(rig.Memory));
        }
        Assert.True(rig.Msi[1].WaitForTriggers(5, Wait.Timeout) && rig.Msi[2].WaitForTriggers(5, Wait.Timeout));
        Assert.Equal(0UL, rig.Transport.NegotiatedFeatures & VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        byte status = rig.Driver.Status;
        rig.Transport.Pause();
        // Published and kicked while paused: they wait in the rings.
        var p0 = rig.Submit(Blk.Build(rig.Arenas[0], TypeOut, 10, Pattern(10)));
        var p1 = rig.Submit(Blk.Build(rig.Arenas[1], TypeOut, 110, Pattern(110)), queue: 1);
        Thread.Sleep(50);
        Assert.Equal(5, rig.Queues[0].UsedIdx);
        Assert.Equal(5, rig.Queues[1].UsedIdx);
        byte[] payload = StateBytes.Save(rig.Transport);
        rig.CloseDevice();

        using var t = RestoredBlock.Create(rig);
        t.Restore(payload, resume: false);
        // Before the workers start: negotiation, queue setup and MSI-X routes are back.
        Assert.Equal(status, t.Driver.Status);
        Assert.Equal(rig.Transport.NegotiatedFeatures, t.Transport.NegotiatedFeatures);
        // Vectors 1 and 2 had been given their messages (they had interrupted): they get them again
        // at once. Vector 0 (configuration changes) never fired, so it gets it when it first does.
        Assert.Empty(rig.Msi[0].MessagesSet);
        Assert.Empty(t.Msi[0].MessagesSet);
        for (int v = 1; v < 3; v++)
            Assert.Equal([MessageFor(v)], t.Msi[v].MessagesSet);
        t.Driver.Write16(QueueSelect, 1);
        Assert.Equal(((ushort)64, (ushort)1, (ushort)2), (t.Driver.Read16(QueueSize), t.Driver.Read16(QueueEnable), t.Driver.Read16(QueueMsixVector)));
        Assert.Equal(t.Queues[1].Desc, t.Driver.Read64(QueueDesc));
        Thread.Sleep(50);
        Assert.Equal(5, t.Queues[0].UsedIdx);                    // paused: nothing served yet

        t.Transport.Resume();
        for (int q = 0; q < 2; q++)
        {
            Assert.True(t.Queues[q].WaitForUsedIdx(6), $"queue {q}: the chain published while paused was not served after the restore");
            var e = Assert.Single(t.Queues[q].TakeUsed());
            Assert.Equal((q == 0 ? p0 : p1).Head, e.Id);
            Assert.Equal(StatusOk, (q == 0 ? p0 : p1).Status(t.Memory));
        }
        // With the message the guest programmed.
        Assert.True(t.Msi[1].WaitForTriggers(1, Wait.Timeout) && t.Msi[2].WaitForTriggers(1, Wait.Timeout));
        Assert.Equal(MessageFor(1), t.Msi[1].Sent[0]);
        Assert.Equal(MessageFor(2), t.Msi[2].Sent[0]);

        // New requests complete, at the next used positions, once each.
        for (int i = 0; i < 20; i++)
        {
            Assert.Equal(StatusOk, t.Do(TypeOut, (ulong)(20 + i), Pattern(20 + i)).Status(t.Memory));
            Assert.Equal(StatusOk, t.Do(TypeOut, (ulong)(120 + i), Pattern(120 + i), queue: 1).Status(t.Memory));
            Assert.Equal(7 + i, t.Queues[0].UsedIdx);
            Assert.Equal(7 + i, t.Queues[1].UsedIdx);
        }
        var read = t.Do(TypeIn, 3, inLength: Sector);
        Assert.Equal(Pattern(3), read.ReadData(t.Memory));
        Thread.Sleep(50);
        Assert.Equal(t.Queues[0].AvailIdx, t.Queues[0].UsedIdx);
        Assert.Equal(t.Queues[1].AvailIdx, t.Queues[1].UsedIdx);

        // The saved machine's RAM was left alone: the restored device works in its own.
        Assert.Equal(5, rig.Queues[0].UsedIdx);
        Assert.Equal(5, rig.Queues[1].UsedIdx);
        t.Transport.Dispose();
        foreach (int s in new[] { 0, 4, 10, 20, 39, 100, 110, 139 })
            Assert.Equal(Pattern(s), rig.ReadFile((ulong)s * Sector, Sector));
        Assert.Empty(t.Log.WorkerFailures);
        Assert.Empty(t.Log.NeedsResetMessages);
    }

    /// <summary>
    /// A hand-over builds the new device while the old process still holds the image: the device
    /// stands on a <see cref="PendingImage"/>, paused, until the old one has closed the image; then
    /// the image goes under it, the state is restored, and the request the driver published while
    /// paused is served from and into the real image.
    /// </summary>
    [Fact]
    public void Built_BeforeItsImageCanBeOpened_TakesTheImageWhilePaused_AndCarriesOn()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start();
        for (int i = 0; i < 4; i++)
            Assert.Equal(StatusOk, rig.Do(TypeOut, (ulong)i, Pattern(i)).Status(rig.Memory));
        rig.Transport.Pause();
        var pending = rig.Submit(Blk.Build(rig.Arena, TypeIn, 2, inLength: Sector));
        byte[] payload = StateBytes.Save(rig.Transport);
        // Built while the old device still holds the image.
        using var t = RestoredBlock.Create(rig, image: new PendingImage(rig.ImagePath, readOnly: false));
        t.Transport.Pause();
        Assert.Equal(60, t.Block.ConfigSize);
        var e = Assert.Throws<InvalidOperationException>(() => t.Block.Capacity);
        Assert.Contains(rig.ImagePath, e.Message, StringComparison.Ordinal);
        rig.CloseDevice();

        var old = t.Block.ReplaceImage(DiskImage.Open(rig.ImagePath, new ImageOpenOptions { Exclusive = true }));
        Assert.IsType<PendingImage>(old);
        Assert.Equal(rig.Block.Capacity, t.Block.Capacity);
        StateBytes.Restore(t.Transport, payload, "virtio-blk0");
        t.Transport.Resume();
        Assert.True(t.Queues[0].WaitForUsedIdx(5), "the request published while paused was not served after the image came");
        Assert.Equal(pending.Head, Assert.Single(t.Queues[0].TakeUsed()).Id);
        Assert.Equal(StatusOk, pending.Status(t.Memory));
        Assert.Equal(Pattern(2), pending.ReadData(t.Memory));
        Assert.Equal(StatusOk, t.Do(TypeOut, 9, Pattern(9)).Status(t.Memory));
        t.Transport.Dispose();
        Assert.Equal(Pattern(9), rig.ReadFile(9 * Sector, Sector));
        Assert.Empty(t.Log.WorkerFailures);
    }

    /// <summary>An image the guest could tell from the one it has is refused, and the device keeps its own.</summary>
    [Fact]
    public void ReplaceImage_RefusesAnotherSizeOrReadOnlyFlag()
    {
        using var block = new VirtioBlock("blk", new MemoryImage(1 << 20), new VirtioBlockOptions());
        var bigger = Assert.Throws<DeviceStateException>(() => block.ReplaceImage(new MemoryImage(2 << 20)));
        Assert.Contains("4096 sectors", bigger.Message, StringComparison.Ordinal);
        var readOnly = Assert.Throws<DeviceStateException>(() => block.ReplaceImage(new MemoryImage(1 << 20, readOnly: true)));
        Assert.Contains("read-only", readOnly.Message, StringComparison.Ordinal);
        Assert.Equal((ulong)(1 << 20) / Sector, block.Capacity);
        var same = new MemoryImage(1 << 20);
        Assert.IsType<MemoryImage>(block.ReplaceImage(same));
        Assert.Same(same, block.Image);
    }

    [Fact]
    public void Restored_EventIdxSuppression_CarriesOn()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(rig.AllFeatures | VirtioFeature.Bit(VirtioFeature.RingEventIdx));
        var q = rig.Queues[0];
        q.AutoUsedEvent = false;
        q.UsedEvent = 0x4000;                                  // the driver wants no interrupt for a while
        for (int i = 0; i < 3; i++)
            rig.Do(TypeIn, (ulong)i, inLength: Sector);
        Assert.True(Wait.Until(() => q.AvailEvent == 3), "the device did not finish its decisions");
        // Only the first completion interrupted: a device that has signalled nothing yet always does.
        Assert.Equal(1, rig.Msi[1].Triggers);
        byte[] payload = PauseSaveClose(rig);

        using var t = RestoredBlock.Create(rig);
        t.Restore(payload);
        var tq = t.Queues[0];
        for (int i = 0; i < 3; i++)
            t.Do(TypeIn, (ulong)i, inLength: Sector);
        Assert.True(Wait.Until(() => tq.AvailEvent == 6), $"avail_event is {tq.AvailEvent}, not 6");
        // used_event 0x4000 is still ahead: a restore that forgot what the device had signalled
        // interrupts at once, as a fresh device does.
        Assert.Equal(0, t.Msi[1].Triggers);
        tq.UsedEvent = 6;
        t.Do(TypeIn, 0, inLength: Sector);                     // used 6 -> 7 passes it
        Assert.True(t.Msi[1].WaitForTriggers(1, Wait.Timeout), "passing used_event did not interrupt after the restore");
        Assert.Equal(MessageFor(1), t.Msi[1].Sent[0]);
        Assert.True(Wait.Until(() => tq.AvailEvent == 7));
        Assert.Equal(1, t.Msi[1].Triggers);
    }

    [Fact]
    public void Restored_IntxLevelAndIsr_CarryOver()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(msix: false);
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: Sector).Status(rig.Memory));
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        byte[] payload = PauseSaveClose(rig);                  // the driver has not read the ISR

        using var t = RestoredBlock.Create(rig);
        Assert.Empty(t.Intx.Levels);
        t.Restore(payload, resume: false);
        Assert.Equal([true], t.Intx.Levels);                   // driven at restore, before any worker runs
        Assert.NotEqual(0u, t.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusInterrupt);
        Assert.Equal(1, t.Driver.ReadIsr());
        Assert.False(t.Intx.Level);
        Assert.Equal(0, t.Driver.ReadIsr());

        t.Transport.Resume();
        Assert.Equal(StatusOk, t.Do(TypeIn, 1, inLength: Sector).Status(t.Memory));
        Assert.True(t.Intx.WaitForLevel(true, Wait.Timeout));
        Assert.Equal(1, t.Driver.ReadIsr());
        Assert.Equal(0, t.Msi.TotalTriggers);
    }

    [Fact]
    public void Restored_IntxWithInterruptDisable_StaysLow_UntilTheGuestClearsIt()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(msix: false);
        rig.Do(TypeIn, 0, inLength: Sector);
        Assert.True(rig.Intx.WaitForLevel(true, Wait.Timeout));
        rig.Transport.WriteConfig(PciFunction.CommandRegister, 2, PciFunction.CommandInterruptDisable);
        Assert.False(rig.Intx.Level);
        byte[] payload = PauseSaveClose(rig);

        using var t = RestoredBlock.Create(rig);
        t.Restore(payload);
        Assert.Empty(t.Intx.Levels);
        Assert.True(t.Transport.InterruptDisabled);
        t.Transport.WriteConfig(PciFunction.CommandRegister, 2, 0);
        Assert.Equal([true], t.Intx.Levels);
    }

    [Fact]
    public void Restored_BindsTheNotifyAddressesWhereTheGuestMovedBar0_AndKicksThroughTheBusReachIt()
    {
        const ulong Window = 0xc000_0000, WindowSize = 0x1000_0000, Moved = 0xd000_0000;
        using var rig = BlockRig.Create(1 << 20, queues: 2);
        var busA = new PciBus(new IoBus("mmio-a"), Window, WindowSize);
        busA.Add(rig.Transport, interruptLine: 11);
        rig.Transport.WriteConfig(PciFunction.FirstBarRegister, 4, (uint)Moved);
        rig.Transport.WriteConfig(PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace | PciFunction.CommandBusMaster);
        rig.Start();
        rig.Do(TypeIn, 0, inLength: Sector);
        byte[] payload = PauseSaveClose(rig);

        var io = new RecordingIoEvents();
        var mmioB = new IoBus("mmio-b");
        var busB = new PciBus(mmioB, Window, WindowSize);
        using var t = RestoredBlock.Create(rig, ioevents: io, bus: busB);
        Assert.Empty(io.Calls);                                // firmware left decoding off
        t.Restore(payload);
        Assert.Equal(Moved, t.Transport.GetMappedAddress(0));
        Assert.Equal(new[] { (true, Moved + 0x3000, 2u), (true, Moved + 0x3004, 2u) }, io.Calls);

        // The fake registrar binds nothing in a kernel, so a notification written through the bus
        // at the moved address arrives as an MMIO exit, which must reach the restored device.
        var r = t.Submit(Blk.Build(t.Arena, TypeIn, 0, inLength: Sector), kick: false);
        Assert.True(mmioB.Write(Moved + 0x3000, [0, 0], 0));
        Assert.True(t.Queues[0].WaitAllUsed(), "a kick at the moved notify address was not served");
        Assert.Equal(r.Head, Assert.Single(t.Queues[0].TakeUsed()).Id);
        Assert.Equal(1, t.Transport.NotificationsByExit);
        // The MSI-X table's BAR decodes where it was, too.
        ulong msixBar = t.Transport.GetBarAddress(VirtioPciTransport.MsixBar);
        var entry = new byte[4];
        Assert.True(mmioB.Read(msixBar + 8, entry, 0));
        Assert.Equal(MessageFor(0).Data, BitConverter.ToUInt32(entry));
    }

    [Fact]
    public void Restored_NeverStartedTransport_CanBeInitialisedByTheDriver()
    {
        using var a = BlockRig.Create(1 << 20);
        a.Transport.Pause();
        byte[] payload = StateBytes.Save(a.Transport);
        using var b = BlockRig.Create(1 << 20, seed: 2);
        b.Transport.Pause();
        StateBytes.Restore(b.Transport, payload);
        b.Transport.Resume();
        b.Start();
        Assert.Equal(StatusOk, b.Do(TypeIn, 0, inLength: Sector).Status(b.Memory));
    }

    [Fact]
    public void Restore_WithAnotherQueueCount_IsRefused()
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2);
        rig.Start();
        byte[] payload = PauseSaveClose(rig);
        using var t = RestoredBlock.Create(rig, queues: 1);
        var e = Assert.Throws<DeviceStateException>(() => t.Restore(payload));
        Assert.Contains("2 queues", e.Message);
    }

    [Fact]
    public void Restore_WithDriverFeaturesTheDeviceDoesNotOffer_IsRefused()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start();                                           // a writable disk: DISCARD and WRITE_ZEROES accepted
        Assert.NotEqual(0UL, rig.Transport.NegotiatedFeatures & (1UL << FeatureDiscard));
        byte[] payload = PauseSaveClose(rig);
        using var t = RestoredBlock.Create(rig, readOnly: true);
        var e = Assert.Throws<DeviceStateException>(() => t.Restore(payload));
        Assert.Contains("does not offer", e.Message);
        Assert.Contains($"0x{(1UL << FeatureDiscard) | (1UL << FeatureWriteZeroes):x}", e.Message);
    }

    [Fact]
    public void Restore_WithAQueueLargerThanTheDevicesMaximum_IsRefused()
    {
        using var rig = BlockRig.Create(1 << 20, queueSize: 128);
        rig.Start();
        byte[] payload = PauseSaveClose(rig);
        using var t = RestoredBlock.Create(rig, queueSize: 64);
        var e = Assert.Throws<DeviceStateException>(() => t.Restore(payload));
        Assert.Contains("128", e.Message);
        Assert.Contains("64", e.Message);
    }

    [Fact]
    public void Restore_OfADiskWithAnotherCapacity_IsRefused()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start();
        byte[] payload = PauseSaveClose(rig);
        using var t = RestoredBlock.Create(rig, image: new MemoryImage(2 << 20));
        var e = Assert.Throws<DeviceStateException>(() => t.Restore(payload));
        Assert.Contains("sectors", e.Message);
    }

    [Fact]
    public void Restore_OfAQueueWhoseRingsAreNotInThisMachinesRam_IsRefused()
    {
        using var rig = BlockRig.Create(1 << 20);
        rig.Start(ringBase: BlockRig.RamSize - 0x4000);        // the rings at the top of RAM
        byte[] payload = PauseSaveClose(rig);
        using var small = GuestMemory.Create([(0, BlockRig.RamSize / 2)]);
        using var t = new VirtioPciTransport(new VirtioBlock("small", new MemoryImage(1 << 20), new VirtioBlockOptions { QueueSize = 128 }),
            small, null, null, null);
        t.Pause();
        var e = Assert.Throws<DeviceStateException>(() => StateBytes.Restore(t, payload));
        Assert.Contains("outside guest RAM", e.Message);
    }
}
