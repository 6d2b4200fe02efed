using System.Buffers.Binary;
using System.Security.Cryptography;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Storage;
using Kvm.Storage.Qcow2;

namespace Kvm.Devices.Tests;

/// <summary>One virtio-blk request as the driver lays it out in guest memory.</summary>
public sealed class BlkRequest
{
    public required List<Buf> Buffers { get; init; }

    /// <summary>The data segments: device-readable for OUT/DISCARD/WRITE_ZEROES, device-writable for IN/GET_ID.</summary>
    public required List<Buf> Data { get; init; }

    public required ulong StatusAddress { get; init; }

    public ushort Head { get; set; }

    public byte Status(GuestMemory memory) => memory.ReadU8(StatusAddress);

    /// <summary>The data segments' bytes, in order.</summary>
    public byte[] ReadData(GuestMemory memory)
    {
        var all = new byte[Data.Sum(d => (long)d.Length)];
        int at = 0;
        foreach (var d in Data)
        {
            memory.Read(d.Address, all.AsSpan(at, (int)d.Length));
            at += (int)d.Length;
        }
        return all;
    }
}

/// <summary>Builds virtio-blk requests (virtio 1.2, 5.2.6) in guest memory.</summary>
public static class Blk
{
    public const byte NotWritten = 0xee;

    public static void WriteHeader(GuestMemory m, ulong at, uint type, ulong sector)
    {
        Span<byte> h = stackalloc byte[16];
        BinaryPrimitives.WriteUInt32LittleEndian(h, type);
        BinaryPrimitives.WriteUInt64LittleEndian(h[8..], sector);
        m.Write(at, h);
    }

    /// <summary>
    /// Lays out header, data and status. Data goes in <paramref name="segments"/> separately
    /// allocated buffers (with gaps between them, so a device that assumes contiguity reads the
    /// wrong bytes); the header may be split across two buffers; the status byte may share the
    /// last data buffer.
    /// </summary>
    public static BlkRequest Build(GuestArena arena, uint type, ulong sector, ReadOnlySpan<byte> outData = default,
        int inLength = 0, int segments = 1, bool splitHeader = false, bool statusWithData = false)
    {
        var m = arena.Memory;
        var buffers = new List<Buf>();
        var data = new List<Buf>();
        if (splitHeader)
        {
            ulong a = arena.Alloc(5), b = arena.Alloc(11 + 64);
            Span<byte> h = stackalloc byte[16];
            BinaryPrimitives.WriteUInt32LittleEndian(h, type);
            BinaryPrimitives.WriteUInt64LittleEndian(h[8..], sector);
            m.Write(a, h[..5]);
            m.Write(b, h[5..]);
            buffers.Add(new Buf(a, 5));
            buffers.Add(new Buf(b, 11));
        }
        else
        {
            ulong h = arena.Alloc(16);
            WriteHeader(m, h, type, sector);
            buffers.Add(new Buf(h, 16));
        }

        bool writable = outData.IsEmpty;
        int total = writable ? inLength : outData.Length;
        int parts = total == 0 ? 0 : Math.Max(1, Math.Min(segments, total));
        int done = 0;
        for (int i = 0; i < parts; i++)
        {
            int len = i == parts - 1 ? total - done : total / parts;
            bool last = i == parts - 1;
            int extra = last && statusWithData && writable ? 1 : 0;
            ulong at = arena.Alloc((ulong)(len + extra + 64));   // a gap after each segment
            if (writable)
                m.GetWritableSpan(at, len + extra).Fill(0xcc);
            else
                m.Write(at, outData.Slice(done, len));
            data.Add(new Buf(at, (uint)len, writable));
            buffers.Add(new Buf(at, (uint)(len + extra), writable));
            done += len;
        }

        ulong status;
        if (statusWithData && writable && parts > 0)
            status = buffers[^1].Address + buffers[^1].Length - 1;
        else
        {
            status = arena.Alloc(1);
            buffers.Add(new Buf(status, 1, true));
        }
        m.WriteU8(status, NotWritten);
        return new BlkRequest { Buffers = buffers, Data = data, StatusAddress = status };
    }

    /// <summary>A DISCARD/WRITE_ZEROES payload: one 16-byte segment per range.</summary>
    public static byte[] Segments(params (ulong Sector, uint Sectors, uint Flags)[] ranges)
    {
        var b = new byte[16 * ranges.Length];
        for (int i = 0; i < ranges.Length; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(16 * i), ranges[i].Sector);
            BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(16 * i + 8), ranges[i].Sectors);
            BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(16 * i + 12), ranges[i].Flags);
        }
        return b;
    }
}

/// <summary>
/// A virtio-blk device on a real image file in a temp folder, its PCI transport over real guest
/// memory, and a <see cref="VirtioDriver"/> to drive it. Only MSI and INTx delivery are recorded
/// stand-ins.
/// </summary>
public sealed class BlockRig : IDisposable
{
    public const ulong RamSize = 32UL << 20;
    public const ulong RingBase = 0x10000, RingStride = 0x8000;
    public const ulong ScratchBase = 0x280000, ScratchSize = 0x180000;
    public const ulong DataBase = 0x400000;
    public const int SectorSize = 512;

