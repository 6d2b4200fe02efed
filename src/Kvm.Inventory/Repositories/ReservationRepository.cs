using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// Who uses a disk, and how: a writable disk is reserved exclusively (one holder, nobody else), a
/// read-only one or a backing image shared (any number of shared holders, no exclusive one). The
/// schema's trigger decides conflicts under a lock of the disk's row; this class turns its refusal
/// into a message naming the holders. Reserving, releasing and breaking record events
/// ('reservation.made', 'reservation.released', 'reservation.broken', subject 'disk/&lt;id&gt;'), so
/// a host waiting for a disk learns from the notifications when to try again.
/// <para>
/// Breaking: a reservation made under a lease (its token's kind, resource and generation are kept)
/// may be broken once that lease is no longer held by the reserving host at that generation, or
/// has expired: the holder has lost what entitled it. One made without a lease may be broken once
/// its host's heartbeat (hosts.last_seen) is older than the breaker's timeout. Both by the
/// database's clock. A host that acquires a lease again (a new generation) reserves its disks
/// again with the new token, which updates its reservations in place.
/// </para>
/// </summary>
public sealed class ReservationRepository(NpgsqlDataSource db)
{
    private const string RowSelect = """
        select r.id, r.disk, d.path as disk_path, r.holder_host, h.name as holder_host_name, r.holder_vm, v.name as holder_vm_name,
               r.mode, r.lease_kind, r.lease_resource, r.lease_generation, r.created_at
        """;

    private const string RowJoins = """
        join disks d on d.id = r.disk
        join hosts h on h.id = r.holder_host
        left join vms v on v.id = r.holder_vm
        """;

