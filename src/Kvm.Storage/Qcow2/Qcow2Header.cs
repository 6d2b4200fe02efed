using System.Buffers.Binary;
using System.Text;
using System.Text.Unicode;

namespace Kvm.Storage.Qcow2;

/// <summary>A header extension kept as read, so that rewriting the header preserves it.</summary>
public sealed record Qcow2Extension(uint Type, byte[] Data);

/// <summary>The bitmaps header extension: how many bitmaps, and where their directory lies (<paramref name="FieldOffset"/>: where the extension's data starts in the header).</summary>
public sealed record Qcow2BitmapsExtension(uint Count, ulong DirectorySize, ulong DirectoryOffset, int FieldOffset);

/// <summary>
/// The qcow2 header (versions 2 and 3) and its extensions. All fields are big-endian on disk.
/// <see cref="Parse"/> checks every field against the file before anything uses it.
/// </summary>
public sealed class Qcow2Header
{
    public const uint Magic = 0x514649fb; // "QFI\xfb"
    public const int V2Length = 72;
    public const int V3Length = 104;
    public const int MinClusterBits = 9, MaxClusterBits = 21;
    public const uint ExtEnd = 0, ExtBackingFormat = 0xe2792aca, ExtFeatureNames = 0x6803f857,
        ExtBitmaps = 0x23852875, ExtEncryption = 0x0537be77, ExtDataFile = 0x44415441;

    // Incompatible feature bits.
    public const ulong IncompatDirty = 1, IncompatCorrupt = 2, IncompatDataFile = 4, IncompatCompression = 8, IncompatExtendedL2 = 16;
    public const ulong KnownIncompatible = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2;

    /// <summary>QEMU's own limits: an L1 table of at most 32 MiB and a refcount table of at most 8 MiB.</summary>
    public const ulong MaxL1Bytes = 32UL << 20, MaxRefcountTableBytes = 8UL << 20;

    /// <summary>Autoclear feature bit 0: the bitmaps extension is consistent with the image.</summary>
    public const ulong AutoclearBitmaps = 1;

    /// <summary>qemu's limits on internal snapshots and persistent bitmaps.</summary>
    public const uint MaxSnapshots = 65536, MaxBitmaps = 65535;
    public const ulong MaxBitmapDirectoryBytes = 1024UL * MaxBitmaps;

    public uint Version { get; set; }
    public ulong BackingFileOffset { get; set; }
    public uint BackingFileSize { get; set; }
    public int ClusterBits { get; set; }
    public ulong Size { get; set; }
    public uint CryptMethod { get; set; }
    public uint L1Size { get; set; }
    public ulong L1TableOffset { get; set; }
    public ulong RefcountTableOffset { get; set; }
    public uint RefcountTableClusters { get; set; }
    public uint SnapshotCount { get; set; }
    public ulong SnapshotsOffset { get; set; }
    public ulong IncompatibleFeatures { get; set; }
    public ulong CompatibleFeatures { get; set; }
    public ulong AutoclearFeatures { get; set; }
    public int RefcountOrder { get; set; } = 4;
    public uint HeaderLength { get; set; }
    public byte CompressionType { get; set; }
    public string? BackingFile { get; set; }
    public string? BackingFormat { get; set; }
    public List<Qcow2Extension> Extensions { get; } = new();

    /// <summary>The bitmaps extension, when present and valid (autoclear bit 0 set).</summary>
    public Qcow2BitmapsExtension? Bitmaps { get; set; }

    /// <summary>A bitmaps extension is present but autoclear bit 0 is clear: its bitmaps are inconsistent and ignored.</summary>
    public bool BitmapsIgnored { get; set; }

    public int ClusterSize => 1 << ClusterBits;
    public int RefcountBits => 1 << RefcountOrder;
    public int L2Entries => ClusterSize / 8;

    /// <summary>L1 entries needed to map <paramref name="size"/> bytes with these cluster settings.</summary>
    public static ulong L1EntriesFor(ulong size, int clusterBits)
    {
        ulong bytesPerL1 = (1UL << clusterBits) * (ulong)((1 << clusterBits) / 8);
        return (size + bytesPerL1 - 1) / bytesPerL1;
    }

