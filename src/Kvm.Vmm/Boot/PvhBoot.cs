using System.Text;
using Kvm.Hypervisor;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Boot;

/// <summary>One entry of the memory map given to the guest (E820 types).</summary>
public readonly record struct MemoryMapEntry(ulong Address, ulong Size, uint Type)
{
    public const uint Ram = 1, Reserved = 2;
}

/// <summary>A module handed to a PVH kernel through hvm_start_info's module list (the initrd).</summary>
public readonly record struct PvhModule(ulong Address, ulong Size);

/// <summary>
/// Boots an ELF kernel through its PVH entry: loads the segments, writes hvm_start_info, the memory
/// map and the command line, and gives the boot vCPU the 32-bit protected-mode state PVH defines
/// (paging off, flat 4 GiB CS/DS, EBX = address of hvm_start_info).
/// </summary>
public static class PvhBoot
{
    public const uint StartInfoMagic = 0x336ec578;

    /// <summary>Copies the ELF's loadable segments into guest RAM and zeroes their BSS parts.</summary>
    public static void LoadSegments(ElfImage image, ReadOnlySpan<byte> file, GuestMemory memory)
    {
        foreach (var s in image.Segments)
        {
            if (s.PhysicalAddress < X86Layout.BootDataEnd)
                throw new BootException(
                    $"kernel {image.Name}: segment {s.Index} at 0x{s.PhysicalAddress:x} overlaps the VMM's boot data below 0x{X86Layout.BootDataEnd:x}");
            if (s.MemorySize > int.MaxValue || !memory.IsValid(s.PhysicalAddress, s.MemorySize))
                throw new BootException(
                    $"kernel {image.Name}: segment {s.Index} (0x{s.PhysicalAddress:x}+0x{s.MemorySize:x}) does not fit in guest RAM ({GuestMemory.FormatSize(memory.TotalSize)})");
            var dest = memory.GetWritableSpan(s.PhysicalAddress, (int)s.MemorySize);
            file.Slice((int)s.FileOffset, (int)s.FileSize).CopyTo(dest);
            dest[(int)s.FileSize..].Clear();
        }
    }

    /// <summary>The memory map: low RAM, the legacy hole, RAM up to the MMIO hole, RAM above 4 GiB.</summary>
    public static IReadOnlyList<MemoryMapEntry> MemoryMap(GuestMemory memory)
    {
        var map = new List<MemoryMapEntry>();
        foreach (var r in memory.Regions)
        {
            if (r.GuestAddress == 0)
            {
                map.Add(new MemoryMapEntry(0, X86Layout.LowRamEnd, MemoryMapEntry.Ram));
                map.Add(new MemoryMapEntry(X86Layout.LowRamEnd, X86Layout.HighMemoryStart - X86Layout.LowRamEnd, MemoryMapEntry.Reserved));
                if (r.End > X86Layout.HighMemoryStart)
                    map.Add(new MemoryMapEntry(X86Layout.HighMemoryStart, r.End - X86Layout.HighMemoryStart, MemoryMapEntry.Ram));
            }
            else
            {
                map.Add(new MemoryMapEntry(r.GuestAddress, r.Size, MemoryMapEntry.Ram));
            }
        }
        return map;
    }

