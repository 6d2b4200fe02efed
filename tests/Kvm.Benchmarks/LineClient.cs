using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;

/// <summary>
/// The one client the RPC figures use for every server, ours and QEMU's: one JSON text per line on
/// a unix stream socket, blocking reads and writes, each reply parsed with JsonDocument. So a
/// difference between the rows is the servers' and their transports', not two clients'.
/// </summary>
internal sealed class LineClient : IDisposable
{
    private readonly Socket _socket;
    private readonly string _path;
    private byte[] _buffer = new byte[64 * 1024];
    private int _start, _end;
    private long _id;

    private LineClient(Socket socket, string path)
    {
        _socket = socket;
        _path = path;
    }

    /// <summary>Connects to <paramref name="path"/>; a read that waits longer than <paramref name="timeout"/> fails.</summary>
    public static LineClient Connect(string path, TimeSpan timeout)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified)
        {
            ReceiveTimeout = (int)timeout.TotalMilliseconds,
        };
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new BenchmarkFailure($"cannot connect to {path}: {e.Message}");
        }
        return new LineClient(socket, path);
    }

    /// <summary>
    /// Connects to QEMU's QMP socket (waiting up to <paramref name="timeout"/> for QEMU to make it),
    /// reads its greeting and leaves capability negotiation, so commands can follow.
    /// </summary>
    public static LineClient ConnectQmp(string path, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                return Greeted(Connect(path, timeout), path);
            }
            catch (BenchmarkFailure) when (clock.Elapsed < timeout)
            {
                Thread.Sleep(20);
            }
        }
    }

    /// <summary>A JSON-RPC 2.0 call; returns the whole reply, whose result it has checked is there.</summary>
    public JsonDocument Call(string method, string parameters = "{}")
    {
        long id = ++_id;
        Send($"{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{method}\",\"params\":{parameters}}}");
        while (true)
        {
            var reply = ReadJson();
            var root = reply.RootElement;
            if (root.TryGetProperty("id", out var rid) && rid.ValueKind == JsonValueKind.Number && rid.GetInt64() == id)
            {
                if (root.TryGetProperty("result", out _))
                    return reply;
                string text = root.GetRawText();
                reply.Dispose();
                throw new BenchmarkFailure($"{method} at {_path} failed: {text}");
            }
            reply.Dispose();
        }
    }

    /// <summary>
    /// A QMP command, with <paramref name="arguments"/> (a JSON object) if given; returns the whole
    /// reply, whose 'return' it has checked is there. Events on the way are kept for
    /// <see cref="WaitMigration"/> (and dropped by <see cref="ClearEvents"/>).
    /// </summary>
    public JsonDocument Qmp(string command, string? arguments = null)
    {
        long id = ++_id;
        Send(arguments is null
            ? $"{{\"execute\":\"{command}\",\"id\":{id}}}"
            : $"{{\"execute\":\"{command}\",\"arguments\":{arguments},\"id\":{id}}}");
        while (true)
        {
            var reply = ReadJson();
            var root = reply.RootElement;
            if (root.TryGetProperty("event", out _))
            {
                _events.Enqueue(reply);
                continue;
            }
            if (root.TryGetProperty("return", out _))
                return reply;
            string text = root.GetRawText();
            reply.Dispose();
            throw new BenchmarkFailure($"QMP {command} at {_path} failed: {text}");
        }
    }

    private readonly Queue<JsonDocument> _events = new();

    /// <summary>Drops the QMP events kept so far.</summary>
    public void ClearEvents()
    {
        while (_events.TryDequeue(out var e))
            e.Dispose();
    }

    /// <summary>
    /// Waits for QEMU's MIGRATION event that says completed (the 'events' migration capability must
    /// be on); a failed or cancelled migration, or a read that waits past the socket's timeout, fails.
    /// </summary>
    public void WaitMigration()
    {
        while (true)
        {
            using var e = _events.TryDequeue(out var kept) ? kept : ReadJson();
            var root = e.RootElement;
            if (root.TryGetProperty("event", out var name) && name.GetString() == "MIGRATION"
                && root.GetProperty("data").GetProperty("status").GetString() is { } status)
            {
                if (status == "completed")
                    return;
                if (status is "failed" or "cancelled")
                    throw new BenchmarkFailure($"QEMU's migration at {_path} ended '{status}'");
            }
        }
    }

    /// <summary>
    /// Accepts QEMU's QMP monitor on <paramref name="listener"/> (QEMU started with
    /// <c>-chardev socket,path=...</c> as a client, so nobody polls for its socket), reads its
    /// greeting and leaves capability negotiation. Waits up to <paramref name="timeout"/>, unless
    /// QEMU ends first (<paramref name="ended"/>); a later read that waits that long fails.
    /// </summary>
    public static LineClient AcceptQmp(Socket listener, string path, Func<bool> ended, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (!listener.Poll(TimeSpan.FromMilliseconds(100), SelectMode.SelectRead))
        {
            if (clock.Elapsed > timeout || ended())
                throw new BenchmarkFailure($"QEMU did not connect its QMP monitor to {path}");
        }
        var socket = listener.Accept();
        socket.ReceiveTimeout = (int)timeout.TotalMilliseconds;
        return Greeted(new LineClient(socket, path), path);
    }

    /// <summary>Reads QEMU's QMP greeting on <paramref name="c"/> and enters command mode; disposes of it on failure.</summary>
    private static LineClient Greeted(LineClient c, string path)
    {
        try
        {
            using (var greeting = c.ReadJson())
                if (!greeting.RootElement.TryGetProperty("QMP", out _))
                    throw new BenchmarkFailure($"QMP at {path}: no greeting but {greeting.RootElement.GetRawText()}");
            c.Qmp("qmp_capabilities").Dispose();
            return c;
        }
        catch
        {
            c.Dispose();
            throw;
        }
    }

    private void Send(string line)
    {
        var bytes = Encoding.UTF8.GetBytes(line + "\n");
        try
        {
            for (int sent = 0; sent < bytes.Length;)
                sent += _socket.Send(bytes, sent, bytes.Length - sent, SocketFlags.None);
        }
        catch (SocketException e)
        {
            throw new BenchmarkFailure($"writing to {_path}: {e.Message}");
        }
    }

    private JsonDocument ReadJson()
    {
        while (true)
        {
            int newline = Array.IndexOf(_buffer, (byte)'\n', _start, _end - _start);
            if (newline >= 0)
            {
                // A copy: a JsonDocument keeps using the memory it was parsed from, and the buffer is reused.
                var line = _buffer.AsSpan(_start, newline - _start).ToArray();
                _start = newline + 1;
                try
                {
                    return JsonDocument.Parse(line);
                }
                catch (JsonException e)
                {
                    throw new BenchmarkFailure($"{_path} sent a line that is not JSON: {e.Message}");
                }
            }
            if (_start > 0)
            {
                Array.Copy(_buffer, _start, _buffer, 0, _end - _start);
                _end -= _start;
                _start = 0;
            }
            if (_end == _buffer.Length)
                Array.Resize(ref _buffer, _buffer.Length * 2);
            int n;
            try
            {
                n = _socket.Receive(_buffer, _end, _buffer.Length - _end, SocketFlags.None);
            }
            catch (SocketException e)
            {
                throw new BenchmarkFailure($"reading from {_path}: {e.Message}");
            }
            if (n == 0)
                throw new BenchmarkFailure($"{_path} closed the connection");
            _end += n;
        }
    }

    public void Dispose()
    {
        ClearEvents();
        _socket.Dispose();
    }
}

/// <summary>A run or a step of a benchmark that did not go as expected.</summary>
internal sealed class BenchmarkFailure(string message) : Exception(message);
