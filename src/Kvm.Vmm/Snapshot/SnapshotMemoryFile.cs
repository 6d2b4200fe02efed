using System.Buffers.Binary;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using Kvm.Interop.Native;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Vmm.Snapshot;

/// <summary>Guest RAM as the snapshot writer reads it.</summary>
public interface ISnapshotMemorySource
{
    /// <summary>
    /// Copies the guest bytes at <paramref name="guestAddress"/> into <paramref name="destination"/>
    /// (at most 1 MiB, always inside one region of the snapshot's layout).
    /// </summary>
    void Read(ulong guestAddress, Span<byte> destination);
}

/// <summary>Guest RAM as an eager restore fills it (<see cref="SnapshotMemoryFile.CopyTo"/>).</summary>
public interface ISnapshotMemoryTarget
{
    /// <summary>Writes <paramref name="data"/> (at most 1 MiB, inside one region) at <paramref name="guestAddress"/>.</summary>
    void Write(ulong guestAddress, ReadOnlySpan<byte> data);
}

/// <summary>
/// A snapshot's memory file, opened read-only after its header was checked against the state
/// file: for an eager restore (<see cref="Read"/>, <see cref="CopyTo"/>) or for mapping each region
/// at its <see cref="SnapshotRegion.FileOffset"/> with MAP_PRIVATE (<see cref="Handle"/>), so that
/// the guest's pages load lazily and its writes stay private. Layout: <see cref="SnapshotFormat"/>.
/// </summary>
public sealed class SnapshotMemoryFile : IDisposable
{
    private const int HeaderCrcOffset = SnapshotFormat.MemoryHeaderSize - 8;
    private const int ChunkSize = 1 << 20;

    private SnapshotMemoryFile(string path, SafeFileHandle handle, SnapshotState state)
    {
        Path = path;
        Handle = handle;
        State = state;
        DataSize = state.MemoryDataSize;
    }

    /// <summary>The memory file's path.</summary>
    public string Path { get; }

    /// <summary>The open file (read-only), for mmap; owned by this object.</summary>
    public SafeFileHandle Handle { get; }

    /// <summary>The state whose memory this is.</summary>
    public SnapshotState State { get; }

    /// <summary>The bytes of guest RAM after the header page.</summary>
    public ulong DataSize { get; }

