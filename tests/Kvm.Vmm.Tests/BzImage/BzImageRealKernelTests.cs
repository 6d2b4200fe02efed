using Kvm.Hypervisor;
using Kvm.Tests.Shared;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

/// <summary>
/// Debian's cloud kernel, as 'make linux' leaves it in build/linux (override the file with
/// KVM_TEST_BZIMAGE). Skipped, naming the missing file, when it has not been fetched.
/// </summary>
public class BzImageRealKernelTests
{
    private const ulong MiB = 1UL << 20;

    private static string LinuxDir => Path.Combine(TestEnvironment.BuildDir, "linux");

    private static string BzImagePath =>
        Environment.GetEnvironmentVariable("KVM_TEST_BZIMAGE") is { Length: > 0 } p ? p : Path.Combine(LinuxDir, "bzImage");

    private static byte[] RequireFile(string path)
    {
        Skip.IfNot(File.Exists(path), $"{path} is missing (run 'make linux', which fetches Debian's linux-image-cloud-amd64)");
        return File.ReadAllBytes(path);
    }

    [SkippableFact]
    public void DebianBzImageIsParsed()
    {
        var file = RequireFile(BzImagePath);
        Assert.True(BzImage.IsBzImage(file));

        var image = BzImage.Parse(file, BzImagePath);

        Assert.True(image.Protocol >= 0x020c, $"protocol {image.ProtocolText}");
        Assert.Equal(BzImage.XlfKernel64, image.XLoadFlags & BzImage.XlfKernel64);
        Assert.True(image.Relocatable);
        Assert.Equal(BzImage.LoadedHigh, image.LoadFlags & BzImage.LoadedHigh);
        Assert.True(image.LoadAddress >= 0x100000);
        Assert.Equal(0UL, image.LoadAddress % image.KernelAlignment);
        Assert.True(image.InitSize > (ulong)image.KernelLength, "init_size covers at least the compressed kernel");
        Assert.True(image.CmdlineSize >= 255);
        Assert.True(image.KernelOffset + image.KernelLength <= file.Length);
        // startup_64 begins with cld; cli.
        Assert.Equal(new byte[] { 0xfc, 0xfa }, file.AsSpan(image.KernelOffset + 0x200, 2).ToArray());
    }

    [SkippableFact]
    public void DebianVmlinuxIsNotABzImage()
    {
        var path = Path.Combine(LinuxDir, "vmlinux");
        Skip.IfNot(File.Exists(path), $"{path} is missing (run 'make linux')");
        using var f = File.OpenRead(path);
        var head = new byte[4096];
        f.ReadExactly(head);
        Assert.False(BzImage.IsBzImage(head));
    }

    [SkippableFact]
    public void DebianBzImageLoadsInto512MiBWithItsInitramfs()
    {
        var file = RequireFile(BzImagePath);
        var initrdPath = Path.Combine(LinuxDir, "initramfs.cpio.gz");
        var initrd = RequireFile(initrdPath);
        var image = BzImage.Parse(file, BzImagePath);
        using var m = GuestMemory.Create(X86Layout.RamRanges(512 * MiB));
        var map = PvhBoot.MemoryMap(m);

        var info = BzBoot.Load(m, image, file, "console=ttyS0 earlyprintk=ttyS0 nokaslr", initrd, map, initrdName: initrdPath);

        Assert.Equal(image.LoadAddress + 0x200, info.EntryPoint);
        Assert.Equal(0xfc, m.ReadU8(info.EntryPoint));
        Assert.Equal(0xfa, m.ReadU8(info.EntryPoint + 1));
        Assert.True(info.InitrdAddress >= info.KernelEnd);
        Assert.True(info.InitrdAddress + info.InitrdSize <= 512 * MiB);
        Assert.True(info.InitrdAddress + info.InitrdSize - 1 <= image.InitrdAddrMax);
        Assert.Equal(0UL, info.InitrdAddress % 4096);
        Assert.Equal(initrd, m.GetSpan(info.InitrdAddress, initrd.Length).ToArray());
        Assert.Equal(image.Protocol, m.ReadU16(info.ZeroPage + 0x206));
        Assert.Equal(0xff, m.ReadU8(info.ZeroPage + 0x210));
    }
}
