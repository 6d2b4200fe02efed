using System.Diagnostics;
using Kvm.Inventory.Embedded;
using Kvm.Tests.Shared;

namespace Kvm.Inventory.Tests;

/// <summary>
/// kvmd's private cluster with the installed PostgreSQL server: each test makes its own cluster
/// in a temporary state directory (initdb, pg_ctl), as kvmd does on a host's first start.
/// </summary>
public sealed class EmbeddedPostgresTests
{
    [SkippableFact]
    public async Task Initdb_start_stop_and_restart_keep_the_data_and_listen_only_on_the_private_socket()
    {
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var options = PostgresTestKit.Options(state.Path);

        await using (var pg = await EmbeddedPostgres.StartAsync(options))
        {
            Assert.True(pg.Created);
            Assert.False(pg.Adopted);
            Assert.Equal(Path.Combine(state.Path, "postgres", "run"), pg.SocketDirectory);
            Assert.True(File.Exists(Path.Combine(pg.SocketDirectory, ".s.PGSQL.5432")), "no socket in " + pg.SocketDirectory);
            Assert.Equal("", await PostgresTestKit.ScalarAsync<string>(pg.ConnectionString, "show listen_addresses"));
            Assert.Equal("kvm", await PostgresTestKit.ScalarAsync<string>(pg.ConnectionString, "select current_database()"));
            Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute, File.GetUnixFileMode(pg.SocketDirectory));
            await PostgresTestKit.ExecuteAsync(pg.ConnectionString, "create table kept (v text); insert into kept values ('across a restart')");
            await pg.StopAsync();
            Assert.False(File.Exists(Path.Combine(pg.DataDirectory, "postmaster.pid")), "postmaster.pid left after a stop");
        }

