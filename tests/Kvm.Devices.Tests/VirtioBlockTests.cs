using System.Buffers.Binary;
using System.Text;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Block;
using Kvm.Storage;
using static Kvm.Devices.Virtio.Block.VirtioBlock;

namespace Kvm.Devices.Tests;

/// <summary>virtio-blk (virtio 1.2, 5.2) driven through the PCI transport by the test driver, on real image files.</summary>
public sealed class VirtioBlockTests
{
    private const int Sector = 512;

    private static byte[] RandomBytes(Random rng, int n)
    {
        var b = new byte[n];
        rng.NextBytes(b);
        return b;
    }

    [Fact]
    public void Writes_ThenReads_RoundTripThroughTheImageFile()
    {
        using var rig = BlockRig.Create(diskBytes: 4 << 20);
        rig.Start();
        var rng = new Random(7);
        var written = new List<(ulong Sector, byte[] Data)>();
        for (int i = 0; i < 12; i++)
        {
            ulong sector = (ulong)rng.Next(0, (int)(rig.DiskBytes / Sector) - 64);
            var data = RandomBytes(rng, Sector * rng.Next(1, 64));
            var w = rig.Do(TypeOut, sector, data, segments: 1 + i % 4);
            Assert.Equal(StatusOk, w.Status(rig.Memory));
            Assert.Equal(1u, rig.LastUsedLength);   // only the status byte was written into the chain
            // The bytes are in the file, where the sector says.
            Assert.Equal(data, rig.ReadFile(sector * Sector, data.Length));
            written.Add((sector, data));
        }
        // Read each back through the device, in another segmentation; later writes win where they overlap.
        var expected = rig.ReadFile(0, (int)rig.DiskBytes);
        foreach (var (sector, data) in written)
        {
            var r = rig.Do(TypeIn, sector, inLength: data.Length, segments: 3);
            Assert.Equal(StatusOk, r.Status(rig.Memory));
            Assert.Equal((uint)data.Length + 1, rig.LastUsedLength);
            Assert.Equal(expected.AsSpan((int)(sector * Sector), data.Length).ToArray(), r.ReadData(rig.Memory));
        }
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void Read_ReturnsTheFileContent_ForEverySegmentationAndLayout()
    {
        using var rig = BlockRig.Create(diskBytes: 2 << 20, seed: 3);
        rig.Start();
        var file = rig.ReadFile(0, (int)rig.DiskBytes);
        int n = 0;
        foreach (int segments in new[] { 1, 2, 7, 16 })
        foreach (bool split in new[] { false, true })
        foreach (bool indirect in new[] { false, true })
        {
            ulong sector = (ulong)(n++ * 37);
            int length = Sector * (segments + 3);
            var r = rig.Do(TypeIn, sector, inLength: length, segments: segments, splitHeader: split, indirect: indirect);
            Assert.Equal(StatusOk, r.Status(rig.Memory));
            Assert.Equal(file.AsSpan((int)sector * Sector, length).ToArray(), r.ReadData(rig.Memory));
        }
    }

    [Fact]
    public void Write_ThroughIndirectDescriptors_WithSplitHeader_LandsInTheFile()
    {
        using var rig = BlockRig.Create(diskBytes: 2 << 20);
        rig.Start();
        var data = RandomBytes(new Random(11), 9 * Sector);
        var w = Blk.Build(rig.Arena, TypeOut, 100, data, segments: 5, splitHeader: true);
        Assert.Equal(2 + 5 + 1, w.Buffers.Count);
        rig.Run(w, indirect: true);
        Assert.Equal(StatusOk, w.Status(rig.Memory));
        Assert.Equal(data, rig.ReadFile(100 * Sector, data.Length));
    }

    [Fact]
    public void Read_WithTheStatusByteInTheLastDataBuffer_KeepsTheDataBeforeIt()
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var r = Blk.Build(rig.Arena, TypeIn, 5, inLength: 2 * Sector, segments: 2, statusWithData: true);
        uint len = rig.Run(r);
        Assert.Equal(StatusOk, r.Status(rig.Memory));
        Assert.Equal(2u * Sector + 1, len);
        Assert.Equal(rig.ReadFile(5 * Sector, 2 * Sector), r.ReadData(rig.Memory));
    }

