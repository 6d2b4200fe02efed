using System.Buffers.Binary;
using System.IO.Compression;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Storage.Qcow2;

/// <summary>How to make a new qcow2 image.</summary>
public sealed record Qcow2CreateOptions
{
    public required ulong Size { get; init; }
    public int ClusterSize { get; init; } = 65536;
    public int RefcountBits { get; init; } = 16;
    /// <summary>The backing file's name as stored in the header (relative names resolve against the image's folder).</summary>
    public string? BackingFile { get; init; }
    public string? BackingFormat { get; init; }
}

/// <summary>
/// A qcow2 image (version 2 or 3). Guest clusters map through a two-level table (L1, then L2) to
/// host clusters; every host cluster has a reference count. Metadata is written in an order that
/// keeps the image consistent if the process dies at any point: a cluster's refcount is raised
/// before anything points at it, data is written before the L2 entry that maps it, and refcounts
/// are lowered only after nothing points at the cluster any more. The worst a crash leaves is a
/// leaked cluster, which <c>qemu-img check -r leaks</c> reclaims.
/// <para>
/// Allocating writes keep their metadata in memory, as qemu's caches do with cache=writeback: the
/// raised refcounts of new data clusters and the L2 entries that map them are written back
/// together (refcounts first) on <see cref="Flush"/>, on <see cref="Dispose"/>, and when too many
/// L2 tables have changes pending. A write that completed before the last Flush survives a crash;
/// one after it may read back as the old content, never as anything else. Changes that take a
/// reference away (replacing or discarding a cluster) and every change of L1, refcount table or
/// header are written through, after the pending metadata they could depend on.
/// </para>
/// </summary>
public sealed partial class Qcow2Image : IBlockImage
{
    private const ulong OffsetMask = 0x00ff_ffff_ffff_fe00;
    private const ulong Copied = 1UL << 63;
    private const ulong Compressed = 1UL << 62;
    private const ulong ZeroFlag = 1;

    private ulong ClusterMask => (ulong)_clusterSize - 1;

    private readonly SafeFileHandle _file;
    private readonly Qcow2Header _header;
    private ulong[] _l1;
    private readonly L2Cache _l2Cache;
    private readonly object _lock = new();
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _l2Entries;
    private byte[]? _decompressed;
    private ulong _decompressedEntry;
    private bool _disposed;
    // L2 tables with entries not written yet: table offset -> the table and the changed entries.
    private readonly Dictionary<ulong, DirtyRange> _dirtyL2 = new();
    // Scratch space (used under the lock): the cluster a partial write builds, and L2 entries in file byte order.
    private byte[]? _clusterBuffer;
    private byte[]? _tableBuffer;

    private Qcow2Image(string path, SafeFileHandle file, Qcow2Header header, ulong[] l1, bool readOnly, IBlockImage? backing, ImageOpenOptions options)
    {
        Path = path;
        _file = file;
        _header = header;
        _l1 = l1;
        ReadOnly = readOnly;
        Backing = backing;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _l2Entries = header.L2Entries;
        _l2Cache = new L2Cache(Math.Max(2, options.L2CacheTables));
    }

    public string Path { get; }
    public ulong Size => _header.Size;
    public bool ReadOnly { get; }
    public IBlockImage? Backing { get; }
    public int ClusterSize => _clusterSize;
    public int Version => (int)_header.Version;
    public int RefcountBits => _header.RefcountBits;
    public string? BackingFile => _header.BackingFile;
    public string? BackingFormat => _header.BackingFormat;
    public Qcow2Header Header => _header;

    /// <summary>Opens an image; its backing chain is opened through <see cref="DiskImage.Open"/>.</summary>
    public static Qcow2Image Open(string path, ImageOpenOptions? options = null) =>
        (Qcow2Image)DiskImage.Open(path, options ?? new ImageOpenOptions(), forceFormat: "qcow2");

