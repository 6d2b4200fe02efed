using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace Kvm.Storage.Qcow2;

// Reference counts and cluster allocation. New clusters are taken from the end of the file;
// a cluster's refcount is written before anything that points at it. The counts of new data
// clusters may stay in memory for a while (see WriteBackMetadata): they reach the file before the
// L2 entries that point at those clusters. Every other refcount change is written through.
public sealed partial class Qcow2Image
{
    private ulong[] _refTable = [];
    private readonly Dictionary<ulong, byte[]> _refBlocks = new();
    // Refcount blocks whose raised counts are not written yet: block offset -> changed bytes [From, To).
    private readonly Dictionary<ulong, DirtyRange> _dirtyRefBlocks = new();
    // Where the clusters in use end (the next allocation goes here), in bytes.
    private long _fileLength;
    // How long the file really is: past _fileLength when it was extended ahead of allocations.
    private long _physicalLength;
    private ulong _nextCluster;

    /// <summary>How far ahead of new data clusters the file is extended (sparse), in clusters.</summary>
    private const int GrowthClusters = 64;

    /// <summary>A range of changed entries (L2) or bytes (refcount blocks) not yet written to the file.</summary>
    private struct DirtyRange
    {
        public ulong[]? Table;
        public int From, To;

        public void Add(int from, int to)
        {
            if (To == 0)
            {
                (From, To) = (from, to);
                return;
            }
            From = Math.Min(From, from);
            To = Math.Max(To, to);
        }
    }

    private int EntriesPerBlock => _clusterSize * 8 / _header.RefcountBits;

    private void LoadRefcountTable(long fileLength)
    {
        _fileLength = fileLength;
        _physicalLength = fileLength;
        _nextCluster = ((ulong)fileLength + (ulong)_clusterSize - 1) >> _clusterBits;
        int entries = (int)(_header.RefcountTableClusters * (ulong)_clusterSize / 8);
        var raw = new byte[entries * 8];
        RandomAccess.Read(_file, raw, (long)_header.RefcountTableOffset);
        _refTable = new ulong[entries];
        for (int i = 0; i < entries; i++)
        {
            ulong e = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            ulong offset = e & ~(ulong)0x1ff;
            if (offset != 0 && ((offset & (ulong)(_clusterSize - 1)) != 0 || !InFile(offset, (ulong)_clusterSize, fileLength)))
                throw new ImageFormatException(
                    $"{Where}: refcount table entry {i} points at block offset 0x{offset:x}, outside the {fileLength}-byte file or unaligned");
            if (offset == 0 && e != 0)
                throw new ImageFormatException($"{Where}: refcount table entry {i} has reserved bits set (0x{e:x})");
            _refTable[i] = offset;
        }
        // The L1 and refcount tables must not share clusters (Parse already kept both off the header).
        ulong l1Start = _header.L1TableOffset, l1End = l1Start + (ulong)_header.L1Size * 8;
        ulong rtStart = _header.RefcountTableOffset, rtEnd = rtStart + (ulong)_header.RefcountTableClusters * (ulong)_clusterSize;
        if (_header.L1Size > 0 && l1Start < rtEnd && rtStart < l1End)
            throw new ImageFormatException(
                $"{Where}: the L1 table (0x{l1Start:x}+{l1End - l1Start}) overlaps the refcount table (0x{rtStart:x}+{rtEnd - rtStart})");
    }

    /// <summary>True when [offset, offset+length) lies inside a file of <paramref name="fileLength"/> bytes (no overflow).</summary>
    private static bool InFile(ulong offset, ulong length, long fileLength) =>
        offset <= (ulong)fileLength && length <= (ulong)fileLength - offset;

    /// <summary>The refcount of a host cluster (0 when no refcount block covers it).</summary>
    public ulong GetRefcount(ulong cluster)
    {
        lock (_lock)
            return RefcountOf(cluster);
    }

    private ulong RefcountOf(ulong cluster)
    {
        ulong blockIndex = cluster / (ulong)EntriesPerBlock;
        if (blockIndex >= (ulong)_refTable.Length || _refTable[blockIndex] == 0)
            return 0;
        return ReadEntry(LoadBlock(_refTable[blockIndex]), (int)(cluster % (ulong)EntriesPerBlock));
    }

