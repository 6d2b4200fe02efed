using System.Buffers.Binary;
using System.IO.Hashing;
using System.Text;
using Kvm.Hypervisor.State;

namespace Kvm.Vmm.Snapshot;

/// <summary>
/// Reads a snapshot written by <see cref="SnapshotWriter"/> and checks every byte of its state
/// file and the header of its memory file (layout: <see cref="SnapshotFormat"/>). Bad bytes raise
/// <see cref="SnapshotFormatException"/> only, naming the file, the offset, the section and the
/// field; nothing is allocated beyond the limits of <see cref="SnapshotFormat"/>.
/// </summary>
public static class SnapshotReader
{
    /// <summary>
    /// The state of the snapshot in <paramref name="directory"/>, after every check of its state file
    /// and of its memory file's header against it (the guest RAM itself is read later, or mapped:
    /// <see cref="SnapshotMemoryFile"/>).
    /// </summary>
    public static SnapshotState Read(string directory)
    {
        var state = ReadState(Path.Combine(directory, SnapshotFormat.StateFileName));
        using (SnapshotMemoryFile.Open(directory, state))
        {
        }
        return state;
    }

    /// <summary>The state file <paramref name="path"/>, after every check (its memory file is not looked at).</summary>
    public static SnapshotState ReadState(string path)
    {
        byte[] bytes;
        try
        {
            using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
            long length = file.Length;
            if (length > SnapshotFormat.MaxStateFileBytes)
                throw new SnapshotFormatException(path, null,
                    $"the file is {length} bytes long, more than the {SnapshotFormat.MaxStateFileBytes} bytes a state file may have");
            bytes = new byte[length];
            int read = file.ReadAtLeast(bytes, bytes.Length, throwOnEndOfStream: false);
            if (read != bytes.Length)
                throw new SnapshotFormatException(path, read, $"the file shrank to {read} bytes while it was read (it was {length})");
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new SnapshotFormatException(path, null, "the state file is missing", e);
        }
        return ParseState(bytes, path);
    }

    /// <summary>
    /// Parses the bytes <paramref name="bytes"/> of a state file (read from a file, or received);
    /// <paramref name="path"/> names it in errors.
    /// </summary>
    public static SnapshotState ParseState(ReadOnlySpan<byte> bytes, string path)
    {
        var c = new Cursor(bytes, path, "header");
        CheckHeader(ref c, bytes, path);

        var id = new Guid(bytes.Slice(24, 16), bigEndian: true);
        long nanoseconds = BinaryPrimitives.ReadInt64LittleEndian(bytes[40..]);
        var created = DateTimeOffset.UnixEpoch.AddTicks(nanoseconds / 100);
        c.Position = SnapshotFormat.StateHeaderSize;
        c.Limit = bytes.Length - SnapshotFormat.CrcSize;

        int end = c.Section(SnapshotFormat.SpecTag, "SPEC", SnapshotFormat.MaxSpecJsonBytes);
        string spec = c.Utf8(end - c.Position, "spec JSON");

        end = c.Section(SnapshotFormat.MemoryTag, "MEMS", 16 + SnapshotFormat.MaxRegions * SnapshotFormat.RegionEntrySize);
        var regions = ReadRegions(ref c, end);

        end = c.Section(SnapshotFormat.WorkingSetTag, "WSET", 8 + SnapshotFormat.MaxWorkingSetRanges * SnapshotFormat.RangeEntrySize);
        var workingSet = ReadWorkingSet(ref c, end, regions);

        end = c.Section(SnapshotFormat.RecordsTag, "RECS", SnapshotFormat.MaxStateFileBytes);
        var records = ReadRecords(ref c, end);

        c.Where = "after the sections";
        c.Limit = bytes.Length - SnapshotFormat.CrcSize;
        if (c.Position != c.Limit)
            throw c.Error($"{c.Limit - c.Position} bytes follow the last section before the CRC");

        return new SnapshotState
        {
            Id = id,
            Created = created,
            SpecJson = spec,
            Regions = regions,
            WorkingSet = workingSet,
            Records = records,
        };
    }

