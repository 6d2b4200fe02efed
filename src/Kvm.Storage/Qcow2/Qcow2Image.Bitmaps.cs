using System.Buffers.Binary;
using System.Text;

namespace Kvm.Storage.Qcow2;

/// <summary>What <c>vmctl disk bitmap list</c> shows of one persistent bitmap.</summary>
/// <param name="Name">The name, escaped for printing.</param>
/// <param name="Enabled">The auto flag: writes are recorded in it.</param>
/// <param name="InUse">The in-use flag is set in the file: the bitmap may be stale and cannot be trusted, only removed.</param>
/// <param name="DirtyBytes">How many bytes of the disk it records as written (null when it is in use).</param>
public sealed record BitmapInfo(string Name, ulong Granularity, bool Enabled, bool InUse, ulong? DirtyBytes);

// Persistent dirty bitmaps (the qcow2 bitmaps extension), kept as qemu keeps them:
//
// - While the image is open read-write, the enabled bitmaps live in memory. Before the first write
//   of a session each is loaded and its in-use flag set in the file (durably, before any data), so
//   a writer that dies leaves them marked in use: stale, never trusted.
// - On close (and after every bitmap operation) they are stored: data clusters written (in place
//   where the bitmap already had one: the in-use flag covers a torn write), tables written, the
//   file flushed, then the directory with the in-use flags cleared, flushed, and only then are the
//   clusters nothing refers to any more freed. A changed set of bitmaps gets a new directory,
//   written before the header points at it.
// - A bitmap already in use when the image was opened stays as it is: it can only be removed.
public sealed partial class Qcow2Image
{
    /// <summary>A bitmap of the open image: how it is stored, and its bits when loaded.</summary>
    private sealed class BitmapSlot
    {
        public required byte[] RawName;
        public required string Name;
        public required int GranularityBits;
        public bool Enabled;
        /// <summary>The directory entry as the file holds it now (null: not stored yet).</summary>
        public Qcow2Bitmap? Stored;
        /// <summary>In memory, with the in-use flag set in the file (or not stored yet); written back on store.</summary>
        public DirtyBlockBitmap? Bits;

        /// <summary>In use in the file without this session having set it: stale.</summary>
        public bool Stale => Bits is null && Stored is { InUse: true };
    }

    private List<BitmapSlot>? _slots;
    // Bitmaps removed since the last store: their clusters are freed once the directory no longer lists them.
    private readonly List<Qcow2Bitmap> _removedBitmaps = [];
    // The bitmaps that writes mark (loaded and enabled); used under the lock.
    private DirtyBlockBitmap[] _tracked = [];

    /// <summary>The disk size bitmaps cover: whole 512-byte sectors, as qemu counts the disk.</summary>
    private ulong BitmapDiskSize => Size / 512 * 512;

    private uint BitmapTableSizeFor(int granularityBits) =>
        (uint)((DirtyBlockBitmap.DataBytesFor(BitmapDiskSize, granularityBits) + ClusterMask) >> _clusterBits);

    /// <summary>qemu's default granularity for a new bitmap: the cluster size, within 4 KiB to 64 KiB.</summary>
    public int DefaultBitmapGranularityBits => Math.Clamp(_clusterBits, 12, 16);

    private List<BitmapSlot> Slots => _slots ??= _bitmaps.Select(b => new BitmapSlot
    {
        RawName = b.RawName,
        Name = b.Name,
        GranularityBits = b.GranularityBits,
        Enabled = b.Auto,
        Stored = b,
    }).ToList();

