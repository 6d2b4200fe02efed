using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// The inventory's events, in id order. A reader remembers the last id it saw and asks for those
/// after it. Ids come from a sequence, so a transaction that commits late can make an id appear
/// below one already read: a reader that must see every event re-reads a short window behind its
/// last id (the NOTIFY-based follower to come handles this).
/// </summary>
public sealed class EventRepository(NpgsqlDataSource db)
{
    private const string Columns = "id, at, kind, subject, host, data::text as data";

    /// <summary>Appends an event; <paramref name="data"/> is a JSON object.</summary>
    public Task<EventRow> AppendAsync(string kind, string subject, string data = "{}", Guid? host = null, CancellationToken ct = default) =>
        DbErrors.Run($"record event '{kind}' of {subject}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleAsync<EventRecord>(
                $"insert into events (kind, subject, host, data) values (@kind, @subject, @host, @data::jsonb) returning {Columns}",
                new { kind, subject, host, data }).ConfigureAwait(false);
            return row.ToRow();
        }, e => e.SqlState switch
        {
            DbErrors.CheckViolation when e.ConstraintName == "events_kind_check" =>
                new InventoryException($"event kind '{kind}' is not allowed: use lower-case letters, digits, '.', '_' and '-', starting with a letter", e, RpcErrorCode.InvalidParams),
            DbErrors.InvalidTextRepresentation =>
                new InventoryException($"the data of event '{kind}' of {subject} is not valid JSON: {e.MessageText}", e, RpcErrorCode.InvalidParams),
            DbErrors.ForeignKeyViolation => DbErrors.NotFound($"host {host}"),
            _ => null,
        });

    /// <summary>The events after <paramref name="afterId"/> (0: from the first), oldest first, at most <paramref name="limit"/>.</summary>
    public Task<IReadOnlyList<EventRow>> ListSinceAsync(long afterId, int limit = 1000, CancellationToken ct = default) =>
        DbErrors.Run($"list events after {afterId}", async () =>
        {
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(limit);
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var rows = await conn.QueryAsync<EventRecord>(
                $"select {Columns} from events where id > @afterId order by id limit @limit", new { afterId, limit }).ConfigureAwait(false);
            return (IReadOnlyList<EventRow>)rows.Select(r => r.ToRow()).ToList();
        });

    /// <summary>The id of the newest event (0 when there is none): where a reader that wants only what happens next starts.</summary>
    public Task<long> NewestIdAsync(CancellationToken ct = default) =>
        DbErrors.Run("read the newest event's id", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            return await conn.ExecuteScalarAsync<long>("select coalesce(max(id), 0) from events").ConfigureAwait(false);
        });

    internal sealed record EventRecord(long Id, DateTime At, string Kind, string Subject, Guid? Host, string Data)
    {
        public EventRow ToRow() => new(Id, Times.Utc(At), Kind, Subject, Host, Data);
    }
}