    /// <summary>Magic, version, flags, length and CRC, in that order (so that another version is named as such).</summary>
    private static void CheckHeader(ref Cursor c, ReadOnlySpan<byte> bytes, string path)
    {
        var magic = SnapshotFormat.StateMagic;
        if (bytes.Length < magic.Length || !bytes[..magic.Length].SequenceEqual(magic))
        {
            if (bytes.Length < magic.Length && bytes.SequenceEqual(magic[..bytes.Length]))
                throw new SnapshotFormatException(path, bytes.Length, $"truncated: the file is {bytes.Length} bytes long, shorter than its {magic.Length}-byte magic");
            throw new SnapshotFormatException(path, 0,
                $"bad magic: expected {Hex(magic)} (\"KVMSNAP\"), found {Hex(bytes[..Math.Min(bytes.Length, magic.Length)])}: not a kvm snapshot state file");
        }
        if (bytes.Length < SnapshotFormat.StateHeaderSize + SnapshotFormat.CrcSize)
        {
            if (bytes.Length >= 12)
                CheckVersion(BinaryPrimitives.ReadUInt32LittleEndian(bytes[8..]), path);
            throw new SnapshotFormatException(path, bytes.Length,
                $"truncated: the file is {bytes.Length} bytes long, shorter than its {SnapshotFormat.StateHeaderSize}-byte header and {SnapshotFormat.CrcSize}-byte CRC");
        }
        CheckVersion(BinaryPrimitives.ReadUInt32LittleEndian(bytes[8..]), path);
        uint flags = BinaryPrimitives.ReadUInt32LittleEndian(bytes[12..]);
        if (flags != 0)
            throw new SnapshotFormatException(path, 12, $"header field 'flags' is 0x{flags:x}; version {SnapshotFormat.Version} defines none (expected 0)");
        ulong declared = BinaryPrimitives.ReadUInt64LittleEndian(bytes[16..]);
        if (declared != (ulong)bytes.Length)
            throw new SnapshotFormatException(path, 16, declared > (ulong)bytes.Length
                ? $"truncated: the file is {bytes.Length} bytes long, its header says {declared}"
                : $"the file is {bytes.Length} bytes long, {(ulong)bytes.Length - declared} bytes more than the {declared} its header says");
        int crcAt = bytes.Length - SnapshotFormat.CrcSize;
        ulong stored = BinaryPrimitives.ReadUInt64LittleEndian(bytes[crcAt..]);
        ulong computed = Crc64.HashToUInt64(bytes[..crcAt]);
        if (stored != computed)
            throw new SnapshotFormatException(path, crcAt, $"CRC mismatch: the file says 0x{stored:x16}, its bytes 0 to {crcAt - 1} give 0x{computed:x16} (damaged)");
    }

    private static void CheckVersion(uint version, string path)
    {
        if (version != SnapshotFormat.Version)
            throw new SnapshotFormatException(path, 8, $"format version {version}; this kvm-vmm reads version {SnapshotFormat.Version}");
    }

    private static SnapshotRegion[] ReadRegions(ref Cursor c, int end)
    {
        uint pageSize = c.U32("page size");
        if (pageSize != SnapshotFormat.PageSize)
            throw c.Error($"field 'page size' is {pageSize}, expected {SnapshotFormat.PageSize}", c.Position - 4);
        int count = c.Count("region count", SnapshotFormat.MaxRegions, SnapshotFormat.RegionEntrySize, 8);
        ulong dataSize = c.U64("memory data size");
        if (end - c.Position != count * SnapshotFormat.RegionEntrySize)
            throw c.Error($"{count} regions need {count * SnapshotFormat.RegionEntrySize} bytes; the section has {end - c.Position} left");
        var regions = new SnapshotRegion[count];
        for (int i = 0; i < count; i++)
        {
            int at = c.Position;
            var r = new SnapshotRegion(c.U64("guest address"), c.U64("size"), c.U64("file offset"));
            if (SnapshotRules.RegionProblem(r, i == 0 ? null : regions[i - 1]) is { } problem)
                throw c.Error($"region {i}: {problem}", at);
            regions[i] = r;
        }
        if (SnapshotRules.DataSizeProblem(regions, dataSize) is { } sizeProblem)
            throw c.Error(sizeProblem, c.SectionStart + SnapshotFormat.SectionHeaderSize + 8);
        return regions;
    }

