using System.Buffers.Binary;
using System.Text;
using Kvm.Devices.Manager;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Kvm.Storage;
using static Kvm.Devices.Virtio.ChainIo;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Kvm.Devices.Virtio.Block;

/// <summary>Options of one virtio-blk device.</summary>
public sealed record VirtioBlockOptions
{
    /// <summary>Shown to the guest through GET_ID: at most 20 bytes of printable ASCII.</summary>
    public string Serial { get; init; } = "";

    /// <summary>Request queues (VIRTIO_BLK_F_MQ); each is served by its own worker thread.</summary>
    public int Queues { get; init; } = 1;

    public ushort QueueSize { get; init; } = 256;

    public const int MaxSerialLength = 20;
    public const int MaxQueues = 64;

    /// <summary>Throws <see cref="ArgumentException"/> naming the bad option.</summary>
    public void Validate()
    {
        if (Encoding.UTF8.GetByteCount(Serial) > MaxSerialLength || Serial.Any(c => c < 0x20 || c > 0x7e))
            throw new ArgumentException($"serial '{Serial}' must be at most {MaxSerialLength} printable ASCII characters");
        if (Queues < 1 || Queues > MaxQueues)
            throw new ArgumentException($"queues {Queues} is out of range (1 to {MaxQueues})");
        if (QueueSize < 2 || !ushort.IsPow2(QueueSize) || QueueSize > 32768)
            throw new ArgumentException($"queue size {QueueSize} is not a power of two from 2 to 32768");
    }
}

/// <summary>
/// A virtio block device (virtio 1.2, 5.2) on an image from Kvm.Storage: read, write, flush,
/// get-id, discard and write-zeroes, on one or more queues served in parallel. Requests with bad
/// sectors, lengths or types complete with IOERR or UNSUPP; image I/O errors become IOERR. A chain
/// with no room for a header or a status byte breaks the protocol and puts the device in
/// NEEDS_RESET (as a <see cref="VirtqueueException"/>).
/// </summary>
public sealed class VirtioBlock : IVirtioDevice
{
    public const ushort TypeBlock = 2;
    public const int SectorSize = 512;

    // Feature bits (5.2.3)
    public const int FeatureSizeMax = 1, FeatureSegMax = 2, FeatureGeometry = 4, FeatureRo = 5, FeatureBlkSize = 6,
        FeatureFlush = 9, FeatureTopology = 10, FeatureConfigWce = 11, FeatureMq = 12, FeatureDiscard = 13,
        FeatureWriteZeroes = 14;

    // Request types (5.2.6)
    public const uint TypeIn = 0, TypeOut = 1, TypeFlush = 4, TypeGetId = 8, TypeDiscard = 11, TypeWriteZeroes = 13;

    // Status values
    public const byte StatusOk = 0, StatusIoErr = 1, StatusUnsupported = 2;

    public const uint SizeMax = 1u << 20;
    public const uint MaxDiscardSectors = 0x3f_ffff, MaxDiscardSegments = 32;
    public const uint MaxWriteZeroesSectors = 0x3f_ffff, MaxWriteZeroesSegments = 32;
    public const int GetIdLength = 20;
    private const int HeaderSize = 16, DiscardSegmentSize = 16;

    private IBlockImage _image;
    private readonly VirtioBlockOptions _options;
    private readonly ILogger _log;
    private byte[]? _config;          // built from the image's size on first use (a pending image has none yet)
    private readonly byte[] _serial;
    private GuestMemory? _memory;
    private long _ioErrors;
    private readonly VirtioBlockCounters _counters = new();

    public VirtioBlock(string name, IBlockImage image, VirtioBlockOptions options, ILogger? logger = null)
    {
        options.Validate();
        Name = name;
        _image = image;
        _options = options;
        _log = logger ?? NullLogger.Instance;
        _serial = new byte[GetIdLength];
        Encoding.ASCII.GetBytes(options.Serial, _serial);
        if (image is not PendingImage)
            _config = BuildConfig();
    }

