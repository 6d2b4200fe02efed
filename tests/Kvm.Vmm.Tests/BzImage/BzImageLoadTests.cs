using System.Text;
using Kvm.Hypervisor;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

public class BzImageLoadTests
{
    private const ulong MiB = 1UL << 20;

    private static GuestMemory Ram(ulong size) => GuestMemory.Create(X86Layout.RamRanges(size));

    private static IReadOnlyList<MemoryMapEntry> MapOf(ulong size) =>
    [
        new(0, X86Layout.LowRamEnd, MemoryMapEntry.Ram),
        new(X86Layout.LowRamEnd, X86Layout.HighMemoryStart - X86Layout.LowRamEnd, MemoryMapEntry.Reserved),
        new(X86Layout.HighMemoryStart, size - X86Layout.HighMemoryStart, MemoryMapEntry.Ram),
    ];

    private static Boot.BzImage Image(BzImageBuilder b) => Boot.BzImage.Parse(b.Build(), "test-bzimage");

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

    [Fact]
    public void LoadPlacesKernelCmdlineInitrdAndZeroPage()
    {
        using var m = Ram(64 * MiB);
        var b = new BzImageBuilder();
        var file = b.Build();
        var image = Boot.BzImage.Parse(file, "test-bzimage");
        var initrd = ElfBuilder.Pattern(0x5005, 5);
        var map = PvhBoot.MemoryMap(m);
        m.GetWritableSpan(0x1000000, 0x800000).Fill(0xcc); // garbage where the kernel's footprint goes

        var info = BzBoot.Load(m, image, file, "console=ttyS0 earlyprintk=ttyS0 nokaslr", initrd, map, acpiRsdp: 0xe_0000);

        Assert.Equal(0x1000000UL, info.KernelAddress);
        Assert.Equal(0x1800000UL, info.KernelEnd);
        Assert.Equal(0x1000200UL, info.EntryPoint);
        Assert.Equal(b.Kernel, m.GetSpan(0x1000000, b.KernelSize).ToArray());
        Assert.Equal(-1, m.GetSpan(0x1000000 + (ulong)b.KernelSize, 0x800000 - b.KernelSize).IndexOfAnyExcept((byte)0)); // rest of init_size zeroed

        Assert.Equal(BzBootLayout.Default.Cmdline, info.Cmdline);
        Assert.Equal("console=ttyS0 earlyprintk=ttyS0 nokaslr", ReadCString(m, info.Cmdline));
        Assert.Equal(39, info.CmdlineLength);

        // Initrd: at the top of RAM, page aligned.
        Assert.Equal((64 * MiB - 0x5005) & ~0xfffUL, info.InitrdAddress);
        Assert.Equal(0x5005UL, info.InitrdSize);
        Assert.Equal(initrd, m.GetSpan(info.InitrdAddress, initrd.Length).ToArray());

        // The zero page in guest RAM is the one ZeroPage.Build makes, pointing at what was loaded.
        Assert.Equal(BzBootLayout.Default.ZeroPage, info.ZeroPage);
        var expected = ZeroPage.Build(image, info.Cmdline, info.InitrdAddress, info.InitrdSize, map, 0xe_0000);
        Assert.Equal(expected, m.GetSpan(info.ZeroPage, 4096).ToArray());
        Assert.Equal((uint)info.Cmdline, m.ReadU32(info.ZeroPage + 0x228));
        Assert.Equal((uint)info.InitrdAddress, m.ReadU32(info.ZeroPage + 0x218));
        Assert.Equal(0x5005u, m.ReadU32(info.ZeroPage + 0x21c));
        Assert.Equal(3, m.ReadU8(info.ZeroPage + 0x1e8));
    }

