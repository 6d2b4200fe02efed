using Kvm.Storage.Qcow2;
using Kvm.Storage.Raw;

namespace Kvm.Storage.Tests;

/// <summary>ImageOpenOptions.Exclusive: a writer locks an image against every other user of these locks.</summary>
public sealed class ImageLockTests : IDisposable
{
    private const ulong MiB = 1 << 20;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static readonly ImageOpenOptions Writer = new() { Exclusive = true };
    private static readonly ImageOpenOptions Reader = new() { ReadOnly = true, Exclusive = true };

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public void AnExclusiveWriterShutsOutEveryoneUntilItCloses(string format)
    {
        string path = _dir.File($"a.{format}");
        if (format == "raw")
            RawImage.Create(path, MiB).Dispose();
        else
            Qcow2Image.Create(path, new Qcow2CreateOptions { Size = MiB }).Dispose();

        using (var writer = DiskImage.Open(path, Writer))
        {
            foreach (var other in new[] { Writer, Reader, new ImageOpenOptions { ReadOnly = true } })
            {
                var e = Assert.Throws<ImageFormatException>(() => DiskImage.Open(path, other).Dispose());
                Assert.Contains(path, e.Message);
                Assert.Contains("in use", e.Message);
            }
            writer.Write(0, new byte[512]);
        }
        using var again = DiskImage.Open(path, Writer);
    }

    [Fact]
    public void ReadersShareButKeepWritersOut()
    {
        string path = _dir.File("base.qcow2");
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = MiB }).Dispose();
        using var r1 = DiskImage.Open(path, Reader);
        using var r2 = DiskImage.Open(path, Reader);
        var e = Assert.Throws<ImageFormatException>(() => DiskImage.Open(path, Writer).Dispose());
        Assert.Contains("in use", e.Message);
        // Without Exclusive nothing changes for other callers (vmctl disk, tests).
        using var plain = DiskImage.Open(path);
    }

    [Fact]
    public void ABackingFileInUseByAChildCannotBeWrittenExclusively()
    {
        string parent = _dir.File("parent.qcow2"), child = _dir.File("child.qcow2");
        Qcow2Image.Create(parent, new Qcow2CreateOptions { Size = MiB }).Dispose();
        Qcow2Image.Create(child, new Qcow2CreateOptions { Size = MiB, BackingFile = "parent.qcow2", BackingFormat = "qcow2" }).Dispose();
        using var c = DiskImage.Open(child, Writer);
        Assert.Throws<ImageFormatException>(() => DiskImage.Open(parent, Writer).Dispose());
        // Another child of the same parent may share it.
        string sibling = _dir.File("sibling.qcow2");
        Qcow2Image.Create(sibling, new Qcow2CreateOptions { Size = MiB, BackingFile = "parent.qcow2", BackingFormat = "qcow2" }).Dispose();
        using var s = DiskImage.Open(sibling, Writer);
    }
    /// <summary>
    /// A live checkpoint makes the child of a disk the VM holds locked: CreateFile writes it without
    /// opening the parent, the child opens once the writer lets the parent go, reads what the parent
    /// held, takes the writes, and qemu-img finds it clean with the parent as its backing.
    /// </summary>
    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public void AChildOfAnImageHeldForWritingIsMadeWithoutOpeningIt(string format)
    {
        QemuImg.Require();
        string parent = _dir.File($"parent.{format}"), child = _dir.File("child.qcow2");
        if (format == "raw")
            RawImage.Create(parent, MiB).Dispose();
        else
            Qcow2Image.Create(parent, new Qcow2CreateOptions { Size = MiB }).Dispose();
        var data = Enumerable.Range(0, 4096).Select(i => (byte)(i * 7)).ToArray();
        using (var writer = DiskImage.Open(parent, Writer))
        {
            writer.Write(64 << 10, data);
            writer.Flush();
            // Creating through Create would open the parent as its backing: refused while held.
            Assert.Throws<ImageFormatException>(() => Qcow2Image.Create(_dir.File("refused.qcow2"),
                new Qcow2CreateOptions { Size = MiB, BackingFile = Path.GetFileName(parent), BackingFormat = format }).Dispose());
            Qcow2Image.CreateFile(child, new Qcow2CreateOptions { Size = MiB, BackingFile = Path.GetFileName(parent), BackingFormat = format });
            Assert.Throws<ImageFormatException>(() => DiskImage.Open(child, Writer).Dispose());
        }
        using (var c = DiskImage.Open(child, Writer))
        {
            var read = new byte[4096];
            c.Read(64 << 10, read);
            Assert.Equal(data, read);
            c.Write(0, data);
            c.Flush();
        }
        var check = QemuImg.Check(child);
        Assert.True(check.Clean, check.ToString());
        var info = QemuImg.Info(child);
        Assert.Equal(2, info.Count);
        Assert.Equal(parent, info[1].Filename);
    }
}
