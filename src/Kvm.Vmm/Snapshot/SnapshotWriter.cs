using System.Buffers;
using System.Buffers.Binary;
using System.IO.Hashing;
using System.Text;
using Kvm.Interop.Handles;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Vmm.Snapshot;

/// <summary>What <see cref="SnapshotWriter.Write"/> wrote.</summary>
/// <param name="StatePath">The state file.</param>
/// <param name="MemoryPath">The memory file.</param>
/// <param name="StateBytes">The state file's length.</param>
/// <param name="MemoryDataSize">The guest RAM bytes in the memory file (after its header page).</param>
/// <param name="MemoryBytesWritten">The guest RAM bytes actually written: the rest were pages of zeros, left as holes.</param>
/// <param name="SnapshotId">The snapshot's id (both files carry it).</param>
public sealed record SnapshotWriteResult(string StatePath, string MemoryPath, long StateBytes, ulong MemoryDataSize, ulong MemoryBytesWritten,
    Guid SnapshotId);

/// <summary>
/// Writes a snapshot (layout: <see cref="SnapshotFormat"/>): the memory file and the state file,
/// each first under a temporary name in the snapshot directory and flushed to disk, then renamed
/// over the old ones, the memory file first, then the directory flushed. A failure before the
/// renames (the memory source throws, the disk fills, the caller cancels) leaves a snapshot
/// already in the directory as it was and removes the temporary files. Only a crash between the
/// two renames leaves the new memory file beside the old state file, which the reader refuses
/// (their snapshot ids differ) rather than restoring. A restored VM that still maps the old memory
/// file keeps its pages: the rename does not touch the old file's contents.
/// </summary>
public static class SnapshotWriter
{
    private const int ChunkSize = 1 << 20;
    private const int Page = (int)SnapshotFormat.PageSize;

    /// <summary>
    /// Writes the snapshot <paramref name="state"/> into <paramref name="directory"/> (created when
    /// missing), its guest RAM read from <paramref name="memory"/> region by region, in chunks of
    /// 1 MiB; <paramref name="progress"/> hears the RAM bytes done and the total after each chunk.
    /// A state the reader would refuse is refused first (<see cref="ArgumentException"/>).
    /// </summary>
    public static SnapshotWriteResult Write(
        string directory,
        SnapshotState state,
        ISnapshotMemorySource memory,
        Action<long, long>? progress = null,
        CancellationToken cancellationToken = default)
    {
        byte[] stateBytes = EncodeState(state);
        Directory.CreateDirectory(directory);
        string memoryTemp = TempMemoryPath(directory);
        bool published = false;
        try
        {
            ulong written = WriteMemory(memoryTemp, state, memory, progress, cancellationToken);
            var result = Publish(directory, state, stateBytes, memoryTemp, written, cancellationToken);
            published = true;
            return result;
        }
        finally
        {
            if (!published)
                TryDelete(memoryTemp);
        }
    }

    /// <summary>A name for a memory file being written in <paramref name="directory"/>, hidden and unique.</summary>
    public static string TempMemoryPath(string directory) => TempPath(directory, SnapshotFormat.MemoryFileName);

    /// <summary>A hidden, unique name beside <paramref name="fileName"/> for it to be written under before it is renamed into place.</summary>
    private static string TempPath(string directory, string fileName) =>
        Path.Combine(directory, $".{fileName}.tmp-{Environment.ProcessId}-{Random.Shared.Next():x8}");

