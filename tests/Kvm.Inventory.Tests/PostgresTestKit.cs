using Kvm.Interop.Native;
using Kvm.Inventory.Embedded;
using Kvm.Tests.Shared;
using Npgsql;

namespace Kvm.Inventory.Tests;

/// <summary>What the tests need from the machine: PostgreSQL's server programs, and throwaway state directories.</summary>
public static class PostgresTestKit
{
    /// <summary>Null when an embedded cluster can run here, else what is missing.</summary>
    public static string? ServerUnavailable()
    {
        try
        {
            PostgresBinaries.Find();
            ServerAccount.ForThisProcess(null);
            return null;
        }
        catch (InventoryException e)
        {
            return e.Message;
        }
    }

    /// <summary>Skips (fails under CI) unless an embedded cluster can run here.</summary>
    public static void RequireServer() => TestEnvironment.SkipIf(ServerUnavailable());

    public static bool IsRoot => Libc.GetEuid() == 0;

    /// <summary>
    /// A fresh directory under /tmp that the server's user can reach (a root test process runs the
    /// server as 'postgres'), removed by <see cref="TempState.Dispose"/>.
    /// </summary>
    public static TempState NewStateDirectory() => new();

    public static EmbeddedPostgresOptions Options(string stateDirectory) => new()
    {
        StateDirectory = stateDirectory,
        Durable = false,
        Timeout = TimeSpan.FromSeconds(30),
    };

    public static async Task<T> ScalarAsync<T>(string connectionString, string sql)
    {
        await using var conn = new NpgsqlConnection(connectionString);
        await conn.OpenAsync();
        await using var cmd = new NpgsqlCommand(sql, conn);
        return (T)(await cmd.ExecuteScalarAsync())!;
    }

    public static async Task ExecuteAsync(string connectionString, string sql)
    {
        await using var conn = new NpgsqlConnection(connectionString);
        await conn.OpenAsync();
        await using var cmd = new NpgsqlCommand(sql, conn);
        await cmd.ExecuteNonQueryAsync();
    }
}

public sealed class TempState : IDisposable
{
    public TempState()
    {
        Path = Directory.CreateTempSubdirectory("kvm-inventory-test-").FullName;
        File.SetUnixFileMode(Path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute |
            UnixFileMode.GroupExecute | UnixFileMode.OtherExecute);
    }

    public string Path { get; }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
