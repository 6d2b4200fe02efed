using System.Text;
using Kvm.Hypervisor;
using Kvm.Interop.Structs;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

public class PvhBootTests
{
    private const ulong MiB = 1UL << 20, GiB = 1UL << 30;

    private static GuestMemory Ram(ulong size) => GuestMemory.Create(X86Layout.RamRanges(size));

    /// <summary>Null when the host reports enough memory for GuestMemory to agree to map <paramref name="size"/>.</summary>
    private static string? HostTooSmall(ulong size)
    {
        var line = File.ReadLines("/proc/meminfo").FirstOrDefault(l => l.StartsWith("MemTotal:", StringComparison.Ordinal));
        if (line is null)
            return null;
        ulong kb = ulong.Parse(line["MemTotal:".Length..].Trim().Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        return kb * 1024 < size ? $"host has {kb} kB of memory; GuestMemory refuses to map {size} bytes" : null;
    }

    private static (uint Magic, uint Version, ulong Cmdline, ulong Memmap, uint Entries) StartInfo(GuestMemory m)
    {
        ulong s = X86Layout.PvhStartInfo;
        return (m.ReadU32(s), m.ReadU32(s + 4), m.ReadU64(s + 24), m.ReadU64(s + 40), m.ReadU32(s + 48));
    }

    private static string ReadCString(GuestMemory m, ulong at)
    {
        var bytes = new List<byte>();
        for (ulong a = at; ; a++)
        {
            byte b = m.ReadU8(a);
            if (b == 0)
                return Encoding.UTF8.GetString(bytes.ToArray());
            bytes.Add(b);
        }
    }

    private static List<MemoryMapEntry> ReadMemmap(GuestMemory m, ulong at, uint count)
    {
        var list = new List<MemoryMapEntry>();
        for (uint i = 0; i < count; i++)
        {
            ulong e = at + i * 24;
            list.Add(new MemoryMapEntry(m.ReadU64(e), m.ReadU64(e + 8), m.ReadU32(e + 16)));
            Assert.Equal(0u, m.ReadU32(e + 20)); // reserved
        }
        return list;
    }

    [Fact]
    public void WriteBootDataWritesStartInfoCmdlineAndMemoryMap()
    {
        using var m = Ram(64 * MiB);
        // Garbage where the boot data goes, to show it is all written.
        m.GetWritableSpan(0, (int)X86Layout.BootDataEnd).Fill(0xcc);

        PvhBoot.WriteBootData(m, "console=ttyS0 hello=wörld");

        var info = StartInfo(m);
        Assert.Equal(0x336ec578u, info.Magic);
        Assert.Equal(PvhBoot.StartInfoMagic, info.Magic);
        Assert.Equal(1u, info.Version);
        Assert.Equal(0u, m.ReadU32(X86Layout.PvhStartInfo + 8));  // flags
        Assert.Equal(0u, m.ReadU32(X86Layout.PvhStartInfo + 12)); // nr_modules
        Assert.Equal(0u, m.ReadU32(X86Layout.PvhStartInfo + 52)); // reserved
        Assert.Equal(X86Layout.CmdlineStart, info.Cmdline);
        Assert.Equal(X86Layout.PvhMemmap, info.Memmap);

        Assert.Equal("console=ttyS0 hello=wörld", ReadCString(m, info.Cmdline));

        Assert.Equal(3u, info.Entries);
        Assert.Equal(
            [
                new MemoryMapEntry(0, 0x9fc00, MemoryMapEntry.Ram),
                new MemoryMapEntry(0x9fc00, 0x100000 - 0x9fc00, MemoryMapEntry.Reserved),
                new MemoryMapEntry(0x100000, 64 * MiB - 0x100000, MemoryMapEntry.Ram),
            ],
            ReadMemmap(m, info.Memmap, info.Entries));
        Assert.Equal(PvhBoot.MemoryMap(m), ReadMemmap(m, info.Memmap, info.Entries));
    }

    [Fact]
    public void EmptyCmdlineIsAnEmptyString()
    {
        using var m = Ram(4 * MiB);
        m.GetWritableSpan(X86Layout.CmdlineStart, 16).Fill((byte)'x');
        PvhBoot.WriteBootData(m, "");
        Assert.Equal(0, m.ReadU8(StartInfo(m).Cmdline));
    }

    [SkippableFact]
    public void MemoryMapOfExactly3GiBHasNoRamAbove4GiB()
    {
        string? why = HostTooSmall(3 * GiB);
        Skip.If(why is not null, why);
        using var m = Ram(3 * GiB);
        Assert.Equal(
            [
                new MemoryMapEntry(0, 0x9fc00, MemoryMapEntry.Ram),
                new MemoryMapEntry(0x9fc00, 0x60400, MemoryMapEntry.Reserved),
                new MemoryMapEntry(0x100000, 3 * GiB - 0x100000, MemoryMapEntry.Ram),
            ],
            PvhBoot.MemoryMap(m));
    }

    [SkippableFact]
    public void MemoryAbove3GiBIsPlacedAt4GiB()
    {
        const ulong size = 4 * GiB + 512 * MiB;
        string? why = HostTooSmall(size);
        Skip.If(why is not null, why);
        using var m = Ram(size); // MAP_NORESERVE: nothing is touched but the boot data

        PvhBoot.WriteBootData(m, "big");

        var info = StartInfo(m);
        Assert.Equal(4u, info.Entries);
        Assert.Equal(
            [
                new MemoryMapEntry(0, 0x9fc00, MemoryMapEntry.Ram),
                new MemoryMapEntry(0x9fc00, 0x60400, MemoryMapEntry.Reserved),
                new MemoryMapEntry(0x100000, 3 * GiB - 0x100000, MemoryMapEntry.Ram),
                new MemoryMapEntry(4 * GiB, size - 3 * GiB, MemoryMapEntry.Ram),
            ],
            ReadMemmap(m, info.Memmap, info.Entries));
        // RAM and the legacy hole together account for all the memory the VM was given.
        var map = PvhBoot.MemoryMap(m);
        ulong ram = map.Where(e => e.Type == MemoryMapEntry.Ram).Aggregate(0UL, (s, e) => s + e.Size);
        ulong reserved = map.Where(e => e.Type == MemoryMapEntry.Reserved).Aggregate(0UL, (s, e) => s + e.Size);
        Assert.Equal(size, ram + reserved);
    }

    [Fact]
    public void LongestCmdlineFitsWithItsTerminator()
    {
        using var m = Ram(4 * MiB);
        string cmd = new('a', X86Layout.CmdlineMaxSize - 1);
        m.WriteU8(X86Layout.CmdlineStart + (ulong)cmd.Length, 0xcc);
        PvhBoot.WriteBootData(m, cmd);
        Assert.Equal(cmd, ReadCString(m, X86Layout.CmdlineStart));
        Assert.Equal(0, m.ReadU8(X86Layout.CmdlineStart + (ulong)cmd.Length));
    }

    [Fact]
    public void TooLongCmdlineIsRefused()
    {
        using var m = Ram(4 * MiB);
        var e = Assert.Throws<BootException>(() => PvhBoot.WriteBootData(m, new string('a', X86Layout.CmdlineMaxSize)));
        Assert.Contains("4096", e.Message);
        Assert.Contains("4095", e.Message);
    }

    [Fact]
    public void CmdlineLengthIsCountedInUtf8Bytes()
    {
        using var m = Ram(4 * MiB);
        // 2048 characters, 4096 bytes in UTF-8.
        var e = Assert.Throws<BootException>(() => PvhBoot.WriteBootData(m, new string('é', X86Layout.CmdlineMaxSize / 2)));
        Assert.Contains("4096 bytes", e.Message);
    }

    [Fact]
    public void CmdlineWithNulIsRefused()
    {
        using var m = Ram(4 * MiB);
        var e = Assert.Throws<BootException>(() => PvhBoot.WriteBootData(m, "root=/dev/vda\0init=/bin/sh"));
        Assert.Contains("NUL", e.Message);
    }

    [Fact]
    public void WriteBootDataWritesTheGdtTheEntrySelectorsUse()
    {
        using var m = Ram(4 * MiB);
        PvhBoot.WriteBootData(m, "");
        var s = PvhBoot.EntrySregs(default);

        Assert.Equal(X86Layout.BootGdt, s.Gdt.Base);
        Assert.True(s.Gdt.Limit >= X86Layout.BootTssSelector + 7, "GDT limit must cover the TSS descriptor");
        Assert.Equal(0UL, m.ReadU64(X86Layout.BootGdt)); // null descriptor

        AssertDescriptorMatches(m.ReadU64(X86Layout.BootGdt + X86Layout.BootCodeSelector), s.Cs);
        AssertDescriptorMatches(m.ReadU64(X86Layout.BootGdt + X86Layout.BootDataSelector), s.Ds);
        AssertDescriptorMatches(m.ReadU64(X86Layout.BootGdt + X86Layout.BootTssSelector), s.Tr);
    }

    // A GDT descriptor describes the same segment as the hidden part of the segment register.
    private static void AssertDescriptorMatches(ulong d, KvmSegment seg)
    {
        ulong limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
        ulong @base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
        byte type = (byte)((d >> 40) & 0xf);
        byte s = (byte)((d >> 44) & 1), dpl = (byte)((d >> 45) & 3), p = (byte)((d >> 47) & 1);
        byte l = (byte)((d >> 53) & 1), db = (byte)((d >> 54) & 1), g = (byte)((d >> 55) & 1);
        ulong byteLimit = g == 1 ? (limit << 12) | 0xfff : limit;

        Assert.Equal(seg.Base, @base);
        Assert.Equal((ulong)seg.Limit, byteLimit);
        Assert.Equal(seg.Type, type);
        Assert.Equal(seg.S, s);
        Assert.Equal(seg.Dpl, dpl);
        Assert.Equal(seg.Present, p);
        Assert.Equal(seg.L, l);
        Assert.Equal(seg.Db, db);
        Assert.Equal(seg.G, g);
    }

    private static (ElfImage Image, byte[] File) Kernel(params (ulong Paddr, byte[] Data, ulong Memsz)[] segments)
    {
        var b = new ElfBuilder();
        foreach (var (paddr, data, memsz) in segments)
            b.Load(paddr, data, memsz);
        b.NoteSegment(ElfBuilder.PvhNote((uint)segments[0].Paddr));
        var file = b.Build();
        return (ElfImage.Parse(file, "test-kernel"), file);
    }

    [Fact]
    public void LoadSegmentsCopiesFileBytesAndZeroesBss()
    {
        using var m = Ram(16 * MiB);
        var a = ElfBuilder.Pattern(0x1234, 1);
        var c = ElfBuilder.Pattern(0x80, 2);
        var (image, file) = Kernel((0x100000, a, 0x3000), (0x400000, c, 0x1000));
        m.GetWritableSpan(0xff000, 0x5000).Fill(0xcc);
        m.GetWritableSpan(0x400000, 0x2000).Fill(0xcc);

        PvhBoot.LoadSegments(image, file, m);

        Assert.Equal(a, m.GetSpan(0x100000, a.Length).ToArray());
        Assert.All(m.GetSpan(0x100000 + (ulong)a.Length, 0x3000 - a.Length).ToArray(), b => Assert.Equal(0, b));
        Assert.All(m.GetSpan(0x103000, 0x1000).ToArray(), b => Assert.Equal(0xcc, b)); // past p_memsz: untouched

        Assert.Equal(c, m.GetSpan(0x400000, c.Length).ToArray());
        Assert.All(m.GetSpan(0x400000 + (ulong)c.Length, 0x1000 - c.Length).ToArray(), b => Assert.Equal(0, b));
        Assert.All(m.GetSpan(0x401000, 0x1000).ToArray(), b => Assert.Equal(0xcc, b));
        Assert.Equal(0xcc, m.ReadU8(0xfffff)); // before the first segment: untouched
    }

    [Fact]
    public void LoadSegmentsAcceptsASegmentRightAfterTheBootData()
    {
        using var m = Ram(4 * MiB);
        var data = ElfBuilder.Pattern(16, 4);
        var (image, file) = Kernel((X86Layout.BootDataEnd, data, 32));
        PvhBoot.LoadSegments(image, file, m);
        Assert.Equal(data, m.GetSpan(X86Layout.BootDataEnd, 16).ToArray());
    }

    [Theory]
    [InlineData(0x0UL)]
    [InlineData(0x6000UL)]                             // on hvm_start_info
    [InlineData(X86Layout.BootDataEnd - 0x10)]        // overlapping the end of the cmdline area
    public void LoadSegmentsRefusesSegmentsOverTheBootData(ulong paddr)
    {
        using var m = Ram(4 * MiB);
        var (image, file) = Kernel((paddr, [1, 2, 3], 0x100));
        var e = Assert.Throws<BootException>(() => PvhBoot.LoadSegments(image, file, m));
        Assert.Contains("test-kernel", e.Message);
        Assert.Contains("segment 0", e.Message);
        Assert.Contains($"0x{paddr:x}", e.Message);
    }

    [Theory]
    [InlineData(0x3ff000UL, 0x2000UL)]   // straddles the end of RAM
    [InlineData(0x400000UL, 0x1000UL)]   // starts at the end of RAM
    [InlineData(0x8000_0000UL, 0x10UL)]  // far beyond
    [InlineData(0x100000UL, 0x1_0000_0000UL)] // larger than RAM
    public void LoadSegmentsRefusesSegmentsOutsideRam(ulong paddr, ulong memsz)
    {
        using var m = Ram(4 * MiB);
        var (image, file) = Kernel((paddr, [1, 2, 3], memsz));
        var e = Assert.Throws<BootException>(() => PvhBoot.LoadSegments(image, file, m));
        Assert.Contains("segment 0", e.Message);
        Assert.Contains("does not fit", e.Message);
    }

    [SkippableFact]
    public void LoadSegmentsRefusesASegmentInTheMmioHole()
    {
        const ulong size = 4 * GiB;
        string? why = HostTooSmall(size);
        Skip.If(why is not null, why);
        using var m = Ram(size);
        var (image, file) = Kernel((X86Layout.MmioHoleStart - 0x1000, [1, 2, 3], 0x2000));
        var e = Assert.Throws<BootException>(() => PvhBoot.LoadSegments(image, file, m));
        Assert.Contains("does not fit", e.Message);
    }

    [Fact]
    public void EntryRegsStartAtTheEntryWithStartInfoInRbx()
    {
        var r = PvhBoot.EntryRegs(0x1000c0);
        Assert.Equal(0x1000c0UL, r.Rip);
        Assert.Equal(X86Layout.PvhStartInfo, r.Rbx);
        Assert.Equal(0x2UL, r.Rflags & 0x2);     // the reserved bit 1 is set
        Assert.Equal(0UL, r.Rflags & 0x200);     // interrupts off
    }

    [Fact]
    public void EntrySregsGive32BitProtectedModeWithPagingOff()
    {
        var current = new KvmSregs
        {
            Cr0 = 0x8000_0011, // PG set, as if left from a previous run
            Cr3 = 0x1000,
            Cr4 = 0x20,        // PAE
            Efer = 0x500,      // LME | LMA
            ApicBase = 0xfee0_0900,
        };
        var s = PvhBoot.EntrySregs(current);

        Assert.Equal(1UL, s.Cr0 & 1);                 // PE
        Assert.Equal(0UL, s.Cr0 & 0x8000_0000);       // PG off
        Assert.Equal(0UL, s.Cr4 & 0x20);              // no PAE
        Assert.Equal(0UL, s.Efer & 0x500);            // not in long mode
        Assert.Equal(0xfee0_0900UL, s.ApicBase);      // what KVM gave is kept

        Assert.Equal(X86Layout.BootCodeSelector, s.Cs.Selector);
        Assert.Equal(0UL, s.Cs.Base);
        Assert.Equal(0xffff_ffffu, s.Cs.Limit);
        Assert.Equal(8, s.Cs.Type & 8);               // code
        Assert.Equal(1, s.Cs.S);
        Assert.Equal(1, s.Cs.Present);
        Assert.Equal(1, s.Cs.Db);                     // 32-bit
        Assert.Equal(0, s.Cs.L);
        Assert.Equal(0, s.Cs.Dpl);

        foreach (var seg in new[] { s.Ds, s.Es, s.Fs, s.Gs, s.Ss })
        {
            Assert.Equal(X86Layout.BootDataSelector, seg.Selector);
            Assert.Equal(0UL, seg.Base);
            Assert.Equal(0xffff_ffffu, seg.Limit);
            Assert.Equal(0, seg.Type & 8);            // data
            Assert.Equal(2, seg.Type & 2);            // writable
            Assert.Equal(1, seg.Present);
            Assert.Equal(1, seg.Db);
            Assert.Equal(1, seg.S);
        }
        Assert.Equal(X86Layout.BootTssSelector, s.Tr.Selector);
        Assert.Equal(1, s.Tr.Present);
    }

    [Fact]
    public void AnInitrdBecomesModuleZeroAtTheTopOfRamBelow4GiB()
    {
        using var m = Ram(64 * MiB);
        var kernel = ElfImage.Parse(ElfBuilder.WithPvh().Build(), "k");
        byte[] initrd = ElfBuilder.Pattern(10_000, 3);
        var module = PvhBoot.LoadInitrd(m, kernel, initrd, "rd");
        PvhBoot.WriteBootData(m, "console=ttyS0", 0, module);

        Assert.Equal(64 * MiB - 12288, module.Address);             // 10,000 bytes end on the page below the top
        Assert.Equal(10_000UL, module.Size);
        Assert.True(m.GetSpan(module.Address, initrd.Length).SequenceEqual(initrd));
        Assert.Equal(1u, m.ReadU32(X86Layout.PvhStartInfo + 12));   // nr_modules
        Assert.Equal(X86Layout.PvhModlist, m.ReadU64(X86Layout.PvhStartInfo + 16));
        Assert.Equal(module.Address, m.ReadU64(X86Layout.PvhModlist));
        Assert.Equal(10_000UL, m.ReadU64(X86Layout.PvhModlist + 8));
        Assert.Equal(0UL, m.ReadU64(X86Layout.PvhModlist + 16));    // no module command line
    }

    [Fact]
    public void WithoutAnInitrdThereAreNoModules()
    {
        using var m = Ram(16 * MiB);
        PvhBoot.WriteBootData(m, "");
        Assert.Equal(0u, m.ReadU32(X86Layout.PvhStartInfo + 12));
    }

    [Fact]
    public void AnInitrdThatDoesNotFitAboveTheKernelIsRefusedWithTheSizes()
    {
        using var m = Ram(4 * MiB);
        var kernel = ElfImage.Parse(ElfBuilder.WithPvh().Build(), "k");   // ends at 0x202000
        var e = Assert.Throws<BootException>(() => PvhBoot.LoadInitrd(m, kernel, new byte[3 * (int)MiB], "big.img"));
        Assert.Contains("initrd big.img", e.Message);
        Assert.Contains("3145728 bytes", e.Message);
        Assert.Contains("0x202000", e.Message);
        Assert.Throws<BootException>(() => PvhBoot.LoadInitrd(m, kernel, [], "empty.img"));
    }
}