    private byte[] LoadBlock(ulong offset)
    {
        if (_refBlocks.TryGetValue(offset, out var block))
            return block;
        block = new byte[_clusterSize];
        RandomAccess.Read(_file, block, (long)offset);
        _refBlocks[offset] = block;
        return block;
    }

    private ulong ReadEntry(byte[] block, int index)
    {
        int bits = _header.RefcountBits;
        switch (bits)
        {
            case 64: return BinaryPrimitives.ReadUInt64BigEndian(block.AsSpan(index * 8));
            case 32: return BinaryPrimitives.ReadUInt32BigEndian(block.AsSpan(index * 4));
            case 16: return BinaryPrimitives.ReadUInt16BigEndian(block.AsSpan(index * 2));
            case 8: return block[index];
            default:
                int bit = index * bits;
                return (ulong)(block[bit / 8] >> (bit % 8)) & ((1UL << bits) - 1);
        }
    }

    // Sets an entry in the cached block and writes the byte(s) holding it through to the file.
    // With sub-byte refcounts that byte may carry raised counts of neighbours not yet written back:
    // writing a raised count early is safe (at worst a crash leaks the cluster).
    private void WriteEntry(ulong blockOffset, byte[] block, int index, ulong value)
    {
        WriteEntryInMemory(block, index, value);
        var (byteOffset, byteCount) = EntryBytes(index);
        RandomAccess.Write(_file, block.AsSpan(byteOffset, byteCount), (long)blockOffset + byteOffset);
    }

    // The bytes of a refcount block that hold entry `index`.
    private (int Offset, int Count) EntryBytes(int index)
    {
        int bits = _header.RefcountBits;
        return (bits >= 8 ? index * (bits / 8) : index * bits / 8, Math.Max(1, bits / 8));
    }

    /// <summary>Writes the refcount blocks' raised counts that are still only in memory.</summary>
    private void WriteBackRefcounts()
    {
        if (_dirtyRefBlocks.Count == 0)
            return;
        foreach (var (offset, range) in _dirtyRefBlocks)
            RandomAccess.Write(_file, _refBlocks[offset].AsSpan(range.From, range.To - range.From), (long)offset + range.From);
        _dirtyRefBlocks.Clear();
    }

    private ulong MaxRefcount => _header.RefcountBits == 64 ? ulong.MaxValue : (1UL << _header.RefcountBits) - 1;

    /// <summary>Changes the refcount of an existing cluster; the image must already count it.</summary>
    private void AddRefcount(ulong cluster, int delta)
    {
        ulong blockIndex = cluster / (ulong)EntriesPerBlock;
        if (blockIndex >= (ulong)_refTable.Length || _refTable[blockIndex] == 0)
            throw new ImageFormatException($"{Where}: host cluster {cluster} has no refcount block (refcount table entry {blockIndex})");
        ulong blockOffset = _refTable[blockIndex];
        var block = LoadBlock(blockOffset);
        int index = (int)(cluster % (ulong)EntriesPerBlock);
        ulong current = ReadEntry(block, index);
        ulong next;
        if (delta < 0)
        {
            if (current < (ulong)-delta)
                throw new ImageFormatException($"{Where}: refcount of host cluster {cluster} is {current}; it cannot drop by {-delta}");
            next = current - (ulong)-delta;
        }
        else
        {
            if (MaxRefcount - current < (ulong)delta)
                throw new ImageFormatException($"{Where}: refcount of host cluster {cluster} would exceed {MaxRefcount}");
            next = current + (ulong)delta;
        }
        WriteEntry(blockOffset, block, index, next);
    }