    internal static Qcow2Image OpenFile(string path, ImageOpenOptions options, Func<Qcow2Header, IBlockImage?> openBacking)
    {
        SafeFileHandle file = ImageFile.Open(path, options.ReadOnly ? FileAccess.Read : FileAccess.ReadWrite, options.Exclusive);
        try
        {
            long length = RandomAccess.GetLength(file);
            var first = new byte[(int)Math.Min(length, 1 << Qcow2Header.MaxClusterBits)];
            RandomAccess.Read(file, first, 0);
            var header = Qcow2Header.Parse(first, length, path);
            if (!options.ReadOnly && (header.IncompatibleFeatures & Qcow2Header.IncompatCorrupt) != 0)
                throw new ImageFormatException($"qcow2 image {path}: marked corrupt (incompatible feature bit 1); repair it with 'qemu-img check -r all' or open it read-only");
            if (!options.ReadOnly && (header.IncompatibleFeatures & Qcow2Header.IncompatDirty) != 0)
                throw new ImageFormatException($"qcow2 image {path}: marked dirty (lazy refcounts not written back); repair it with 'qemu-img check -r all' or open it read-only");

            var l1 = new ulong[header.L1Size];
            if (header.L1Size > 0)
            {
                var raw = new byte[header.L1Size * 8];
                RandomAccess.Read(file, raw, (long)header.L1TableOffset);
                for (int i = 0; i < l1.Length; i++)
                    l1[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            }
            var backing = openBacking(header);
            try
            {
                var image = new Qcow2Image(path, file, header, l1, options.ReadOnly, backing, options);
                image.LoadRefcountTable(length);
                image.LoadSnapshots();
                image.LoadBitmaps();
                return image;
            }
            catch
            {
                backing?.Dispose();
                throw;
            }
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    // ---------------------------------------------------------------- reads

    public void Read(ulong offset, Span<byte> destination)
    {
        CheckRange(offset, (ulong)destination.Length);
        while (!destination.IsEmpty)
        {
            ulong host;
            int n;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                n = MapOwnRun(offset, destination.Length, forWrite: false, out host);
                if (n == 0)
                {
                    // Not plain data of this image (backing, zeros, compressed): read it under the lock.
                    n = PieceLength(offset, destination.Length);
                    ReadInCluster(offset, destination[..n]);
                    offset += (ulong)n;
                    destination = destination[n..];
                    continue;
                }
            }
            // Plain data clusters are read outside the lock: they are never moved, and a freed
            // cluster is never reused for other data (new clusters come from the end of the file).
            ReadHost(host, destination[..n]);
            offset += (ulong)n;
            destination = destination[n..];
        }
    }

    private int PieceLength(ulong offset, int remaining) =>
        (int)Math.Min((ulong)remaining, (ulong)_clusterSize - (offset & ClusterMask));

    /// <summary>
    /// When the cluster at <paramref name="offset"/> is plain, unshared data of this image, returns
    /// how many of the next <paramref name="length"/> bytes lie in such clusters contiguous on the
    /// host (and their host offset); otherwise 0.
    /// </summary>
    private int MapOwnRun(ulong offset, int length, bool forWrite, out ulong host)
    {
        host = 0;
        ulong entry = GetL2Entry(offset >> _clusterBits);
        if (!IsOwnData(entry, forWrite))
            return 0;
        host = (entry & OffsetMask) + (offset & ClusterMask);
        int n = PieceLength(offset, length);
        while (n < length)
        {
            ulong next = GetL2Entry((offset + (ulong)n) >> _clusterBits);
            if (!IsOwnData(next, forWrite) || (next & OffsetMask) != host + (ulong)n)
                break;
            n += Math.Min(_clusterSize, length - n);
        }
        return n;
    }

    // Plain data: allocated, not compressed, not a zero cluster; for writing also unshared (COPIED).
    private bool IsOwnData(ulong entry, bool forWrite) =>
        (entry & Compressed) == 0 && (entry & OffsetMask) != 0
        && !((entry & ZeroFlag) != 0 && _header.Version >= 3)
        && (!forWrite || (entry & Copied) != 0);

    // Reads bytes that lie within one guest cluster.
    private void ReadInCluster(ulong offset, Span<byte> dest)
    {
        ulong entry = GetL2Entry(offset >> _clusterBits);
        ulong inCluster = offset & (ulong)(_clusterSize - 1);
        if ((entry & Compressed) != 0)
        {
            DecompressCluster(entry).AsSpan((int)inCluster, dest.Length).CopyTo(dest);
            return;
        }
        ulong host = entry & OffsetMask;
        if ((entry & ZeroFlag) != 0 && _header.Version >= 3)
        {
            dest.Clear();
            return;
        }
        if (host == 0)
        {
            ReadBacking(offset, dest);
            return;
        }
        ReadHost(host + inCluster, dest);
    }

    private void ReadBacking(ulong offset, Span<byte> dest)
    {
        if (Backing is null || offset >= Backing.Size)
        {
            dest.Clear();
            return;
        }
        int fromBacking = (int)Math.Min((ulong)dest.Length, Backing.Size - offset);
        Backing.Read(offset, dest[..fromBacking]);
        dest[fromBacking..].Clear();
    }

    private void ReadHost(ulong hostOffset, Span<byte> dest)
    {
        int n = RandomAccess.Read(_file, dest, (long)hostOffset);
        if (n < dest.Length)
            dest[n..].Clear(); // a cluster at the very end of a file may be short on disk
    }

    /// <summary>
    /// A compressed L2 entry's host byte offset and its count of 512-byte sectors (the spec's
    /// descriptor: the offset in the low 62 - (cluster_bits - 8) bits, then the extra sectors).
    /// </summary>
    private (ulong HostOffset, ulong Sectors) CompressedDescriptor(ulong entry)
    {
        int x = 62 - (_clusterBits - 8);
        return (entry & ((1UL << x) - 1), ((entry >> x) & ((1UL << (_clusterBits - 8)) - 1)) + 1);
    }

    private byte[] DecompressCluster(ulong entry)
    {
        if (_decompressed is not null && _decompressedEntry == entry)
            return _decompressed;
        if (_header.CompressionType != 0)
            throw new ImageFormatException($"{Where}: compressed cluster of compression type {_header.CompressionType} (zstd; compression_type at offset 104) cannot be read: only deflate (0) is supported");
        var (hostOffset, sectors) = CompressedDescriptor(entry);
        ulong compressedSize = sectors * 512 - (hostOffset & 511);
        long fileLength = RandomAccess.GetLength(_file);
        if (hostOffset >= (ulong)fileLength)
            throw new ImageFormatException($"{Where}: compressed cluster at host offset 0x{hostOffset:x} lies past the end of the file ({fileLength} bytes)");
        var packed = new byte[Math.Min(compressedSize, (ulong)fileLength - hostOffset)];
        RandomAccess.Read(_file, packed, (long)hostOffset);
        var output = new byte[_clusterSize];
        try
        {
            using var inflater = new DeflateStream(new MemoryStream(packed), CompressionMode.Decompress);
            int total = 0;
            while (total < output.Length)
            {
                int n = inflater.Read(output, total, output.Length - total);
                if (n == 0)
                    break;
                total += n;
            }
            if (total != output.Length)
                throw new ImageFormatException($"{Where}: compressed cluster at host offset 0x{hostOffset:x} inflates to {total} bytes, not {output.Length}");
        }
        catch (InvalidDataException e)
        {
            throw new ImageFormatException($"{Where}: compressed cluster at host offset 0x{hostOffset:x} is not valid deflate data", e);
        }
        _decompressed = output;
        _decompressedEntry = entry;
        return output;
    }

    // ---------------------------------------------------------------- table lookups

    /// <summary>The L2 entry for a guest cluster (0 when no L2 table covers it).</summary>
    private ulong GetL2Entry(ulong guestCluster)
    {
        ulong l1Index = guestCluster / (ulong)_l2Entries;
        ulong l2Offset = _l1[l1Index] & OffsetMask;
        if (l2Offset == 0)
            return 0;
        var table = LoadL2(l2Offset, l1Index);
        ulong entry = table[guestCluster % (ulong)_l2Entries];
        CheckDataEntry(entry, guestCluster);
        return entry;
    }

    private void CheckDataEntry(ulong entry, ulong guestCluster)
    {
        if ((entry & Compressed) != 0)
            return;
        ulong host = entry & OffsetMask;
        if (host == 0)
            return;
        if ((host & (ulong)(_clusterSize - 1)) != 0)
            throw new ImageFormatException($"{Where}: L2 entry for guest cluster {guestCluster} points at unaligned host offset 0x{host:x}");
        if (host >= (ulong)_fileLength)
            throw new ImageFormatException($"{Where}: L2 entry for guest cluster {guestCluster} points at host offset 0x{host:x}, past the end of the file ({_fileLength} bytes)");
    }

    private ulong[] LoadL2(ulong l2Offset, ulong l1Index)
    {
        if (_l2Cache.TryGet(l2Offset, out var table))
            return table;
        if (_dirtyL2.TryGetValue(l2Offset, out var pending))
        {
            // Dropped from the cache with changes not yet written: the memory copy is the current one.
            _l2Cache.Add(l2Offset, pending.Table!);
            return pending.Table!;
        }
        if ((l2Offset & (ulong)(_clusterSize - 1)) != 0 || l2Offset + (ulong)_clusterSize > (ulong)_fileLength)
            throw new ImageFormatException($"{Where}: L1 entry {l1Index} points at L2 table offset 0x{l2Offset:x}, outside the {_fileLength}-byte file or unaligned");
        var raw = new byte[_clusterSize];
        RandomAccess.Read(_file, raw, (long)l2Offset);
        table = new ulong[_l2Entries];
        for (int i = 0; i < table.Length; i++)
            table[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
        _l2Cache.Add(l2Offset, table);
        return table;
    }

    // ---------------------------------------------------------------- writes

    public void Write(ulong offset, ReadOnlySpan<byte> source)
    {
        CheckWritable();
        CheckRange(offset, (ulong)source.Length);
        bool marked = false;
        while (!source.IsEmpty)
        {
            ulong host;
            int n;
            NewClusters run = default;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (!marked)
                {
                    MarkBitmaps(offset, (ulong)source.Length);
                    marked = true;
                }
                n = MapOwnRun(offset, source.Length, forWrite: true, out host);
                if (n == 0)
                {
                    run = AllocateWholeClusters(offset, source.Length);
                    if (run.Count == 0)
                    {
                        n = PieceLength(offset, source.Length);
                        WriteInCluster(offset, source[..n]);
                        offset += (ulong)n;
                        source = source[n..];
                        continue;
                    }
                    n = run.Count << _clusterBits;
                    host = run.Host;
                }
            }
            // Overwriting this image's own unshared clusters needs no metadata change, and the data
            // of whole new clusters is not visible until their L2 entries are set below: either
            // way the data goes to the file outside the lock, so that requests on other threads
            // (and the file system) are not held up by it.
            try
            {
                RandomAccess.Write(_file, source[..n], (long)host);
            }
            catch when (run.Count > 0)
            {
                lock (_lock)
                    ReleaseUnmapped(run);
                throw;
            }
            if (run.Count > 0)
            {
                lock (_lock)
                {
                    ObjectDisposedException.ThrowIf(_disposed, this);
                    MapNewClusters(run);
                }
            }
            offset += (ulong)n;
            source = source[n..];
        }
    }

    /// <summary>Whole clusters taken for a write, not yet mapped: guest cluster, count, host offset.</summary>
    private readonly record struct NewClusters(ulong GuestCluster, int Count, ulong Host);

    /// <summary>
    /// When the write at <paramref name="offset"/> covers one or more whole guest clusters that hold
    /// no host cluster (unallocated, or zero clusters without one), takes that many contiguous new
    /// clusters for them (all under one L2 table) so that one write can fill them. Returns a count
    /// of 0 when the write does not start that way.
    /// </summary>
    private NewClusters AllocateWholeClusters(ulong offset, int length)
    {
        if ((offset & ClusterMask) != 0 || length < _clusterSize)
            return default;
        ulong guestCluster = offset >> _clusterBits;
        int index = (int)(guestCluster % (ulong)_l2Entries);
        int max = Math.Min(length >> _clusterBits, _l2Entries - index);
        ulong[] table = GetWritableL2(guestCluster, out _);
        int count = 0;
        while (count < max && HoldsNoCluster(table[index + count]))
            count++;
        if (count == 0)
            return default;
        return new NewClusters(guestCluster, count, AllocateClusters(count, forData: true));
    }

    // An L2 entry that points at no host cluster: unallocated, or a zero cluster without one.
    private static bool HoldsNoCluster(ulong entry) => (entry & (Compressed | OffsetMask)) == 0;

    /// <summary>Points the L2 entries of written-out new clusters at them.</summary>
    private void MapNewClusters(NewClusters run)
    {
        ulong[] table = GetWritableL2(run.GuestCluster, out ulong l2Offset);
        int index = (int)(run.GuestCluster % (ulong)_l2Entries);
        for (int i = 0; i < run.Count; i++)
        {
            // Another thread may have mapped the cluster meanwhile (an overlapping write): this
            // write, which covered the whole cluster, comes after it and replaces it.
            ulong old = table[index + i];
            SetL2Entry(table, l2Offset, index + i, (run.Host + ((ulong)i << _clusterBits)) | Copied);
            ReleaseDataCluster(old);
        }
    }

    // Frees new clusters whose data could not be written; nothing points at them.
    private void ReleaseUnmapped(NewClusters run)
    {
        if (_disposed)
            return;
        for (int i = 0; i < run.Count; i++)
            AddRefcount((run.Host >> _clusterBits) + (ulong)i, -1);
    }

    // Writes bytes that lie within one guest cluster, allocating (and copying what the rest of
    // the cluster held) when the cluster is not already this image's own, unshared data.
    private void WriteInCluster(ulong offset, ReadOnlySpan<byte> data)
    {
        ulong guestCluster = offset >> _clusterBits;
        ulong inCluster = offset & (ulong)(_clusterSize - 1);
        ulong[] table = GetWritableL2(guestCluster, out ulong l2Offset);
        int index = (int)(guestCluster % (ulong)_l2Entries);
        ulong entry = table[index];
        CheckDataEntry(entry, guestCluster);
        bool ownData = (entry & Copied) != 0 && (entry & Compressed) == 0 && (entry & OffsetMask) != 0
                       && !((entry & ZeroFlag) != 0 && _header.Version >= 3);
        if (ownData)
        {
            RandomAccess.Write(_file, data, (long)((entry & OffsetMask) + inCluster));
            return;
        }

        ulong host = AllocateClusters(1, forData: true);
        if (data.Length == _clusterSize || ReadsAsZeros(entry, guestCluster))
        {
            // Nothing else of the cluster survives, or it read as zeros: a new cluster already
            // reads as zeros (it lies past everything ever written, in the part of the file that
            // allocation extended without writing), so only the new bytes need writing.
            RandomAccess.Write(_file, data, (long)(host + inCluster));
        }
        else
        {
            // Build the whole new cluster: what the guest saw there before, with the new bytes on top.
            var cluster = _clusterBuffer ??= new byte[_clusterSize];
            ReadInCluster(guestCluster << _clusterBits, cluster);
            data.CopyTo(cluster.AsSpan((int)inCluster));
            RandomAccess.Write(_file, cluster, (long)host);
        }
        SetL2Entry(table, l2Offset, index, host | Copied);
        ReleaseDataCluster(entry);
    }

    // Whether a guest cluster whose L2 entry is `entry` reads as zeros all through.
    private bool ReadsAsZeros(ulong entry, ulong guestCluster)
    {
        if ((entry & Compressed) != 0)
            return false;
        if ((entry & ZeroFlag) != 0 && _header.Version >= 3)
            return true;
        if ((entry & OffsetMask) != 0)
            return false;
        return Backing is null || guestCluster << _clusterBits >= Backing.Size;
    }

    public void WriteZeroes(ulong offset, ulong length)
    {
        CheckWritable();
        CheckRange(offset, length);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            MarkBitmaps(offset, length);
            ForEachCluster(offset, length, (start, count, whole) =>
            {
                if (!whole)
                {
                    WriteZeroBytes(start, count);
                    return;
                }
                ulong guestCluster = start >> _clusterBits;
                ulong current = GetL2Entry(guestCluster);
                if (current == 0 && Backing is null)
                    return; // already reads as zeros
                if (_header.Version < 3)
                {
                    WriteZeroBytes(start, count); // version 2 has no zero flag
                    return;
                }
                SetDataEntry(guestCluster, ZeroFlag);
            });
        }
    }

    public void Discard(ulong offset, ulong length)
    {
        CheckWritable();
        CheckRange(offset, length);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            MarkBitmaps(offset, length);
            ForEachCluster(offset, length, (start, count, whole) =>
            {
                ulong guestCluster = start >> _clusterBits;
                if (!whole)
                {
                    // Part of a cluster cannot be freed; make it read as zeros unless it already does.
                    if (GetL2Entry(guestCluster) != 0 || Backing is not null)
                        WriteZeroBytes(start, count);
                    return;
                }
                if (Backing is null)
                    SetDataEntry(guestCluster, 0);
                else if (_header.Version >= 3)
                    SetDataEntry(guestCluster, ZeroFlag);
                else
                    SetDataEntry(guestCluster, 0); // version 2: the backing data shows through again
            });
        }
    }

