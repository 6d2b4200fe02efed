using System.Buffers.Binary;

namespace Kvm.Storage.Qcow2;

/// <summary>What a consistency check found. Corruptions lose or endanger data; leaks only waste space.</summary>
public sealed record CheckResult
{
    public required string Path { get; init; }
    public int Corruptions { get; init; }
    public int Leaks { get; init; }
    public int LeaksFixed { get; init; }
    /// <summary>One line per problem, naming the cluster or table and the values found.</summary>
    public required IReadOnlyList<string> Problems { get; init; }
    /// <summary>Why a repair that was asked for changed nothing (the structure the check could not follow), or null.</summary>
    public string? RepairRefused { get; init; }
    public ulong AllocatedClusters { get; init; }
    public ulong GuestClusters { get; init; }
    public ulong ImageEndOffset { get; init; }

    public bool IsClean => Corruptions == 0 && Leaks == 0;

    /// <summary>The exit status qemu-img check uses: 0 clean, 2 corruptions, 3 leaks only.</summary>
    public int ExitStatus => Corruptions > 0 ? 2 : Leaks > 0 ? 3 : 0;
}

// Consistency check: recount every reference from every structure of the image and compare with
// the refcounts, counting as qemu-img check counts (so that the two agree on every image).
public sealed partial class Qcow2Image
{
    private const ulong MaxCheckClusters = 1UL << 25; // 128 MiB of counters
    private const ulong NoIndex = ulong.MaxValue;
    private const ulong L1Reserved = 0x7f00_0000_0000_01ff, L2Reserved = 0x3f00_0000_0000_01fe;

    /// <summary>Problems listed one by one; past this many they are only counted.</summary>
    public const int MaxListedProblems = 1000;

    /// <summary>Header extensions whose meaning the check knows (none of the others may hold clusters a repair could free).</summary>
    private static readonly uint[] UnderstoodExtensions =
        [Qcow2Header.ExtBackingFormat, Qcow2Header.ExtFeatureNames, Qcow2Header.ExtBitmaps];

    /// <summary>Compatible feature bits whose meaning the check knows: bit 0, lazy refcounts.</summary>
    private const ulong UnderstoodCompatible = 1;