    /// <summary>
    /// Takes <paramref name="count"/> contiguous clusters from the end of the file with refcount 1
    /// and returns the host offset of the first. Refcount blocks (and a larger refcount table) are
    /// added first when the new clusters are not yet covered. For data clusters
    /// (<paramref name="forData"/>) the new counts stay in memory until the next write-back, and
    /// the file is extended (sparse, zeros) ahead of them so that it covers every whole cluster and
    /// the data writes that follow need not grow it one cluster at a time; metadata clusters get
    /// their counts written through, because they are pointed at straight away.
    /// </summary>
    private ulong AllocateClusters(int count, bool forData = false)
    {
        while (true)
        {
            ulong start = _nextCluster;
            ulong last = start + (ulong)count - 1;
            ulong missing = FirstUncoveredBlock(start, last);
            if (missing == ulong.MaxValue)
            {
                for (ulong c = start; c <= last; c++)
                    SetNewRefcount(c, 1, deferred: forData);
                _nextCluster = last + 1;
                _fileLength = Math.Max(_fileLength, (long)(_nextCluster << _clusterBits));
                if (forData && _fileLength > _physicalLength)
                {
                    long length = _fileLength + ((long)GrowthClusters << _clusterBits);
                    RandomAccess.SetLength(_file, length);
                    _physicalLength = length;
                }
                return start << _clusterBits;
            }
            if (missing >= (ulong)_refTable.Length)
            {
                GrowRefcountTable(missing + 1);
                continue;
            }
            AddRefcountBlockAtEnd(missing);
        }
    }

    // The first refcount block index covering [first, last] that does not exist yet, or MaxValue.
    private ulong FirstUncoveredBlock(ulong first, ulong last)
    {
        for (ulong b = first / (ulong)EntriesPerBlock; b <= last / (ulong)EntriesPerBlock; b++)
        {
            if (b >= (ulong)_refTable.Length || _refTable[b] == 0)
                return b;
        }
        return ulong.MaxValue;
    }

    private void SetNewRefcount(ulong cluster, ulong value, bool deferred = false)
    {
        ulong blockIndex = cluster / (ulong)EntriesPerBlock;
        ulong blockOffset = _refTable[blockIndex];
        var block = LoadBlock(blockOffset);
        int index = (int)(cluster % (ulong)EntriesPerBlock);
        if (!deferred)
        {
            WriteEntry(blockOffset, block, index, value);
            return;
        }
        WriteEntryInMemory(block, index, value);
        var (byteOffset, byteCount) = EntryBytes(index);
        CollectionsMarshal.GetValueRefOrAddDefault(_dirtyRefBlocks, blockOffset, out _).Add(byteOffset, byteOffset + byteCount);
    }

    /// <summary>
    /// Shortens the file to the clusters in use when it was extended ahead of them; called when
    /// the image is closed, after the metadata is written.
    /// </summary>
    private void TrimFile()
    {
        if (_physicalLength <= _fileLength)
            return;
        RandomAccess.SetLength(_file, _fileLength);
        _physicalLength = _fileLength;
    }

    /// <summary>
    /// Creates refcount block <paramref name="blockIndex"/> at the end of the file. When the end of
    /// the file falls in the range the new block covers, the block counts itself; when it falls in
    /// a range with an existing block, that block counts it; when it falls in another uncovered
    /// range, that range's block is created first.
    /// </summary>
    private void AddRefcountBlockAtEnd(ulong blockIndex)
    {
        ulong at = _nextCluster;
        ulong atBlock = at / (ulong)EntriesPerBlock;
        if (atBlock != blockIndex && (atBlock >= (ulong)_refTable.Length || _refTable[atBlock] == 0))
        {
            // The end of the file lies in another uncovered range: cover that one first.
            if (atBlock >= (ulong)_refTable.Length)
                GrowRefcountTable(atBlock + 1);
            else
                AddRefcountBlockAtEnd(atBlock);
            return;
        }
        var block = new byte[_clusterSize];
        ulong blockOffset = at << _clusterBits;
        if (atBlock == blockIndex)
        {
            // The new block describes itself.
            _refBlocks[blockOffset] = block;
            WriteEntryInMemory(block, (int)(at % (ulong)EntriesPerBlock), 1);
            RandomAccess.Write(_file, block, (long)blockOffset);
        }
        else
        {
            // Its own refcount lives in an existing block.
            RandomAccess.Write(_file, block, (long)blockOffset);
            _refBlocks[blockOffset] = block;
            SetNewRefcount(at, 1);
        }
        _nextCluster = at + 1;
        _fileLength = Math.Max(_fileLength, (long)(_nextCluster << _clusterBits));
        SetRefTableEntry(blockIndex, blockOffset);
    }

    private void WriteEntryInMemory(byte[] block, int index, ulong value) =>
        SetPackedRefcount(block, index, _header.RefcountBits, value);

