using System.Buffers;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;

namespace Kvm.Rpc;

/// <summary>
/// A JSON-RPC client on a unix socket: one call at a time on one connection. Errors come back as
/// <see cref="RpcException"/> with the server's code and observations; a server that cannot be
/// reached, or that closes the connection, gives an <see cref="RpcException"/> that says so.
/// </summary>
public sealed class RpcClient : IDisposable
{
    private readonly LineChannel _channel;
    private readonly SemaphoreSlim _one = new(1, 1);
    private long _nextId;

    private RpcClient(string socketPath, LineChannel channel)
    {
        SocketPath = socketPath;
        _channel = channel;
    }

    public string SocketPath { get; }

    /// <summary>Connects; <paramref name="what"/> names the server in errors ("kvmd", "the VM's control socket").</summary>
    public static RpcClient Connect(string socketPath, string what, int maxMessageBytes = 16 << 20)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(socketPath));
        }
        catch (SocketException e)
        {
            socket.Dispose();
            string hint = e.SocketErrorCode switch
            {
                SocketError.AddressNotAvailable or SocketError.ConnectionRefused => $"nothing listens there (is {what} running?)",
                SocketError.AccessDenied => "permission denied (are you root, or in the socket's group?)",
                _ => e.Message,
            };
            if (!File.Exists(socketPath))
                hint = $"no such socket (is {what} running?)";
            throw new RpcException(RpcErrorCode.OperationFailed, $"cannot connect to {what} at {socketPath}: {hint}", inner: e);
        }
        return new RpcClient(socketPath, new LineChannel(new NetworkStream(socket, ownsSocket: true), maxMessageBytes));
    }

    /// <summary>Calls a method with parameters and returns its result.</summary>
    public async Task<TResult> CallAsync<TParams, TResult>(string method, TParams parameters, JsonTypeInfo<TParams> paramsInfo,
        JsonTypeInfo<TResult> resultInfo, CancellationToken cancel = default)
    {
        await _one.WaitAsync(cancel).ConfigureAwait(false);
        try
        {
            long id = ++_nextId;
            var request = new ArrayBufferWriter<byte>(256);
            using (var w = new Utf8JsonWriter(request))
            {
                w.WriteStartObject();
                w.WriteString("jsonrpc", "2.0");
                w.WriteNumber("id", id);
                w.WriteString("method", method);
                w.WritePropertyName("params");
                JsonSerializer.Serialize(w, parameters, paramsInfo);
                w.WriteEndObject();
            }
            // A server that refuses the connection (credentials, too many connections) sends its
            // reason and closes without reading: the request may then fail to be written (EPIPE),
            // but the reason is waiting to be read, and it says more than "the connection broke".
            IOException? writeFailure = null;
            try
            {
                await _channel.WriteLineAsync(request.WrittenMemory, cancel).ConfigureAwait(false);
            }
            catch (IOException e)
            {
                writeFailure = e;
            }
            try
            {
                while (true)
                {
                    var (status, line) = await _channel.ReadLineAsync(cancel).ConfigureAwait(false);
                    if (status != LineStatus.Line && writeFailure is not null)
                        throw new IOException(writeFailure.Message, writeFailure);
                    if (status != LineStatus.Line)
                        throw new RpcException(RpcErrorCode.OperationFailed, status == LineStatus.EndOfStream
                            ? $"{method}: the server at {SocketPath} closed the connection without answering"
                            : $"{method}: the answer from {SocketPath} is longer than {_channel.MaxLineBytes} bytes");
                    if (TryParse(line, id, method, resultInfo, out var result))
                        return result;
                }
            }
            catch (IOException e)
            {
                throw new RpcException(RpcErrorCode.OperationFailed, $"{method}: the connection to {SocketPath} broke", inner: writeFailure ?? e);
            }
        }
        finally
        {
            _one.Release();
        }
    }

    /// <summary>Calls a method without parameters.</summary>
    public Task<TResult> CallAsync<TResult>(string method, JsonTypeInfo<TResult> resultInfo, CancellationToken cancel = default) =>
        CallAsync(method, new NoParams(), RpcJsonContext.Default.NoParams, resultInfo, cancel);

    // A response to this call: its result, or its error thrown. An error without an id (the server
    // refused the connection) is thrown too; a response to another id is skipped.
    private bool TryParse<TResult>(ReadOnlyMemory<byte> line, long id, string method, JsonTypeInfo<TResult> resultInfo, out TResult result)
    {
        result = default!;
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(line);
        }
        catch (JsonException e)
        {
            throw new RpcException(RpcErrorCode.ParseError, $"{method}: the server sent a line that is not JSON: {e.Message}");
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new RpcException(RpcErrorCode.InvalidRequest, $"{method}: the server sent a {root.ValueKind} instead of a response object");
            bool mine = root.TryGetProperty("id", out var idElement) && idElement.ValueKind == JsonValueKind.Number
                        && idElement.TryGetInt64(out long got) && got == id;
            bool anonymous = !root.TryGetProperty("id", out idElement) || idElement.ValueKind == JsonValueKind.Null;
            if (root.TryGetProperty("error", out var error) && (mine || anonymous))
            {
                var e = error.Deserialize(RpcJsonContext.Default.RpcError)
                        ?? throw new RpcException(RpcErrorCode.InvalidRequest, $"{method}: the server sent a null error");
                throw new RpcException(e.Code, e.Message, e.Data?.Observations);
            }
            if (!mine)
                return false;
            if (!root.TryGetProperty("result", out var value))
                throw new RpcException(RpcErrorCode.InvalidRequest, $"{method}: the server's response has neither result nor error");
            try
            {
                result = value.Deserialize(resultInfo)!;
            }
            catch (JsonException e)
            {
                throw new RpcException(RpcErrorCode.InvalidParams, $"{method}: the server's result does not have the expected form: {e.Message}");
            }
            return true;
        }
    }

    public void Dispose()
    {
        _channel.Dispose();
        _one.Dispose();
    }
}