    /// <summary>
    /// Puts <paramref name="image"/> under the device in place of its current one, which is
    /// returned (the caller disposes it). Only while the device is paused (its transport's workers
    /// stopped): a disk switched to another image of the same content, or a
    /// <see cref="PendingImage"/> given the image it stood for. The guest must not see a change:
    /// the read-only flag must match, and so must the size unless the current image is pending.
    /// </summary>
    public IBlockImage ReplaceImage(IBlockImage image)
    {
        if (image.ReadOnly != ReadOnly)
            throw new DeviceStateException($"{Name}: {image.Path} is {(image.ReadOnly ? "read-only" : "writable")}, the disk the guest has is {(ReadOnly ? "read-only" : "writable")}");
        if (_image is not PendingImage && image.Size / SectorSize != Capacity)
            throw new DeviceStateException($"{Name}: {image.Path} has {image.Size / SectorSize} sectors, the disk the guest has {Capacity}");
        var old = _image;
        _image = image;
        _config = BuildConfig();
        return old;
    }

    public string Name { get; }
    public ushort DeviceType => TypeBlock;
    public int QueueCount => _options.Queues;
    public ushort MaxQueueSize => _options.QueueSize;
    public IBlockImage Image => _image;
    public bool ReadOnly => _image.ReadOnly;

    /// <summary>Sectors the guest sees (the image size rounded down to whole sectors).</summary>
    public ulong Capacity => _image.Size / SectorSize;

    /// <summary>Requests that ended in IOERR because the image failed (not because the request was bad).</summary>
    public long IoErrors => Interlocked.Read(ref _ioErrors);

    /// <summary>Requests, bytes and time spent serving them, by request type, since the device was made.</summary>
    public VirtioBlockStats Stats => _counters.Snapshot(IoErrors);

    public ulong Features
    {
        get
        {
            ulong f = Bit(FeatureSizeMax) | Bit(FeatureSegMax) | Bit(FeatureBlkSize) | Bit(FeatureFlush) |
                      Bit(FeatureTopology) | Bit(FeatureMq);
            f |= ReadOnly ? Bit(FeatureRo) : Bit(FeatureDiscard) | Bit(FeatureWriteZeroes);
            return f;
        }
    }

    private static ulong Bit(int feature) => 1UL << feature;

    /// <summary>struct virtio_blk_config up to write_zeroes_may_unmap and its padding.</summary>
    private const int ConfigBytes = 60;

    public int ConfigSize => ConfigBytes;

    private byte[] Config => _config ??= BuildConfig();