    /// <summary>
    /// Writes the command line, memory map, hvm_start_info and boot GDT into guest RAM;
    /// <paramref name="rsdp"/> is the ACPI RSDP's guest address (0: no ACPI tables).
    /// </summary>
    public static void WriteBootData(GuestMemory memory, string cmdline, ulong rsdp = 0, PvhModule? module = null)
    {
        byte[] cmd = Encoding.UTF8.GetBytes(cmdline);
        if (cmd.Length >= X86Layout.CmdlineMaxSize)
            throw new BootException($"command line is {cmd.Length} bytes; the limit is {X86Layout.CmdlineMaxSize - 1}");
        if (Array.IndexOf(cmd, (byte)0) >= 0)
            throw new BootException("command line contains a NUL character");
        memory.Write(X86Layout.CmdlineStart, cmd);
        memory.WriteU8(X86Layout.CmdlineStart + (ulong)cmd.Length, 0);

        var map = MemoryMap(memory);
        for (int i = 0; i < map.Count; i++)
        {
            ulong at = X86Layout.PvhMemmap + (ulong)i * 24;
            memory.WriteU64(at, map[i].Address);
            memory.WriteU64(at + 8, map[i].Size);
            memory.WriteU32(at + 16, map[i].Type);
            memory.WriteU32(at + 20, 0);
        }

        // struct hvm_start_info (version 1).
        ulong s = X86Layout.PvhStartInfo;
        memory.Clear(s, 56);
        memory.WriteU32(s + 0, StartInfoMagic);
        memory.WriteU32(s + 4, 1);                          // version
        memory.WriteU32(s + 8, 0);                          // flags
        memory.WriteU32(s + 12, module is null ? 0u : 1u);  // nr_modules
        memory.WriteU64(s + 16, X86Layout.PvhModlist);      // modlist_paddr
        memory.WriteU64(s + 24, X86Layout.CmdlineStart);    // cmdline_paddr
        memory.WriteU64(s + 32, rsdp);                      // rsdp_paddr
        memory.WriteU64(s + 40, X86Layout.PvhMemmap);       // memmap_paddr
        memory.WriteU32(s + 48, (uint)map.Count);           // memmap_entries

        if (module is PvhModule m)
        {
            // struct hvm_modlist_entry: paddr, size, cmdline_paddr (none), reserved.
            memory.WriteU64(X86Layout.PvhModlist + 0, m.Address);
            memory.WriteU64(X86Layout.PvhModlist + 8, m.Size);
            memory.WriteU64(X86Layout.PvhModlist + 16, 0);
            memory.WriteU64(X86Layout.PvhModlist + 24, 0);
        }

        // Boot GDT: the descriptors behind the selectors the vCPU starts with.
        ulong g = X86Layout.BootGdt;
        memory.WriteU64(g + 0x00, 0);
        memory.WriteU64(g + 0x08, 0);
        memory.WriteU64(g + 0x10, 0x00cf_9b00_0000_ffff); // code, 32-bit, 4 GiB
        memory.WriteU64(g + 0x18, 0x00cf_9300_0000_ffff); // data, 4 GiB
        memory.WriteU64(g + 0x20, 0x0000_8b00_0000_0067); // 32-bit TSS (busy)
    }

    /// <summary>
    /// Places an initrd as the PVH module list's first module (Linux takes module 0 as its
    /// initrd): at the top of RAM below 4 GiB, above the kernel's segments, page-aligned; and
    /// copies it there. Throws <see cref="BootException"/> naming the sizes when it does not fit.
    /// </summary>
    public static PvhModule LoadInitrd(GuestMemory memory, ElfImage kernel, ReadOnlySpan<byte> initrd, string initrdName)
    {
        if (initrd.Length == 0)
            throw new BootException($"initrd {initrdName}: is empty");
        ulong kernelEnd = kernel.Extent.End;
        var map = MemoryMap(memory);
        ulong size = (ulong)initrd.Length;
        if (BzImage.HighestFit(map, kernelEnd, X86Layout.FourGiB, size) is not ulong address || !memory.IsValid(address, size))
            throw new BootException(
                $"initrd {initrdName}: {size} bytes do not fit in RAM below 4 GiB above the end of kernel {kernel.Name} at 0x{kernelEnd:x}; give the VM more memory");
        memory.Write(address, initrd);
        return new PvhModule(address, size);
    }

    /// <summary>Registers for the boot vCPU at the PVH entry.</summary>
    public static KvmRegs EntryRegs(uint entry) => new()
    {
        Rip = entry,
        Rbx = X86Layout.PvhStartInfo,
        Rflags = 0x2,
    };

    /// <summary>Segment and control registers for the PVH entry: 32-bit protected mode, paging off.</summary>
    public static KvmSregs EntrySregs(KvmSregs current)
    {
        var s = current;
        s.Cs = Flat(X86Layout.BootCodeSelector, type: 0xb);
        s.Ds = s.Es = s.Fs = s.Gs = s.Ss = Flat(X86Layout.BootDataSelector, type: 0x3);
        s.Tr = new KvmSegment { Selector = X86Layout.BootTssSelector, Base = 0, Limit = 0x67, Type = 0xb, Present = 1 };
        s.Ldt = new KvmSegment { Selector = 0, Base = 0, Limit = 0xffff, Type = 0x2, Present = 1 };
        s.Gdt = new KvmDtable { Base = X86Layout.BootGdt, Limit = 0x27 };
        s.Idt = new KvmDtable { Base = 0, Limit = 0 };
        s.Cr0 = 0x11; // PE | ET
        s.Cr3 = 0;
        s.Cr4 = 0;
        s.Efer = 0;
        return s;
    }

    private static KvmSegment Flat(ushort selector, byte type) => new()
    {
        Base = 0,
        Limit = 0xffff_ffff,
        Selector = selector,
        Type = type,
        Present = 1,
        Dpl = 0,
        Db = 1,
        S = 1,
        L = 0,
        G = 1,
    };
}
