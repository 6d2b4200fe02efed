using Kvm.Rpc;

namespace Kvm.Inventory;

/// <summary>
/// A failure of the inventory: its embedded PostgreSQL cluster, its schema, or a row it was asked
/// to read or change. An <see cref="RpcException"/>, so kvmd passes it to vmctl as it is, with its
/// code (NotFound, AlreadyExists, ...) and its chain of observations.
/// </summary>
public sealed class InventoryException : RpcException
{
    public InventoryException(string message, Exception? inner = null, int code = RpcErrorCode.OperationFailed)
        : base(code, message, inner is null ? null : [message, .. ObservationsOf(inner)], inner)
    {
    }
}
