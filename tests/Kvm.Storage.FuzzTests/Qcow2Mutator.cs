using System.Buffers.Binary;
using System.Globalization;
using System.Text;

namespace Kvm.Storage.FuzzTests;

/// <summary>The named ways <see cref="Qcow2Mutator"/> damages an image.</summary>
public enum Qcow2MutationKind
{
    /// <summary>One header field set to a boundary value (0, 1, max, huge, unaligned, past EOF, the header itself, another table).</summary>
    HeaderField,
    /// <summary>Two header fields set at once (e.g. size and l1_size together).</summary>
    HeaderFieldPair,
    /// <summary>Random bytes of the header cluster flipped.</summary>
    HeaderByteFlip,
    /// <summary>A header extension's type or length set to a boundary value, or a new extension written.</summary>
    HeaderExtension,
    /// <summary>Bytes of the backing file name changed (when the image has one).</summary>
    BackingName,
    /// <summary>An active L1 entry set to a boundary value.</summary>
    L1Entry,
    /// <summary>Random bytes of the active L1 table flipped.</summary>
    L1ByteFlip,
    /// <summary>An L2 entry set to a boundary value (flags, offsets, compressed descriptors).</summary>
    L2Entry,
    /// <summary>Random bytes of an L2 table flipped.</summary>
    L2ByteFlip,
    /// <summary>A compressed-cluster descriptor's offset or sector count changed.</summary>
    CompressedEntry,
    /// <summary>Two tables made to share clusters (L1 over the refcount table, an L2 that is the L1, ...).</summary>
    TableOverlap,
    /// <summary>A refcount table entry set to a boundary value.</summary>
    RefcountTableEntry,
    /// <summary>Random bytes of the refcount table flipped.</summary>
    RefcountTableByteFlip,
    /// <summary>Random bytes of a refcount block flipped.</summary>
    RefcountBlockByteFlip,
    /// <summary>A whole refcount block filled with 0x00 or 0xff.</summary>
    RefcountBlockFill,
    /// <summary>A field of an internal snapshot table entry set to a boundary value.</summary>
    SnapshotField,
    /// <summary>Random bytes of the snapshot table flipped.</summary>
    SnapshotByteFlip,
    /// <summary>Random bytes of data clusters (plain or compressed) flipped.</summary>
    DataByteFlip,
    /// <summary>The file cut short at a boundary or random point.</summary>
    Truncate,
    /// <summary>Random bytes anywhere in the file flipped.</summary>
    AnyByteFlip,
}

/// <summary>A damaged image: the bytes to write, and what was done to them (enough to redo it by hand).</summary>
public sealed record Qcow2Mutation(Qcow2MutationKind Kind, string Description, byte[] Bytes);

/// <summary>
/// Deterministic damage to a qcow2 image. Given the same seed image and the same
/// <see cref="Random"/> state, <see cref="Mutate(Random)"/> produces the same bytes, so that a case
/// is reproduced by its (seed image, case number) pair alone.
/// </summary>
public sealed class Qcow2Mutator
{
    private readonly byte[] _seed;
    private readonly Qcow2Layout _layout;
    private readonly Qcow2MutationKind[] _kinds;

    public Qcow2Mutator(byte[] seed)
    {
        _seed = seed;
        _layout = Qcow2Layout.Parse(seed);
        _kinds = Enum.GetValues<Qcow2MutationKind>().Where(Applicable).ToArray();
    }

    public Qcow2Layout Layout => _layout;

    /// <summary>The kinds this seed offers material for (no snapshot kinds without snapshots, ...).</summary>
    public IReadOnlyList<Qcow2MutationKind> Kinds => _kinds;

    public bool Applicable(Qcow2MutationKind kind) => kind switch
    {
        Qcow2MutationKind.BackingName => _layout.BackingNameOffset != 0 && _layout.BackingNameSize > 0,
        Qcow2MutationKind.L1Entry or Qcow2MutationKind.L1ByteFlip => _layout.L1EntryPositions.Count > 0,
        Qcow2MutationKind.L2Entry or Qcow2MutationKind.L2ByteFlip => _layout.L2Tables.Count > 0,
        Qcow2MutationKind.CompressedEntry => _layout.CompressedEntryPositions.Count > 0,
        Qcow2MutationKind.RefcountTableEntry or Qcow2MutationKind.RefcountTableByteFlip => _layout.RefcountTableClusters > 0 && _layout.IsQcow2,
        Qcow2MutationKind.RefcountBlockByteFlip or Qcow2MutationKind.RefcountBlockFill => _layout.RefcountBlocks.Count > 0,
        Qcow2MutationKind.SnapshotField or Qcow2MutationKind.SnapshotByteFlip => _layout.Snapshots.Count > 0,
        Qcow2MutationKind.DataByteFlip => _layout.DataClusters.Count > 0 || _layout.CompressedData.Count > 0,
        _ => _layout.IsQcow2 || kind is Qcow2MutationKind.Truncate or Qcow2MutationKind.AnyByteFlip,
    };

    /// <summary>A mutation of a kind chosen by <paramref name="rng"/> among <see cref="Kinds"/>.</summary>
    public Qcow2Mutation Mutate(Random rng) => Mutate(_kinds[rng.Next(_kinds.Length)], rng);

