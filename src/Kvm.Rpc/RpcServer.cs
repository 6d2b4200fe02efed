using System.Net.Sockets;
using System.Runtime.InteropServices;
using Kvm.Interop.Native;
using Microsoft.Extensions.Logging;

namespace Kvm.Rpc;

/// <summary>Where and how an <see cref="RpcServer"/> listens.</summary>
public sealed record RpcServerOptions
{
    public required string SocketPath { get; init; }

    /// <summary>Who may connect (root and the server's own user always may).</summary>
    public RpcAccessPolicy Access { get; init; } = RpcAccessPolicy.OwnerOnly;

    /// <summary>The socket file's mode: with a group policy, 0660 so only its members can connect.</summary>
    public UnixFileMode SocketMode { get; init; } = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite;

    /// <summary>The longest message (one line) accepted; a longer one gets an error and the connection closes.</summary>
    public int MaxMessageBytes { get; init; } = 1 << 20;

    /// <summary>Connections served at once; one more gets an error and is closed.</summary>
    public int MaxConnections { get; init; } = 64;

    /// <summary>
    /// Take the path over from a live server that hands it over (a VM passing to a new kvm-vmm):
    /// the new socket listens under a hidden name beside the path until
    /// <see cref="RpcServer.TakePath"/> renames it over the old one's file, so that clients always
    /// find one of the two. Without it, a live server's socket is refused.
    /// </summary>
    public bool TakeOver { get; init; }
}

/// <summary>
/// A JSON-RPC server on a unix stream socket. Each connection is checked by its peer's credentials
/// (SO_PEERCRED) before anything is read from it, then its requests are handled one after another
/// (a client that wants several in flight opens several connections). Nothing a peer sends can end
/// the server: every bad message gets an error object, and a message over the limit closes only its
/// connection.
/// </summary>
public sealed partial class RpcServer : IAsyncDisposable
{
    private readonly RpcServerOptions _options;
    private readonly RpcDispatcher _dispatcher;
    private readonly ILogger _logger;
    private readonly Socket _listener;
    // Reads (and accepting) stop first; requests already being handled get a grace period to answer.
    private readonly CancellationTokenSource _stop = new();
    private readonly CancellationTokenSource _abort = new();
    private readonly Lock _connectionsLock = new();
    private readonly HashSet<Task> _connections = [];
    private Task? _acceptLoop;
    private int _open;

    /// <summary>Creates the socket file (replacing a stale one, refusing one a live server answers on) and listens.</summary>
    public RpcServer(RpcServerOptions options, RpcDispatcher dispatcher, ILogger logger)
    {
        _options = options;
        _dispatcher = dispatcher;
        _logger = logger;
        _listener = Listen(options.SocketPath, options.SocketMode, options.Access, 128, options.TakeOver, out _hidden);
    }

    private string? _hidden;    // the hidden name the socket listens under until TakePath (TakeOver)

    /// <summary>
    /// Renames the socket of a server made with <see cref="RpcServerOptions.TakeOver"/> over its
    /// path: from here on new clients reach this server. Does nothing the second time.
    /// </summary>
    public void TakePath() => TakePath(ref _hidden, _options.SocketPath);

    /// <summary>Renames a socket from its hidden name (<see cref="Listen"/> with takeOver) over <paramref name="path"/>.</summary>
    public static void TakePath(ref string? hidden, string path)
    {
        if (hidden is null)
            return;
        File.Move(hidden, Path.GetFullPath(path), overwrite: true);
        hidden = null;
    }

    /// <summary>
    /// Leave the socket file in place when disposed: another server took the path over
    /// (<see cref="RpcServerOptions.TakeOver"/>), and the file is its.
    /// </summary>
    public bool LeaveSocketFile { get; set; }