    [Fact]
    public void LoadWithoutInitrdLeavesTheRamdiskFieldsZero()
    {
        using var m = Ram(32 * MiB);
        var file = new BzImageBuilder().Build();
        var info = BzBoot.Load(m, Boot.BzImage.Parse(file, "k"), file, "", [], PvhBoot.MemoryMap(m));
        Assert.Equal(0UL, info.InitrdAddress);
        Assert.Equal(0UL, info.InitrdSize);
        Assert.Equal(0u, m.ReadU32(info.ZeroPage + 0x218));
        Assert.Equal(0u, m.ReadU32(info.ZeroPage + 0x21c));
        Assert.Equal(0, m.ReadU8(info.Cmdline));
    }

    [Fact]
    public void InitrdGoesAtTheTopOfRamPageAligned()
    {
        var image = Image(new BzImageBuilder());
        Assert.Equal(64 * MiB - 0x1000, image.PlaceInitrd(MapOf(64 * MiB), 0x1000));
        Assert.Equal(64 * MiB - 0x2000, image.PlaceInitrd(MapOf(64 * MiB), 0x1001));
        Assert.Equal(64 * MiB - 0x2000, image.PlaceInitrd(MapOf(64 * MiB), 0x1fff));
        Assert.Equal(64 * MiB - 0x400000, image.PlaceInitrd(MapOf(64 * MiB), 0x400000));
    }

    [Fact]
    public void InitrdRespectsInitrdAddrMax()
    {
        // initrd_addr_max is the last byte the initrd may occupy.
        var image = Image(new BzImageBuilder { InitrdAddrMax = 0x2ff_ffff });
        Assert.Equal(0x3000000UL, image.InitrdLimit);
        Assert.Equal(0x3000000UL - 0x3000, image.PlaceInitrd(MapOf(64 * MiB), 0x2345));
        // An unaligned limit: the initrd still ends at or below it.
        image = Image(new BzImageBuilder { InitrdAddrMax = 0x2ff_f7ff });
        ulong at = image.PlaceInitrd(MapOf(64 * MiB), 0x1000);
        Assert.Equal(0x2ffe000UL, at);
        Assert.True(at + 0x1000 - 1 <= 0x2ff_f7ff);
    }

    [Fact]
    public void InitrdStaysBelow4GiBEvenWhenTheKernelAllowsMore()
    {
        var image = Image(new BzImageBuilder { InitrdAddrMax = 0xffff_ffff });
        Assert.True(image.CanBeLoadedAbove4G);
        var map = new List<MemoryMapEntry>(MapOf(0xc000_0000)) { new(0x1_0000_0000, 0x1_0000_0000, MemoryMapEntry.Ram) };
        Assert.Equal(0xc000_0000UL - 0x1000, image.PlaceInitrd(map, 0x1000));
    }

    [Fact]
    public void InitrdAvoidsReservedRangesInsideRam()
    {
        var image = Image(new BzImageBuilder());
        var map = new List<MemoryMapEntry>(MapOf(64 * MiB)) { new(60 * MiB, 4 * MiB, MemoryMapEntry.Reserved) };
        Assert.Equal(60 * MiB - 0x1000, image.PlaceInitrd(map, 0x1000));
        // Too big for the 14 MiB between an ACPI range at 45-46 MiB and 60 MiB: it goes below that range.
        map.Add(new MemoryMapEntry(45 * MiB, 1 * MiB, 3));
        Assert.Equal(60 * MiB - 14 * MiB, image.PlaceInitrd(map, 14 * MiB));
        Assert.Equal(45 * MiB - 15 * MiB, image.PlaceInitrd(map, 15 * MiB));
    }

    [Fact]
    public void InitrdNeverOverlapsTheKernelFootprint()
    {
        // RAM 32 MiB; kernel at 16 MiB with init_size 8 MiB ends at 24 MiB: 8 MiB are left.
        var image = Image(new BzImageBuilder());
        Assert.Equal(24 * MiB, image.PlaceInitrd(MapOf(32 * MiB), 8 * MiB));
        var e = Assert.Throws<BootException>(() => image.PlaceInitrd(MapOf(32 * MiB), 8 * MiB + 1, "initrd.img"));
        Assert.Contains("initrd initrd.img", e.Message);
        Assert.Contains($"{8 * MiB + 1} bytes", e.Message);
        Assert.Contains("0x1800000", e.Message); // the kernel's end
        Assert.Contains("more memory", e.Message);
    }