    /// <summary>
    /// Opens the memory file of the snapshot in <paramref name="directory"/> whose state is
    /// <paramref name="state"/>, and checks its header against it: refused with
    /// <see cref="SnapshotFormatException"/> when the file is missing, has another magic or version,
    /// a damaged header, another snapshot's id, another data size, or another length.
    /// </summary>
    public static SnapshotMemoryFile Open(string directory, SnapshotState state)
    {
        string path = System.IO.Path.Combine(directory, SnapshotFormat.MemoryFileName);
        SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new SnapshotFormatException(path, null,
                $"the memory file is missing; the state file {System.IO.Path.Combine(directory, SnapshotFormat.StateFileName)} of snapshot {state.Id} needs it beside it", e);
        }
        try
        {
            Check(path, handle, state);
            return new SnapshotMemoryFile(path, handle, state);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    private static void Check(string path, SafeFileHandle handle, SnapshotState state)
    {
        var header = new byte[SnapshotFormat.MemoryHeaderSize];
        int got = ReadFully(handle, header, 0);
        var magic = SnapshotFormat.MemoryMagic;
        if (got < magic.Length || !header.AsSpan(0, magic.Length).SequenceEqual(magic))
        {
            if (got < magic.Length && header.AsSpan(0, got).SequenceEqual(magic[..got]))
                throw new SnapshotFormatException(path, got, $"truncated: the file is {got} bytes long, shorter than its {magic.Length}-byte magic");
            throw new SnapshotFormatException(path, 0,
                $"bad magic: expected {SnapshotReader.Hex(magic)} (\"KVMSMEM\"), found {SnapshotReader.Hex(header.AsSpan(0, Math.Min(got, magic.Length)))}: not a kvm snapshot memory file");
        }
        if (got >= 12)
        {
            uint version = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(8));
            if (version != SnapshotFormat.Version)
                throw new SnapshotFormatException(path, 8, $"format version {version}; this kvm-vmm reads version {SnapshotFormat.Version}");
        }
        if (got < header.Length)
            throw new SnapshotFormatException(path, got, $"truncated: the file is {got} bytes long, shorter than its {header.Length}-byte header page");
        ulong stored = BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(HeaderCrcOffset));
        ulong computed = Crc64.HashToUInt64(header.AsSpan(0, HeaderCrcOffset));
        if (stored != computed)
            throw new SnapshotFormatException(path, HeaderCrcOffset, $"header CRC mismatch: the file says 0x{stored:x16}, its bytes 0 to {HeaderCrcOffset - 1} give 0x{computed:x16} (damaged)");
        uint pageSize = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(12));
        if (pageSize != SnapshotFormat.PageSize)
            throw new SnapshotFormatException(path, 12, $"header field 'page size' is {pageSize}, expected {SnapshotFormat.PageSize}");
        var id = new Guid(header.AsSpan(16, 16), bigEndian: true);
        if (id != state.Id)
            throw new SnapshotFormatException(path, 16, $"the memory file belongs to snapshot {id}, the state file to snapshot {state.Id} (files of two snapshots, or a save that did not finish)");
        ulong dataOffset = BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(32));
        if (dataOffset != SnapshotFormat.MemoryHeaderSize)
            throw new SnapshotFormatException(path, 32, $"header field 'data offset' is {dataOffset}, expected {SnapshotFormat.MemoryHeaderSize}");
        ulong dataSize = BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(40));
        if (dataSize != state.MemoryDataSize)
            throw new SnapshotFormatException(path, 40, $"header field 'data size' is {dataSize}; the state file's regions hold {state.MemoryDataSize} bytes");
        long length = RandomAccess.GetLength(handle);
        ulong expected = SnapshotFormat.MemoryHeaderSize + dataSize;
        if ((ulong)length != expected)
            throw new SnapshotFormatException(path, length, (ulong)length < expected
                ? $"truncated: the file is {length} bytes long; its header page and {dataSize} bytes of data need {expected}"
                : $"the file is {length} bytes long, {(ulong)length - expected} bytes more than its header page and {dataSize} bytes of data");
    }

    /// <summary>
    /// Reads guest bytes from <paramref name="guestAddress"/> into <paramref name="destination"/>;
    /// the range must lie inside one region (else <see cref="ArgumentOutOfRangeException"/>). A file
    /// cut short since it was opened raises <see cref="SnapshotFormatException"/>.
    /// </summary>
    public void Read(ulong guestAddress, Span<byte> destination)
    {
        var region = RegionOf(guestAddress, (ulong)destination.Length);
        long offset = (long)(region.FileOffset + (guestAddress - region.GuestAddress));
        int got = ReadFully(Handle, destination, offset);
        if (got != destination.Length)
            throw new SnapshotFormatException(Path, offset + got,
                $"the file ends at offset {offset + got}; guest address 0x{guestAddress:x} needs {destination.Length} bytes from offset {offset} (the file was cut short after it was checked)");
    }

    /// <summary>
    /// Copies all of guest RAM into <paramref name="target"/>, region by region in chunks of 1 MiB,
    /// reporting the bytes done and the total to <paramref name="progress"/> after each. When
    /// <paramref name="targetIsZeroed"/> (fresh guest memory), the file's holes and pages of zeros
    /// are not written.
    /// </summary>
    public void CopyTo(ISnapshotMemoryTarget target, bool targetIsZeroed, Action<long, long>? progress = null, CancellationToken cancellationToken = default)
    {
        var buffer = new byte[ChunkSize];
        long total = (long)DataSize, done = 0;
        foreach (var region in State.Regions)
        {
            ulong at = 0;
            while (at < region.Size)
            {
                cancellationToken.ThrowIfCancellationRequested();
                int n = (int)Math.Min((ulong)ChunkSize, region.Size - at);
                long fileOffset = (long)(region.FileOffset + at);
                if (targetIsZeroed && NextData(fileOffset) is long data && data >= fileOffset + n)
                {
                    // A hole: fresh memory already reads as zeros.
                }
                else
                {
                    var chunk = buffer.AsSpan(0, n);
                    Read(region.GuestAddress + at, chunk);
                    if (targetIsZeroed)
                        SnapshotWriter.ForEachNonZeroRun(chunk, (start, length) => target.Write(region.GuestAddress + at + (ulong)start, buffer.AsSpan(start, length)));
                    else
                        target.Write(region.GuestAddress + at, chunk);
                }
                at += (ulong)n;
                done += n;
                progress?.Invoke(done, total);
            }
        }
    }

    /// <summary>The offset of the first data at or after <paramref name="offset"/> (SEEK_DATA); <paramref name="offset"/> when that cannot be told.</summary>
    private long NextData(long offset)
    {
        long next = Libc.Lseek(Handle, offset, Libc.SeekData);
        if (next >= 0)
            return next;
        return Marshal.GetLastPInvokeError() == Errno.ENXIO ? long.MaxValue : offset;
    }

    private SnapshotRegion RegionOf(ulong guestAddress, ulong length)
    {
        foreach (var r in State.Regions)
            if (guestAddress >= r.GuestAddress && guestAddress - r.GuestAddress <= r.Size && length <= r.Size - (guestAddress - r.GuestAddress))
                return r;
        throw new ArgumentOutOfRangeException(nameof(guestAddress), $"guest range 0x{guestAddress:x} + 0x{length:x} is not inside one RAM region of snapshot {State.Id}");
    }

    private static int ReadFully(SafeFileHandle handle, Span<byte> buffer, long offset)
    {
        int got = 0;
        while (got < buffer.Length)
        {
            int n = RandomAccess.Read(handle, buffer[got..], offset + got);
            if (n == 0)
                break;
            got += n;
        }
        return got;
    }

    /// <summary>The header page of the memory file of snapshot <paramref name="id"/> with <paramref name="dataSize"/> bytes of RAM.</summary>
    internal static byte[] Header(Guid id, ulong dataSize)
    {
        var header = new byte[SnapshotFormat.MemoryHeaderSize];
        SnapshotFormat.MemoryMagic.CopyTo(header);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(8), SnapshotFormat.Version);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(12), SnapshotFormat.PageSize);
        id.TryWriteBytes(header.AsSpan(16, 16), bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(32), SnapshotFormat.MemoryHeaderSize);
        BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(40), dataSize);
        BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(HeaderCrcOffset), Crc64.HashToUInt64(header.AsSpan(0, HeaderCrcOffset)));
        return header;
    }

    /// <summary>Closes the file (mappings made from it stay valid).</summary>
    public void Dispose() => Handle.Dispose();
}
