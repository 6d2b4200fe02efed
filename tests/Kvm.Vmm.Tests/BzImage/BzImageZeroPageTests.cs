using System.Buffers.Binary;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

public class BzImageZeroPageTests
{
    private static readonly MemoryMapEntry[] Map =
    [
        new(0, 0x9fc00, MemoryMapEntry.Ram),
        new(0x9fc00, 0x100000 - 0x9fc00, MemoryMapEntry.Reserved),
        new(0x100000, 0xbff0_0000, MemoryMapEntry.Ram),
        new(0xe000_0000, 0x1000_0000, MemoryMapEntry.Reserved), // ECAM, as a VMM might pass it
        new(0x1_0000_0000, 0x4000_0000, MemoryMapEntry.Ram),
        new(0xfec0_0000, 0x1000, MemoryMapEntry.Reserved),        // out of order on purpose
        new(0xe_0000, 0x2_0000, 3),                               // ACPI reclaimable
    ];

    private static Boot.BzImage Image(BzImageBuilder? b = null) => Boot.BzImage.Parse((b ?? new BzImageBuilder()).Build(), "k");

    private static ushort U16(byte[] p, int o) => BinaryPrimitives.ReadUInt16LittleEndian(p.AsSpan(o));
    private static uint U32(byte[] p, int o) => BinaryPrimitives.ReadUInt32LittleEndian(p.AsSpan(o));
    private static ulong U64(byte[] p, int o) => BinaryPrimitives.ReadUInt64LittleEndian(p.AsSpan(o));

    [Fact]
    public void SetupHeaderIsCopiedAt0x1F1UpToItsEnd()
    {
        var b = new BzImageBuilder();
        var file = b.Build();
        var page = ZeroPage.Build(Boot.BzImage.Parse(file, "k"), 0x20000, 0, 0, Map);

        Assert.Equal(4096, page.Length);
        // Every header byte the loader does not own is the file's.
        int[] owned = [0x210, 0x211, 0x214, 0x215, 0x216, 0x217, 0x224, 0x225, 0x228, 0x229, 0x22a, 0x22b];
        for (int o = 0x1f1; o < 0x26c; o++)
        {
            if (!owned.Contains(o))
                Assert.True(file[o] == page[o], $"byte 0x{o:x}: file 0x{file[o]:x2}, zero page 0x{page[o]:x2}");
        }
        Assert.Equal(0xaa55, U16(page, 0x1fe));
        Assert.Equal(0x5372_6448u, U32(page, 0x202));
        Assert.Equal(0x020f, U16(page, 0x206));
        Assert.Equal(0x1234_5678u, U32(page, 0x268)); // kernel_info_offset: the last header field
        Assert.NotEqual(0, file[0x26c]);
        Assert.Equal(0, page[0x26c]);                  // the setup code after the header is not copied
        Assert.Equal(0, page[ZeroPage.SentinelOffset]);
        Assert.All(page[..0x70], x => Assert.Equal(0, x)); // screen_info etc. stay zero
    }

    [Fact]
    public void LoaderFieldsAreSet()
    {
        var image = Image(new BzImageBuilder { LoadFlags = BzImage.LoadedHigh | BzImage.CanUseHeap | BzImage.QuietFlag });
        var page = ZeroPage.Build(image, 0x20000, 0x1f00_0000, 0x12_3456, Map);

        Assert.Equal(0xff, page[0x210]);                            // type_of_loader: undefined
        Assert.Equal(BzImage.LoadedHigh | BzImage.QuietFlag, page[0x211]); // CAN_USE_HEAP cleared, the rest kept
        Assert.Equal(0, U16(page, 0x224));                          // heap_end_ptr
        Assert.Equal(0x1000000u, U32(page, 0x214));                 // code32_start = load address
        Assert.Equal(0x20000u, U32(page, 0x228));                   // cmd_line_ptr
        Assert.Equal(0u, U32(page, 0x0c8));                         // ext_cmd_line_ptr
        Assert.Equal(0x1f00_0000u, U32(page, 0x218));               // ramdisk_image
        Assert.Equal(0x12_3456u, U32(page, 0x21c));                 // ramdisk_size
        Assert.Equal(0u, U32(page, 0x0c0));                         // ext_ramdisk_image
        Assert.Equal(0u, U32(page, 0x0c4));                         // ext_ramdisk_size
        Assert.Equal(0UL, U64(page, 0x070));                        // no ACPI
    }

