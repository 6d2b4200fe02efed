using System.Buffers.Binary;

namespace Kvm.Storage.FuzzTests;

/// <summary>A named big-endian field of the qcow2 header.</summary>
public sealed record HeaderField(string Name, int Offset, int Width, HeaderFieldRole Role);

/// <summary>What a header field holds, which decides the boundary values tried on it.</summary>
public enum HeaderFieldRole { Magic, Version, Offset, Count, ClusterBits, Size, Features, RefcountOrder, HeaderLength, Byte }

/// <summary>One entry of the internal snapshot table, as found in a seed.</summary>
public sealed record SnapshotEntry(long Position, ulong L1Offset, uint L1Size, int EntryLength);

/// <summary>
/// Where everything lives in a qcow2 file, found by a tolerant parser of its own (so that the
/// mutator does not depend on the engine it is testing). Only plausible pointers are followed:
/// anything misaligned or past the end of the file is left out of the lists.
/// </summary>
public sealed class Qcow2Layout
{
    public const ulong OffsetMask = 0x00ff_ffff_ffff_fe00;
    public const ulong Copied = 1UL << 63, Compressed = 1UL << 62, ZeroFlag = 1;

    public static readonly HeaderField[] HeaderFields =
    [
        new("magic", 0, 4, HeaderFieldRole.Magic),
        new("version", 4, 4, HeaderFieldRole.Version),
        new("backing_file_offset", 8, 8, HeaderFieldRole.Offset),
        new("backing_file_size", 16, 4, HeaderFieldRole.Count),
        new("cluster_bits", 20, 4, HeaderFieldRole.ClusterBits),
        new("size", 24, 8, HeaderFieldRole.Size),
        new("crypt_method", 32, 4, HeaderFieldRole.Count),
        new("l1_size", 36, 4, HeaderFieldRole.Count),
        new("l1_table_offset", 40, 8, HeaderFieldRole.Offset),
        new("refcount_table_offset", 48, 8, HeaderFieldRole.Offset),
        new("refcount_table_clusters", 56, 4, HeaderFieldRole.Count),
        new("nb_snapshots", 60, 4, HeaderFieldRole.Count),
        new("snapshots_offset", 64, 8, HeaderFieldRole.Offset),
        new("incompatible_features", 72, 8, HeaderFieldRole.Features),
        new("compatible_features", 80, 8, HeaderFieldRole.Features),
        new("autoclear_features", 88, 8, HeaderFieldRole.Features),
        new("refcount_order", 96, 4, HeaderFieldRole.RefcountOrder),
        new("header_length", 100, 4, HeaderFieldRole.HeaderLength),
        new("compression_type", 104, 1, HeaderFieldRole.Byte),
    ];

    public int FileLength { get; private init; }
    public bool IsQcow2 { get; private init; }
    public uint Version { get; private init; }
    public int ClusterBits { get; private init; }
    public int ClusterSize => 1 << ClusterBits;
    public ulong Size { get; private init; }
    public uint L1Size { get; private init; }
    public ulong L1Offset { get; private init; }
    public ulong RefcountTableOffset { get; private init; }
    public uint RefcountTableClusters { get; private init; }
    public int RefcountOrder { get; private init; }
    public uint SnapshotCount { get; private init; }
    public ulong SnapshotsOffset { get; private init; }
    public uint HeaderLength { get; private init; }
    public ulong BackingNameOffset { get; private init; }
    public uint BackingNameSize { get; private init; }

    /// <summary>File offsets of the active L1 table's entries.</summary>
    public List<long> L1EntryPositions { get; } = new();
    /// <summary>Host offsets of every L2 table reached from the active or a snapshot L1 table.</summary>
    public List<ulong> L2Tables { get; } = new();
    /// <summary>File offsets of L2 entries that map a (plain) host cluster.</summary>
    public List<long> DataEntryPositions { get; } = new();
    /// <summary>File offsets of L2 entries that describe a compressed cluster.</summary>
    public List<long> CompressedEntryPositions { get; } = new();
    /// <summary>File offsets of L2 entries with the zero flag (version 3).</summary>
    public List<long> ZeroEntryPositions { get; } = new();
    /// <summary>Host offsets of data clusters (plain ones) and the start of compressed data.</summary>
    public List<ulong> DataClusters { get; } = new();
    public List<ulong> CompressedData { get; } = new();
    /// <summary>Host offsets of refcount blocks named by the refcount table.</summary>
    public List<ulong> RefcountBlocks { get; } = new();
    public List<SnapshotEntry> Snapshots { get; } = new();
    /// <summary>File offsets of header extensions (type, length, data), in order, not counting the end marker.</summary>
    public List<int> ExtensionPositions { get; } = new();
    /// <summary>Where the end-of-extensions marker is, or -1.</summary>
    public int ExtensionEnd { get; private init; } = -1;

    public static uint U32(ReadOnlySpan<byte> b, long o) => BinaryPrimitives.ReadUInt32BigEndian(b[(int)o..]);
    public static ulong U64(ReadOnlySpan<byte> b, long o) => BinaryPrimitives.ReadUInt64BigEndian(b[(int)o..]);

