using System.Security.Cryptography;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// What the virtio-blk integration tests share: a private folder, images made by qemu-img, runs
/// of the guest kit on this VMM, and qemu-img as the judge of what the guest wrote.
/// </summary>
public abstract class BlkTestBase : IDisposable
{
    protected static readonly TimeSpan Timeout = TimeSpan.FromSeconds(120);
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-blk-").FullName;

    public void Dispose()
    {
        Directory.Delete(_dir, recursive: true);
        GC.SuppressFinalize(this);
    }

    protected string P(string name) => Path.Combine(_dir, name);

    protected static void Require()
    {
        GuestKitRunner.Require();
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
    }

    protected static ProcessResult QemuImg(params string[] args) => TestEnvironment.RunProcess("qemu-img", args, Timeout);

    /// <summary>A new image in the folder; with <paramref name="backing"/>, a qcow2 child of it.</summary>
    protected string CreateImage(string name, string format, string size = "64M", string? backing = null)
    {
        var args = new List<string> { "create", "-q", "-f", format };
        if (backing is not null)
            args.AddRange(["-b", backing, "-F", "qcow2"]);
        args.Add(P(name));
        if (backing is null)
            args.Add(size);
        var r = QemuImg([.. args]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        return P(name);
    }

    protected static (VmStopReason Reason, SerialCapture Serial) RunOurs(string cmdline, params DiskSpec[] disks) =>
        GuestKitRunner.Run(GuestKitRunner.Spec(cmdline) with { Disks = disks }, Timeout);

    /// <summary>The guest exited 0 and printed a line starting with <paramref name="okPrefix"/>.</summary>
    protected static void AssertGuestOk((VmStopReason Reason, SerialCapture Serial) run, string okPrefix)
    {
        Assert.True(run.Reason is DebugExitStop { Status: 0 }, $"guest ended with {run.Reason.Describe()}; console:\n{run.Serial.Text}");
        Assert.Contains(run.Serial.Lines, l => l.StartsWith(okPrefix, StringComparison.Ordinal));
    }

    protected static void AssertQemuImgSame(string image, string reference)
    {
        var r = QemuImg("compare", "-F", "raw", image, reference);
        Assert.True(r.ExitCode == 0, $"qemu-img compare {image} {reference}: {r.Stdout}{r.Stderr}");
    }

    protected static void AssertCheckClean(string qcow2)
    {
        var r = QemuImg("check", qcow2);
        Assert.True(r.ExitCode == 0, $"qemu-img check {qcow2}: {r.Stdout}{r.Stderr}");
    }

    protected static string Sha256(string path)
    {
        using var f = File.OpenRead(path);
        return Convert.ToHexString(SHA256.HashData(f));
    }

    /// <summary>
    /// The ranges most tests write: three 1 MiB ranges 5 MiB apart from 192 KiB. They cross 64 KiB
    /// cluster boundaries and leave gaps that must stay zero.
    /// </summary>
    protected const string Ranges = "start=192K size=1M count=3 stride=5M";

    /// <summary>Writes what <see cref="Ranges"/> with <paramref name="seed"/> puts on a disk into a raw reference.</summary>
    protected static void WriteReferenceRanges(string raw, ulong seed)
    {
        for (int i = 0; i < 3; i++)
            BlkPattern.WriteRange(raw, seed, (192UL << 10) + (ulong)i * (5UL << 20), 1UL << 20);
    }
}