    /// <summary>
    /// Recounts the references to every host cluster (header, refcount table and blocks, the
    /// active L1 table and its L2 tables and data, the snapshot table and every snapshot's L1
    /// table, L2 tables and data, the bitmap directory, bitmap tables and bitmap data) and compares
    /// them with the stored refcounts.
    /// With <paramref name="repairLeaks"/> (the image must be open read-write), clusters whose
    /// refcount is higher than their references get the right count written back, and nothing
    /// else changes. The repair is refused, changing nothing, when the check could not follow
    /// every structure (a table outside the file, unaligned, or of a kind it does not know):
    /// a cluster only such a structure references would look leaked.
    /// </summary>
    public CheckResult Check(bool repairLeaks = false)
    {
        if (repairLeaks && ReadOnly)
            throw new InvalidOperationException($"image {ImageText.Escape(Path)} is open read-only");
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            WriteBackMetadata(); // the tables are read from the file below
            ulong clusters = ((ulong)_fileLength + ClusterMask) >> _clusterBits;
            if (clusters > MaxCheckClusters)
                throw new ImageFormatException($"{Where}: {clusters} host clusters are too many to check in memory");
            var walk = new CheckWalk(this, Math.Max(clusters + 1, _nextCluster));

            walk.Reference(0, (ulong)_clusterSize, "header");
            WalkL1(walk, _header.L1TableOffset, _header.L1Size, "active", active: true);
            foreach (var s in _snapshots)
            {
                string who = $"snapshot {s.Id} ({s.Name})";
                if ((s.L1TableOffset & ClusterMask) != 0)
                {
                    walk.Problems.Report($"ERROR {who} l1_offset=0x{s.L1TableOffset:x}: L1 table is not cluster aligned; snapshot table entry {s.Index} at offset {s.EntryOffset} corrupted");
                    walk.Corrupt($"the L1 table of {who}");
                }
                else if ((ulong)s.L1Size * 8 > Qcow2Header.MaxL1Bytes)
                {
                    walk.Problems.Report($"ERROR {who} l1_size=0x{s.L1Size:x}: L1 table is too large; snapshot table entry {s.Index} at offset {s.EntryOffset} corrupted");
                    walk.Corrupt($"the L1 table of {who}");
                }
                else
                {
                    WalkL1(walk, s.L1TableOffset, s.L1Size, who, active: false);
                }
                // Version 3 snapshots carry at least the large VM state size and the disk size.
                if (_header.Version >= 3 && s.ExtraDataSize < 16)
                {
                    walk.Problems.Report($"ERROR snapshot table entry {s.Index} at offset {s.EntryOffset} is incomplete (extra_data_size {s.ExtraDataSize}, at least 16 in version 3)");
                    walk.Corrupt(null);
                }
            }
            walk.Reference(_header.SnapshotsOffset, _snapshotTableEnd - _header.SnapshotsOffset, "snapshot table");
            walk.Reference(_header.RefcountTableOffset, (ulong)_header.RefcountTableClusters * (ulong)_clusterSize, "refcount table");
            for (int i = 0; i < _refTable.Length; i++)
            {
                if (_refTable[i] != 0)
                    walk.Reference(_refTable[i], (ulong)_clusterSize, "refcount block", (ulong)i);
            }
            if (_header.Bitmaps is { } ext)
            {
                walk.Reference(ext.DirectoryOffset, ext.DirectorySize, "bitmap directory");
                foreach (var b in _bitmaps)
                {
                    walk.Reference(b.TableOffset, (ulong)b.TableSize * 8, $"bitmap table of bitmap '{b.Name}'");
                    string dataWhat = $"data of bitmap '{b.Name}', table entry";
                    ForEachBitmapTableEntry(b, (index, entry) =>
                    {
                        ulong offset = entry & OffsetMask;
                        if (offset != 0 && !walk.Reference(offset, (ulong)_clusterSize, dataWhat, index))
                            walk.Unfollowed ??= $"the data of bitmap '{b.Name}'";
                    });
                }
            }

            string? refused = null;
            if (repairLeaks)
                refused = RepairRefusal(walk);

            // Compare.
            int leaks = 0, fixedLeaks = 0;
            ulong allocated = 0;
            bool wrote = false;
            for (ulong c = 0; c < walk.Length; c++)
            {
                ulong stored = RefcountOf(c);
                ulong want = walk.Count(c);
                if (stored != 0)
                    allocated++;
                if (stored == want)
                    continue;
                if (stored < want)
                {
                    walk.Problems.Report($"ERROR cluster {c} refcount={stored} reference={want}");
                    walk.Corruptions++;
                    continue;
                }
                leaks++;
                if (repairLeaks && refused is null && c / (ulong)EntriesPerBlock < (ulong)_refTable.Length && _refTable[c / (ulong)EntriesPerBlock] != 0)
                {
                    if (want == 1 && walk.ActiveShared(c))
                    {
                        // An active entry without the COPIED flag points at it: at refcount 1 it would need the flag.
                        walk.Problems.Report($"Leaked cluster {c} refcount={stored} reference={want} (not repaired: an active table entry without the COPIED flag points at it)");
                        continue;
                    }
                    if (!wrote)
                    {
                        // Before the first write: the repair keeps the bitmaps consistent (it frees none of their clusters).
                        ClearUnmaintainedAutoclear(MaintainedAutoclear);
                        wrote = true;
                    }
                    AddRefcount(c, -(int)Math.Min(stored - want, int.MaxValue));
                    fixedLeaks++;
                    walk.Problems.Report($"Repaired leaked cluster {c} refcount={stored} reference={want}");
                    continue;
                }
                walk.Problems.Report($"Leaked cluster {c} refcount={stored} reference={want}");
            }
            if (wrote)
                RandomAccess.FlushToDisk(_file);
            // COPIED flags, judged on the refcounts as they are now (after any repair).
            foreach (var (cluster, copied, index, entry, table) in walk.CopiedMismatches)
            {
                ulong now = RefcountOf(cluster);
                if ((now == 1) != copied)
                {
                    walk.Problems.Report($"ERROR OFLAG_COPIED {(table ? "L2 cluster: l1_index=" : "data cluster: guest cluster ")}{index} {(table ? "l1_entry" : "l2_entry")}=0x{entry:x} refcount={now}");
                    walk.Corruptions++;
                }
            }

            return new CheckResult
            {
                Path = Path,
                Corruptions = walk.Corruptions,
                Leaks = leaks - fixedLeaks,
                LeaksFixed = fixedLeaks,
                Problems = walk.Problems.Listed(),
                RepairRefused = leaks > fixedLeaks ? refused : null,
                AllocatedClusters = allocated,
                GuestClusters = (Size + ClusterMask) >> _clusterBits,
                ImageEndOffset = (ulong)_fileLength,
            };
        }
    }

    // Why the check's counts are not a safe basis for freeing clusters, or null when they are.
    private string? RepairRefusal(CheckWalk walk)
    {
        if (walk.Unfollowed is { } what)
            return $"not repaired: the check could not follow {what}, so clusters only it references would look leaked; nothing was changed";
        foreach (var ext in _header.Extensions)
        {
            if (!UnderstoodExtensions.Contains(ext.Type))
                return $"not repaired: header extension 0x{ext.Type:x8} is of an unknown kind and may reference clusters; nothing was changed";
        }
        ulong compat = _header.CompatibleFeatures & ~UnderstoodCompatible;
        if (compat != 0)
            return $"not repaired: compatible_features 0x{_header.CompatibleFeatures:x} at offset 80 has unknown bits (0x{compat:x}) whose structures may reference clusters; nothing was changed";
        return null;
    }

    /// <summary>
    /// Walks one L1 table as qemu-img check does: every L2 table once per L1 entry that names it,
    /// and every data cluster once per L2 entry. For the active table, also the COPIED flags
    /// (set exactly when the refcount is 1).
    /// </summary>
    private void WalkL1(CheckWalk walk, ulong l1Offset, uint l1Size, string owner, bool active)
    {
        if (l1Size == 0)
            return;
        if (!walk.Reference(l1Offset, (ulong)l1Size * 8, $"{owner} L1 table"))
        {
            walk.Unfollowed ??= $"the {owner} L1 table";
            return;
        }
        var walked = new HashSet<ulong>();
        string l2What = $"{owner} L2 table of L1 entry";
        var l2 = new byte[_clusterSize];
        var chunk = new byte[Math.Min(65536, (int)l1Size * 8)];
        for (ulong first = 0; first < l1Size; first += (ulong)chunk.Length / 8)
        {
            int n = (int)Math.Min((ulong)chunk.Length / 8, l1Size - first);
            ReadMetadata(l1Offset + first * 8, chunk.AsSpan(0, n * 8));
            for (int k = 0; k < n; k++)
            {
                ulong i = first + (ulong)k;
                ulong entry = BinaryPrimitives.ReadUInt64BigEndian(chunk.AsSpan(k * 8));
                if (entry == 0)
                    continue;
                if ((entry & L1Reserved) != 0)
                {
                    walk.Problems.Report($"ERROR {owner} L1 entry {i} (0x{entry:x}) has reserved bits set");
                    walk.Corrupt(null);
                }
                ulong l2Offset = entry & OffsetMask;
                if (l2Offset == 0)
                    continue;
                if (!walk.Reference(l2Offset, (ulong)_clusterSize, l2What, i))
                {
                    walk.Unfollowed ??= $"the {owner} L2 table of L1 entry {i}";
                    continue;
                }
                if ((l2Offset & ClusterMask) != 0)
                {
                    walk.Problems.Report($"ERROR {owner} L1 entry {i}: L2 table offset 0x{l2Offset:x} is not cluster aligned");
                    walk.Corrupt($"the {owner} L2 table of L1 entry {i}");
                    continue;
                }
                if (active)
                    walk.NoteActive(l2Offset >> _clusterBits, (entry & Copied) != 0, i, entry, table: true, RefcountOf(l2Offset >> _clusterBits));
                if (!walked.Add(l2Offset))
                {
                    // One table cannot serve two entries of one L1 table. Say so once, and do not
                    // walk it again (an L1 full of aliases would otherwise take minutes).
                    walk.Problems.Report($"ERROR {owner} L1 entry {i} points at L2 table 0x{l2Offset:x}, which an earlier entry already uses");
                    walk.Corrupt(null);
                    continue;
                }
                ReadMetadata(l2Offset, l2);
                WalkL2(walk, l2, i, owner, active);
            }
        }
    }

    private void WalkL2(CheckWalk walk, byte[] raw, ulong l1Index, string owner, bool active)
    {
        string compressedWhat = $"{owner} compressed data of guest cluster", dataWhat = $"{owner} data of guest cluster";
        for (int j = 0; j < _l2Entries; j++)
        {
            ulong e = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(j * 8));
            if (e == 0)
                continue;
            ulong guest = l1Index * (ulong)_l2Entries + (ulong)j;
            if ((e & Compressed) != 0)
            {
                if ((e & Copied) != 0)
                {
                    walk.Problems.Report($"ERROR {owner} L2 entry of guest cluster {guest} (0x{e:x}): the COPIED flag is set on a compressed cluster");
                    walk.Corrupt(null);
                }
                var (host, sectors) = CompressedDescriptor(e);
                walk.Reference(host, sectors * 512 - (host & 511), compressedWhat, guest);
                continue;
            }
            if ((e & L2Reserved) != 0)
            {
                walk.Problems.Report($"ERROR {owner} L2 entry of guest cluster {guest} (0x{e:x}) has reserved bits set");
                walk.Corrupt(null);
            }
            ulong data = e & OffsetMask;
            if (data == 0)
                continue;
            if ((data & ClusterMask) != 0)
            {
                walk.Problems.Report($"ERROR {owner} L2 entry of guest cluster {guest}: data offset 0x{data:x} is not cluster aligned");
                walk.Corrupt(null);
            }
            walk.Reference(data, (ulong)_clusterSize, dataWhat, guest);
            if (active)
                walk.NoteActive(data >> _clusterBits, (e & Copied) != 0, guest, e, table: false, RefcountOf(data >> _clusterBits));
        }
    }

    /// <summary>What one check counts: references per host cluster, problems, and what it could not follow.</summary>
    private sealed class CheckWalk(Qcow2Image image, ulong clusters)
    {
        private uint[] _counts = new uint[clusters];
        private System.Collections.BitArray _activeShared = new((int)Math.Min(clusters, int.MaxValue));

        public ProblemList Problems { get; } = new();
        public int Corruptions;
        /// <summary>The first structure the walk could not follow (a repair must not trust the counts then).</summary>
        public string? Unfollowed;
        public List<(ulong Cluster, bool Copied, ulong Index, ulong Entry, bool Table)> CopiedMismatches { get; } = new();

        public ulong Length => (ulong)_counts.Length;
        public ulong Count(ulong cluster) => _counts[cluster];
        public bool ActiveShared(ulong cluster) => cluster < (ulong)_activeShared.Length && _activeShared[(int)cluster];

        /// <summary>Counts a corruption (reported just before); <paramref name="unfollowed"/> names a structure the walk must skip.</summary>
        public void Corrupt(string? unfollowed)
        {
            Corruptions++;
            if (unfollowed is not null)
                Unfollowed ??= unfollowed;
        }

        /// <summary>
        /// Counts one reference to every cluster of [offset, offset+bytes). As in qemu, a region
        /// may run past the end of the file by less than a cluster (the last cluster may be short
        /// on disk); one that runs further is a corruption, and false is returned.
        /// </summary>
        public bool Reference(ulong offset, ulong bytes, string what, ulong index = NoIndex)
        {
            if (bytes == 0)
                return true;
            ulong fileLength = (ulong)image._fileLength;
            ulong cs = (ulong)image._clusterSize;
            if (offset > long.MaxValue || bytes > long.MaxValue || offset + bytes > fileLength + cs - 1)
            {
                Problems.Report($"ERROR {what}{(index == NoIndex ? "" : " " + index)} at 0x{offset:x} (+{bytes}) runs past the end of the file ({fileLength} bytes) by a cluster or more");
                Corruptions++;
                return false;
            }
            ulong first = offset >> image._clusterBits, last = (offset + bytes - 1) >> image._clusterBits;
            if (last >= (ulong)_counts.Length)
                Array.Resize(ref _counts, (int)last + 1);
            for (ulong c = first; c <= last; c++)
            {
                if (_counts[c] == uint.MaxValue)
                {
                    Problems.Report($"ERROR cluster {c} is referenced more than {uint.MaxValue} times");
                    Corruptions++;
                    continue;
                }
                _counts[c]++;
            }
            return true;
        }

        /// <summary>An active L1 or L2 entry: its COPIED flag must be set exactly when the cluster's refcount is 1.</summary>
        public void NoteActive(ulong cluster, bool copied, ulong index, ulong entry, bool table, ulong refcount)
        {
            if (!copied && cluster < (ulong)_activeShared.Length)
                _activeShared[(int)cluster] = true;
            if ((refcount == 1) != copied)
                CopiedMismatches.Add((cluster, copied, index, entry, table));
        }
    }
}