    /// <summary>The persistent bitmaps, with how much each records (read from the file, or from memory while loaded).</summary>
    public IReadOnlyList<BitmapInfo> ListBitmaps()
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            return Slots.Select(s => new BitmapInfo(s.Name, 1UL << s.GranularityBits, s.Enabled, s.Stale,
                s.Stale ? null : BitsOf(s).DirtyBytes())).ToList();
        }
    }

    /// <summary>The ranges a bitmap records as written, merged and clipped to the disk's size.</summary>
    public IReadOnlyList<DirtyExtent> GetBitmapExtents(string name)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var slot = FindUsable(name, "exported");
            return BitsOf(slot).Extents();
        }
    }

    /// <summary>The granularity of a bitmap, in bytes.</summary>
    public ulong GetBitmapGranularity(string name)
    {
        lock (_lock)
            return 1UL << Find(name).GranularityBits;
    }

    /// <summary>
    /// Adds a bitmap, empty, with a granularity of 2^<paramref name="granularityBits"/> bytes
    /// (default: <see cref="DefaultBitmapGranularityBits"/>). An enabled one records every write
    /// from now on, in this session and in any program that keeps qcow2 bitmaps (qemu does).
    /// </summary>
    public void AddBitmap(string name, int? granularityBits = null, bool enabled = true)
    {
        var raw = CheckBitmapName(name);
        int g = granularityBits ?? DefaultBitmapGranularityBits;
        if (g is < DirtyBlockBitmap.MinGranularityBits or > DirtyBlockBitmap.MaxGranularityBits)
            throw new ArgumentException($"bitmap granularity {(g is >= 0 and < 63 ? (1UL << g).ToString(System.Globalization.CultureInfo.InvariantCulture) : $"2^{g}")} is out of range (512 bytes to 2 GiB, a power of two)");
        PrepareBitmapChange();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (Slots.Any(s => s.RawName.AsSpan().SequenceEqual(raw)))
                throw new ArgumentException($"{Where}: a bitmap named '{ImageText.Escape(name)}' already exists");
            if (Slots.Count >= (int)Qcow2Header.MaxBitmaps)
                throw new ArgumentException($"{Where}: already holds {Slots.Count} bitmaps, the most an image may hold");
            if (DirtyBlockBitmap.DataBytesFor(BitmapDiskSize, g) > BitmapMaxPhysicalBytes)
                throw new ArgumentException($"bitmap granularity {1UL << g} is too fine for a disk of {Size} bytes: the bitmap would exceed {BitmapMaxPhysicalBytes >> 20} MiB");
            ulong directory = Slots.Aggregate(0UL, (sum, s) => sum + DirectoryEntrySize(s.RawName.Length)) + DirectoryEntrySize(raw.Length);
            if (directory > Qcow2Header.MaxBitmapDirectoryBytes)
                throw new ArgumentException($"{Where}: the bitmap directory would exceed {Qcow2Header.MaxBitmapDirectoryBytes} bytes");
            Slots.Add(new BitmapSlot
            {
                RawName = raw,
                Name = ImageText.Escape(raw),
                GranularityBits = g,
                Enabled = enabled,
                Bits = new DirtyBlockBitmap(BitmapDiskSize, g),
            });
            StoreBitmaps();
        }
    }

    /// <summary>Removes a bitmap (an in-use one too) and frees its clusters.</summary>
    public void RemoveBitmap(string name)
    {
        PrepareBitmapChange();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var slot = Find(name);
            Slots.Remove(slot);
            if (slot.Stored is { } stored)
                _removedBitmaps.Add(stored);
            StoreBitmaps();
        }
    }

    /// <summary>Enables (the auto flag: writes are recorded) or disables a bitmap.</summary>
    public void SetBitmapEnabled(string name, bool enabled)
    {
        PrepareBitmapChange();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var slot = FindUsable(name, enabled ? "enabled" : "disabled");
            slot.Enabled = enabled;
            StoreBitmaps();
        }
    }

    /// <summary>Clears every bit of a bitmap (what a full backup does before the next incremental one).</summary>
    public void ClearBitmap(string name)
    {
        PrepareBitmapChange();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var slot = FindUsable(name, "cleared");
            LoadSlots([slot]);
            slot.Bits!.Clear();
            StoreBitmaps();
        }
    }

    /// <summary>Sets in <paramref name="target"/> every range <paramref name="source"/> records (granularities may differ).</summary>
    public void MergeBitmap(string source, string target)
    {
        PrepareBitmapChange();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var from = FindUsable(source, "merged from");
            var into = FindUsable(target, "merged into");
            var bits = BitsOf(from);
            LoadSlots([into]);
            into.Bits!.Merge(bits);
            StoreBitmaps();
        }
    }

    private static byte[] CheckBitmapName(string name)
    {
        var raw = Encoding.UTF8.GetBytes(name);
        if (raw.Length == 0)
            throw new ArgumentException("a bitmap name cannot be empty");
        if (raw.Length > BitmapMaxNameSize)
            throw new ArgumentException($"bitmap name '{ImageText.Escape(name)}' is {raw.Length} bytes long (at most {BitmapMaxNameSize})");
        return raw;
    }

    private BitmapSlot Find(string name)
    {
        var raw = Encoding.UTF8.GetBytes(name);
        return Slots.FirstOrDefault(s => s.RawName.AsSpan().SequenceEqual(raw))
               ?? throw new ArgumentException($"{Where} has no bitmap named '{ImageText.Escape(name)}'"
                                              + (Slots.Count == 0 ? "" : $" (it has: {string.Join(", ", Slots.Select(s => $"'{s.Name}'"))})"));
    }

    private BitmapSlot FindUsable(string name, string verb)
    {
        var slot = Find(name);
        if (slot.Stale)
            throw new InvalidOperationException(
                $"{Where}: bitmap '{slot.Name}' is marked in use: the program that last wrote the image stopped without saving it, " +
                $"so it may miss writes and cannot be {verb}; remove it, and start the next backup from a full copy");
        return slot;
    }

    /// <summary>A bitmap operation writes the image: refused read-only, and on version 2 (no autoclear bits, no bitmaps).</summary>
    private void PrepareBitmapChange()
    {
        if (ReadOnly)
            throw new InvalidOperationException($"image {ImageText.Escape(Path)} is open read-only");
        ClearUnmaintainedAutoclear(MaintainedAutoclear);
        if (_header.Version < 3)
            throw new InvalidOperationException($"{Where} is a version 2 image: persistent bitmaps need version 3 (convert it with 'vmctl disk convert')");
    }

    /// <summary>A slot's bits: its memory copy when loaded, else a copy read from the file.</summary>
    private DirtyBlockBitmap BitsOf(BitmapSlot slot) => slot.Bits ?? ReadBitmapData(slot.Stored!);

    /// <summary>Reads a stored bitmap's data (a table entry of offset 0 reads as all zeros, or all ones with bit 0 set).</summary>
    private DirtyBlockBitmap ReadBitmapData(Qcow2Bitmap b)
    {
        var bits = new DirtyBlockBitmap(BitmapDiskSize, b.GranularityBits);
        ulong dataBytes = bits.DataBytes;
        var cluster = new byte[_clusterSize];
        ForEachBitmapTableEntry(b, (index, entry) =>
        {
            ulong at = index << _clusterBits;
            if (at >= dataBytes)
                return;
            int n = (int)Math.Min((ulong)_clusterSize, dataBytes - at);
            ulong offset = entry & OffsetMask;
            if (offset == 0)
            {
                if ((entry & BitmapEntryAllOnes) != 0)
                    bits.SetBytes(at, (ulong)n);
                return;
            }
            ReadMetadata(offset, cluster.AsSpan(0, n));
            bits.Load(at, cluster.AsSpan(0, n));
        });
        bits.ResetChanged();
        return bits;
    }

    /// <summary>
    /// Loads stored bitmaps into memory and sets their in-use flags in the file, flushed before
    /// anything else is written: from then on the file says they may be stale until they are stored.
    /// </summary>
    private void LoadSlots(IEnumerable<BitmapSlot> slots)
    {
        bool wrote = false;
        Span<byte> flags = stackalloc byte[4];
        foreach (var slot in slots)
        {
            if (slot.Bits is not null || slot.Stale)
                continue;
            var stored = slot.Stored!;
            slot.Bits = ReadBitmapData(stored);
            BinaryPrimitives.WriteUInt32BigEndian(flags, stored.Flags | Qcow2Bitmap.FlagInUse);
            RandomAccess.Write(_file, flags, (long)stored.EntryOffset + 12);
            wrote = true;
        }
        if (wrote)
            RandomAccess.FlushToDisk(_file);
        _tracked = Slots.Where(s => s.Enabled && s.Bits is not null).Select(s => s.Bits!).ToArray();
    }

    /// <summary>Before the first write of a session: the enabled bitmaps are loaded and marked in use.</summary>
    private void StartTrackingBitmaps()
    {
        if (_header.Bitmaps is null && _slots is null)
            return;
        LoadSlots(Slots.Where(s => s.Enabled).ToList());
    }

    /// <summary>
    /// Records a write of [offset, offset+length) in every enabled bitmap; called under the lock,
    /// before the write's data goes anywhere. Under the lock, a bitmap operation on another thread
    /// cannot store the bitmaps between this mark and the check that they are still loaded (a store
    /// unloads them: the write then loads and marks them in use again first).
    /// </summary>
    private void MarkBitmaps(ulong offset, ulong length)
    {
        PrepareWrites();
        foreach (var bits in _tracked)
            bits.Mark(offset, length);
    }

    /// <summary>Resizes the bitmaps with the disk: all of them are loaded first (a stale one makes the resize refused).</summary>
    private void PrepareBitmapsForResize()
    {
        if (_header.Bitmaps is null && _slots is null)
            return;
        if (Slots.FirstOrDefault(s => s.Stale) is { } stale)
            throw new InvalidOperationException($"{Where}: bitmap '{stale.Name}' is marked in use (stale) and cannot be resized with the disk; remove it first");
        LoadSlots(Slots);
    }

    private void ResizeBitmaps()
    {
        if (_slots is null)
            return;
        foreach (var s in _slots)
            s.Bits?.Resize(BitmapDiskSize);
    }

    private static ulong DirectoryEntrySize(int nameLength) => (24UL + (ulong)nameLength + 7) & ~7UL;

    /// <summary>
    /// Writes the loaded bitmaps back and the directory with their in-use flags cleared (see the
    /// notes at the top of this file for the order). Afterwards nothing is loaded: the next write
    /// loads the enabled bitmaps and marks them in use again.
    /// </summary>
    private void StoreBitmaps()
    {
        if (_slots is null || (_slots.All(s => s.Bits is null && s.Stored is not null && s.Stored.Auto == s.Enabled) && _removedBitmaps.Count == 0))
            return;
        var free = new List<ulong>(); // host clusters to free once the new directory is in place
        var tables = new Dictionary<BitmapSlot, (ulong Offset, uint Size)>();
        var cluster = new byte[_clusterSize];
        foreach (var slot in _slots)
        {
            if (slot.Bits is not { } bits)
                continue;
            uint size = BitmapTableSizeFor(slot.GranularityBits);
            bool sameTable = slot.Stored is not null && slot.Stored.TableSize == size;
            if (sameTable && !bits.Changed)
            {
                tables[slot] = (slot.Stored!.TableOffset, size);
                continue;
            }
            var old = slot.Stored is { } st ? ReadBitmapTable(st) : [];
            var table = new ulong[size];
            for (uint i = 0; i < size; i++)
            {
                ulong at = (ulong)i << _clusterBits;
                int n = (int)Math.Min((ulong)_clusterSize, bits.DataBytes - at);
                bits.CopyTo(at, cluster.AsSpan(0, n));
                cluster.AsSpan(n).Clear();
                ulong oldHost = i < old.Length ? old[i] & OffsetMask : 0;
                if (!cluster.AsSpan().ContainsAnyExcept((byte)0))
                {
                    if (oldHost != 0)
                        free.Add(oldHost >> _clusterBits);
                    continue;
                }
                ulong host = oldHost != 0 ? oldHost : AllocateClusters(1);
                RandomAccess.Write(_file, cluster, (long)host);
                table[i] = host;
            }
            for (long i = size; i < old.Length; i++)
            {
                if ((old[i] & OffsetMask) != 0)
                    free.Add((old[i] & OffsetMask) >> _clusterBits);
            }
            ulong tableBytes = (ulong)size * 8;
            ulong tableOffset;
            if (sameTable)
            {
                tableOffset = slot.Stored!.TableOffset;
            }
            else
            {
                tableOffset = AllocateClusters((int)((tableBytes + ClusterMask) >> _clusterBits));
                if (slot.Stored is { } s)
                    FreeRange(free, s.TableOffset, (ulong)s.TableSize * 8);
            }
            var raw = new byte[tableBytes];
            for (int i = 0; i < table.Length; i++)
                BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), table[i]);
            RandomAccess.Write(_file, raw, (long)tableOffset);
            tables[slot] = (tableOffset, size);
        }
        foreach (var removed in _removedBitmaps)
        {
            foreach (var e in ReadBitmapTable(removed))
            {
                if ((e & OffsetMask) != 0)
                    free.Add((e & OffsetMask) >> _clusterBits);
            }
            FreeRange(free, removed.TableOffset, (ulong)removed.TableSize * 8);
        }
        RandomAccess.FlushToDisk(_file); // the data and tables before any directory says they are valid

        // The new directory.
        var entries = new List<(BitmapSlot Slot, ulong Offset, uint Size, uint Flags)>();
        foreach (var slot in _slots)
        {
            var (offset, size) = tables.TryGetValue(slot, out var t) ? t : (slot.Stored!.TableOffset, slot.Stored.TableSize);
            uint flags = (slot.Stale ? Qcow2Bitmap.FlagInUse : 0) | (slot.Enabled ? Qcow2Bitmap.FlagAuto : 0);
            entries.Add((slot, offset, size, flags));
        }
        ulong dirSize = entries.Aggregate(0UL, (sum, e) => sum + DirectoryEntrySize(e.Slot.RawName.Length));
        var dir = new byte[dirSize];
        int pos = 0;
        foreach (var (slot, offset, size, flags) in entries)
        {
            BinaryPrimitives.WriteUInt64BigEndian(dir.AsSpan(pos), offset);
            BinaryPrimitives.WriteUInt32BigEndian(dir.AsSpan(pos + 8), size);
            BinaryPrimitives.WriteUInt32BigEndian(dir.AsSpan(pos + 12), flags);
            dir[pos + 16] = (byte)BitmapTypeDirty;
            dir[pos + 17] = (byte)slot.GranularityBits;
            BinaryPrimitives.WriteUInt16BigEndian(dir.AsSpan(pos + 18), (ushort)slot.RawName.Length);
            slot.RawName.CopyTo(dir.AsSpan(pos + 24));
            pos += (int)DirectoryEntrySize(slot.RawName.Length);
        }
        var ext = _header.Bitmaps;
        bool sameLayout = ext is not null && ext.Count == entries.Count && ext.DirectorySize == dirSize
                          && entries.All(e => e.Slot.Stored is { } s && s.TableOffset == e.Offset && s.TableSize == e.Size
                                              && s.EntryOffset - ext.DirectoryOffset == (ulong)OffsetInDirectory(entries, e.Slot));
        ulong dirOffset;
        if (sameLayout)
        {
            // Only flags differ: each lies within one sector, so each entry is either as it was
            // (in use, so not trusted) or as it is now.
            dirOffset = ext!.DirectoryOffset;
            RandomAccess.Write(_file, dir, (long)dirOffset);
            RandomAccess.FlushToDisk(_file);
        }
        else if (entries.Count == 0)
        {
            dirOffset = 0;
            RewriteBitmapsExtension(null);
            if (ext is not null)
                FreeRange(free, ext.DirectoryOffset, ext.DirectorySize);
        }
        else
        {
            dirOffset = AllocateClusters((int)((dirSize + ClusterMask) >> _clusterBits));
            RandomAccess.Write(_file, dir, (long)dirOffset);
            RandomAccess.FlushToDisk(_file);
            var data = new byte[24];
            BinaryPrimitives.WriteUInt32BigEndian(data, (uint)entries.Count);
            BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(8), dirSize);
            BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(16), dirOffset);
            if (ext is not null)
            {
                // One write of the extension's 24 bytes switches to the new directory.
                RandomAccess.Write(_file, data, ext.FieldOffset);
                RandomAccess.FlushToDisk(_file);
                _header.Bitmaps = ext with { Count = (uint)entries.Count, DirectorySize = dirSize, DirectoryOffset = dirOffset };
                int i = _header.Extensions.FindIndex(x => x.Type == Qcow2Header.ExtBitmaps);
                _header.Extensions[i] = new Qcow2Extension(Qcow2Header.ExtBitmaps, data);
                FreeRange(free, ext.DirectoryOffset, ext.DirectorySize);
            }
            else
            {
                RewriteBitmapsExtension(data);
            }
        }

        foreach (ulong c in free)
            AddRefcount(c, -1);
        _removedBitmaps.Clear();

        // What the file holds now.
        var stored = new List<Qcow2Bitmap>();
        pos = 0;
        foreach (var (slot, offset, size, flags) in entries)
        {
            slot.Stored = new Qcow2Bitmap(slot.Name, dirOffset + (ulong)pos, offset, size, flags, slot.GranularityBits) { RawName = slot.RawName };
            slot.Bits = null;
            stored.Add(slot.Stored);
            pos += (int)DirectoryEntrySize(slot.RawName.Length);
        }
        _bitmaps = stored;
        _tracked = [];
        Volatile.Write(ref _writesPrepared, false); // the next write loads and marks the enabled bitmaps again
    }

    private static int OffsetInDirectory(List<(BitmapSlot Slot, ulong Offset, uint Size, uint Flags)> entries, BitmapSlot slot)
    {
        int pos = 0;
        foreach (var e in entries)
        {
            if (e.Slot == slot)
                return pos;
            pos += (int)DirectoryEntrySize(e.Slot.RawName.Length);
        }
        return -1;
    }

    private void FreeRange(List<ulong> free, ulong offset, ulong bytes)
    {
        for (ulong c = offset >> _clusterBits; c < (offset + bytes + ClusterMask) >> _clusterBits; c++)
            free.Add(c);
    }

    private ulong[] ReadBitmapTable(Qcow2Bitmap b)
    {
        var table = new ulong[b.TableSize];
        ForEachBitmapTableEntry(b, (i, e) => table[i] = e);
        return table;
    }

    /// <summary>
    /// Rewrites the header cluster with the bitmaps extension <paramref name="data"/> (null: none)
    /// and autoclear bit 0 set to match, keeping every other field and extension.
    /// </summary>
    private void RewriteBitmapsExtension(byte[]? data)
    {
        var raw = new byte[_clusterSize];
        RandomAccess.Read(_file, raw, 0);
        var header = Qcow2Header.Parse(raw, _fileLength, Path);
        header.Extensions.RemoveAll(e => e.Type == Qcow2Header.ExtBitmaps);
        if (data is not null)
        {
            header.Extensions.Add(new Qcow2Extension(Qcow2Header.ExtBitmaps, data));
            header.AutoclearFeatures |= Qcow2Header.AutoclearBitmaps;
        }
        else
        {
            header.AutoclearFeatures &= ~Qcow2Header.AutoclearBitmaps;
        }
        header.BackingFileOffset = 0;
        header.BackingFileSize = 0;
        var bytes = header.Serialize();
        RandomAccess.Write(_file, bytes, 0);
        RandomAccess.FlushToDisk(_file);
        var written = Qcow2Header.Parse(bytes, _fileLength, Path);
        _header.AutoclearFeatures = written.AutoclearFeatures;
        _header.Bitmaps = written.Bitmaps;
        _header.BitmapsIgnored = false;
        _header.Extensions.Clear();
        _header.Extensions.AddRange(written.Extensions);
    }
}
