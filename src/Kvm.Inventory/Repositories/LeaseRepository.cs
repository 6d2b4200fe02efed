using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// Leases: a host owns a VM, a disk or a host role only while it holds the lease on it. Every
/// acquisition (a free lease, an expired one broken, or one the host already holds) makes the
/// generation grow by one; the generation never goes back, so a <see cref="LeaseToken"/> is a
/// fencing token (VmRepository's and ReservationRepository's writes under a lease check it).
/// Expiries are computed and compared by the database's clock (clock_timestamp()), never by a
/// host's. Acquiring, breaking and releasing record events in the same transaction; renewing does
/// not (it happens every few seconds for every lease).
/// </summary>
public sealed class LeaseRepository(NpgsqlDataSource db)
{
    private const string RowColumns = "l.resource_kind, l.resource_id, l.owner_host, h.name as owner_name, l.expires_at, l.generation, l.acquired_at";

    /// <summary>
    /// Acquires the lease on <paramref name="resourceId"/> for <paramref name="host"/>, until the
    /// database's clock plus <paramref name="duration"/>. Succeeds when the lease is free, when it
    /// has expired (that breaks it: a 'lease.broken' event names the previous owner and
    /// generation), or when <paramref name="host"/> already holds it; each time the generation
    /// grows by one. A lease another host holds unexpired is refused (InvalidState) naming that
    /// host and the expiry. A resource or host that does not exist is a NotFound error.
    /// </summary>
    public Task<LeaseGrant> AcquireAsync(LeaseKind kind, Guid resourceId, Guid host, TimeSpan duration, CancellationToken ct = default)
    {
        var k = LeaseNames.Of(kind);
        var seconds = Times.Seconds(duration, nameof(duration));
        return DbErrors.Run($"acquire the lease on {LeaseNames.Noun(kind)} {resourceId} for host {host}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            await using var tx = await conn.BeginTransactionAsync(ct).ConfigureAwait(false);
            var subject = await conn.ExecuteScalarAsync<string?>("select lease_subject(@k, @resourceId)", new { k, resourceId }, tx).ConfigureAwait(false)
                ?? throw DbErrors.NotFound($"{LeaseNames.Noun(kind)} {resourceId}");
            // The row outlives its holders; the first acquisition makes it. Concurrent first
            // acquisitions wait here for the one that inserts, then all queue on the row lock below.
            await conn.ExecuteAsync("insert into leases (resource_kind, resource_id) values (@k, @resourceId) on conflict do nothing",
                new { k, resourceId }, tx).ConfigureAwait(false);
            var held = await conn.QuerySingleAsync<HeldRecord>("""
                select l.owner_host, h.name as owner_name, l.expires_at, l.generation,
                       coalesce(l.expires_at <= clock_timestamp(), false) as expired,
                       extract(epoch from l.expires_at - clock_timestamp())::float8 as remaining
                from leases l left join hosts h on h.id = l.owner_host
                where l.resource_kind = @k and l.resource_id = @resourceId
                for update of l
                """, new { k, resourceId }, tx).ConfigureAwait(false);
            if (held.OwnerHost is { } owner && owner != host && !held.Expired)
                throw new InventoryException(
                    $"the lease on {subject} is held by host '{held.OwnerName}' until {Times.Text(held.ExpiresAt!.Value)} " +
                    $"(for {held.Remaining:0.0} s more by the database's clock; generation {held.Generation})",
                    code: RpcErrorCode.InvalidState);

            if (held.OwnerHost is { } previous && previous != host)
            {
                // Expired (else refused above): breaking it. The row stays locked until the commit,
                // so the previous owner cannot renew it meanwhile (nor after: its generation is gone).
                await conn.ExecuteAsync("""
                    insert into events (kind, subject, host, data)
                    values ('lease.broken', @subject, @host, jsonb_build_object(
                        'kind', @k::text, 'id', @resourceId::uuid, 'previous_owner', @previous::uuid, 'previous_owner_name', @previousName::text,
                        'previous_generation', @generation::bigint, 'expired_at', @expiresAt::timestamptz))
                    """, new { subject, host, k, resourceId, previous, previousName = held.OwnerName, generation = held.Generation, expiresAt = held.ExpiresAt }, tx).ConfigureAwait(false);
            }
            var grant = await conn.QuerySingleAsync<GrantRecord>("""
                with l as (
                    update leases set owner_host = @host, generation = generation + 1, acquired_at = clock_timestamp(),
                                      expires_at = clock_timestamp() + @seconds * interval '1 second'
                    where resource_kind = @k and resource_id = @resourceId
                    returning generation, expires_at),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'lease.acquired', @subject, @host,
                           jsonb_build_object('kind', @k::text, 'id', @resourceId::uuid, 'generation', l.generation, 'expires_at', l.expires_at) from l)
                select generation, expires_at from l
                """, new { host, seconds, k, resourceId, subject }, tx).ConfigureAwait(false);
            await tx.CommitAsync(ct).ConfigureAwait(false);
            return new LeaseGrant(new LeaseToken(kind, resourceId, host, grant.Generation), Times.Utc(grant.ExpiresAt));
        }, e => e.SqlState == DbErrors.ForeignKeyViolation ? DbErrors.NotFound($"host {host}") : null);
    }

    /// <summary>
    /// Renews, in one statement, each of <paramref name="tokens"/> that <paramref name="host"/> still
    /// holds at the token's generation, until the database's clock plus <paramref name="duration"/>;
    /// returns the renewed ones. A lease missing from the result is lost: stop acting on it.
    /// A lease whose expiry has passed is not renewed even when nobody has taken it yet: from
    /// that moment any host may break it, and a renewal racing that break would leave the holder
    /// believing in a lease another host is entitled to; the holder must acquire it again (a new
    /// generation) instead.
    /// </summary>
    public Task<IReadOnlyList<LeaseGrant>> RenewAsync(Guid host, IReadOnlyList<LeaseToken> tokens, TimeSpan duration, CancellationToken ct = default)
    {
        var seconds = Times.Seconds(duration, nameof(duration));
        if (tokens.FirstOrDefault(t => t.Host != host) is { } foreign)
            throw new ArgumentException($"token {foreign} is not host {host}'s", nameof(tokens));
        return DbErrors.Run($"renew {tokens.Count} leases of host {host}", async () =>
        {
            if (tokens.Count == 0)
                return (IReadOnlyList<LeaseGrant>)[];
            // The tokens travel as one JSON text: Dapper.AOT does not generate array parameters
            // (Dapper would fall back to reflection, which a NativeAOT kvmd cannot use).
            var buffer = new System.Buffers.ArrayBufferWriter<byte>();
            using (var w = new System.Text.Json.Utf8JsonWriter(buffer))
            {
                w.WriteStartArray();
                foreach (var t in tokens)
                {
                    w.WriteStartObject();
                    w.WriteString("kind", LeaseNames.Of(t.Kind));
                    w.WriteString("id", t.ResourceId);
                    w.WriteNumber("generation", t.Generation);
                    w.WriteEndObject();
                }
                w.WriteEndArray();
            }
            string list = System.Text.Encoding.UTF8.GetString(buffer.WrittenSpan);
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            // clock_timestamp() in the condition is read when each row is checked, also when the
            // row is re-checked after waiting for a concurrent acquisition's lock.
            var rows = await conn.QueryAsync<RenewedRecord>("""
                update leases l set expires_at = clock_timestamp() + @seconds * interval '1 second'
                from jsonb_to_recordset(@list::jsonb) as t(kind text, id uuid, generation bigint)
                where l.resource_kind = t.kind and l.resource_id = t.id and l.generation = t.generation
                  and l.owner_host = @host and l.expires_at > clock_timestamp()
                returning l.resource_kind, l.resource_id, l.generation, l.expires_at
                """, new { seconds, list, host }).ConfigureAwait(false);
            return (IReadOnlyList<LeaseGrant>)rows
                .Select(r => new LeaseGrant(new LeaseToken(LeaseNames.Kind(r.ResourceKind), r.ResourceId, host, r.Generation), Times.Utc(r.ExpiresAt)))
                .ToList();
        });
    }

    /// <summary>
    /// Frees the lease of <paramref name="token"/> if it is still held at that generation (expired
    /// or not: nobody else holds it) and records 'lease.released'; returns whether it did. A lease
    /// that has moved on (broken, acquired again) is left as it is, without an error: the token's
    /// holder has nothing left to release.
    /// </summary>
    public Task<bool> ReleaseAsync(LeaseToken token, CancellationToken ct = default) =>
        DbErrors.Run($"release the lease {token}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var released = await conn.ExecuteScalarAsync<long>("""
                with l as (
                    update leases set owner_host = null, expires_at = null, acquired_at = null
                    where resource_kind = @kind and resource_id = @id and owner_host = @host and generation = @generation
                    returning resource_kind, resource_id, generation),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'lease.released', coalesce(lease_subject(l.resource_kind, l.resource_id), l.resource_kind || '/' || l.resource_id), @host,
                           jsonb_build_object('kind', l.resource_kind, 'id', l.resource_id, 'generation', l.generation) from l)
                select count(*) from l
                """, new { kind = LeaseNames.Of(token.Kind), id = token.ResourceId, host = token.Host, generation = token.Generation }).ConfigureAwait(false);
            return released > 0;
        });

    /// <summary>Every lease (held or free), by kind and resource.</summary>
    public Task<IReadOnlyList<LeaseRow>> ListAsync(CancellationToken ct = default) =>
        DbErrors.Run("list leases", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var rows = await conn.QueryAsync<LeaseRecord>(
                $"select {RowColumns} from leases l left join hosts h on h.id = l.owner_host order by l.resource_kind, l.resource_id").ConfigureAwait(false);
            return (IReadOnlyList<LeaseRow>)rows.Select(r => r.ToRow()).ToList();
        });

    /// <summary>The lease on <paramref name="id"/>, or null when it has never been acquired.</summary>
    public Task<LeaseRow?> FindAsync(LeaseKind kind, Guid id, CancellationToken ct = default) =>
        DbErrors.Run($"read the lease on {LeaseNames.Noun(kind)} {id}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<LeaseRecord>(
                $"select {RowColumns} from leases l left join hosts h on h.id = l.owner_host where l.resource_kind = @kind and l.resource_id = @id",
                new { kind = LeaseNames.Of(kind), id }).ConfigureAwait(false);
            return row?.ToRow();
        });

    internal sealed record HeldRecord(Guid? OwnerHost, string? OwnerName, DateTime? ExpiresAt, long Generation, bool Expired, double? Remaining);

    internal sealed record GrantRecord(long Generation, DateTime ExpiresAt);

    internal sealed record RenewedRecord(string ResourceKind, Guid ResourceId, long Generation, DateTime ExpiresAt);

    /// <summary>A leases row as Npgsql reads it, with its owner's name.</summary>
    internal sealed record LeaseRecord(string ResourceKind, Guid ResourceId, Guid? OwnerHost, string? OwnerName, DateTime? ExpiresAt, long Generation, DateTime? AcquiredAt)
    {
        public LeaseRow ToRow() => new(LeaseNames.Kind(ResourceKind), ResourceId, OwnerHost, OwnerName,
            ExpiresAt is { } e ? Times.Utc(e) : null, Generation, AcquiredAt is { } a ? Times.Utc(a) : null);
    }
}
