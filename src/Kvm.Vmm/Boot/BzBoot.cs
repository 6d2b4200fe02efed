using System.Text;
using Kvm.Hypervisor;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Boot;

/// <summary>
/// Where the bzImage loader puts its boot data below 1 MiB. Defaults: GDT at 0x1000 (0x30 bytes),
/// the zero page at 0x8000 (4 KiB), the identity page tables at 0x9000-0xF000 (6 pages), a boot
/// stack page at 0xF000-0x10000 (RSP = 0x10000), the command line at 0x20000 (up to cmdline_size
/// + 1 bytes). None of these overlap the PVH loader's data (0x500 GDT, 0x6000 hvm_start_info,
/// 0x7000-0x7C00 memory map) except the command line, which both protocols put at 0x20000; the
/// ACPI tables' 0xE0000-0xFFFFF area is untouched.
/// </summary>
public sealed record BzBootLayout(ulong Gdt, ulong ZeroPage, ulong PageTables, ulong StackTop, ulong Cmdline)
{
    /// <summary>Bytes below <see cref="StackTop"/> kept for the stack.</summary>
    public const ulong StackSize = 0x1000;

    public static BzBootLayout Default { get; } =
        new(Gdt: 0x1000, ZeroPage: 0x8000, PageTables: 0x9000, StackTop: 0x10000, Cmdline: X86Layout.CmdlineStart);
}

/// <summary>What <see cref="BzBoot.Load"/> placed where; the entry state is derived from it.</summary>
public sealed record BzBootInfo(
    ulong KernelAddress,
    ulong KernelEnd,
    ulong EntryPoint,
    ulong ZeroPage,
    ulong Cmdline,
    int CmdlineLength,
    ulong InitrdAddress,
    ulong InitrdSize,
    ulong PageTables,
    ulong Gdt,
    ulong StackTop);

/// <summary>
/// Boots a bzImage through the 64-bit boot protocol: the protected-mode kernel at its load
/// address, the zero page, the command line and the initrd in guest RAM, identity page tables for
/// the first 4 GiB and a GDT with flat __BOOT_CS (0x10, 64-bit code) and __BOOT_DS (0x18), then the
/// vCPU in long mode at load address + 0x200 with RSI = the zero page and interrupts off.
/// </summary>
public static class BzBoot
{
    /// <summary>__BOOT_CS and __BOOT_DS, as the boot protocol requires them; a 64-bit TSS follows for TR.</summary>
    public const ushort BootCodeSelector = 0x10, BootDataSelector = 0x18, BootTssSelector = 0x20;

    /// <summary>Bytes <see cref="WriteGdt"/> writes: null, null, code, data, and a 16-byte TSS descriptor.</summary>
    public const int GdtSize = 0x30;

    /// <summary>Pages <see cref="WriteIdentityPageTables"/> writes: PML4, PDPT, four page directories.</summary>
    public const int IdentityPageTablePages = 6;
    public const int IdentityPageTablesSize = IdentityPageTablePages * 4096;

    /// <summary>The identity map covers [0, 4 GiB) with 2 MiB pages.</summary>
    public const ulong IdentityMapEnd = 0x1_0000_0000;

    private const ulong PageSize = 4096;
    private const ulong PtePresent = 1, PteWritable = 2, PteLarge = 0x80;

    // GDT descriptors (flat, base 0, limit 4 GiB with G=1).
    public const ulong Code64Descriptor = 0x00af_9b00_0000_ffff; // P, DPL0, S, type 0xb (exec/read, accessed), L=1, D=0, G=1
    public const ulong DataDescriptor = 0x00cf_9300_0000_ffff;   // P, DPL0, S, type 0x3 (read/write, accessed), D/B=1, G=1
    public const ulong TssDescriptorLow = 0x0000_8b00_0000_0067;  // P, type 0xb (busy 64-bit TSS), base 0, limit 0x67

