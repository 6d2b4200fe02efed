using System.Buffers;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.Json.Serialization.Metadata;
using Microsoft.Extensions.Logging;

namespace Kvm.Rpc;

/// <summary>Who is calling, as the server saw them (for handlers that log or decide by caller).</summary>
public sealed record RpcCallContext(PeerCredentials Peer, string Method);

/// <summary>A method that takes no parameters (the params member may be absent, null or an empty object).</summary>
public sealed record NoParams;

/// <summary>A method that returns nothing worth saying (the result is an empty object).</summary>
public sealed record Done;

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow)]
[JsonSerializable(typeof(RpcError))]
[JsonSerializable(typeof(NoParams))]
[JsonSerializable(typeof(Done))]
public sealed partial class RpcJsonContext : JsonSerializerContext;

/// <summary>
/// Methods by name, each with its parameter and result types (source-generated JSON, so nothing is
/// found by reflection), and the handling of one request line: parse, check, dispatch, and the
/// response line, or a JSON-RPC error object for everything that can go wrong.
/// </summary>
public sealed partial class RpcDispatcher(ILogger logger)
{
    /// <summary>How deep a request's JSON may nest.</summary>
    public const int MaxDepth = 64;

    private delegate ValueTask<Action<Utf8JsonWriter>> Handler(JsonElement? parameters, RpcCallContext context, CancellationToken cancel);

    private readonly Dictionary<string, Handler> _methods = new(StringComparer.Ordinal);

    public IEnumerable<string> Methods => _methods.Keys;

    /// <summary>Adds a method with typed parameters (an object, by name) and a typed result.</summary>
    public void Add<TParams, TResult>(string method, JsonTypeInfo<TParams> parameters, JsonTypeInfo<TResult> result,
        Func<TParams, RpcCallContext, CancellationToken, ValueTask<TResult>> handler)
    {
        _methods.Add(method, async (json, context, cancel) =>
        {
            TParams p = ParseParams(method, json, parameters);
            TResult r = await handler(p, context, cancel).ConfigureAwait(false);
            return writer => JsonSerializer.Serialize(writer, r, result);
        });
    }

    /// <summary>Adds a method without parameters.</summary>
    public void Add<TResult>(string method, JsonTypeInfo<TResult> result, Func<RpcCallContext, CancellationToken, ValueTask<TResult>> handler) =>
        Add(method, RpcJsonContext.Default.NoParams, result, (_, context, cancel) => handler(context, cancel));

    /// <summary>
    /// Adds a method whose parameters' and result's JSON metadata is made on its first call, not
    /// now: a server with many methods starts sooner (System.Text.Json builds each type's metadata
    /// on first use, some milliseconds each where code runs cold).
    /// </summary>
    public void Add<TParams, TResult>(string method, Func<JsonTypeInfo<TParams>> parameters, Func<JsonTypeInfo<TResult>> result,
        Func<TParams, RpcCallContext, CancellationToken, ValueTask<TResult>> handler)
    {
        _methods.Add(method, async (json, context, cancel) =>
        {
            TParams p = ParseParams(method, json, parameters());
            TResult r = await handler(p, context, cancel).ConfigureAwait(false);
            var info = result();
            return writer => JsonSerializer.Serialize(writer, r, info);
        });
    }

    /// <summary>Adds a method without parameters whose result's JSON metadata is made on its first call.</summary>
    public void Add<TResult>(string method, Func<JsonTypeInfo<TResult>> result, Func<RpcCallContext, CancellationToken, ValueTask<TResult>> handler) =>
        Add(method, static () => RpcJsonContext.Default.NoParams, result, (_, context, cancel) => handler(context, cancel));

    private static TParams ParseParams<TParams>(string method, JsonElement? json, JsonTypeInfo<TParams> info)
    {
        if (json is not { ValueKind: JsonValueKind.Object } e)
        {
            if (json is null or { ValueKind: JsonValueKind.Null } && typeof(TParams) == typeof(NoParams))
                return (TParams)(object)new NoParams();
            throw new RpcException(RpcErrorCode.InvalidParams,
                $"{method}: params must be an object of named parameters, not {Describe(json)}");
        }
        try
        {
            return e.Deserialize(info)
                   ?? throw new RpcException(RpcErrorCode.InvalidParams, $"{method}: params must not be null");
        }
        catch (JsonException x)
        {
            throw new RpcException(RpcErrorCode.InvalidParams, $"{method}: invalid params: {x.Message}");
        }
    }

    private static string Describe(JsonElement? e) => e is null ? "missing" : e.Value.ValueKind switch
    {
        JsonValueKind.Array => "an array (parameters by position are not supported)",
        JsonValueKind.Null => "null",
        var k => $"a {k.ToString().ToLowerInvariant()}",
    };

