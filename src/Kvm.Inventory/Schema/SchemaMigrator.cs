using System.Globalization;
using System.Text.RegularExpressions;
using Dapper;
using Npgsql;

namespace Kvm.Inventory.Schema;

/// <summary>One step of the schema: version N is the file Schema/NNNN_name.sql, embedded in this assembly.</summary>
public sealed record Migration(int Version, string Name, string Sql)
{
    public override string ToString() => $"{Version:D4}_{Name}";
}

/// <summary>What <see cref="SchemaMigrator.ApplyAsync(NpgsqlDataSource, CancellationToken)"/> found and did.</summary>
public sealed record MigrationResult(int FromVersion, int ToVersion, IReadOnlyList<Migration> Applied);

/// <summary>A row of schema_migrations.</summary>
public sealed record AppliedMigration(int Version, string Name, DateTime AppliedAt);

/// <summary>
/// Brings a database's schema up to the version this code knows, at each kvmd start. The
/// migrations not yet applied run in order in one transaction, which first takes a transaction
/// advisory lock: kvmds starting at once against one shared cluster apply them one after the
/// other, and the later ones find nothing left to do. A database whose schema is newer than this
/// code knows is refused, untouched.
/// </summary>
public static partial class SchemaMigrator
{
    /// <summary>The advisory lock key that serializes migrations ("kvmdinv" in ASCII).</summary>
    public const long AdvisoryLockKey = 0x6b766d64696e76;

    /// <summary>Every migration this code knows, in version order.</summary>
    public static IReadOnlyList<Migration> Known { get; } = Load();

    /// <summary>The schema version this code knows.</summary>
    public static int LatestVersion => Known[^1].Version;

    public static Task<MigrationResult> ApplyAsync(NpgsqlDataSource db, CancellationToken ct = default) => ApplyAsync(db, Known, ct);

    /// <summary>Applies <paramref name="migrations"/> (versions 1, 2, ... in order) that the database lacks.</summary>
    public static async Task<MigrationResult> ApplyAsync(NpgsqlDataSource db, IReadOnlyList<Migration> migrations, CancellationToken ct = default)
    {
        Validate(migrations);
        var latest = migrations.Count == 0 ? 0 : migrations[^1].Version;
        await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
        var where = $"database '{conn.Database}' at {conn.Host}";
        await using var tx = await conn.BeginTransactionAsync(ct).ConfigureAwait(false);
        await conn.ExecuteAsync("select pg_advisory_xact_lock(@key)", new { key = AdvisoryLockKey }, tx).ConfigureAwait(false);
        await conn.ExecuteAsync("""
            create table if not exists schema_migrations (
                version    integer     primary key check (version > 0),
                name       text        not null,
                applied_at timestamptz not null default now()
            )
            """, transaction: tx).ConfigureAwait(false);
        var applied = (await conn.QueryAsync<AppliedMigration>(
            "select version, name, applied_at from schema_migrations order by version", transaction: tx).ConfigureAwait(false)).ToList();

        var current = applied.Count == 0 ? 0 : applied[^1].Version;
        if (current > latest)
            throw new InventoryException(
                $"the inventory schema of {where} is version {current} ({applied[^1].Name}), newer than this kvmd knows (version {latest}): " +
                "run a kvmd at least as new as the one that upgraded it, or use another database");
        foreach (var a in applied)
        {
            var known = migrations.FirstOrDefault(m => m.Version == a.Version);
            if (known is null || known.Name != a.Name)
                throw new InventoryException(
                    $"the inventory schema of {where} has migration {a.Version} applied as '{a.Name}', which this kvmd knows as '{known?.Name ?? "nothing"}': " +
                    "the database was migrated by a different build");
        }

        var pending = migrations.Where(m => m.Version > current).ToList();
        foreach (var m in pending)
        {
            try
            {
                await using (var cmd = new NpgsqlCommand(m.Sql, conn, tx))
                    await cmd.ExecuteNonQueryAsync(ct).ConfigureAwait(false);
                await conn.ExecuteAsync("insert into schema_migrations (version, name) values (@Version, @Name)", m, tx).ConfigureAwait(false);
            }
            catch (PostgresException e)
            {
                throw new InventoryException($"schema migration {m} of {where} failed; nothing of it or of the ones after it was applied", e);
            }
        }
        await tx.CommitAsync(ct).ConfigureAwait(false);
        return new MigrationResult(current, pending.Count > 0 ? pending[^1].Version : current, pending);
    }

    /// <summary>The applied migrations (empty for a database kvmd has never used).</summary>
    public static async Task<IReadOnlyList<AppliedMigration>> AppliedAsync(NpgsqlDataSource db, CancellationToken ct = default)
    {
        await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
        if (await conn.ExecuteScalarAsync<string?>("select to_regclass('schema_migrations')::text").ConfigureAwait(false) is null)
            return [];
        return (await conn.QueryAsync<AppliedMigration>("select version, name, applied_at from schema_migrations order by version").ConfigureAwait(false)).ToList();
    }

    private static void Validate(IReadOnlyList<Migration> migrations)
    {
        for (int i = 0; i < migrations.Count; i++)
        {
            if (migrations[i].Version != i + 1)
                throw new InventoryException($"schema migration {migrations[i]} is out of order: version {i + 1} expected at position {i + 1}");
        }
    }

    [GeneratedRegex(@"^schema/(\d{4})_([a-z0-9_]+)\.sql$")]
    private static partial Regex ResourceName();

    private static List<Migration> Load()
    {
        var asm = typeof(SchemaMigrator).Assembly;
        var list = new List<Migration>();
        foreach (var res in asm.GetManifestResourceNames())
        {
            var m = ResourceName().Match(res);
            if (!m.Success)
                continue;
            using var s = asm.GetManifestResourceStream(res)!;
            using var r = new StreamReader(s);
            list.Add(new Migration(int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture), m.Groups[2].Value, r.ReadToEnd()));
        }
        list.Sort((a, b) => a.Version.CompareTo(b.Version));
        Validate(list);
        return list;
    }
}