/// <summary>A problem list that keeps the first <see cref="Qcow2Image.MaxListedProblems"/> lines and counts the rest.</summary>
internal sealed class ProblemList
{
    private readonly List<string> _lines = new();
    private int _unlisted;

    /// <summary>
    /// Adds a problem. The interpolated text is only built while the list has room: past the limit
    /// a damaged image with millions of bad entries costs a counter, not memory.
    /// </summary>
    public void Report([System.Runtime.CompilerServices.InterpolatedStringHandlerArgument("")] ref ProblemText line)
    {
        if (line.Enabled)
            _lines.Add(line.ToStringAndClear());
        else
            _unlisted++;
    }

    public bool HasRoom => _lines.Count < Qcow2Image.MaxListedProblems;

    public IReadOnlyList<string> Listed()
    {
        if (_unlisted == 0)
            return _lines;
        var all = new List<string>(_lines) { $"... and {_unlisted} more problems not listed" };
        return all;
    }
}

/// <summary>Builds a problem's text only when the list will keep it.</summary>
[System.Runtime.CompilerServices.InterpolatedStringHandler]
internal ref struct ProblemText
{
    private System.Runtime.CompilerServices.DefaultInterpolatedStringHandler _inner;

    public ProblemText(int literalLength, int formattedCount, ProblemList list, out bool enabled)
    {
        Enabled = enabled = list.HasRoom;
        _inner = enabled ? new System.Runtime.CompilerServices.DefaultInterpolatedStringHandler(literalLength, formattedCount) : default;
    }

    public bool Enabled { get; }
    public void AppendLiteral(string s) => _inner.AppendLiteral(s);
    public void AppendFormatted<T>(T value) => _inner.AppendFormatted(value);
    public void AppendFormatted<T>(T value, string? format) => _inner.AppendFormatted(value, format);
    public void AppendFormatted(string? value) => _inner.AppendFormatted(value);
    public string ToStringAndClear() => _inner.ToStringAndClear();
}