    /// <summary>struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes).</summary>
    private byte[] BuildConfig()
    {
        var c = new byte[ConfigBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(c.AsSpan(0), Capacity);
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(8), SizeMax);
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(12), (uint)(_options.QueueSize - 2));   // seg_max: room for header and status
        // geometry (16..19) stays zero: GEOMETRY is not offered
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(20), SectorSize);                        // blk_size
        c[24] = 0;                                                                                 // physical_block_exp
        c[25] = 0;                                                                                 // alignment_offset
        BinaryPrimitives.WriteUInt16LittleEndian(c.AsSpan(26), 1);                                 // min_io_size (blocks)
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(28), 0);                                 // opt_io_size: no preference
        c[32] = 0;                                                                                 // writeback (CONFIG_WCE not offered)
        BinaryPrimitives.WriteUInt16LittleEndian(c.AsSpan(34), (ushort)_options.Queues);
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(36), MaxDiscardSectors);
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(40), MaxDiscardSegments);
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(44), 1);                                 // discard_sector_alignment
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(48), MaxWriteZeroesSectors);
        BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(52), MaxWriteZeroesSegments);
        c[56] = 1;                                                                                 // write_zeroes_may_unmap
        return c;
    }

    public void ReadConfig(int offset, Span<byte> data)
    {
        data.Clear();
        var config = Config;
        if (offset >= 0 && offset < config.Length)
            config.AsSpan(offset, Math.Min(data.Length, config.Length - offset)).CopyTo(data);
    }

    public void WriteConfig(int offset, ReadOnlySpan<byte> data)
    {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
    }

    public void Activate(ulong features, GuestMemory memory) => _memory = memory;

    public void Reset() => _memory = null;

    public string StateKind => "virtio-blk";

    /// <summary>Requests complete before their worker stops, so pausing only writes what the image holds back.</summary>
    public void Pause() => _image.Flush();

    /// <summary>What the guest knows of the disk: its capacity, whether it is read-only, its queues.</summary>
    public VirtioBlockState Save() => new(Capacity, ReadOnly, _options.Queues);

    public void SaveState(StateWriter writer) => Save().Write(writer);

    /// <summary>
    /// Accepts the saved disk if the guest cannot tell this one from it: same capacity, same
    /// read-only flag, same number of queues. Another image (moved, or a copy) is fine.
    /// </summary>
    public void RestoreState(ref StateReader reader)
    {
        var saved = VirtioBlockState.Read(ref reader);
        if (saved.Capacity != Capacity)
            throw new DeviceStateException($"{Name}: the saved disk had {saved.Capacity} sectors, {_image.Path} has {Capacity}");
        if (saved.ReadOnly != ReadOnly)
            throw new DeviceStateException($"{Name}: the saved disk was {(saved.ReadOnly ? "read-only" : "writable")}, {_image.Path} is {(ReadOnly ? "read-only" : "writable")}");
        if (saved.Queues != _options.Queues)
            throw new DeviceStateException($"{Name}: the saved disk had {saved.Queues} queues, this one {_options.Queues}");
    }

    public void ProcessQueue(Virtqueue queue)
    {
        var memory = _memory ?? throw new InvalidOperationException($"{Name} is not active");
        while (queue.TryPop(out var chain))
        {
            uint written = Serve(chain, memory);
            queue.Push(chain.Head, written);
        }
    }

    /// <summary>Serves one request and writes its status byte; returns the bytes written into the chain.</summary>
    private uint Serve(DescriptorChain chain, GuestMemory memory)
    {
        if (chain.ReadableBytes < HeaderSize)
            throw new VirtqueueException($"{Name}: request (head {chain.Head}) has {chain.ReadableBytes} device-readable bytes, less than the 16-byte header");
        if (chain.WritableBytes < 1)
            throw new VirtqueueException($"{Name}: request (head {chain.Head}) has no device-writable byte for its status");

        Span<byte> header = stackalloc byte[HeaderSize];
        Gather(memory, chain.Readable, 0, header);
        uint type = BinaryPrimitives.ReadUInt32LittleEndian(header);
        ulong sector = BinaryPrimitives.ReadUInt64LittleEndian(header[8..]);

        // The status is the last device-writable byte; data sits between header and status.
        var last = chain.Writable[^1];
        ulong statusAddress = last.Address + last.Length - 1;
        ulong inBytes = chain.WritableBytes - 1;          // device-writable data bytes
        ulong outBytes = chain.ReadableBytes - HeaderSize; // device-readable data bytes

        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        uint written = 1;
        byte status;
        switch (type)
        {
            case TypeIn:
                status = outBytes != 0 ? StatusIoErr : Read(memory, chain, sector, inBytes);
                if (status == StatusOk)
                    written = (uint)Math.Min(inBytes + 1, uint.MaxValue);
                break;
            case TypeOut:
                status = Write(memory, chain, sector, outBytes);
                break;
            case TypeFlush:
                status = Guard("flush", 0, () => _image.Flush());
                break;
            case TypeGetId:
                uint n = (uint)Math.Min(inBytes, (ulong)GetIdLength);
                Scatter(memory, chain.Writable, 0, _serial.AsSpan(0, (int)n));
                written += n;
                status = StatusOk;
                break;
            case TypeDiscard:
            case TypeWriteZeroes:
                status = DiscardOrZero(memory, chain, type, outBytes);
                break;
            default:
                status = StatusUnsupported;
                break;
        }
        memory.WriteU8(statusAddress, status);
        _counters.Count(type, status, type switch { TypeIn => inBytes, TypeOut => outBytes, _ => 0 },
            System.Diagnostics.Stopwatch.GetTimestamp() - started);
        return written;
    }

    private bool InRange(ulong sector, ulong bytes) =>
        bytes % SectorSize == 0 && sector <= Capacity && bytes / SectorSize <= Capacity - sector;

    private byte Read(GuestMemory memory, DescriptorChain chain, ulong sector, ulong bytes)
    {
        if (!InRange(sector, bytes))
            return StatusIoErr;
        if (bytes == 0)
            return StatusOk;
        ulong offset = sector * SectorSize;
        var buffers = CollectWritable(memory, chain.Writable, 0, bytes);
        try
        {
            // One vectored request however many buffers the guest gave (preadv into guest RAM
            // for raw images): one system call instead of one per buffer.
            _image.Read(offset, buffers);
            return StatusOk;
        }
        catch (Exception e) when (IsImageError(e))
        {
            return IoError("read", offset, e);
        }
        finally
        {
            buffers.Clear();
            // Marked again now that the data is in (the pages were marked when handed out).
            MarkWritten(memory, chain.Writable, 0, bytes);
        }
    }

    private byte Write(GuestMemory memory, DescriptorChain chain, ulong sector, ulong bytes)
    {
        if (ReadOnly || !InRange(sector, bytes))
            return StatusIoErr;
        if (bytes == 0)
            return StatusOk;
        ulong offset = sector * SectorSize;
        var sources = CollectReadable(memory, chain.Readable, HeaderSize, bytes);
        try
        {
            _image.Write(offset, sources);
            return StatusOk;
        }
        catch (Exception e) when (IsImageError(e))
        {
            return IoError("write", offset, e);
        }
        finally
        {
            sources.Clear();
        }
    }

    private byte DiscardOrZero(GuestMemory memory, DescriptorChain chain, uint type, ulong bytes)
    {
        bool zero = type == TypeWriteZeroes;
        if (ReadOnly)
            return StatusIoErr;
        uint maxSegments = zero ? MaxWriteZeroesSegments : MaxDiscardSegments;
        uint maxSectors = zero ? MaxWriteZeroesSectors : MaxDiscardSectors;
        if (bytes == 0 || bytes % DiscardSegmentSize != 0 || bytes / DiscardSegmentSize > maxSegments)
            return StatusUnsupported;
        Span<byte> seg = stackalloc byte[DiscardSegmentSize];
        int count = (int)(bytes / DiscardSegmentSize);
        // Check every segment before acting on any.
        for (int i = 0; i < count; i++)
        {
            Gather(memory, chain.Readable, HeaderSize + (ulong)i * DiscardSegmentSize, seg);
            ulong sector = BinaryPrimitives.ReadUInt64LittleEndian(seg);
            uint sectors = BinaryPrimitives.ReadUInt32LittleEndian(seg[8..]);
            uint flags = BinaryPrimitives.ReadUInt32LittleEndian(seg[12..]);
            if ((flags & ~(zero ? 1u : 0u)) != 0)
                return StatusUnsupported;
            if (sectors > maxSectors || !InRange(sector, (ulong)sectors * SectorSize))
                return StatusIoErr;
        }
        for (int i = 0; i < count; i++)
        {
            Gather(memory, chain.Readable, HeaderSize + (ulong)i * DiscardSegmentSize, seg);
            ulong offset = BinaryPrimitives.ReadUInt64LittleEndian(seg) * SectorSize;
            ulong length = (ulong)BinaryPrimitives.ReadUInt32LittleEndian(seg[8..]) * SectorSize;
            if (length == 0)
                continue;
            try
            {
                if (zero)
                    _image.WriteZeroes(offset, length);
                else
                    _image.Discard(offset, length);
            }
            catch (Exception e) when (IsImageError(e))
            {
                return IoError(zero ? "write-zeroes" : "discard", offset, e);
            }
        }
        return StatusOk;
    }

    private byte Guard(string operation, ulong offset, Action action)
    {
        try
        {
            action();
            return StatusOk;
        }
        catch (Exception e) when (IsImageError(e))
        {
            return IoError(operation, offset, e);
        }
    }

    private const int LoggedIoErrors = 10;

    private byte IoError(string operation, ulong offset, Exception e)
    {
        // The first few are logged; a guest may retry a failing range forever.
        long n = Interlocked.Increment(ref _ioErrors);
        if (n <= LoggedIoErrors)
            DeviceLog.IoError(_log, Name, operation, offset,
                n == LoggedIoErrors ? e.Message + " (further I/O errors of this disk are not logged)" : e.Message);
        return StatusIoErr;
    }

    private static bool IsImageError(Exception e) =>
        e is IOException or ImageFormatException or UnauthorizedAccessException or ArgumentOutOfRangeException;

    public void Dispose() => _image.Dispose();
}

/// <summary>What a guest knows of a <see cref="VirtioBlock"/> device beyond its queues.</summary>
public sealed record VirtioBlockState(ulong Capacity, bool ReadOnly, int Queues)
{
    public void Write(StateWriter w) => w.U64(Capacity).Bool(ReadOnly).I32(Queues);

    public static VirtioBlockState Read(ref StateReader r) =>
        new(r.U64("capacity"), r.Bool("read_only"), (int)r.U32("queues", 1, VirtioBlockOptions.MaxQueues));
}
