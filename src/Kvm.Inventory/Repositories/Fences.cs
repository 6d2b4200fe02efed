using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// Writes made under a lease: the check that the writer's token is current, and the StaleLease
/// error that says why it is not.
/// </summary>
internal static class Fences
{
    /// <summary>
    /// The SQL condition "lease <paramref name="alias"/> is held by @fenceHost at @fenceGeneration and
    /// has not expired", by the database's clock at the moment the row is checked.
    /// </summary>
    public static string Holds(string alias) =>
        $"{alias}.owner_host = @fenceHost and {alias}.generation = @fenceGeneration and {alias}.expires_at > clock_timestamp()";

    /// <summary>
    /// Locks the lease of <paramref name="fence"/> (FOR SHARE, until the transaction ends: whoever
    /// would take or break the lease waits for this transaction) and checks that the token is
    /// current; a StaleLease error when it is not.
    /// </summary>
    public static async Task LockAsync(NpgsqlConnection conn, NpgsqlTransaction tx, LeaseToken fence, string operation)
    {
        var held = await conn.ExecuteScalarAsync<bool>($"""
            select exists (
                select 1 from leases l
                where l.resource_kind = @kind and l.resource_id = @resource and {Holds("l")}
                for share)
            """, new { kind = LeaseNames.Of(fence.Kind), resource = fence.ResourceId, fenceHost = fence.Host, fenceGeneration = fence.Generation }, tx).ConfigureAwait(false);
        if (!held)
            throw await StaleAsync(conn, tx, fence, operation).ConfigureAwait(false);
    }

    /// <summary>The StaleLease error for <paramref name="fence"/>, naming the lease's current owner and generation.</summary>
    public static async Task<InventoryException> StaleAsync(NpgsqlConnection conn, NpgsqlTransaction? tx, LeaseToken fence, string operation)
    {
        var kind = LeaseNames.Of(fence.Kind);
        var state = await conn.QuerySingleAsync<LeaseState>("""
            select coalesce(lease_subject(@kind, @resource), @kind::text || '/' || @resource::text) as subject,
                   (select name from hosts where id = @fenceHost) as fence_host_name,
                   l.owner_host, h.name as owner_name, l.generation, l.expires_at,
                   l.expires_at > clock_timestamp() as live
            from (select 1) one
            left join leases l on l.resource_kind = @kind and l.resource_id = @resource
            left join hosts h on h.id = l.owner_host
            """, new { kind, resource = fence.ResourceId, fenceHost = fence.Host }, tx).ConfigureAwait(false);
        var now = state switch
        {
            { Generation: null } => "there is no lease on it",
            { OwnerHost: null } => $"the lease is free (generation {state.Generation})",
            { Live: true } => $"the lease is held by host '{state.OwnerName}' at generation {state.Generation}, until {Times.Text(state.ExpiresAt!.Value)}",
            _ when state.OwnerHost == fence.Host && state.Generation == fence.Generation =>
                $"the lease expired at {Times.Text(state.ExpiresAt!.Value)} (generation {state.Generation}): any host may break it",
            _ => $"the lease was held by host '{state.OwnerName}' at generation {state.Generation} and expired at {Times.Text(state.ExpiresAt!.Value)}",
        };
        return new InventoryException(
            $"{operation}: lease generation {fence.Generation} of host '{state.FenceHostName ?? fence.Host.ToString()}' on {state.Subject} is stale: {now}",
            code: RpcErrorCode.StaleLease);
    }

    internal sealed record LeaseState(string Subject, string? FenceHostName, Guid? OwnerHost, string? OwnerName, long? Generation, DateTime? ExpiresAt, bool? Live);
}