    [Fact]
    public void InitrdAboveInitrdAddrMaxIsRefused()
    {
        // The kernel ends at 24 MiB and initrd_addr_max allows up to 25 MiB: a 2 MiB initrd cannot fit.
        var image = Image(new BzImageBuilder { InitrdAddrMax = 0x18f_ffff });
        Assert.Equal(0x1800000UL, image.PlaceInitrd(MapOf(64 * MiB), 1 * MiB));
        var e = Assert.Throws<BootException>(() => image.PlaceInitrd(MapOf(64 * MiB), 2 * MiB));
        Assert.Contains("initrd_addr_max 0x18fffff", e.Message);
    }

    [Fact]
    public void EmptyInitrdIsRefusedByPlaceInitrd()
    {
        var e = Assert.Throws<BootException>(() => Image(new BzImageBuilder()).PlaceInitrd(MapOf(64 * MiB), 0, "empty.img"));
        Assert.Contains("empty.img", e.Message);
    }

    [Fact]
    public void RamTooSmallForTheKernelIsRefused()
    {
        using var m = Ram(20 * MiB);
        var file = new BzImageBuilder().Build();
        var image = Boot.BzImage.Parse(file, "big-kernel");
        var e = Assert.Throws<BootException>(() => BzBoot.Load(m, image, file, "", [], PvhBoot.MemoryMap(m)));
        Assert.Contains("big-kernel", e.Message);
        Assert.Contains("0x1000000-0x1800000", e.Message);
        Assert.Contains("at least 24 MiB", e.Message);
    }

    [Fact]
    public void RamTooSmallForKernelAndInitrdIsRefusedBeforeAnythingIsWritten()
    {
        using var m = Ram(26 * MiB);
        var file = new BzImageBuilder().Build();
        var image = Boot.BzImage.Parse(file, "k");
        m.GetWritableSpan(0x1000000, 0x100).Fill(0xcc);
        var e = Assert.Throws<BootException>(() =>
            BzBoot.Load(m, image, file, "", new byte[3 * MiB], PvhBoot.MemoryMap(m), initrdName: "big.cpio"));
        Assert.Contains("initrd big.cpio", e.Message);
        Assert.Equal(0xcc, m.ReadU8(0x1000000)); // the kernel was not copied
    }

    [Fact]
    public void CmdlineOfExactlyCmdlineSizeFitsAndLongerIsRefused()
    {
        using var m = Ram(32 * MiB);
        var file = new BzImageBuilder { CmdlineSize = 255 }.Build();
        var image = Boot.BzImage.Parse(file, "k");
        var info = BzBoot.Load(m, image, file, new string('a', 255), [], PvhBoot.MemoryMap(m));
        Assert.Equal(new string('a', 255), ReadCString(m, info.Cmdline));

        var e = Assert.Throws<BootException>(() => BzBoot.Load(m, image, file, new string('a', 256), [], PvhBoot.MemoryMap(m)));
        Assert.Contains("256 bytes", e.Message);
        Assert.Contains("cmdline_size is 255", e.Message);
    }

    [Fact]
    public void CmdlineWithNulIsRefused()
    {
        using var m = Ram(32 * MiB);
        var file = new BzImageBuilder().Build();
        var e = Assert.Throws<BootException>(() => BzBoot.Load(m, Boot.BzImage.Parse(file, "k"), file, "a\0b", [], PvhBoot.MemoryMap(m)));
        Assert.Contains("NUL", e.Message);
    }

