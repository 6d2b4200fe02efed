using System.Buffers.Binary;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>
/// Every kind of image qemu-img and qemu-io make here is checked clean by the engine exactly when
/// qemu-img check calls it clean (same exit status: 0, 2 or 3), and the engine's repair never
/// turns an image qemu calls free of corruption into one it calls corrupt.
/// </summary>
public sealed class Qcow2QemuAgreementTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static void Io(string path, params string[] commands) => QemuImg.Io(path, "qcow2", commands);

    /// <summary>Makes one kind of image with qemu-img and qemu-io.</summary>
    private string Make(string kind)
    {
        var path = _dir.File(kind + ".qcow2");
        switch (kind)
        {
            case "bitmaps":
                QemuImg.Create(path, "qcow2", 16 * MiB);
                Io(path, "write -P 0x11 0 1M");
                QemuImg.Run("bitmap", "--add", path, "b0");
                QemuImg.Run("bitmap", "--add", "-g", "512", path, "fine");
                QemuImg.Run("bitmap", "--add", "--disable", path, "off");
                Io(path, "write -P 0x12 4M 64k");
                break;
            case "plain-v2":
                QemuImg.Create(path, "qcow2", 16 * MiB, extraOptions: ["compat=0.10"]);
                Io(path, "write -P 0x11 0 1M");
                break;
            case "snapshot-fresh":
                QemuImg.Create(path, "qcow2", 16 * MiB);
                QemuImg.Snapshot(path, "-c", "s1");
                break;
            case "snapshots-v3":
                QemuImg.Create(path, "qcow2", 16 * MiB);
                Io(path, "write -P 0x11 0 1M");
                QemuImg.Snapshot(path, "-c", "s1");
                Io(path, "write -P 0x22 64k 128k");
                QemuImg.Snapshot(path, "-c", "a-longer-snapshot-name");
                Io(path, "write -P 0x33 8M 64k");
                QemuImg.Snapshot(path, "-c", "s3");
                QemuImg.Snapshot(path, "-d", "a-longer-snapshot-name");
                Io(path, "write -P 0x44 12M 64k");
                break;
            case "snapshots-v2":
                QemuImg.Create(path, "qcow2", 16 * MiB, extraOptions: ["compat=0.10"]);
                Io(path, "write -P 0x11 0 1M");
                QemuImg.Snapshot(path, "-c", "s1");
                Io(path, "write -P 0x22 64k 128k");
                break;
            case "snapshots-and-bitmaps":
                QemuImg.Create(path, "qcow2", 16 * MiB, clusterSize: 4096);
                Io(path, "write -P 0x11 0 1M");
                QemuImg.Snapshot(path, "-c", "s1");
                QemuImg.Run("bitmap", "--add", path, "b0");
                Io(path, "write -P 0x22 512k 8k");
                break;
            case "compressed-zlib":
            case "compressed-zstd":
            {
                var raw = _dir.File(kind + ".raw");
                QemuImg.Create(raw, "raw", 4 * MiB);
                QemuImg.Io(raw, "raw", "write -P 0x41 0 1M", "write -P 0x42 2M 100k");
                QemuImg.Convert(raw, path, "qcow2", "raw", compress: true,
                    extraOptions: [kind.EndsWith("zstd", StringComparison.Ordinal) ? "compression_type=zstd" : "compression_type=zlib"]);
                Io(path, "write -P 0x43 1M 4k");
                break;
            }
            case "lazy-refcounts-killed":
                QemuImg.Create(path, "qcow2", 16 * MiB, extraOptions: ["lazy_refcounts=on"]);
                // qemu-io aborts (SIGABRT) with the dirty bit set and the refcounts not written back.
                var r = TestEnvironment.RunProcess("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "abort", path], TimeSpan.FromMinutes(1));
                Assert.NotEqual(0, r.ExitCode);
                break;
            case "lazy-refcounts-clean":
                QemuImg.Create(path, "qcow2", 16 * MiB, extraOptions: ["lazy_refcounts=on"]);
                Io(path, "write -P 0x11 0 1M");
                break;
            default:
                if (kind.StartsWith("cluster-", StringComparison.Ordinal))
                {
                    int cs = int.Parse(kind["cluster-".Length..], System.Globalization.CultureInfo.InvariantCulture);
                    QemuImg.Create(path, "qcow2", 64 * MiB, clusterSize: cs);
                    Io(path, PatternWrites(64 * MiB, (ulong)cs, 1));
                    QemuImg.Snapshot(path, "-c", "s1");
                    Io(path, "write -P 0x55 0 8k");
                }
                else if (kind.StartsWith("refcount-", StringComparison.Ordinal))
                {
                    int bits = int.Parse(kind["refcount-".Length..], System.Globalization.CultureInfo.InvariantCulture);
                    QemuImg.Create(path, "qcow2", 16 * MiB, extraOptions: [$"refcount_bits={bits}"]);
                    Io(path, "write -P 0x11 0 1M");
                    if (bits > 1) // a snapshot needs refcounts of 2
                    {
                        QemuImg.Snapshot(path, "-c", "s1");
                        Io(path, "write -P 0x22 0 64k");
                    }
                }
                else
                {
                    throw new ArgumentException(kind);
                }
                break;
        }
        return path;
    }

    public static TheoryData<string> Kinds() => new(
        "bitmaps", "plain-v2", "snapshot-fresh", "snapshots-v3", "snapshots-v2", "snapshots-and-bitmaps",
        "compressed-zlib", "compressed-zstd", "lazy-refcounts-killed", "lazy-refcounts-clean",
        "cluster-512", "cluster-4096", "cluster-65536", "cluster-2097152",
        "refcount-1", "refcount-2", "refcount-4", "refcount-8", "refcount-32", "refcount-64");

    [SkippableTheory]
    [MemberData(nameof(Kinds))]
    public void CheckAgreesWithQemu(string kind)
    {
        QemuImg.Require();
        var path = Make(kind);
        AssertAgree(path);
    }

    /// <summary>The same images with one cluster leaked (an L2 entry dropped): both see the leak; the engine's repair leaves qemu nothing to complain about.</summary>
    [SkippableTheory]
    [InlineData("bitmaps")]
    [InlineData("snapshots-v3")]
    [InlineData("snapshots-and-bitmaps")]
    [InlineData("compressed-zlib")]
    [InlineData("cluster-512")]
    [InlineData("refcount-1")]
    public void RepairOfALeakAgreesWithQemu(string kind)
    {
        QemuImg.Require();
        var path = Make(kind);
        var bitmapsBefore = BitmapNames(path);
        var snapshotsBefore = QemuImg.Info(path)[0].SnapshotCount;
        LeakOneCluster(path);
        Assert.Equal(3, AssertAgree(path).ExitCode);

        using (var q = Qcow2Image.Open(path))
        {
            var repaired = q.Check(repairLeaks: true);
            Assert.Null(repaired.RepairRefused);
            Assert.True(repaired.LeaksFixed >= 1, string.Join('\n', repaired.Problems));
            Assert.True(q.Check().IsClean, string.Join('\n', q.Check().Problems));
        }
        var after = QemuImg.Check(path);
        Assert.True(after.Clean, $"qemu-img check after the engine's repair: {after}");
        // The repair kept the bitmaps (autoclear bit 0 too) and the snapshots.
        Assert.Equal(bitmapsBefore, BitmapNames(path));
        Assert.Equal(snapshotsBefore, QemuImg.Info(path)[0].SnapshotCount);
    }

    /// <summary>The case: repairing a qemu-clean image with a bitmap frees nothing and qemu still calls it clean.</summary>
    [SkippableFact]
    public void RepairOfACleanImageWithBitmapsChangesNothing()
    {
        QemuImg.Require();
        var path = Make("snapshots-and-bitmaps");
        var hash = Hash(path);
        using (var q = Qcow2Image.Open(path))
        {
            var r = q.Check(repairLeaks: true);
            Assert.True(r.IsClean, string.Join('\n', r.Problems));
            Assert.Equal(0, r.LeaksFixed);
        }
        Assert.Equal(hash, Hash(path));
        Assert.True(QemuImg.Check(path).Clean);
    }

    /// <summary>Runs both checks on the image (read-only for the engine, which must not change it) and asserts the same exit status.</summary>
    private static QemuCheckResult AssertAgree(string path)
    {
        var hash = Hash(path);
        var qemu = QemuImg.Check(path);
        CheckResult mine;
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
            mine = q.Check();
        Assert.Equal(hash, Hash(path));
        Assert.True(qemu.ExitCode == mine.ExitStatus,
            $"qemu-img check: {qemu}\nengine check (exit {mine.ExitStatus}, {mine.Corruptions} corruptions, {mine.Leaks} leaks):\n{string.Join('\n', mine.Problems)}");
        Assert.Equal(qemu.Corruptions, mine.Corruptions);
        Assert.Equal(qemu.Leaks, mine.Leaks);
        return qemu;
    }

    private static string BitmapNames(string path)
    {
        var json = QemuImg.Info(path)[0].Json;
        using var doc = System.Text.Json.JsonDocument.Parse(json);
        var names = new List<string>();
        if (doc.RootElement.TryGetProperty("format-specific", out var fs) && fs.GetProperty("data").TryGetProperty("bitmaps", out var bitmaps))
        {
            foreach (var b in bitmaps.EnumerateArray())
                names.Add(b.GetProperty("name").GetString()!);
        }
        return string.Join(",", names);
    }

    /// <summary>Drops the active L2 entry of the last mapped guest cluster that only the active table uses (refcount 1).</summary>
    private static void LeakOneCluster(string path)
    {
        var bytes = File.ReadAllBytes(path);
        int cb = (int)BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(20));
        ulong l1 = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        uint l1Size = BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(36));
        const ulong copied = 1UL << 63, mask = 0x00ff_ffff_ffff_fe00;
        for (uint i = 0; i < l1Size; i++)
        {
            ulong l1e = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)(l1 + i * 8)));
            ulong l2 = l1e & mask;
            if (l2 == 0 || (l1e & copied) == 0)
                continue; // a table shared with a snapshot: dropping an entry would change the snapshot too
            for (int j = (1 << cb) / 8 - 1; j >= 0; j--)
            {
                ulong e = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)l2 + j * 8));
                if ((e & copied) != 0 && (e & (1UL << 62)) == 0 && (e & mask) != 0)
                {
                    Poke(path, (long)l2 + j * 8, 0, 8);
                    return;
                }
            }
        }
        throw new InvalidOperationException($"{path}: no unshared data cluster to leak");
    }
}
