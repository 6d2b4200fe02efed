using System.Buffers.Binary;
using System.IO.Hashing;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Kvm.Interop.Structs;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>A directory removed when disposed: under /dev/shm where there is one (fuzz cases write many files).</summary>
public sealed class TempDir : IDisposable
{
    public TempDir(bool preferShm = false)
    {
        string root = preferShm && Directory.Exists("/dev/shm") ? "/dev/shm" : System.IO.Path.GetTempPath();
        Path = System.IO.Path.Combine(root, "kvm-snapshot-test-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string Sub(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>
/// Guest RAM held as its non-zero pages only (so a 1 GiB guest costs nothing): the writer's source
/// and a restore's target. A write of a page of zeros removes it.
/// </summary>
public sealed class PageMemory : ISnapshotMemorySource, ISnapshotMemoryTarget
{
    public const int Page = (int)SnapshotFormat.PageSize;

    public SortedDictionary<ulong, byte[]> Pages { get; } = [];

    /// <summary>How many bytes Write was given (to see what an eager restore skipped).</summary>
    public long BytesWritten { get; private set; }

    /// <summary>Called before each Read with the guest address (to make the source fail).</summary>
    public Action<ulong>? BeforeRead { get; set; }

    public void Fill(ulong address, int pages, int seed)
    {
        var rng = new Random(seed);
        for (int i = 0; i < pages; i++)
        {
            var page = new byte[Page];
            rng.NextBytes(page);
            page[0] |= 1; // never a page of zeros
            Pages[address + (ulong)(i * Page)] = page;
        }
    }

    public void Read(ulong guestAddress, Span<byte> destination)
    {
        BeforeRead?.Invoke(guestAddress);
        destination.Clear();
        ulong end = guestAddress + (ulong)destination.Length;
        foreach (var (address, bytes) in Pages)
        {
            if (address >= end)
                break;
            if (address + (ulong)bytes.Length <= guestAddress)
                continue;
            ulong from = Math.Max(address, guestAddress), to = Math.Min(address + (ulong)bytes.Length, end);
            bytes.AsSpan((int)(from - address), (int)(to - from)).CopyTo(destination[(int)(from - guestAddress)..]);
        }
    }

    public void Write(ulong guestAddress, ReadOnlySpan<byte> data)
    {
        Assert.True(guestAddress % Page == 0 && data.Length % Page == 0, $"a write of {data.Length} bytes at 0x{guestAddress:x} is not whole pages");
        BytesWritten += data.Length;
        for (int o = 0; o < data.Length; o += Page)
        {
            var page = data.Slice(o, Page);
            if (page.ContainsAnyExcept((byte)0))
                Pages[guestAddress + (ulong)o] = page.ToArray();
            else
                Pages.Remove(guestAddress + (ulong)o);
        }
    }

    public void AssertSameAs(PageMemory other)
    {
        Assert.Equal(Pages.Keys, other.Pages.Keys);
        foreach (var (address, bytes) in Pages)
            Assert.True(bytes.AsSpan().SequenceEqual(other.Pages[address]), $"page 0x{address:x} differs");
    }
}

/// <summary>States and memory images to write, and the byte layout of a state file to mutate.</summary>
public static class SnapshotTestData
{
    public const ulong HighRam = 0x1_0000_0000;

    public static string SpecJson() => VmSpecJsonContext.Format(new VmSpec { Kernel = "/boot/vmlinux", Cmdline = "console=ttyS0 ünïcode", Cpus = 2, MemoryBytes = 12UL << 20 });

    /// <summary>A vCPU record's payload as VcpuState writes it (registers set to telling values).</summary>
    public static byte[] VcpuPayload(uint id)
    {
        var state = new VcpuState
        {
            Id = id,
            Regs = new KvmRegs { Rax = 0x1234 + id, Rip = 0xfff0, Rflags = 2 },
            Sregs = default,
            Xsave = default,
            Xcrs = default,
            Msrs = [new KvmMsrEntry { Index = 0x10, Data = 99 }, new KvmMsrEntry { Index = 0x174, Data = 0x10 }],
            Lapic = default,
            MpState = default,
            Events = default,
            Debugregs = default,
            TscKhz = 2_000_000,
        };
        var w = new StateWriter();
        state.Write(w);
        return w.ToArray();
    }

    /// <summary>12 MiB of RAM in two regions (8 MiB low, 4 MiB above 4 GiB), records and a working set.</summary>
    public static SnapshotState State(bool workingSet = true, int extraRecords = 0)
    {
        var records = new List<StateRecord>
        {
            // Ids and kinds as VirtualMachine.SaveState and the device manager name them.
            new("vm", VirtualMachine.VmRecordKind, [1, 2, 3]),
            new("vcpu0", VirtualMachine.VcpuRecordKind, VcpuPayload(0)),
            new("vcpu1", VirtualMachine.VcpuRecordKind, VcpuPayload(1)),
            new("serial0", "serial16550", [0x60, 0, 0, 3]),
            new("rtc", "cmos-rtc", []),
            new("virtio-blk0", "virtio-pci/virtio-blk", [.. Enumerable.Range(0, 300).Select(i => (byte)i)]),
        };
        for (int i = 0; i < extraRecords; i++)
            records.Add(new StateRecord($"dev{i}", "test:kind/x", [(byte)i]));
        return SnapshotState.Create(SpecJson(), [(0, 8UL << 20), (HighRam, 4UL << 20)], records,
            workingSet ? [new(0, 1), new(16, 4), new(0x7ff, 1), new(HighRam / 4096, 3), new(HighRam / 4096 + 1023, 1)] : null);
    }

    /// <summary>Memory for <see cref="State"/>: pages at the edges of both regions and a run across a 1 MiB chunk.</summary>
    public static PageMemory Memory()
    {
        var m = new PageMemory();
        m.Fill(0, 1, 1);
        m.Fill(0x10000, 4, 2);
        m.Fill((1 << 20) - 2 * 4096, 5, 3); // across the first 1 MiB chunk's end
        m.Fill((8UL << 20) - 4096, 1, 4);    // the last page of the low region
        m.Fill(HighRam, 2, 5);
        m.Fill(HighRam + (4UL << 20) - 4096, 1, 6);
        return m;
    }

    public static ulong Crc(ReadOnlySpan<byte> bytes) => Crc64.HashToUInt64(bytes);

    /// <summary>Sets the header's file length to the bytes' length and recomputes the CRC (where there is room for them).</summary>
    public static void FixUp(byte[] file, bool length = true, bool crc = true)
    {
        if (length && file.Length >= 24)
            BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(16), (ulong)file.Length);
        if (crc && file.Length >= 8 + 8)
            BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(file.Length - 8), Crc(file.AsSpan(0, file.Length - 8)));
    }

    /// <summary>Where the fields of a state file lie: what a mutation aims at.</summary>
    public sealed class Layout
    {
        /// <summary>Offset and width of every length, count, size and address field.</summary>
        public List<(int Offset, int Width, string Name)> Fields { get; } = [];

        /// <summary>Every offset where a section, a section body, an entry or a record begins.</summary>
        public SortedSet<int> Boundaries { get; } = [];

        /// <summary>Offsets of the records' ids (length field first).</summary>
        public List<int> RecordIds { get; } = [];
    }

    /// <summary>Walks a valid state file (as <see cref="SnapshotWriter.EncodeState"/> writes it).</summary>
    public static Layout Walk(byte[] file)
    {
        var l = new Layout();
        foreach (var b in new[] { 0, 8, 12, 16, 24, 40, 48, file.Length - 8, file.Length })
            l.Boundaries.Add(b);
        l.Fields.AddRange([(8, 4, "version"), (12, 4, "flags"), (16, 8, "file length"), (40, 8, "created")]);
        int p = 48;
        for (int s = 0; s < 4; s++)
        {
            l.Boundaries.Add(p);
            l.Boundaries.Add(p + 4);
            l.Fields.Add((p, 4, "tag"));
            l.Fields.Add((p + 4, 4, "section length"));
            int length = (int)BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(p + 4));
            int body = p + 8;
            l.Boundaries.Add(body);
            switch (s)
            {
                case 1: // MEMS
                {
                    l.Fields.AddRange([(body, 4, "page size"), (body + 4, 4, "region count"), (body + 8, 8, "data size")]);
                    int count = BinaryPrimitives.ReadInt32LittleEndian(file.AsSpan(body + 4));
                    for (int i = 0; i < count; i++)
                    {
                        int e = body + 16 + 24 * i;
                        l.Boundaries.Add(e);
                        l.Fields.AddRange([(e, 8, "guest address"), (e + 8, 8, "size"), (e + 16, 8, "file offset")]);
                    }
                    break;
                }
                case 2: // WSET
                {
                    l.Fields.AddRange([(body, 4, "ws flags"), (body + 4, 4, "range count")]);
                    int count = BinaryPrimitives.ReadInt32LittleEndian(file.AsSpan(body + 4));
                    for (int i = 0; i < count; i++)
                    {
                        int e = body + 8 + 16 * i;
                        l.Boundaries.Add(e);
                        l.Fields.AddRange([(e, 8, "first page"), (e + 8, 8, "page count")]);
                    }
                    break;
                }
                case 3: // RECS
                {
                    l.Fields.Add((body, 4, "record count"));
                    int count = BinaryPrimitives.ReadInt32LittleEndian(file.AsSpan(body));
                    int r = body + 4;
                    for (int i = 0; i < count; i++)
                    {
                        l.Boundaries.Add(r);
                        l.RecordIds.Add(r);
                        l.Fields.Add((r, 2, "id length"));
                        r += 2 + BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(r));
                        l.Boundaries.Add(r);
                        l.Fields.Add((r, 2, "kind length"));
                        r += 2 + BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(r));
                        l.Boundaries.Add(r);
                        l.Fields.Add((r, 4, "payload length"));
                        r += 4;
                        l.Boundaries.Add(r);
                        r += BinaryPrimitives.ReadInt32LittleEndian(file.AsSpan(r - 4));
                    }
                    Assert.Equal(body + length, r);
                    break;
                }
            }
            p = body + length;
        }
        Assert.Equal(file.Length - 8, p);
        return l;
    }
}