    /// <summary>
    /// Parses and checks the header cluster of <paramref name="path"/> (file length
    /// <paramref name="fileLength"/>), refusing everything qemu refuses when it opens an image
    /// (and some things qemu opens but its check calls corrupt, such as tables past the end of the
    /// file). Each refusal is one line naming the file, the field, its offset and its value.
    /// </summary>
    public static Qcow2Header Parse(ReadOnlySpan<byte> b, long fileLength, string path)
    {
        string where = $"qcow2 image {ImageText.Escape(path)}";
        ImageFormatException Bad(string field, int offset, object value, string problem) =>
            new($"{where}: {field} {value} at offset {offset} {problem}");

        if (b.Length < V2Length)
            throw new ImageFormatException($"{where}: header truncated: {b.Length} bytes, need at least {V2Length}");
        uint magic = U32(b, 0);
        if (magic != Magic)
            throw new ImageFormatException($"{where}: bad magic 0x{magic:x8} at offset 0 (expected 0x{Magic:x8})");
        var h = new Qcow2Header
        {
            Version = U32(b, 4),
            BackingFileOffset = U64(b, 8),
            BackingFileSize = U32(b, 16),
            ClusterBits = (int)Math.Min(U32(b, 20), 64),
            Size = U64(b, 24),
            CryptMethod = U32(b, 32),
            L1Size = U32(b, 36),
            L1TableOffset = U64(b, 40),
            RefcountTableOffset = U64(b, 48),
            RefcountTableClusters = U32(b, 56),
            SnapshotCount = U32(b, 60),
            SnapshotsOffset = U64(b, 64),
        };
        if (h.Version is not (2 or 3))
            throw Bad("version", 4, h.Version, "is not supported (2 and 3 are)");
        if (h.ClusterBits is < MinClusterBits or > MaxClusterBits)
            throw Bad("cluster_bits", 20, U32(b, 20), $"is out of range ({MinClusterBits} to {MaxClusterBits})");
        if (h.Version == 3)
        {
            if (b.Length < V3Length)
                throw new ImageFormatException($"{where}: version 3 header truncated: {b.Length} bytes, need {V3Length}");
            h.IncompatibleFeatures = U64(b, 72);
            h.CompatibleFeatures = U64(b, 80);
            h.AutoclearFeatures = U64(b, 88);
            h.HeaderLength = U32(b, 100);
            if (h.HeaderLength < V3Length)
                throw Bad("header_length", 100, h.HeaderLength, $"is too short (at least {V3Length} for version 3)");
            if (h.HeaderLength > (uint)h.ClusterSize)
                throw Bad("header_length", 100, h.HeaderLength, $"exceeds the cluster size {h.ClusterSize}");
            if (h.HeaderLength > (uint)b.Length)
                throw Bad("header_length", 100, h.HeaderLength, $"runs past the end of the file ({fileLength} bytes)");
            uint order = U32(b, 96);
            if (order > 6)
                throw Bad("refcount_order", 96, order, "is out of range (0 to 6: at most 64-bit refcounts)");
            h.RefcountOrder = (int)order;
            // The compression type byte exists only when the header is long enough to hold it.
            if (h.HeaderLength > V3Length)
                h.CompressionType = b[104];
        }
        else
        {
            h.HeaderLength = V2Length;
        }

        if (h.BackingFileOffset > (ulong)h.ClusterSize)
            throw Bad("backing_file_offset", 8, h.BackingFileOffset, $"lies outside the header cluster ({h.ClusterSize} bytes)");
        int extEnd = h.BackingFileOffset != 0 ? (int)h.BackingFileOffset : h.ClusterSize;

        if (h.CompressionType > 1)
            throw Bad("compression_type", 104, h.CompressionType, "is unknown (0 is deflate, 1 is zstd)");
        bool compressionBit = (h.IncompatibleFeatures & IncompatCompression) != 0;
        if (h.CompressionType == 0 && compressionBit)
            throw Bad("incompatible_features", 72, $"0x{h.IncompatibleFeatures:x}", "has the compression type bit (3) set with compression type 0 (deflate)");
        if (h.CompressionType != 0 && !compressionBit)
            throw Bad("incompatible_features", 72, $"0x{h.IncompatibleFeatures:x}", $"lacks the compression type bit (3) that compression type {h.CompressionType} needs");

        ulong unknown = h.IncompatibleFeatures & ~KnownIncompatible;
        if (unknown != 0)
        {
            var names = FeatureNames(b, (int)h.HeaderLength, extEnd);
            var list = new List<string>();
            for (int bit = 0; bit < 64; bit++)
            {
                if ((unknown & (1UL << bit)) != 0)
                    list.Add(names.TryGetValue((0, bit), out var n) ? $"bit {bit} '{n}'" : $"bit {bit}");
            }
            throw Bad("incompatible_features", 72, $"0x{h.IncompatibleFeatures:x}", $"has unknown incompatible feature(s): {string.Join(", ", list)}");
        }
        if ((h.IncompatibleFeatures & IncompatDataFile) != 0)
            throw Bad("incompatible_features", 72, $"0x{h.IncompatibleFeatures:x}", "asks for an external data file (bit 2), which is not supported");
        if ((h.IncompatibleFeatures & IncompatExtendedL2) != 0)
            throw Bad("incompatible_features", 72, $"0x{h.IncompatibleFeatures:x}", "asks for extended L2 entries (bit 4), which are not supported");
        if (h.CryptMethod > 2)
            throw Bad("crypt_method", 32, h.CryptMethod, "is unknown (0 none, 1 AES, 2 LUKS)");
        if (h.CryptMethod != 0)
            throw Bad("crypt_method", 32, h.CryptMethod, "says the image is encrypted, which is not supported");

        ulong cs = (ulong)h.ClusterSize;
        ulong flen = (ulong)fileLength;
        if (h.RefcountTableClusters == 0)
            throw Bad("refcount_table_clusters", 56, 0, "is 0: the image has no refcount table");
        if ((ulong)h.RefcountTableClusters * cs > MaxRefcountTableBytes)
            throw Bad("refcount_table_clusters", 56, h.RefcountTableClusters, $"is too large (refcount table over {MaxRefcountTableBytes >> 20} MiB)");
        CheckTable(h.RefcountTableOffset, (ulong)h.RefcountTableClusters * cs, cs, flen, where, "refcount_table_offset", 48);

        // The snapshot table: each entry has a variable size, read (and bounded) later; here only
        // its count and offset, as qemu checks them.
        if (h.SnapshotCount > MaxSnapshots)
            throw Bad("nb_snapshots", 60, h.SnapshotCount, $"is too large (at most {MaxSnapshots})");
        if (h.SnapshotsOffset % cs != 0)
            throw Bad("snapshots_offset", 64, $"0x{h.SnapshotsOffset:x}", $"is not a multiple of the cluster size {cs}");
        if (h.SnapshotsOffset > long.MaxValue - (ulong)h.SnapshotCount * 40)
            throw Bad("snapshots_offset", 64, $"0x{h.SnapshotsOffset:x}", $"with {h.SnapshotCount} snapshots lies past any possible file");
        if (h.SnapshotCount > 0 && (h.SnapshotsOffset == 0 || h.SnapshotsOffset >= flen))
            throw Bad("snapshots_offset", 64, $"0x{h.SnapshotsOffset:x}", $"is invalid for {h.SnapshotCount} snapshots in a {flen}-byte file");

        if ((ulong)h.L1Size * 8 > MaxL1Bytes)
            throw Bad("l1_size", 36, h.L1Size, $"is too large (L1 table over {MaxL1Bytes >> 20} MiB)");
        if (h.L1TableOffset % cs != 0)
            throw Bad("l1_table_offset", 40, $"0x{h.L1TableOffset:x}", $"is not a multiple of the cluster size {cs}");
        // The guest size must be mappable by an L1 table qemu would accept.
        if (h.Size > (1UL << 62))
            throw Bad("size", 24, h.Size, "is too large");
        ulong l1Needed = L1EntriesFor(h.Size, h.ClusterBits);
        if (h.L1Size < l1Needed)
            throw Bad("l1_size", 36, h.L1Size, $"is too small for size {h.Size} (needs {l1Needed})");
        if (h.L1Size > 0)
            CheckTable(h.L1TableOffset, (ulong)h.L1Size * 8, cs, flen, where, "l1_table_offset", 40);

        if (h.BackingFileOffset != 0)
        {
            ulong room = Math.Min(1023, cs - h.BackingFileOffset);
            if (h.BackingFileSize > room)
                throw Bad("backing_file_size", 16, h.BackingFileSize, $"is too long for a name at offset {h.BackingFileOffset} (at most {room} bytes)");
            if (h.BackingFileOffset + h.BackingFileSize > (ulong)b.Length)
                throw Bad("backing_file_offset", 8, h.BackingFileOffset, $"(+{h.BackingFileSize}) runs past the end of the file ({fileLength} bytes)");
            var raw = b.Slice((int)h.BackingFileOffset, (int)h.BackingFileSize);
            int nul = raw.IndexOf((byte)0);
            if (nul >= 0)
                raw = raw[..nul]; // qemu reads the name as a C string
            if (raw.Length > 0)
            {
                if (!Utf8.IsValid(raw))
                    throw Bad("backing file name", (int)h.BackingFileOffset, $"'{ImageText.Escape(raw)}'", "is not valid UTF-8");
                h.BackingFile = Encoding.UTF8.GetString(raw);
            }
        }

        ParseExtensions(b, h, extEnd, where);
        return h;
    }

