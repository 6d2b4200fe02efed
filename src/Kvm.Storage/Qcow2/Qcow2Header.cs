using System.Buffers.Binary;
using System.Text;

namespace Kvm.Storage.Qcow2;

/// <summary>A header extension kept as read, so that rewriting the header preserves it.</summary>
public sealed record Qcow2Extension(uint Type, byte[] Data);

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

    public int ClusterSize => 1 << ClusterBits;
    public int RefcountBits => 1 << RefcountOrder;
    public int L2Entries => ClusterSize / 8;

    /// <summary>L1 entries needed to map <paramref name="size"/> bytes with these cluster settings.</summary>
    public static ulong L1EntriesFor(ulong size, int clusterBits)
    {
        ulong bytesPerL1 = (1UL << clusterBits) * (ulong)((1 << clusterBits) / 8);
        return (size + bytesPerL1 - 1) / bytesPerL1;
    }

    /// <summary>Parses and checks the header cluster of <paramref name="path"/> (file length <paramref name="fileLength"/>).</summary>
    public static Qcow2Header Parse(ReadOnlySpan<byte> b, long fileLength, string path)
    {
        string where = $"qcow2 image {path}";
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
            throw new ImageFormatException($"{where}: unsupported version {h.Version} (field 'version' at offset 4; 2 and 3 are supported)");
        if (h.ClusterBits is < MinClusterBits or > MaxClusterBits)
            throw new ImageFormatException($"{where}: cluster_bits {U32(b, 20)} at offset 20 is out of range ({MinClusterBits} to {MaxClusterBits})");
        if (h.Version == 3)
        {
            if (b.Length < V3Length)
                throw new ImageFormatException($"{where}: version 3 header truncated: {b.Length} bytes, need {V3Length}");
            h.IncompatibleFeatures = U64(b, 72);
            h.CompatibleFeatures = U64(b, 80);
            h.AutoclearFeatures = U64(b, 88);
            uint order = U32(b, 96);
            if (order > 6)
                throw new ImageFormatException($"{where}: refcount_order {order} at offset 96 is out of range (0 to 6)");
            h.RefcountOrder = (int)order;
            h.HeaderLength = U32(b, 100);
            if (h.HeaderLength < V3Length || h.HeaderLength > (uint)h.ClusterSize || h.HeaderLength > (uint)b.Length)
                throw new ImageFormatException($"{where}: header_length {h.HeaderLength} at offset 100 is out of range ({V3Length} to {Math.Min(h.ClusterSize, b.Length)})");
            if (h.HeaderLength > V3Length)
                h.CompressionType = b[104];
        }
        else
        {
            h.HeaderLength = V2Length;
        }

        ulong unknown = h.IncompatibleFeatures & ~KnownIncompatible;
        if (unknown != 0)
            throw new ImageFormatException($"{where}: unknown incompatible feature bits 0x{unknown:x} (field 'incompatible_features' at offset 72)");
        if ((h.IncompatibleFeatures & IncompatDataFile) != 0)
            throw new ImageFormatException($"{where}: uses an external data file (incompatible feature bit 2), which is not supported");
        if ((h.IncompatibleFeatures & IncompatExtendedL2) != 0)
            throw new ImageFormatException($"{where}: uses extended L2 entries (incompatible feature bit 4), which are not supported");
        if ((h.IncompatibleFeatures & IncompatCompression) != 0 && h.CompressionType != 0)
            throw new ImageFormatException($"{where}: compression type {h.CompressionType} at offset 104 is not supported (only deflate, 0)");
        if (h.CryptMethod != 0)
            throw new ImageFormatException($"{where}: encrypted images are not supported (crypt_method {h.CryptMethod} at offset 32)");

        ulong cs = (ulong)h.ClusterSize;
        ulong flen = (ulong)fileLength;
        // The guest size must be mappable by an L1 table QEMU would accept.
        if (h.Size > (1UL << 62))
            throw new ImageFormatException($"{where}: size {h.Size} at offset 24 is too large");
        ulong l1Needed = L1EntriesFor(h.Size, h.ClusterBits);
        if (h.L1Size < l1Needed)
            throw new ImageFormatException($"{where}: l1_size {h.L1Size} at offset 36 is too small for size {h.Size} (needs {l1Needed})");
        if ((ulong)h.L1Size * 8 > MaxL1Bytes)
            throw new ImageFormatException($"{where}: l1_size {h.L1Size} at offset 36 is too large (L1 table over {MaxL1Bytes >> 20} MiB)");
        if (h.L1Size > 0)
        {
            CheckTable(h.L1TableOffset, (ulong)h.L1Size * 8, cs, flen, where, "l1_table_offset", 40);
        }
        if (h.RefcountTableClusters == 0)
            throw new ImageFormatException($"{where}: refcount_table_clusters is 0 at offset 56");
        if ((ulong)h.RefcountTableClusters * cs > MaxRefcountTableBytes)
            throw new ImageFormatException($"{where}: refcount_table_clusters {h.RefcountTableClusters} at offset 56 is too large");
        CheckTable(h.RefcountTableOffset, (ulong)h.RefcountTableClusters * cs, cs, flen, where, "refcount_table_offset", 48);
        if (h.SnapshotCount > 0)
        {
            if (h.SnapshotsOffset == 0 || h.SnapshotsOffset % cs != 0 || h.SnapshotsOffset >= flen)
                throw new ImageFormatException($"{where}: snapshots_offset 0x{h.SnapshotsOffset:x} at offset 64 is invalid for a {flen}-byte file");
        }

        if (h.BackingFileOffset != 0)
        {
            if (h.BackingFileSize == 0 || h.BackingFileSize > 1023)
                throw new ImageFormatException($"{where}: backing_file_size {h.BackingFileSize} at offset 16 is out of range (1 to 1023)");
            if (h.BackingFileOffset >= (ulong)b.Length || h.BackingFileSize > (ulong)b.Length - h.BackingFileOffset)
                throw new ImageFormatException($"{where}: backing file name at offset {h.BackingFileOffset} (+{h.BackingFileSize}) lies outside the header cluster");
            h.BackingFile = Encoding.UTF8.GetString(b.Slice((int)h.BackingFileOffset, (int)h.BackingFileSize));
            if (h.BackingFile.Contains('\0'))
                throw new ImageFormatException($"{where}: backing file name contains a NUL byte");
        }

        // Header extensions: after the fixed header, up to the backing name or the cluster's end.
        int pos = (int)h.HeaderLength;
        int limit = h.BackingFileOffset != 0 ? (int)h.BackingFileOffset : b.Length;
        while (true)
        {
            if (pos + 8 > limit)
            {
                if (pos + 8 > b.Length)
                    break; // no room for an end marker: some v2 images have none
                throw new ImageFormatException($"{where}: header extension at offset {pos} runs into the backing file name at {limit}");
            }
            uint type = U32(b, pos), length = U32(b, pos + 4);
            if (type == ExtEnd)
                break;
            ulong padded = ((ulong)length + 7) & ~7UL;
            if ((ulong)pos + 8 + padded > (ulong)limit)
                throw new ImageFormatException($"{where}: header extension 0x{type:x8} at offset {pos} with length {length} runs past offset {limit}");
            var data = b.Slice(pos + 8, (int)length).ToArray();
            if (type == ExtBackingFormat)
                h.BackingFormat = Encoding.UTF8.GetString(data).TrimEnd('\0');
            else if (type == ExtDataFile)
                throw new ImageFormatException($"{where}: names an external data file, which is not supported");
            h.Extensions.Add(new Qcow2Extension(type, data));
            pos += 8 + (int)padded;
        }
        return h;
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