    private void WriteZeroBytes(ulong offset, ulong count)
    {
        if (ReadsAsZeros(GetL2Entry(offset >> _clusterBits), offset >> _clusterBits))
            return;
        var zeros = new byte[count];
        WriteInCluster(offset, zeros);
    }

    // Replaces a guest cluster's L2 entry with one that holds no data (0 or the zero flag) and
    // frees what it pointed at.
    private void SetDataEntry(ulong guestCluster, ulong newEntry)
    {
        ulong l1Index = guestCluster / (ulong)_l2Entries;
        if ((_l1[l1Index] & OffsetMask) == 0 && newEntry == 0)
            return;
        ulong[] table = GetWritableL2(guestCluster, out ulong l2Offset);
        int index = (int)(guestCluster % (ulong)_l2Entries);
        ulong old = table[index];
        if (old == newEntry)
            return;
        CheckDataEntry(old, guestCluster);
        SetL2Entry(table, l2Offset, index, newEntry);
        ReleaseDataCluster(old);
    }

    // Calls back for each piece of [offset, offset+length) that lies in one cluster, saying whether
    // the piece is the whole cluster (or the whole of the image's last, partial cluster).
    private void ForEachCluster(ulong offset, ulong length, Action<ulong, ulong, bool> piece)
    {
        ulong end = offset + length;
        while (offset < end)
        {
            ulong pieceEnd = Math.Min(end, (offset | ClusterMask) + 1);
            bool whole = (offset & ClusterMask) == 0 && pieceEnd - offset == Math.Min((ulong)_clusterSize, Size - offset);
            piece(offset, pieceEnd - offset, whole);
            offset = pieceEnd;
        }
    }