    /// <summary>
    /// A listening unix socket at <paramref name="path"/> that accepts from the moment its file
    /// exists: it is bound under a temporary name in the same folder, given its mode and group,
    /// set listening, and only then renamed into place (a client that sees the file never gets
    /// "connection refused"). A stale socket there is replaced; anything else is refused. With
    /// <paramref name="takeOver"/> (the path's live server hands it over), the socket stays under
    /// the temporary name, returned in <paramref name="hidden"/>, for <see cref="TakePath(ref string?, string)"/>.
    /// </summary>
    public static Socket Listen(string path, UnixFileMode mode, RpcAccessPolicy access, int backlog, bool takeOver, out string? hidden)
    {
        hidden = null;
        string full = Path.GetFullPath(path);
        string dir = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        if (takeOver && File.Exists(full) && Libc.IsSocket(full) == false)
            throw new IOException($"socket path {path} exists and is not a socket; not replacing it");
        if (!takeOver)
            RemoveStaleSocket(full);
        // Short, so that it fits in sun_path (108 bytes) wherever the final name does.
        string temporary = Path.Combine(dir, $".s{Guid.NewGuid():N}"[..10]);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(temporary));
            File.SetUnixFileMode(temporary, mode);
            if (access.GroupId is { } gid && Libc.Chown(temporary, uint.MaxValue, gid) != 0)
                throw new IOException($"cannot give socket {path} to group '{access.GroupName}': {Marshal.GetLastPInvokeErrorMessage()}");
            socket.Listen(backlog);
            if (takeOver)
                hidden = temporary;
            else
                File.Move(temporary, full);
            return socket;
        }
        catch
        {
            socket.Dispose();
            File.Delete(temporary);
            throw;
        }
    }

    public string SocketPath => _options.SocketPath;

    /// <summary>Connections open now.</summary>
    public int OpenConnections => Volatile.Read(ref _open);

    /// <summary>
    /// Makes way for a new socket at <paramref name="path"/>: a socket nobody answers on (left by
    /// a server that died) is removed; a live one, a directory or any other file is refused.
    /// </summary>
    public static void RemoveStaleSocket(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path))
            return;
        if ((File.GetAttributes(path) & FileAttributes.Directory) != 0)
            throw new IOException($"socket path {path} is a directory");
        // Only a socket may be replaced: a regular file (a disk image, a log) that a wrong path
        // names does not answer a connect either, and deleting it would lose it.
        if (Libc.IsSocket(path) == false)
            throw new IOException($"socket path {path} exists and is not a socket; not replacing it");
        using (var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            try
            {
                probe.Connect(new UnixDomainSocketEndPoint(path));
                throw new IOException($"socket {path} is in use: another server answers on it");
            }
            catch (SocketException)
            {
                // Nobody listens: a socket left by a server that died.
            }
        }
        File.Delete(path);
    }

    /// <summary>Starts accepting connections.</summary>
    public void Start() => _acceptLoop ??= Task.Run(AcceptLoopAsync);

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                break;
            }
            catch (SocketException e) when (!_stop.IsCancellationRequested)
            {
                LogAcceptFailed(_logger, _options.SocketPath, e.Message);
                await Task.Delay(50).ConfigureAwait(false);
                continue;
            }
            catch (SocketException) when (_stop.IsCancellationRequested)
            {
                // The listener was closed under the pending accept (Dispose): the loop ends.
                break;
            }
            catch (ObjectDisposedException)
            {
                break;
            }
            var task = Task.Run(() => ServeAsync(client));
            lock (_connectionsLock)
                _connections.Add(task);
            _ = task.ContinueWith(t =>
            {
                lock (_connectionsLock)
                    _connections.Remove(t);
            }, TaskScheduler.Default);
        }
    }

    private async Task ServeAsync(Socket socket)
    {
        int open = Interlocked.Increment(ref _open);
        var channel = new LineChannel(new NetworkStream(socket, ownsSocket: true), _options.MaxMessageBytes);
        try
        {
            PeerCredentials peer;
            try
            {
                peer = PeerCredentials.Of(socket);
            }
            catch (Exception e) when (e is SocketException or IOException)
            {
                LogPeerUnknown(_logger, _options.SocketPath, e.Message);
                return;
            }
            if (_options.Access.Refusal(peer) is { } refusal)
            {
                LogRefused(_logger, _options.SocketPath, peer.Pid, peer.Uid, peer.Gid, refusal);
                await TrySendAsync(channel, RpcDispatcher.ErrorResponse(null, new RpcException(RpcErrorCode.PermissionDenied, refusal))).ConfigureAwait(false);
                return;
            }
            if (open > _options.MaxConnections)
            {
                LogTooMany(_logger, _options.SocketPath, _options.MaxConnections, peer.Pid, peer.Uid);
                await TrySendAsync(channel, RpcDispatcher.ErrorResponse(null, new RpcException(RpcErrorCode.TooManyConnections,
                    $"too many connections: the server serves at most {_options.MaxConnections} at once"))).ConfigureAwait(false);
                return;
            }
            while (!_stop.IsCancellationRequested)
            {
                var (status, line) = await channel.ReadLineAsync(_stop.Token).ConfigureAwait(false);
                if (status == LineStatus.EndOfStream)
                    return;
                if (status == LineStatus.TooLong)
                {
                    LogTooLong(_logger, _options.SocketPath, peer.Pid, peer.Uid, _options.MaxMessageBytes);
                    await TrySendAsync(channel, RpcDispatcher.ErrorResponse(null, new RpcException(RpcErrorCode.MessageTooLarge,
                        $"message too large: more than {_options.MaxMessageBytes} bytes without a newline; closing the connection"))).ConfigureAwait(false);
                    return;
                }
                if (line.IsEmpty || line.Span.IndexOfAnyExcept(" \t"u8) < 0)
                    continue; // blank lines between messages are ignored
                var response = await _dispatcher.HandleAsync(line, peer, _abort.Token).ConfigureAwait(false);
                if (response is not null)
                    await channel.WriteLineAsync(response, _abort.Token).ConfigureAwait(false);
            }
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException or ObjectDisposedException)
        {
            // The peer went away, or the server is stopping.
        }
        finally
        {
            Interlocked.Decrement(ref _open);
            await channel.DisposeAsync().ConfigureAwait(false);
        }
    }

    private async Task TrySendAsync(LineChannel channel, byte[] message)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
        timeout.CancelAfter(TimeSpan.FromSeconds(5));
        try
        {
            await channel.WriteLineAsync(message, timeout.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException)
        {
        }
    }

    /// <summary>How long requests being handled when the server is disposed get to send their answers.</summary>
    public TimeSpan DrainTime { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Stops accepting and reading; requests being handled get <see cref="DrainTime"/> to answer
    /// (a stop request answers once the VM has stopped, which is what disposes the server); then
    /// every connection ends and the socket file is removed.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (_stop.IsCancellationRequested)
            return;
        _stop.Cancel();
        _listener.Dispose();
        if (_acceptLoop is not null)
            await _acceptLoop.ConfigureAwait(false);
        Task[] open;
        lock (_connectionsLock)
            open = [.. _connections];
        var all = Task.WhenAll(open);
        await Task.WhenAny(all, Task.Delay(DrainTime)).ConfigureAwait(false);
        _abort.Cancel();
        await all.ConfigureAwait(false);
        try
        {
            if (_hidden is not null)
                File.Delete(_hidden);
            else if (!LeaveSocketFile)
                File.Delete(_options.SocketPath);
        }
        catch (IOException)
        {
        }
        _stop.Dispose();
        _abort.Dispose();
    }

    [LoggerMessage(EventId = 5001, Level = LogLevel.Warning, Message = "{Socket}: refused a connection from pid {Pid} (uid {Uid}, gid {Gid}): {Reason}")]
    private static partial void LogRefused(ILogger logger, string socket, int pid, uint uid, uint gid, string reason);

    [LoggerMessage(EventId = 5002, Level = LogLevel.Warning, Message = "{Socket}: refused a connection from pid {Pid} (uid {Uid}): already {Max} connections")]
    private static partial void LogTooMany(ILogger logger, string socket, int max, int pid, uint uid);

    [LoggerMessage(EventId = 5003, Level = LogLevel.Warning, Message = "{Socket}: closed the connection of pid {Pid} (uid {Uid}): a message over {Max} bytes")]
    private static partial void LogTooLong(ILogger logger, string socket, int pid, uint uid, int max);

    [LoggerMessage(EventId = 5004, Level = LogLevel.Warning, Message = "{Socket}: accept failed: {Problem}")]
    private static partial void LogAcceptFailed(ILogger logger, string socket, string problem);

    [LoggerMessage(EventId = 5005, Level = LogLevel.Warning, Message = "{Socket}: closed a connection whose peer credentials could not be read: {Problem}")]
    private static partial void LogPeerUnknown(ILogger logger, string socket, string problem);
}
