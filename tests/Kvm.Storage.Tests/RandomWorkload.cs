using System.Text;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Storage.Tests;

public enum WorkloadOpKind
{
    Write,
    WriteZeroes,
    Discard,
    Flush,
    Read,
}

/// <summary>One step of a workload; <see cref="Index"/> also seeds a write's data pattern.</summary>
public readonly record struct WorkloadOp(int Index, WorkloadOpKind Kind, ulong Offset, ulong Length)
{
    public override string ToString() => Kind == WorkloadOpKind.Flush
        ? $"#{Index} flush"
        : $"#{Index} {Kind} offset {Offset} (0x{Offset:x}) length {Length} (0x{Length:x})";
}

/// <summary>What a workload run did (so a test can check that it exercised what it claims to).</summary>
public sealed record WorkloadStats(
    int Writes,
    int WriteZeroes,
    int Discards,
    int Flushes,
    int Reads,
    int CrossingClusterBoundary,
    int Unaligned,
    ulong BytesWritten,
    ulong BytesVerified)
{
    public int Total => Writes + WriteZeroes + Discards + Flushes + Reads;
}

/// <summary>The image under test read back something other than the reference holds.</summary>
public sealed class WorkloadMismatchException(string message) : Exception(message);

/// <summary>Parameters of a <see cref="RandomWorkload"/>.</summary>
public sealed record WorkloadOptions
{
    public required int Seed { get; init; }

    /// <summary>Guest-visible size of the image under test.</summary>
    public required ulong Size { get; init; }

    /// <summary>Offsets and lengths are chosen around multiples of this.</summary>
    public int ClusterSize { get; init; } = 65536;

    public int Operations { get; init; } = 4000;

    /// <summary>Offsets and lengths are multiples of this (1 = any byte).</summary>
    public int Alignment { get; init; } = 1;

    /// <summary>The largest single request.</summary>
    public ulong MaxLength { get; init; } = 1 << 20;

    /// <summary>
    /// Discarded ranges read back as the backing image's data (qcow2 version 2 with a backing file)
    /// rather than zeros. Discards are then whole clusters, and <see cref="BackingContent"/> must
    /// name a raw file holding the backing chain's guest-visible bytes.
    /// </summary>
    public bool DiscardExposesBacking { get; init; }

    public string? BackingContent { get; init; }
}

/// <summary>
/// A raw reference image: a plain file that receives the same writes as an image under test,
/// with zeroed ranges written as zero bytes.
/// </summary>
public sealed class RawReference : IDisposable
{
    private readonly SafeFileHandle _handle;

    private RawReference(string path, SafeFileHandle handle, ulong size)
    {
        Path = path;
        _handle = handle;
        Size = size;
    }

    public string Path { get; }

    public ulong Size { get; }

    /// <summary>
    /// Creates the reference file of <paramref name="size"/> bytes, starting as zeros or as a copy of
    /// <paramref name="initialContent"/> (a raw file; bytes beyond its end are zeros).
    /// </summary>
    public static RawReference Create(string path, ulong size, string? initialContent = null)
    {
        var handle = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.ReadWrite);
        var reference = new RawReference(path, handle, size);
        RandomAccess.SetLength(handle, (long)size);
        if (initialContent is not null)
        {
            using var src = File.OpenHandle(initialContent, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            reference.CopyFrom(src, 0, size);
        }
        return reference;
    }

    /// <summary>Opens an existing raw file as a reference; its size is the file's length.</summary>
    public static RawReference Open(string path)
    {
        var handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        return new RawReference(path, handle, (ulong)RandomAccess.GetLength(handle));
    }

    /// <summary>Copies the reference's file (flushed) to <paramref name="destination"/>.</summary>
    public void CopyTo(string destination)
    {
        using var dst = Create(destination, Size);
        dst.CopyFrom(_handle, 0, Size);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data) => RandomAccess.Write(_handle, data, (long)offset);