    private static GuestPageRange[]? ReadWorkingSet(ref Cursor c, int end, SnapshotRegion[] regions)
    {
        uint flags = c.U32("flags");
        if (flags > 1)
            throw c.Error($"field 'flags' is 0x{flags:x}; only bit 0 (recorded) is defined", c.Position - 4);
        int count = c.Count("range count", SnapshotFormat.MaxWorkingSetRanges, SnapshotFormat.RangeEntrySize, 0);
        if (end - c.Position != (long)count * SnapshotFormat.RangeEntrySize)
            throw c.Error($"{count} ranges need {(long)count * SnapshotFormat.RangeEntrySize} bytes; the section has {end - c.Position} left");
        if (flags == 0)
        {
            if (count != 0)
                throw c.Error($"{count} ranges, but the flags say no working set was recorded", c.Position - 4);
            return null;
        }
        var ranges = new GuestPageRange[count];
        for (int i = 0; i < count; i++)
        {
            int at = c.Position;
            var r = new GuestPageRange(c.U64("first page"), c.U64("page count"));
            if (SnapshotRules.RangeProblem(r, i == 0 ? null : ranges[i - 1], regions) is { } problem)
                throw c.Error($"range {i}: {problem}", at);
            ranges[i] = r;
        }
        return ranges;
    }

    private static StateRecord[] ReadRecords(ref Cursor c, int end)
    {
        int count = c.Count("record count", SnapshotFormat.MaxRecords, SnapshotFormat.MinRecordSize, 0);
        var records = new StateRecord[count];
        var seen = new Dictionary<string, int>(count, StringComparer.Ordinal);
        string section = c.Where;
        for (int i = 0; i < count; i++)
        {
            c.Where = $"{section}, record {i}";
            int at = c.Position;
            string id = c.Name("id");
            c.Where = $"{section}, record {i} ('{id}')";
            string kind = c.Name("kind");
            int length = c.Length("payload length", SnapshotFormat.MaxPayloadBytes);
            byte[] payload = c.Take(length, "payload").ToArray();
            if (seen.TryGetValue(id, out int first))
                throw c.Error($"duplicate record id '{id}' (record {first} has it too)", at);
            seen.Add(id, i);
            records[i] = new StateRecord(id, kind, payload);
        }
        c.Where = section;
        if (c.Position != end)
            throw c.Error($"{end - c.Position} bytes follow the last of the {count} records in the section");
        return records;
    }

    internal static string Hex(ReadOnlySpan<byte> bytes) => bytes.IsEmpty ? "(nothing)" : Convert.ToHexString(bytes);

