using System.Diagnostics;
using System.Globalization;
using System.Text;
using Npgsql;

namespace Kvm.Inventory.Embedded;

/// <summary>How kvmd runs its private PostgreSQL cluster.</summary>
public sealed record EmbeddedPostgresOptions
{
    /// <summary>kvmd's state directory; the cluster lives in its subdirectory 'postgres'.</summary>
    public required string StateDirectory { get; init; }

    /// <summary>Where to look for initdb, pg_ctl and postgres; null: /usr/lib/postgresql/*/bin, then PATH.</summary>
    public IReadOnlyList<string>? BinarySearchDirectories { get; init; }

    /// <summary>When this process is root: the user the server runs as (null: 'postgres').</summary>
    public string? ServerUser { get; init; }

    /// <summary>The database kvmd uses (created on first start).</summary>
    public string Database { get; init; } = "kvm";

    /// <summary>
    /// False only for throwaway clusters (tests): initdb without fsync and the server with fsync off.
    /// A crash of the server process loses nothing (commits still reach the kernel), but a crash of
    /// the machine may lose or corrupt the cluster.
    /// </summary>
    public bool Durable { get; init; } = true;

    /// <summary>
    /// How long initdb, a start or a stop may take. Generous: initdb takes seconds on a usual
    /// machine but minutes on a slow one (over 60 s in a nested KVM host under QEMU's TCG).
    /// </summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(300);
}

/// <summary>
/// kvmd's private PostgreSQL cluster under its state directory: made by initdb on first use,
/// started by pg_ctl, reachable only through a unix socket in a private directory (no TCP), and
/// stopped when disposed. Layout of STATE/postgres: data/ (the cluster), run/ (the socket, mode
/// 0700), server.log. When this process is root the directory belongs to the server's user
/// (<see cref="ServerAccount"/>) and the programs run as that user through setpriv.
/// </summary>
public sealed class EmbeddedPostgres : IAsyncDisposable
{
    /// <summary>The superuser initdb creates; the socket directory's mode is what keeps others out.</summary>
    public const string SuperUser = "kvmd";

    /// <summary>The port only names the socket (run/.s.PGSQL.5432): the server listens on no TCP port.</summary>
    public const int Port = 5432;

    private const string ConfigFile = "kvmd.conf";

    private readonly EmbeddedPostgresOptions _options;
    private readonly ServerAccount? _account;
    private bool _running;

    private EmbeddedPostgres(EmbeddedPostgresOptions options, PostgresBinaries binaries, ServerAccount? account, string root)
    {
        _options = options;
        _account = account;
        Binaries = binaries;
        Root = root;
    }

    public PostgresBinaries Binaries { get; }

    /// <summary>STATE/postgres.</summary>
    public string Root { get; }

    public string DataDirectory => Path.Combine(Root, "data");
    public string SocketDirectory => Path.Combine(Root, "run");
    public string LogFile => Path.Combine(Root, "server.log");

    /// <summary>The user the server runs as; null when it runs as this process's user.</summary>
    public ServerAccount? Account => _account;

    /// <summary>True when this start made the cluster (initdb).</summary>
    public bool Created { get; private set; }

    /// <summary>True when the server was already running (a kvmd that crashed left it) and this start took it over.</summary>
    public bool Adopted { get; private set; }

    /// <summary>The postmaster's process id, from data/postmaster.pid.</summary>
    public int? ServerProcessId => ReadPid(Path.Combine(DataDirectory, "postmaster.pid"));

    /// <summary>The Npgsql connection string for <see cref="EmbeddedPostgresOptions.Database"/>.</summary>
    public string ConnectionString => ConnectionStringFor(_options.Database);

    public string ConnectionStringFor(string database) => new NpgsqlConnectionStringBuilder
    {
        Host = SocketDirectory,
        Port = Port,
        Username = SuperUser,
        Database = database,
    }.ConnectionString;