    public void WriteZeroes(ulong offset, ulong length)
    {
        var zeros = new byte[(int)Math.Min(length, 1 << 20)];
        while (length > 0)
        {
            var n = (int)Math.Min(length, (ulong)zeros.Length);
            RandomAccess.Write(_handle, zeros.AsSpan(0, n), (long)offset);
            offset += (ulong)n;
            length -= (ulong)n;
        }
    }

    /// <summary>Copies [offset, offset+length) of another raw file (zeros past its end) into the same place here.</summary>
    public void CopyFrom(SafeFileHandle source, ulong offset, ulong length)
    {
        var buffer = new byte[(int)Math.Min(Math.Max(length, 1), 1 << 20)];
        while (length > 0)
        {
            var n = (int)Math.Min(length, (ulong)buffer.Length);
            ReadFully(source, offset, buffer.AsSpan(0, n));
            RandomAccess.Write(_handle, buffer.AsSpan(0, n), (long)offset);
            offset += (ulong)n;
            length -= (ulong)n;
        }
    }

    public void Read(ulong offset, Span<byte> destination) => ReadFully(_handle, offset, destination);

    public void Flush() => RandomAccess.FlushToDisk(_handle);

    public void Dispose() => _handle.Dispose();

    /// <summary>Reads a whole range of a file; bytes past its end read as zeros.</summary>
    public static void ReadFully(SafeFileHandle handle, ulong offset, Span<byte> destination)
    {
        var done = 0;
        while (done < destination.Length)
        {
            var n = RandomAccess.Read(handle, destination[done..], (long)offset + done);
            if (n <= 0)
                break;
            done += n;
        }
        destination[done..].Clear();
    }
}

/// <summary>
/// A seeded, reproducible mix of writes (data derived from the seed and the operation's index),
/// write-zeroes, discards, flushes and verifying reads, with offsets and lengths that straddle
/// cluster boundaries. <see cref="Run"/> applies it in lockstep to an image under test and to a
/// <see cref="RawReference"/>, and checks every byte read against the reference.
/// </summary>
public sealed class RandomWorkload
{
    private readonly WorkloadOptions _options;