    /// <summary>
    /// Loads everything into guest RAM: kernel, initrd, command line, zero page, page tables, GDT.
    /// Every placement is checked before anything is written. <paramref name="memoryMap"/> is the
    /// e820 map given to the kernel as is; it also decides where the initrd may go.
    /// </summary>
    public static BzBootInfo Load(
        GuestMemory memory,
        BzImage image,
        ReadOnlySpan<byte> kernelFile,
        string cmdline,
        ReadOnlySpan<byte> initrd,
        IReadOnlyList<MemoryMapEntry> memoryMap,
        ulong? acpiRsdp = null,
        BzBootLayout? layout = null,
        string initrdName = "initrd")
    {
        layout ??= BzBootLayout.Default;
        byte[] cmd = Encoding.UTF8.GetBytes(cmdline);
        if ((ulong)cmd.Length > image.CmdlineSize)
            throw new BootException(
                $"kernel {image.Name}: command line is {cmd.Length} bytes; the kernel's cmdline_size is {image.CmdlineSize}");
        if (Array.IndexOf(cmd, (byte)0) >= 0)
            throw new BootException("command line contains a NUL character");
        if (layout.Cmdline + (ulong)cmd.Length + 1 > X86Layout.LowRamEnd)
            throw new BootException(
                $"command line is {cmd.Length} bytes and does not fit between 0x{layout.Cmdline:x} and 0x{X86Layout.LowRamEnd:x}");
        CheckLayout(memory, layout, (ulong)cmd.Length + 1);

        image.CheckKernelFits(memoryMap);
        ulong initrdAddress = 0, initrdSize = (ulong)initrd.Length;
        if (initrdSize > 0)
        {
            initrdAddress = image.PlaceInitrd(memoryMap, initrdSize, initrdName);
            if (!memory.IsValid(initrdAddress, initrdSize))
                throw new BootException(
                    $"initrd {initrdName}: 0x{initrdAddress:x}+0x{initrdSize:x} is RAM in the memory map but not in guest memory ({GuestMemory.FormatSize(memory.TotalSize)})");
        }
        byte[] zeroPage = ZeroPage.Build(image, layout.Cmdline, initrdAddress, initrdSize, memoryMap, acpiRsdp);

        image.LoadKernel(kernelFile, memory);
        if (initrdSize > 0)
            memory.Write(initrdAddress, initrd);
        memory.Write(layout.Cmdline, cmd);
        memory.WriteU8(layout.Cmdline + (ulong)cmd.Length, 0);
        memory.Write(layout.ZeroPage, zeroPage);
        WriteIdentityPageTables(memory, layout.PageTables);
        WriteGdt(memory, layout.Gdt);

        return new BzBootInfo(
            image.LoadAddress, image.KernelEnd, image.EntryPoint, layout.ZeroPage, layout.Cmdline, cmd.Length,
            initrdAddress, initrdSize, layout.PageTables, layout.Gdt, layout.StackTop);
    }

    private static void CheckLayout(GuestMemory memory, BzBootLayout l, ulong cmdlineBytes)
    {
        if (l.PageTables % PageSize != 0)
            throw new ArgumentException($"page tables at 0x{l.PageTables:x} are not page aligned", nameof(l));
        if (l.StackTop < BzBootLayout.StackSize || l.StackTop % 16 != 0)
            throw new ArgumentException($"boot stack top 0x{l.StackTop:x} is not 16-byte aligned above 0x{BzBootLayout.StackSize:x}", nameof(l));
        if (l.ZeroPage % PageSize != 0)
            throw new ArgumentException($"zero page at 0x{l.ZeroPage:x} is not page aligned", nameof(l));
        var areas = new (string What, ulong Start, ulong Size)[]
        {
            ("GDT", l.Gdt, GdtSize),
            ("zero page", l.ZeroPage, (ulong)ZeroPage.Size),
            ("page tables", l.PageTables, IdentityPageTablesSize),
            ("boot stack", l.StackTop - BzBootLayout.StackSize, BzBootLayout.StackSize),
            ("command line", l.Cmdline, cmdlineBytes),
        };
        for (int i = 0; i < areas.Length; i++)
        {
            var a = areas[i];
            if (a.Start + a.Size > X86Layout.LowRamEnd)
                throw new ArgumentException($"the {a.What} at 0x{a.Start:x} is not below 0x{X86Layout.LowRamEnd:x}", nameof(l));
            if (!memory.IsValid(a.Start, a.Size))
                throw new BootException($"the {a.What} at 0x{a.Start:x} is not in guest RAM");
            for (int j = 0; j < i; j++)
            {
                var b = areas[j];
                if (a.Start < b.Start + b.Size && b.Start < a.Start + a.Size)
                    throw new ArgumentException($"the {a.What} at 0x{a.Start:x} overlaps the {b.What} at 0x{b.Start:x}", nameof(l));
            }
        }
    }