        await using (var pg = await EmbeddedPostgres.StartAsync(options))
        {
            Assert.False(pg.Created);
            Assert.Equal("across a restart", await PostgresTestKit.ScalarAsync<string>(pg.ConnectionString, "select v from kept"));
        }
    }

    [SkippableFact]
    public async Task A_postmaster_killed_with_SIGKILL_leaves_a_stale_pid_file_that_the_next_start_recovers_from()
    {
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var options = PostgresTestKit.Options(state.Path);

        var first = await EmbeddedPostgres.StartAsync(options);
        await PostgresTestKit.ExecuteAsync(first.ConnectionString, "create table kept (v text); insert into kept values ('before the crash')");
        var pid = first.ServerProcessId ?? throw new InvalidOperationException("no postmaster.pid");
        using (var postmaster = Process.GetProcessById(pid))
        {
            postmaster.Kill();
            await postmaster.WaitForExitAsync();
        }
        Assert.True(File.Exists(Path.Combine(first.DataDirectory, "postmaster.pid")), "the killed postmaster left no postmaster.pid: the test shows nothing");
        Npgsql.NpgsqlConnection.ClearAllPools();

        await using var second = await EmbeddedPostgres.StartAsync(options);
        Assert.False(second.Adopted);
        Assert.NotEqual(pid, second.ServerProcessId);
        Assert.Equal("before the crash", await PostgresTestKit.ScalarAsync<string>(second.ConnectionString, "select v from kept"));
    }

    [SkippableFact]
    public async Task A_pid_file_naming_a_live_process_that_is_not_the_server_is_recovered_from()
    {
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var options = PostgresTestKit.Options(state.Path);
        await using (var pg = await EmbeddedPostgres.StartAsync(options))
            await pg.StopAsync();

        // After a crash and a reboot, the pid in postmaster.pid may belong to anything: this test process.
        var pidFile = Path.Combine(state.Path, "postgres", "data", "postmaster.pid");
        await File.WriteAllTextAsync(pidFile, $"{Environment.ProcessId}\n{Path.GetDirectoryName(pidFile)}\n");

        await using var again = await EmbeddedPostgres.StartAsync(options);
        Assert.False(again.Adopted);
        Assert.Equal(1, await PostgresTestKit.ScalarAsync<int>(again.ConnectionString, "select 1"));
    }

    [SkippableFact]
    public async Task A_server_left_running_by_a_crashed_kvmd_is_taken_over()
    {
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var options = PostgresTestKit.Options(state.Path);
        var crashed = await EmbeddedPostgres.StartAsync(options); // never disposed: its kvmd "crashed"
        var pid = crashed.ServerProcessId;

        await using var next = await EmbeddedPostgres.StartAsync(options);
        Assert.True(next.Adopted);
        Assert.Equal(pid, next.ServerProcessId);
        Assert.Equal(1, await PostgresTestKit.ScalarAsync<int>(next.ConnectionString, "select 1"));
    }

    [Fact]
    public async Task Missing_server_programs_give_an_error_naming_where_it_looked_and_what_to_install()
    {
        using var state = PostgresTestKit.NewStateDirectory();
        var empty = Directory.CreateDirectory(Path.Combine(state.Path, "empty-bin")).FullName;
        var e = await Assert.ThrowsAsync<InventoryException>(() =>
            EmbeddedPostgres.StartAsync(PostgresTestKit.Options(state.Path) with { BinarySearchDirectories = [empty] }));
        Assert.Contains(empty, e.Message);
        Assert.Contains("install postgresql", e.Message);
        Assert.False(Directory.Exists(Path.Combine(state.Path, "postgres")), "a failed start left a cluster directory");

        // A client-only installation: initdb and pg_ctl without the server itself.
        var partial = Directory.CreateDirectory(Path.Combine(state.Path, "partial-bin")).FullName;
        File.WriteAllText(Path.Combine(partial, "initdb"), "");
        File.WriteAllText(Path.Combine(partial, "pg_ctl"), "");
        var e2 = Assert.Throws<InventoryException>(() => PostgresBinaries.Find([partial]));
        Assert.Contains($"{partial} has no postgres", e2.Message);
    }

    [Fact]
    public void The_installed_server_is_found_with_its_version_where_Debian_puts_it()
    {
        if (!Directory.Exists(PostgresBinaries.DebianRoot))
        {
            PostgresTestKit.RequireServer(); // found elsewhere (PATH), or missing: say so
            return;
        }
        var found = PostgresBinaries.Find();
        Assert.StartsWith(PostgresBinaries.DebianRoot + "/", found.Directory);
        Assert.NotNull(found.MajorVersion);
        Assert.True(File.Exists(found.Postgres));
    }

    [SkippableFact]
    public async Task As_root_a_missing_server_user_is_named_with_how_to_provide_one()
    {
        TestEnvironment.SkipIf(PostgresTestKit.IsRoot ? null : "needs root: only a root kvmd runs the server as another user");
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var e = await Assert.ThrowsAsync<InventoryException>(() =>
            EmbeddedPostgres.StartAsync(PostgresTestKit.Options(state.Path) with { ServerUser = "kvm-no-such-user" }));
        Assert.Contains("'kvm-no-such-user', which does not exist", e.Message);
        Assert.Contains("refuses to run as root", e.Message);
    }

    [SkippableFact]
    public async Task As_root_a_state_directory_the_server_user_cannot_reach_is_named()
    {
        TestEnvironment.SkipIf(PostgresTestKit.IsRoot ? null : "needs root: only a root kvmd runs the server as another user");
        PostgresTestKit.RequireServer();
        using var state = PostgresTestKit.NewStateDirectory();
        var closed = Directory.CreateDirectory(Path.Combine(state.Path, "closed")).FullName;
        File.SetUnixFileMode(closed, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var e = await Assert.ThrowsAsync<InventoryException>(() =>
            EmbeddedPostgres.StartAsync(PostgresTestKit.Options(Path.Combine(closed, "kvmd"))));
        Assert.Contains($"cannot reach {closed}/kvmd/postgres", e.Message);
    }
}
