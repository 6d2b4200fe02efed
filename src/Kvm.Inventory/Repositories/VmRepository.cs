using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// The VMs of the inventory, by name. Each change records its event in the same statement, so
/// the events never miss a change nor tell of one that did not happen.
/// </summary>
public sealed class VmRepository(NpgsqlDataSource db)
{
    private const string Columns = "id, name, spec::text as spec, desired_state, actual_state, owner_host, created_at, updated_at, restart_policy";

    /// <summary>
    /// Creates VM <paramref name="name"/> with <paramref name="spec"/> (a JSON object), desired and
    /// actual state 'stopped'. A name already taken is an AlreadyExists error naming it.
    /// </summary>
    public Task<VmRow> CreateAsync(string name, string spec, Guid? ownerHost = null, CancellationToken ct = default) =>
        CreateAsync(name, spec, VmRestartPolicy.No, ownerHost, ct);

    /// <summary>As <see cref="CreateAsync(string, string, Guid?, CancellationToken)"/>, with what kvmd does when the VM ends unasked.</summary>
    public Task<VmRow> CreateAsync(string name, string spec, VmRestartPolicy restart, Guid? ownerHost = null, CancellationToken ct = default) =>
        DbErrors.Run($"create VM '{name}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleAsync<VmRecord>($"""
                with v as (
                    insert into vms (name, spec, owner_host, restart_policy) values (@name, @spec::jsonb, @ownerHost, @restart)
                    returning *),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'vm.created', 'vm/' || v.name, v.owner_host, jsonb_build_object('id', v.id) from v)
                select {Columns} from v
                """, new { name, spec, ownerHost, restart = StateNames.Of(restart) }).ConfigureAwait(false);
            return row.ToRow();
        }, e => e.SqlState switch
        {
            DbErrors.UniqueViolation when e.ConstraintName == "vms_name_key" =>
                new InventoryException($"a VM named '{name}' already exists", e, RpcErrorCode.AlreadyExists),
            DbErrors.CheckViolation when e.ConstraintName == "vms_name_check" =>
                new InventoryException(InventoryNames.NotAllowed("VM name", name), e, RpcErrorCode.InvalidParams),
            DbErrors.CheckViolation when e.ConstraintName == "vms_spec_check" =>
                new InventoryException($"the spec of VM '{name}' is not a JSON object", e, RpcErrorCode.InvalidParams),
            DbErrors.InvalidTextRepresentation =>
                new InventoryException($"the spec of VM '{name}' is not valid JSON: {e.MessageText}", e, RpcErrorCode.InvalidParams),
            DbErrors.ForeignKeyViolation => OwnerMissing(ownerHost, e),
            _ => null,
        });

    /// <summary>VM <paramref name="name"/>, or null.</summary>
    public Task<VmRow?> FindAsync(string name, CancellationToken ct = default) =>
        DbErrors.Run($"read VM '{name}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<VmRecord>($"select {Columns} from vms where name = @name", new { name }).ConfigureAwait(false);
            return row?.ToRow();
        });

    /// <summary>VM <paramref name="name"/>; a NotFound error naming it when there is none.</summary>
    public async Task<VmRow> GetAsync(string name, CancellationToken ct = default) =>
        await FindAsync(name, ct).ConfigureAwait(false) ?? throw DbErrors.NotFound($"VM '{name}'");

    /// <summary>Every VM, by name.</summary>
    public Task<IReadOnlyList<VmRow>> ListAsync(CancellationToken ct = default) =>
        DbErrors.Run("list VMs", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var rows = await conn.QueryAsync<VmRecord>($"select {Columns} from vms order by name").ConfigureAwait(false);
            return (IReadOnlyList<VmRow>)rows.Select(r => r.ToRow()).ToList();
        });

    /// <summary>Sets what the user wants VM <paramref name="name"/> to be; returns the row as it now is.</summary>
    public Task<VmRow> SetDesiredStateAsync(string name, VmDesiredState state, CancellationToken ct = default) =>
        UpdateAsync(name, $"set desired state of VM '{name}' to {StateNames.Of(state)}", "desired_state = @value", "vm.desired-state", StateNames.Of(state), ct);

    /// <summary>Records what VM <paramref name="name"/> was seen to be; returns the row as it now is.</summary>
    public Task<VmRow> SetActualStateAsync(string name, VmActualState state, CancellationToken ct = default) =>
        UpdateAsync(name, $"set actual state of VM '{name}' to {StateNames.Of(state)}", "actual_state = @value", "vm.actual-state", StateNames.Of(state), ct);

    /// <summary>Records which host runs VM <paramref name="name"/> (null: none); returns the row as it now is.</summary>
    public Task<VmRow> SetOwnerHostAsync(string name, Guid? host, CancellationToken ct = default) =>
        DbErrors.Run($"set the host of VM '{name}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<VmRecord>($"""
                with v as (
                    update vms set owner_host = @host, updated_at = now() where name = @name
                    returning *),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'vm.owner', 'vm/' || v.name, v.owner_host, jsonb_build_object('host', v.owner_host) from v)
                select {Columns} from v
                """, new { name, host }).ConfigureAwait(false);
            return row?.ToRow() ?? throw DbErrors.NotFound($"VM '{name}'");
        }, e => e.SqlState == DbErrors.ForeignKeyViolation ? OwnerMissing(host, e) : null);

    /// <summary>Deletes VM <paramref name="name"/>; a NotFound error naming it when there is none.</summary>
    public Task DeleteAsync(string name, CancellationToken ct = default) =>
        DbErrors.Run($"delete VM '{name}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var deleted = await conn.ExecuteScalarAsync<Guid?>("""
                with v as (delete from vms where name = @name returning id, name, owner_host),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'vm.deleted', 'vm/' || v.name, v.owner_host, jsonb_build_object('id', v.id) from v)
                select id from v
                """, new { name }).ConfigureAwait(false);
            return deleted ?? throw DbErrors.NotFound($"VM '{name}'");
        });

    private Task<VmRow> UpdateAsync(string name, string operation, string assignment, string eventKind, string value, CancellationToken ct) =>
        DbErrors.Run(operation, async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            // The assignments are constants of this class, never user input.
            var row = await conn.QuerySingleOrDefaultAsync<VmRecord>($"""
                with v as (
                    update vms set {assignment}, updated_at = now() where name = @name
                    returning *),
                e as (
                    insert into events (kind, subject, host, data)
                    select @eventKind, 'vm/' || v.name, v.owner_host, jsonb_build_object('state', @value::text) from v)
                select {Columns} from v
                """, new { name, value, eventKind }).ConfigureAwait(false);
            return row?.ToRow() ?? throw DbErrors.NotFound($"VM '{name}'");
        });

    /// <summary>
    /// Records what VM <paramref name="name"/> was seen to be, under its lease: the row changes only
    /// if, in the same statement, the VM's lease is held by <paramref name="fence"/>'s host at its
    /// generation and unexpired; else a StaleLease error naming the lease's current owner and
    /// generation, and nothing changes.
    /// </summary>
    public Task<VmRow> SetActualStateAsync(string name, VmActualState state, LeaseToken fence, CancellationToken ct = default) =>
        UpdateUnderLeaseAsync(name, $"set actual state of VM '{name}' to {StateNames.Of(state)}", fence, "actual_state = @value",
            "'vm.actual-state', 'vm/' || v.name, v.owner_host, jsonb_build_object('state', @value::text, 'generation', @fenceGeneration::bigint)",
            StateNames.Of(state), null, ct);

    /// <summary>
    /// Records which host runs VM <paramref name="name"/> (null: none), under its lease, as
    /// <see cref="SetActualStateAsync(string, VmActualState, LeaseToken, CancellationToken)"/> does.
    /// </summary>
    public Task<VmRow> SetOwnerAsync(string name, Guid? owner, LeaseToken fence, CancellationToken ct = default) =>
        UpdateUnderLeaseAsync(name, $"set the host of VM '{name}'", fence, "owner_host = @owner",
            "'vm.owner', 'vm/' || v.name, v.owner_host, jsonb_build_object('host', v.owner_host, 'generation', @fenceGeneration::bigint)",
            null, owner, ct);

    /// <summary>
    /// Replaces VM <paramref name="name"/>'s spec (JSON of a VmSpec), under its lease, as
    /// <see cref="SetActualStateAsync(string, VmActualState, LeaseToken, CancellationToken)"/> does:
    /// what a running VM changed about itself (a checkpoint moved its disks onto new top images),
    /// so that its next start runs it as it now is. Records 'vm.spec' with <paramref name="why"/>.
    /// </summary>
    public Task<VmRow> SetSpecAsync(string name, string spec, string why, LeaseToken fence, CancellationToken ct = default) =>
        UpdateUnderLeaseAsync(name, $"set the spec of VM '{name}'", fence, "spec = @value::jsonb",
            "'vm.spec', 'vm/' || v.name, v.owner_host, jsonb_build_object('why', @why::text, 'generation', @fenceGeneration::bigint)",
            spec, null, ct, why);

    private Task<VmRow> UpdateUnderLeaseAsync(string name, string operation, LeaseToken fence, string assignment, string eventValues, string? value, Guid? owner, CancellationToken ct,
        string? why = null)
    {
        if (fence.Kind != LeaseKind.Vm)
            throw new ArgumentException($"a VM's row is written under the VM's lease, not under {fence}", nameof(fence));
        return DbErrors.Run(operation, async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            // The lease row is locked FOR SHARE while checked: an acquisition or a break of the
            // lease waits for this statement, and one that committed first fails the check (its
            // newer generation is what the check sees after the wait). The assignments and event
            // values are constants of this class, never user input.
            var row = await conn.QuerySingleOrDefaultAsync<VmRecord>($"""
                with v as (
                    update vms set {assignment}, updated_at = now()
                    where name = @name and id = @fenceResource and exists (
                        select 1 from leases l
                        where l.resource_kind = 'vm' and l.resource_id = vms.id and {Fences.Holds("l")}
                        for share)
                    returning *),
                e as (
                    insert into events (kind, subject, host, data)
                    select {eventValues} from v)
                select {Columns} from v
                """, new { name, value, owner, why, fenceResource = fence.ResourceId, fenceHost = fence.Host, fenceGeneration = fence.Generation }).ConfigureAwait(false);
            if (row is not null)
                return row.ToRow();
            var id = await conn.ExecuteScalarAsync<Guid?>("select id from vms where name = @name", new { name }).ConfigureAwait(false)
                ?? throw DbErrors.NotFound($"VM '{name}'");
            if (id != fence.ResourceId)
                throw new InventoryException($"{operation}: the token is for the lease on VM {fence.ResourceId}, not on VM '{name}' ({id})", code: RpcErrorCode.InvalidParams);
            throw await Fences.StaleAsync(conn, null, fence, operation).ConfigureAwait(false);
        }, e => e.SqlState == DbErrors.ForeignKeyViolation ? OwnerMissing(owner, e) : null);
    }

    private static InventoryException OwnerMissing(Guid? host, PostgresException e) =>
        new($"host {host} does not exist", e, RpcErrorCode.NotFound);

    /// <summary>A vms row as Npgsql reads it: states as text, timestamptz as a UTC DateTime.</summary>
    internal sealed record VmRecord(Guid Id, string Name, string Spec, string DesiredState, string ActualState, Guid? OwnerHost, DateTime CreatedAt, DateTime UpdatedAt, string RestartPolicy)
    {
        public VmRow ToRow() => new(Id, Name, Spec, StateNames.Desired(DesiredState), StateNames.Actual(ActualState), OwnerHost, Times.Utc(CreatedAt), Times.Utc(UpdatedAt),
            StateNames.RestartPolicy(RestartPolicy) ?? throw new InventoryException($"vms.restart_policy '{RestartPolicy}' is not a policy this kvmd knows"));
    }
}
