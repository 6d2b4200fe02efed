using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// snapshot, commit, rebase, convert and resize through vmctl, each checked against what qemu-img
/// does on the same inputs: same guest-visible content (qemu-img compare) and clean images.
/// </summary>
public class VmctlDiskOperationTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(120);
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-diskops-").FullName;

    public void Dispose()
    {
        foreach (var f in Directory.GetFiles(_dir))
            File.SetUnixFileMode(f, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        Directory.Delete(_dir, recursive: true);
    }

    private static void Require()
    {
        if (!File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.Vmctl} is missing (run 'make' first)");
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
    }

    private string P(string name) => Path.Combine(_dir, name);

    private static void Ok(ProcessResult r, string what) =>
        Assert.True(r.ExitCode == 0, $"{what} failed with {r.ExitCode}: {r.Stdout}{r.Stderr}");

    private void Vmctl(params string[] args) => Ok(TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Timeout), "vmctl " + string.Join(' ', args));
    private ProcessResult QemuImg(params string[] args) => TestEnvironment.RunProcess("qemu-img", args, Timeout);
    private void Io(string file, params string[] commands)
    {
        var args = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(file);
        Ok(TestEnvironment.RunProcess("qemu-io", args, Timeout), "qemu-io " + string.Join(' ', commands));
    }

    private void AssertSame(string a, string b)
    {
        var r = QemuImg("compare", a, b);
        Assert.True(r.ExitCode == 0, $"{a} and {b} differ: {r.Stdout}{r.Stderr}");
    }

    private void AssertClean(string path)
    {
        var r = QemuImg("check", path);
        Assert.True(r.ExitCode == 0, $"qemu-img check {path}: {r.Stdout}{r.Stderr}");
    }

    // base (A) <- mid (B) <- top (C), with overlapping writes, zeroes and an unwritten tail.
    private void MakeChain(string prefix)
    {
        Ok(QemuImg("create", "-f", "qcow2", P(prefix + "base.qcow2"), "16M"), "create base");
        Io(P(prefix + "base.qcow2"), "write -P 0x11 0 4M", "write -P 0x12 8M 1M");
        Ok(QemuImg("create", "-f", "qcow2", "-b", prefix + "base.qcow2", "-F", "qcow2", P(prefix + "mid.qcow2")), "create mid");
        Io(P(prefix + "mid.qcow2"), "write -P 0x21 1M 1M", "write -z 2M 512k", "write -P 0x22 8704k 100k");
        Ok(QemuImg("create", "-f", "qcow2", "-b", prefix + "mid.qcow2", "-F", "qcow2", P(prefix + "top.qcow2")), "create top");
        Io(P(prefix + "top.qcow2"), "write -P 0x31 1536k 1M", "write -z 3M 64k", "write -P 0x32 12M 4k");
    }

    [SkippableFact]
    public void CommitAgreesWithQemuImgCommit()
    {
        Require();
        MakeChain("ours-");
        MakeChain("qemu-");
        Ok(QemuImg("convert", "-O", "raw", P("ours-top.qcow2"), P("expected.raw")), "flatten");

        Vmctl("disk", "commit", P("ours-top.qcow2"));
        Ok(QemuImg("commit", P("qemu-top.qcow2")), "qemu-img commit");

        Assert.False(File.Exists(P("ours-top.qcow2")), "the committed child is dropped");
        AssertClean(P("ours-mid.qcow2"));
        AssertSame(P("ours-mid.qcow2"), P("qemu-mid.qcow2"));
        AssertSame(P("ours-mid.qcow2"), P("expected.raw"));
    }

    [SkippableFact]
    public void SafeRebaseKeepsContentAndAgreesWithQemuImg()
    {
        Require();
        MakeChain("ours-");
        MakeChain("qemu-");
        Ok(QemuImg("convert", "-O", "raw", P("ours-top.qcow2"), P("expected.raw")), "flatten");

        // Drop the middle layer: top now backs directly onto base.
        Vmctl("disk", "rebase", P("ours-top.qcow2"), "--backing", "ours-base.qcow2");
        Ok(QemuImg("rebase", "-b", "qemu-base.qcow2", "-F", "qcow2", P("qemu-top.qcow2")), "qemu-img rebase");

        AssertClean(P("ours-top.qcow2"));
        AssertSame(P("ours-top.qcow2"), P("expected.raw"));
        AssertSame(P("ours-top.qcow2"), P("qemu-top.qcow2"));
        var info = QemuImg("info", P("ours-top.qcow2")).Stdout;
        Assert.Contains("backing file: ours-base.qcow2", info);

        // Rebase onto nothing: the image stands alone with the same content.
        Vmctl("disk", "rebase", P("ours-top.qcow2"));
        AssertSame(P("ours-top.qcow2"), P("expected.raw"));
        Assert.DoesNotContain("backing file", QemuImg("info", P("ours-top.qcow2")).Stdout);
    }

    [SkippableFact]
    public void UnsafeRebaseOnlyRenames()
    {
        Require();
        MakeChain("");
        File.Copy(P("mid.qcow2"), P("mid-copy.qcow2"));
        Ok(QemuImg("convert", "-O", "raw", P("top.qcow2"), P("expected.raw")), "flatten");
        long before = new FileInfo(P("top.qcow2")).Length;
        Vmctl("disk", "rebase", "--unsafe", P("top.qcow2"), "--backing", "mid-copy.qcow2");
        Assert.Equal(before, new FileInfo(P("top.qcow2")).Length);
        Assert.Contains("backing file: mid-copy.qcow2", QemuImg("info", P("top.qcow2")).Stdout);
        AssertSame(P("top.qcow2"), P("expected.raw"));
        AssertClean(P("top.qcow2"));
    }

    [SkippableFact]
    public void ConvertBothWaysAgreesWithQemuImgAndStaysSparse()
    {
        Require();
        MakeChain("");
        Vmctl("disk", "convert", P("top.qcow2"), P("ours.raw"), "--format", "raw");
        Ok(QemuImg("convert", "-O", "raw", P("top.qcow2"), P("qemu.raw")), "qemu-img convert");
        AssertSame(P("ours.raw"), P("qemu.raw"));
        // 16 MiB virtual, about 7 MiB of data: the zero ranges were not written.
        Assert.True(new FileInfo(P("ours.raw")).Length == 16L << 20);
        var du = TestEnvironment.RunProcess("du", ["-k", P("ours.raw")], Timeout).Stdout.Split('\t')[0];
        Assert.True(long.Parse(du) < 12 * 1024, $"ours.raw uses {du} KiB on disk");

        Vmctl("disk", "convert", P("ours.raw"), P("back.qcow2"), "--cluster-size", "4K");
        AssertClean(P("back.qcow2"));
        AssertSame(P("back.qcow2"), P("qemu.raw"));
        Assert.DoesNotContain("backing file", QemuImg("info", P("back.qcow2")).Stdout);
    }

    [SkippableFact]
    public void SnapshotMakesTheParentReadOnlyAndTheChildTakesWrites()
    {
        Require();
        Ok(QemuImg("create", "-f", "qcow2", P("disk.qcow2"), "8M"), "create");
        Io(P("disk.qcow2"), "write -P 0x44 0 1M");
        Vmctl("disk", "snapshot", P("disk.qcow2"), P("disk-1.qcow2"));
        Assert.Equal((UnixFileMode)0, File.GetUnixFileMode(P("disk.qcow2")) & (UnixFileMode.UserWrite | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite));
        Assert.Contains("backing file: disk.qcow2", QemuImg("info", P("disk-1.qcow2")).Stdout);
        Io(P("disk-1.qcow2"), "write -P 0x55 512k 4k", "read -P 0x44 0 512k", "read -P 0x55 512k 4k");
        AssertClean(P("disk-1.qcow2"));
        Io(P("disk.qcow2"), "read -P 0x44 512k 4k"); // the parent kept its data

        // Commit folds the child back, even though the parent's file mode is read-only.
        Vmctl("disk", "commit", P("disk-1.qcow2"));
        Io(P("disk.qcow2"), "read -P 0x55 512k 4k");
        AssertClean(P("disk.qcow2"));
    }

    [SkippableFact]
    public void ResizeGrowsAndQemuImgSeesTheNewSize()
    {
        Require();
        Ok(QemuImg("create", "-f", "qcow2", "-o", "cluster_size=512", P("small.qcow2"), "1M"), "create");
        Io(P("small.qcow2"), "write -P 0x66 1000 3000");
        // 512-byte clusters: each L1 entry maps 32 KiB, so 64 MiB needs a larger L1 table.
        Vmctl("disk", "resize", P("small.qcow2"), "64M");
        Vmctl("disk", "resize", P("small.qcow2"), "+1M");
        Assert.Contains("virtual size: 65 MiB", QemuImg("info", P("small.qcow2")).Stdout);
        AssertClean(P("small.qcow2"));
        Io(P("small.qcow2"), "read -P 0x66 1000 3000", "read -P 0 60M 1M", "write -P 0x77 64M 1M", "read -P 0x77 64M 1M");
        AssertClean(P("small.qcow2"));

        Ok(QemuImg("create", "-f", "raw", P("r.raw"), "1M"), "create raw");
        Vmctl("disk", "resize", P("r.raw"), "3M");
        Assert.Equal(3L << 20, new FileInfo(P("r.raw")).Length);
        var shrink = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["disk", "resize", P("r.raw"), "1M"], Timeout);
        Assert.Equal(1, shrink.ExitCode);
        Assert.Contains("shrinking", shrink.Stderr);
    }
}
