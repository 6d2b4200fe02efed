using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>The guest kit is a standard PVH ELF: QEMU boots the same file and sees the same output.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class QemuOracleTests
{
    private static ProcessResult Qemu(string cmdline, params string[] extra)
    {
        string[] args =
        [
            "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-m", "256M", "-no-reboot",
            "-kernel", TestEnvironment.GuestKit, "-append", cmdline, .. extra,
        ];
        return TestEnvironment.RunProcess("qemu-system-x86_64", args, TimeSpan.FromSeconds(60));
    }

    private static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        TestEnvironment.RequireProgram("qemu-system-x86_64", "qemu-system-x86");
    }

    [SkippableFact]
    public void QemuPrintsTheSameHelloLine()
    {
        Require();
        var qemu = Qemu("hello");
        Assert.Equal(1, qemu.ExitCode); // isa-debug-exit: status*2+1
        var (_, ours) = GuestKitRunner.Run(GuestKitRunner.Spec("hello"));
        Assert.Contains("guestkit: hello", qemu.Stdout.Split('\n').Select(l => l.TrimEnd('\r')));
        Assert.Equal(ours.Text, qemu.Stdout.Replace("\r", ""));
    }

    [SkippableFact]
    public void QemuAndThisVmmAgreeOnCountAndDirty()
    {
        Require();
        foreach (var cmd in new[] { "count n=1000000", "dirty size=16M passes=2", "exit code=5" })
        {
            var qemu = Qemu(cmd);
            var (reason, ours) = GuestKitRunner.Run(GuestKitRunner.Spec(cmd));
            Assert.Equal(ours.Text, qemu.Stdout.Replace("\r", ""));
            var status = Assert.IsType<Kvm.Vmm.Exits.DebugExitStop>(reason).Status;
            Assert.Equal(status * 2 + 1, qemu.ExitCode);
        }
    }
}