    [Fact]
    public void OverlappingLayoutIsRefused()
    {
        using var m = Ram(32 * MiB);
        var file = new BzImageBuilder().Build();
        var layout = BzBootLayout.Default with { ZeroPage = 0xa000 }; // inside the page tables
        var e = Assert.Throws<ArgumentException>(() => BzBoot.Load(m, Boot.BzImage.Parse(file, "k"), file, "", [], PvhBoot.MemoryMap(m), layout: layout));
        Assert.Contains("overlaps", e.Message);
    }

    [Fact]
    public void UsableRamMergesRamAndCutsOutOtherTypes()
    {
        IReadOnlyList<MemoryMapEntry> map =
        [
            new(0x100000, 0x100000, MemoryMapEntry.Ram),
            new(0, 0x9fc00, MemoryMapEntry.Ram),
            new(0x200000, 0x200000, MemoryMapEntry.Ram),
            new(0x300000, 0x1000, MemoryMapEntry.Reserved),
            new(0x9fc00, 0x60400, MemoryMapEntry.Reserved),
        ];
        Assert.Equal(
            [(0UL, 0x9fc00UL), (0x100000UL, 0x300000UL), (0x301000UL, 0x400000UL)],
            Boot.BzImage.UsableRam(map));
    }
}

public class BzImageLayoutTests
{
    [Fact]
    public void DefaultLayoutAvoidsPvhDataAcpiAreaAndTheLegacyHole()
    {
        var l = BzBootLayout.Default;
        var ours = new (ulong Start, ulong End)[]
        {
            (l.Gdt, l.Gdt + BzBoot.GdtSize),
            (l.ZeroPage, l.ZeroPage + ZeroPage.Size),
            (l.PageTables, l.PageTables + BzBoot.IdentityPageTablesSize),
            (l.StackTop - BzBootLayout.StackSize, l.StackTop),
        };
        var theirs = new (ulong Start, ulong End)[]
        {
            (X86Layout.BootGdt, X86Layout.BootGdt + 0x28),
            (X86Layout.PvhStartInfo, X86Layout.PvhModlist + 0x100),
            (X86Layout.PvhMemmap, X86Layout.PvhMemmap + (ulong)X86Layout.PvhMemmapMaxEntries * 24),
            (X86Layout.CmdlineStart, X86Layout.BootDataEnd), // the command line: shared on purpose, but ours only holds it
            (0xe0000, 0x100000),                               // ACPI tables and the BIOS area
        };
        foreach (var a in ours)
        {
            Assert.True(a.End <= X86Layout.LowRamEnd);
            foreach (var b in theirs)
                Assert.False(a.Start < b.End && b.Start < a.End, $"0x{a.Start:x}-0x{a.End:x} overlaps 0x{b.Start:x}-0x{b.End:x}");
        }
        for (int i = 0; i < ours.Length; i++)
            for (int j = 0; j < i; j++)
                Assert.False(ours[i].Start < ours[j].End && ours[j].Start < ours[i].End);
        Assert.Equal(X86Layout.CmdlineStart, l.Cmdline);
    }

    [Fact]
    public void LongCmdlineRunningIntoAnotherAreaIsRefused()
    {
        using var m = Kvm.Hypervisor.GuestMemory.Create(X86Layout.RamRanges(32UL << 20));
        var file = new BzImageBuilder { CmdlineSize = 4096 }.Build();
        var layout = BzBootLayout.Default with { Cmdline = 0x7800 }; // 0x800 bytes before the zero page
        var image = Boot.BzImage.Parse(file, "k");
        BzBoot.Load(m, image, file, new string('a', 0x7ff), [], PvhBoot.MemoryMap(m), layout: layout);
        var e = Assert.Throws<ArgumentException>(() => BzBoot.Load(m, image, file, new string('a', 0x800), [], PvhBoot.MemoryMap(m), layout: layout));
        Assert.Contains("command line", e.Message);
        Assert.Contains("zero page", e.Message);
    }
}
