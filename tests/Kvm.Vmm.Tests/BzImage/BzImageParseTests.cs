using System.Buffers.Binary;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

public class BzImageParseTests
{
    private const string Name = "vmlinuz-under-test";

    private static BootException Fails(byte[] file)
    {
        var e = Assert.Throws<BootException>(() => BzImage.Parse(file, Name));
        Assert.Contains(Name, e.Message);
        return e;
    }

    [Fact]
    public void ValidImageIsParsed()
    {
        var b = new BzImageBuilder();
        var file = b.Build();

        var image = BzImage.Parse(file, Name);

        Assert.Equal(Name, image.Name);
        Assert.Equal(0x020f, image.Protocol);
        Assert.Equal("2.15", image.ProtocolText);
        Assert.Equal(4, image.SetupSects);
        Assert.Equal(5 * 512, image.SetupSize);
        Assert.Equal(5 * 512, image.KernelOffset);
        Assert.Equal(0x3000, image.KernelLength);
        Assert.Equal(0x300u, image.Syssize);
        Assert.Equal(BzImage.LoadedHigh, image.LoadFlags);
        Assert.Equal(0x3, image.XLoadFlags);
        Assert.True(image.CanBeLoadedAbove4G);
        Assert.Equal(0x200000u, image.KernelAlignment);
        Assert.True(image.Relocatable);
        Assert.Equal(0x15, image.MinAlignment);
        Assert.Equal(0x1000000UL, image.PrefAddress);
        Assert.Equal(0x800000u, image.InitSize);
        Assert.Equal(2047u, image.CmdlineSize);
        Assert.Equal(0x7fff_ffffu, image.InitrdAddrMax);
        Assert.Equal(0x26c, image.HeaderEnd);
        Assert.Equal(file.AsSpan(0x1f1, 0x26c - 0x1f1).ToArray(), image.SetupHeader.ToArray());

        Assert.Equal(0x1000000UL, image.LoadAddress);
        Assert.Equal(0x800000UL, image.Footprint);
        Assert.Equal(0x1800000UL, image.KernelEnd);
        Assert.Equal(0x1000200UL, image.EntryPoint);
        Assert.Equal(0x8000_0000UL, image.InitrdLimit);
        Assert.Contains("2.15", image.ToString());
    }

    [Fact]
    public void SetupSectsZeroMeansFour()
    {
        var image = BzImage.Parse(new BzImageBuilder { SetupSects = 0 }.Build(), Name);
        Assert.Equal(0, image.SetupSectsField);
        Assert.Equal(4, image.SetupSects);
        Assert.Equal(5 * 512, image.KernelOffset);
    }

    [Fact]
    public void ManySetupSectsMoveTheKernel()
    {
        var b = new BzImageBuilder { SetupSects = 39 };
        var file = b.Build();
        var image = BzImage.Parse(file, Name);
        Assert.Equal(40 * 512, image.KernelOffset);
        Assert.Equal(b.Kernel, file.AsSpan(image.KernelOffset, image.KernelLength).ToArray());
    }

    [Fact]
    public void BytesAfterTheKernelAreNotPartOfIt()
    {
        var image = BzImage.Parse(new BzImageBuilder { TrailingBytes = 1472 }.Build(), Name);
        Assert.Equal(0x3000, image.KernelLength);
    }

    [Fact]
    public void InitSizeSmallerThanTheKernelStillCoversTheKernel()
    {
        var image = BzImage.Parse(new BzImageBuilder { InitSize = 0x100, KernelSize = 0x2010 }.Build(), Name);
        Assert.Equal(0x3000UL, image.Footprint); // the kernel's bytes, whole pages
    }

    [Fact]
    public void IsBzImageTellsBzImagesFromElfAndOtherFiles()
    {
        Assert.True(BzImage.IsBzImage(new BzImageBuilder().Build()));
        Assert.True(BzImage.IsBzImage(new BzImageBuilder { Protocol = 0x0200 }.Build())); // old, but still a bzImage: Parse says why not
        Assert.False(BzImage.IsBzImage(ElfBuilder.WithPvh(true).Build()));
        Assert.False(BzImage.IsBzImage([]));
        Assert.False(BzImage.IsBzImage(new byte[0x205]));
        Assert.False(BzImage.IsBzImage(new BzImageBuilder().Build().AsSpan(0, 0x205)));
        Assert.False(BzImage.IsBzImage(RandomBytes(0x10000, 1)));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(0x100)]
    [InlineData(0x1ff)]
    [InlineData(0x205)]
    public void FileShorterThanTheHeaderIsRefused(int length)
    {
        var file = new BzImageBuilder().Build()[..length];
        var e = Fails(file);
        Assert.Contains(length == 0 ? "empty" : $"{length} bytes", e.Message);
    }

