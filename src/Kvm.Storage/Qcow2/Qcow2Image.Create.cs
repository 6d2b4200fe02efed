using System.Buffers.Binary;

namespace Kvm.Storage.Qcow2;

// Creating images.
public sealed partial class Qcow2Image
{
    /// <summary>
    /// Creates a qcow2 version 3 image: header, refcount table and blocks counting the metadata,
    /// and an empty L1 table. Refuses to overwrite an existing file.
    /// </summary>
    public static Qcow2Image Create(string path, Qcow2CreateOptions options)
    {
        CreateFile(path, options);
        return Open(path);
    }

    /// <summary>
    /// Writes a new image as <see cref="Create"/> does (flushed to disk) without opening it or its
    /// backing file: a child of an image someone holds open for writing (a running VM's disk,
    /// locked) can be made this way and opened once the holder lets the parent go.
    /// </summary>
    public static void CreateFile(string path, Qcow2CreateOptions options)
    {
        int cs = options.ClusterSize;
        if (cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) != 0)
            throw new ArgumentException($"cluster size {cs} is not a power of two from 512 bytes to 2 MiB");
        int rbits = options.RefcountBits;
        if (rbits < 1 || rbits > 64 || (rbits & (rbits - 1)) != 0)
            throw new ArgumentException($"refcount bits {rbits} is not a power of two from 1 to 64");
        int clusterBits = System.Numerics.BitOperations.Log2((uint)cs);
        ulong l1Entries = Qcow2Header.L1EntriesFor(options.Size, clusterBits);
        if (l1Entries * 8 > Qcow2Header.MaxL1Bytes)
            throw new ArgumentException($"size {options.Size} needs an L1 table over {Qcow2Header.MaxL1Bytes >> 20} MiB with {cs}-byte clusters; use larger clusters");
        if (options.BackingFile is { Length: > 1023 })
            throw new ArgumentException("backing file name is longer than 1023 bytes");

        ulong l1Clusters = Math.Max(1, (l1Entries * 8 + (ulong)cs - 1) / (ulong)cs);
        ulong perBlock = (ulong)cs * 8 / (ulong)rbits;
        // Metadata: header + refcount table + refcount blocks + L1; the blocks must count all of it.
        ulong rt = 1, rb = 1;
        while (true)
        {
            ulong total = 1 + rt + rb + l1Clusters;
            ulong needBlocks = (total + perBlock - 1) / perBlock;
            ulong needTable = Math.Max(1, (needBlocks * 8 + (ulong)cs - 1) / (ulong)cs);
            if (needBlocks == rb && needTable == rt)
                break;
            rb = needBlocks;
            rt = needTable;
        }
        ulong tableAt = 1, blocksAt = 1 + rt, l1At = 1 + rt + rb, clusters = 1 + rt + rb + l1Clusters;

        var header = new Qcow2Header
        {
            Version = 3,
            ClusterBits = clusterBits,
            Size = options.Size,
            L1Size = (uint)l1Entries,
            L1TableOffset = l1At * (ulong)cs,
            RefcountTableOffset = tableAt * (ulong)cs,
            RefcountTableClusters = (uint)rt,
            RefcountOrder = System.Numerics.BitOperations.Log2((uint)rbits),
            HeaderLength = Qcow2Header.V3Length + 8,
            BackingFile = options.BackingFile,
            BackingFormat = options.BackingFile is null ? null : options.BackingFormat,
        };

        using (var stream = new FileStream(path, FileMode.CreateNew, FileAccess.Write))
        {
            var image = new byte[clusters * (ulong)cs];
            header.Serialize().CopyTo(image, 0);
            for (ulong b = 0; b < rb; b++)
            {
                BinaryPrimitives.WriteUInt64BigEndian(image.AsSpan((int)(tableAt * (ulong)cs + b * 8)), (blocksAt + b) * (ulong)cs);
                for (ulong c = b * perBlock; c < Math.Min(clusters, (b + 1) * perBlock); c++)
                    SetPackedRefcount(image.AsSpan((int)((blocksAt + b) * (ulong)cs), cs), (int)(c - b * perBlock), rbits, 1);
            }
            stream.Write(image);
            stream.Flush(flushToDisk: true);
        }
    }

    private static void SetPackedRefcount(Span<byte> block, int index, int bits, ulong value)
    {
        switch (bits)
        {
            case 64: BinaryPrimitives.WriteUInt64BigEndian(block[(index * 8)..], value); break;
            case 32: BinaryPrimitives.WriteUInt32BigEndian(block[(index * 4)..], (uint)value); break;
            case 16: BinaryPrimitives.WriteUInt16BigEndian(block[(index * 2)..], (ushort)value); break;
            case 8: block[index] = (byte)value; break;
            default:
                int bit = index * bits;
                byte mask = (byte)(((1 << bits) - 1) << (bit % 8));
                block[bit / 8] = (byte)((block[bit / 8] & ~mask) | (((int)value << (bit % 8)) & mask));
                break;
        }
    }
}