    private bool _disposed;

    private BlockRig(TempFolder dir, string imagePath, GuestMemory memory, GuestMemory driverMemory, VirtioBlock block,
        VirtioPciTransport transport, RecordingMsiController msi, LevelRecorder intx, RecordingLogger log, int queueCount)
    {
        Dir = dir;
        ImagePath = imagePath;
        Memory = memory;
        DriverMemory = driverMemory;
        Block = block;
        Transport = transport;
        Msi = msi;
        Intx = intx;
        Log = log;
        Driver = new VirtioDriver(transport, driverMemory);
        Scratch = new GuestArena(driverMemory, ScratchBase, ScratchSize);
        ulong per = (RamSize - DataBase) / (ulong)queueCount & ~4095UL;
        Arenas = Enumerable.Range(0, queueCount).Select(i => new GuestArena(driverMemory, DataBase + (ulong)i * per, per)).ToArray();
    }

    public TempFolder Dir { get; }
    public string ImagePath { get; }
    /// <summary>Guest RAM as the device has it.</summary>
    public GuestMemory Memory { get; }

    /// <summary>
    /// Guest RAM as the driver (and its arenas) write it: <see cref="Memory"/>, or with
    /// <c>driverMapping</c> a second mapping of its memfd, whose writes stay out of the device's
    /// dirty bitmap.
    /// </summary>
    public GuestMemory DriverMemory { get; }

    public VirtioBlock Block { get; }
    public VirtioPciTransport Transport { get; }
    public RecordingMsiController Msi { get; }
    public LevelRecorder Intx { get; }
    public RecordingLogger Log { get; }
    public VirtioDriver Driver { get; }
    public SplitQueue[] Queues { get; private set; } = [];

    /// <summary>Guest memory for indirect tables and hand-made structures.</summary>
    public GuestArena Scratch { get; }

    /// <summary>One data arena per queue (so threads driving different queues never share one).</summary>
    public GuestArena[] Arenas { get; }

    public GuestArena Arena => Arenas[0];

    public ulong DiskBytes => Block.Image.Size;

