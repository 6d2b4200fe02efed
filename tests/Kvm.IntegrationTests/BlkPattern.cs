using System.Buffers.Binary;

namespace Kvm.IntegrationTests;

/// <summary>
/// The guest kit's blk-verify pattern (native/guest/README.md): 64-bit word i of the sector at
/// `lba` is splitmix64's finaliser of (seed &lt;&lt; 48) ^ (lba &lt;&lt; 6) ^ i. Tests build raw
/// reference images with it.
/// </summary>
public static class BlkPattern
{
    public const int SectorSize = 512;

    public static ulong Mix64(ulong x)
    {
        ulong z = x + 0x9e3779b97f4a7c15UL;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
        return z ^ (z >> 31);
    }

    public static void FillSector(Span<byte> sector, ulong seed, ulong lba)
    {
        for (int i = 0; i < SectorSize / 8; i++)
            BinaryPrimitives.WriteUInt64LittleEndian(sector[(i * 8)..], Mix64((seed << 48) ^ (lba << 6) ^ (ulong)i));
    }

    /// <summary>Writes the pattern over [offset, offset+length) of a raw file (both multiples of 512).</summary>
    public static void WriteRange(string rawPath, ulong seed, ulong offset, ulong length)
    {
        using var f = new FileStream(rawPath, FileMode.Open, FileAccess.ReadWrite);
        var buffer = new byte[1 << 20];
        for (ulong done = 0; done < length;)
        {
            int n = (int)Math.Min((ulong)buffer.Length, length - done);
            for (int s = 0; s < n; s += SectorSize)
                FillSector(buffer.AsSpan(s, SectorSize), seed, (offset + done + (ulong)s) / SectorSize);
            f.Position = (long)(offset + done);
            f.Write(buffer, 0, n);
            done += (ulong)n;
        }
    }

    /// <summary>Makes a zero-filled raw file of <paramref name="size"/> bytes.</summary>
    public static void CreateZeroRaw(string path, long size)
    {
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write);
        f.SetLength(size);
    }
}