    /// <summary>The feature name table (type, bit) -> name, or an empty map; never fails (used for messages).</summary>
    private static Dictionary<(int Type, int Bit), string> FeatureNames(ReadOnlySpan<byte> b, int pos, int limit)
    {
        var names = new Dictionary<(int, int), string>();
        while (pos + 8 <= limit && pos + 8 <= b.Length)
        {
            uint type = U32(b, pos), length = U32(b, pos + 4);
            if (type == ExtEnd || length > (uint)(limit - pos - 8))
                break;
            if (type == ExtFeatureNames)
            {
                for (int e = pos + 8; e + 48 <= pos + 8 + (int)length; e += 48)
                {
                    var name = b.Slice(e + 2, 46);
                    int nul = name.IndexOf((byte)0);
                    names[(b[e], b[e + 1])] = ImageText.Escape(nul >= 0 ? name[..nul] : name);
                }
            }
            pos += 8 + (int)((length + 7) & ~7u);
        }
        return names;
    }

    // Header extensions: from the end of the fixed header up to the backing file name, or to the
    // end of the header cluster; an end marker may stop them earlier.
    private static void ParseExtensions(ReadOnlySpan<byte> b, Qcow2Header h, int limit, string where)
    {
        int pos = (int)h.HeaderLength;
        while (pos < limit)
        {
            if (pos + 8 > limit || pos + 8 > b.Length)
                throw new ImageFormatException($"{where}: header extension at offset {pos} does not fit before offset {limit} (8 bytes of type and length needed)");
            uint type = U32(b, pos), length = U32(b, pos + 4);
            if (length > (uint)(limit - pos - 8) || pos + 8 + (int)length > b.Length)
                throw new ImageFormatException($"{where}: header extension 0x{type:x8} at offset {pos}: length {length} at offset {pos + 4} runs past offset {limit}, where the extension area ends");
            if (type == ExtEnd)
                break;
            var data = b.Slice(pos + 8, (int)length);
            switch (type)
            {
                case ExtBackingFormat:
                    if (length >= 16)
                        throw new ImageFormatException($"{where}: backing format extension at offset {pos}: length {length} at offset {pos + 4} is too long (at most 15)");
                    int nul = data.IndexOf((byte)0);
                    h.BackingFormat = ImageText.Escape(nul >= 0 ? data[..nul] : data);
                    break;
                case ExtDataFile:
                    throw new ImageFormatException($"{where}: header extension 0x{type:x8} at offset {pos} names an external data file ('{ImageText.Escape(data)}'), which is not supported");
                case ExtEncryption:
                    throw new ImageFormatException($"{where}: header extension 0x{type:x8} at offset {pos} is an encryption header, which is only valid with LUKS encryption (crypt_method {h.CryptMethod} at offset 32)");
                case ExtBitmaps:
                    ParseBitmapsExtension(data, h, pos, where);
                    break;
            }
            h.Extensions.Add(new Qcow2Extension(type, data.ToArray()));
            pos += 8 + (int)((length + 7) & ~7u);
        }
    }

