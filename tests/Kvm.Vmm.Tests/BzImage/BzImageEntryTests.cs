using Kvm.Hypervisor;
using Kvm.Interop.Structs;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

public class BzImageEntryTests
{
    private const ulong MiB = 1UL << 20;

    /// <summary>Translates a virtual address through 4-level page tables; null when not mapped.</summary>
    private static ulong? Walk(GuestMemory m, ulong cr3, ulong va)
    {
        ulong pml4e = m.ReadU64((cr3 & ~0xfffUL) + ((va >> 39) & 511) * 8);
        if ((pml4e & 1) == 0)
            return null;
        Assert.Equal(2UL, pml4e & 2); // writable
        ulong pdpte = m.ReadU64((pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 511) * 8);
        if ((pdpte & 1) == 0)
            return null;
        if ((pdpte & 0x80) != 0)
            return (pdpte & 0x000f_ffff_c000_0000) | (va & 0x3fff_ffff);
        ulong pde = m.ReadU64((pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 511) * 8);
        if ((pde & 1) == 0)
            return null;
        Assert.Equal(2UL, pde & 2);
        Assert.Equal(0UL, pde & 4); // supervisor
        if ((pde & 0x80) != 0)
            return (pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff);
        ulong pte = m.ReadU64((pde & 0x000f_ffff_ffff_f000) + ((va >> 12) & 511) * 8);
        return (pte & 1) == 0 ? null : (pte & 0x000f_ffff_ffff_f000) | (va & 0xfff);
    }

    [Fact]
    public void PageTablesIdentityMapTheFirst4GiB()
    {
        using var m = GuestMemory.Create([(0, 16 * MiB)]);
        m.GetWritableSpan(0x9000, BzBoot.IdentityPageTablesSize).Fill(0xcc); // garbage first: every entry must be written
        ulong cr3 = BzBoot.WriteIdentityPageTables(m, 0x9000);
        Assert.Equal(0x9000UL, cr3);

        ulong[] addresses =
        [
            0, 0x1000, 0x8000, 0x9000, 0x20000, 0x9fbff, 0x100000, 0x1000000, 0x1000200, 0x17fffff,
            0x3ff_f000, 0x7fff_f000, 0xbfff_ffff, 0xc000_0000, 0xfee0_0000, 0xffff_ffff,
        ];
        foreach (ulong a in addresses)
            Assert.Equal(a, Walk(m, cr3, a));
        Assert.Null(Walk(m, cr3, 0x1_0000_0000));
        Assert.Null(Walk(m, cr3, 0xffff_8000_0000_0000));
        // Nothing but the first PML4 entry and the first four PDPT entries is present.
        for (ulong i = 1; i < 512; i++)
            Assert.Equal(0UL, m.ReadU64(cr3 + i * 8));
        for (ulong i = 4; i < 512; i++)
            Assert.Equal(0UL, m.ReadU64(cr3 + 0x1000 + i * 8));
    }

    [Fact]
    public void PageTablesMustBePageAlignedAndInRam()
    {
        using var m = GuestMemory.Create([(0, 1 * MiB)]);
        Assert.Throws<ArgumentException>(() => BzBoot.WriteIdentityPageTables(m, 0x9100));
        var e = Assert.Throws<BootException>(() => BzBoot.WriteIdentityPageTables(m, 1 * MiB - 0x2000));
        Assert.Contains("not in guest RAM", e.Message);
    }

    [Fact]
    public void LoadMapsKernelZeroPageCmdlineAndInitrd()
    {
        using var m = GuestMemory.Create(X86Layout.RamRanges(64 * MiB));
        var file = new BzImageBuilder().Build();
        var image = Boot.BzImage.Parse(file, "k");
        var info = BzBoot.Load(m, image, file, "x", new byte[0x3000], PvhBoot.MemoryMap(m));

        for (ulong a = info.KernelAddress; a < info.KernelEnd; a += 0x1000)
            Assert.Equal(a, Walk(m, info.PageTables, a));
        Assert.Equal(info.EntryPoint, Walk(m, info.PageTables, info.EntryPoint));
        Assert.Equal(info.ZeroPage, Walk(m, info.PageTables, info.ZeroPage));
        Assert.Equal(info.ZeroPage + 0xfff, Walk(m, info.PageTables, info.ZeroPage + 0xfff));
        Assert.Equal(info.Cmdline, Walk(m, info.PageTables, info.Cmdline));
        Assert.Equal(info.InitrdAddress, Walk(m, info.PageTables, info.InitrdAddress));
        Assert.Equal(info.InitrdAddress + info.InitrdSize - 1, Walk(m, info.PageTables, info.InitrdAddress + info.InitrdSize - 1));
        Assert.Equal(info.Gdt, Walk(m, info.PageTables, info.Gdt));
        Assert.Equal(info.StackTop - 8, Walk(m, info.PageTables, info.StackTop - 8));
    }