    [Theory]
    [InlineData(0x208)]
    [InlineData(0x26b)] // one byte short of the header end (0x202 + 0x6a)
    public void FileEndingInsideTheHeaderIsTruncated(int length)
    {
        var e = Fails(new BzImageBuilder().Build()[..length]);
        Assert.Contains("truncated", e.Message);
        Assert.Contains("0x26c", e.Message);
        Assert.Contains($"{length} bytes", e.Message);
    }

    [Theory]
    [InlineData(0x26c)]       // the header and nothing else
    [InlineData(5 * 512 - 1)] // setup code cut short
    [InlineData(5 * 512)]     // setup code complete, no kernel
    public void HeaderWithoutKernelIsTruncated(int length)
    {
        var e = Fails(new BzImageBuilder().Build()[..length]);
        Assert.Contains("truncated", e.Message);
        Assert.Contains("no protected-mode kernel", e.Message);
        Assert.Contains("setup_sects 4", e.Message);
    }

    [Fact]
    public void KernelShorterThanSyssizeIsTruncated()
    {
        var file = new BzImageBuilder().Build();
        var e = Fails(file[..^16]);
        Assert.Contains("truncated", e.Message);
        Assert.Contains("syssize 0x300", e.Message);
        Assert.Contains($"{0x3000 - 16} follow", e.Message);
    }

    [Fact]
    public void ZeroSyssizeIsRefused()
    {
        var e = Fails(new BzImageBuilder { Syssize = 0 }.Build());
        Assert.Contains("syssize", e.Message);
    }

    [Theory]
    [InlineData((ushort)0x0205, "2.05")]
    [InlineData((ushort)0x0200, "2.00")]
    [InlineData((ushort)0x0104, "1.04")]
    public void TooOldProtocolIsRefused(ushort version, string text)
    {
        var e = Fails(new BzImageBuilder { Protocol = version }.Build());
        Assert.Contains($"boot protocol {text}", e.Message);
        Assert.Contains("older than 2.06", e.Message);
    }

    [Theory]
    [InlineData((ushort)0x0206, "2.06")]
    [InlineData((ushort)0x020b, "2.11")]
    public void ProtocolBeforeXloadflagsHasNo64BitEntry(ushort version, string text)
    {
        var e = Fails(new BzImageBuilder { Protocol = version }.Build());
        Assert.Contains($"boot protocol {text}", e.Message);
        Assert.Contains("XLF_KERNEL_64", e.Message);
        Assert.Contains("2.12", e.Message);
    }

    [Fact]
    public void Protocol212IsAccepted()
    {
        Assert.Equal("2.12", BzImage.Parse(new BzImageBuilder { Protocol = 0x020c }.Build(), Name).ProtocolText);
    }

    [Fact]
    public void MissingXlfKernel64IsRefused()
    {
        var e = Fails(new BzImageBuilder { XLoadFlags = 0x0002 }.Build());
        Assert.Contains("xloadflags 0x0002", e.Message);
        Assert.Contains("XLF_KERNEL_64", e.Message);
    }

    [Fact]
    public void HeaderEndingBeforeInitSizeIsRefused()
    {
        var e = Fails(new BzImageBuilder { JumpDisplacement = 0x40 }.Build()); // ends at 0x242
        Assert.Contains("0x242", e.Message);
        Assert.Contains("init_size", e.Message);
    }

    [Fact]
    public void MissingLoadedHighIsRefused()
    {
        var e = Fails(new BzImageBuilder { LoadFlags = 0x80 }.Build());
        Assert.Contains("loadflags 0x80", e.Message);
        Assert.Contains("LOADED_HIGH", e.Message);
    }

    [Fact]
    public void MissingBootFlagIsNotAKernel()
    {
        var file = new BzImageBuilder().Build();
        file[0x1fe] = 0;
        var e = Fails(file);
        Assert.Contains("not a bzImage", e.Message);
        Assert.Contains("boot_flag", e.Message);
        Assert.Contains("0xaa00", e.Message);
    }

    [Fact]
    public void MissingHdrSIsNotAKernel()
    {
        var file = new BzImageBuilder().Build();
        "HdrX"u8.CopyTo(file.AsSpan(0x202));
        var e = Fails(file);
        Assert.Contains("not a bzImage", e.Message);
        Assert.Contains("HdrS", e.Message);
        Assert.Contains("0x58726448", e.Message);
    }