    private static void ParseBitmapsExtension(ReadOnlySpan<byte> data, Qcow2Header h, int pos, string where)
    {
        if (data.Length != 24)
            throw new ImageFormatException($"{where}: bitmaps extension at offset {pos}: length {data.Length} at offset {pos + 4} is wrong (must be 24)");
        // Without autoclear bit 0 the bitmaps are inconsistent: a program that does not know them
        // wrote the image. Like qemu, ignore the extension then (its clusters count as leaked).
        if ((h.AutoclearFeatures & AutoclearBitmaps) == 0)
        {
            h.BitmapsIgnored = true;
            return;
        }
        uint count = U32(data, 0), reserved = U32(data, 4);
        ulong dirSize = U64(data, 8), dirOffset = U64(data, 16);
        int at = pos + 8;
        if (reserved != 0)
            throw new ImageFormatException($"{where}: bitmaps extension reserved field {reserved} at offset {at + 4} is not zero");
        if (count == 0)
            throw new ImageFormatException($"{where}: bitmaps extension nb_bitmaps 0 at offset {at} (an extension with no bitmaps is invalid)");
        if (count > MaxBitmaps)
            throw new ImageFormatException($"{where}: bitmaps extension nb_bitmaps {count} at offset {at} is too large (at most {MaxBitmaps})");
        if (dirSize == 0)
            throw new ImageFormatException($"{where}: bitmaps extension bitmap_directory_size 0 at offset {at + 8} (the directory cannot be empty)");
        if (dirSize > MaxBitmapDirectoryBytes)
            throw new ImageFormatException($"{where}: bitmaps extension bitmap_directory_size {dirSize} at offset {at + 8} is too large (at most {MaxBitmapDirectoryBytes})");
        if (dirOffset % (ulong)h.ClusterSize != 0)
            throw new ImageFormatException($"{where}: bitmaps extension bitmap_directory_offset 0x{dirOffset:x} at offset {at + 16} is not a multiple of the cluster size {h.ClusterSize}");
        h.Bitmaps = new Qcow2BitmapsExtension(count, dirSize, dirOffset, at);
    }