    public RandomWorkload(WorkloadOptions options)
    {
        ArgumentOutOfRangeException.ThrowIfZero(options.Size);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.ClusterSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Alignment, 1);
        if (options.DiscardExposesBacking && options.BackingContent is null)
            throw new ArgumentException("DiscardExposesBacking needs BackingContent (the backing chain as a raw file)");
        _options = options;
    }

    public WorkloadOptions Options => _options;

    /// <summary>The operations, in order; the same options always give the same list.</summary>
    public IReadOnlyList<WorkloadOp> Generate()
    {
        var rng = new SplitMix64((ulong)(uint)_options.Seed * 0x9E3779B97F4A7C15UL ^ 0x5DEECE66DUL);
        var size = _options.Size;
        var cs = (ulong)_options.ClusterSize;
        var clusters = (size + cs - 1) / cs;
        // A hot window of clusters that gets rewritten over and over (partial overwrites, zeroing
        // and discarding of clusters that hold data), the rest of the disk is hit uniformly.
        var hotCount = Math.Min(clusters, 48UL);
        var hotBase = clusters > hotCount ? rng.Below(clusters - hotCount + 1) : 0;
        var ops = new List<WorkloadOp>(_options.Operations);
        for (var i = 0; i < _options.Operations; i++)
        {
            var roll = rng.Below(100);
            var kind = roll switch
            {
                < 42 => WorkloadOpKind.Write,
                < 67 => WorkloadOpKind.Read,
                < 80 => WorkloadOpKind.WriteZeroes,
                < 94 => WorkloadOpKind.Discard,
                _ => WorkloadOpKind.Flush,
            };
            if (kind == WorkloadOpKind.Flush)
            {
                ops.Add(new WorkloadOp(i, kind, 0, 0));
                continue;
            }
            var cluster = rng.Below(100) < 60 ? hotBase + rng.Below(hotCount) : rng.Below(clusters);
            var inCluster = rng.Below(4) switch
            {
                0 => 0UL,
                1 => cs - 1 - rng.Below(Math.Max(1, Math.Min(cs / 2, 4096))), // just before the next boundary
                2 => rng.Below(cs) / 512 * 512,
                _ => rng.Below(cs),
            };
            var offset = Math.Min(cluster * cs + inCluster, size - 1);
            var length = rng.Below(10) switch
            {
                < 3 => 1 + rng.Below(4096),
                < 6 => 1 + rng.Below(cs),
                < 8 => cs * (1 + rng.Below(3)),
                _ => 1 + rng.Below(3 * cs + 4096),
            };
            length = Math.Min(length, _options.MaxLength);
            var align = (ulong)_options.Alignment;
            if (kind == WorkloadOpKind.Discard && _options.DiscardExposesBacking)
                align = cs;
            else if (kind is WorkloadOpKind.WriteZeroes or WorkloadOpKind.Discard && rng.Below(3) == 0)
                align = Math.Max(align, cs); // whole clusters: what turns into zero clusters and frees space
            if (align > 1)
            {
                var end = offset + length;
                offset = offset / align * align;
                end = (end + align - 1) / align * align;
                length = end - offset;
            }
            length = Math.Max(1, Math.Min(length, size - offset));
            ops.Add(new WorkloadOp(i, kind, offset, length));
        }
        return ops;
    }

    /// <summary>Applies every operation to <paramref name="image"/> and <paramref name="reference"/>, verifying every read.</summary>
    public WorkloadStats Run(IBlockImage image, RawReference reference)
    {
        if (image.Size != _options.Size || reference.Size != _options.Size)
            throw new ArgumentException($"workload size {_options.Size}, image size {image.Size}, reference size {reference.Size}");
        using var backing = _options.DiscardExposesBacking
            ? File.OpenHandle(_options.BackingContent!, FileMode.Open, FileAccess.Read, FileShare.ReadWrite)
            : null;
        var cs = (ulong)_options.ClusterSize;
        int writes = 0, zeroes = 0, discards = 0, flushes = 0, reads = 0, crossing = 0, unaligned = 0;
        ulong written = 0, verified = 0;
        var ops = Generate();
        var history = new Queue<WorkloadOp>();
        for (var n = 0; n < ops.Count; n++)
        {
            var op = ops[n];
            history.Enqueue(op);
            if (history.Count > 12)
                history.Dequeue();
            if (op.Kind != WorkloadOpKind.Flush)
            {
                if (op.Offset / cs != (op.Offset + op.Length - 1) / cs)
                    crossing++;
                if (op.Offset % 512 != 0 || op.Length % 512 != 0)
                    unaligned++;
            }
            try
            {
                switch (op.Kind)
                {
                    case WorkloadOpKind.Write:
                    {
                        var data = Pattern(_options.Seed, op.Index, (int)op.Length);
                        image.Write(op.Offset, data);
                        reference.Write(op.Offset, data);
                        writes++;
                        written += op.Length;
                        break;
                    }
                    case WorkloadOpKind.WriteZeroes:
                        image.WriteZeroes(op.Offset, op.Length);
                        reference.WriteZeroes(op.Offset, op.Length);
                        zeroes++;
                        break;
                    case WorkloadOpKind.Discard:
                        image.Discard(op.Offset, op.Length);
                        if (backing is not null)
                            reference.CopyFrom(backing, op.Offset, op.Length);
                        else
                            reference.WriteZeroes(op.Offset, op.Length);
                        discards++;
                        break;
                    case WorkloadOpKind.Flush:
                        image.Flush();
                        flushes++;
                        break;
                    case WorkloadOpKind.Read:
                        VerifyRange(image, reference, op.Offset, op.Length, () => Describe(op, history));
                        reads++;
                        verified += op.Length;
                        break;
                }
            }
            catch (Exception e) when (e is not WorkloadMismatchException)
            {
                throw new WorkloadMismatchException($"{Describe(op, history)}\nthe image threw {e.GetType().Name}: {e.Message}\n{e}");
            }
        }
        return new WorkloadStats(writes, zeroes, discards, flushes, reads, crossing, unaligned, written, verified);
    }

    /// <summary>Reads the whole image and the reference and checks that they agree byte for byte.</summary>
    public static ulong VerifyAll(IBlockImage image, RawReference reference, int chunk = 1 << 20)
    {
        if (image.Size != reference.Size)
            throw new WorkloadMismatchException($"image size {image.Size} differs from reference size {reference.Size}");
        for (ulong off = 0; off < image.Size; off += (ulong)chunk)
        {
            var len = Math.Min((ulong)chunk, image.Size - off);
            VerifyRange(image, reference, off, len, () => $"full verification of {image.Path} against {reference.Path}");
        }
        return image.Size;
    }

    /// <summary>Reads one range from both and throws, naming the first differing byte, unless they agree.</summary>
    public static void VerifyRange(IBlockImage image, RawReference reference, ulong offset, ulong length, Func<string> context)
    {
        var actual = new byte[length];
        var expected = new byte[length];
        // Poison the buffer so that a Read that leaves bytes untouched cannot pass by luck.
        actual.AsSpan().Fill(0xE7);
        image.Read(offset, actual);
        reference.Read(offset, expected);
        var i = actual.AsSpan().CommonPrefixLength(expected);
        if (i < actual.Length)
        {
            var bad = i;
            var count = 0;
            for (var j = i; j < actual.Length; j++)
            {
                if (actual[j] != expected[j])
                    count++;
            }
            throw new WorkloadMismatchException(
                $"{context()}\nmismatch at guest offset {offset + (ulong)bad} (0x{offset + (ulong)bad:x}), {count} of {length} bytes differ: " +
                $"expected {Hex(expected, bad)} but read {Hex(actual, bad)}");
        }
    }

    /// <summary>The data a write writes: a stream derived from (seed, op index), never all zeros.</summary>
    public static byte[] Pattern(int seed, int index, int length)
    {
        var rng = new SplitMix64(((ulong)(uint)seed << 32 | (uint)index) ^ 0xA5A5_5A5A_C3C3_3C3CUL);
        var data = new byte[length];
        var i = 0;
        while (i + 8 <= length)
        {
            BitConverter.TryWriteBytes(data.AsSpan(i), rng.Next());
            i += 8;
        }
        var last = rng.Next();
        for (; i < length; i++, last >>= 8)
            data[i] = (byte)last;
        if (length > 0 && data[0] == 0)
            data[0] = 0x5A;
        return data;
    }

    private string Describe(WorkloadOp op, IEnumerable<WorkloadOp> history)
    {
        var sb = new StringBuilder();
        sb.Append($"workload seed {_options.Seed} (size {_options.Size}, cluster {_options.ClusterSize}) at op {op}");
        sb.Append("\nrecent ops:");
        foreach (var h in history)
            sb.Append("\n  ").Append(h);
        return sb.ToString();
    }

    private static string Hex(byte[] data, int at)
    {
        var end = Math.Min(data.Length, at + 16);
        return Convert.ToHexString(data, at, end - at);
    }

    /// <summary>SplitMix64: small, fast, and the same on every runtime version.</summary>
    private sealed class SplitMix64(ulong state)
    {
        private ulong _state = state;

        public ulong Next()
        {
            var z = _state += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }

        /// <summary>Uniform in [0, bound) (bound &gt; 0).</summary>
        public ulong Below(ulong bound) => bound <= 1 ? 0 : Next() % bound;
    }
}