    /// <summary>
    /// Writes 4-level page tables identity-mapping [0, 4 GiB) with 2 MiB pages (present, writable,
    /// supervisor) into <see cref="IdentityPageTablesSize"/> bytes at <paramref name="at"/> (page
    /// aligned): PML4 at +0, PDPT at +0x1000, page directories at +0x2000..+0x5000. 1 GiB pages
    /// are not used: the CPU model may hide PDPE1GB. Returns the value for CR3.
    /// </summary>
    public static ulong WriteIdentityPageTables(GuestMemory memory, ulong at)
    {
        if (at % PageSize != 0)
            throw new ArgumentException($"page tables must be page aligned, not at 0x{at:x}", nameof(at));
        if (!memory.IsValid(at, IdentityPageTablesSize))
            throw new BootException($"page tables at 0x{at:x}+0x{IdentityPageTablesSize:x} are not in guest RAM");
        ulong pml4 = at, pdpt = at + PageSize, pd = at + 2 * PageSize;
        memory.Clear(at, IdentityPageTablesSize);
        memory.WriteU64(pml4, pdpt | PtePresent | PteWritable);
        for (ulong i = 0; i < 4; i++)
        {
            ulong dir = pd + i * PageSize;
            memory.WriteU64(pdpt + i * 8, dir | PtePresent | PteWritable);
            for (ulong j = 0; j < 512; j++)
                memory.WriteU64(dir + j * 8, ((i << 30) | (j << 21)) | PtePresent | PteWritable | PteLarge);
        }
        return pml4;
    }

    /// <summary>
    /// Writes the boot GDT (<see cref="GdtSize"/> bytes at <paramref name="at"/>): null at 0x00 and
    /// 0x08, flat 64-bit code at 0x10 (__BOOT_CS), flat data at 0x18 (__BOOT_DS), and a 16-byte busy
    /// 64-bit TSS descriptor at 0x20 for TR, which VM entry in long mode requires.
    /// </summary>
    public static void WriteGdt(GuestMemory memory, ulong at)
    {
        if (!memory.IsValid(at, GdtSize))
            throw new BootException($"GDT at 0x{at:x}+0x{GdtSize:x} is not in guest RAM");
        memory.Clear(at, GdtSize);
        memory.WriteU64(at + BootCodeSelector, Code64Descriptor);
        memory.WriteU64(at + BootDataSelector, DataDescriptor);
        memory.WriteU64(at + BootTssSelector, TssDescriptorLow);
        memory.WriteU64(at + BootTssSelector + 8, 0); // base bits 32-63, reserved
    }

    /// <summary>Registers at the 64-bit entry: RIP = entry, RSI = zero page, a small stack, interrupts off.</summary>
    public static KvmRegs EntryRegs(ulong entryPoint, ulong zeroPage, ulong stackTop) => new()
    {
        Rip = entryPoint,
        Rsi = zeroPage,
        Rsp = stackTop,
        Rbp = stackTop,
        Rflags = 0x2, // IF clear; bit 1 is always set
    };

    public static KvmRegs EntryRegs(BzBootInfo info) => EntryRegs(info.EntryPoint, info.ZeroPage, info.StackTop);

    /// <summary>
    /// Segment and control registers for the 64-bit entry: long mode with paging on (CR0 PE|ET|PG,
    /// CR4 PAE, EFER LME|LMA, CR3 = <paramref name="pageTables"/>), CS = __BOOT_CS (64-bit code),
    /// DS/ES/SS/FS/GS = __BOOT_DS, GDTR = <paramref name="gdt"/>. Caching is left enabled (CD and NW
    /// clear). Other fields (APIC base, interrupt bitmap) keep what <paramref name="current"/> has.
    /// </summary>
    public static KvmSregs EntrySregs(KvmSregs current, ulong pageTables, ulong gdt)
    {
        var s = current;
        s.Cs = new KvmSegment
        {
            Base = 0, Limit = 0xffff_ffff, Selector = BootCodeSelector, Type = 0xb,
            Present = 1, Dpl = 0, Db = 0, S = 1, L = 1, G = 1,
        };
        s.Ds = s.Es = s.Fs = s.Gs = s.Ss = new KvmSegment
        {
            Base = 0, Limit = 0xffff_ffff, Selector = BootDataSelector, Type = 0x3,
            Present = 1, Dpl = 0, Db = 1, S = 1, L = 0, G = 1,
        };
        s.Tr = new KvmSegment { Selector = BootTssSelector, Base = 0, Limit = 0x67, Type = 0xb, Present = 1 };
        s.Ldt = new KvmSegment { Selector = 0, Base = 0, Limit = 0xffff, Type = 0x2, Present = 1 };
        s.Gdt = new KvmDtable { Base = gdt, Limit = GdtSize - 1 };
        s.Idt = new KvmDtable { Base = 0, Limit = 0 };
        s.Cr0 = 0x8000_0011; // PG | ET | PE
        s.Cr3 = pageTables;
        s.Cr4 = 0x20;        // PAE
        s.Efer = 0x500;      // LMA | LME
        return s;
    }

    public static KvmSregs EntrySregs(KvmSregs current, BzBootInfo info) => EntrySregs(current, info.PageTables, info.Gdt);
}
