using Kvm.Hypervisor;
using Kvm.Vmm.Machine;

namespace Kvm.Vmm.Tests;

public class VmSpecTests
{
    [Theory]
    [InlineData("4096", 4096UL)]
    [InlineData("0", 0UL)]
    [InlineData("64K", 64UL << 10)]
    [InlineData("64k", 64UL << 10)]
    [InlineData("256M", 256UL << 20)]
    [InlineData("2G", 2UL << 30)]
    [InlineData("1T", 1UL << 40)]
    [InlineData("1GiB", 1UL << 30)]
    [InlineData("512MB", 512UL << 20)]
    [InlineData("512mb", 512UL << 20)]
    [InlineData("64KiB", 64UL << 10)]
    [InlineData(" 8M ", 8UL << 20)]
    public void ParseSizeReadsBinaryUnits(string text, ulong expected)
    {
        Assert.Equal(expected, VmSpec.ParseSize(text));
    }

    [Theory]
    [InlineData("")]
    [InlineData("   ")]
    [InlineData("12X")]
    [InlineData("-1")]
    [InlineData("+5M")]
    [InlineData("1.5G")]
    [InlineData("G")]
    [InlineData("MB")]
    [InlineData("0x1000")]
    [InlineData("1 G")]
    [InlineData("99999999999999G")]
    [InlineData("18446744073709551616")] // 2^64
    [InlineData("16777216T")]            // 2^64 bytes
    public void ParseSizeRejectsWhatIsNotASize(string text)
    {
        var e = Assert.Throws<FormatException>(() => VmSpec.ParseSize(text));
        Assert.Contains($"'{text}'", e.Message);
    }

    [Fact]
    public void ParseSizeNamesOverflowAsTooLarge()
    {
        var e = Assert.Throws<FormatException>(() => VmSpec.ParseSize("99999999999999G"));
        Assert.Contains("too large", e.Message);
    }

    [Fact]
    public void ParseSizeAcceptsTheLargestValueThatFits()
    {
        Assert.Equal(16777215UL << 40, VmSpec.ParseSize("16777215T"));
        Assert.Equal(ulong.MaxValue, VmSpec.ParseSize("18446744073709551615"));
    }

    private static VmSpec Spec(int cpus = 1, ulong memory = 64UL << 20, HugePageMode huge = HugePageMode.None) =>
        new() { Kernel = "/boot/vmlinux", Cpus = cpus, MemoryBytes = memory, HugePages = huge };

    [Theory]
    [InlineData(1, 2UL << 20)]
    [InlineData(255, 256UL << 20)]
    [InlineData(4, (2UL << 20) + 4096)]
    public void ValidSpecsPass(int cpus, ulong memory)
    {
        Spec(cpus, memory).Validate();
    }

    [Fact]
    public void DefaultSpecIsValid()
    {
        var spec = new VmSpec { Kernel = "k" };
        spec.Validate();
        Assert.Equal(1, spec.Cpus);
        Assert.Equal(256UL << 20, spec.MemoryBytes);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(256)]
    [InlineData(-1)]
    public void CpuCountOutOfRangeIsRefused(int cpus)
    {
        var e = Assert.Throws<ArgumentException>(() => Spec(cpus: cpus).Validate());
        Assert.Contains($"cpus {cpus}", e.Message);
    }

    [Theory]
    [InlineData(0UL, "0 bytes")]
    [InlineData(1UL << 20, "1 MiB")]
    public void MemoryBelowTheMinimumIsRefused(ulong memory, string shown)
    {
        var e = Assert.Throws<ArgumentException>(() => Spec(memory: memory).Validate());
        Assert.Contains($"memory {shown}", e.Message);
        Assert.Contains("2 MiB", e.Message);
    }