    /// <summary>
    /// Makes the cluster if it is absent, starts its server (or takes over one still running from
    /// a previous kvmd, or recovers from one that died and left its postmaster.pid), and creates the
    /// database. Errors name what is missing and the server's log file.
    /// </summary>
    public static async Task<EmbeddedPostgres> StartAsync(EmbeddedPostgresOptions options, CancellationToken ct = default)
    {
        ValidateDatabaseName(options.Database);
        var root = Path.Combine(Path.GetFullPath(options.StateDirectory), "postgres");
        var existingMajor = ReadMajor(Path.Combine(root, "data", "PG_VERSION"));
        var binaries = PostgresBinaries.Find(options.BinarySearchDirectories, existingMajor);
        var account = ServerAccount.ForThisProcess(options.ServerUser);
        var pg = new EmbeddedPostgres(options, binaries, account, root);
        try
        {
            await pg.StartCoreAsync(existingMajor, ct).ConfigureAwait(false);
        }
        catch
        {
            await pg.DisposeAsync().ConfigureAwait(false);
            throw;
        }
        return pg;
    }

    private async Task StartCoreAsync(int? existingMajor, CancellationToken ct)
    {
        PrepareDirectories();
        if (existingMajor is null)
            await InitdbAsync(ct).ConfigureAwait(false);
        else if (Binaries.MajorVersion is { } found && found != existingMajor)
            throw new InventoryException(
                $"the cluster in {DataDirectory} was made by PostgreSQL {existingMajor}, and the server programs found are version {found} ({Binaries.Directory}): " +
                $"install postgresql-{existingMajor}, or upgrade the cluster with pg_upgrade");
        WriteConfig();

        if (await RecoverStaleServerAsync(ct).ConfigureAwait(false))
            Adopted = true;
        else
            await PgCtlAsync("start", ["-w", "-t", Seconds(), "-l", LogFile], ct).ConfigureAwait(false);
        _running = true;
        await CreateDatabaseAsync(ct).ConfigureAwait(false);
    }

    /// <summary>Stops the server (pg_ctl stop, fast mode: open sessions are ended, no data is lost).</summary>
    public async Task StopAsync(CancellationToken ct = default)
    {
        if (!_running)
            return;
        _running = false;
        NpgsqlConnection.ClearAllPools();
        await PgCtlAsync("stop", ["-w", "-t", Seconds(), "-m", "fast"], ct).ConfigureAwait(false);
    }

    public async ValueTask DisposeAsync() => await StopAsync().ConfigureAwait(false);