    /// <summary>
    /// Reserves disk <paramref name="disk"/> for VM <paramref name="holderVm"/> on host
    /// <paramref name="holderHost"/> (no VM: the host itself) in <paramref name="mode"/>. Under a
    /// lease (<paramref name="fence"/>, which must be <paramref name="holderHost"/>'s), the lease is
    /// checked in the same transaction (StaleLease when it has moved on) and kept with the
    /// reservation. The same holder reserving again changes its reservation's mode and lease. A
    /// conflict is refused (InvalidState) naming the holders and the modes.
    /// </summary>
    public Task<ReservationRow> ReserveAsync(Guid disk, Guid holderHost, Guid? holderVm, ReservationMode mode, LeaseToken? fence = null, CancellationToken ct = default)
    {
        CheckFence(holderHost, fence);
        return DbErrors.Run($"reserve disk {disk} {StateNames.Of(mode)} for {HolderText(holderHost, holderVm)}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var rows = await InTransactionAsync(conn, $"reserve disk {disk}", holderHost, holderVm, fence, ct,
                async tx => [await ReserveOneAsync(conn, tx, disk, holderHost, holderVm, mode, fence).ConfigureAwait(false)]).ConfigureAwait(false);
            return rows[0];
        });
    }

    /// <summary>
    /// Reserves the whole backing chain of disk <paramref name="top"/> for one holder, in one
    /// transaction (all or nothing): the top image exclusive (shared when
    /// <paramref name="readOnly"/>), each backing image shared. Returns the reservations, top first.
    /// A conflict on any image is refused naming that image and its holders, and reserves nothing.
    /// </summary>
    public Task<IReadOnlyList<ReservationRow>> ReserveChainAsync(Guid top, Guid holderHost, Guid? holderVm, bool readOnly, LeaseToken? fence = null, CancellationToken ct = default)
    {
        CheckFence(holderHost, fence);
        return DbErrors.Run($"reserve the backing chain of disk {top} for {HolderText(holderHost, holderVm)}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            return await InTransactionAsync(conn, $"reserve the backing chain of disk {top}", holderHost, holderVm, fence, ct, async tx =>
            {
                var chain = await DiskRepository.ChainAsync(conn, tx, top).ConfigureAwait(false);
                if (chain.Count == 0)
                    throw DbErrors.NotFound($"disk {top}");
                var rows = new List<ReservationRow>();
                for (int i = 0; i < chain.Count; i++)
                {
                    var mode = i == 0 && !readOnly ? ReservationMode.Exclusive : ReservationMode.Shared;
                    rows.Add(await ReserveOneAsync(conn, tx, chain[i].Id, holderHost, holderVm, mode, fence).ConfigureAwait(false));
                }
                return rows;
            }).ConfigureAwait(false);
        });
    }

    /// <summary>Releases the reservation of <paramref name="disk"/> by this holder, if any; returns whether there was one.</summary>
    public Task<bool> ReleaseAsync(Guid disk, Guid holderHost, Guid? holderVm, CancellationToken ct = default) =>
        DbErrors.Run($"release disk {disk} of {HolderText(holderHost, holderVm)}", async () =>
            await DeleteAsync("r.disk = @disk and r.holder_host = @holderHost and r.holder_vm is not distinct from @holderVm",
                new(disk, holderHost, holderVm, 0, null, "reservation.released"), null, ct).ConfigureAwait(false) > 0);

    /// <summary>Releases every reservation of this holder (a VM that stopped: its whole chain); returns how many there were.</summary>
    public Task<int> ReleaseAllAsync(Guid holderHost, Guid? holderVm, CancellationToken ct = default) =>
        DbErrors.Run($"release the disks of {HolderText(holderHost, holderVm)}", () =>
            DeleteAsync("r.holder_host = @holderHost and r.holder_vm is not distinct from @holderVm",
                new(null, holderHost, holderVm, 0, null, "reservation.released"), null, ct));

    /// <summary>
    /// Breaks the reservations (of <paramref name="disk"/>, or of every disk) whose holder has lost
    /// its claim, by the rule in the class's summary; <paramref name="heartbeatTimeout"/> judges
    /// reservations made without a lease. Records 'reservation.broken' for each, by host
    /// <paramref name="breaker"/>. Returns the broken reservations.
    /// </summary>
    public Task<IReadOnlyList<ReservationRow>> BreakAsync(Guid breaker, TimeSpan heartbeatTimeout, Guid? disk = null, CancellationToken ct = default)
    {
        var seconds = Times.Seconds(heartbeatTimeout, nameof(heartbeatTimeout));
        return DbErrors.Run($"break the lost reservations of {(disk is null ? "every disk" : $"disk {disk}")}", async () =>
        {
            var broken = new List<ReservationRow>();
            await DeleteAsync($"""
                (@disk::uuid is null or r.disk = @disk) and case
                    when r.lease_kind is not null then not exists (
                        select 1 from leases l
                        where l.resource_kind = r.lease_kind and l.resource_id = r.lease_resource and l.owner_host = r.holder_host
                          and l.generation = r.lease_generation and l.expires_at > clock_timestamp())
                    else exists (
                        select 1 from hosts hb
                        where hb.id = r.holder_host and hb.last_seen < clock_timestamp() - @seconds * interval '1 second')
                    end
                """, new(disk, null, null, seconds, breaker, "reservation.broken"), broken, ct).ConfigureAwait(false);
            return (IReadOnlyList<ReservationRow>)broken;
        });
    }

    /// <summary>The reservations of <paramref name="disk"/> (null: of every disk), by disk path and id.</summary>
    public Task<IReadOnlyList<ReservationRow>> ListAsync(Guid? disk = null, CancellationToken ct = default) =>
        DbErrors.Run(disk is null ? "list reservations" : $"list the reservations of disk {disk}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            return await ListAsync(conn, null, disk).ConfigureAwait(false);
        });

    internal static async Task<IReadOnlyList<ReservationRow>> ListAsync(NpgsqlConnection conn, NpgsqlTransaction? tx, Guid? disk)
    {
        var rows = await conn.QueryAsync<ReservationRecord>(
            $"{RowSelect} from reservations r {RowJoins} where @disk::uuid is null or r.disk = @disk order by d.path, r.id", new { disk }, tx).ConfigureAwait(false);
        return rows.Select(r => r.ToRow()).ToList();
    }

    private static void CheckFence(Guid holderHost, LeaseToken? fence)
    {
        if (fence is not null && fence.Host != holderHost)
            throw new ArgumentException($"a reservation for host {holderHost} cannot be made under another host's lease ({fence})", nameof(fence));
    }

    /// <summary>
    /// Runs <paramref name="reserve"/> in a transaction that first checks <paramref name="fence"/>
    /// (and keeps its lease locked until the commit), and turns the trigger's refusal into a
    /// message naming the holders in the way.
    /// </summary>
    private static async Task<IReadOnlyList<ReservationRow>> InTransactionAsync(NpgsqlConnection conn, string operation, Guid holderHost, Guid? holderVm, LeaseToken? fence,
        CancellationToken ct, Func<NpgsqlTransaction, Task<List<ReservationRow>>> reserve)
    {
        Conflict conflict;
        await using (var tx = await conn.BeginTransactionAsync(ct).ConfigureAwait(false))
        {
            try
            {
                if (fence is not null)
                    await Fences.LockAsync(conn, tx, fence, operation).ConfigureAwait(false);
                var rows = await reserve(tx).ConfigureAwait(false);
                await tx.CommitAsync(ct).ConfigureAwait(false);
                return rows;
            }
            catch (ConflictException c)
            {
                conflict = c.Conflict;
            }
            catch (PostgresException e) when (e.SqlState == DbErrors.ForeignKeyViolation)
            {
                throw e.ConstraintName switch
                {
                    "reservations_holder_host_fkey" => DbErrors.NotFound($"host {holderHost}"),
                    "reservations_holder_vm_fkey" => DbErrors.NotFound($"VM {holderVm}"),
                    _ => DbErrors.NotFound("the disk"),
                };
            }
        }
        // The transaction is rolled back: read who is in the way, as of now.
        var holders = (await ListAsync(conn, null, conflict.Disk).ConfigureAwait(false))
            .Where(r => !(r.HolderHost == holderHost && r.HolderVm == holderVm) && (conflict.Mode == ReservationMode.Exclusive || r.Mode == ReservationMode.Exclusive))
            .ToList();
        var names = await conn.QuerySingleAsync<HolderNames>(
            "select (select name from hosts where id = @holderHost) as host_name, (select name from vms where id = @holderVm) as vm_name",
            new { holderHost, holderVm }).ConfigureAwait(false);
        var who = names.VmName is null ? $"host '{names.HostName}'" : $"VM '{names.VmName}' on host '{names.HostName}'";
        var inTheWay = holders.Count == 0
            ? "reserved by a holder that has released it since: try again"
            : "reserved " + string.Join(", ", holders.Select(h => $"{StateNames.Of(h.Mode)} by {h.Holder}"));
        throw new InventoryException($"{operation}: disk '{conflict.Path}' is {inTheWay}, and cannot be reserved {StateNames.Of(conflict.Mode)} by {who}",
            conflict.Cause, RpcErrorCode.Conflict);
    }

    private static async Task<ReservationRow> ReserveOneAsync(NpgsqlConnection conn, NpgsqlTransaction tx, Guid disk, Guid holderHost, Guid? holderVm, ReservationMode mode, LeaseToken? fence)
    {
        var path = await conn.ExecuteScalarAsync<string?>("select path from disks where id = @disk", new { disk }, tx).ConfigureAwait(false)
            ?? throw DbErrors.NotFound($"disk {disk}");
        var args = new
        {
            disk, holderHost, holderVm, mode = StateNames.Of(mode),
            leaseKind = fence is null ? null : LeaseNames.Of(fence.Kind), leaseResource = fence?.ResourceId, leaseGeneration = fence?.Generation,
        };
        // A refusal aborts the whole transaction (all or nothing); the caller explains it after the rollback.
        try
        {
            // The holder's own reservation is changed in place (the trigger excludes the row it
            // checks); an insert would have the trigger count the holder's old row as a conflict.
            var id = await conn.ExecuteScalarAsync<long?>("""
                update reservations set mode = @mode, lease_kind = @leaseKind, lease_resource = @leaseResource, lease_generation = @leaseGeneration
                where disk = @disk and holder_host = @holderHost and holder_vm is not distinct from @holderVm
                returning id
                """, args, tx).ConfigureAwait(false);
            id ??= await conn.ExecuteScalarAsync<long>("""
                insert into reservations (disk, holder_host, holder_vm, mode, lease_kind, lease_resource, lease_generation)
                values (@disk, @holderHost, @holderVm, @mode, @leaseKind, @leaseResource, @leaseGeneration)
                returning id
                """, args, tx).ConfigureAwait(false);
            var row = (await conn.QuerySingleAsync<ReservationRecord>($"""
                with e as (
                    insert into events (kind, subject, host, data)
                    values ('reservation.made', 'disk/' || @disk::uuid, @holderHost, jsonb_build_object(
                        'reservation', @id::bigint, 'holder_vm', @holderVm::uuid, 'mode', @mode::text, 'lease_generation', @leaseGeneration::bigint)))
                {RowSelect} from reservations r {RowJoins} where r.id = @id
                """, new { id, disk, holderHost, holderVm, mode = StateNames.Of(mode), leaseGeneration = fence?.Generation }, tx).ConfigureAwait(false)).ToRow();
            return row;
        }
        catch (PostgresException e) when (e.SqlState == DbErrors.ExclusionViolation
            || (e.SqlState == DbErrors.UniqueViolation && e.ConstraintName == "reservations_one_exclusive"))
        {
            throw new ConflictException(new Conflict(disk, path, mode, e));
        }
    }

    /// <summary>Deletes the reservations matching <paramref name="condition"/> (on alias r), with an event each; adds them to <paramref name="deleted"/>.</summary>
    private async Task<int> DeleteAsync(string condition, DeleteArgs args, List<ReservationRow>? deleted, CancellationToken ct)
    {
        await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
        // The conditions are constants of this class, never user input; a condition uses some of
        // the arguments. The event's host is the breaker for a break, the holder for a release.
        var rows = await conn.QueryAsync<ReservationRecord>($"""
            with r as (
                delete from reservations r where {condition}
                returning r.*),
            e as (
                insert into events (kind, subject, host, data)
                select @eventKind, 'disk/' || r.disk, coalesce(@breaker::uuid, r.holder_host),
                       jsonb_build_object('reservation', r.id, 'holder_host', r.holder_host, 'holder_vm', r.holder_vm, 'mode', r.mode,
                                          'lease_kind', r.lease_kind, 'lease_generation', r.lease_generation) from r)
            {RowSelect} from r {RowJoins} order by d.path, r.id
            """, new { disk = args.Disk, holderHost = args.HolderHost, holderVm = args.HolderVm, seconds = args.Seconds, breaker = args.Breaker, eventKind = args.EventKind })
            .ConfigureAwait(false);
        var list = rows.Select(r => r.ToRow()).ToList();
        deleted?.AddRange(list);
        return list.Count;
    }

    /// <summary>What <see cref="DeleteAsync"/>'s conditions and event use; <see cref="Breaker"/> is null for a release.</summary>
    private sealed record DeleteArgs(Guid? Disk, Guid? HolderHost, Guid? HolderVm, double Seconds, Guid? Breaker, string EventKind);

    private static string HolderText(Guid host, Guid? vm) => vm is null ? $"host {host}" : $"VM {vm} on host {host}";

    private sealed record Conflict(Guid Disk, string Path, ReservationMode Mode, PostgresException Cause);

    private sealed class ConflictException(Conflict conflict) : Exception("reservation conflict")
    {
        public Conflict Conflict { get; } = conflict;
    }

    internal sealed record HolderNames(string? HostName, string? VmName);

    /// <summary>A reservations row as Npgsql reads it, with the names it refers to.</summary>
    internal sealed record ReservationRecord(long Id, Guid Disk, string DiskPath, Guid HolderHost, string HolderHostName, Guid? HolderVm, string? HolderVmName,
        string Mode, string? LeaseKind, Guid? LeaseResource, long? LeaseGeneration, DateTime CreatedAt)
    {
        public ReservationRow ToRow() => new(Id, Disk, DiskPath, HolderHost, HolderHostName, HolderVm, HolderVmName, StateNames.Mode(Mode),
            LeaseKind is { } k && LeaseResource is { } res && LeaseGeneration is { } g ? new LeaseToken(LeaseNames.Kind(k), res, HolderHost, g) : null,
            Times.Utc(CreatedAt));
    }
}
