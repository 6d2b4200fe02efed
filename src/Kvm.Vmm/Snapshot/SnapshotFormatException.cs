namespace Kvm.Vmm.Snapshot;

/// <summary>
/// A snapshot file cannot be used: it is missing, truncated, of another format or version, fails
/// its CRC, or a field is out of range. The message names the file's path, the offset where the
/// problem was found (when there is one), the section and field, and what was expected and found.
/// </summary>
public sealed class SnapshotFormatException : Exception
{
    /// <summary>A problem <paramref name="problem"/> with the file <paramref name="path"/>, at <paramref name="offset"/> when known.</summary>
    public SnapshotFormatException(string path, long? offset, string problem, Exception? inner = null)
        : base(offset is { } at ? $"snapshot file {path}, offset {at}: {problem}" : $"snapshot file {path}: {problem}", inner)
    {
        FilePath = path;
        Offset = offset;
        Problem = problem;
    }

    /// <summary>The file that was refused.</summary>
    public string FilePath { get; }

    /// <summary>The byte offset in the file where the problem lies, when there is one.</summary>
    public long? Offset { get; }

    /// <summary>What is wrong, without the path and offset.</summary>
    public string Problem { get; }
}
