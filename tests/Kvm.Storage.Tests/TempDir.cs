namespace Kvm.Storage.Tests;

/// <summary>A private temporary folder for one test, deleted with everything in it on dispose.</summary>
public sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = Directory.CreateTempSubdirectory("kvm-storage-test-").FullName;
    }

    public string Path { get; }

    /// <summary>A path inside the folder (creating intermediate folders of <paramref name="name"/>).</summary>
    public string File(string name)
    {
        var full = System.IO.Path.Combine(Path, name);
        Directory.CreateDirectory(System.IO.Path.GetDirectoryName(full)!);
        return full;
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (DirectoryNotFoundException)
        {
        }
    }
}
