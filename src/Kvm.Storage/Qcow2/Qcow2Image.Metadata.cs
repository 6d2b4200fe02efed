using System.Buffers.Binary;

namespace Kvm.Storage.Qcow2;

/// <summary>An internal snapshot: where its entry lies in the snapshot table, its L1 table, its id and name (escaped for printing).</summary>
public sealed record Qcow2Snapshot(int Index, ulong EntryOffset, ulong L1TableOffset, uint L1Size, uint ExtraDataSize, string Id, string Name);

/// <summary>A persistent dirty bitmap: its directory entry and its bitmap table (name escaped for printing).</summary>
public sealed record Qcow2Bitmap(string Name, ulong EntryOffset, ulong TableOffset, uint TableSize, uint Flags, int GranularityBits)
{
    public const uint FlagInUse = 1, FlagAuto = 2;

    /// <summary>The name's bytes as stored (unescaped).</summary>
    public byte[] RawName { get; init; } = [];

    public bool InUse => (Flags & FlagInUse) != 0;
    public bool Auto => (Flags & FlagAuto) != 0;
}

// The variable-size metadata: the snapshot table and the bitmap directory with its bitmap tables.
// Both are read at open and refused on the same grounds as qemu refuses them when it opens an image.
public sealed partial class Qcow2Image
{
    /// <summary>qemu's bounds: extra data per snapshot entry, and the whole snapshot table.</summary>
    public const uint MaxSnapshotExtraData = 1024;
    public const ulong MaxSnapshotTableBytes = 1024UL * Qcow2Header.MaxSnapshots;

    // Bitmap directory entry limits (the qcow2 specification and qemu).
    private const uint BitmapMaxTableSize = 0x800_0000, BitmapMaxNameSize = 1023, BitmapTypeDirty = 1;
    private const ulong BitmapMaxPhysicalBytes = 0x2000_0000;
    private const int BitmapMinGranularity = 9, BitmapMaxGranularity = 31;
    private const ulong BitmapEntryReserved = 0xff00_0000_0000_01fe, BitmapEntryAllOnes = 1;

    private IReadOnlyList<Qcow2Snapshot> _snapshots = [];
    private ulong _snapshotTableEnd;
    private IReadOnlyList<Qcow2Bitmap> _bitmaps = [];

    /// <summary>The internal snapshots, as read from the snapshot table.</summary>
    public IReadOnlyList<Qcow2Snapshot> Snapshots => _snapshots;

    /// <summary>The persistent dirty bitmaps (none when the bitmaps extension is absent or ignored).</summary>
    public IReadOnlyList<Qcow2Bitmap> Bitmaps => _bitmaps;

    private string Where => $"qcow2 image {ImageText.Escape(Path)}";

    /// <summary>Reads <paramref name="dest"/> at a host offset; bytes past the end of the file read as zeros, as in qemu.</summary>
    private void ReadMetadata(ulong offset, Span<byte> dest)
    {
        dest.Clear();
        if (offset >= (ulong)_fileLength)
            return;
        RandomAccess.Read(_file, dest[..(int)Math.Min((ulong)dest.Length, (ulong)_fileLength - offset)], (long)offset);
    }

