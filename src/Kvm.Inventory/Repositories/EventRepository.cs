using System.Diagnostics;
using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// The inventory's events, in id order. A reader remembers the last id it saw and asks for those
/// after it. Ids come from a sequence, so a transaction that commits late can make an id appear
/// below one already read: a reader that must see every event re-reads a short window behind its
/// last id (<see cref="InventoryNotifications"/> does). Each event is announced at its commit on
/// channel <see cref="InventoryNotifications.Channel"/> (schema v2's trigger).
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
    public Task<IReadOnlyList<EventRow>> ReadAfterAsync(long afterId, int limit = 1000, CancellationToken ct = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(limit);
        return DbErrors.Run($"list events after {afterId}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            return await ReadAfterAsync(conn, afterId, limit).ConfigureAwait(false);
        });
    }

    /// <summary>The same as <see cref="ReadAfterAsync(long, int, CancellationToken)"/>.</summary>
    public Task<IReadOnlyList<EventRow>> ListSinceAsync(long afterId, int limit = 1000, CancellationToken ct = default) => ReadAfterAsync(afterId, limit, ct);

    /// <summary>
    /// The events after <paramref name="afterId"/>, at most <paramref name="limit"/>, waiting up to
    /// <paramref name="timeout"/> for the first one when there is none yet (a long poll: empty
    /// when the time is up). Holds a connection of its own, listening, while it waits.
    /// </summary>
    public Task<IReadOnlyList<EventRow>> WaitAfterAsync(long afterId, TimeSpan timeout, int limit = 1000, CancellationToken ct = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(limit);
        return DbErrors.Run($"wait for events after {afterId}", async () =>
        {
            var deadline = Stopwatch.GetTimestamp() + (long)(Math.Max(timeout.TotalSeconds, 0) * Stopwatch.Frequency);
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var notified = false;
            conn.Notification += (_, _) => notified = true;
            await using (var listen = new NpgsqlCommand($"listen {InventoryNotifications.Channel}", conn))
                await listen.ExecuteNonQueryAsync(ct).ConfigureAwait(false);
            try
            {
                while (true)
                {
                    // Listening before reading: an event committed after the read is announced.
                    notified = false;
                    var rows = await ReadAfterAsync(conn, afterId, limit).ConfigureAwait(false);
                    var left = Stopwatch.GetElapsedTime(Stopwatch.GetTimestamp(), deadline);
                    if (rows.Count > 0 || left <= TimeSpan.Zero)
                        return rows;
                    // In whole milliseconds, rounded up: Npgsql takes a timeout of 0 ms as no
                    // timeout at all, so a wait with less than 1 ms left (a notification just
                    // before the deadline, or a tiny timeout) waited for the next event, however late.
                    if (!notified)
                        await conn.WaitAsync((int)Math.Ceiling(left.TotalMilliseconds), ct).ConfigureAwait(false);
                }
            }
            finally
            {
                // The connection goes back to the pool: it must not keep listening. A broken one
                // is not pooled again.
                if (conn.FullState == System.Data.ConnectionState.Open)
                {
                    try
                    {
                        await using var unlisten = new NpgsqlCommand("unlisten *", conn);
                        await unlisten.ExecuteNonQueryAsync(CancellationToken.None).ConfigureAwait(false);
                    }
                    catch (NpgsqlException)
                    {
                    }
                }
            }
        });
    }

    internal static async Task<IReadOnlyList<EventRow>> ReadAfterAsync(NpgsqlConnection conn, long afterId, int limit)
    {
        var rows = await conn.QueryAsync<EventRecord>(
            $"select {Columns} from events where id > @afterId order by id limit @limit", new { afterId, limit }).ConfigureAwait(false);
        return rows.Select(r => r.ToRow()).ToList();
    }

    /// <summary>The events with ids from <paramref name="fromId"/> to <paramref name="toId"/>, in id order.</summary>
    internal static async Task<IReadOnlyList<EventRow>> ReadRangeAsync(NpgsqlConnection conn, long fromId, long toId)
    {
        var rows = await conn.QueryAsync<EventRecord>(
            $"select {Columns} from events where id between @fromId and @toId order by id", new { fromId, toId }).ConfigureAwait(false);
        return rows.Select(r => r.ToRow()).ToList();
    }

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
