using System.Buffers.Binary;

namespace Kvm.Storage;

/// <summary>A range of a virtual disk that a dirty bitmap records as written.</summary>
public readonly record struct DirtyExtent(ulong Offset, ulong Length);

/// <summary>
/// Which parts of a virtual disk were written, one bit per granule of 2^<see cref="GranularityBits"/>
/// bytes. Marking is lock-free and may run on many threads at once; the other operations expect
/// their caller to keep marks away while they run. The bit layout is the one qcow2 stores: bit
/// <c>i</c> of the bitmap is bit <c>i % 8</c> (least significant first) of byte <c>i / 8</c>.
/// </summary>
public sealed class DirtyBlockBitmap
{
    /// <summary>The granularities qcow2 (as qemu implements it) allows: 512 bytes to 2 GiB.</summary>
    public const int MinGranularityBits = 9, MaxGranularityBits = 31;

    private ulong[] _words;
    private int _changed;

    public DirtyBlockBitmap(ulong diskSize, int granularityBits)
    {
        if (granularityBits is < MinGranularityBits or > MaxGranularityBits)
            throw new ArgumentOutOfRangeException(nameof(granularityBits), $"granularity 2^{granularityBits} is out of range (2^{MinGranularityBits} to 2^{MaxGranularityBits} bytes)");
        GranularityBits = granularityBits;
        DiskSize = diskSize;
        _words = new ulong[checked((int)((BitCount + 63) / 64))];
    }

    public int GranularityBits { get; }
    public ulong Granularity => 1UL << GranularityBits;
    public ulong DiskSize { get; private set; }

    /// <summary>How many bits the bitmap has: one per granule, the last one possibly partial.</summary>
    public ulong BitCount => BitsFor(DiskSize, GranularityBits);

    /// <summary>How many bytes of bitmap data qcow2 stores for a disk: the bits, rounded up to whole 64-bit words.</summary>
    public static ulong DataBytesFor(ulong diskSize, int granularityBits) => (BitsFor(diskSize, granularityBits) + 63) / 64 * 8;

    private static ulong BitsFor(ulong diskSize, int granularityBits) => (diskSize + (1UL << granularityBits) - 1) >> granularityBits;

    /// <summary>The bitmap data's size in bytes as stored (see <see cref="DataBytesFor"/>).</summary>
    public ulong DataBytes => (ulong)_words.Length * 8;

    /// <summary>Whether a bit went from 0 to 1 since the last <see cref="ResetChanged"/>.</summary>
    public bool Changed => Volatile.Read(ref _changed) != 0;

    public void ResetChanged() => Volatile.Write(ref _changed, 0);

    /// <summary>Sets the bits of every granule that [offset, offset+length) touches. Thread-safe.</summary>
    public void Mark(ulong offset, ulong length)
    {
        if (length == 0 || offset >= DiskSize)
            return;
        ulong end = Math.Min(DiskSize, offset + Math.Min(length, DiskSize - offset));
        ulong first = offset >> GranularityBits, last = (end - 1) >> GranularityBits;
        bool changed = false;
        for (ulong word = first / 64; word <= last / 64; word++)
        {
            ulong lo = word == first / 64 ? first % 64 : 0;
            ulong hi = word == last / 64 ? last % 64 : 63;
            ulong mask = (hi == 63 ? ulong.MaxValue : (1UL << (int)(hi + 1)) - 1) & ~((1UL << (int)lo) - 1);
            ref ulong w = ref _words[word];
            if ((Volatile.Read(ref w) & mask) == mask)
                continue;
            ulong before = Interlocked.Or(ref w, mask);
            changed |= (before & mask) != mask;
        }
        if (changed && Volatile.Read(ref _changed) == 0)
            Volatile.Write(ref _changed, 1);
    }

    public bool IsSet(ulong bit) => bit < BitCount && (Volatile.Read(ref _words[bit / 64]) & (1UL << (int)(bit % 64))) != 0;

    /// <summary>How many bits are set.</summary>
    public ulong CountSet()
    {
        ulong n = 0;
        foreach (ulong w in _words)
            n += (ulong)System.Numerics.BitOperations.PopCount(w);
        return n;
    }

    /// <summary>How many bytes of the disk the set bits cover (the last granule counted only up to the disk's end).</summary>
    public ulong DirtyBytes() => Extents().Aggregate(0UL, (sum, e) => sum + e.Length);