    /// <summary>
    /// Handles one request line and returns the response line, or null for a notification (a
    /// request without an id gets no response, even on error, as JSON-RPC 2.0 says).
    /// </summary>
    public async ValueTask<byte[]?> HandleAsync(ReadOnlyMemory<byte> line, PeerCredentials peer, CancellationToken cancel)
    {
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(line, new JsonDocumentOptions { MaxDepth = MaxDepth });
        }
        catch (JsonException e)
        {
            return ErrorResponse(null, new RpcException(RpcErrorCode.ParseError, $"parse error: {e.Message}"));
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                string what = root.ValueKind == JsonValueKind.Array ? "a batch (an array); batches are not supported" : $"a {root.ValueKind.ToString().ToLowerInvariant()}";
                return ErrorResponse(null, new RpcException(RpcErrorCode.InvalidRequest, $"invalid request: a request is an object, not {what}"));
            }
            string? id = null;
            bool hasId = root.TryGetProperty("id", out var idElement);
            if (hasId)
            {
                if (idElement.ValueKind is not (JsonValueKind.Number or JsonValueKind.String or JsonValueKind.Null))
                    return ErrorResponse(null, new RpcException(RpcErrorCode.InvalidRequest, $"invalid request: id must be a number, a string or null, not {Describe(idElement)}"));
                try
                {
                    id = idElement.GetRawText();
                }
                catch (InvalidOperationException)
                {
                    // A string id that is not valid UTF-8: it cannot be echoed, so it is not one.
                    return ErrorResponse(null, new RpcException(RpcErrorCode.InvalidRequest, "invalid request: id is not valid UTF-8 text"));
                }
            }
            if (!root.TryGetProperty("jsonrpc", out var version) || version.ValueKind != JsonValueKind.String || !version.ValueEquals("2.0"u8))
                return ErrorResponse(id ?? "null", new RpcException(RpcErrorCode.InvalidRequest, "invalid request: \"jsonrpc\" must be \"2.0\""));
            if (!root.TryGetProperty("method", out var methodElement) || methodElement.ValueKind != JsonValueKind.String)
                return ErrorResponse(id ?? "null", new RpcException(RpcErrorCode.InvalidRequest, "invalid request: \"method\" must be a string"));
            // GetString throws on text that is not valid UTF-8 (or escapes a lone surrogate); that
            // must be an answer, not an exception that ends the connection.
            string method;
            try
            {
                method = methodElement.GetString()!;
            }
            catch (InvalidOperationException)
            {
                return ErrorResponse(id ?? "null", new RpcException(RpcErrorCode.InvalidRequest, "invalid request: \"method\" is not valid UTF-8 text"));
            }
            JsonElement? parameters = root.TryGetProperty("params", out var p) ? p : null;

            if (!_methods.TryGetValue(method, out var handler))
            {
                var notFound = new RpcException(RpcErrorCode.MethodNotFound, $"method not found: '{Printable(method)}'");
                return hasId ? ErrorResponse(id, notFound) : null;
            }
            try
            {
                var write = await handler(parameters, new RpcCallContext(peer, method), cancel).ConfigureAwait(false);
                return hasId ? Response(id!, w => { w.WritePropertyName("result"); write(w); }) : null;
            }
            catch (RpcException e)
            {
                return hasId ? ErrorResponse(id, e) : null;
            }
            catch (OperationCanceledException) when (cancel.IsCancellationRequested)
            {
                return hasId ? ErrorResponse(id, new RpcException(RpcErrorCode.OperationFailed, $"{method}: cancelled: the server is stopping")) : null;
            }
            catch (Exception e) when (IsProgrammingError(e))
            {
                LogInternalError(logger, method, e);
                return hasId ? ErrorResponse(id, new RpcException(RpcErrorCode.InternalError, $"{method}: internal error (the server logged it)")) : null;
            }
            catch (Exception e)
            {
                var failure = RpcException.Wrap($"{method} failed", e);
                return hasId ? ErrorResponse(id, failure) : null;
            }
        }
    }

    /// <summary>Bugs, not failures of the operation: their details stay in the server's log.</summary>
    private static bool IsProgrammingError(Exception e) =>
        e is NullReferenceException or IndexOutOfRangeException or InvalidCastException or ArgumentNullException
            or NotImplementedException or AccessViolationException or KeyNotFoundException;

    /// <summary>How much of a client's text <see cref="Printable"/> keeps.</summary>
    public const int PrintableLength = 100;

    /// <summary>A client's text (a method name, a VM name) for messages: control characters shown as \xNN, at most 100 characters.</summary>
    public static string Printable(string s)
    {
        var b = new System.Text.StringBuilder();
        foreach (char c in s.Length > PrintableLength ? s[..PrintableLength] : s)
            b.Append(char.IsControl(c) ? $"\\x{(int)c:x2}" : c);
        return s.Length > PrintableLength ? b + "..." : b.ToString();
    }

    internal static byte[] ErrorResponse(string? id, RpcException e) =>
        Response(id ?? "null", w =>
        {
            w.WritePropertyName("error");
            JsonSerializer.Serialize(w, e.ToError(), RpcJsonContext.Default.RpcError);
        });

    private static byte[] Response(string rawId, Action<Utf8JsonWriter> body)
    {
        var buffer = new ArrayBufferWriter<byte>(256);
        using (var w = new Utf8JsonWriter(buffer))
        {
            w.WriteStartObject();
            w.WriteString("jsonrpc", "2.0");
            w.WritePropertyName("id");
            w.WriteRawValue(rawId, skipInputValidation: true);
            body(w);
            w.WriteEndObject();
        }
        return buffer.WrittenSpan.ToArray();
    }

    [LoggerMessage(EventId = 5000, Level = LogLevel.Error, Message = "RPC method {Method} failed with an internal error")]
    private static partial void LogInternalError(ILogger logger, string method, Exception e);
}