    [Fact]
    public void MemoryJustBelowTheMinimumIsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() => Spec(memory: (2UL << 20) - 4096).Validate());
        Assert.Contains("memory", e.Message);
        Assert.Contains("below the minimum of 2 MiB", e.Message);
    }

    [Fact]
    public void MemoryJustBelowTheMinimumIsShownExactly()
    {
        var e = Assert.Throws<ArgumentException>(() => Spec(memory: (2UL << 20) - 4096).Validate());
        Assert.Contains("2093056", e.Message);
    }

    [Theory]
    [InlineData((64UL << 20) + 1)]
    [InlineData((64UL << 20) + 2048)]
    public void MemoryNotAPageMultipleIsRefused(ulong memory)
    {
        var e = Assert.Throws<ArgumentException>(() => Spec(memory: memory).Validate());
        Assert.Contains("memory", e.Message);
        Assert.Contains(memory.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message);
        Assert.Contains("4096", e.Message);
    }

    [Fact]
    public void HugePageMemoryMustBeAMultipleOf2MiB()
    {
        var e = Assert.Throws<ArgumentException>(() => Spec(memory: 3UL << 20, huge: HugePageMode.HugeTlb).Validate());
        Assert.Contains("memory", e.Message);
        Assert.Contains("2 MiB", e.Message);
        Spec(memory: 4UL << 20, huge: HugePageMode.HugeTlb).Validate();
    }

    [Theory]
    [InlineData("")]
    [InlineData("  ")]
    public void MissingKernelIsRefused(string kernel)
    {
        var e = Assert.Throws<ArgumentException>(() => (Spec() with { Kernel = kernel }).Validate());
        Assert.Contains("kernel", e.Message);
    }

    [Fact]
    public void JsonRoundTripKeepsEveryField()
    {
        var spec = new VmSpec
        {
            Kernel = "/srv/guest/vmlinux",
            Cmdline = "console=ttyS0 quiet \"x\"",
            MemoryBytes = 3UL << 30,
            Cpus = 4,
            DebugExit = true,
            HugePages = HugePageMode.Transparent,
            TrackDirtyPages = true,
        };

        string json = VmSpecJsonContext.Format(spec);
        var back = VmSpecJsonContext.Parse(json, "test.json");

        Assert.Equal(spec, back);
        Assert.Contains("\"memoryBytes\"", json);
        Assert.Contains("\"Transparent\"", json);
    }

    [Fact]
    public void JsonWithOnlyTheKernelGetsDefaults()
    {
        var spec = VmSpecJsonContext.Parse("""{ "kernel": "k.elf" }""", "min.json");
        Assert.Equal(new VmSpec { Kernel = "k.elf" }, spec);
    }

    [Fact]
    public void JsonReadsEnumsAsStrings()
    {
        var spec = VmSpecJsonContext.Parse("""{ "kernel": "k", "hugePages": "HugeTlb", "cpus": 2 }""", "s.json");
        Assert.Equal(HugePageMode.HugeTlb, spec.HugePages);
        Assert.Equal(2, spec.Cpus);
    }

    [Fact]
    public void JsonWithAnUnknownFieldIsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            VmSpecJsonContext.Parse("""{ "kernel": "k", "memoryByte": 1048576 }""", "typo.json"));
        Assert.Contains("typo.json", e.Message);
        Assert.Contains("memoryByte", e.Message);
    }

    [Fact]
    public void JsonWithoutTheKernelIsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() => VmSpecJsonContext.Parse("""{ "cpus": 2 }""", "nokernel.json"));
        Assert.Contains("nokernel.json", e.Message);
    }

    [Theory]
    [InlineData("null")]
    [InlineData("[1]")]
    [InlineData("{ \"kernel\": ")]
    [InlineData("{ \"kernel\": \"k\", \"cpus\": \"two\" }")]
    public void MalformedJsonIsRefusedWithArgumentException(string json)
    {
        var e = Assert.Throws<ArgumentException>(() => VmSpecJsonContext.Parse(json, "bad.json"));
        Assert.Contains("bad.json", e.Message);
    }
}
