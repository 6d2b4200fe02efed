using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Kvm.Tests.Shared;
using Kvm.Vmm.Snapshot;
using static Kvm.Vmm.Tests.Snapshot.SnapshotTestData;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>The snapshot format: state file and memory file written, read back, and refused when damaged.</summary>
public class SnapshotFileTests
{
    // ------------------------------------------------------------------ round trip

    [Fact]
    public void EverythingWrittenIsReadBack()
    {
        using var dir = new TempDir();
        var state = State();
        var memory = Memory();
        var result = SnapshotWriter.Write(dir.Path, state, memory);

        Assert.Equal(dir.Sub("state"), result.StatePath);
        Assert.Equal(dir.Sub("memory"), result.MemoryPath);
        Assert.Equal(12UL << 20, result.MemoryDataSize);
        Assert.Equal((ulong)memory.Pages.Count * 4096, result.MemoryBytesWritten);
        Assert.Equal(new FileInfo(result.StatePath).Length, result.StateBytes);
        Assert.Equal(["memory", "state"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName).Order());

        var back = SnapshotReader.Read(dir.Path);
        Assert.Equal(state.Id, back.Id);
        Assert.Equal(state.Created, back.Created);
        Assert.Equal(TimeSpan.Zero, back.Created.Offset);
        Assert.Equal(state.SpecJson, back.SpecJson);
        Assert.Equal(state.Regions, back.Regions);
        Assert.Equal([new(0, 8UL << 20, 4096), new(HighRam, 4UL << 20, 4096 + (8UL << 20))], back.Regions);
        Assert.Equal(state.WorkingSet, back.WorkingSet);
        Assert.Equal(state.Records.Select(r => (r.Id, r.Kind)), back.Records.Select(r => (r.Id, r.Kind)));
        for (int i = 0; i < state.Records.Count; i++)
            Assert.Equal(state.Records[i].Payload, back.Records[i].Payload);
        Assert.Equal(12UL << 20, back.MemoryDataSize);

        // A record's payload decodes as its owner wrote it.
        var r = new StateReader(back.FindRecord("vcpu1")!.Payload, "vcpu1");
        var vcpu = VcpuState.Read(ref r);
        r.End();
        Assert.Equal(0x1235UL, vcpu.Regs.Rax);
        Assert.Equal(99UL, vcpu.Msrs[0].Data);
        Assert.Null(back.FindRecord("vcpu2"));

        // The spec is the spec.
        var spec = Kvm.Vmm.Machine.VmSpecJsonContext.Parse(back.SpecJson, "snapshot");
        Assert.Equal("console=ttyS0 ünïcode", spec.Cmdline);
    }

