using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>Turns PostgreSQL's errors into the inventory's, naming the object and the value.</summary>
internal static class DbErrors
{
    public const string UniqueViolation = "23505", CheckViolation = "23514", ForeignKeyViolation = "23503",
        InvalidTextRepresentation = "22P02", ExclusionViolation = "23P01";

    public static InventoryException NotFound(string what) => new($"{what} does not exist", code: RpcErrorCode.NotFound);

    /// <summary>Wraps any database failure with what was being done.</summary>
    public static async Task<T> Run<T>(string operation, Func<Task<T>> action, Func<PostgresException, InventoryException?>? explain = null)
    {
        try
        {
            return await action().ConfigureAwait(false);
        }
        catch (PostgresException e) when (explain?.Invoke(e) is { } known)
        {
            throw known;
        }
        catch (Exception e) when (e is NpgsqlException or TimeoutException)
        {
            throw new InventoryException($"cannot {operation}", e);
        }
    }
}
