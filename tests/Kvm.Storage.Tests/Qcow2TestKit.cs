using System.Buffers.Binary;
using System.Globalization;
using System.Security.Cryptography;

namespace Kvm.Storage.Tests;

/// <summary>Shared helpers for the qcow2 tests: header pokes, content comparison, message checks.</summary>
internal static class Qcow2TestKit
{
    public const ulong KiB = 1 << 10;
    public const ulong MiB = 1 << 20;

    /// <summary>Offsets of the qcow2 header fields (all big-endian).</summary>
    public static class Field
    {
        public const int Magic = 0, Version = 4, BackingFileOffset = 8, BackingFileSize = 16, ClusterBits = 20,
            Size = 24, CryptMethod = 32, L1Size = 36, L1TableOffset = 40, RefcountTableOffset = 48,
            RefcountTableClusters = 56, NbSnapshots = 60, SnapshotsOffset = 64, IncompatibleFeatures = 72,
            CompatibleFeatures = 80, AutoclearFeatures = 88, RefcountOrder = 96, HeaderLength = 100;
    }

    public static ulong ReadField(string path, int offset, int width)
    {
        using var f = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        Span<byte> b = stackalloc byte[8];
        RandomAccess.Read(f, b[..width], offset);
        return width == 8 ? BinaryPrimitives.ReadUInt64BigEndian(b) : width == 4 ? BinaryPrimitives.ReadUInt32BigEndian(b) : BinaryPrimitives.ReadUInt16BigEndian(b);
    }

    /// <summary>Overwrites a big-endian field of <paramref name="width"/> bytes at a file offset.</summary>
    public static void Poke(string path, long offset, ulong value, int width)
    {
        Span<byte> b = stackalloc byte[8];
        switch (width)
        {
            case 8: BinaryPrimitives.WriteUInt64BigEndian(b, value); break;
            case 4: BinaryPrimitives.WriteUInt32BigEndian(b, (uint)value); break;
            case 2: BinaryPrimitives.WriteUInt16BigEndian(b, (ushort)value); break;
            case 1: b[0] = (byte)value; break;
            default: throw new ArgumentOutOfRangeException(nameof(width));
        }
        using var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        RandomAccess.Write(f, b[..width], offset);
    }

    public static string Hash(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    /// <summary>The guest-visible content of an image as qemu sees it, as a raw file (qemu-img convert -O raw).</summary>
    public static string QemuToRaw(string image, string destination, string format = "qcow2")
    {
        QemuImg.Convert(image, destination, "raw", format);
        return destination;
    }

    /// <summary>Checks every byte of <paramref name="image"/> against a raw file (zeros past its end).</summary>
    public static void AssertContentEquals(IBlockImage image, string rawPath)
    {
        using var reference = RawReference.Open(rawPath);
        if (reference.Size < image.Size)
            throw new InvalidOperationException($"reference {rawPath} ({reference.Size} bytes) is shorter than {image.Path} ({image.Size})");
        for (ulong off = 0; off < image.Size; off += MiB)
        {
            var len = Math.Min(MiB, image.Size - off);
            RandomWorkload.VerifyRange(image, reference, off, len, () => $"{image.Path} compared with qemu's view {rawPath}");
        }
    }

    /// <summary>
    /// The message names the field (one of <paramref name="fields"/>, compared without case, spaces,
    /// underscores or dashes) and, when given, the value (decimal or hex).
    /// </summary>
    public static void AssertNames(Exception e, string[] fields, params ulong[] values)
    {
        var norm = Normalize(e.Message);
        Assert.True(fields.Any(f => norm.Contains(Normalize(f), StringComparison.Ordinal)),
            $"the error should name the field ({string.Join(" or ", fields)}): {e.Message}");
        if (values.Length > 0)
        {
            var spellings = values.SelectMany(Spellings).ToList();
            Assert.True(spellings.Any(s => e.Message.Contains(s, StringComparison.OrdinalIgnoreCase)),
                $"the error should name the value ({string.Join(" or ", spellings)}): {e.Message}");
        }
    }

    public static IEnumerable<string> Spellings(ulong v)
    {
        yield return v.ToString(CultureInfo.InvariantCulture);
        yield return "0x" + v.ToString("x", CultureInfo.InvariantCulture);
    }

    private static string Normalize(string s) =>
        new(s.ToLowerInvariant().Where(c => c is not (' ' or '_' or '-')).ToArray());

    /// <summary>qemu-io commands that write patterns around the cluster boundaries of a <paramref name="clusterSize"/> image.</summary>
    public static string[] PatternWrites(ulong size, ulong clusterSize, int salt)
    {
        var cs = clusterSize;
        string P(int n) => $"0x{(n * 37 + salt * 11) % 250 + 3:x2}";
        return
        [
            $"write -P {P(1)} 0 {cs}",                              // one whole cluster
            $"write -P {P(2)} {cs - 100} 300",                      // straddles a boundary
            $"write -P {P(3)} {3 * cs + 17} 1000",                  // unaligned, inside (or across) clusters
            $"write -P {P(4)} {size / 4} {Math.Min(3 * MiB, size / 4)}", // many clusters
            $"write -P {P(5)} {size / 4 + 100 * KiB + 512} 4k",     // overwrites part of that
            $"write -P {P(6)} {size - 4096} 4096",                  // the end of the disk
            $"write -P {P(7)} {size / 2 + cs / 2} {cs}",            // half of two clusters
        ];
    }
}