    private void SetRefTableEntry(ulong index, ulong blockOffset)
    {
        _refTable[index] = blockOffset;
        Span<byte> raw = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(raw, blockOffset);
        RandomAccess.Write(_file, raw, (long)(_header.RefcountTableOffset + index * 8));
    }

    /// <summary>
    /// Replaces the refcount table with a larger one at the end of the file. The new table, and any
    /// refcount blocks needed to count it, are written before the header points at it; the old
    /// table's clusters are freed after. A crash in between leaves leaked clusters, never a
    /// refcount table that undercounts.
    /// </summary>
    private void GrowRefcountTable(ulong minEntries)
    {
        ulong perCluster = (ulong)_clusterSize / 8;
        ulong entries = Math.Max(minEntries, (ulong)_refTable.Length * 2);
        while (true)
        {
            ulong tableClusters = (entries + perCluster - 1) / perCluster;
            ulong tableStart = _nextCluster;
            ulong end = tableStart + tableClusters; // one past the last cluster used so far
            var newBlocks = new List<(ulong Index, ulong Cluster)>();
            // Cover [tableStart, end) with blocks; each new block goes at 'end' and must be covered too.
            while (true)
            {
                ulong uncovered = ulong.MaxValue;
                for (ulong b = tableStart / (ulong)EntriesPerBlock; b <= (end - 1) / (ulong)EntriesPerBlock; b++)
                {
                    bool exists = (b < (ulong)_refTable.Length && _refTable[b] != 0) || newBlocks.Exists(n => n.Index == b);
                    if (!exists)
                    {
                        uncovered = b;
                        break;
                    }
                }
                if (uncovered == ulong.MaxValue)
                    break;
                newBlocks.Add((uncovered, end));
                end++;
            }
            ulong maxIndex = (end - 1) / (ulong)EntriesPerBlock;
            if (maxIndex >= entries)
            {
                entries = maxIndex + 1 + entries / 2;
                continue;
            }
            if (tableClusters * (ulong)_clusterSize > Qcow2Header.MaxRefcountTableBytes)
                throw new ImageFormatException($"{Where}: the refcount table would exceed {Qcow2Header.MaxRefcountTableBytes >> 20} MiB");

            // 1. New refcount blocks, each counting the clusters of [tableStart, end) in its range.
            foreach (var (index, cluster) in newBlocks)
            {
                var block = new byte[_clusterSize];
                for (ulong c = Math.Max(tableStart, index * (ulong)EntriesPerBlock); c < end && c / (ulong)EntriesPerBlock == index; c++)
                    WriteEntryInMemory(block, (int)(c % (ulong)EntriesPerBlock), 1);
                RandomAccess.Write(_file, block, (long)(cluster << _clusterBits));
                _refBlocks[cluster << _clusterBits] = block;
            }
            // 2. Counts in existing blocks for the new clusters they cover.
            for (ulong c = tableStart; c < end; c++)
            {
                ulong b = c / (ulong)EntriesPerBlock;
                if (b < (ulong)_refTable.Length && _refTable[b] != 0)
                    SetNewRefcount(c, 1);
            }
            // 3. The new table.
            var table = new ulong[tableClusters * perCluster];
            Array.Copy(_refTable, table, _refTable.Length);
            foreach (var (index, cluster) in newBlocks)
                table[index] = cluster << _clusterBits;
            WriteTable(tableStart << _clusterBits, table);
            _nextCluster = end;
            _fileLength = Math.Max(_fileLength, (long)(end << _clusterBits));

            // 4. Point the header at it (offset and size are adjacent fields: one write).
            ulong oldOffset = _header.RefcountTableOffset;
            ulong oldClusters = _header.RefcountTableClusters;
            Span<byte> fields = stackalloc byte[12];
            BinaryPrimitives.WriteUInt64BigEndian(fields, tableStart << _clusterBits);
            BinaryPrimitives.WriteUInt32BigEndian(fields[8..], (uint)tableClusters);
            RandomAccess.Write(_file, fields, 48);
            _header.RefcountTableOffset = tableStart << _clusterBits;
            _header.RefcountTableClusters = (uint)tableClusters;
            _refTable = table;

            // 5. Free the old table.
            for (ulong c = 0; c < oldClusters; c++)
                AddRefcount((oldOffset >> _clusterBits) + c, -1);
            return;
        }
    }
}