    /// <summary>
    /// The L2 table for a guest cluster, made this image's own first: allocated if absent, copied
    /// if shared with a snapshot (its L1 entry lacks the COPIED flag).
    /// </summary>
    private ulong[] GetWritableL2(ulong guestCluster, out ulong l2Offset)
    {
        ulong l1Index = guestCluster / (ulong)_l2Entries;
        ulong l1Entry = _l1[l1Index];
        l2Offset = l1Entry & OffsetMask;
        if (l2Offset != 0 && (l1Entry & Copied) != 0)
            return LoadL2(l2Offset, l1Index);

        ulong[] table = l2Offset == 0 ? new ulong[_l2Entries] : (ulong[])LoadL2(l2Offset, l1Index).Clone();
        ulong newOffset = AllocateClusters(1);
        WriteTable(newOffset, table);
        _l2Cache.Add(newOffset, table);
        SetL1Entry(l1Index, newOffset | Copied);
        if (l2Offset != 0)
        {
            _l2Cache.Remove(l2Offset);
            AddRefcount(l2Offset >> _clusterBits, -1);
        }
        l2Offset = newOffset;
        return table;
    }

    /// <summary>
    /// Changes an L2 entry. When the old entry held no host cluster, the change only adds a
    /// reference (or a zero flag) and waits in memory for the next write-back, which writes the
    /// refcounts first. Otherwise it takes a reference away, and the caller lowers that refcount
    /// next: the entry is written through now, after the refcounts still pending (the new entry
    /// may point at a cluster counted only in memory).
    /// </summary>
    private void SetL2Entry(ulong[] table, ulong l2Offset, int index, ulong entry)
    {
        ulong old = table[index];
        table[index] = entry;
        if (_decompressed is not null)
            _decompressed = null;
        if (HoldsNoCluster(old))
        {
            ref var pending = ref CollectionsMarshal.GetValueRefOrAddDefault(_dirtyL2, l2Offset, out _);
            pending.Table = table;
            pending.Add(index, index + 1);
            if (_dirtyL2.Count > _l2Cache.Capacity)
                WriteBackMetadata();
            return;
        }
        WriteBackRefcounts();
        Span<byte> raw = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(raw, entry);
        RandomAccess.Write(_file, raw, (long)(l2Offset + (ulong)index * 8));
    }