    [Fact]
    public void EntryRegsStartAt0x200WithTheZeroPageInRsi()
    {
        var info = new BzBootInfo(0x1000000, 0x1800000, 0x1000200, 0x8000, 0x20000, 0, 0, 0, 0x9000, 0x1000, 0x8000);
        var r = BzBoot.EntryRegs(info);
        Assert.Equal(0x1000200UL, r.Rip);
        Assert.Equal(0x8000UL, r.Rsi);
        Assert.Equal(0x8000UL, r.Rsp);
        Assert.Equal(0x2UL, r.Rflags & 0x2);   // reserved bit 1
        Assert.Equal(0UL, r.Rflags & 0x200);   // interrupts off
        Assert.Equal(0UL, r.Rax | r.Rbx | r.Rcx | r.Rdx | r.Rdi);
    }

    [Fact]
    public void EntrySregsGiveLongModeWithBootCsAndBootDs()
    {
        var current = new KvmSregs { Cr0 = 0x6000_0010, ApicBase = 0xfee0_0900 }; // CD | NW | ET, as after reset
        var s = BzBoot.EntrySregs(current, pageTables: 0x9000, gdt: 0x1000);

        Assert.Equal(1UL, s.Cr0 & 1);                  // PE
        Assert.Equal(0x8000_0000UL, s.Cr0 & 0x8000_0000); // PG
        Assert.Equal(0UL, s.Cr0 & 0x6000_0000);        // caches on
        Assert.Equal(0x20UL, s.Cr4 & 0x20);            // PAE
        Assert.Equal(0x500UL, s.Efer & 0x500);         // LME | LMA
        Assert.Equal(0x9000UL, s.Cr3);
        Assert.Equal(0xfee0_0900UL, s.ApicBase);

        Assert.Equal(0x10, s.Cs.Selector);
        Assert.Equal(1, s.Cs.L);
        Assert.Equal(0, s.Cs.Db);
        Assert.Equal(8, s.Cs.Type & 8);  // code
        Assert.Equal(2, s.Cs.Type & 2);  // readable
        Assert.Equal(1, s.Cs.Present);
        Assert.Equal(1, s.Cs.S);
        Assert.Equal(0, s.Cs.Dpl);
        foreach (var seg in new[] { s.Ds, s.Es, s.Ss, s.Fs, s.Gs })
        {
            Assert.Equal(0x18, seg.Selector);
            Assert.Equal(0UL, seg.Base);
            Assert.Equal(0xffff_ffffu, seg.Limit);
            Assert.Equal(0, seg.Type & 8);   // data
            Assert.Equal(2, seg.Type & 2);   // writable
            Assert.Equal(1, seg.Present);
            Assert.Equal(1, seg.S);
        }
        Assert.Equal(0x1000UL, s.Gdt.Base);
        Assert.Equal(BzBoot.GdtSize - 1, s.Gdt.Limit);
        Assert.Equal(0x20, s.Tr.Selector);
        Assert.Equal(0xb, s.Tr.Type); // busy 64-bit TSS
    }

    [Fact]
    public void GdtDescriptorsMatchTheEntrySegments()
    {
        using var m = GuestMemory.Create([(0, 1 * MiB)]);
        m.GetWritableSpan(0x1000, BzBoot.GdtSize).Fill(0xcc);
        BzBoot.WriteGdt(m, 0x1000);
        var s = BzBoot.EntrySregs(default, 0x9000, 0x1000);

        Assert.Equal(0UL, m.ReadU64(0x1000));
        Assert.Equal(0UL, m.ReadU64(0x1008));
        AssertDescriptorMatches(m.ReadU64(0x1000 + 0x10), s.Cs);
        AssertDescriptorMatches(m.ReadU64(0x1000 + 0x18), s.Ds);
        AssertDescriptorMatches(m.ReadU64(0x1000 + 0x20), s.Tr);
        Assert.Equal(0UL, m.ReadU64(0x1000 + 0x28)); // upper half of the 16-byte TSS descriptor
    }

    private static void AssertDescriptorMatches(ulong d, KvmSegment seg)
    {
        ulong limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
        ulong @base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
        byte g = (byte)((d >> 55) & 1);
        Assert.Equal(seg.Base, @base);
        Assert.Equal((ulong)seg.Limit, g == 1 ? (limit << 12) | 0xfff : limit);
        Assert.Equal(seg.Type, (byte)((d >> 40) & 0xf));
        Assert.Equal(seg.S, (byte)((d >> 44) & 1));
        Assert.Equal(seg.Dpl, (byte)((d >> 45) & 3));
        Assert.Equal(seg.Present, (byte)((d >> 47) & 1));
        Assert.Equal(seg.L, (byte)((d >> 53) & 1));
        Assert.Equal(seg.Db, (byte)((d >> 54) & 1));
        Assert.Equal(seg.G, g);
    }
}