    [Fact]
    public void LoadedHighIsSetEvenIfTheCopyLacksIt()
    {
        // Parse refuses an image without LOADED_HIGH, so check the write itself: the flag is ORed in.
        var page = ZeroPage.Build(Image(), 0x20000, 0, 0, Map);
        Assert.Equal(BzImage.LoadedHigh, page[0x211] & BzImage.LoadedHigh);
    }

    [Fact]
    public void NoInitrdLeavesTheRamdiskFieldsZero()
    {
        var page = ZeroPage.Build(Image(), 0x20000, 0, 0, Map);
        Assert.Equal(0u, U32(page, 0x218));
        Assert.Equal(0u, U32(page, 0x21c));
    }

    [Fact]
    public void AddressesAbove4GiBUseTheExtFields()
    {
        var page = ZeroPage.Build(Image(), 0x2_0002_0000, 0x1_2345_6000, 0x1_0000_1000, Map);
        Assert.Equal(0x20000u, U32(page, 0x228));
        Assert.Equal(2u, U32(page, 0x0c8));
        Assert.Equal(0x2345_6000u, U32(page, 0x218));
        Assert.Equal(1u, U32(page, 0x0c0));
        Assert.Equal(0x1000u, U32(page, 0x21c));
        Assert.Equal(1u, U32(page, 0x0c4));
    }

    [Fact]
    public void E820TableIsWrittenExactlyAsGiven()
    {
        var page = ZeroPage.Build(Image(), 0x20000, 0, 0, Map);

        Assert.Equal(Map.Length, page[0x1e8]);
        for (int i = 0; i < Map.Length; i++)
        {
            int e = 0x2d0 + i * 20;
            Assert.Equal(Map[i], new MemoryMapEntry(U64(page, e), U64(page, e + 8), U32(page, e + 16)));
        }
        Assert.All(page[(0x2d0 + Map.Length * 20)..0xcd0], x => Assert.Equal(0, x)); // unused slots stay zero
    }

    [Fact]
    public void FullE820TableFits()
    {
        var map = Enumerable.Range(0, 128).Select(i => new MemoryMapEntry((ulong)i << 21, 1UL << 21, MemoryMapEntry.Ram)).ToArray();
        var page = ZeroPage.Build(Image(), 0x20000, 0, 0, map);
        Assert.Equal(128, page[0x1e8]);
        Assert.Equal(127UL << 21, U64(page, 0x2d0 + 127 * 20));
        Assert.Equal(1u, U32(page, 0x2d0 + 127 * 20 + 16));
    }

    [Fact]
    public void TooManyOrNoE820EntriesAreRefused()
    {
        var map = Enumerable.Range(0, 129).Select(i => new MemoryMapEntry((ulong)i << 21, 1UL << 21, MemoryMapEntry.Ram)).ToArray();
        var e = Assert.Throws<BootException>(() => ZeroPage.Build(Image(), 0x20000, 0, 0, map));
        Assert.Contains("129", e.Message);
        Assert.Contains("128", e.Message);
        e = Assert.Throws<BootException>(() => ZeroPage.Build(Image(), 0x20000, 0, 0, []));
        Assert.Contains("empty", e.Message);
    }

    [Fact]
    public void AcpiRsdpAddressIsWrittenAt0x70()
    {
        var page = ZeroPage.Build(Image(), 0x20000, 0, 0, Map, acpiRsdp: 0xe_0000);
        Assert.Equal(0xe_0000UL, U64(page, 0x070));
        Assert.Equal(0UL, U64(page, 0x078));
    }
}