    /// <summary>
    /// Writes the metadata that allocating writes kept in memory: first the raised refcounts, then
    /// the L2 entries that point at those clusters (their data is already in the file). With
    /// <paramref name="durableOrder"/> the refcounts (and data) are made durable before the L2
    /// entries are written, so that the order holds across a power failure too.
    /// </summary>
    private void WriteBackMetadata(bool durableOrder = false)
    {
        if (_dirtyL2.Count == 0)
        {
            WriteBackRefcounts();
            return;
        }
        if (_dirtyRefBlocks.Count > 0)
        {
            WriteBackRefcounts();
            if (durableOrder)
                RandomAccess.FlushToDisk(_file);
        }
        var raw = _tableBuffer ??= new byte[_clusterSize];
        foreach (var (l2Offset, range) in _dirtyL2)
        {
            var table = range.Table!;
            for (int i = range.From; i < range.To; i++)
                BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan((i - range.From) * 8), table[i]);
            RandomAccess.Write(_file, raw.AsSpan(0, (range.To - range.From) * 8), (long)(l2Offset + (ulong)range.From * 8));
        }
        _dirtyL2.Clear();
    }

    private void SetL1Entry(ulong index, ulong entry)
    {
        _l1[index] = entry;
        Span<byte> raw = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(raw, entry);
        RandomAccess.Write(_file, raw, (long)(_header.L1TableOffset + index * 8));
    }

    private void WriteTable(ulong hostOffset, ulong[] table)
    {
        var raw = new byte[table.Length * 8];
        for (int i = 0; i < table.Length; i++)
            BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), table[i]);
        RandomAccess.Write(_file, raw, (long)hostOffset);
    }

    // Lowers the refcount of whatever host cluster(s) a replaced L2 entry pointed at.
    private void ReleaseDataCluster(ulong entry)
    {
        if ((entry & Compressed) != 0)
        {
            var (hostOffset, sectors) = CompressedDescriptor(entry);
            ulong last = hostOffset + sectors * 512 - (hostOffset & 511) - 1;
            for (ulong c = hostOffset >> _clusterBits; c <= last >> _clusterBits; c++)
                AddRefcount(c, -1);
            return;
        }
        ulong host = entry & OffsetMask;
        if (host != 0)
            AddRefcount(host >> _clusterBits, -1);
    }

    public void Flush()
    {
        if (ReadOnly)
            return;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            WriteBackMetadata(durableOrder: true);
            RandomAccess.FlushToDisk(_file);
        }
    }

    // ---------------------------------------------------------------- allocation map

    public IReadOnlyList<Extent> GetAllocation(ulong offset, ulong length)
    {
        CheckRange(offset, length);
        var result = new List<Extent>();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            ulong end = offset + length;
            ulong l1Span = (ulong)_clusterSize * (ulong)_l2Entries;
            while (offset < end)
            {
                ulong clusterEnd = Math.Min(end, (offset | ClusterMask) + 1);
                if ((_l1[offset / l1Span] & OffsetMask) == 0)
                    clusterEnd = Math.Min(end, (offset / l1Span + 1) * l1Span); // a whole unmapped L2 range at once
                ulong entry = GetL2Entry(offset >> _clusterBits);
                ExtentKind kind;
                if ((entry & Compressed) != 0 || ((entry & OffsetMask) != 0 && !((entry & ZeroFlag) != 0 && _header.Version >= 3)))
                    kind = ExtentKind.Data;
                else if ((entry & ZeroFlag) != 0 && _header.Version >= 3)
                    kind = ExtentKind.Zero;
                else
                    kind = ExtentKind.Unallocated;

                if (kind == ExtentKind.Unallocated && Backing is not null && offset < Backing.Size)
                {
                    ulong backEnd = Math.Min(clusterEnd, Backing.Size);
                    foreach (var e in Backing.GetAllocation(offset, backEnd - offset))
                        Append(result, e with { Depth = e.Depth + 1 });
                    if (backEnd < clusterEnd)
                        Append(result, new Extent(backEnd, clusterEnd - backEnd, ExtentKind.Unallocated, 1));
                }
                else
                {
                    Append(result, new Extent(offset, clusterEnd - offset, kind, 0));
                }
                offset = clusterEnd;
            }
        }
        return result;
    }

    private static void Append(List<Extent> list, Extent e)
    {
        if (list.Count > 0)
        {
            var last = list[^1];
            if (last.Kind == e.Kind && last.Depth == e.Depth && last.Offset + last.Length == e.Offset)
            {
                list[^1] = last with { Length = last.Length + e.Length };
                return;
            }
        }
        list.Add(e);
    }

    // ---------------------------------------------------------------- helpers

    private void CheckRange(ulong offset, ulong length)
    {
        if (offset > Size || length > Size - offset)
            throw new ArgumentOutOfRangeException(nameof(offset),
                $"image {ImageText.Escape(Path)}: range at offset {offset} with length {length} is beyond the image size {Size}");
    }

    /// <summary>
    /// Every write starts here: refused on a read-only image; on a writable one the first write of
    /// a session first clears the autoclear features the engine does not maintain (see
    /// <see cref="MaintainedAutoclear"/>) and starts recording writes in the enabled bitmaps.
    /// </summary>
    private void CheckWritable()
    {
        if (ReadOnly)
            throw new InvalidOperationException($"image {ImageText.Escape(Path)} is open read-only");
        // Every write comes through here: after the first, one volatile read and no lock.
        if (Volatile.Read(ref _writesPrepared))
            return;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            PrepareWrites();
        }
    }

    /// <summary>Under the lock, once per session (again after the bitmaps are stored): see <see cref="CheckWritable"/>.</summary>
    private void PrepareWrites()
    {
        if (_writesPrepared)
            return;
        ClearUnmaintainedAutoclear(MaintainedAutoclear);
        StartTrackingBitmaps();
        Volatile.Write(ref _writesPrepared, true);
    }

    /// <summary>Set once the first write of a session has been prepared for (cleared again when the bitmaps are stored).</summary>
    private bool _writesPrepared;

    /// <summary>
    /// The autoclear feature bits the engine keeps up to date when it writes. The qcow2
    /// specification asks a writer to clear every autoclear bit whose feature it does not
    /// maintain, before its first write, so that no later reader trusts metadata the writer let
    /// go stale. The engine maintains the persistent dirty bitmaps (bit 0).
    /// </summary>
    public const ulong MaintainedAutoclear = Qcow2Header.AutoclearBitmaps;

    /// <summary>
    /// Clears (on disk, flushed, before anything else is written) every set autoclear bit not in
    /// <paramref name="maintained"/>. A cleared bitmaps bit makes the bitmaps extension inconsistent:
    /// from then on it is ignored, as qemu ignores it.
    /// </summary>
    private void ClearUnmaintainedAutoclear(ulong maintained)
    {
        lock (_lock)
        {
            ulong clear = _header.AutoclearFeatures & ~maintained;
            if (clear == 0 || _header.Version < 3)
                return;
            ulong kept = _header.AutoclearFeatures & maintained;
            Span<byte> field = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(field, kept);
            RandomAccess.Write(_file, field, 88);
            RandomAccess.FlushToDisk(_file);
            _header.AutoclearFeatures = kept;
            if ((clear & Qcow2Header.AutoclearBitmaps) != 0 && _header.Bitmaps is not null)
            {
                _header.Bitmaps = null;
                _header.BitmapsIgnored = true;
                _bitmaps = [];
                _slots = null;
            }
        }
    }

    /// <summary>Writes the metadata still in memory (without waiting for the disk), then closes the file.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            try
            {
                if (!ReadOnly)
                {
                    WriteBackMetadata();
                    StoreBitmaps();
                    TrimFile();
                }
            }
            finally
            {
                _file.Dispose();
                Backing?.Dispose();
            }
        }
    }

    /// <summary>
    /// A small LRU cache of L2 tables by host offset. Eviction only drops a table: one with
    /// changes not yet written stays in the image's pending set until written back.
    /// </summary>
    private sealed class L2Cache(int capacity)
    {
        public int Capacity => capacity;

        private readonly Dictionary<ulong, LinkedListNode<(ulong Offset, ulong[] Table)>> _map = new();
        private readonly LinkedList<(ulong Offset, ulong[] Table)> _order = new();

        public bool TryGet(ulong offset, out ulong[] table)
        {
            if (_map.TryGetValue(offset, out var node))
            {
                _order.Remove(node);
                _order.AddFirst(node);
                table = node.Value.Table;
                return true;
            }
            table = null!;
            return false;
        }

        public void Add(ulong offset, ulong[] table)
        {
            Remove(offset);
            var node = _order.AddFirst((offset, table));
            _map[offset] = node;
            while (_map.Count > capacity)
            {
                var last = _order.Last!;
                _order.RemoveLast();
                _map.Remove(last.Value.Offset);
            }
        }

        public void Remove(ulong offset)
        {
            if (_map.Remove(offset, out var node))
                _order.Remove(node);
        }
    }
}
