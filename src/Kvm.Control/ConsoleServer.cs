using System.Net.Sockets;
using System.Text;
using System.Threading.Channels;
using Kvm.Rpc;
using Microsoft.Extensions.Logging;

namespace Kvm.Control;

/// <summary>
/// A VM's serial console on a unix stream socket: raw bytes both ways, for any number of clients
/// that attach and detach as they like. What the guest writes goes to every attached client (and a
/// client that attaches first gets the last <see cref="HistoryBytes"/> bytes, so it sees the
/// current screen); what a client sends goes to the guest's serial input. Clients are checked by
/// their credentials as the control socket's are. The guest's output never waits for a client: one
/// that falls too far behind is disconnected, and the VM goes on.
/// </summary>
public sealed partial class ConsoleServer : IAsyncDisposable
{
    /// <summary>Recent output replayed to a client when it attaches.</summary>
    public const int HistoryBytes = 64 * 1024;

    /// <summary>Output chunks queued for one client before it counts as stuck and is disconnected.</summary>
    public const int ClientQueueChunks = 4096;

    /// <summary>How long a server that ends waits for its clients to take the output queued for them.</summary>
    public static readonly TimeSpan DrainTime = TimeSpan.FromSeconds(2);

    private readonly string _path;
    private readonly RpcAccessPolicy _access;
    private readonly Func<ReadOnlyMemory<byte>, int> _input;
    private readonly ILogger _logger;
    private readonly Socket _listener;
    private readonly CancellationTokenSource _stop = new();
    private readonly Lock _lock = new();
    private readonly List<Client> _clients = [];
    private readonly byte[] _history = new byte[HistoryBytes];
    private long _written; // total bytes of output so far (the history ring's write position)
    private Task? _acceptLoop;

    private sealed class Client(Socket socket)
    {
        public Socket Socket { get; } = socket;
        public Task? Sending { get; set; }
        public Channel<byte[]> Output { get; } = Channel.CreateBounded<byte[]>(new BoundedChannelOptions(ClientQueueChunks) { SingleReader = true });
    }

    /// <param name="input">Takes bytes for the guest's serial input; returns how many it accepted (it may accept fewer when its FIFO is full).</param>
    /// <param name="takeOver">Replace the live socket of a console server that hands its path over (<see cref="RpcServerOptions.TakeOver"/>).</param>
    public ConsoleServer(string path, RpcAccessPolicy access, UnixFileMode mode, Func<ReadOnlyMemory<byte>, int> input, ILogger logger, bool takeOver = false)
    {
        _path = path;
        _access = access;
        _input = input;
        _logger = logger;
        _listener = RpcServer.Listen(path, mode, access, 16, takeOver, out _hidden);
    }

    private string? _hidden;    // the hidden name the socket listens under until TakePath (takeOver)

    /// <summary>Renames the socket of a server made with takeOver over its path (<see cref="RpcServer.TakePath()"/>).</summary>
    public void TakePath() => RpcServer.TakePath(ref _hidden, _path);

    /// <summary>Leave the socket file in place when disposed: another console server took the path over.</summary>
    public bool LeaveSocketFile { get; set; }

    public string SocketPath => _path;

    public int AttachedClients
    {
        get
        {
            lock (_lock)
                return _clients.Count;
        }
    }

    public void Start() => _acceptLoop ??= Task.Run(AcceptLoopAsync);

