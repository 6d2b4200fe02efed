using System.Text.Json;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>vmctl disk as a user runs it, with qemu-img as the judge.</summary>
public class VmctlDiskTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-disk-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static void Require()
    {
        if (!File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.Vmctl} is missing (run 'make' first)");
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
    }

    private ProcessResult Vmctl(params string[] args) => TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Timeout);
    private ProcessResult QemuImg(params string[] args) => TestEnvironment.RunProcess("qemu-img", args, Timeout);
    private string P(string name) => Path.Combine(_dir, name);

    [SkippableFact]
    public void CreateMakesImagesQemuImgAccepts()
    {
        Require();
        var r = Vmctl("disk", "create", P("a.qcow2"), "--size", "1G", "--cluster-size", "4K");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal(0, QemuImg("check", P("a.qcow2")).ExitCode);
        using var info = JsonDocument.Parse(QemuImg("info", "--output=json", P("a.qcow2")).Stdout);
        Assert.Equal(1L << 30, info.RootElement.GetProperty("virtual-size").GetInt64());
        Assert.Equal(4096, info.RootElement.GetProperty("cluster-size").GetInt32());

        Assert.Equal(0, Vmctl("disk", "create", P("b.raw"), "--format", "raw", "--size", "10M").ExitCode);
        using var raw = JsonDocument.Parse(QemuImg("info", "--output=json", P("b.raw")).Stdout);
        Assert.Equal("raw", raw.RootElement.GetProperty("format").GetString());
        Assert.Equal(10L << 20, raw.RootElement.GetProperty("virtual-size").GetInt64());
    }

    [SkippableFact]
    public void InfoAndMapShowTheBackingChain()
    {
        Require();
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
        Assert.Equal(0, Vmctl("disk", "create", P("base.qcow2"), "--size", "8M").ExitCode);
        TestEnvironment.RunProcess("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 128k", P("base.qcow2")], Timeout);
        Assert.Equal(0, Vmctl("disk", "create", P("top.qcow2"), "--backing", "base.qcow2").ExitCode);
        TestEnvironment.RunProcess("qemu-io", ["-f", "qcow2", "-c", "write -P 2 64k 128k", P("top.qcow2")], Timeout);

        var info = Vmctl("disk", "info", "--json", P("top.qcow2"));
        Assert.Equal(0, info.ExitCode);
        using (var doc = JsonDocument.Parse(info.Stdout))
        {
            Assert.Equal(8L << 20, doc.RootElement.GetProperty("virtualSize").GetInt64()); // taken from the backing image
            Assert.Equal("base.qcow2", doc.RootElement.GetProperty("backingFile").GetString());
            Assert.Equal(P("base.qcow2"), doc.RootElement.GetProperty("backing").GetProperty("path").GetString());
        }
        var text = Vmctl("disk", "info", P("top.qcow2"));
        Assert.Contains("backing file: base.qcow2", text.Stdout);
        Assert.Contains($"image: {P("base.qcow2")}", text.Stdout);

        // Our map and qemu-img's agree on which layer holds each range.
        var ours = JsonDocument.Parse(Vmctl("disk", "map", "--json", P("top.qcow2")).Stdout).RootElement.EnumerateArray()
            .Where(e => e.GetProperty("kind").GetString() == "data")
            .Select(e => (e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("depth").GetInt32())).ToList();
        var theirs = JsonDocument.Parse(QemuImg("map", "--output=json", P("top.qcow2")).Stdout).RootElement.EnumerateArray()
            .Where(e => e.GetProperty("data").GetBoolean())
            .Select(e => (e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("depth").GetInt32())).ToList();
        Assert.Equal(theirs, ours);
        Assert.Equal([(0L, 64L << 10, 1), (64L << 10, 128L << 10, 0)], ours);
    }

    [SkippableFact]
    public void CheckReportsLeaksAndRepairsThem()
    {
        Require();
        Assert.Equal(0, Vmctl("disk", "create", P("c.qcow2"), "--size", "8M").ExitCode);
        var clean = Vmctl("disk", "check", P("c.qcow2"));
        Assert.Equal(0, clean.ExitCode);
        Assert.Contains("No errors were found on the image.", clean.Stdout);

        // A cluster counted but used by nothing: append one and raise its refcount by hand, as a
        // crash between allocation and use would leave it.
        Assert.Equal(0, QemuImg("resize", P("c.qcow2"), "16M").ExitCode); // grows the L1 table: still clean
        long length = new FileInfo(P("c.qcow2")).Length;
        using (var f = File.OpenHandle(P("c.qcow2"), FileMode.Open, FileAccess.ReadWrite))
        {
            RandomAccess.Write(f, new byte[65536], length);
            // The first refcount block is the cluster the refcount table's first entry names.
            var header = new byte[64];
            RandomAccess.Read(f, header, 0);
            long table = (long)System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(48));
            var entry = new byte[8];
            RandomAccess.Read(f, entry, table);
            long block = (long)System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(entry);
            RandomAccess.Write(f, new byte[] { 0, 1 }, block + (length / 65536) * 2);
        }
        Assert.Equal(3, QemuImg("check", P("c.qcow2")).ExitCode);
        var leak = Vmctl("disk", "check", P("c.qcow2"));
        Assert.Equal(3, leak.ExitCode);
        Assert.Contains($"Leaked cluster {length / 65536} refcount=1 reference=0", leak.Stdout);
        var repair = Vmctl("disk", "check", "--repair", P("c.qcow2"));
        Assert.Equal(0, repair.ExitCode);
        Assert.Contains("1 leaked clusters were given back.", repair.Stdout);
        Assert.Equal(0, QemuImg("check", P("c.qcow2")).ExitCode);
    }

    [SkippableFact]
    public void BadInputIsOneLine()
    {
        Require();
        Assert.Equal(0, Vmctl("disk", "create", P("d.qcow2"), "--size", "1M").ExitCode);
        foreach (var (args, expected) in new (string[], string)[]
        {
            (["disk", "create", P("d.qcow2"), "--size", "1M"], "already exists"),
            (["disk", "create", P("e.qcow2")], "--size is required without --backing"),
            (["disk", "create", P("f.qcow2"), "--size", "1M", "--cluster-size", "3K"], "cluster size 3072 is not a power of two"),
            (["disk", "info", P("missing.qcow2")], "no such file"),
            (["disk", "create", P("g.qcow2"), "--backing", "nothere.qcow2"], "no such file"),
        })
        {
            var r = Vmctl(args);
            Assert.Equal(1, r.ExitCode);
            var lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
            Assert.True(lines.Length == 1, $"{string.Join(' ', args)}: {r.Stderr}");
            Assert.Contains(expected, lines[0]);
            Assert.DoesNotContain("   at ", r.Stderr);
        }
    }
}
