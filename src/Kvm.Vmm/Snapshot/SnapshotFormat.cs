namespace Kvm.Vmm.Snapshot;

/// <summary>
/// The one snapshot format: a directory holding a state file (<see cref="StateFileName"/>) and a
/// memory file (<see cref="MemoryFileName"/>) beside it, both of format version
/// <see cref="Version"/>. Every integer is little-endian.
/// <para>
/// State file: the spec, the memory layout, the working set and every state record, checked by a
/// CRC-64 at its end.
/// <code>
/// offset  size  field
///      0     8  magic "KVMSNAP\0" (4B 56 4D 53 4E 41 50 00)
///      8     4  format version, u32 (1)
///     12     4  flags, u32 (0; none defined)
///     16     8  file length in bytes, CRC included, u64
///     24    16  snapshot id (128 random bits; the memory file holds the same)
///     40     8  created, i64 nanoseconds since 1970-01-01 UTC
///     48        four sections in this order, each: tag (4 ASCII bytes), body length u32, body
///               "SPEC"  the VM spec JSON, UTF-8 (opaque here), at most MaxSpecJsonBytes
///               "MEMS"  page size u32 (4096), region count u32, memory data size u64,
///                       then per region: guest address u64, size u64, file offset u64
///               "WSET"  flags u32 (bit 0: a working set was recorded), range count u32,
///                       then per range: first guest page number u64, page count u64
///               "RECS"  record count u32, then per record: id length u16, id (ASCII),
///                       kind length u16, kind (ASCII), payload length u32, payload
///  len-8     8  CRC-64 of bytes 0 to len-9 (System.IO.Hashing.Crc64: CRC-64/ECMA-182,
///               polynomial 0x42F0E1EBA9EA3693, initial value 0, not reflected, no final XOR)
/// </code>
/// Rules the reader enforces (and the writer before it writes): a body ends exactly where its
/// length says; regions are page-aligned, non-empty, in ascending guest order without overlap,
/// below 2^52, and lie back to back in the memory file from offset <see cref="MemoryHeaderSize"/>
/// on, their sizes adding up to the data size; working-set ranges are non-empty, ascending,
/// disjoint and inside guest RAM (none when not recorded); record ids and kinds are 1 to
/// <see cref="MaxNameBytes"/> bytes of [A-Za-z0-9._:/-], ids unique.
/// </para>
/// <para>
/// Memory file: a header page, then guest RAM, region after region, each at the file offset its
/// region names, so that a restore can mmap a region directly (MAP_PRIVATE) and load it lazily.
/// Pages of zeros are holes (the file is sparse). The data is not checksummed (it is large, and
/// read lazily); its header is.
/// <code>
/// offset  size  field
///      0     8  magic "KVMSMEM\0" (4B 56 4D 53 4D 45 4D 00)
///      8     4  format version, u32 (1)
///     12     4  page size, u32 (4096)
///     16    16  snapshot id (the state file's)
///     32     8  data offset, u64 (4096: the data starts after this page)
///     40     8  data size, u64 (the state file's memory data size)
///     48  4040  zeros
///   4088     8  CRC-64 of bytes 0 to 4087
///   4096        guest RAM; the file is 4096 + data size bytes long
/// </code>
/// </para>
/// <para>
/// Bounds, so that a hostile file cannot make the reader allocate more than about twice the state
/// file's size: the state file is at most <see cref="MaxStateFileBytes"/>; each length and count is
/// checked against its limit and against the bytes left in its section before anything is
/// allocated for it.
/// </para>
/// </summary>
public static class SnapshotFormat
{
    /// <summary>The state file's name in a snapshot directory.</summary>
    public const string StateFileName = "state";

    /// <summary>The memory file's name in a snapshot directory.</summary>
    public const string MemoryFileName = "memory";

    /// <summary>The one format version of both files; a file of another version is refused.</summary>
    public const uint Version = 1;

    /// <summary>The unit of the memory layout and of the working set: regions are aligned to it.</summary>
    public const uint PageSize = 4096;

    /// <summary>The memory file's header page: guest RAM starts at this offset.</summary>
    public const int MemoryHeaderSize = 4096;

    /// <summary>The largest state file the reader takes (256 MiB).</summary>
    public const int MaxStateFileBytes = 256 << 20;

    /// <summary>The largest VM spec JSON (1 MiB of UTF-8).</summary>
    public const int MaxSpecJsonBytes = 1 << 20;

    /// <summary>The most RAM regions.</summary>
    public const int MaxRegions = 1024;

    /// <summary>The most working-set ranges (8 Mi: 128 MiB of section).</summary>
    public const int MaxWorkingSetRanges = 8 << 20;

    /// <summary>The most state records.</summary>
    public const int MaxRecords = 65536;

    /// <summary>The longest record id or kind, in bytes.</summary>
    public const int MaxNameBytes = 128;

    /// <summary>The largest record payload (64 MiB).</summary>
    public const int MaxPayloadBytes = 64 << 20;

    /// <summary>Guest addresses (and so RAM) end below 2^52, the widest x86-64 physical address.</summary>
    public const ulong MaxGuestAddress = 1UL << 52;

    /// <summary>The state file's magic, "KVMSNAP\0".</summary>
    public static ReadOnlySpan<byte> StateMagic => "KVMSNAP\0"u8;

    /// <summary>The memory file's magic, "KVMSMEM\0".</summary>
    public static ReadOnlySpan<byte> MemoryMagic => "KVMSMEM\0"u8;

    internal const int StateHeaderSize = 48;
    internal const int SectionHeaderSize = 8;
    internal const int CrcSize = 8;
    internal const int RegionEntrySize = 24;
    internal const int RangeEntrySize = 16;

    /// <summary>The smallest record: a 1-byte id and kind and an empty payload.</summary>
    internal const int MinRecordSize = 2 + 1 + 2 + 1 + 4;

    internal static ReadOnlySpan<byte> SpecTag => "SPEC"u8;
    internal static ReadOnlySpan<byte> MemoryTag => "MEMS"u8;
    internal static ReadOnlySpan<byte> WorkingSetTag => "WSET"u8;
    internal static ReadOnlySpan<byte> RecordsTag => "RECS"u8;

    /// <summary>Why <paramref name="name"/> cannot be a record id or kind, or null when it can.</summary>
    public static string? NameProblem(string name)
    {
        if (name.Length == 0)
            return "it is empty";
        if (name.Length > MaxNameBytes)
            return $"it is {name.Length} characters long, more than the {MaxNameBytes} allowed";
        foreach (char c in name)
            if (!IsNameChar(c))
                return $"it holds the character U+{(int)c:X4}; only A-Z, a-z, 0-9 and . _ : / - are allowed";
        return null;
    }

    internal static bool IsNameChar(int c) =>
        c is (>= 'a' and <= 'z') or (>= 'A' and <= 'Z') or (>= '0' and <= '9') or '.' or '_' or ':' or '/' or '-';
}
