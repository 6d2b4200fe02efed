using Kvm.Cluster;
using Kvm.Rpc;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// The kvmd hosts of one test, in one temporary directory (<see cref="KvmdInstance"/> each): the
/// first, "test-host", in the directory itself with its private PostgreSQL cluster; more hosts in
/// subdirectories with that cluster as their shared one. Disposing stops them, ends the VMs and
/// clusters they left, and removes the directory.
/// </summary>
public sealed class KvmdHarness : IDisposable
{
    private readonly List<KvmdInstance> _hosts = [];

    public KvmdHarness() => Dir = Directory.CreateTempSubdirectory("kvmd-").FullName;

    public string Dir { get; }

    /// <summary>The first host's socket, state and run directories.</summary>
    public string Socket => KvmdInstance.SocketIn(Dir);
    public string StateDir => Path.Combine(Dir, "state");
    public string RunDir => Path.Combine(Dir, "run");

    /// <summary>Skips, naming it, unless kvmd is built and PostgreSQL's server programs are installed (under CI=true a skip is a failure).</summary>
    public static void RequireKvmd()
    {
        foreach (var p in new[] { TestEnvironment.Kvmd, TestEnvironment.KvmVmm, TestEnvironment.Vmctl })
            TestEnvironment.SkipIf(File.Exists(p) ? null : $"{p} is missing (run 'make' first)");
        TestEnvironment.SkipIf(PostgresUnavailable());
    }

    /// <summary>Null when kvmd's private cluster can be made here, else what is missing: PostgreSQL's server programs.</summary>
    public static string? PostgresUnavailable() =>
        TestEnvironment.FindOnPath("initdb") is null && !Directory.Exists("/usr/lib/postgresql")
            ? "PostgreSQL's server programs are missing (apt-get install postgresql)"
            : null;

    /// <summary>The first host's private cluster as a connection string, logging in as <paramref name="user"/> (default: its superuser).</summary>
    public string SharedDatabase(string? user = null) =>
        user is null ? KvmdInstance.DatabaseIn(Dir) : new Npgsql.NpgsqlConnectionStringBuilder(KvmdInstance.DatabaseIn(Dir)) { Username = user }.ConnectionString;

    /// <summary>
    /// Starts the first host, "test-host", with its private cluster (again, after it was stopped or
    /// killed). Its first start copies <see cref="PostgresTemplate"/> in as its cluster unless
    /// <paramref name="freshCluster"/> asks kvmd to make its own (initdb: minutes in the nested host).
    /// </summary>
    public LiveProcess Start(IEnumerable<string>? more = null, bool freshCluster = false)
    {
        if (!freshCluster && !Directory.Exists(Path.Combine(StateDir, "postgres")))
            PostgresTemplate.CopyTo(StateDir);
        return Add(KvmdInstance.Start(Dir, "test-host", more)).Process;
    }

    /// <summary>Starts host <paramref name="host"/> in Dir/<paramref name="host"/> on the first host's cluster; returns its socket.</summary>
    public string StartHost(string host, IEnumerable<string>? more = null, string? user = null) =>
        Add(KvmdInstance.Start(Path.Combine(Dir, host), host, ["--database", SharedDatabase(user), .. more ?? []])).Socket;

    private KvmdInstance Add(KvmdInstance kvmd)
    {
        _hosts.Add(kvmd);
        return kvmd;
    }

    /// <summary>daemon.status of the kvmd at <paramref name="socket"/>.</summary>
    public static DaemonStatus Status(string socket)
    {
        using var c = RpcClient.Connect(socket, "kvmd");
        return c.CallAsync("daemon.status", KvmdJson.Default.DaemonStatus).WaitAsync(TimeSpan.FromSeconds(10)).GetAwaiter().GetResult();
    }

    public void Dispose()
    {
        // The other hosts first: the first host's cluster is theirs too.
        foreach (var kvmd in Enumerable.Reverse(_hosts))
            kvmd.Dispose();
        KvmdInstance.KillLeftovers(Dir);
        try
        {
            Directory.Delete(Dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
