using System.Buffers.Binary;

namespace Kvm.Vmm.Tests;

/// <summary>
/// Writes small synthetic bzImages for the loader tests: a boot sector with the setup header at
/// 0x1F1, setup sectors filled with a pattern, then a protected-mode kernel whose bytes are a
/// pattern too. Every header field the loader reads can be set; defaults look like a current
/// x86-64 distribution kernel (protocol 2.15, relocatable, 2 MiB aligned, pref_address 16 MiB).
/// </summary>
public sealed class BzImageBuilder
{
    public ushort Protocol { get; set; } = 0x020f;
    public byte SetupSects { get; set; } = 4;
    public byte LoadFlags { get; set; } = 0x01;          // LOADED_HIGH
    public ushort XLoadFlags { get; set; } = 0x0003;     // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    public uint KernelAlignment { get; set; } = 0x200000;
    public bool Relocatable { get; set; } = true;
    public byte MinAlignment { get; set; } = 0x15;
    public ulong PrefAddress { get; set; } = 0x1000000;
    public uint InitSize { get; set; } = 0x800000;
    public uint CmdlineSize { get; set; } = 2047;
    public uint InitrdAddrMax { get; set; } = 0x7fff_ffff;
    public int KernelSize { get; set; } = 0x3000;        // a multiple of 16: syssize = KernelSize / 16
    public uint? Syssize { get; set; }                   // overrides KernelSize / 16 in the header
    public byte JumpDisplacement { get; set; } = 0x6a;   // header ends at 0x202 + 0x6a = 0x26c
    public int TrailingBytes { get; set; }               // after the kernel (a signature, say)

    public int SetupSize => ((SetupSects == 0 ? 4 : SetupSects) + 1) * 512;
    public int HeaderEnd => 0x202 + JumpDisplacement;

    /// <summary>The protected-mode kernel's bytes.</summary>
    public byte[] Kernel => ElfBuilder.Pattern(KernelSize, 9);

    public byte[] Build()
    {
        var f = new byte[SetupSize + KernelSize + TrailingBytes];
        // Setup code: a recognisable pattern everywhere, then the header fields on top.
        ElfBuilder.Pattern(SetupSize, 3).CopyTo(f, 0);
        var s = f.AsSpan();
        s[0x1f1] = SetupSects;
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x1f2..], 1);                  // root_flags
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x1f4..], Syssize ?? (uint)(KernelSize / 16));
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x1f8..], 0);                  // ram_size
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x1fa..], 0xffff);             // vid_mode
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x1fc..], 0);                  // root_dev
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x1fe..], 0xaa55);             // boot_flag
        s[0x200] = 0xeb;                                                           // jmp short
        s[0x201] = JumpDisplacement;
        "HdrS"u8.CopyTo(s[0x202..]);
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x206..], Protocol);
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x208..], 0);                  // realmode_swtch
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x20c..], 0x1000);             // start_sys_seg
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x20e..], 0x42c0);             // kernel_version
        s[0x210] = 0;                                                              // type_of_loader
        s[0x211] = LoadFlags;
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x212..], 0x8000);             // setup_move_size
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x214..], 0x100000);           // code32_start
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x218..], 0);                  // ramdisk_image
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x21c..], 0);                  // ramdisk_size
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x220..], 0);                  // bootsect_kludge
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x224..], 0x5be0);             // heap_end_ptr
        s[0x226] = 0;                                                              // ext_loader_ver
        s[0x227] = 0;                                                              // ext_loader_type
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x228..], 0);                  // cmd_line_ptr
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x22c..], InitrdAddrMax);
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x230..], KernelAlignment);
        s[0x234] = Relocatable ? (byte)1 : (byte)0;
        s[0x235] = MinAlignment;
        BinaryPrimitives.WriteUInt16LittleEndian(s[0x236..], XLoadFlags);
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x238..], CmdlineSize);
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x23c..], 0);                  // hardware_subarch
        BinaryPrimitives.WriteUInt64LittleEndian(s[0x240..], 0);                  // hardware_subarch_data
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x248..], 0x2cc);              // payload_offset
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x24c..], 0x1000);             // payload_length
        BinaryPrimitives.WriteUInt64LittleEndian(s[0x250..], 0);                  // setup_data
        BinaryPrimitives.WriteUInt64LittleEndian(s[0x258..], PrefAddress);
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x260..], InitSize);
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x264..], 0x190);              // handover_offset
        BinaryPrimitives.WriteUInt32LittleEndian(s[0x268..], 0x1234_5678);        // kernel_info_offset
        Kernel.CopyTo(f, SetupSize);
        return f;
    }
}
