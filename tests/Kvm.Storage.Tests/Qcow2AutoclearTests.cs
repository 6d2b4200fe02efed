using Kvm.Tests.Shared;
using Kvm.Storage.Qcow2;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>
/// The autoclear rule: a writer clears, before its first write, every autoclear feature bit it does
/// not maintain. The engine maintains the persistent dirty bitmaps (bit 0), so it keeps that bit
/// and records its writes in them; a bitmaps extension that a bitmap-unaware program left behind
/// (bit 0 clear) stays ignored, and every other autoclear bit is cleared.
/// </summary>
public sealed class Qcow2AutoclearTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private string ImageWithBitmap()
    {
        var path = _dir.File("bm.qcow2");
        QemuImg.Create(path, "qcow2", 16 * MiB);
        QemuImg.Io(path, "qcow2", "write -P 0x11 0 1M");
        QemuImg.Run("bitmap", "--add", path, "b0");
        Assert.Equal(1UL, ReadField(path, Field.AutoclearFeatures, 8));
        return path;
    }

    [SkippableFact]
    public void ReadOnlyAndUnwrittenReadWriteOpensChangeNothing()
    {
        QemuImg.Require();
        var path = ImageWithBitmap();
        var hash = Hash(path);
        using (var q = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true }))
        {
            Assert.Single(q.Bitmaps);
            q.Check();
        }
        using (var q = Qcow2Image.Open(path))
        {
            var buf = new byte[4096];
            q.Read(0, buf);
            q.Check();
        }
        Assert.Equal(hash, Hash(path));
    }

    [SkippableFact]
    public void FirstWriteKeepsTheBitmapsBitMarksTheBitmapInUseAndRecordsTheWrite()
    {
        QemuImg.Require();
        QemuDirtyBitmap.Require();
        var path = ImageWithBitmap();
        using (var q = Qcow2Image.Open(path))
        {
            q.Write(2 * MiB, new byte[4096]);
            Assert.Equal(1UL, ReadField(path, Field.AutoclearFeatures, 8));
            // While open after a write, the file says the bitmap may be stale (in use), as qemu does.
            var inSession = QemuImg.Run("info", "-U", "--output=json", path).Stdout;
            Assert.Contains("in-use", inSession, StringComparison.Ordinal);
            Assert.Equal(0, q.Check().Corruptions);
        }
        var info = QemuImg.Run("info", "--output=json", path).Stdout;
        Assert.DoesNotContain("in-use", info, StringComparison.Ordinal);
        Assert.Contains("auto", info, StringComparison.Ordinal);
        Assert.True(QemuImg.Check(path).Clean, QemuImg.Check(path).ToString());
        // qemu-io's write of 1M came before the bitmap; only this write is recorded.
        Assert.Equal([(2 * MiB, 65536UL)], QemuDirtyBitmap.DirtyRanges(path, "b0"));
        QemuImg.Io(path, "qcow2", "read -P 0 2M 4k", "read -P 0x11 0 1M");
    }

    [SkippableFact]
    public void ABitmapsExtensionWithoutItsAutoclearBitStaysIgnored()
    {
        QemuImg.Require();
        var path = ImageWithBitmap();
        Poke(path, Field.AutoclearFeatures, 0, 8); // as a bitmap-unaware writer leaves it
        using (var q = Qcow2Image.Open(path))
        {
            Assert.Empty(q.Bitmaps);
            q.Write(2 * MiB, new byte[4096]);
            Assert.Equal(0UL, ReadField(path, Field.AutoclearFeatures, 8));
            var mine = q.Check();
            Assert.Equal(0, mine.Corruptions);
            Assert.True(mine.Leaks > 0); // the ignored bitmap's clusters, for the engine and qemu alike
        }
        var qemu = QemuImg.Check(path);
        Assert.Equal(3, qemu.ExitCode);

        // A repair gives the stale bitmap's clusters back; qemu agrees the image is clean.
        using (var q = Qcow2Image.Open(path))
            Assert.True(q.Check(repairLeaks: true).LeaksFixed > 0);
        Assert.True(QemuImg.Check(path).Clean, QemuImg.Check(path).ToString());
        QemuImg.Io(path, "qcow2", "read -P 0 2M 4k", "read -P 0x11 0 1M");
    }

    [SkippableFact]
    public void OtherAutoclearBitsAreClearedAndTheBitmapsBitKept()
    {
        QemuImg.Require();
        var path = ImageWithBitmap();
        Poke(path, Field.AutoclearFeatures, 1UL | (1UL << 7), 8);
        using (var q = Qcow2Image.Open(path))
            q.Write(0, new byte[] { 9 });
        Assert.Equal(1UL, ReadField(path, Field.AutoclearFeatures, 8));
        Assert.True(QemuImg.Check(path).Clean);
    }

    [SkippableTheory]
    [InlineData(1UL << 5)]
    [InlineData(1UL << 63)]
    public void UnknownAutoclearBitsAreClearedBeforeTheFirstWrite(ulong bit)
    {
        QemuImg.Require();
        var path = _dir.File("plain.qcow2");
        QemuImg.Create(path, "qcow2", 4 * MiB);
        Poke(path, Field.AutoclearFeatures, bit, 8);
        Assert.True(QemuImg.Check(path).Clean); // unknown autoclear bits are valid
        using (var q = Qcow2Image.Open(path))
        {
            Assert.Equal(bit, ReadField(path, Field.AutoclearFeatures, 8)); // not yet: nothing written
            q.WriteZeroes(0, 65536);
            q.Write(0, new byte[] { 1, 2, 3 });
        }
        Assert.Equal(0UL, ReadField(path, Field.AutoclearFeatures, 8));
        Assert.True(QemuImg.Check(path).Clean);
    }
}