    private static void CheckTable(ulong offset, ulong bytes, ulong cs, ulong flen, string where, string field, int fieldOffset)
    {
        if (offset == 0 || offset % cs != 0)
            throw new ImageFormatException($"{where}: {field} 0x{offset:x} at offset {fieldOffset} is not a non-zero multiple of the cluster size {cs}");
        if (offset >= flen || bytes > flen - offset)
            throw new ImageFormatException($"{where}: {field} 0x{offset:x} at offset {fieldOffset} with {bytes} bytes lies past the end of the file ({flen} bytes)");
    }

    /// <summary>Serializes the header cluster (fixed header, extensions, backing name).</summary>
    public byte[] Serialize()
    {
        var buf = new byte[ClusterSize];
        var b = buf.AsSpan();
        W32(b, 0, Magic);
        W32(b, 4, Version);
        W32(b, 20, (uint)ClusterBits);
        W64(b, 24, Size);
        W32(b, 32, CryptMethod);
        W32(b, 36, L1Size);
        W64(b, 40, L1TableOffset);
        W64(b, 48, RefcountTableOffset);
        W32(b, 56, RefcountTableClusters);
        W32(b, 60, SnapshotCount);
        W64(b, 64, SnapshotsOffset);
        int pos;
        if (Version >= 3)
        {
            W64(b, 72, IncompatibleFeatures);
            W64(b, 80, CompatibleFeatures);
            W64(b, 88, AutoclearFeatures);
            W32(b, 96, (uint)RefcountOrder);
            uint len = V3Length + 8; // the compression type byte, padded to 8 as QEMU writes it
            W32(b, 100, len);
            b[104] = CompressionType;
            pos = (int)len;
        }
        else
        {
            pos = V2Length;
        }
        foreach (var ext in Extensions.Where(e => e.Type != ExtBackingFormat))
            pos = WriteExtension(b, pos, ext.Type, ext.Data);
        if (BackingFormat is not null)
            pos = WriteExtension(b, pos, ExtBackingFormat, Encoding.UTF8.GetBytes(BackingFormat));
        pos = WriteExtension(b, pos, ExtEnd, []);
        if (BackingFile is not null)
        {
            var name = Encoding.UTF8.GetBytes(BackingFile);
            if (name.Length > 1023 || pos + name.Length > buf.Length)
                throw new ArgumentException($"backing file name of {name.Length} bytes does not fit in the header");
            name.CopyTo(b[pos..]);
            W64(b, 8, (ulong)pos);
            W32(b, 16, (uint)name.Length);
        }
        return buf;
    }

    private static int WriteExtension(Span<byte> b, int pos, uint type, byte[] data)
    {
        int padded = (data.Length + 7) & ~7;
        if (pos + 8 + padded > b.Length)
            throw new ArgumentException("header extensions do not fit in the header cluster");
        W32(b, pos, type);
        W32(b, pos + 4, (uint)data.Length);
        data.CopyTo(b[(pos + 8)..]);
        return pos + 8 + padded;
    }

    internal static uint U32(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt32BigEndian(b[o..]);
    internal static ulong U64(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt64BigEndian(b[o..]);
    internal static void W32(Span<byte> b, int o, uint v) => BinaryPrimitives.WriteUInt32BigEndian(b[o..], v);
    internal static void W64(Span<byte> b, int o, ulong v) => BinaryPrimitives.WriteUInt64BigEndian(b[o..], v);
}