    /// <summary>A position in the state file's bytes, inside the current section, with the path and section for errors.</summary>
    private ref struct Cursor(ReadOnlySpan<byte> data, string path, string where)
    {
        private readonly ReadOnlySpan<byte> _data = data;
        public int Position;
        public int Limit = data.Length;
        public int SectionStart;
        public string Where = where;

        public readonly SnapshotFormatException Error(string problem, int? at = null) =>
            new(path, at ?? Position, $"{Where}: {problem}");

        public ReadOnlySpan<byte> Take(int length, string field)
        {
            if (length > Limit - Position)
                throw Error($"field '{field}' needs {length} bytes; only {Limit - Position} are left before offset {Limit}, where {(Limit == _data.Length - SnapshotFormat.CrcSize ? "the CRC starts" : "the section ends")}");
            var span = _data.Slice(Position, length);
            Position += length;
            return span;
        }

        public ushort U16(string field) => BinaryPrimitives.ReadUInt16LittleEndian(Take(2, field));
        public uint U32(string field) => BinaryPrimitives.ReadUInt32LittleEndian(Take(4, field));
        public ulong U64(string field) => BinaryPrimitives.ReadUInt64LittleEndian(Take(8, field));

        /// <summary>
        /// A count of at most <paramref name="max"/> items of at least <paramref name="itemSize"/>
        /// bytes each, which must fit in what is left of the section after <paramref name="after"/>
        /// more bytes: checked before anything is allocated for them.
        /// </summary>
        public int Count(string field, int max, int itemSize, int after)
        {
            int at = Position;
            uint n = U32(field);
            if (n > (uint)max)
                throw Error($"field '{field}' is {n}, more than the {max} allowed", at);
            long need = (long)n * itemSize + after;
            if (need > Limit - Position)
                throw Error($"field '{field}' is {n}: {n} items need at least {need} bytes, the section has {Limit - Position} left", at);
            return (int)n;
        }

        /// <summary>A u32 length of at most <paramref name="max"/> bytes that must fit in the section.</summary>
        public int Length(string field, int max)
        {
            int at = Position;
            uint n = U32(field);
            if (n > (uint)max)
                throw Error($"field '{field}' is {n}, more than the {max} bytes allowed", at);
            if (n > (uint)(Limit - Position))
                throw Error($"field '{field}' is {n}, past the end of the section: {Limit - Position} bytes are left before offset {Limit}", at);
            return (int)n;
        }

        /// <summary>A record id or kind: u16 length, then 1 to MaxNameBytes bytes of the allowed ASCII characters.</summary>
        public string Name(string field)
        {
            int at = Position;
            ushort n = U16($"{field} length");
            if (n == 0 || n > SnapshotFormat.MaxNameBytes)
                throw Error($"field '{field} length' is {n}; {(field == "id" ? "an" : "a")} {field} has 1 to {SnapshotFormat.MaxNameBytes} bytes", at);
            var bytes = Take(n, field);
            for (int i = 0; i < bytes.Length; i++)
                if (!SnapshotFormat.IsNameChar(bytes[i]))
                    throw Error($"field '{field}' holds byte 0x{bytes[i]:x2}; only A-Z, a-z, 0-9 and . _ : / - are allowed", at + 2 + i);
            return Encoding.ASCII.GetString(bytes);
        }

        public string Utf8(int length, string field)
        {
            int at = Position;
            var bytes = Take(length, field);
            try
            {
                return Strict.GetString(bytes);
            }
            catch (DecoderFallbackException e)
            {
                throw Error($"field '{field}' is not valid UTF-8 (byte {e.Index} of it)", at);
            }
        }

        /// <summary>
        /// A section's header: its tag must be <paramref name="tag"/> and its body of at most
        /// <paramref name="maxLength"/> bytes must fit before the CRC. Returns the body's end; the
        /// position is at its start, and <see cref="Limit"/> its end until the next section.
        /// </summary>
        public int Section(ReadOnlySpan<byte> tag, string name, int maxLength)
        {
            Limit = _data.Length - SnapshotFormat.CrcSize;
            SectionStart = Position;
            Where = $"section header '{name}'";
            var found = Take(4, "tag");
            if (!found.SequenceEqual(tag))
                throw Error($"expected section '{name}', found tag {Describe(found)}", Position - 4);
            int at = Position;
            uint length = U32("length");
            if (length > (uint)maxLength)
                throw Error($"section '{name}' length {length} is more than the {maxLength} bytes allowed", at);
            if (length > (uint)(Limit - Position))
                throw Error($"section '{name}' length {length} runs past the end of the sections: {Limit - Position} bytes are left before the CRC at offset {Limit}", at);
            Where = $"section '{name}'";
            Limit = Position + (int)length;
            return Limit;
        }

        private static string Describe(ReadOnlySpan<byte> tag)
        {
            foreach (byte b in tag)
                if (b is < 0x20 or > 0x7e)
                    return Hex(tag);
            return $"'{Encoding.ASCII.GetString(tag)}' ({Hex(tag)})";
        }
    }

    private static readonly UTF8Encoding Strict = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
}
