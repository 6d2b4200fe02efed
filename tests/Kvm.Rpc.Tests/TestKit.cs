using System.Collections.Concurrent;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Rpc;
using Microsoft.Extensions.Logging;

namespace Kvm.Rpc.Tests;

/// <summary>A temporary directory, mode 0755 so that another user (nobody) can reach a socket in it.</summary>
public sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = Directory.CreateTempSubdirectory("kvm-rpc-tests-").FullName;
        System.IO.File.SetUnixFileMode(Path, (UnixFileMode)Convert.ToInt32("755", 8));
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>One log call as the server made it.</summary>
public sealed record LogEntry(LogLevel Level, EventId EventId, string Message, Exception? Exception);

/// <summary>An ILogger that keeps what it is given, for tests that check what the server logged.</summary>
public sealed class CapturingLogger : ILogger
{
    private readonly ConcurrentQueue<LogEntry> _entries = new();

    public IReadOnlyList<LogEntry> Entries => [.. _entries];

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        _entries.Enqueue(new LogEntry(logLevel, eventId, formatter(state, exception), exception));

    /// <summary>Waits until an entry matching <paramref name="match"/> is logged (the server logs on its own threads).</summary>
    public LogEntry? WaitFor(Func<LogEntry, bool> match, TimeSpan timeout)
    {
        LogEntry? found = null;
        SpinWait.SpinUntil(() => (found = _entries.FirstOrDefault(match)) is not null, timeout);
        return found;
    }
}

public sealed record AddParams
{
    public required int A { get; init; }
    public required int B { get; init; }
}

public sealed record SumResult(long Sum);

public sealed record EchoParams
{
    public required string Text { get; init; }
    // Not "int Repeat = 1": the source generator sets every init-only property in one object
    // initializer, so an absent one becomes 0, not the declared default.
    public int? Repeat { get; init; }
}

public sealed record EchoResult(string Text);

public sealed record NoteParams
{
    public required string Text { get; init; }
}

public sealed record NotesResult(IReadOnlyList<string> Notes);

public sealed record PeerResult(int Pid, uint Uid, uint Gid);

// As a method declares its types: unknown members refused, null where the type says not null refused.
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow, RespectNullableAnnotations = true)]
[JsonSerializable(typeof(AddParams))]
[JsonSerializable(typeof(SumResult))]
[JsonSerializable(typeof(EchoParams))]
[JsonSerializable(typeof(EchoResult))]
[JsonSerializable(typeof(NoteParams))]
[JsonSerializable(typeof(NotesResult))]
[JsonSerializable(typeof(PeerResult))]
[JsonSerializable(typeof(JsonElement))]
public sealed partial class TestJson : JsonSerializerContext;

/// <summary>
/// A live RpcServer in a temporary directory with the test methods:
/// add {a,b} → {sum}; echo {text, repeat?} → {text}; note {text} (remembers it) → Done;
/// notes → {notes}; peer → the caller's credentials as the server saw them;
/// fail.rpc → an RpcException (-32004, two observations); fail.io → an IOException wrapped in an
/// InvalidOperationException; fail.bug → a NullReferenceException.
/// </summary>
public sealed class TestServer : IAsyncDisposable
{
    public const string RpcFailureMessage = "vm 'web1' not found";
    public static readonly string[] RpcFailureObservations = [RpcFailureMessage, "the inventory has no row for 'web1'"];
    public const string WrappedOuterMessage = "saving disk 'web1.qcow2' failed";
    public const string WrappedInnerMessage = "write at offset 65536 of /var/lib/kvm/web1.qcow2: No space left on device";
    public const string SecretBugDetail = "secret-internal-detail-7f3a";

    private readonly ConcurrentQueue<string> _notes = new();

    public TestServer(Func<RpcServerOptions, RpcServerOptions>? configure = null, TempDir? dir = null, string name = "rpc.sock")
    {
        Dir = dir ?? new TempDir();
        OwnsDir = dir is null;
        Logger = new CapturingLogger();
        Dispatcher = new RpcDispatcher(Logger);
        Dispatcher.Add("add", TestJson.Default.AddParams, TestJson.Default.SumResult,
            (p, _, _) => ValueTask.FromResult(new SumResult((long)p.A + p.B)));
        // echo and notes make their JSON metadata on first call (the lazy overloads): the tests cover both kinds.
        Dispatcher.Add("echo", static () => TestJson.Default.EchoParams, static () => TestJson.Default.EchoResult,
            (p, _, _) => ValueTask.FromResult(new EchoResult(string.Concat(Enumerable.Repeat(p.Text, Math.Clamp(p.Repeat ?? 1, 0, 1000))))));
        Dispatcher.Add("note", TestJson.Default.NoteParams, RpcJsonContext.Default.Done, (p, _, _) =>
        {
            _notes.Enqueue(p.Text);
            return ValueTask.FromResult(new Done());
        });
        Dispatcher.Add("notes", static () => TestJson.Default.NotesResult, (_, _) => ValueTask.FromResult(new NotesResult([.. _notes])));
        Dispatcher.Add("peer", TestJson.Default.PeerResult, (c, _) => ValueTask.FromResult(new PeerResult(c.Peer.Pid, c.Peer.Uid, c.Peer.Gid)));
        Dispatcher.Add<Done>("fail.rpc", RpcJsonContext.Default.Done,
            (_, _) => throw new RpcException(RpcErrorCode.NotFound, RpcFailureMessage, RpcFailureObservations));
        Dispatcher.Add<Done>("fail.io", RpcJsonContext.Default.Done,
            (_, _) => throw new InvalidOperationException(WrappedOuterMessage, new IOException(WrappedInnerMessage)));
        Dispatcher.Add<Done>("fail.bug", RpcJsonContext.Default.Done,
            (_, _) => throw new NullReferenceException(SecretBugDetail));
        var options = new RpcServerOptions { SocketPath = Dir.File(name) };
        Options = configure?.Invoke(options) ?? options;
        Server = new RpcServer(Options, Dispatcher, Logger);
        Server.Start();
    }