    /// <summary>Guest output: kept in the history and queued for every attached client. Never blocks.</summary>
    public void Write(ReadOnlySpan<byte> output)
    {
        if (output.IsEmpty)
            return;
        var chunk = output.ToArray();
        lock (_lock)
        {
            foreach (byte b in output)
                _history[_written++ % HistoryBytes] = b;
            for (int i = _clients.Count - 1; i >= 0; i--)
            {
                var c = _clients[i];
                if (!c.Output.Writer.TryWrite(chunk))
                {
                    LogSlowClient(_logger, _path, ClientQueueChunks);
                    _clients.RemoveAt(i);
                    c.Output.Writer.TryComplete();
                    c.Socket.Dispose();
                }
            }
        }
    }

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException)
            {
                return;
            }
            catch (SocketException)
            {
                await Task.Delay(50).ConfigureAwait(false);
                continue;
            }
            _ = Task.Run(() => ServeAsync(socket));
        }
    }

    private async Task ServeAsync(Socket socket)
    {
        PeerCredentials peer;
        try
        {
            peer = PeerCredentials.Of(socket);
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            socket.Dispose();
            return;
        }
        if (_access.Refusal(peer) is { } refusal)
        {
            LogRefused(_logger, _path, peer.Pid, peer.Uid, refusal);
            try
            {
                await socket.SendAsync(Encoding.UTF8.GetBytes($"console: {refusal}\n")).ConfigureAwait(false);
            }
            catch (SocketException)
            {
            }
            socket.Dispose();
            return;
        }
        var client = new Client(socket);
        lock (_lock)
        {
            // The recent output first, then everything from now on, in order.
            long have = Math.Min(_written, HistoryBytes);
            var history = new byte[have];
            for (long i = 0; i < have; i++)
                history[i] = _history[(_written - have + i) % HistoryBytes];
            if (have > 0)
                client.Output.Writer.TryWrite(history);
            _clients.Add(client);
        }
        var sending = client.Sending = SendLoopAsync(client);
        var buffer = new byte[4096];
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                int n = await socket.ReceiveAsync(buffer, _stop.Token).ConfigureAwait(false);
                if (n == 0)
                    break;
                var pending = buffer.AsMemory(0, n);
                while (!pending.IsEmpty && !_stop.IsCancellationRequested)
                {
                    int taken = _input(pending);
                    pending = pending[taken..];
                    if (!pending.IsEmpty)
                        await Task.Delay(1, _stop.Token).ConfigureAwait(false); // the guest's FIFO is full
                }
            }
        }
        catch (Exception e) when (e is SocketException or OperationCanceledException or ObjectDisposedException)
        {
        }
        finally
        {
            lock (_lock)
                _clients.Remove(client);
            client.Output.Writer.TryComplete();
            await sending.ConfigureAwait(false);
            socket.Dispose();
        }
    }

    private static async Task SendLoopAsync(Client client)
    {
        try
        {
            await foreach (var chunk in client.Output.Reader.ReadAllAsync().ConfigureAwait(false))
                await client.Socket.SendAsync(chunk).ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_stop.IsCancellationRequested)
            return;
        _stop.Cancel();
        _listener.Dispose();
        if (_acceptLoop is not null)
            await _acceptLoop.ConfigureAwait(false);
        Client[] clients;
        lock (_lock)
        {
            clients = [.. _clients];
            _clients.Clear();
        }
        // What the guest wrote last still reaches the clients (its final lines before it ended);
        // a client that does not read is cut off after a while.
        foreach (var c in clients)
            c.Output.Writer.TryComplete();
        await Task.WhenAny(Task.WhenAll(clients.Select(c => c.Sending ?? Task.CompletedTask)), Task.Delay(DrainTime)).ConfigureAwait(false);
        foreach (var c in clients)
            c.Socket.Dispose();
        try
        {
            if (_hidden is not null)
                File.Delete(_hidden);
            else if (!LeaveSocketFile)
                File.Delete(_path);
        }
        catch (IOException)
        {
        }
        _stop.Dispose();
    }

    [LoggerMessage(EventId = 1300, Level = LogLevel.Warning, Message = "{Socket}: refused a console client (pid {Pid}, uid {Uid}): {Reason}")]
    private static partial void LogRefused(ILogger logger, string socket, int pid, uint uid, string reason);

    [LoggerMessage(EventId = 1301, Level = LogLevel.Warning, Message = "{Socket}: disconnected a console client more than {Chunks} output chunks behind")]
    private static partial void LogSlowClient(ILogger logger, string socket, int chunks);
}