    /// <summary>
    /// Reads the snapshot table as qemu lays it out: each entry starts at the next multiple of 8,
    /// and nothing pads the last one, so the table ends where the last name ends.
    /// </summary>
    private void LoadSnapshots()
    {
        var list = new List<Qcow2Snapshot>();
        ulong start = _header.SnapshotsOffset, pos = start;
        Span<byte> fixedPart = stackalloc byte[40];
        for (int i = 0; i < (int)_header.SnapshotCount; i++)
        {
            pos = (pos + 7) & ~7UL;
            ulong entry = pos;
            ReadMetadata(pos, fixedPart);
            ulong l1Offset = BinaryPrimitives.ReadUInt64BigEndian(fixedPart);
            uint l1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[8..]);
            ushort idSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[12..]);
            ushort nameSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[14..]);
            uint extra = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[36..]);
            if (extra > MaxSnapshotExtraData)
                throw new ImageFormatException($"{Where}: snapshot table entry {i} at offset {entry}: extra_data_size {extra} at offset {entry + 36} is too large (at most {MaxSnapshotExtraData})");
            pos += 40 + extra;
            string id = ReadName(pos, idSize);
            pos += idSize;
            string name = ReadName(pos, nameSize);
            pos += nameSize;
            if (pos - start > MaxSnapshotTableBytes)
                throw new ImageFormatException($"{Where}: snapshot table at offset {start} is too large: entry {i} ends {pos - start} bytes in (at most {MaxSnapshotTableBytes})");
            list.Add(new Qcow2Snapshot(i, entry, l1Offset, l1Size, extra, id, name));
        }
        _snapshots = list;
        _snapshotTableEnd = pos;
    }

    // A name for messages: at most 1023 bytes of it are read (the rest only counts for the layout).
    private string ReadName(ulong offset, int size)
    {
        var raw = new byte[Math.Min(size, 1023)];
        ReadMetadata(offset, raw);
        return ImageText.Escape(raw) + (size > raw.Length ? "..." : "");
    }

    /// <summary>
    /// Reads the bitmap directory and every bitmap table, refusing what qemu refuses: a directory
    /// that does not hold exactly nb_bitmaps entries ending at its end, entries outside the
    /// constraints of the specification, duplicate names, tables of the wrong size, and table
    /// entries with reserved bits or unaligned offsets.
    /// </summary>
    private void LoadBitmaps()
    {
        if (_header.Bitmaps is not { } ext)
            return;
        var list = new List<Qcow2Bitmap>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        ulong pos = ext.DirectoryOffset, end = ext.DirectoryOffset + ext.DirectorySize;
        string dir = $"bitmap directory at offset {ext.DirectoryOffset} (bitmap_directory_offset at offset {ext.FieldOffset + 16})";
        Span<byte> e = stackalloc byte[24];
        while (pos < end)
        {
            if (end - pos < 24)
                throw new ImageFormatException($"{Where}: {dir}: entry at offset {pos} runs past the directory's end at {end} (bitmap_directory_size {ext.DirectorySize})");
            if (list.Count + 1 > (int)ext.Count)
                throw new ImageFormatException($"{Where}: {dir} holds more bitmaps than nb_bitmaps {ext.Count} at offset {ext.FieldOffset}");
            ReadMetadata(pos, e);
            ulong tableOffset = BinaryPrimitives.ReadUInt64BigEndian(e);
            uint tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            byte type = e[16];
            int granularity = e[17];
            ushort nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            uint extra = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            string at = $"bitmap directory entry {list.Count} at offset {pos}";
            if (extra != 0)
                throw new ImageFormatException($"{Where}: {at}: extra_data_size {extra} at offset {pos + 20} is not 0 (bitmap extra data is not supported)");
            ulong entrySize = (24UL + nameSize + 7) & ~7UL;
            if (entrySize > end - pos)
                throw new ImageFormatException($"{Where}: {at}: name_size {nameSize} at offset {pos + 18} runs past the directory's end at {end}");
            var rawName = new byte[nameSize];
            ReadMetadata(pos + 24, rawName);
            string name = ImageText.Escape(rawName);
            string bm = $"{at} (bitmap '{name}')";
            if (tableSize == 0 || tableSize > BitmapMaxTableSize)
                throw new ImageFormatException($"{Where}: {bm}: bitmap_table_size {tableSize} at offset {pos + 8} is out of range (1 to {BitmapMaxTableSize})");
            if (tableOffset == 0 || (tableOffset & ClusterMask) != 0)
                throw new ImageFormatException($"{Where}: {bm}: bitmap_table_offset 0x{tableOffset:x} at offset {pos} is not a non-zero multiple of the cluster size {_clusterSize}");
            if (granularity is < BitmapMinGranularity or > BitmapMaxGranularity)
                throw new ImageFormatException($"{Where}: {bm}: granularity_bits {granularity} at offset {pos + 17} is out of range ({BitmapMinGranularity} to {BitmapMaxGranularity})");
            if ((flags & ~(Qcow2Bitmap.FlagInUse | Qcow2Bitmap.FlagAuto)) != 0)
                throw new ImageFormatException($"{Where}: {bm}: flags 0x{flags:x} at offset {pos + 12} has reserved bits set");
            if (nameSize > BitmapMaxNameSize)
                throw new ImageFormatException($"{Where}: {bm}: name_size {nameSize} at offset {pos + 18} is too large (at most {BitmapMaxNameSize})");
            if (type != BitmapTypeDirty)
                throw new ImageFormatException($"{Where}: {bm}: type {type} at offset {pos + 16} is unknown (1 is a dirty tracking bitmap)");
            ulong physical = (ulong)tableSize * (ulong)_clusterSize;
            ulong diskBytes = BitmapDiskSize;
            // A bitmap marked in use may have the size of a disk before a resize its writer did
            // not finish saving: qemu accepts that (the bitmap is never read), and so does this.
            if (physical > BitmapMaxPhysicalBytes || ((flags & Qcow2Bitmap.FlagInUse) == 0 && diskBytes > ((physical * 8) << granularity)))
                throw new ImageFormatException($"{Where}: {bm}: bitmap_table_size {tableSize} at offset {pos + 8} does not fit the disk size {diskBytes} at granularity 2^{granularity}");
            if (!names.Add(Convert.ToHexString(rawName)))
                throw new ImageFormatException($"{Where}: {bm}: a bitmap of that name already exists");
            list.Add(new Qcow2Bitmap(name, pos, tableOffset, tableSize, flags, granularity) { RawName = rawName });
            pos += entrySize;
        }
        if (list.Count != (int)ext.Count)
            throw new ImageFormatException($"{Where}: {dir} holds {list.Count} bitmaps, fewer than nb_bitmaps {ext.Count} at offset {ext.FieldOffset}");

        foreach (var b in list)
        {
            ulong diskBytes = BitmapDiskSize;
            ulong expected = BitmapTableSizeFor(b.GranularityBits);
            if (!b.InUse && b.TableSize != expected)
                throw new ImageFormatException($"{Where}: bitmap '{b.Name}' (directory entry at offset {b.EntryOffset}): bitmap_table_size {b.TableSize} at offset {b.EntryOffset + 8} should be {expected} for the disk size {diskBytes} at granularity 2^{b.GranularityBits}");
            ForEachBitmapTableEntry(b, (index, entry) =>
            {
                ulong offset = entry & OffsetMask;
                if ((entry & BitmapEntryReserved) != 0 || (offset != 0 && ((entry & BitmapEntryAllOnes) != 0 || (offset & ClusterMask) != 0)))
                    throw new ImageFormatException($"{Where}: bitmap '{b.Name}': bitmap table entry {index} at offset {b.TableOffset + index * 8} is invalid (0x{entry:x}: reserved bits set or an unaligned offset)");
            });
        }
        _bitmaps = list;
    }

    /// <summary>Calls back with each entry of a bitmap's table, read 64 KiB at a time.</summary>
    private void ForEachBitmapTableEntry(Qcow2Bitmap b, Action<ulong, ulong> visit)
    {
        var chunk = new byte[Math.Min(65536, (int)b.TableSize * 8)];
        for (ulong first = 0; first < b.TableSize; first += (ulong)chunk.Length / 8)
        {
            int n = (int)Math.Min((ulong)chunk.Length / 8, b.TableSize - first);
            ReadMetadata(b.TableOffset + first * 8, chunk.AsSpan(0, n * 8));
            for (int i = 0; i < n; i++)
                visit(first + (ulong)i, BinaryPrimitives.ReadUInt64BigEndian(chunk.AsSpan(i * 8)));
        }
    }
}