    public Qcow2Mutation Mutate(Qcow2MutationKind kind, Random rng)
    {
        if (!Applicable(kind))
            throw new ArgumentException($"mutation {kind} does not apply to this seed");
        var e = new Editor((byte[])_seed.Clone());
        switch (kind)
        {
            case Qcow2MutationKind.HeaderField:
                SetHeaderField(e, rng, Qcow2Layout.HeaderFields[rng.Next(Qcow2Layout.HeaderFields.Length)]);
                break;
            case Qcow2MutationKind.HeaderFieldPair:
            {
                int a = rng.Next(Qcow2Layout.HeaderFields.Length), b = rng.Next(Qcow2Layout.HeaderFields.Length - 1);
                if (b >= a)
                    b++;
                SetHeaderField(e, rng, Qcow2Layout.HeaderFields[a]);
                SetHeaderField(e, rng, Qcow2Layout.HeaderFields[b]);
                break;
            }
            case Qcow2MutationKind.HeaderByteFlip:
                FlipBytes(e, rng, 0, Math.Min(_layout.ClusterSize, _seed.Length), "header cluster", rng.Next(1, 9));
                break;
            case Qcow2MutationKind.HeaderExtension:
                MutateExtension(e, rng);
                break;
            case Qcow2MutationKind.BackingName:
                MutateBackingName(e, rng);
                break;
            case Qcow2MutationKind.L1Entry:
            {
                long at = Pick(rng, _layout.L1EntryPositions);
                var (v, why) = L1Value(rng, e.U64(at));
                e.Set64(at, v, $"L1 entry {(at - (long)_layout.L1Offset) / 8} ({why})");
                break;
            }
            case Qcow2MutationKind.L1ByteFlip:
                FlipBytes(e, rng, (long)_layout.L1Offset, (long)Math.Min((ulong)_layout.L1Size * 8, (ulong)_seed.Length - _layout.L1Offset), "L1 table", rng.Next(1, 6));
                break;
            case Qcow2MutationKind.L2Entry:
            {
                long at = PickL2EntryPosition(rng);
                var (v, why) = L2Value(rng, e.U64(at));
                e.Set64(at, v, $"L2 entry at 0x{at:x} ({why})");
                break;
            }
            case Qcow2MutationKind.L2ByteFlip:
            {
                ulong table = Pick(rng, _layout.L2Tables);
                FlipBytes(e, rng, (long)table, Math.Min(_layout.ClusterSize, _seed.Length - (long)table), $"L2 table 0x{table:x}", rng.Next(1, 9));
                break;
            }
            case Qcow2MutationKind.CompressedEntry:
            {
                long at = Pick(rng, _layout.CompressedEntryPositions);
                var (v, why) = CompressedValue(rng, e.U64(at));
                e.Set64(at, v, $"compressed L2 entry at 0x{at:x} ({why})");
                break;
            }
            case Qcow2MutationKind.TableOverlap:
                MakeOverlap(e, rng);
                break;
            case Qcow2MutationKind.RefcountTableEntry:
            {
                ulong entries = Math.Max(1, Math.Min((ulong)_layout.RefcountTableClusters * (ulong)_layout.ClusterSize / 8, 64));
                long at = (long)_layout.RefcountTableOffset + rng.Next((int)entries) * 8;
                if (at < 0 || at + 8 > e.Bytes.Length)
                    goto case Qcow2MutationKind.AnyByteFlip;
                var (v, why) = RefTableValue(rng, e.U64(at));
                e.Set64(at, v, $"refcount table entry {(at - (long)_layout.RefcountTableOffset) / 8} ({why})");
                break;
            }
            case Qcow2MutationKind.RefcountTableByteFlip:
            {
                long start = (long)Math.Min(_layout.RefcountTableOffset, (ulong)_seed.Length);
                long len = Math.Min(Math.Min(_layout.ClusterSize, 512), _seed.Length - start);
                if (len <= 0)
                    goto case Qcow2MutationKind.AnyByteFlip;
                FlipBytes(e, rng, start, len, "refcount table (first entries)", rng.Next(1, 5));
                break;
            }
            case Qcow2MutationKind.RefcountBlockByteFlip:
            {
                ulong block = Pick(rng, _layout.RefcountBlocks);
                // Most of a block counts nothing; aim at the start, where the existing clusters are counted.
                long span = Math.Min(_layout.ClusterSize, rng.Next(2) == 0 ? 256 : _layout.ClusterSize);
                FlipBytes(e, rng, (long)block, span, $"refcount block 0x{block:x}", rng.Next(1, 9));
                break;
            }
            case Qcow2MutationKind.RefcountBlockFill:
            {
                ulong block = Pick(rng, _layout.RefcountBlocks);
                byte fill = rng.Next(2) == 0 ? (byte)0 : (byte)0xff;
                e.Fill((long)block, _layout.ClusterSize, fill, $"refcount block 0x{block:x}");
                break;
            }
            case Qcow2MutationKind.SnapshotField:
                MutateSnapshot(e, rng);
                break;
            case Qcow2MutationKind.SnapshotByteFlip:
            {
                var s = Pick(rng, _layout.Snapshots);
                FlipBytes(e, rng, s.Position, Math.Min(s.EntryLength, e.Bytes.Length - (int)s.Position), $"snapshot entry at 0x{s.Position:x}", rng.Next(1, 5));
                break;
            }
            case Qcow2MutationKind.DataByteFlip:
            {
                bool compressed = _layout.CompressedData.Count > 0 && (_layout.DataClusters.Count == 0 || rng.Next(2) == 0);
                ulong at = compressed ? Pick(rng, _layout.CompressedData) : Pick(rng, _layout.DataClusters);
                long len = Math.Min(compressed ? 256 : _layout.ClusterSize, _seed.Length - (long)at);
                if (len <= 0)
                    goto case Qcow2MutationKind.AnyByteFlip;
                FlipBytes(e, rng, (long)at, len, compressed ? $"compressed data at 0x{at:x}" : $"data cluster 0x{at:x}", rng.Next(1, 9));
                break;
            }
            case Qcow2MutationKind.Truncate:
                Truncate(e, rng);
                break;
            case Qcow2MutationKind.AnyByteFlip:
                FlipBytes(e, rng, 0, e.Bytes.Length, "file", rng.Next(1, 17));
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(kind), kind, null);
        }
        return new Qcow2Mutation(kind, e.Description, e.Bytes);
    }

    // ------------------------------------------------------------------ value choices

    private static T Pick<T>(Random rng, IReadOnlyList<T> list) => list[rng.Next(list.Count)];

    private ulong Cs => (ulong)_layout.ClusterSize;
    private ulong Flen => (ulong)_seed.Length;
    private ulong AlignDown(ulong v) => v & ~(Cs - 1);
    private ulong AlignUp(ulong v) => (v + Cs - 1) & ~(Cs - 1);

    /// <summary>Host offsets worth pointing things at.</summary>
    private (ulong Value, string Why) OffsetValue(Random rng, ulong original)
    {
        var c = new List<(ulong, string)>
        {
            (0, "zero"), (1, "one"), (8, "8"), (64, "inside the header"), (Cs / 2, "half a cluster"), (Cs - 1, "cluster size - 1"),
            (Cs, "one cluster"), (original + 8, "unaligned (+8)"), (original + 512, "+512"), (original + 1, "unaligned (+1)"),
            (original - Cs, "one cluster back"), (original + Cs, "one cluster on"),
            (_layout.L1Offset, "the L1 table"), (_layout.RefcountTableOffset, "the refcount table"),
            (AlignDown(Flen - 1), "the last cluster"), (Flen, "EOF"), (AlignUp(Flen), "EOF rounded up"),
            (AlignUp(Flen) + Cs, "one cluster past EOF"), (AlignUp(Flen) + (Cs << 10), "far past EOF"),
            (1UL << 40, "1 TiB"), (Qcow2Layout.OffsetMask & ~(Cs - 1), "largest maskable offset"),
            (1UL << 62, "2^62"), (1UL << 63, "2^63"), (ulong.MaxValue, "max"), (ulong.MaxValue & ~(Cs - 1), "max aligned"),
            (0UL - Cs, "2^64 - cluster"), (0UL - 2 * Cs, "2^64 - 2 clusters"), (0x8000_0000UL, "2^31"), (0x1_0000_0000UL, "2^32"),
            ((ulong)rng.NextInt64(), "random"), (AlignDown((ulong)rng.NextInt64((long)Flen)), "random aligned in file"),
        };
        if (_layout.L2Tables.Count > 0)
            c.Add((Pick(rng, _layout.L2Tables), "an L2 table"));
        if (_layout.RefcountBlocks.Count > 0)
            c.Add((Pick(rng, _layout.RefcountBlocks), "a refcount block"));
        if (_layout.DataClusters.Count > 0)
            c.Add((Pick(rng, _layout.DataClusters), "a data cluster"));
        if (_layout.SnapshotsOffset != 0)
            c.Add((_layout.SnapshotsOffset, "the snapshot table"));
        return Pick(rng, c);
    }

    private (ulong Value, string Why) CountValue(Random rng, ulong original, int width)
    {
        ulong max = width == 8 ? ulong.MaxValue : (1UL << (width * 8)) - 1;
        var c = new List<(ulong, string)>
        {
            (0, "zero"), (1, "one"), (2, "2"), (3, "3"), (7, "7"), (8, "8"), (original + 1, "+1"), (original - 1, "-1"),
            (original * 2, "double"), (original / 2, "half"), (Cs / 8, "one cluster of entries"), (Cs / 8 + 1, "one cluster of entries + 1"),
            (Flen / 8, "file length / 8"), (Flen / Cs, "file clusters"), (Flen / Cs + 1, "file clusters + 1"),
            (1UL << 22, "2^22"), ((1UL << 22) + 1, "2^22 + 1"), (1UL << 20, "2^20"), (0x7fff_ffff, "int max"), (0x8000_0000, "2^31"),
            (max, "max"), (max - 1, "max - 1"), (1023, "1023"), (1024, "1024"), (65535, "65535"), ((ulong)rng.NextInt64() & max, "random"),
        };
        var (v, why) = Pick(rng, c);
        return (v & max, why);
    }

    private (ulong Value, string Why) SizeValue(Random rng, ulong original)
    {
        ulong perL1 = Cs * (Cs / 8);
        ulong mappable = _layout.L1Size * perL1;
        var c = new List<(ulong, string)>
        {
            (0, "zero"), (1, "one"), (511, "511"), (512, "512"), (original + 1, "+1"), (original - 1, "-1"), (original * 2, "double"),
            (mappable, "all the L1 table maps"), (mappable + 1, "one byte more than the L1 table maps"), (mappable - 1, "mappable - 1"),
            (1UL << 62, "2^62"), ((1UL << 62) + 1, "2^62 + 1"), (1UL << 63, "2^63"), (ulong.MaxValue, "max"), (ulong.MaxValue - Cs + 1, "max - cluster + 1"),
            (1UL << 40, "1 TiB"), ((ulong)rng.NextInt64(), "random"), ((ulong)rng.NextInt64((long)Math.Max(1, mappable)), "random mappable"),
        };
        return Pick(rng, c);
    }

    private static (ulong Value, string Why) FeatureValue(Random rng, ulong original)
    {
        var c = new List<(ulong, string)>
        {
            (0, "zero"), (1, "bit 0 (dirty / lazy refcounts / bitmaps)"), (2, "bit 1 (corrupt)"), (4, "bit 2 (external data file)"),
            (8, "bit 3 (compression type)"), (16, "bit 4 (extended L2)"), (32, "bit 5 (unknown)"), (1UL << 63, "bit 63"),
            (ulong.MaxValue, "all bits"), (original ^ 1, "toggle bit 0"), (original ^ 2, "toggle bit 1"), (original | 8, "set bit 3"),
        };
        return Pick(rng, c);
    }

    private void SetHeaderField(Editor e, Random rng, HeaderField f)
    {
        if (f.Offset + f.Width > e.Bytes.Length)
            return;
        ulong original = e.Read(f.Offset, f.Width);
        (ulong v, string why) = f.Role switch
        {
            HeaderFieldRole.Magic => Pick(rng, new List<(ulong, string)> { (0, "zero"), (0x514649fa, "off by one"), (0x514649fbUL ^ 0x80000000, "top bit"), (0xffffffff, "max") }),
            HeaderFieldRole.Version => Pick(rng, new List<(ulong, string)> { (0, "0"), (1, "1"), (2, "2"), (3, "3"), (4, "4"), (0xffffffff, "max"), (0x80000003, "3 | 2^31") }),
            HeaderFieldRole.ClusterBits => Pick(rng, new List<(ulong, string)>
            {
                (0, "0"), (8, "8"), (9, "9 (512)"), (12, "12 (4 KiB)"), (16, "16 (64 KiB)"), (20, "20"), (21, "21 (2 MiB)"), (22, "22"),
                (31, "31"), (32, "32"), (63, "63"), (64, "64"), (0xffffffff, "max"), (original + 1, "+1"), (original - 1, "-1"),
            }),
            HeaderFieldRole.RefcountOrder => Pick(rng, new List<(ulong, string)>
            {
                (0, "0 (1 bit)"), (1, "1"), (2, "2"), (3, "3 (8 bits)"), (4, "4 (16 bits)"), (5, "5 (32 bits)"), (6, "6 (64 bits)"),
                (7, "7"), (8, "8"), (0xffffffff, "max"),
            }),
            HeaderFieldRole.HeaderLength => Pick(rng, new List<(ulong, string)>
            {
                (0, "0"), (72, "72 (v2 length)"), (100, "100"), (103, "103"), (104, "104"), (105, "105 (unaligned)"), (112, "112"),
                (Cs - 8, "cluster - 8"), (Cs, "cluster"), (Cs + 8, "past the cluster"), (0xffffffff, "max"), (Flen, "file length"),
            }),
            HeaderFieldRole.Offset => OffsetValue(rng, original),
            HeaderFieldRole.Count => CountValue(rng, original, f.Width),
            HeaderFieldRole.Size => SizeValue(rng, original),
            HeaderFieldRole.Features => FeatureValue(rng, original),
            HeaderFieldRole.Byte => Pick(rng, new List<(ulong, string)> { (0, "0 (deflate)"), (1, "1 (zstd)"), (2, "2"), (0xff, "0xff") }),
            _ => throw new InvalidOperationException(),
        };
        e.Set(f.Offset, f.Width, v, $"{f.Name} ({why})");
    }

    private (ulong Value, string Why) L1Value(Random rng, ulong original)
    {
        ulong flags = original & (Qcow2Layout.Copied | Qcow2Layout.Compressed | 0x1ff | ~Qcow2Layout.OffsetMask);
        switch (rng.Next(6))
        {
            case 0:
                return (0, "zero");
            case 1:
                return (original ^ Qcow2Layout.Copied, "COPIED toggled");
            case 2:
                return (original | 0x1ff, "reserved low bits set");
            case 3:
                return (original | (1UL << 62) | (0x7fUL << 56), "reserved high bits set");
            default:
            {
                var (o, why) = OffsetValue(rng, original & Qcow2Layout.OffsetMask);
                bool copied = rng.Next(2) == 0;
                return ((copied ? Qcow2Layout.Copied : 0) | o, $"L2 table at {why}{(copied ? ", COPIED" : "")}; was flags 0x{flags:x}");
            }
        }
    }

    private long PickL2EntryPosition(Random rng)
    {
        // Mostly entries that map something, sometimes empty ones.
        if (_layout.DataEntryPositions.Count > 0 && rng.Next(3) != 0)
            return Pick(rng, _layout.DataEntryPositions);
        if (_layout.CompressedEntryPositions.Count > 0 && rng.Next(2) == 0)
            return Pick(rng, _layout.CompressedEntryPositions);
        if (_layout.ZeroEntryPositions.Count > 0 && rng.Next(2) == 0)
            return Pick(rng, _layout.ZeroEntryPositions);
        ulong table = Pick(rng, _layout.L2Tables);
        int entries = (int)Math.Min(Cs / 8, (Flen - table) / 8);
        return (long)table + rng.Next(Math.Max(1, Math.Min(entries, 64))) * 8;
    }

    private (ulong Value, string Why) L2Value(Random rng, ulong original)
    {
        switch (rng.Next(9))
        {
            case 0:
                return (0, "zero");
            case 1:
                return (Qcow2Layout.ZeroFlag, "zero flag, no host cluster");
            case 2:
                return (original | Qcow2Layout.ZeroFlag, "zero flag added");
            case 3:
                return (original ^ Qcow2Layout.Copied, "COPIED toggled");
            case 4:
                return (original | 0x1fe, "reserved low bits set");
            case 5:
                return CompressedValue(rng, original);
            default:
            {
                var (o, why) = OffsetValue(rng, original & Qcow2Layout.OffsetMask);
                ulong flags = rng.Next(3) switch { 0 => 0, 1 => Qcow2Layout.Copied, _ => Qcow2Layout.Copied | Qcow2Layout.ZeroFlag };
                return (flags | o, $"host cluster at {why}, flags 0x{flags:x}");
            }
        }
    }

    private (ulong Value, string Why) CompressedValue(Random rng, ulong original)
    {
        int cb = _layout.ClusterBits;
        int x = 62 - (cb - 8);
        ulong offsetMask = (1UL << x) - 1;
        ulong sectorMask = (1UL << (cb - 8)) - 1;
        ulong offset = original & offsetMask;
        ulong sectors = (original >> x) & sectorMask;
        switch (rng.Next(8))
        {
            case 0: sectors = sectorMask; break;
            case 1: sectors = 0; break;
            case 2: offset = 0; break;
            case 3: offset = Flen - 1; break;
            case 4: offset = Flen + 512; break;
            case 5: offset = offsetMask; sectors = sectorMask; break;
            case 6: offset = (ulong)rng.NextInt64((long)Flen); break;
            default: offset = (offset + 1) & offsetMask; break;
        }
        bool copied = rng.Next(4) == 0;
        ulong v = Qcow2Layout.Compressed | (copied ? Qcow2Layout.Copied : 0) | (sectors << x) | (offset & offsetMask);
        return (v, $"compressed: host offset 0x{offset & offsetMask:x}, {sectors + 1} sectors{(copied ? ", COPIED" : "")}");
    }

    private (ulong Value, string Why) RefTableValue(Random rng, ulong original)
    {
        switch (rng.Next(5))
        {
            case 0:
                return (0, "zero");
            case 1:
                return (original | (uint)rng.Next(1, 0x200), "reserved low bits set");
            default:
            {
                var (o, why) = OffsetValue(rng, original);
                return (o, $"refcount block at {why}");
            }
        }
    }

    private void MakeOverlap(Editor e, Random rng)
    {
        var choices = new List<Action>
        {
            () => e.Set64(40, _layout.RefcountTableOffset, "l1_table_offset = refcount_table_offset"),
            () => e.Set64(48, _layout.L1Offset, "refcount_table_offset = l1_table_offset"),
            () => e.Set64(48, Cs, "refcount_table_offset = cluster 1 (header's neighbour)"),
            () => e.Set64(40, Cs, "l1_table_offset = cluster 1"),
        };
        if (_layout.L1EntryPositions.Count > 0)
        {
            long l1e = Pick(rng, _layout.L1EntryPositions);
            choices.Add(() => e.Set64(l1e, Qcow2Layout.Copied | _layout.L1Offset, $"L1 entry at 0x{l1e:x} -> the L1 table itself"));
            choices.Add(() => e.Set64(l1e, Qcow2Layout.Copied | _layout.RefcountTableOffset, $"L1 entry at 0x{l1e:x} -> the refcount table"));
            if (_layout.RefcountBlocks.Count > 0)
                choices.Add(() => e.Set64(l1e, Qcow2Layout.Copied | _layout.RefcountBlocks[0], $"L1 entry at 0x{l1e:x} -> a refcount block"));
            choices.Add(() =>
            {
                // Every L1 entry the table's cluster can hold points at one L2 table, and l1_size says so.
                ulong target = _layout.L2Tables.Count > 0 ? _layout.L2Tables[0] : _layout.RefcountTableOffset;
                ulong n = Math.Min(Cs / 8, (Flen - _layout.L1Offset) / 8);
                for (ulong i = 0; i < n; i++)
                    BinaryPrimitives.WriteUInt64BigEndian(e.Bytes.AsSpan((int)(_layout.L1Offset + i * 8)), Qcow2Layout.Copied | target);
                e.Note($"l1_size {e.U32(36)} -> {n} and all {n} L1 entries -> L2 table 0x{target:x}");
                BinaryPrimitives.WriteUInt32BigEndian(e.Bytes.AsSpan(36), (uint)n);
            });
        }
        if (_layout.L2Tables.Count > 0)
        {
            ulong l2 = Pick(rng, _layout.L2Tables);
            choices.Add(() => e.Set64((long)l2, Qcow2Layout.Copied | l2, $"first entry of L2 table 0x{l2:x} -> the L2 table itself"));
            choices.Add(() => e.Set64((long)l2, Qcow2Layout.Copied | _layout.L1Offset, $"first entry of L2 table 0x{l2:x} -> the L1 table"));
            choices.Add(() => e.Set64((long)l2, Qcow2Layout.Copied | _layout.RefcountTableOffset, $"first entry of L2 table 0x{l2:x} -> the refcount table"));
            choices.Add(() =>
            {
                ulong target = _layout.DataClusters.Count > 0 ? _layout.DataClusters[0] : _layout.L1Offset;
                int n = (int)Math.Min(Cs / 8, (Flen - l2) / 8);
                for (int i = 0; i < n; i++)
                    BinaryPrimitives.WriteUInt64BigEndian(e.Bytes.AsSpan((int)l2 + i * 8), Qcow2Layout.Copied | target);
                e.Note($"all {n} entries of L2 table 0x{l2:x} -> host cluster 0x{target:x}");
            });
        }
        if (_layout.RefcountTableOffset != 0 && _layout.RefcountTableOffset + 8 <= Flen)
        {
            long rt = (long)_layout.RefcountTableOffset;
            choices.Add(() => e.Set64(rt, _layout.L1Offset, "refcount table entry 0 -> the L1 table"));
            choices.Add(() => e.Set64(rt, _layout.RefcountTableOffset, "refcount table entry 0 -> the refcount table itself"));
            if (_layout.L2Tables.Count > 0)
                choices.Add(() => e.Set64(rt, _layout.L2Tables[0], "refcount table entry 0 -> an L2 table"));
            if (_layout.RefcountBlocks.Count > 0 && rt + 16 <= (long)Flen)
                choices.Add(() => e.Set64(rt + 8, _layout.RefcountBlocks[0], "refcount table entry 1 -> the same block as entry 0"));
        }
        if (_layout.SnapshotCount > 0)
            choices.Add(() => e.Set64(64, _layout.L1Offset, "snapshots_offset = l1_table_offset"));
        else
            choices.Add(() =>
            {
                e.Set32(60, 1, "nb_snapshots = 1");
                e.Set64(64, _layout.L1Offset, "snapshots_offset = l1_table_offset");
            });
        Pick(rng, choices)();
    }

    private void MutateExtension(Editor e, Random rng)
    {
        int cs = (int)Math.Min(Cs, Flen);
        if (_layout.ExtensionPositions.Count > 0 && rng.Next(3) != 0)
        {
            int at = Pick(rng, _layout.ExtensionPositions);
            uint length = e.U32(at + 4);
            switch (rng.Next(6))
            {
                case 0: e.Set32(at + 4, 0xffffffff, $"length of extension at {at} (max)"); break;
                case 1: e.Set32(at + 4, (uint)(cs - at), $"length of extension at {at} (to the end of the cluster)"); break;
                case 2: e.Set32(at + 4, (uint)(cs - at - 8 + 1), $"length of extension at {at} (one past the cluster)"); break;
                case 3: e.Set32(at + 4, length + 8, $"length of extension at {at} (+8: swallows the next one)"); break;
                case 4: e.Set32(at, 0x44415441, $"type of extension at {at} (external data file)"); break;
                default: e.Set32(at, (uint)rng.Next(), $"type of extension at {at} (random)"); break;
            }
            return;
        }
        // Write a new extension where the list ends (or right after the fixed header).
        int pos = _layout.ExtensionEnd >= 0 ? _layout.ExtensionEnd : (int)_layout.HeaderLength;
        if (pos + 32 > cs)
        {
            FlipBytes(e, rng, 0, cs, "header cluster", 2);
            return;
        }
        string format = Pick(rng, new List<string> { "vmdk", "", "qcow2", "raw", "qcow", "raw\0\0\0junk", new string('q', 16) });
        if (_layout.BackingNameOffset != 0 && rng.Next(2) == 0 && _layout.ExtensionPositions.Count > 0)
        {
            // Rename whatever comes first to a backing-format extension with a strange value.
            int at = _layout.ExtensionPositions[0];
            uint len = e.U32(at + 4);
            var bytes = Encoding.UTF8.GetBytes(format);
            e.Set32(at, 0xe2792aca, $"extension at {at} becomes backing format");
            e.Set32(at + 4, (uint)Math.Min(bytes.Length, (int)len), $"backing format length");
            bytes.AsSpan(0, Math.Min(bytes.Length, (int)len)).CopyTo(e.Bytes.AsSpan(at + 8));
            e.Note($"backing format '{format}'");
            return;
        }
        switch (rng.Next(4))
        {
            case 0:
                e.Set32(pos, 0x44415441, $"new extension at {pos}: external data file");
                e.Set32(pos + 4, 8, "its length");
                Encoding.ASCII.GetBytes("data.raw").CopyTo(e.Bytes.AsSpan(pos + 8));
                break;
            case 1:
                e.Set32(pos, 0x6803f857, $"new extension at {pos}: feature names");
                e.Set32(pos + 4, 0xfffffff8, "its length (huge)");
                break;
            case 2:
                e.Set32(pos, 0xe2792aca, $"new extension at {pos}: backing format");
                e.Set32(pos + 4, (uint)(cs - pos - 8), "its length (the rest of the cluster)");
                break;
            default:
                e.Set32(pos, 0x23852875, $"new extension at {pos}: bitmaps");
                e.Set32(pos + 4, 7, "its length (7, unpadded)");
                break;
        }
    }

    private void MutateBackingName(Editor e, Random rng)
    {
        long at = (long)_layout.BackingNameOffset;
        int size = (int)_layout.BackingNameSize;
        if (at + size > e.Bytes.Length)
        {
            FlipBytes(e, rng, 0, Math.Min(_layout.ClusterSize, e.Bytes.Length), "header cluster", 2);
            return;
        }
        switch (rng.Next(5))
        {
            case 0:
            {
                // Same length, different name: climb out of the folder, or name this image itself.
                string original = Encoding.UTF8.GetString(e.Bytes, (int)at, size);
                string name = Pick(rng, new List<string> { "../" + original, "./" + original, "/" + original, "..", "./", "/", "." })
                    .PadRight(size, '/');
                var bytes = Encoding.UTF8.GetBytes(name);
                if (bytes.Length > size)
                    bytes = bytes[..size];
                bytes.CopyTo(e.Bytes.AsSpan((int)at));
                e.Note($"backing name bytes 0x{at:x}+{size}: '{original}' -> '{Encoding.UTF8.GetString(bytes)}'");
                break;
            }
            case 1:
                e.Set32(16, (uint)rng.Next(0, size + 2), "backing_file_size (shorter/longer)");
                break;
            case 2:
                e.Set(at, 1, 0, "first byte of the backing name (NUL)");
                break;
            case 3:
                e.Set(at + rng.Next(size), 1, (ulong)Pick(rng, new List<byte> { 0xff, 0xc3, (byte)'/', (byte)'.', 0x80 }), "a byte of the backing name");
                break;
            default:
                FlipBytes(e, rng, at, size, "backing name", rng.Next(1, 4));
                break;
        }
    }

    private void MutateSnapshot(Editor e, Random rng)
    {
        var s = Pick(rng, _layout.Snapshots);
        long p = s.Position;
        switch (rng.Next(6))
        {
            case 0:
            {
                var (v, why) = OffsetValue(rng, s.L1Offset);
                e.Set64(p, v, $"snapshot at 0x{p:x}: l1_table_offset ({why})");
                break;
            }
            case 1:
            {
                // An offset so high that offset + l1_size * 8 wraps around 2^64.
                ulong bytes = Math.Max((ulong)s.L1Size * 8, Cs);
                e.Set64(p, 0UL - AlignUp(bytes), $"snapshot at 0x{p:x}: l1_table_offset (2^64 - {AlignUp(bytes)}: offset + size wraps)");
                if ((ulong)s.L1Size * 8 < AlignUp(bytes) + Cs)
                    e.Set32(p + 8, (uint)((AlignUp(bytes) + Cs) / 8), $"snapshot at 0x{p:x}: l1_size");
                break;
            }
            case 2:
            {
                var (v, why) = CountValue(rng, s.L1Size, 4);
                e.Set32(p + 8, (uint)v, $"snapshot at 0x{p:x}: l1_size ({why})");
                break;
            }
            case 3:
                e.Set(p + 12 + 2 * rng.Next(2), 2, Pick(rng, new List<ulong> { 0, 1, 0xffff, 0x8000 }), $"snapshot at 0x{p:x}: id/name size");
                break;
            case 4:
                e.Set32(p + 36, Pick(rng, new List<uint> { 0, 7, 16, 0x10000, 0x7fffffff, 0xffffffff }), $"snapshot at 0x{p:x}: extra_data_size");
                break;
            default:
                e.Set32(60, Pick(rng, new List<uint> { (uint)_layout.Snapshots.Count + 1, 65536, 0x7fffffff, 0xffffffff }), "nb_snapshots (more than the table holds)");
                break;
        }
    }

    private void Truncate(Editor e, Random rng)
    {
        long flen = e.Bytes.Length;
        long cs = _layout.IsQcow2 ? _layout.ClusterSize : 512;
        var points = new List<long> { 0, 1, 3, 4, 8, 71, 72, 73, 103, 104, 105, cs - 1, cs, cs + 1, flen - 1, flen - cs, flen - cs / 2, rng.NextInt64(flen) };
        if (_layout.IsQcow2)
        {
            points.AddRange([(long)_layout.L1Offset, (long)_layout.L1Offset + 4, (long)_layout.RefcountTableOffset + 8, (long)_layout.RefcountTableOffset]);
            if (_layout.RefcountBlocks.Count > 0)
                points.Add((long)Pick(rng, _layout.RefcountBlocks) + 1);
            if (_layout.L2Tables.Count > 0)
                points.Add((long)Pick(rng, _layout.L2Tables) + cs / 2);
            if (_layout.DataClusters.Count > 0)
                points.Add((long)Pick(rng, _layout.DataClusters) + 1);
            if (_layout.SnapshotsOffset != 0)
                points.Add((long)_layout.SnapshotsOffset + 20);
        }
        long at = Math.Clamp(Pick(rng, points), 0, flen);
        e.Truncate((int)at);
    }

    private static void FlipBytes(Editor e, Random rng, long start, long length, string where, int count)
    {
        if (length <= 0 || start < 0 || start >= e.Bytes.Length)
        {
            start = 0;
            length = e.Bytes.Length;
        }
        length = Math.Min(length, e.Bytes.Length - start);
        var sb = new StringBuilder($"flip in {where}:");
        for (int i = 0; i < count; i++)
        {
            long at = start + rng.NextInt64(length);
            byte mask = rng.Next(3) switch { 0 => (byte)(1 << rng.Next(8)), 1 => 0xff, _ => (byte)rng.Next(1, 256) };
            byte old = e.Bytes[at];
            e.Bytes[at] ^= mask;
            sb.Append(CultureInfo.InvariantCulture, $" [0x{at:x}] 0x{old:x2}->0x{e.Bytes[at]:x2}");
        }
        e.Note(sb.ToString());
    }

    // ------------------------------------------------------------------ editing

    /// <summary>Big-endian edits of a byte array, each one logged for the case description.</summary>
    public sealed class Editor(byte[] bytes)
    {
        private readonly List<string> _log = new();

        public byte[] Bytes { get; private set; } = bytes;

        public string Description => string.Join("; ", _log);

        public void Note(string what) => _log.Add(what);

        public ulong Read(long at, int width) => width switch
        {
            8 => BinaryPrimitives.ReadUInt64BigEndian(Bytes.AsSpan((int)at)),
            4 => BinaryPrimitives.ReadUInt32BigEndian(Bytes.AsSpan((int)at)),
            2 => BinaryPrimitives.ReadUInt16BigEndian(Bytes.AsSpan((int)at)),
            1 => Bytes[at],
            _ => throw new ArgumentOutOfRangeException(nameof(width)),
        };

        public ulong U64(long at) => Read(at, 8);
        public uint U32(long at) => (uint)Read(at, 4);

        public void Set(long at, int width, ulong value, string what)
        {
            if (at < 0 || at + width > Bytes.Length)
            {
                _log.Add($"{what}: offset 0x{at:x} is outside the {Bytes.Length}-byte file, not applied");
                return;
            }
            ulong old = Read(at, width);
            var span = Bytes.AsSpan((int)at);
            switch (width)
            {
                case 8: BinaryPrimitives.WriteUInt64BigEndian(span, value); break;
                case 4: BinaryPrimitives.WriteUInt32BigEndian(span, (uint)value); break;
                case 2: BinaryPrimitives.WriteUInt16BigEndian(span, (ushort)value); break;
                default: span[0] = (byte)value; break;
            }
            _log.Add($"u{width * 8}@0x{at:x} {what}: 0x{old:x} -> 0x{Read(at, width):x}");
        }

        public void Set64(long at, ulong value, string what) => Set(at, 8, value, what);
        public void Set32(long at, uint value, string what) => Set(at, 4, value, what);

        public void Fill(long at, int count, byte value, string what)
        {
            count = (int)Math.Min(count, Bytes.Length - at);
            Bytes.AsSpan((int)at, count).Fill(value);
            _log.Add($"fill {what} 0x{at:x}+{count} with 0x{value:x2}");
        }

        public void Truncate(int length)
        {
            _log.Add($"truncate from {Bytes.Length} to {length} bytes");
            Bytes = Bytes[..length];
        }
    }

    // ------------------------------------------------------------------ building seeds

    /// <summary>
    /// Rewrites the header of a version 3 image so that it names <paramref name="name"/> as its
    /// backing file (and, when given, <paramref name="format"/> in a backing-format extension),
    /// with the name's raw bytes exactly as given. Extensions other than the backing format are dropped.
    /// </summary>
    public static void SetBacking(byte[] image, byte[]? name, string? format)
    {
        var l = Qcow2Layout.Parse(image);
        if (!l.IsQcow2)
            throw new ArgumentException("not a qcow2 image");
        int pos = (int)l.HeaderLength;
        int cs = l.ClusterSize;
        image.AsSpan(pos, cs - pos).Clear();
        if (format is not null)
        {
            var f = Encoding.UTF8.GetBytes(format);
            BinaryPrimitives.WriteUInt32BigEndian(image.AsSpan(pos), 0xe2792aca);
            BinaryPrimitives.WriteUInt32BigEndian(image.AsSpan(pos + 4), (uint)f.Length);
            f.CopyTo(image, pos + 8);
            pos += 8 + ((f.Length + 7) & ~7);
        }
        pos += 8; // end marker (already zero)
        if (name is null)
        {
            BinaryPrimitives.WriteUInt64BigEndian(image.AsSpan(8), 0);
            BinaryPrimitives.WriteUInt32BigEndian(image.AsSpan(16), 0);
            return;
        }
        if (pos + name.Length > cs)
            throw new ArgumentException($"a {name.Length}-byte backing name does not fit in a {cs}-byte header cluster");
        name.CopyTo(image, pos);
        BinaryPrimitives.WriteUInt64BigEndian(image.AsSpan(8), (ulong)pos);
        BinaryPrimitives.WriteUInt32BigEndian(image.AsSpan(16), (uint)name.Length);
    }
}
