using System.Buffers.Binary;
using Kvm.Storage;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;

namespace Kvm.Storage.Tests;

/// <summary>The consistency check agrees with qemu-img check on clean, leaking and corrupt images.</summary>
public class Qcow2CheckTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-check-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string NewImage(int clusterSize = 65536)
    {
        string path = System.IO.Path.Combine(_dir, $"i{Guid.NewGuid():N}.qcow2");
        using var q = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 16UL << 20, ClusterSize = clusterSize });
        var data = new byte[3 * clusterSize + 100];
        new Random(1).NextBytes(data);
        q.Write(12345, data);
        q.WriteZeroes((ulong)clusterSize * 8, (ulong)clusterSize * 2);
        return path;
    }

    private static int QemuCheck(string path, out string output, bool repair = false)
    {
        var r = TestEnvironment.RunProcess("qemu-img", repair ? ["check", "-r", "leaks", path] : ["check", path], TimeSpan.FromSeconds(60));
        output = r.Stdout + r.Stderr;
        return r.ExitCode;
    }

    // Finds the L2 table and the host cluster of guest cluster 0 by reading the file as the spec says.
    private static (ulong L2Offset, ulong DataOffset) FirstMapping(string path)
    {
        var bytes = File.ReadAllBytes(path);
        ulong l1 = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        ulong l2 = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)l1)) & 0x00ff_ffff_ffff_fe00;
        ulong data = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)l2)) & 0x00ff_ffff_ffff_fe00;
        return (l2, data);
    }

    [SkippableTheory]
    [InlineData(512)]
    [InlineData(65536)]
    public void CleanImageIsCleanToBoth(int clusterSize)
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        string path = NewImage(clusterSize);
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
        {
            var result = q.Check();
            Assert.True(result.IsClean, string.Join('\n', result.Problems));
            Assert.Equal(0, result.ExitStatus);
        }
        Assert.Equal(0, QemuCheck(path, out var output));
        Assert.Contains("No errors were found", output);
    }

    [SkippableFact]
    public void LeakedClusterIsFoundAndRepaired()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        string path = NewImage();
        // Drop the L2 entry of guest cluster 0: its data cluster keeps refcount 1 with no reference.
        var (l2, data) = FirstMapping(path);
        using (var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite))
            RandomAccess.Write(f, new byte[8], (long)l2);

        Assert.Equal(3, QemuCheck(path, out var before));
        Assert.Contains("1 leaked clusters", before);
        using (var q = Qcow2Image.Open(path))
        {
            var found = q.Check();
            Assert.Equal(0, found.Corruptions);
            Assert.Equal(1, found.Leaks);
            Assert.Contains(found.Problems, p => p.Contains($"Leaked cluster {data / 65536}"));
            Assert.Equal(3, found.ExitStatus);

            var repaired = q.Check(repairLeaks: true);
            Assert.Equal(1, repaired.LeaksFixed);
            Assert.True(q.Check().IsClean);
        }
        Assert.Equal(0, QemuCheck(path, out var after));
    }

    [SkippableFact]
    public void UndercountedClusterIsACorruptionToBoth()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        string path = NewImage();
        // Point guest cluster 100's L2 entry at guest cluster 0's data: that cluster is now referenced
        // twice with refcount 1.
        var (l2, data) = FirstMapping(path);
        var entry = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(entry, data);
        using (var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite))
            RandomAccess.Write(f, entry, (long)l2 + 100 * 8);

        Assert.Equal(2, QemuCheck(path, out _));
        using var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
        var result = q.Check();
        Assert.True(result.Corruptions >= 1);
        Assert.Contains(result.Problems, p => p.Contains($"ERROR cluster {data / 65536} refcount=1 reference=2"));
        Assert.Equal(2, result.ExitStatus);
    }

    [SkippableFact]
    public void ImageWithInternalSnapshotIsCheckedThroughTheSnapshotTables()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
        string path = System.IO.Path.Combine(_dir, "snap.qcow2");
        Assert.Equal(0, TestEnvironment.RunProcess("qemu-img", ["create", "-f", "qcow2", path, "8M"], TimeSpan.FromSeconds(30)).ExitCode);
        TestEnvironment.RunProcess("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 256k", path], TimeSpan.FromSeconds(30));
        Assert.Equal(0, TestEnvironment.RunProcess("qemu-img", ["snapshot", "-c", "s1", path], TimeSpan.FromSeconds(30)).ExitCode);
        TestEnvironment.RunProcess("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 64k 64k", path], TimeSpan.FromSeconds(30));

        using (var q = Qcow2Image.Open(path))
        {
            Assert.True(q.Check().IsClean, string.Join('\n', q.Check().Problems));
            // Writing into clusters shared with the snapshot copies them; the snapshot keeps its data.
            var data = new byte[4096];
            Array.Fill(data, (byte)0x33);
            q.Write(128 * 1024, data);
            var result = q.Check();
            Assert.True(result.IsClean, string.Join('\n', result.Problems));
        }
        Assert.Equal(0, QemuCheck(path, out var output));
        var r = TestEnvironment.RunProcess("qemu-io", ["-f", "qcow2", "-c", "read -P 0x33 128k 4k", "-c", "read -P 0x11 0 64k", path], TimeSpan.FromSeconds(30));
        Assert.DoesNotContain("Pattern verification failed", r.Stdout + r.Stderr);
    }
}
