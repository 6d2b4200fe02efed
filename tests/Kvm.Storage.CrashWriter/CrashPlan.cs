using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace Kvm.Storage.CrashWriter;

/// <summary>
/// One write of a crash-test run. Writes are numbered from 1 in the order the writer performs
/// them; write <c>Number</c> goes to slot <c>Slot</c> (the byte range [Slot*SlotSize,
/// (Slot+1)*SlotSize) of the image), at <c>Offset</c> (absolute, inside the slot) for
/// <c>Length</c> bytes. When <c>FlushAfter</c> is set the writer calls Flush() after it and then
/// prints "flushed Number".
/// </summary>
public readonly record struct PlannedWrite(int Number, int Slot, ulong Offset, int Length, bool FlushAfter);

/// <summary>
/// The deterministic write sequence shared by the writer (which performs it) and the test (which
/// recomputes it to know what must read back). Everything follows from the seed through
/// SplitMix64, so it does not depend on System.Random's implementation.
/// </summary>
public static class CrashPlan
{
    /// <summary>
    /// The most writes between two flushes, one of these per plan (seeded): frequent flushes
    /// give many durable points to check; rare ones leave the writer mostly inside Write(), where
    /// a kill lands between the metadata updates of an allocation rather than in fsync.
    /// </summary>
    public static readonly int[] MaxWritesPerFlush = [2, 8, 32, 128];

    /// <summary>Every slot once, in a seeded random order; the last write is always followed by a flush.</summary>
    public static PlannedWrite[] Make(ulong seed, int slots, int slotSize)
    {
        if (slots < 1)
            throw new ArgumentOutOfRangeException(nameof(slots), "at least one slot");
        if (slotSize < 1)
            throw new ArgumentOutOfRangeException(nameof(slotSize), "slot size must be positive");
        var rng = new SplitMix64(Mix(seed, 0x706c616e /* "plan" */));
        var order = new int[slots];
        for (int i = 0; i < slots; i++)
            order[i] = i;
        for (int i = slots - 1; i > 0; i--)
        {
            int j = (int)rng.Below((ulong)i + 1);
            (order[i], order[j]) = (order[j], order[i]);
        }

        var writes = new PlannedWrite[slots];
        int maxGap = MaxWritesPerFlush[rng.Below((ulong)MaxWritesPerFlush.Length)];
        int untilFlush = 1 + (int)rng.Below((ulong)maxGap);
        for (int k = 0; k < slots; k++)
        {
            int slot = order[k];
            int length = 1 + (int)rng.Below((ulong)slotSize);
            ulong inSlot = rng.Below((ulong)(slotSize - length) + 1);
            bool flush = --untilFlush == 0 || k == slots - 1;
            if (untilFlush == 0)
                untilFlush = 1 + (int)rng.Below((ulong)maxGap);
            writes[k] = new PlannedWrite(k + 1, slot, (ulong)slot * (ulong)slotSize + inSlot, length, flush);
        }
        return writes;
    }

    /// <summary>The bytes written into slot <paramref name="slot"/>: a function of (seed, slot) only.</summary>
    public static void FillContent(ulong seed, int slot, Span<byte> destination)
    {
        var rng = new SplitMix64(Mix(seed, 0x1_0000_0000UL + (ulong)slot));
        var words = MemoryMarshal.Cast<byte, ulong>(destination);
        for (int i = 0; i < words.Length; i++)
            words[i] = BitConverter.IsLittleEndian ? rng.Next() : BinaryPrimitives.ReverseEndianness(rng.Next());
        var tail = destination[(words.Length * 8)..];
        if (!tail.IsEmpty)
        {
            Span<byte> last = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(last, rng.Next());
            last[..tail.Length].CopyTo(tail);
        }
    }

    /// <summary>Combines a seed and a stream number into a new, well-mixed seed.</summary>
    public static ulong Mix(ulong seed, ulong stream) => new SplitMix64(seed ^ (stream * 0x9E37_79B9_7F4A_7C15UL)).Next();
}

/// <summary>SplitMix64: tiny, fast, and the same everywhere.</summary>
public struct SplitMix64(ulong seed)
{
    private ulong _state = seed;

    public ulong Next()
    {
        ulong z = _state += 0x9E37_79B9_7F4A_7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D0_49BB_1331_11EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>A value in [0, bound) (bound &gt; 0); the modulo bias is irrelevant here.</summary>
    public ulong Below(ulong bound) => Next() % bound;

    /// <summary>A value in [min, max].</summary>
    public long Between(long min, long max) => min + (long)Below((ulong)(max - min) + 1);
}