    [Fact]
    public void ElfFileIsNotABzImage()
    {
        var e = Fails(ElfBuilder.WithPvh(true).Build());
        Assert.Contains("ELF", e.Message);
        Assert.Contains("not a bzImage", e.Message);
    }

    [Theory]
    [InlineData(0x300, 1)]
    [InlineData(0x10000, 2)]
    [InlineData(0x100000, 3)]
    public void RandomBytesAreNotAKernel(int length, int seed)
    {
        var e = Fails(RandomBytes(length, seed));
        Assert.Contains("not a bzImage", e.Message);
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(0x300000u)]
    [InlineData(0x800u)]
    public void BadKernelAlignmentIsRefused(uint alignment)
    {
        var e = Fails(new BzImageBuilder { KernelAlignment = alignment }.Build());
        Assert.Contains("kernel_alignment", e.Message);
        Assert.Contains($"0x{alignment:x}", e.Message);
    }

    [Fact]
    public void RelocatableKernelGoesAtPrefAddressRoundedUpToItsAlignment()
    {
        Assert.Equal(0x1200000UL, BzImage.Parse(new BzImageBuilder { PrefAddress = 0x1100000 }.Build(), Name).LoadAddress);
        // Never below 1 MiB, and aligned: 1 MiB rounds up to 2 MiB.
        Assert.Equal(0x200000UL, BzImage.Parse(new BzImageBuilder { PrefAddress = 0 }.Build(), Name).LoadAddress);
        Assert.Equal(0x100000UL, BzImage.Parse(new BzImageBuilder { PrefAddress = 0, KernelAlignment = 0x1000 }.Build(), Name).LoadAddress);
    }

    [Fact]
    public void FixedKernelGoesAtPrefAddressExactly()
    {
        var image = BzImage.Parse(new BzImageBuilder { Relocatable = false, PrefAddress = 0x1100000 }.Build(), Name);
        Assert.Equal(0x1100000UL, image.LoadAddress);
        Assert.Equal(0x1100200UL, image.EntryPoint);
    }

    [Fact]
    public void FixedKernelBelow1MiBIsRefused()
    {
        var e = Fails(new BzImageBuilder { Relocatable = false, PrefAddress = 0x10000 }.Build());
        Assert.Contains("pref_address 0x10000", e.Message);
        Assert.Contains("not relocatable", e.Message);
    }

    [Fact]
    public void KernelEndingAbove4GiBIsRefused()
    {
        var e = Fails(new BzImageBuilder { PrefAddress = 0xffe0_0000, InitSize = 0x400000 }.Build());
        Assert.Contains("above 4 GiB", e.Message);
    }

    [Fact]
    public void ReadNamesAMissingFile()
    {
        var e = Assert.Throws<BootException>(() => BzImage.Read("/nonexistent/bzImage"));
        Assert.Contains("/nonexistent/bzImage", e.Message);
        Assert.Contains("no such file", e.Message);
    }

    /// <summary>Random mutations of a valid image are either accepted or refused with a BootException.</summary>
    [Fact]
    public void MutatedImagesOnlyEverThrowBootException()
    {
        var valid = new BzImageBuilder { KernelSize = 0x100 }.Build();
        var rng = new Random(1234);
        int accepted = 0;
        for (int i = 0; i < 5000; i++)
        {
            var f = (byte[])valid.Clone();
            int n = rng.Next(1, 4);
            for (int j = 0; j < n; j++)
            {
                // Mostly header bytes, sometimes anywhere.
                int at = rng.Next(4) == 0 ? rng.Next(f.Length) : rng.Next(0x1f1, 0x26c);
                f[at] = (byte)rng.Next(256);
            }
            if (rng.Next(8) == 0)
                f = f[..rng.Next(f.Length)];
            try
            {
                var image = BzImage.Parse(f, Name);
                Assert.True(image.KernelOffset + image.KernelLength <= f.Length);
                Assert.True(image.KernelEnd <= 0x1_0000_0000UL);
                Assert.True(image.LoadAddress >= 0x100000);
                accepted++;
            }
            catch (BootException e)
            {
                Assert.Contains(Name, e.Message);
            }
        }
        Assert.True(accepted > 0);
    }

    private static byte[] RandomBytes(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        // Make sure a random file does not happen to carry the boot flag.
        if (BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(0x1fe)) == 0xaa55)
            b[0x1fe] = 0;
        return b;
    }
}