    [Fact]
    public void MemoryIsReadBackByRangeAndWhole()
    {
        using var dir = new TempDir();
        var state = State();
        var memory = Memory();
        SnapshotWriter.Write(dir.Path, state, memory);
        var back = SnapshotReader.Read(dir.Path);

        using var file = SnapshotMemoryFile.Open(dir.Path, back);
        Assert.Equal(12UL << 20, file.DataSize);
        Assert.Equal(dir.Sub("memory"), file.Path);
        // Ranges: a page, a run across the 1 MiB chunk boundary, a zero page, the high region's last page.
        foreach (var (address, length) in new (ulong, int)[] { (0, 4096), ((1 << 20) - 8192, 5 * 4096), (0x20000, 4096), (HighRam + (4UL << 20) - 4096, 4096), (0x10000 + 100, 3000) })
        {
            var expected = new byte[length];
            memory.Read(address, expected);
            var got = new byte[length];
            file.Read(address, got);
            Assert.True(expected.AsSpan().SequenceEqual(got), $"0x{address:x} + {length}");
        }
        // Outside RAM, or across two regions: the caller's mistake.
        Assert.Throws<ArgumentOutOfRangeException>(() => file.Read(8UL << 20, new byte[1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => file.Read((8UL << 20) - 1, new byte[2]));

        // Eager restore into fresh memory: holes and zero pages are not written.
        var fresh = new PageMemory();
        var progress = new List<(long Done, long Total)>();
        file.CopyTo(fresh, targetIsZeroed: true, (d, t) => progress.Add((d, t)));
        memory.AssertSameAs(fresh);
        Assert.Equal(memory.Pages.Count * 4096L, fresh.BytesWritten);
        Assert.Equal((12L << 20, 12L << 20), progress[^1]);
        Assert.True(progress.Zip(progress.Skip(1)).All(p => p.First.Done < p.Second.Done), "progress goes forward");

        // Into memory that is not fresh: every byte is written, zeros over old contents.
        var dirty = new PageMemory();
        dirty.Fill(0x20000, 3, 9);
        file.CopyTo(dirty, targetIsZeroed: false);
        memory.AssertSameAs(dirty);
        Assert.Equal(12L << 20, dirty.BytesWritten);
    }

    [Fact]
    public void AGibibyteGuestWithLittleUsedRamGivesASmallSparseFile()
    {
        using var dir = new TempDir();
        var memory = new PageMemory();
        memory.Fill(0, 3, 1);
        memory.Fill(512UL << 20, 1, 2);
        memory.Fill((1UL << 30) - 4096, 1, 3); // the last page
        var state = SnapshotState.Create("{}", [(0, 1UL << 30)], []);
        var progress = new List<(long Done, long Total)>();
        var result = SnapshotWriter.Write(dir.Path, state, memory, (d, t) => progress.Add((d, t)));

        Assert.Equal(5UL * 4096, result.MemoryBytesWritten);
        Assert.Equal(1024, progress.Count); // one call per 1 MiB chunk
        Assert.Equal((1L << 30, 1L << 30), progress[^1]);
        var info = new FileInfo(result.MemoryPath);
        Assert.Equal(4096 + (1L << 30), info.Length);
        long allocated = AllocatedBytes(result.MemoryPath);
        Assert.True(allocated <= 1 << 20, $"the memory file has {allocated} bytes allocated for 6 pages of data");

        var back = SnapshotReader.Read(dir.Path);
        using var file = SnapshotMemoryFile.Open(dir.Path, back);
        var fresh = new PageMemory();
        file.CopyTo(fresh, targetIsZeroed: true);
        memory.AssertSameAs(fresh);
        Assert.True(fresh.BytesWritten < 4L << 20, $"an eager restore into fresh memory wrote {fresh.BytesWritten} bytes: it should skip the holes");
    }

    /// <summary>Allocated bytes of a file, as stat(1) counts its 512-byte blocks.</summary>
    private static long AllocatedBytes(string path)
    {
        var r = TestEnvironment.RunProcess("stat", ["-c", "%b %B", path], TimeSpan.FromSeconds(10));
        var parts = r.Stdout.Trim().Split(' ');
        return long.Parse(parts[0], CultureInfo.InvariantCulture) * long.Parse(parts[1], CultureInfo.InvariantCulture);
    }

    [Fact]
    public void NoWorkingSetNoRecordsNoRamRoundTrip()
    {
        using var dir = new TempDir();
        var state = SnapshotState.Create("", [], []);
        SnapshotWriter.Write(dir.Path, state, new PageMemory());
        var back = SnapshotReader.Read(dir.Path);
        Assert.Null(back.WorkingSet);
        Assert.Empty(back.Records);
        Assert.Empty(back.Regions);
        Assert.Equal("", back.SpecJson);
        Assert.Equal(4096, new FileInfo(dir.Sub("memory")).Length);

        // An empty working set is not the absent one.
        var empty = new SnapshotState { Id = state.Id, Created = state.Created, SpecJson = "{}", Regions = [], Records = [], WorkingSet = [] };
        Assert.Equal([], SnapshotReader.ParseState(SnapshotWriter.EncodeState(empty), "x").WorkingSet!);
    }

    [Fact]
    public void OverwritingReplacesTheSnapshotAndLeavesNoTemporaryFile()
    {
        using var dir = new TempDir();
        SnapshotWriter.Write(dir.Path, State(), Memory());
        var second = State(workingSet: false, extraRecords: 3);
        var memory = new PageMemory();
        memory.Fill(0x3000, 2, 77);
        SnapshotWriter.Write(dir.Path, second, memory);
        var back = SnapshotReader.Read(dir.Path);
        Assert.Equal(second.Id, back.Id);
        Assert.Null(back.WorkingSet);
        Assert.Equal(9, back.Records.Count);
        using var file = SnapshotMemoryFile.Open(dir.Path, back);
        var fresh = new PageMemory();
        file.CopyTo(fresh, targetIsZeroed: true);
        memory.AssertSameAs(fresh);
        Assert.Equal(["memory", "state"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName).Order());
    }

    [Fact]
    public void TheDirectoryIsCreatedWhenMissing()
    {
        using var dir = new TempDir();
        string target = Path.Combine(dir.Path, "a", "b");
        SnapshotWriter.Write(target, State(), Memory());
        Assert.Equal(6, SnapshotReader.Read(target).Records.Count);
    }

    [Fact]
    public void PagesBecomeRanges()
    {
        Assert.Equal([], GuestPageRange.FromPages([]));
        Assert.Equal([new(1, 3), new(7, 1), new(9, 2)], GuestPageRange.FromPages([10, 2, 1, 7, 3, 9, 2, 3]));
        Assert.Equal([new(ulong.MaxValue - 1, 1)], GuestPageRange.FromPages([ulong.MaxValue - 1]));
    }

    [Fact]
    public void SnapshotIdsAreRandom()
    {
        var ids = Enumerable.Range(0, 64).Select(_ => SnapshotState.NewId()).ToHashSet();
        Assert.Equal(64, ids.Count);
        Assert.NotEqual(State().Id, State().Id);
    }

    // ------------------------------------------------------------------ the bytes themselves

    [Fact]
    public void TheCrcIsCrc64Ecma182()
    {
        // The catalogue's check value of CRC-64/ECMA-182 over "123456789".
        Assert.Equal(0x6C40DF5F0B497347UL, Crc("123456789"u8));
    }

    [Fact]
    public void TheStateFileHasTheDocumentedLayout()
    {
        var state = new SnapshotState
        {
            Id = Guid.Parse("00112233-4455-6677-8899-aabbccddeeff"),
            Created = DateTimeOffset.UnixEpoch.AddSeconds(1),
            SpecJson = "{}",
            Regions = SnapshotRegion.Layout([(0x100000, 0x2000)]),
            WorkingSet = [new(0x101, 1)],
            Records = [new StateRecord("vcpu0", "vcpu", [0xAA, 0xBB])],
        };
        var f = SnapshotWriter.EncodeState(state);
        Assert.Equal("KVMSNAP\0"u8.ToArray(), f[..8]);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(8)));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(12)));
        Assert.Equal((ulong)f.Length, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(16)));
        Assert.Equal("00112233445566778899AABBCCDDEEFF", Convert.ToHexString(f, 24, 16));
        Assert.Equal(1_000_000_000L, BinaryPrimitives.ReadInt64LittleEndian(f.AsSpan(40)));
        int p = 48;
        Assert.Equal("SPEC", Encoding.ASCII.GetString(f, p, 4));
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 4)));
        Assert.Equal("{}", Encoding.UTF8.GetString(f, p + 8, 2));
        p += 10;
        Assert.Equal("MEMS", Encoding.ASCII.GetString(f, p, 4));
        Assert.Equal(16u + 24, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 4)));
        Assert.Equal(4096u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 8)));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 12)));
        Assert.Equal(0x2000UL, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p + 16)));
        Assert.Equal(0x100000UL, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p + 24)));
        Assert.Equal(0x2000UL, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p + 32)));
        Assert.Equal(4096UL, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p + 40)));
        p += 48;
        Assert.Equal("WSET", Encoding.ASCII.GetString(f, p, 4));
        Assert.Equal(8u + 16, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 4)));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 8)));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 12)));
        Assert.Equal(0x101UL, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p + 16)));
        Assert.Equal(1UL, BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p + 24)));
        p += 32;
        Assert.Equal("RECS", Encoding.ASCII.GetString(f, p, 4));
        Assert.Equal(4u + 2 + 5 + 2 + 4 + 4 + 2, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 4)));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 8)));
        Assert.Equal(5, BinaryPrimitives.ReadUInt16LittleEndian(f.AsSpan(p + 12)));
        Assert.Equal("vcpu0", Encoding.ASCII.GetString(f, p + 14, 5));
        Assert.Equal(4, BinaryPrimitives.ReadUInt16LittleEndian(f.AsSpan(p + 19)));
        Assert.Equal("vcpu", Encoding.ASCII.GetString(f, p + 21, 4));
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32LittleEndian(f.AsSpan(p + 25)));
        Assert.Equal([0xAA, 0xBB], f[(p + 29)..(p + 31)]);
        p += 31;
        Assert.Equal(f.Length - 8, p);
        Assert.Equal(Crc(f.AsSpan(0, p)), BinaryPrimitives.ReadUInt64LittleEndian(f.AsSpan(p)));
    }

    [Fact]
    public void TheMemoryFileHeaderHasTheDocumentedLayout()
    {
        using var dir = new TempDir();
        var state = State();
        SnapshotWriter.Write(dir.Path, state, Memory());
        var h = File.ReadAllBytes(dir.Sub("memory")).AsSpan(0, 4096 + 4096).ToArray();
        Assert.Equal("KVMSMEM\0"u8.ToArray(), h[..8]);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(8)));
        Assert.Equal(4096u, BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(12)));
        Assert.Equal(state.Id.ToString("N").ToUpperInvariant(), Convert.ToHexString(h, 16, 16));
        Assert.Equal(4096UL, BinaryPrimitives.ReadUInt64LittleEndian(h.AsSpan(32)));
        Assert.Equal(12UL << 20, BinaryPrimitives.ReadUInt64LittleEndian(h.AsSpan(40)));
        Assert.All(h[48..4088], b => Assert.Equal(0, b));
        Assert.Equal(Crc(h.AsSpan(0, 4088)), BinaryPrimitives.ReadUInt64LittleEndian(h.AsSpan(4088)));
        // Guest page 0 is the first page after the header.
        var page0 = new byte[4096];
        Memory().Read(0, page0);
        Assert.Equal(page0, h[4096..]);
    }

    // ------------------------------------------------------------------ refusals of the state file

    private static SnapshotFormatException Refused(string dir)
    {
        var e = Assert.Throws<SnapshotFormatException>(() => SnapshotReader.Read(dir));
        return e;
    }

    /// <summary>A snapshot in a new directory, its state file's bytes and path.</summary>
    private static (TempDir Dir, byte[] State, string Path) Written(SnapshotState? state = null)
    {
        var dir = new TempDir();
        SnapshotWriter.Write(dir.Path, state ?? State(), Memory());
        return (dir, File.ReadAllBytes(dir.Sub("state")), dir.Sub("state"));
    }

    private static SnapshotFormatException RefusedState(byte[] bytes, bool fixUp, params string[] expected)
    {
        var (dir, _, path) = Written();
        using (dir)
        {
            if (fixUp)
                FixUp(bytes);
            File.WriteAllBytes(path, bytes);
            var e = Refused(dir.Path);
            Assert.Equal(path, e.FilePath);
            Assert.Contains(path, e.Message, StringComparison.Ordinal);
            foreach (var text in expected)
                Assert.Contains(text, e.Message, StringComparison.Ordinal);
            return e;
        }
    }

    [Fact]
    public void AMissingStateFileIsNamed()
    {
        using var dir = new TempDir();
        var e = Refused(dir.Path);
        Assert.Equal($"snapshot file {dir.Sub("state")}: the state file is missing", e.Message);
        e = Refused(dir.Sub("nothing-here"));
        Assert.Contains("missing", e.Message);
    }

    [Fact]
    public void ATruncatedStateFileIsNamed()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        var e = RefusedState(bytes[..^100], false, "truncated", $"the file is {bytes.Length - 100} bytes long, its header says {bytes.Length}");
        Assert.Equal(16, e.Offset);
        RefusedState(bytes[..30], false, "truncated: the file is 30 bytes long, shorter than its 48-byte header");
        RefusedState(bytes[..5], false, "truncated: the file is 5 bytes long, shorter than its 8-byte magic");
        RefusedState([], false, "truncated: the file is 0 bytes long");
    }

    [Fact]
    public void ExtraBytesAfterTheCrcAreRefused()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        RefusedState([.. bytes, 0, 0, 0], false, "3 bytes more than the");
    }

    [Fact]
    public void ABadMagicIsNamed()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        bytes[3] = (byte)'X';
        var e = RefusedState(bytes, true, "bad magic: expected 4B564D534E415000 (\"KVMSNAP\"), found 4B564D584E415000", "not a kvm snapshot state file");
        Assert.Equal(0, e.Offset);
        // The memory file is not a state file.
        using var d2 = new TempDir();
        SnapshotWriter.Write(d2.Path, State(), Memory());
        File.Copy(d2.Sub("memory"), d2.Sub("state"), overwrite: true);
        Assert.Contains("found 4B564D534D454D00", Refused(d2.Path).Message);
    }

    [Fact]
    public void AnotherVersionIsNamed()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(8), 3);
        // Before the CRC: another version may have laid out its bytes differently.
        var e = RefusedState(bytes, false, "format version 3; this kvm-vmm reads version 1");
        Assert.Equal(8, e.Offset);
        BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(8), 0);
        RefusedState(bytes[..20], false, "format version 0; this kvm-vmm reads version 1");
    }

    [Fact]
    public void ACrcMismatchIsNamed()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        bytes[200] ^= 0x10;
        var e = RefusedState(bytes, false, "CRC mismatch: the file says 0x", "(damaged)");
        Assert.Equal(bytes.Length - 8, e.Offset);
    }

    [Fact]
    public void UnknownFlagsAreRefused()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        bytes[12] = 4;
        RefusedState(bytes, true, "header field 'flags' is 0x4");
    }

    [Fact]
    public void ALengthPastTheEndIsNamed()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        var layout = Walk(bytes);
        // The payload of the last record claims a megabyte.
        int payloadLength = layout.Fields.Last(f => f.Name == "payload length").Offset;
        var b1 = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(b1.AsSpan(payloadLength), 1 << 20);
        var e = RefusedState(b1, true, "section 'RECS', record 5 ('virtio-blk0'): field 'payload length' is 1048576, past the end of the section");
        Assert.Equal(payloadLength, e.Offset);
        // ... or more than a payload may have.
        BinaryPrimitives.WriteUInt32LittleEndian(b1.AsSpan(payloadLength), uint.MaxValue);
        RefusedState(b1, true, "field 'payload length' is 4294967295, more than the 67108864 bytes allowed");

        // A section's length runs past the CRC.
        int specLength = layout.Fields.First(f => f.Name == "section length").Offset;
        var b2 = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(b2.AsSpan(specLength), 100_000);
        e = RefusedState(b2, true, "section 'SPEC' length 100000 runs past the end of the sections");
        Assert.Equal(specLength, e.Offset);
        BinaryPrimitives.WriteUInt32LittleEndian(b2.AsSpan(specLength), 0x8000_0000);
        RefusedState(b2, true, "section 'SPEC' length 2147483648 is more than the 1048576 bytes allowed");

        // A count that the section cannot hold.
        int recordCount = layout.Fields.First(f => f.Name == "record count").Offset;
        var b3 = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(b3.AsSpan(recordCount), 60000);
        RefusedState(b3, true, "field 'record count' is 60000: 60000 items need at least 600000 bytes");
        BinaryPrimitives.WriteUInt32LittleEndian(b3.AsSpan(recordCount), uint.MaxValue);
        RefusedState(b3, true, "field 'record count' is 4294967295, more than the 65536 allowed");

        // The header's file length, huge.
        var b4 = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(b4.AsSpan(16), ulong.MaxValue);
        FixUp(b4, length: false);
        RefusedState(b4, false, $"truncated: the file is {bytes.Length} bytes long, its header says 18446744073709551615");
    }

    [Fact]
    public void ADuplicateRecordIdIsNamed()
    {
        var state = State();
        var records = state.Records.ToList();
        records.Insert(2, new StateRecord("vcpu9", "vcpu", [7]));
        var (dir, bytes, _) = Written(new SnapshotState { Id = state.Id, Created = state.Created, SpecJson = "{}", Regions = state.Regions, Records = records });
        dir.Dispose();
        // "vcpu9" becomes "vcpu0", the id of record 1.
        int id = Walk(bytes).RecordIds[2] + 2;
        Assert.Equal("vcpu9", Encoding.ASCII.GetString(bytes, id, 5));
        bytes[id + 4] = (byte)'0';
        var e = RefusedState(bytes, true, "section 'RECS', record 2 ('vcpu0'): duplicate record id 'vcpu0' (record 1 has it too)");
        Assert.Equal(id - 2, e.Offset);
    }

    [Fact]
    public void BadNamesRegionsAndRangesAreNamed()
    {
        var (dir, bytes, _) = Written();
        dir.Dispose();
        var layout = Walk(bytes);

        var b = (byte[])bytes.Clone();
        b[layout.RecordIds[0] + 2] = (byte)' ';
        RefusedState(b, true, "section 'RECS', record 0: field 'id' holds byte 0x20");

        b = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(layout.RecordIds[0]), 0);
        RefusedState(b, true, "field 'id length' is 0; an id has 1 to 128 bytes");

        b = (byte[])bytes.Clone();
        int second = layout.Fields.Where(f => f.Name == "guest address").ElementAt(1).Offset;
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(second), 0x10_0000);
        var e = RefusedState(b, true, "section 'MEMS': region 1: guest address 0x100000 is below the end 0x800000 of the region before it");
        Assert.Equal(second, e.Offset);

        b = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(second + 16), 4096);
        RefusedState(b, true, "region 1: file offset 4096, expected 8392704");

        b = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(second + 8), ulong.MaxValue & ~4095UL);
        RefusedState(b, true, "region 1: guest range 0x100000000 + 0xfffffffffffff000 ends beyond 0x10000000000000 (2^52)");

        b = (byte[])bytes.Clone();
        int dataSize = layout.Fields.First(f => f.Name == "data size").Offset;
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(dataSize), 4096);
        e = RefusedState(b, true, "memory data size 4096 is not the 12582912 bytes its regions add up to");
        Assert.Equal(dataSize, e.Offset);

        b = (byte[])bytes.Clone();
        int firstPage = layout.Fields.Where(f => f.Name == "first page").ElementAt(2).Offset;
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(firstPage), 0x800); // just past the low region
        RefusedState(b, true, "section 'WSET': range 2: guest page 0x800 (address 0x800000) is not in guest RAM");

        b = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(firstPage), 17);
        RefusedState(b, true, "range 2: first page 0x11 is below the end 0x14 of the range before it");

        b = (byte[])bytes.Clone();
        int spec = layout.Fields.First(f => f.Name == "section length").Offset + 4;
        b[spec] = 0xff;
        RefusedState(b, true, "section 'SPEC': field 'spec JSON' is not valid UTF-8 (byte 0 of it)");

        b = (byte[])bytes.Clone();
        int mems = layout.Fields.Where(f => f.Name == "tag").ElementAt(1).Offset;
        b[mems] = (byte)'X';
        RefusedState(b, true, "section header 'MEMS': expected section 'MEMS', found tag 'XEMS' (58454D53)");
    }

    // ------------------------------------------------------------------ refusals of the memory file

    private static SnapshotFormatException RefusedMemory(Action<string> damage, params string[] expected)
    {
        using var dir = new TempDir();
        SnapshotWriter.Write(dir.Path, State(), Memory());
        damage(dir.Sub("memory"));
        var e = Refused(dir.Path);
        Assert.Equal(dir.Sub("memory"), e.FilePath);
        Assert.Contains(dir.Sub("memory"), e.Message, StringComparison.Ordinal);
        foreach (var text in expected)
            Assert.Contains(text, e.Message, StringComparison.Ordinal);
        return e;
    }

    private static void Patch(string path, int offset, ReadOnlySpan<byte> bytes, bool fixCrc)
    {
        using var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite);
        RandomAccess.Write(f, bytes, offset);
        if (fixCrc)
        {
            var header = new byte[4096];
            RandomAccess.Read(f, header, 0);
            BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(4088), Crc(header.AsSpan(0, 4088)));
            RandomAccess.Write(f, header, 0);
        }
    }

    [Fact]
    public void AMissingMemoryFileIsNamed()
    {
        var e = RefusedMemory(File.Delete, "the memory file is missing; the state file");
        Assert.Null(e.Offset);
    }

    [Fact]
    public void AMemoryFileWithABadMagicOrVersionIsNamed()
    {
        RefusedMemory(p => Patch(p, 0, "KVMSNAP\0"u8, true), "bad magic: expected 4B564D534D454D00 (\"KVMSMEM\"), found 4B564D534E415000");
        var e = RefusedMemory(p => Patch(p, 8, [2, 0, 0, 0], false), "format version 2; this kvm-vmm reads version 1");
        Assert.Equal(8, e.Offset);
    }

    [Fact]
    public void ADamagedMemoryHeaderIsNamed()
    {
        RefusedMemory(p => Patch(p, 40, [1], false), "header CRC mismatch");
        RefusedMemory(p => Patch(p, 12, [0, 0x20, 0, 0], true), "header field 'page size' is 8192, expected 4096");
        RefusedMemory(p => Patch(p, 32, [0, 0x20], true), "header field 'data offset' is 8192, expected 4096");
        var e = RefusedMemory(p => Patch(p, 40, [0, 0, 0, 0, 0, 0, 0, 0], true), "header field 'data size' is 0; the state file's regions hold 12582912 bytes");
        Assert.Equal(40, e.Offset);
    }

    [Fact]
    public void AMemoryFileOfAnotherSnapshotIsNamed()
    {
        using var other = new TempDir();
        var otherState = State();
        SnapshotWriter.Write(other.Path, otherState, Memory());
        var e = RefusedMemory(p => File.Copy(other.Sub("memory"), p, overwrite: true),
            $"the memory file belongs to snapshot {otherState.Id}, the state file to snapshot");
        Assert.Equal(16, e.Offset);
    }

    [Fact]
    public void AMemoryFileOfAnotherSizeIsNamed()
    {
        long full = 4096 + (12L << 20);
        RefusedMemory(p => { using var f = File.OpenWrite(p); f.SetLength(full - 4096); },
            $"truncated: the file is {full - 4096} bytes long; its header page and 12582912 bytes of data need {full}");
        RefusedMemory(p => { using var f = File.OpenWrite(p); f.SetLength(full + 1); }, "1 bytes more than its header page");
        RefusedMemory(p => { using var f = File.OpenWrite(p); f.SetLength(100); }, "truncated: the file is 100 bytes long, shorter than its 4096-byte header page");
        RefusedMemory(p => { using var f = File.OpenWrite(p); f.SetLength(0); }, "truncated: the file is 0 bytes long, shorter than its 8-byte magic");
    }

    [Fact]
    public void AMemoryFileCutShortAfterItWasOpenedIsNamedOnRead()
    {
        using var dir = new TempDir();
        SnapshotWriter.Write(dir.Path, State(), Memory());
        var state = SnapshotReader.Read(dir.Path);
        using var file = SnapshotMemoryFile.Open(dir.Path, state);
        // Another process could: the open file's shared lock is advisory.
        using (var f = File.OpenHandle(dir.Sub("memory"), FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
            RandomAccess.SetLength(f, 4096 + (1 << 20));
        var e = Assert.Throws<SnapshotFormatException>(() => file.Read(HighRam, new byte[4096]));
        Assert.Contains("the file was cut short after it was checked", e.Message);
        Assert.Contains(dir.Sub("memory"), e.Message);
    }

    // ------------------------------------------------------------------ the writer's refusals

    [Fact]
    public void TheWriterRefusesWhatTheReaderWould()
    {
        var s = State();
        SnapshotState With(IReadOnlyList<StateRecord>? records = null, IReadOnlyList<SnapshotRegion>? regions = null, IReadOnlyList<GuestPageRange>? ws = null, string spec = "{}", DateTimeOffset? created = null) =>
            new() { Id = s.Id, Created = created ?? s.Created, SpecJson = spec, Regions = regions ?? s.Regions, Records = records ?? s.Records, WorkingSet = ws };

        void Refuses(SnapshotState state, string text)
        {
            using var dir = new TempDir();
            var e = Assert.Throws<ArgumentException>(() => SnapshotWriter.Write(dir.Path, state, Memory()));
            Assert.Contains(text, e.Message, StringComparison.Ordinal);
            Assert.Empty(Directory.GetFileSystemEntries(dir.Path));
        }

        Refuses(With(records: [new("a", "k", []), new("a", "k", [])]), "record 1: the id 'a' is taken by record 0");
        Refuses(With(records: [new("serial 0", "k", [])]), "record 0: the id 'serial 0' cannot be written: it holds the character U+0020");
        Refuses(With(records: [new("", "k", [])]), "the id '' cannot be written: it is empty");
        Refuses(With(records: [new("a", new string('k', 129), [])]), "the kind 'kkk");
        Refuses(With(records: [new("é", "k", [])]), "U+00E9");
        Refuses(With(regions: [new(0, 4096, 4096), new(0, 4096, 8192)]), "RAM region 1: guest address 0x0 is below the end 0x1000");
        Refuses(With(regions: [new(0x1001, 4096, 4096)]), "RAM region 0: guest address 0x1001 is not a multiple of the page size 4096");
        Refuses(With(regions: [new(0, 100, 4096)]), "size 0x64 is not a multiple");
        Refuses(With(regions: [new(0, 4096, 0)]), "file offset 0, expected 4096");
        Refuses(With(ws: [new(0x800, 1)]), "working-set range 0: guest page 0x800");
        Refuses(With(ws: [new(1, 0)]), "its page count is 0");
        Refuses(With(spec: "\ud800"), "lone surrogate");
        Refuses(With(spec: new string('x', (1 << 20) + 1)), "more than the 1048576 allowed");
        Refuses(With(created: DateTimeOffset.MaxValue), "outside what 64-bit nanoseconds");
    }

    // ------------------------------------------------------------------ a failed write keeps the old snapshot

    private static void AssertOldSnapshotIntact(TempDir dir, SnapshotState old, PageMemory oldMemory)
    {
        var back = SnapshotReader.Read(dir.Path);
        Assert.Equal(old.Id, back.Id);
        using var file = SnapshotMemoryFile.Open(dir.Path, back);
        var fresh = new PageMemory();
        file.CopyTo(fresh, targetIsZeroed: true);
        oldMemory.AssertSameAs(fresh);
        Assert.Equal(["memory", "state"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName).Order());
    }

    [Fact]
    public void AMemorySourceFailingMidwayLeavesTheOldSnapshot()
    {
        using var dir = new TempDir();
        var old = State();
        var oldMemory = Memory();
        SnapshotWriter.Write(dir.Path, old, oldMemory);

        var failing = new PageMemory { BeforeRead = a => { if (a >= 4UL << 20) throw new IOException("guest memory went away"); } };
        failing.Fill(0, 64, 42);
        var e = Assert.Throws<IOException>(() => SnapshotWriter.Write(dir.Path, State(), failing));
        Assert.Equal("guest memory went away", e.Message);
        AssertOldSnapshotIntact(dir, old, oldMemory);
    }

    [Fact]
    public void AFailureAfterTheMemoryFileLeavesTheOldSnapshot()
    {
        using var dir = new TempDir();
        var old = State();
        var oldMemory = Memory();
        SnapshotWriter.Write(dir.Path, old, oldMemory);

        // The last progress report comes after the last byte of RAM: then the state file is next.
        var next = State();
        Assert.Throws<InvalidOperationException>(() => SnapshotWriter.Write(dir.Path, next, new PageMemory(),
            (done, total) => { if (done == total) throw new InvalidOperationException("stop"); }));
        AssertOldSnapshotIntact(dir, old, oldMemory);
    }

    [Fact]
    public void ACancelledWriteLeavesTheOldSnapshot()
    {
        using var dir = new TempDir();
        var old = State();
        var oldMemory = Memory();
        SnapshotWriter.Write(dir.Path, old, oldMemory);

        using var cancel = new CancellationTokenSource();
        Assert.ThrowsAny<OperationCanceledException>(() => SnapshotWriter.Write(dir.Path, State(), new PageMemory(),
            (done, _) => { if (done >= 3 << 20) cancel.Cancel(); }, cancel.Token));
        AssertOldSnapshotIntact(dir, old, oldMemory);
    }
}