    public TempDir Dir { get; }
    private bool OwnsDir { get; }
    public CapturingLogger Logger { get; }
    public RpcDispatcher Dispatcher { get; }
    public RpcServerOptions Options { get; }
    public RpcServer Server { get; }
    public string SocketPath => Options.SocketPath;

    public RpcClient Client() => RpcClient.Connect(SocketPath, "the test server");

    public RawPeer Raw() => RawPeer.Connect(SocketPath);

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        if (OwnsDir)
            Dir.Dispose();
    }
}

/// <summary>A plain unix-socket peer that writes raw bytes and reads whole response lines.</summary>
public sealed class RawPeer : IDisposable
{
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    private RawPeer(Socket socket)
    {
        Socket = socket;
        Stream = new NetworkStream(socket, ownsSocket: true);
        Channel = new LineChannel(Stream, 64 << 20);
    }

    public Socket Socket { get; }
    public NetworkStream Stream { get; }
    public LineChannel Channel { get; }

    public static RawPeer Connect(string path)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Connect(new UnixDomainSocketEndPoint(path));
        return new RawPeer(s);
    }

    /// <summary>Sends <paramref name="line"/> and a newline, as one write.</summary>
    public Task SendAsync(string line) => SendBytesAsync(Encoding.UTF8.GetBytes(line + "\n"));

    public async Task SendBytesAsync(byte[] bytes) => await Stream.WriteAsync(bytes);

    /// <summary>The next line, or null at the end of the stream (or a reset connection); fails after the timeout.</summary>
    public async Task<string?> ReadLineAsync(TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? Timeout);
        try
        {
            var (status, line) = await Channel.ReadLineAsync(cts.Token);
            Assert.NotEqual(LineStatus.TooLong, status);
            return status == LineStatus.Line ? Encoding.UTF8.GetString(line.Span) : null;
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"no line and no end of stream within {timeout ?? Timeout}");
        }
        catch (IOException)
        {
            return null;
        }
    }

    /// <summary>The next response, parsed; fails on timeout or when the connection ends instead.</summary>
    public async Task<JsonElement> ReceiveAsync(TimeSpan? timeout = null)
    {
        string? line = await ReadLineAsync(timeout) ?? throw new Xunit.Sdk.XunitException("the server closed the connection instead of answering");
        using var doc = JsonDocument.Parse(line);
        return doc.RootElement.Clone();
    }

    /// <summary>Asserts that the server closes the connection (after any lines still queued, which are returned).</summary>
    public async Task<List<string>> ExpectClosedAsync()
    {
        var rest = new List<string>();
        while (await ReadLineAsync() is { } line)
            rest.Add(line);
        return rest;
    }

    public void Dispose() => Channel.Dispose();
}

/// <summary>Assertions on JSON-RPC response objects.</summary>
public static class Response
{
    /// <summary>Asserts a JSON-RPC 2.0 error response with <paramref name="code"/> and the id given as raw JSON; returns the error object.</summary>
    public static JsonElement AssertError(JsonElement response, int code, string rawId)
    {
        Assert.Equal("2.0", response.GetProperty("jsonrpc").GetString());
        Assert.Equal(rawId, response.GetProperty("id").GetRawText());
        Assert.False(response.TryGetProperty("result", out _), $"an error response with a result: {response}");
        var error = response.GetProperty("error");
        Assert.Equal(code, error.GetProperty("code").GetInt32());
        Assert.False(string.IsNullOrWhiteSpace(error.GetProperty("message").GetString()));
        return error;
    }

    /// <summary>Asserts a successful response to <paramref name="rawId"/>; returns the result.</summary>
    public static JsonElement AssertResult(JsonElement response, string rawId)
    {
        Assert.Equal("2.0", response.GetProperty("jsonrpc").GetString());
        Assert.Equal(rawId, response.GetProperty("id").GetRawText());
        Assert.False(response.TryGetProperty("error", out var e), $"an error instead of a result: {e}");
        return response.GetProperty("result");
    }

    public static IReadOnlyList<string> Observations(JsonElement error) =>
        [.. error.GetProperty("data").GetProperty("observations").EnumerateArray().Select(o => o.GetString()!)];

    /// <summary>Sends add(a, b) with <paramref name="id"/> and asserts the sum comes back: the connection still works.</summary>
    public static async Task AssertStillWorksAsync(RawPeer peer, int id = 900, int a = 20, int b = 22)
    {
        await peer.SendAsync($$$"""{"jsonrpc":"2.0","id":{{{id}}},"method":"add","params":{"a":{{{a}}},"b":{{{b}}}}}""");
        var result = AssertResult(await peer.ReceiveAsync(), id.ToString(System.Globalization.CultureInfo.InvariantCulture));
        Assert.Equal(a + b, result.GetProperty("sum").GetInt64());
    }
}
