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
    public ulong AllocatedClusters { get; init; }
    public ulong GuestClusters { get; init; }
    public ulong ImageEndOffset { get; init; }

    public bool IsClean => Corruptions == 0 && Leaks == 0;

    /// <summary>The exit status qemu-img check uses: 0 clean, 2 corruptions, 3 leaks only.</summary>
    public int ExitStatus => Corruptions > 0 ? 2 : Leaks > 0 ? 3 : 0;
}

// Consistency check: recount every reference from the tables and compare with the refcounts.
public sealed partial class Qcow2Image
{
    private const ulong MaxCheckClusters = 1UL << 25; // 128 MiB of counters

    /// <summary>Problems listed one by one; past this many they are only counted.</summary>
    public const int MaxListedProblems = 1000;

    /// <summary>
    /// Recounts the references to every host cluster (header, tables, refcount blocks, L2 tables,
    /// data, and the same for every internal snapshot) and compares them with the stored refcounts.
    /// With <paramref name="repairLeaks"/>, clusters whose refcount is higher than their references
    /// get the right count written back (the image must be open read-write).
    /// </summary>
    public CheckResult Check(bool repairLeaks = false)
    {
        if (repairLeaks)
            CheckWritable();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            WriteBackMetadata(); // the tables are read from the file below
            ulong clusters = ((ulong)_fileLength + ClusterMask) >> _clusterBits;
            if (clusters > MaxCheckClusters)
                throw new ImageFormatException($"qcow2 image {Path}: {clusters} host clusters are too many to check in memory");
            var expected = new uint[Math.Max(clusters, _nextCluster)];
            var problems = new ProblemList();
            int corruptions = 0;

            void Reference(ulong offset, ulong bytes, string what, ulong index)
            {
                if (bytes == 0)
                    return;
                if (!InFile(offset, bytes, (long)expected.Length << _clusterBits))
                {
                    problems.Report($"ERROR {Describe(what, index)} at 0x{offset:x} (+{bytes}) lies past the end of the file ({_fileLength} bytes)");
                    corruptions++;
                    return;
                }
                ulong first = offset >> _clusterBits, last = (offset + bytes - 1) >> _clusterBits;
                if (last >= (ulong)expected.Length)
                {
                    problems.Report($"ERROR {Describe(what, index)} at 0x{offset:x} (+{bytes}) lies past the end of the file ({_fileLength} bytes)");
                    corruptions++;
                    return;
                }
                for (ulong c = first; c <= last; c++)
                    expected[c]++;
            }

            Reference(0, (ulong)_clusterSize, "header", NoIndex);
            Reference(_header.RefcountTableOffset, (ulong)_header.RefcountTableClusters * (ulong)_clusterSize, "refcount table", NoIndex);
            for (int i = 0; i < _refTable.Length; i++)
                if (_refTable[i] != 0)
                    Reference(_refTable[i], (ulong)_clusterSize, "refcount block", (ulong)i);

            CountL1(_header.L1TableOffset, _header.L1Size, "active", Reference, problems, ref corruptions, checkCopied: true);

            if (_header.SnapshotCount > 0)
                CountSnapshots(Reference, problems, ref corruptions);

            // Compare.
            int leaks = 0, fixedLeaks = 0;
            ulong allocated = 0;
            for (ulong c = 0; c < (ulong)expected.Length; c++)
            {
                ulong stored = RefcountOf(c);
                ulong want = expected[c];
                if (stored != 0)
                    allocated++;
                if (stored == want)
                    continue;
                if (stored > want)
                {
                    leaks++;
                    problems.Report($"Leaked cluster {c} refcount={stored} reference={want}");
                    if (repairLeaks && !(c / (ulong)EntriesPerBlock >= (ulong)_refTable.Length || _refTable[c / (ulong)EntriesPerBlock] == 0))
                    {
                        AddRefcount(c, -(int)Math.Min(stored - want, int.MaxValue));
                        fixedLeaks++;
                    }
                }
                else
                {
                    corruptions++;
                    problems.Report($"ERROR cluster {c} refcount={stored} reference={want}");
                }
            }
            if (repairLeaks && fixedLeaks > 0)
                RandomAccess.FlushToDisk(_file);

            return new CheckResult
            {
                Path = Path,
                Corruptions = corruptions,
                Leaks = leaks - fixedLeaks,
                LeaksFixed = fixedLeaks,
                Problems = problems.Listed(),
                AllocatedClusters = allocated,
                GuestClusters = (Size + ClusterMask) >> _clusterBits,
                ImageEndOffset = (ulong)_fileLength,
            };
        }
    }

    private delegate void ReferenceFn(ulong offset, ulong bytes, string what, ulong index);

    // "data of guest cluster" + 7 -> "data of guest cluster 7"; NoIndex leaves the text alone.
    private const ulong NoIndex = ulong.MaxValue;
    private static string Describe(string what, ulong index) => index == NoIndex ? what : $"{what} {index}";

    private void CountL1(ulong l1Offset, uint l1Size, string owner, ReferenceFn reference, ProblemList problems, ref int corruptions,
        bool checkCopied)
    {
        reference(l1Offset, (ulong)l1Size * 8, owner + " L1 table", NoIndex);
        ulong[] l1;
        if (owner == "active")
        {
            l1 = _l1;
        }
        else
        {
            var raw = new byte[l1Size * 8];
            RandomAccess.Read(_file, raw, (long)l1Offset);
            l1 = new ulong[l1Size];
            for (int i = 0; i < l1.Length; i++)
                l1[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
        }
        byte[]? l2Buffer = null;
        var walked = new HashSet<ulong>();
        string l2What = owner + " L2 table";
        for (ulong i = 0; i < (ulong)l1.Length; i++)
        {
            ulong l2Offset = l1[i] & OffsetMask;
            if (l2Offset == 0)
                continue;
            if ((l2Offset & ClusterMask) != 0 || l2Offset + (ulong)_clusterSize > (ulong)_fileLength)
            {
                problems.Report($"ERROR {owner} L1 entry {i} points at L2 table 0x{l2Offset:x}, unaligned or past the end of the file");
                corruptions++;
                continue;
            }
            reference(l2Offset, (ulong)_clusterSize, l2What, i);
            if (!walked.Add(l2Offset))
            {
                // One table cannot serve two L1 entries of the same image; say so once, and do not
                // walk it again (an L1 full of aliases would otherwise take minutes).
                problems.Report($"ERROR {owner} L1 entry {i} points at L2 table 0x{l2Offset:x}, which an earlier entry already uses");
                corruptions++;
                continue;
            }
            if (checkCopied && (l1[i] & Copied) != 0 && RefcountOf(l2Offset >> _clusterBits) != 1)
            {
                problems.Report($"ERROR OFLAG_COPIED L2 table 0x{l2Offset:x}: L1 entry {i} says unshared, refcount={RefcountOf(l2Offset >> _clusterBits)}");
                corruptions++;
            }
            l2Buffer ??= new byte[_clusterSize];
            var raw = l2Buffer;
            RandomAccess.Read(_file, raw, (long)l2Offset);
            for (int j = 0; j < _l2Entries; j++)
            {
                ulong e = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(j * 8));
                ulong guest = i * (ulong)_l2Entries + (ulong)j;
                if ((e & Compressed) != 0)
                {
                    var (host, sectors) = CompressedDescriptor(e);
                    reference(host & ~511UL, sectors * 512, "compressed cluster of guest cluster", guest);
                    continue;
                }
                ulong data = e & OffsetMask;
                if (data == 0)
                    continue;
                if ((data & ClusterMask) != 0)
                {
                    problems.Report($"ERROR {owner} L2 entry for guest cluster {guest} points at unaligned host offset 0x{data:x}");
                    corruptions++;
                    continue;
                }
                reference(data, (ulong)_clusterSize, "data of guest cluster", guest);
                if (checkCopied && (e & Copied) != 0 && data >> _clusterBits < (ulong)_fileLength >> _clusterBits
                    && RefcountOf(data >> _clusterBits) != 1)
                {
                    problems.Report($"ERROR OFLAG_COPIED data cluster 0x{data:x} of guest cluster {guest}: L2 says unshared, refcount={RefcountOf(data >> _clusterBits)}");
                    corruptions++;
                }
            }
        }
    }

    // The snapshot table: each entry's L1 table and everything below it hold references too.
    private void CountSnapshots(ReferenceFn reference, ProblemList problems, ref int corruptions)
    {
        ulong pos = _header.SnapshotsOffset;
        ulong start = pos;
        for (uint s = 0; s < _header.SnapshotCount; s++)
        {
            var fixedPart = new byte[40];
            if (!InFile(pos, 40, _fileLength))
            {
                problems.Report($"ERROR snapshot {s} header at 0x{pos:x} lies past the end of the file");
                corruptions++;
                return;
            }
            RandomAccess.Read(_file, fixedPart, (long)pos);
            ulong l1Offset = BinaryPrimitives.ReadUInt64BigEndian(fixedPart);
            uint l1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(8));
            ushort idSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(12));
            ushort nameSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(14));
            uint extraSize = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(36));
            if ((ulong)l1Size * 8 > Qcow2Header.MaxL1Bytes || (l1Offset & ClusterMask) != 0 || !InFile(l1Offset, (ulong)l1Size * 8, _fileLength))
            {
                problems.Report($"ERROR snapshot {s}: L1 table 0x{l1Offset:x} with {l1Size} entries is invalid");
                corruptions++;
            }
            else
            {
                CountL1(l1Offset, l1Size, $"snapshot {s}", reference, problems, ref corruptions, checkCopied: false);
            }
            ulong entry = 40 + (ulong)extraSize + idSize + nameSize;
            pos += (entry + 7) & ~7UL;
            if (pos > (ulong)_fileLength)
            {
                problems.Report($"ERROR snapshot table entry {s} runs past the end of the file");
                corruptions++;
                return;
            }
        }
        reference(start, pos - start, "snapshot table", NoIndex);
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