    /// <summary>
    /// Creates an image of <paramref name="diskBytes"/> filled with seeded random bytes, opens it
    /// (read-only if asked) and builds the device. <paramref name="format"/> is "raw" or "qcow2".
    /// With <paramref name="driverMapping"/> the driver writes through a mapping of its own
    /// (<see cref="DriverMemory"/>).
    /// </summary>
    public static BlockRig Create(ulong diskBytes = 4UL << 20, int queues = 1, ushort queueSize = 128, bool readOnly = false,
        string serial = "", string format = "raw", int seed = 1, TimeSpan? pollTime = null, int clusterSize = 4096,
        Action<string>? beforeOpen = null, IReadOnlyList<(ulong GuestAddress, ulong Size)>? extraRam = null,
        bool driverMapping = false)
    {
        var dir = new TempFolder();
        GuestMemory? memory = null, driverMemory = null;
        try
        {
            string path = dir.File("disk." + format);
            var content = new byte[diskBytes];
            new Random(seed).NextBytes(content);
            if (format == "raw")
                File.WriteAllBytes(path, content);
            else
            {
                using var q = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = diskBytes, ClusterSize = clusterSize });
                q.Write(0, content);
                q.Flush();
            }
            beforeOpen?.Invoke(path);
            var image = DiskImage.Open(path, new ImageOpenOptions { ReadOnly = readOnly });
            var block = new VirtioBlock("virtio-blk-test", image, new VirtioBlockOptions { Serial = serial, Queues = queues, QueueSize = queueSize });
            memory = GuestMemory.Create([(0, RamSize), .. extraRam ?? []]);
            driverMemory = driverMapping ? GuestMemory.Attach(memory.BackingFd, memory.Layout) : memory;
            var msi = new RecordingMsiController();
            var intx = new LevelRecorder();
            var log = new RecordingLogger();
            var transport = pollTime is { } poll
                ? new VirtioPciTransport(block, memory, msi, intx, ioevents: null, log) { PollTime = poll }
                : new VirtioPciTransport(block, memory, msi, intx, ioevents: null, log);
            return new BlockRig(dir, path, memory, driverMemory, block, transport, msi, intx, log, queues);
        }
        catch
        {
            if (driverMemory != memory)
                driverMemory?.Dispose();
            memory?.Dispose();
            dir.Dispose();
            throw;
        }
    }

    /// <summary>Every feature the device offers, which is what a capable driver accepts.</summary>
    public ulong AllFeatures => Driver.DeviceFeatures;

    /// <summary>
    /// Initialises the device as a driver does (3.1.1): negotiate <paramref name="features"/>, set up
    /// every queue (queue i uses MSI-X vector i+1, configuration changes vector 0, when
    /// <paramref name="msix"/>), then DRIVER_OK.
    /// </summary>
    public void Start(ulong? features = null, bool msix = true, ushort? queueSize = null, int? queues = null, ulong ringBase = RingBase)
    {
        ulong f = features ?? AllFeatures;
        if (!Driver.Negotiate(f))
            throw new InvalidOperationException($"the device refused features 0x{f:x}");
        int n = queues ?? Block.QueueCount;
        ushort size = queueSize ?? Block.MaxQueueSize;
        Queues = new SplitQueue[n];
        bool eventIdx = (f & VirtioFeature.Bit(VirtioFeature.RingEventIdx)) != 0;
        for (int i = 0; i < n; i++)
        {
            Queues[i] = Driver.SetupQueue(i, size, ringBase + (ulong)i * RingStride, msix ? (ushort)(i + 1) : Virtqueue.NoVector);
            Queues[i].AutoUsedEvent = eventIdx;
            Queues[i].EventIdx = eventIdx;
        }
        if (msix)
        {
            Driver.Write16(VirtioDriver.ConfigMsixVector, 0);
            Driver.ProgramAllVectors(n + 1);
        }
        else
            Driver.SetMsix(false);
        Driver.DriverOk();
        byte status = Driver.Status;
        if ((status & VirtioStatus.DriverOk) == 0 || (status & VirtioStatus.DeviceNeedsReset) != 0)
            throw new InvalidOperationException($"device status 0x{status:x2} after DRIVER_OK");
        foreach (var a in Arenas)
            a.Reset();
        Scratch.Reset();
    }

    /// <summary>
    /// Publishes <paramref name="request"/> on queue <paramref name="queue"/> (optionally through an
    /// indirect table) and, when <paramref name="kick"/>, notifies the device if it asked for it
    /// (as Linux does; <see cref="SplitQueue.NeedsKick"/>).
    /// </summary>
    public BlkRequest Submit(BlkRequest request, int queue = 0, bool indirect = false, bool kick = true)
    {
        var q = Queues[queue];
        GuestArena tables = queue == 0 ? Scratch : Arenas[queue];
        request.Head = indirect
            ? q.AddIndirect(tables.Alloc(16UL * (uint)request.Buffers.Count), request.Buffers)
            : q.AddChain(request.Buffers);
        if (kick)
        {
            if (q.NeedsKick())
                Driver.Kick(queue);
            else
                Interlocked.Increment(ref _kicksSuppressed);
        }
        return request;
    }

    private long _kicksSuppressed;

    /// <summary>Notifications the driver left out because the device said it did not need them.</summary>
    public long KicksSuppressed => Interlocked.Read(ref _kicksSuppressed);

    /// <summary>Submits, waits for the used element, checks it names the request, returns its length.</summary>
    public uint Run(BlkRequest request, int queue = 0, bool indirect = false)
    {
        Submit(request, queue, indirect);
        var q = Queues[queue];
        if (!q.WaitAllUsed())
            throw new TimeoutException($"queue {queue}: request (head {request.Head}) not used within {Wait.Timeout}; status 0x{Driver.Status:x2}");
        var used = q.TakeUsed();
        var e = Assert.Single(used);
        Assert.Equal(request.Head, e.Id);
        return e.Length;
    }

    /// <summary>Builds and runs a request on queue 0; returns it (status and data readable).</summary>
    public BlkRequest Do(uint type, ulong sector, ReadOnlySpan<byte> outData = default, int inLength = 0, int segments = 1,
        bool splitHeader = false, bool indirect = false, int queue = 0)
    {
        var r = Blk.Build(Arenas[queue], type, sector, outData, inLength, segments, splitHeader);
        uint len = Run(r, queue, indirect);
        LastUsedLength = len;
        return r;
    }

    public uint LastUsedLength { get; private set; }

    /// <summary>Reads the image file itself (not through the device).</summary>
    public byte[] ReadFile(ulong offset, int length)
    {
        var b = new byte[length];
        using var f = new FileStream(ImagePath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        f.Position = (long)offset;
        f.ReadExactly(b);
        return b;
    }

    public byte[] FileHash()
    {
        using var f = new FileStream(ImagePath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        return SHA256.HashData(f);
    }

    /// <summary>
    /// For a device that hung: deletes the folder but leaves the transport and guest memory alone,
    /// since a stuck worker may still use them.
    /// </summary>
    public void Abandon()
    {
        _disposed = true;
        Dir.Dispose();
    }

    /// <summary>
    /// Runs <paramref name="action"/> (a guest register access that may block, such as a reset) on
    /// its own thread; false if it has not returned within the timeout. Exceptions are rethrown.
    /// </summary>
    public static bool Within(Action action, TimeSpan? timeout = null)
    {
        Exception? failure = null;
        var t = new Thread(() =>
        {
            try { action(); }
            catch (Exception e) { failure = e; }
        }) { IsBackground = true, Name = "guest access" };
        t.Start();
        if (!t.Join(timeout ?? Wait.Timeout))
            return false;
        if (failure is not null)
            throw new InvalidOperationException("the guest access threw", failure);
        return true;
    }

    /// <summary>Stops the device and closes the image (so it can be reopened); the rest goes with Dispose.</summary>
    public void CloseDevice() => Transport.Dispose();

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        Transport.Dispose();
        if (DriverMemory != Memory)
            DriverMemory.Dispose();
        Memory.Dispose();
        Dir.Dispose();
    }
}