    private void PrepareDirectories()
    {
        var state = Path.GetDirectoryName(Root)!;
        Directory.CreateDirectory(state);
        foreach (var dir in new[] { Root, SocketDirectory })
        {
            if (!Directory.Exists(dir))
                Directory.CreateDirectory(dir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            File.SetUnixFileMode(dir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            _account?.Own(dir);
        }
        if (_account is not null)
        {
            // The server's user must reach STATE/postgres: every directory above it must let it pass.
            var r = Run(_account, "test", ["-w", Root, "-a", "-x", Root], TimeSpan.FromSeconds(10));
            if (r.ExitCode != 0)
                throw new InventoryException(
                    $"the embedded PostgreSQL server runs as user '{_account.Name}' (PostgreSQL refuses root), and that user cannot reach {Root}: " +
                    $"let it search every directory above (chmod o+x, or a group it is in), or put the state directory elsewhere");
        }
    }

    private async Task InitdbAsync(CancellationToken ct)
    {
        // initdb into a fresh directory beside data/, then rename it: a crash during initdb leaves
        // no half-made cluster behind that a later start would mistake for a real one.
        var fresh = Path.Combine(Root, "data.initdb");
        if (Directory.Exists(fresh))
            Directory.Delete(fresh, recursive: true);
        if (Directory.Exists(DataDirectory) && Directory.EnumerateFileSystemEntries(DataDirectory).Any())
            throw new InventoryException($"{DataDirectory} is not empty and holds no PostgreSQL cluster (no PG_VERSION): move it away, or remove it to start over");
        List<string> args = ["-D", fresh, "-U", SuperUser, "--auth=trust", "--encoding=UTF8", "--locale=C"];
        if (!_options.Durable)
            args.Add("--no-sync");
        var r = await Task.Run(() => Run(_account, Binaries.Initdb, args, _options.Timeout), ct).ConfigureAwait(false);
        if (r.ExitCode != 0)
            throw new InventoryException($"initdb of the embedded cluster in {fresh} failed (exit status {r.ExitCode}): {Last(r.Output, 2000)}");
        if (Directory.Exists(DataDirectory))
            Directory.Delete(DataDirectory);
        Directory.Move(fresh, DataDirectory);
        await File.AppendAllTextAsync(Path.Combine(DataDirectory, "postgresql.conf"),
            $"\n# kvmd's own settings (rewritten at each start)\ninclude_if_exists = '{ConfigFile}'\n", ct).ConfigureAwait(false);
        Created = true;
    }

    private void WriteConfig()
    {
        var conf = new StringBuilder()
            .AppendLine("# Written by kvmd at each start of its embedded cluster; changes here are lost.")
            .AppendLine("listen_addresses = ''")
            .AppendLine(CultureInfo.InvariantCulture, $"port = {Port}")
            .AppendLine(CultureInfo.InvariantCulture, $"unix_socket_directories = '{SocketDirectory.Replace("'", "''", StringComparison.Ordinal)}'")
            .AppendLine("unix_socket_permissions = 0700")
            .AppendLine("max_connections = 100")
            .AppendLine("shared_buffers = 32MB")
            .AppendLine(CultureInfo.InvariantCulture, $"fsync = {(_options.Durable ? "on" : "off")}")
            .AppendLine(CultureInfo.InvariantCulture, $"full_page_writes = {(_options.Durable ? "on" : "off")}")
            .AppendLine("timezone = 'UTC'")
            .AppendLine("log_timezone = 'UTC'")
            .ToString();
        var path = Path.Combine(DataDirectory, ConfigFile);
        File.WriteAllText(path, conf);
        _account?.Own(path);
    }

    /// <summary>
    /// What a previous server left. Returns true when its postmaster still runs on this data
    /// directory (a kvmd that crashed left it running): it is taken over. Otherwise waits for the
    /// dead postmaster's children to end (they notice its death and exit) and removes its
    /// postmaster.pid and socket lock, whose pid may since belong to an unrelated process, which
    /// PostgreSQL would take for a live server.
    /// </summary>
    private async Task<bool> RecoverStaleServerAsync(CancellationToken ct)
    {
        var pidFile = Path.Combine(DataDirectory, "postmaster.pid");
        if (!File.Exists(pidFile))
            return false;
        var dataDir = Path.GetFullPath(DataDirectory);
        if (ReadPid(pidFile) is { } pid && IsServerOf(pid, dataDir))
            return true;

        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(15);
        List<int> left;
        while ((left = ProcessesIn(dataDir)).Count > 0)
        {
            if (DateTime.UtcNow > deadline)
                throw new InventoryException(
                    $"the embedded PostgreSQL server of {DataDirectory} died, and its processes {string.Join(", ", left)} are still running: stop them (see {LogFile})");
            await Task.Delay(100, ct).ConfigureAwait(false);
        }
        File.Delete(pidFile);
        File.Delete(Path.Combine(SocketDirectory, $".s.PGSQL.{Port}.lock"));
        return false;
    }

    /// <summary>Whether process <paramref name="pid"/> is a postgres whose working directory is <paramref name="dataDir"/> (a postmaster chdirs there).</summary>
    private static bool IsServerOf(int pid, string dataDir)
    {
        try
        {
            var comm = File.ReadAllText($"/proc/{pid}/comm").Trim();
            return comm == "postgres" && CwdOf(pid) == dataDir;
        }
        catch (IOException)
        {
            return false;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>The processes whose working directory is <paramref name="dataDir"/>: a server's postmaster and children.</summary>
    private static List<int> ProcessesIn(string dataDir)
    {
        var pids = new List<int>();
        foreach (var dir in Directory.EnumerateDirectories("/proc"))
        {
            if (int.TryParse(Path.GetFileName(dir), NumberStyles.None, CultureInfo.InvariantCulture, out var pid) && CwdOf(pid) == dataDir)
                pids.Add(pid);
        }
        return pids;
    }

    private static string? CwdOf(int pid)
    {
        try
        {
            return new DirectoryInfo($"/proc/{pid}/cwd").LinkTarget;
        }
        catch (IOException)
        {
            return null;
        }
        catch (UnauthorizedAccessException)
        {
            return null;
        }
    }

    private async Task CreateDatabaseAsync(CancellationToken ct)
    {
        await using var conn = new NpgsqlConnection(ConnectionStringFor("postgres"));
        try
        {
            await conn.OpenAsync(ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is NpgsqlException or TimeoutException)
        {
            throw new InventoryException($"cannot connect to the embedded PostgreSQL server at {SocketDirectory} (its log: {LogFile})", e);
        }
        await using var exists = new NpgsqlCommand("select 1 from pg_database where datname = $1", conn);
        exists.Parameters.Add(new NpgsqlParameter { Value = _options.Database });
        if (await exists.ExecuteScalarAsync(ct).ConfigureAwait(false) is null)
        {
            await using var create = new NpgsqlCommand($"create database \"{_options.Database}\"", conn);
            await create.ExecuteNonQueryAsync(ct).ConfigureAwait(false);
        }
    }

    private async Task PgCtlAsync(string action, IEnumerable<string> extra, CancellationToken ct)
    {
        List<string> args = [action, "-D", DataDirectory, .. extra];
        var r = await Task.Run(() => Run(_account, Binaries.PgCtl, args, _options.Timeout + TimeSpan.FromSeconds(10)), ct).ConfigureAwait(false);
        if (r.ExitCode != 0)
            throw new InventoryException(
                $"pg_ctl {action} of the embedded PostgreSQL cluster in {DataDirectory} failed (exit status {r.ExitCode}): {Last(r.Output, 1000)}" +
                $"; the server's log is {LogFile}: {LogTail()}");
    }

    private string LogTail()
    {
        try
        {
            return Last(File.ReadAllText(LogFile), 1500);
        }
        catch (IOException)
        {
            return "(cannot be read)";
        }
    }

    private string Seconds() => ((int)Math.Ceiling(_options.Timeout.TotalSeconds)).ToString(CultureInfo.InvariantCulture);

    private sealed record RunResult(int ExitCode, string Output);

    /// <summary>Runs a program to completion as <paramref name="account"/> (through setpriv) or as this user; stdout and stderr together.</summary>
    private RunResult Run(ServerAccount? account, string file, IReadOnlyList<string> args, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
            // The server's user may not be allowed into this process's working directory.
            WorkingDirectory = Root,
        };
        if (account is null)
        {
            psi.FileName = file;
        }
        else
        {
            psi.FileName = "setpriv";
            psi.ArgumentList.Add($"--reuid={account.Uid}");
            psi.ArgumentList.Add($"--regid={account.Gid}");
            psi.ArgumentList.Add("--clear-groups");
            psi.ArgumentList.Add("--");
            psi.ArgumentList.Add(file);
        }
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        foreach (var v in new[] { "PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS" })
            psi.Environment.Remove(v);
        psi.Environment["LC_ALL"] = "C";
        if (account is not null)
            psi.Environment["HOME"] = Root;

        Process p;
        try
        {
            p = Process.Start(psi) ?? throw new InventoryException($"cannot start {psi.FileName}");
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InventoryException(
                account is null ? $"cannot run {file}: {e.Message}" : $"cannot run setpriv (Debian package util-linux) to run {file} as user '{account.Name}': {e.Message}", e);
        }
        using (p)
        {
            p.StandardInput.Close();
            var output = new StringBuilder();
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(timeout))
            {
                p.Kill(entireProcessTree: true);
                p.WaitForExit();
                throw new InventoryException($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds:0} s (the server's log: {LogFile})");
            }
            p.WaitForExit();
            output.Append(stdout.Result).Append(stderr.Result);
            return new RunResult(p.ExitCode, output.ToString().Trim());
        }
    }

    private static string Last(string text, int max) => text.Length <= max ? text.Trim() : "..." + text[^max..].Trim();

    private static int? ReadPid(string pidFile)
    {
        try
        {
            using var r = new StreamReader(pidFile);
            return int.TryParse(r.ReadLine(), NumberStyles.None, CultureInfo.InvariantCulture, out var pid) ? pid : null;
        }
        catch (IOException)
        {
            return null;
        }
    }

    private static int? ReadMajor(string pgVersionFile)
    {
        try
        {
            return int.TryParse(File.ReadAllText(pgVersionFile).Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out var v) ? v : null;
        }
        catch (IOException)
        {
            return null;
        }
    }

    private static void ValidateDatabaseName(string name)
    {
        if (name.Length is 0 or > 63 || !(char.IsAsciiLetterLower(name[0]) || name[0] == '_') || !name.All(c => char.IsAsciiLetterLower(c) || char.IsAsciiDigit(c) || c == '_'))
            throw new InventoryException($"database name '{name}' is not allowed: use 1 to 63 lower-case letters, digits and '_', not starting with a digit");
    }
}
