using Kvm.Storage.CrashWriter;

namespace Kvm.Storage.CrashTests;

/// <summary>
/// What an image must hold after the writer of <see cref="CrashPlan.Make"/> ran (in part) over a
/// base content (zeros, or what the backing image shows): every write numbered at most
/// <c>durable</c> (the last "flushed N") reads back exactly; every later write's bytes each read as
/// either the new or the old value (the write may have landed, in part or not at all); every byte
/// no write touched reads as the base.
/// </summary>
public sealed class Expectation(ulong seed, int slots, int slotSize, ulong imageSize, byte[]? baseContent)
{
    private static readonly byte[] Zeros = new byte[1 << 20];

    public PlannedWrite[] Plan { get; } = CrashPlan.Make(seed, slots, slotSize);

    /// <summary>The base content of [offset, offset+length): the backing's data, zeros past it.</summary>
    public ReadOnlySpan<byte> Base(ulong offset, int length, byte[] scratch)
    {
        if (baseContent is null)
            return length <= Zeros.Length ? Zeros.AsSpan(0, length) : new byte[length];
        var span = scratch.AsSpan(0, length);
        span.Clear();
        if (offset < (ulong)baseContent.Length)
        {
            int n = (int)Math.Min((ulong)length, (ulong)baseContent.Length - offset);
            baseContent.AsSpan((int)offset, n).CopyTo(span);
        }
        return span;
    }

    /// <summary>
    /// Checks the image as <paramref name="read"/> shows it; returns null when it meets the
    /// expectation, else a description of the first difference. <paramref name="landed"/> counts
    /// the writes after <paramref name="durable"/> that read back whole.
    /// </summary>
    public string? Verify(Action<ulong, byte[], int> read, int durable, out int landed)
    {
        landed = 0;
        var actual = new byte[slotSize];
        var content = new byte[slotSize];
        var scratch = new byte[slotSize];
        foreach (var w in Plan)
        {
            ulong slotStart = (ulong)w.Slot * (ulong)slotSize;
            read(slotStart, actual, slotSize);
            var old = Base(slotStart, slotSize, scratch);
            int from = (int)(w.Offset - slotStart), to = from + w.Length;
            CrashPlan.FillContent(seed, w.Slot, content.AsSpan(0, w.Length));
            var now = content.AsSpan(0, w.Length);

            if (!actual.AsSpan(0, from).SequenceEqual(old[..from]))
                return Difference(w, durable, slotStart, actual.AsSpan(0, from), old[..from], "before the written range, expected the base content");
            if (!actual.AsSpan(to, slotSize - to).SequenceEqual(old[to..slotSize]))
                return Difference(w, durable, slotStart + (ulong)to, actual.AsSpan(to, slotSize - to), old[to..slotSize], "after the written range, expected the base content");

            var got = actual.AsSpan(from, w.Length);
            if (got.SequenceEqual(now))
            {
                if (w.Number > durable)
                    landed++;
                continue;
            }
            if (w.Number <= durable)
                return Difference(w, durable, w.Offset, got, now, "a write completed before the last flush did not read back");
            var before = old[from..to];
            for (int i = 0; i < got.Length; i++)
            {
                if (got[i] != now[i] && got[i] != before[i])
                    return Describe(w, durable, w.Offset + (ulong)i,
                        $"reads 0x{got[i]:x2}, neither the written 0x{now[i]:x2} nor the old 0x{before[i]:x2} (unflushed write)");
            }
        }

        // The tail past the last slot was never written.
        ulong tail = (ulong)slots * (ulong)slotSize;
        while (tail < imageSize)
        {
            int n = (int)Math.Min((ulong)slotSize, imageSize - tail);
            read(tail, actual, n);
            var old = Base(tail, n, scratch);
            if (!actual.AsSpan(0, n).SequenceEqual(old))
                return Difference(null, durable, tail, actual.AsSpan(0, n), old, "in the tail no write touches, expected the base content");
            tail += (ulong)n;
        }
        return null;
    }

    private static string Difference(PlannedWrite? w, int durable, ulong start, ReadOnlySpan<byte> got, ReadOnlySpan<byte> want, string what)
    {
        int i = 0;
        while (i < got.Length && got[i] == want[i])
            i++;
        int j = got.Length;
        while (j > i && got[j - 1] == want[j - 1])
            j--;
        return Describe(w, durable, start + (ulong)i,
            $"{what}: bytes 0x{start + (ulong)i:x}..0x{start + (ulong)j:x} differ ({j - i} bytes; first reads 0x{got[i]:x2}, expected 0x{want[i]:x2})");
    }

    private static string Describe(PlannedWrite? w, int durable, ulong at, string text) =>
        w is { } x
            ? $"write #{x.Number} (slot {x.Slot}, offset 0x{x.Offset:x}, {x.Length} bytes; last flush after #{durable}) at guest offset 0x{at:x}: {text}"
            : $"guest offset 0x{at:x} (last flush after #{durable}): {text}";
}