    public void Clear()
    {
        Array.Clear(_words);
        Volatile.Write(ref _changed, 1);
    }

    /// <summary>Sets every bit that covers a byte <paramref name="other"/> records as written (granularities may differ).</summary>
    public void Merge(DirtyBlockBitmap other)
    {
        foreach (var e in other.Extents())
            Mark(e.Offset, e.Length);
    }

    /// <summary>The written ranges, each as long as possible, clipped to the disk's size.</summary>
    public IReadOnlyList<DirtyExtent> Extents()
    {
        var list = new List<DirtyExtent>();
        ulong bits = BitCount;
        ulong runStart = 0;
        bool inRun = false;
        for (ulong word = 0; word < (ulong)_words.Length; word++)
        {
            ulong w = Volatile.Read(ref _words[word]);
            if (!inRun && w == 0 || inRun && w == ulong.MaxValue)
                continue;
            for (int b = 0; b < 64; b++)
            {
                ulong bit = word * 64 + (ulong)b;
                if (bit >= bits)
                    break;
                bool set = (w & (1UL << b)) != 0;
                if (set && !inRun)
                {
                    runStart = bit;
                    inRun = true;
                }
                else if (!set && inRun)
                {
                    list.Add(ExtentOf(runStart, bit));
                    inRun = false;
                }
            }
        }
        if (inRun)
            list.Add(ExtentOf(runStart, bits));
        return list;
    }

    private DirtyExtent ExtentOf(ulong firstBit, ulong endBit)
    {
        ulong start = firstBit << GranularityBits;
        ulong end = Math.Min(DiskSize, endBit << GranularityBits);
        return new DirtyExtent(start, end - start);
    }

    /// <summary>
    /// Changes the disk size the bitmap covers. New granules start clear; when the disk shrinks,
    /// the bits past its end are dropped.
    /// </summary>
    public void Resize(ulong diskSize)
    {
        DiskSize = diskSize;
        Array.Resize(ref _words, checked((int)((BitCount + 63) / 64)));
        ClearTail();
        Volatile.Write(ref _changed, 1);
    }

    // Bits past BitCount in the last word must stay 0 (qcow2 requires the tail bits to be zero).
    private void ClearTail()
    {
        int used = (int)(BitCount % 64);
        if (used != 0 && _words.Length > 0)
            _words[^1] &= (1UL << used) - 1;
    }

    /// <summary>Copies <paramref name="destination"/>.Length bytes of the stored layout, from byte <paramref name="byteOffset"/>; bytes past the data read as 0.</summary>
    public void CopyTo(ulong byteOffset, Span<byte> destination)
    {
        if (byteOffset % 8 != 0)
            throw new ArgumentException("bitmap data copies from a multiple of 8 bytes", nameof(byteOffset));
        destination.Clear();
        Span<byte> le = stackalloc byte[8];
        for (int i = 0; i < destination.Length; i += 8)
        {
            ulong word = (byteOffset + (ulong)i) / 8;
            if (word >= (ulong)_words.Length)
                break;
            BinaryPrimitives.WriteUInt64LittleEndian(le, Volatile.Read(ref _words[word]));
            le[..Math.Min(8, destination.Length - i)].CopyTo(destination[i..]);
        }
    }

    /// <summary>
    /// Loads bytes in the stored layout at <paramref name="byteOffset"/> (a multiple of 8). Bits
    /// past <see cref="BitCount"/> are ignored.
    /// </summary>
    public void Load(ulong byteOffset, ReadOnlySpan<byte> source)
    {
        if (byteOffset % 8 != 0)
            throw new ArgumentException("bitmap data loads at a multiple of 8 bytes", nameof(byteOffset));
        for (int i = 0; i + 8 <= source.Length; i += 8)
        {
            ulong word = byteOffset / 8 + (ulong)(i / 8);
            if (word >= (ulong)_words.Length)
                break;
            _words[word] = BinaryPrimitives.ReadUInt64LittleEndian(source[i..]);
        }
        ClearTail();
    }

    /// <summary>Sets every bit whose data byte lies in [byteOffset, byteOffset+length) (a bitmap table entry that reads as all ones).</summary>
    public void SetBytes(ulong byteOffset, ulong length)
    {
        for (ulong word = byteOffset / 8; word < (byteOffset + length + 7) / 8 && word < (ulong)_words.Length; word++)
            _words[word] = ulong.MaxValue;
        ClearTail();
    }
}
