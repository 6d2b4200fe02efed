using System.Diagnostics;
using Kvm.Inventory.Embedded;


namespace Kvm.IntegrationTests;

/// <summary>
/// One PostgreSQL cluster made per test process, by the same code kvmd uses for its private
/// cluster (<see cref="EmbeddedPostgres"/>), then stopped; each kvmd test copies it into its state
/// directory instead of running initdb again. initdb takes 40 s to 2.5 min in the nested KVM host,
/// and every kvmd test needs a cluster; a copy takes a second. kvmd then finds an existing cluster,
/// as it does at every start after its first: it rewrites its own settings (the socket directory
/// among them) and starts the server. The first start, which makes the cluster, stays covered by
/// Kvm.Inventory.Tests' EmbeddedPostgresTests and by the kvmd test that asks for a fresh cluster.
/// </summary>
internal static class PostgresTemplate
{
    private static readonly Lock Gate = new();
    private static string? _root;
    private const string Prefix = "kvmd-pg-template-";

    /// <summary>
    /// Puts a copy of the template cluster in <paramref name="stateDir"/>/postgres (owners and modes
    /// kept: as root, the server's user owns it), making the template on first use.
    /// </summary>
    public static void CopyTo(string stateDir)
    {
        string template = Path.Combine(Template(), "postgres");
        Directory.CreateDirectory(stateDir);
        var psi = new ProcessStartInfo("cp", ["-a", template, Path.Combine(stateDir, "postgres")])
        {
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        using var cp = Process.Start(psi)!;
        string err = cp.StandardError.ReadToEnd();
        cp.WaitForExit();
        if (cp.ExitCode != 0)
            throw new InvalidOperationException($"copying the template cluster {template} to {stateDir} failed (exit status {cp.ExitCode}): {err.Trim()}");
    }

    private static string Template()
    {
        lock (Gate)
        {
            if (_root is not null)
                return _root;
            // The test host is ended without running exit handlers, so a template cannot remove itself:
            // each run removes those of test processes that are gone, and names its own by its pid.
            RemoveLeftovers();
            string root = Path.Combine(Path.GetTempPath(), $"{Prefix}{Environment.ProcessId}");
            if (Directory.Exists(root))
                Directory.Delete(root, recursive: true);
            Directory.CreateDirectory(root);
            // As root the server runs as 'postgres', which must pass through this directory.
            File.SetUnixFileMode(root, (UnixFileMode)0b111_101_101);
            try
            {
                var pg = EmbeddedPostgres.StartAsync(new EmbeddedPostgresOptions { StateDirectory = root }).GetAwaiter().GetResult();
                pg.StopAsync().GetAwaiter().GetResult();
                if (File.Exists(Path.Combine(pg.DataDirectory, "postmaster.pid")))
                    throw new InvalidOperationException($"the template cluster in {pg.DataDirectory} did not stop cleanly (postmaster.pid is left)");
                File.Delete(pg.LogFile);
            }
            catch
            {
                Directory.Delete(root, recursive: true);
                throw;
            }
            _root = root;
            return root;
        }
    }

    private static void RemoveLeftovers()
    {
        foreach (var dir in Directory.EnumerateDirectories(Path.GetTempPath(), Prefix + "*"))
        {
            if (!int.TryParse(Path.GetFileName(dir).AsSpan(Prefix.Length), out int pid) || Directory.Exists($"/proc/{pid}"))
                continue;
            try
            {
                Directory.Delete(dir, recursive: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
        }
    }
}
