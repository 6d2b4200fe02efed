using Kvm.Interop.Handles;

namespace Kvm.Interop.Tests;

/// <summary><see cref="DirectoryHandle"/>: a directory opened for fsync(2), and the refusals that name it.</summary>
public class DirectoryHandleTests
{
    [Fact]
    public void ADirectoryIsOpenedAndSynced()
    {
        var dir = Directory.CreateTempSubdirectory("kvm-dirhandle-");
        try
        {
            using var handle = DirectoryHandle.Open(dir.FullName);
            Assert.False(handle.IsInvalid);
            handle.Sync(dir.FullName);
        }
        finally
        {
            dir.Delete();
        }
    }

    [Fact]
    public void AFileOrAMissingPathIsNamed()
    {
        string file = Path.GetTempFileName();
        try
        {
            var e = Assert.Throws<IOException>(() => DirectoryHandle.Open(file));
            Assert.Contains(file, e.Message);
            Assert.Contains("errno 20", e.Message); // ENOTDIR
        }
        finally
        {
            File.Delete(file);
        }
        var missing = Assert.Throws<IOException>(() => DirectoryHandle.Open("/nonexistent/kvm-dir"));
        Assert.Contains("/nonexistent/kvm-dir", missing.Message);
        Assert.Contains("errno 2", missing.Message);
    }
}
