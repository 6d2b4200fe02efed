namespace Kvm.Cluster.Supervision;

/// <summary>
/// Where one VM's files live on this host. Runtime files (its spec as started, control and
/// console sockets, exit record) under RUN/vms/NAME, which survives a restart of kvmd but not of
/// the host; its log under STATE/vms/NAME. VM names are checked by the inventory (letters, digits,
/// '.', '_', '-', starting with a letter or digit), so a name is always one safe path component.
/// </summary>
public sealed record VmFiles(string Name, string RunDirectory, string StateDirectory)
{
    public static VmFiles For(KvmdOptions options, string name) => new(
        name,
        Path.Combine(options.RunDirectory, "vms", name),
        Path.Combine(options.StateDirectory, "vms", name));

    public string Spec => Path.Combine(RunDirectory, "spec.json");
    public string ControlSocket => Path.Combine(RunDirectory, "control.sock");
    public string ConsoleSocket => Path.Combine(RunDirectory, "console.sock");
    public string ExitFile => Path.Combine(RunDirectory, "exit.json");
    public string Log => Path.Combine(StateDirectory, "kvm-vmm.log");

    /// <summary>The log's size now: where what a new start writes begins.</summary>
    public long LogLength() => File.Exists(Log) ? new FileInfo(Log).Length : 0;

    /// <summary>The last lines the log gained after <paramref name="offset"/>, joined by " | " (for an error that says why a VM did not start), or "".</summary>
    public string LogTail(long offset, int lines = 3)
    {
        try
        {
            using var f = new FileStream(Log, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            f.Seek(Math.Min(offset, f.Length), SeekOrigin.Begin);
            var all = new StreamReader(f).ReadToEnd().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            return string.Join(" | ", all.Skip(Math.Max(0, all.Length - lines)));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return "";
        }
    }
}
