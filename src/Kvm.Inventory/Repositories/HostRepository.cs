using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>The hosts running kvmd: registration at start, heartbeats, the list.</summary>
public sealed class HostRepository(NpgsqlDataSource db)
{
    private const string Columns = "id, name, address, registered_at, last_seen";

    /// <summary>
    /// Registers host <paramref name="name"/> at <paramref name="address"/>, or updates the address
    /// and heartbeat of a host already registered under that name (the same host, restarted).
    /// </summary>
    public Task<HostRow> RegisterAsync(string name, string address, CancellationToken ct = default) =>
        DbErrors.Run($"register host '{name}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleAsync<HostRecord>($"""
                with h as (
                    insert into hosts (name, address) values (@name, @address)
                    on conflict (name) do update set address = excluded.address, last_seen = now()
                    returning {Columns}),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'host.registered', 'host/' || h.name, h.id, jsonb_build_object('address', h.address) from h)
                select {Columns} from h
                """, new { name, address }).ConfigureAwait(false);
            return row.ToRow();
        }, e => e.SqlState == DbErrors.CheckViolation && e.ConstraintName == "hosts_name_check"
            ? new InventoryException(InventoryNames.NotAllowed("host name", name), e, RpcErrorCode.InvalidParams)
            : null);

    /// <summary>Records that host <paramref name="id"/> is alive now; returns the time recorded.</summary>
    public Task<DateTimeOffset> HeartbeatAsync(Guid id, CancellationToken ct = default) =>
        DbErrors.Run($"record a heartbeat of host {id}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var seen = await conn.QuerySingleOrDefaultAsync<DateTime?>(
                "update hosts set last_seen = now() where id = @id returning last_seen", new { id }).ConfigureAwait(false);
            return seen is { } t ? Times.Utc(t) : throw DbErrors.NotFound($"host {id}");
        });

    public Task<HostRow?> FindAsync(string name, CancellationToken ct = default) =>
        DbErrors.Run($"read host '{name}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<HostRecord>($"select {Columns} from hosts where name = @name", new { name }).ConfigureAwait(false);
            return row?.ToRow();
        });

    public Task<IReadOnlyList<HostRow>> ListAsync(CancellationToken ct = default) =>
        DbErrors.Run("list hosts", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var rows = await conn.QueryAsync<HostRecord>($"select {Columns} from hosts order by name").ConfigureAwait(false);
            return (IReadOnlyList<HostRow>)rows.Select(r => r.ToRow()).ToList();
        });

    /// <summary>A hosts row as Npgsql reads it (timestamptz as a UTC DateTime).</summary>
    internal sealed record HostRecord(Guid Id, string Name, string Address, DateTime RegisteredAt, DateTime LastSeen)
    {
        public HostRow ToRow() => new(Id, Name, Address, Times.Utc(RegisteredAt), Times.Utc(LastSeen));
    }
}