    public static Qcow2Layout Parse(byte[] b)
    {
        if (b.Length < 72 || U32(b, 0) != 0x514649fb)
            return new Qcow2Layout { FileLength = b.Length };
        uint version = U32(b, 4);
        int cb = (int)Math.Min(U32(b, 20), 64);
        if (cb is < 9 or > 21 || version is not (2 or 3))
            return new Qcow2Layout { FileLength = b.Length };
        uint hl = version >= 3 && b.Length >= 104 ? U32(b, 100) : 72;
        int extEnd = -1;
        var exts = new List<int>();
        ulong backingOffset = U64(b, 8);
        int limit = (int)Math.Min((ulong)Math.Min(b.Length, 1 << cb), backingOffset == 0 ? ulong.MaxValue : backingOffset);
        for (long pos = hl; pos + 8 <= limit;)
        {
            uint type = U32(b, pos), len = U32(b, pos + 4);
            if (type == 0)
            {
                extEnd = (int)pos;
                break;
            }
            exts.Add((int)pos);
            pos += 8 + (((long)len + 7) & ~7L);
        }

        var l = new Qcow2Layout
        {
            FileLength = b.Length,
            IsQcow2 = true,
            Version = version,
            ClusterBits = cb,
            Size = U64(b, 24),
            L1Size = U32(b, 36),
            L1Offset = U64(b, 40),
            RefcountTableOffset = U64(b, 48),
            RefcountTableClusters = U32(b, 56),
            SnapshotCount = U32(b, 60),
            SnapshotsOffset = U64(b, 64),
            RefcountOrder = version >= 3 && b.Length >= 100 ? (int)U32(b, 96) : 4,
            HeaderLength = hl,
            BackingNameOffset = backingOffset,
            BackingNameSize = U32(b, 16),
            ExtensionEnd = extEnd,
        };
        l.ExtensionPositions.AddRange(exts);
        l.Walk(b);
        return l;
    }

    private bool InFile(ulong offset, ulong bytes) => offset < (ulong)FileLength && bytes <= (ulong)FileLength - offset;

    private bool Aligned(ulong offset) => (offset & ((ulong)ClusterSize - 1)) == 0;

    private void Walk(byte[] b)
    {
        var seenL2 = new HashSet<ulong>();
        WalkL1(b, L1Offset, L1Size, seenL2, L1EntryPositions);
        ulong rtBytes = (ulong)RefcountTableClusters * (ulong)ClusterSize;
        if (RefcountTableOffset != 0 && Aligned(RefcountTableOffset) && InFile(RefcountTableOffset, rtBytes))
        {
            for (ulong i = 0; i < rtBytes / 8; i++)
            {
                ulong e = U64(b, (long)(RefcountTableOffset + i * 8)) & ~0x1ffUL;
                if (e != 0 && Aligned(e) && InFile(e, (ulong)ClusterSize))
                    RefcountBlocks.Add(e);
            }
        }
        if (SnapshotCount > 0 && SnapshotsOffset != 0)
        {
            long pos = (long)Math.Min(SnapshotsOffset, (ulong)FileLength);
            for (uint s = 0; s < Math.Min(SnapshotCount, 1000u) && pos + 40 <= FileLength; s++)
            {
                ulong l1 = U64(b, pos);
                uint l1Size = U32(b, pos + 8);
                int idSize = BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan((int)pos + 12));
                int nameSize = BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan((int)pos + 14));
                uint extra = U32(b, pos + 36);
                int length = (int)((40 + extra + (ulong)idSize + (ulong)nameSize + 7) & ~7UL);
                Snapshots.Add(new SnapshotEntry(pos, l1, l1Size, length));
                WalkL1(b, l1, l1Size, seenL2, null);
                pos += length;
            }
        }
    }

    private void WalkL1(byte[] b, ulong l1Offset, uint l1Size, HashSet<ulong> seenL2, List<long>? positions)
    {
        if (l1Offset == 0 || !Aligned(l1Offset) || !InFile(l1Offset, (ulong)l1Size * 8))
            return;
        int x = 62 - (ClusterBits - 8);
        for (ulong i = 0; i < l1Size; i++)
        {
            long at = (long)(l1Offset + i * 8);
            positions?.Add(at);
            ulong l2 = U64(b, at) & OffsetMask;
            if (l2 == 0 || !Aligned(l2) || !InFile(l2, (ulong)ClusterSize) || !seenL2.Add(l2))
                continue;
            L2Tables.Add(l2);
            for (int j = 0; j < ClusterSize / 8; j++)
            {
                long ep = (long)l2 + j * 8;
                ulong e = U64(b, ep);
                if ((e & Compressed) != 0)
                {
                    CompressedEntryPositions.Add(ep);
                    CompressedData.Add(e & ((1UL << x) - 1));
                }
                else if ((e & ZeroFlag) != 0 && Version >= 3)
                {
                    ZeroEntryPositions.Add(ep);
                }
                else if ((e & OffsetMask) != 0)
                {
                    DataEntryPositions.Add(ep);
                    DataClusters.Add(e & OffsetMask);
                }
            }
        }
    }
}