    [Fact]
    public void Flush_CompletesOk_AndKeepsEarlierWrites()
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var data = RandomBytes(new Random(5), 4 * Sector);
        Assert.Equal(StatusOk, rig.Do(TypeOut, 8, data).Status(rig.Memory));
        var f = rig.Do(TypeFlush, 0);
        Assert.Equal(StatusOk, f.Status(rig.Memory));
        Assert.Equal(1u, rig.LastUsedLength);
        Assert.Equal(data, rig.ReadFile(8 * Sector, data.Length));
    }

    [Theory]
    [InlineData(TypeIn, false)]
    [InlineData(TypeIn, true)]
    [InlineData(TypeOut, false)]
    [InlineData(TypeGetId, true)]
    public void Requests_MarkThePagesTheDeviceWrites_AndNoOthers(uint type, bool eventIdx)
    {
        // The driver writes through a mapping of its own, so the device's bitmap holds the
        // device's writes only: data read into the buffers (IN, GET_ID), the status byte, and the
        // used ring (element, index, notification fields). KVM's dirty log would see none of them.
        using var rig = BlockRig.Create(diskBytes: 1 << 20, seed: 9, serial: "dirty-test", driverMapping: true);
        rig.Memory.TrackDeviceWrites = true;
        ulong features = rig.AllFeatures;
        if (!eventIdx)
            features &= ~VirtioFeature.Bit(VirtioFeature.RingEventIdx);
        rig.Start(features);
        Assert.All(rig.Memory.TakeDeviceDirty(), b => Assert.Equal(0, b.CountDirty()));

        // Data in three segments of 5 KiB, each straddling page boundaries.
        int length = type == TypeGetId ? GetIdLength : 30 * Sector;
        var data = type == TypeOut ? RandomBytes(new Random(4), length) : default;
        var r = Blk.Build(rig.Arena, type, 16, data, inLength: type == TypeOut ? 0 : length, segments: type == TypeGetId ? 1 : 3);
        rig.Run(r);
        Assert.Equal(StatusOk, r.Status(rig.Memory));
        if (type == TypeIn)
            Assert.Equal(rig.ReadFile(16 * Sector, length), r.ReadData(rig.Memory));

        static IEnumerable<ulong> PagesOf(ulong address, ulong length) =>
            length == 0 ? [] : Enumerable.Range(0, (int)((address + length - 1) / 4096 - address / 4096 + 1)).Select(i => (address / 4096 + (ulong)i) * 4096);
        var expected = new SortedSet<ulong>(PagesOf(r.StatusAddress, 1)) { rig.Queues[0].Used & ~4095UL };
        if (type != TypeOut)
            foreach (var d in r.Data)
                expected.UnionWith(PagesOf(d.Address, d.Length));
        var dirty = rig.Memory.TakeDeviceDirty().SelectMany(b => b.DirtyAddresses()).ToArray();
        Assert.Equal(expected, dirty);
        if (type != TypeGetId)
            Assert.All(r.Data, d => Assert.NotEqual(d.Address / 4096, (d.Address + d.Length - 1) / 4096)); // each segment straddles pages
    }

    [Theory]
    [InlineData("sn-0123")]
    [InlineData("ABCDEFGHIJKLMNOPQRST")]   // exactly 20 bytes: no terminator
    [InlineData("")]
    public void GetId_ReturnsTheSerial_ZeroPaddedTo20Bytes(string serial)
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20, serial: serial);
        rig.Start();
        var r = rig.Do(TypeGetId, 0, inLength: 20);
        Assert.Equal(StatusOk, r.Status(rig.Memory));
        var expected = new byte[20];
        Encoding.ASCII.GetBytes(serial, expected);
        Assert.Equal(expected, r.ReadData(rig.Memory));
        Assert.Equal(21u, rig.LastUsedLength);
    }

    [Theory]
    [InlineData(TypeDiscard)]
    [InlineData(TypeWriteZeroes)]
    public void DiscardAndWriteZeroes_ReadBackAsZeros_AndLeaveNeighboursAlone(uint type)
    {
        using var rig = BlockRig.Create(diskBytes: 2 << 20, seed: 9);
        rig.Start();
        var before = rig.ReadFile(0, (int)rig.DiskBytes);
        // Two ranges, one of them not aligned to anything larger than a sector.
        var payload = Blk.Segments((64, 16, 0), (301, 3, type == TypeWriteZeroes ? 1u : 0u));
        var r = rig.Do(type, 0, payload);
        Assert.Equal(StatusOk, r.Status(rig.Memory));

        var after = rig.ReadFile(0, (int)rig.DiskBytes);
        var expected = (byte[])before.Clone();
        Array.Clear(expected, 64 * Sector, 16 * Sector);
        Array.Clear(expected, 301 * Sector, 3 * Sector);
        Assert.True(expected.AsSpan().SequenceEqual(after), "only the named sectors may change, and they must read as zeros");

        // And the device reads them back as zeros too.
        var read = rig.Do(TypeIn, 300, inLength: 5 * Sector);
        Assert.Equal(expected.AsSpan(300 * Sector, 5 * Sector).ToArray(), read.ReadData(rig.Memory));
    }

    [Theory]
    [InlineData(TypeDiscard, 1u)]      // UNMAP is not a discard flag
    [InlineData(TypeDiscard, 2u)]
    [InlineData(TypeWriteZeroes, 2u)]  // unknown flag
    public void DiscardAndWriteZeroes_WithUnknownFlags_AreUnsupported_AndChangeNothing(uint type, uint flags)
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var hash = rig.FileHash();
        var r = rig.Do(type, 0, Blk.Segments((10, 4, 0), (20, 4, flags)));
        Assert.Equal(StatusUnsupported, r.Status(rig.Memory));
        Assert.Equal(hash, rig.FileHash());
    }

    [Theory]
    [InlineData(TypeDiscard)]
    [InlineData(TypeWriteZeroes)]
    public void DiscardAndWriteZeroes_PastCapacity_FailWithIoErr_BeforeTouchingAnyRange(uint type)
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var hash = rig.FileHash();
        ulong cap = rig.DiskBytes / Sector;
        // The first range is fine; the second runs one sector past the end.
        var r = rig.Do(type, 0, Blk.Segments((0, 8, 0), (cap - 4, 5, 0)));
        Assert.Equal(StatusIoErr, r.Status(rig.Memory));
        Assert.Equal(hash, rig.FileHash());
    }

    [Theory]
    [InlineData(TypeIn)]
    [InlineData(TypeOut)]
    public void Requests_PastCapacity_FailWithIoErr_AndMoveNoData(uint type)
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var hash = rig.FileHash();
        ulong cap = rig.DiskBytes / Sector;
        foreach (var (sector, sectors) in new[] { (cap - 1, 2), (cap, 1), (cap + 100, 1), (ulong.MaxValue, 1), (ulong.MaxValue / Sector + 1, 1) })
        {
            var r = type == TypeIn
                ? rig.Do(type, sector, inLength: sectors * Sector)
                : rig.Do(type, sector, new byte[sectors * Sector]);
            Assert.Equal(StatusIoErr, r.Status(rig.Memory));
            Assert.Equal(1u, rig.LastUsedLength);
            if (type == TypeIn)
                Assert.All(r.ReadData(rig.Memory), b => Assert.Equal(0xcc, b));   // the buffer is as the driver left it
        }
        Assert.Equal(hash, rig.FileHash());

        // The last sector itself is fine.
        var ok = type == TypeIn ? rig.Do(type, cap - 1, inLength: Sector) : rig.Do(type, cap - 1, new byte[Sector]);
        Assert.Equal(StatusOk, ok.Status(rig.Memory));
    }

    [Theory]
    [InlineData(TypeIn, 511)]
    [InlineData(TypeIn, 513)]
    [InlineData(TypeOut, 100)]
    [InlineData(TypeOut, 1000)]
    public void Requests_WithALengthThatIsNotWholeSectors_FailWithIoErr(uint type, int length)
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var hash = rig.FileHash();
        var r = type == TypeIn ? rig.Do(type, 4, inLength: length) : rig.Do(type, 4, new byte[length]);
        Assert.Equal(StatusIoErr, r.Status(rig.Memory));
        Assert.Equal(hash, rig.FileHash());
    }

    [Theory]
    [InlineData(2u)]       // VIRTIO_BLK_T_SCSI_CMD (legacy)
    [InlineData(10u)]      // GET_LIFETIME, not offered
    [InlineData(14u)]      // SECURE_ERASE, not offered
    [InlineData(0xdeadbeefu)]
    public void UnknownRequestTypes_CompleteWithUnsupp(uint type)
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20);
        rig.Start();
        var hash = rig.FileHash();
        var r = rig.Do(type, 0, inLength: Sector);
        Assert.Equal(StatusUnsupported, r.Status(rig.Memory));
        Assert.Equal(1u, rig.LastUsedLength);
        Assert.Equal(hash, rig.FileHash());
        Assert.Equal(0, rig.Driver.Status & VirtioStatus.DeviceNeedsReset);
    }

    [Fact]
    public void ReadOnlyImage_RefusesEveryWrite_WithIoErr_AndTheFileStaysTheSame()
    {
        using var rig = BlockRig.Create(diskBytes: 1 << 20, readOnly: true);
        Assert.NotEqual(0UL, rig.AllFeatures & (1UL << FeatureRo));
        Assert.Equal(0UL, rig.AllFeatures & (1UL << FeatureDiscard | 1UL << FeatureWriteZeroes));
        rig.Start();
        var hash = rig.FileHash();
        Assert.Equal(StatusIoErr, rig.Do(TypeOut, 0, new byte[4 * Sector]).Status(rig.Memory));
        Assert.Equal(StatusIoErr, rig.Do(TypeDiscard, 0, Blk.Segments((0, 8, 0))).Status(rig.Memory));
        Assert.Equal(StatusIoErr, rig.Do(TypeWriteZeroes, 0, Blk.Segments((0, 8, 1))).Status(rig.Memory));
        // Reads and flushes still work.
        var r = rig.Do(TypeIn, 0, inLength: 4 * Sector);
        Assert.Equal(StatusOk, r.Status(rig.Memory));
        Assert.Equal(rig.ReadFile(0, 4 * Sector), r.ReadData(rig.Memory));
        Assert.Equal(StatusOk, rig.Do(TypeFlush, 0).Status(rig.Memory));
        Assert.Equal(hash, rig.FileHash());
    }

    [Fact]
    public void Config_DescribesTheDisk()
    {
        using var rig = BlockRig.Create(diskBytes: (3 << 20) + 700, queues: 3, queueSize: 64);
        var c = new byte[60];
        rig.Driver.ReadDeviceConfig(0, c);
        Assert.Equal(rig.DiskBytes / Sector, BinaryPrimitives.ReadUInt64LittleEndian(c));    // capacity, whole sectors
        Assert.Equal(62u, BinaryPrimitives.ReadUInt32LittleEndian(c.AsSpan(12)));             // seg_max = queue size - 2
        Assert.Equal(512u, BinaryPrimitives.ReadUInt32LittleEndian(c.AsSpan(20)));            // blk_size
        Assert.Equal(3, BinaryPrimitives.ReadUInt16LittleEndian(c.AsSpan(34)));               // num_queues
        Assert.Equal(3, rig.Driver.Read16(VirtioDriver.NumQueues));
        ulong f = rig.AllFeatures;
        foreach (int bit in new[] { FeatureFlush, FeatureBlkSize, FeatureMq, FeatureDiscard, FeatureWriteZeroes, FeatureSegMax })
            Assert.True((f & (1UL << bit)) != 0, $"feature {bit} is offered");
        Assert.True((f & (1UL << VirtioFeature.Version1)) != 0);
    }

    [Fact]
    public void MultiQueue_FourQueuesDrivenFromFourThreads_AllDataCorrect()
    {
        const int queues = 4, perQueue = 40, span = 256;    // each queue owns its own span of sectors
        using var rig = BlockRig.Create(diskBytes: queues * span * Sector, queues: queues, queueSize: 32);
        rig.Start();
        var errors = new List<string>();
        var threads = Enumerable.Range(0, queues).Select(q => new Thread(() =>
        {
            try
            {
                var rng = new Random(100 + q);
                var mine = RandomBytes(rng, span * Sector);
                var arena = rig.Arenas[q];
                var first = rig.Submit(Blk.Build(arena, TypeOut, (ulong)(q * span), mine, segments: 3), q);
                if (!rig.Queues[q].WaitAllUsed() || first.Status(rig.Memory) != StatusOk)
                    throw new InvalidOperationException($"queue {q}: the first write failed");
                rig.Queues[q].TakeUsed();
                for (int i = 0; i < perQueue; i++)
                {
                    arena.Reset();
                    // A batch of writes in flight at once, then one read of the whole span.
                    var batch = new List<(BlkRequest R, int Sector, byte[] Data)>();
                    for (int k = 0; k < 4; k++)
                    {
                        int s = rng.Next(0, span - 8);
                        var data = RandomBytes(rng, Sector * rng.Next(1, 8));
                        batch.Add((rig.Submit(Blk.Build(arena, TypeOut, (ulong)(q * span + s), data, segments: 2), q, kick: k == 3), s, data));
                    }
                    if (!rig.Queues[q].WaitAllUsed())
                        throw new TimeoutException($"queue {q} batch {i} not used");
                    rig.Queues[q].TakeUsed();
                    foreach (var (r, s, data) in batch)
                    {
                        if (r.Status(rig.Memory) != StatusOk)
                            throw new InvalidOperationException($"queue {q}: write status {r.Status(rig.Memory)}");
                        data.CopyTo(mine, s * Sector);      // in submission order: the device serves a queue in order
                    }
                    var read = rig.Submit(Blk.Build(arena, TypeIn, (ulong)(q * span), inLength: span * Sector, segments: 4), q);
                    if (!rig.Queues[q].WaitAllUsed())
                        throw new TimeoutException($"queue {q} read {i} not used");
                    rig.Queues[q].TakeUsed();
                    if (read.Status(rig.Memory) != StatusOk || !read.ReadData(rig.Memory).AsSpan().SequenceEqual(mine.AsSpan()))
                        throw new InvalidOperationException($"queue {q}: read {i} does not match what this queue wrote");
                }
                if (!rig.ReadFile((ulong)(q * span * Sector), mine.Length).AsSpan().SequenceEqual(mine))
                    throw new InvalidOperationException($"queue {q}: the file does not hold what this queue wrote");
            }
            catch (Exception e)
            {
                lock (errors)
                    errors.Add(e.Message);
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        Assert.Empty(errors);
        // Every queue interrupted its own vector.
        for (int q = 0; q < queues; q++)
            Assert.True(rig.Msi[q + 1].Triggers > 0, $"queue {q} never triggered vector {q + 1}");
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void Qcow2Image_HoldsWhatTheDeviceWrote_AfterReopening()
    {
        const int size = 2 << 20;
        using var rig = BlockRig.Create(size, format: "qcow2", seed: 4);
        var content = new byte[size];
        new Random(4).NextBytes(content);         // what the rig wrote into the new image
        rig.Start();
        var first = rig.Do(TypeIn, 0, inLength: 8 * Sector);
        Assert.Equal(StatusOk, first.Status(rig.Memory));
        Assert.Equal(content.AsSpan(0, 8 * Sector).ToArray(), first.ReadData(rig.Memory));

        var rng = new Random(8);
        for (int i = 0; i < 10; i++)
        {
            int sector = rng.Next(0, size / Sector - 40);
            var data = RandomBytes(rng, Sector * rng.Next(1, 40));
            Assert.Equal(StatusOk, rig.Do(TypeOut, (ulong)sector, data, segments: 3).Status(rig.Memory));
            data.CopyTo(content, sector * Sector);
        }
        Assert.Equal(StatusOk, rig.Do(TypeWriteZeroes, 0, Blk.Segments((17, 9, 0), (2000, 100, 1))).Status(rig.Memory));
        Assert.Equal(StatusOk, rig.Do(TypeDiscard, 0, Blk.Segments((1024, 256, 0))).Status(rig.Memory));
        Array.Clear(content, 17 * Sector, 9 * Sector);
        Array.Clear(content, 2000 * Sector, 100 * Sector);
        Array.Clear(content, 1024 * Sector, 256 * Sector);   // a version 3 image records discarded clusters as zero
        Assert.Equal(StatusOk, rig.Do(TypeFlush, 0).Status(rig.Memory));

        rig.CloseDevice();
        using var image = DiskImage.Open(rig.ImagePath, new ImageOpenOptions { ReadOnly = true });
        var back = new byte[size];
        image.Read(0, back);
        Assert.True(content.AsSpan().SequenceEqual(back), $"the reopened image differs from byte {content.AsSpan().CommonPrefixLength(back)}");
    }

    /// <summary>Points the second L1 entry of a qcow2 image with 512-byte clusters (guest sectors 64-127) past the end of the file.</summary>
    private static void BreakSecondL1Entry(string path)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        var b = new byte[8];
        f.Position = 40;                                    // l1_table_offset
        f.ReadExactly(b);
        long l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(b);
        BinaryPrimitives.WriteUInt64BigEndian(b, 0x8000_0000_0000_0000UL | 0x10_0000_0000UL);
        f.Position = l1 + 8;
        f.Write(b);
    }

    [Fact]
    public void ImageErrors_CompleteWithIoErr_AreCounted_AndTheQueueGoesOn()
    {
        using var rig = BlockRig.Create(1 << 20, format: "qcow2", clusterSize: 512, beforeOpen: BreakSecondL1Entry);
        rig.Start();
        Assert.Equal(StatusOk, rig.Do(TypeIn, 0, inLength: 64 * Sector).Status(rig.Memory));
        Assert.Equal(0, rig.Block.IoErrors);
        Assert.Equal(StatusIoErr, rig.Do(TypeIn, 60, inLength: 8 * Sector).Status(rig.Memory));
        Assert.Equal(StatusIoErr, rig.Do(TypeOut, 70, new byte[Sector]).Status(rig.Memory));
        Assert.Equal(2, rig.Block.IoErrors);
        Assert.Equal(0, rig.Driver.Status & VirtioStatus.DeviceNeedsReset);   // the disk failed, not the driver
        var after = rig.Do(TypeIn, 128, inLength: 4 * Sector);
        Assert.Equal(StatusOk, after.Status(rig.Memory));
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void RingsAndBuffers_InASecondRamRegionAbove4GiB_Work_AndABufferRunningIntoTheHoleBreaksTheProtocol()
    {
        const ulong high = 0x1_0000_0000;
        using var rig = BlockRig.Create(1 << 20, extraRam: [(high, 2 << 20)]);
        rig.Start(ringBase: high);                  // 64-bit ring addresses
        Assert.Equal(high, rig.Driver.Read64(VirtioDriver.QueueDesc));
        var arena = new GuestArena(rig.Memory, high + 0x100000, 0x100000);
        var data = RandomBytes(new Random(2), 3 * Sector);
        var w = Blk.Build(arena, TypeOut, 30, data, segments: 2);
        rig.Run(w);
        Assert.Equal(StatusOk, w.Status(rig.Memory));
        var r = Blk.Build(arena, TypeIn, 30, inLength: 3 * Sector, segments: 3);
        rig.Run(r);
        Assert.Equal(data, r.ReadData(rig.Memory));
        Assert.Equal(data, rig.ReadFile(30 * Sector, data.Length));

        // The data buffer starts in the low region and runs past its end into the hole.
        var hash = rig.FileHash();
        var bad = Blk.Build(arena, TypeOut, 0, new byte[Sector]);
        bad.Buffers[1] = new Buf(BlockRig.RamSize - 256, Sector);
        rig.Submit(bad);
        Assert.True(rig.Driver.WaitForStatusBits(VirtioStatus.DeviceNeedsReset));
        Assert.Equal(hash, rig.FileHash());
        Assert.Empty(rig.Log.WorkerFailures);
    }

    [Fact]
    public void DeviceConfiguration_IgnoresDriverWrites()
    {
        using var rig = BlockRig.Create(1 << 20);
        var before = new byte[60];
        rig.Driver.ReadDeviceConfig(0, before);
        for (int off = 0; off < 60; off += 4)
            rig.Transport.WriteBar(0, VirtioPciTransport.DeviceConfigOffset + (ulong)off, [0xff, 0xff, 0xff, 0xff]);
        rig.Transport.WriteBar(0, VirtioPciTransport.DeviceConfigOffset + 32, [1]);   // writeback: CONFIG_WCE is not offered
        var after = new byte[60];
        rig.Driver.ReadDeviceConfig(0, after);
        Assert.Equal(before, after);
        // Beyond the structure: zeros.
        var tail = new byte[4] { 1, 1, 1, 1 };
        rig.Driver.ReadDeviceConfig(60, tail);
        Assert.Equal(new byte[4], tail);
    }

    public static TheoryData<VirtioBlockOptions> BadOptions => new()
    {
        new VirtioBlockOptions { Serial = new string('s', 21) },
        new VirtioBlockOptions { Serial = "caf\u00e9" },
        new VirtioBlockOptions { Serial = "tab\there" },
        new VirtioBlockOptions { Queues = 0 },
        new VirtioBlockOptions { Queues = VirtioBlockOptions.MaxQueues + 1 },
        new VirtioBlockOptions { QueueSize = 0 },
        new VirtioBlockOptions { QueueSize = 1 },
        new VirtioBlockOptions { QueueSize = 96 },
    };

    [Theory]
    [MemberData(nameof(BadOptions))]
    public void BadOptions_AreRefused_NamingTheOption(VirtioBlockOptions options)
    {
        var e = Assert.Throws<ArgumentException>(options.Validate);
        Assert.Matches("serial|queue", e.Message);
    }

    [Fact]
    public void AnyFraming_HeaderAndDataInOneBuffer_DataAndStatusInOneBuffer()
    {
        // 2.6.4: the device must not assume a particular arrangement of descriptors.
        using var rig = BlockRig.Create(1 << 20);
        rig.Start();
        var data = RandomBytes(new Random(21), 3 * Sector);
        ulong buf = rig.Arena.Alloc(16 + (ulong)data.Length);
        Blk.WriteHeader(rig.Memory, buf, TypeOut, 12);
        rig.Memory.Write(buf + 16, data);
        ulong status = rig.Arena.Alloc(1);
        var w = new BlkRequest { Buffers = [new Buf(buf, 16 + (uint)data.Length), new Buf(status, 1, true)], Data = [], StatusAddress = status };
        rig.Run(w);
        Assert.Equal(StatusOk, rig.Memory.ReadU8(status));
        Assert.Equal(data, rig.ReadFile(12 * Sector, data.Length));

        // IN: header, then one writable buffer holding the data and the status byte after it.
        ulong h = rig.Arena.Alloc(16), inBuf = rig.Arena.Alloc((ulong)data.Length + 1);
        Blk.WriteHeader(rig.Memory, h, TypeIn, 12);
        var r = new BlkRequest { Buffers = [new Buf(h, 16), new Buf(inBuf, (uint)data.Length + 1, true)], Data = [new Buf(inBuf, (uint)data.Length, true)], StatusAddress = inBuf + (ulong)data.Length };
        Assert.Equal((uint)data.Length + 1, rig.Run(r));
        Assert.Equal(StatusOk, r.Status(rig.Memory));
        Assert.Equal(data, r.ReadData(rig.Memory));
    }
}