    /// <summary>Writes <paramref name="bytes"/> as a new file at <paramref name="path"/> and flushes it to disk.</summary>
    private static void WriteFlushed(string path, byte[] bytes)
    {
        using var file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.Write, FileShare.None);
        RandomAccess.Write(file, bytes, 0);
        RandomAccess.FlushToDisk(file);
    }

    /// <summary>The memory file's first page (magic, version, snapshot id, RAM size), the rest zeros.</summary>
    public static byte[] MemoryHeader(SnapshotState state) => SnapshotMemoryFile.Header(state.Id, state.MemoryDataSize);

    /// <summary>
    /// Finishes a snapshot whose memory file someone else wrote through <paramref name="memoryFile"/>
    /// (open, named <paramref name="memoryTemp"/> in <paramref name="directory"/>:
    /// <see cref="MemoryHeader"/> at 0, each region's RAM at its FileOffset, pages of zeros as
    /// holes; <paramref name="memoryBytesWritten"/> of RAM written): sets its length, flushes it,
    /// writes the state file, renames both into place and flushes the directory, as
    /// <see cref="Write"/> does. On failure the temporary memory file stays for the caller to delete.
    /// </summary>
    public static SnapshotWriteResult Finish(string directory, SnapshotState state, SafeFileHandle memoryFile, string memoryTemp,
        ulong memoryBytesWritten, CancellationToken cancellationToken = default)
    {
        byte[] stateBytes = EncodeState(state);
        RandomAccess.SetLength(memoryFile, SnapshotFormat.MemoryHeaderSize + (long)state.MemoryDataSize);
        RandomAccess.FlushToDisk(memoryFile);
        return Publish(directory, state, stateBytes, memoryTemp, memoryBytesWritten, cancellationToken);
    }

    /// <summary>Writes the state file under a temporary name, then renames the memory file and it into place and flushes the directory.</summary>
    private static SnapshotWriteResult Publish(string directory, SnapshotState state, byte[] stateBytes, string memoryTemp, ulong written,
        CancellationToken cancellationToken)
    {
        string statePath = Path.Combine(directory, SnapshotFormat.StateFileName);
        string memoryPath = Path.Combine(directory, SnapshotFormat.MemoryFileName);
        string stateTemp = TempPath(directory, SnapshotFormat.StateFileName);
        bool renamed = false;
        try
        {
            WriteFlushed(stateTemp, stateBytes);
            cancellationToken.ThrowIfCancellationRequested();
            renamed = true;
            File.Move(memoryTemp, memoryPath, overwrite: true);
            File.Move(stateTemp, statePath, overwrite: true);
            using (var dir = DirectoryHandle.Open(directory))
                dir.Sync(directory);
            return new SnapshotWriteResult(statePath, memoryPath, stateBytes.Length, state.MemoryDataSize, written, state.Id);
        }
        finally
        {
            if (!renamed)
                TryDelete(stateTemp);
        }
    }

    /// <summary>
    /// Replaces the state file in <paramref name="directory"/> with <paramref name="state"/>
    /// (the same snapshot with something added, such as its working set; the memory file stays as
    /// it is): written under a temporary name, flushed, renamed over the old one, the directory
    /// flushed. A failure before the rename leaves the old state file as it was. Returns the new
    /// file's length.
    /// </summary>
    public static long RewriteState(string directory, SnapshotState state)
    {
        byte[] stateBytes = EncodeState(state);
        string statePath = Path.Combine(directory, SnapshotFormat.StateFileName);
        string stateTemp = TempPath(directory, SnapshotFormat.StateFileName);
        bool renamed = false;
        try
        {
            WriteFlushed(stateTemp, stateBytes);
            File.Move(stateTemp, statePath, overwrite: true);
            renamed = true;
            using (var dir = DirectoryHandle.Open(directory))
                dir.Sync(directory);
            return stateBytes.Length;
        }
        finally
        {
            if (!renamed)
                TryDelete(stateTemp);
        }
    }

    /// <summary>Deletes <paramref name="path"/> if it can: what is left of a write that failed.</summary>
    internal static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    /// <summary>Writes the memory file: header page, then the non-zero pages; returns the RAM bytes written.</summary>
    private static ulong WriteMemory(string path, SnapshotState state, ISnapshotMemorySource memory, Action<long, long>? progress, CancellationToken cancellationToken)
    {
        ulong dataSize = state.MemoryDataSize;
        using var file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        RandomAccess.Write(file, SnapshotMemoryFile.Header(state.Id, dataSize), 0);
        var buffer = ArrayPool<byte>.Shared.Rent(ChunkSize);
        try
        {
            ulong written = 0;
            long done = 0, total = (long)dataSize;
            foreach (var region in state.Regions)
            {
                for (ulong at = 0; at < region.Size;)
                {
                    cancellationToken.ThrowIfCancellationRequested();
                    int n = (int)Math.Min(ChunkSize, region.Size - at);
                    var chunk = buffer.AsSpan(0, n);
                    memory.Read(region.GuestAddress + at, chunk);
                    long fileOffset = (long)(region.FileOffset + at);
                    ForEachNonZeroRun(chunk, (start, length) =>
                    {
                        RandomAccess.Write(file, buffer.AsSpan(start, length), fileOffset + start);
                        written += (ulong)length;
                    });
                    at += (ulong)n;
                    done += n;
                    progress?.Invoke(done, total);
                }
            }
            // The pages of zeros never written, the last ones included, stay holes.
            RandomAccess.SetLength(file, SnapshotFormat.MemoryHeaderSize + (long)dataSize);
            RandomAccess.FlushToDisk(file);
            return written;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>
    /// Calls <paramref name="run"/> with the start and length of each run of pages in
    /// <paramref name="chunk"/> (a whole number of pages) that are not all zeros.
    /// </summary>
    internal static void ForEachNonZeroRun(ReadOnlySpan<byte> chunk, Action<int, int> run)
    {
        int runStart = -1;
        for (int page = 0; page < chunk.Length; page += Page)
        {
            bool zero = !chunk.Slice(page, Math.Min(Page, chunk.Length - page)).ContainsAnyExcept((byte)0);
            if (!zero && runStart < 0)
                runStart = page;
            else if (zero && runStart >= 0)
            {
                run(runStart, page - runStart);
                runStart = -1;
            }
        }
        if (runStart >= 0)
            run(runStart, chunk.Length - runStart);
    }

    /// <summary>
    /// The bytes of the state file of <paramref name="state"/>, after the checks the reader makes
    /// (a state that breaks one is refused with <see cref="ArgumentException"/> naming it).
    /// </summary>
    public static byte[] EncodeState(SnapshotState state)
    {
        byte[] spec = Validate(state);
        var w = new ArrayBufferWriter<byte>(4096);
        w.Write(SnapshotFormat.StateMagic);
        U32(w, SnapshotFormat.Version);
        U32(w, 0);
        U64(w, 0); // the file length, set below
        Span<byte> id = stackalloc byte[16];
        state.Id.TryWriteBytes(id, bigEndian: true, out _);
        w.Write(id);
        U64(w, (ulong)((state.Created.UtcTicks - DateTimeOffset.UnixEpoch.UtcTicks) * 100));

        int body = BeginSection(w, SnapshotFormat.SpecTag);
        w.Write(spec);
        EndSection(w, body);

        body = BeginSection(w, SnapshotFormat.MemoryTag);
        U32(w, SnapshotFormat.PageSize);
        U32(w, (uint)state.Regions.Count);
        U64(w, state.MemoryDataSize);
        foreach (var r in state.Regions)
        {
            U64(w, r.GuestAddress);
            U64(w, r.Size);
            U64(w, r.FileOffset);
        }
        EndSection(w, body);

        body = BeginSection(w, SnapshotFormat.WorkingSetTag);
        U32(w, state.WorkingSet is null ? 0u : 1u);
        U32(w, (uint)(state.WorkingSet?.Count ?? 0));
        foreach (var r in state.WorkingSet ?? [])
        {
            U64(w, r.FirstPage);
            U64(w, r.PageCount);
        }
        EndSection(w, body);

        body = BeginSection(w, SnapshotFormat.RecordsTag);
        U32(w, (uint)state.Records.Count);
        foreach (var r in state.Records)
        {
            Name(w, r.Id);
            Name(w, r.Kind);
            U32(w, (uint)r.Payload.Length);
            w.Write(r.Payload);
        }
        EndSection(w, body);

        long length = (long)w.WrittenCount + SnapshotFormat.CrcSize;
        if (length > SnapshotFormat.MaxStateFileBytes)
            throw new ArgumentException($"the state file would be {length} bytes long, more than the {SnapshotFormat.MaxStateFileBytes} a state file may have", nameof(state));
        var bytes = new byte[length];
        w.WrittenSpan.CopyTo(bytes);
        BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(16), (ulong)length);
        BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(bytes.Length - SnapshotFormat.CrcSize), Crc64.HashToUInt64(bytes.AsSpan(0, bytes.Length - SnapshotFormat.CrcSize)));
        return bytes;
    }

    /// <summary>Refuses what the reader would refuse; returns the spec's UTF-8 bytes.</summary>
    private static byte[] Validate(SnapshotState state)
    {
        const string name = nameof(state);
        byte[] spec;
        try
        {
            spec = Strict.GetBytes(state.SpecJson);
        }
        catch (EncoderFallbackException)
        {
            throw new ArgumentException("the spec JSON is not valid UTF-16 (a lone surrogate): it cannot be written as UTF-8", name);
        }
        if (spec.Length > SnapshotFormat.MaxSpecJsonBytes)
            throw new ArgumentException($"the spec JSON is {spec.Length} bytes of UTF-8, more than the {SnapshotFormat.MaxSpecJsonBytes} allowed", name);

        long ticks = state.Created.UtcTicks - DateTimeOffset.UnixEpoch.UtcTicks;
        if (ticks < long.MinValue / 100 || ticks > long.MaxValue / 100)
            throw new ArgumentException($"the creation time {state.Created:O} is outside what 64-bit nanoseconds from 1970 hold", name);

        if (state.Regions.Count > SnapshotFormat.MaxRegions)
            throw new ArgumentException($"{state.Regions.Count} RAM regions, more than the {SnapshotFormat.MaxRegions} allowed", name);
        for (int i = 0; i < state.Regions.Count; i++)
            if (SnapshotRules.RegionProblem(state.Regions[i], i == 0 ? null : state.Regions[i - 1]) is { } problem)
                throw new ArgumentException($"RAM region {i}: {problem}", name);

        if (state.WorkingSet is { } ranges)
        {
            if (ranges.Count > SnapshotFormat.MaxWorkingSetRanges)
                throw new ArgumentException($"{ranges.Count} working-set ranges, more than the {SnapshotFormat.MaxWorkingSetRanges} allowed", name);
            for (int i = 0; i < ranges.Count; i++)
                if (SnapshotRules.RangeProblem(ranges[i], i == 0 ? null : ranges[i - 1], state.Regions) is { } problem)
                    throw new ArgumentException($"working-set range {i}: {problem}", name);
        }

        if (state.Records.Count > SnapshotFormat.MaxRecords)
            throw new ArgumentException($"{state.Records.Count} records, more than the {SnapshotFormat.MaxRecords} allowed", name);
        var seen = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < state.Records.Count; i++)
        {
            var r = state.Records[i];
            if (SnapshotFormat.NameProblem(r.Id) is { } idProblem)
                throw new ArgumentException($"record {i}: the id '{r.Id}' cannot be written: {idProblem}", name);
            if (SnapshotFormat.NameProblem(r.Kind) is { } kindProblem)
                throw new ArgumentException($"record {i} ('{r.Id}'): the kind '{r.Kind}' cannot be written: {kindProblem}", name);
            if (r.Payload.Length > SnapshotFormat.MaxPayloadBytes)
                throw new ArgumentException($"record {i} ('{r.Id}'): its payload of {r.Payload.Length} bytes is more than the {SnapshotFormat.MaxPayloadBytes} allowed", name);
            if (!seen.TryAdd(r.Id, i))
                throw new ArgumentException($"record {i}: the id '{r.Id}' is taken by record {seen[r.Id]}; ids are unique", name);
        }
        return spec;
    }

    private static int BeginSection(ArrayBufferWriter<byte> w, ReadOnlySpan<byte> tag)
    {
        w.Write(tag);
        U32(w, 0); // the body's length, set by EndSection
        return w.WrittenCount;
    }

    private static void EndSection(ArrayBufferWriter<byte> w, int bodyStart)
    {
        // ArrayBufferWriter hands out its own array: the length goes back into the written bytes.
        var written = System.Runtime.InteropServices.MemoryMarshal.AsMemory(w.WrittenMemory).Span;
        BinaryPrimitives.WriteUInt32LittleEndian(written[(bodyStart - 4)..], (uint)(w.WrittenCount - bodyStart));
    }

    private static void Name(ArrayBufferWriter<byte> w, string value)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(w.GetSpan(2), (ushort)value.Length);
        w.Advance(2);
        w.Write(Encoding.ASCII.GetBytes(value));
    }

    private static void U32(ArrayBufferWriter<byte> w, uint value)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(w.GetSpan(4), value);
        w.Advance(4);
    }

    private static void U64(ArrayBufferWriter<byte> w, ulong value)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(w.GetSpan(8), value);
        w.Advance(8);
    }

    private static readonly UTF8Encoding Strict = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
}
