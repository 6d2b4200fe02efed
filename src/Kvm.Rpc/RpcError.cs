using System.Text.Json.Serialization;

namespace Kvm.Rpc;

/// <summary>The JSON-RPC 2.0 error codes, and this project's own (-32000 to -32099, reserved for servers).</summary>
public static class RpcErrorCode
{
    public const int ParseError = -32700, InvalidRequest = -32600, MethodNotFound = -32601, InvalidParams = -32602, InternalError = -32603;

    /// <summary>The operation was understood and attempted, and failed: error.data says why, layer by layer.</summary>
    public const int OperationFailed = -32000;

    /// <summary>The peer (by its SO_PEERCRED credentials) may not use this socket.</summary>
    public const int PermissionDenied = -32001;

    /// <summary>The server already serves as many connections as it allows.</summary>
    public const int TooManyConnections = -32002;

    /// <summary>A message (one line) longer than the server accepts; the connection is closed after this reply.</summary>
    public const int MessageTooLarge = -32003;

    /// <summary>The object named (a VM, a disk) does not exist.</summary>
    public const int NotFound = -32004;

    /// <summary>The object is not in a state that allows the operation (pause a stopped VM).</summary>
    public const int InvalidState = -32005;

    /// <summary>An object with that name (a VM, a host) already exists.</summary>
    public const int AlreadyExists = -32006;

    /// <summary>
    /// A write made under a lease whose token is stale: the lease has moved on to another holder or
    /// generation, or has expired. The writer no longer owns the object and must stop acting on it.
    /// </summary>
    public const int StaleLease = -32007;

    /// <summary>
    /// Something the operation needs is held by another holder (a disk reserved by another VM);
    /// the message names the holder. It may succeed once the holder lets go.
    /// </summary>
    public const int Conflict = -32008;
}

/// <summary>
/// error.data of this project's errors: the chain of observations, outermost first: what failed,
/// then what that failed because of, each as the layer that saw it described it.
/// </summary>
public sealed record RpcErrorData(IReadOnlyList<string> Observations);

/// <summary>A JSON-RPC error object.</summary>
public sealed record RpcError(
    int Code,
    string Message,
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] RpcErrorData? Data);

/// <summary>
/// An error to send as (or received as) a JSON-RPC error object. <see cref="Observations"/> is the
/// chain of what failed and why; the message is its first line.
/// </summary>
public class RpcException : Exception
{
    public RpcException(int code, string message, IReadOnlyList<string>? observations = null, Exception? inner = null)
        : base(message, inner)
    {
        Code = code;
        Observations = observations is { Count: > 0 } ? observations : [message];
    }

    public int Code { get; }
    public IReadOnlyList<string> Observations { get; }

    public RpcError ToError() => new(Code, Message, new RpcErrorData(Observations));

    /// <summary>
    /// The observations an exception chain carries: each exception's message, outermost first,
    /// skipping a message that only repeats what the one before it already says.
    /// </summary>
    public static IReadOnlyList<string> ObservationsOf(Exception e)
    {
        var chain = new List<string>();
        for (Exception? x = e; x is not null; x = x.InnerException)
        {
            if (x is RpcException r && !ReferenceEquals(x, e))
            {
                foreach (var o in r.Observations)
                    Add(o);
                break;
            }
            Add(x.Message);
        }
        return chain;

        void Add(string o)
        {
            if (chain.Count == 0 || !chain[^1].Contains(o, StringComparison.Ordinal))
                chain.Add(o);
        }
    }

    /// <summary>Wraps a failure with what the caller was doing: "<paramref name="operation"/>" becomes the first observation.</summary>
    public static RpcException Wrap(string operation, Exception cause, int code = RpcErrorCode.OperationFailed) =>
        new(code, operation, [operation, .. ObservationsOf(cause)], cause);

    /// <summary>The observations as a few lines, for a terminal.</summary>
    public string Describe() => string.Join(Environment.NewLine + "  because: ", Observations);
}
