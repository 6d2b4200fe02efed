namespace Kvm.Rpc;

/// <summary>What <see cref="LineChannel.ReadLineAsync"/> found.</summary>
public enum LineStatus
{
    /// <summary>A whole line (without its newline).</summary>
    Line,

    /// <summary>The peer closed the stream with nothing left unread.</summary>
    EndOfStream,

    /// <summary>More than the allowed bytes arrived without a newline: the stream cannot be resynchronized.</summary>
    TooLong,
}

/// <summary>
/// The framing: one message per line, '\n'-terminated, UTF-8. Reads never hold more than the
/// limit plus one read's worth, each byte is scanned for the newline once (a flood without
/// newlines costs linear time and bounded memory), and writes of whole lines are serialized.
/// </summary>
public sealed class LineChannel(Stream stream, int maxLineBytes) : IAsyncDisposable, IDisposable
{
    private const int ReadChunk = 16384;
    private static readonly ReadOnlyMemory<byte> Newline = new byte[] { (byte)'\n' };
    private byte[] _buffer = new byte[Math.Min(ReadChunk, maxLineBytes + 1)];
    private int _start, _end, _scanned;
    private readonly SemaphoreSlim _writeLock = new(1, 1);

    public int MaxLineBytes => maxLineBytes;

    /// <summary>
    /// Reads the next line. The returned memory is valid until the next call. A last line without
    /// a newline before the end of the stream counts as a line.
    /// </summary>
    public async ValueTask<(LineStatus Status, ReadOnlyMemory<byte> Line)> ReadLineAsync(CancellationToken cancel)
    {
        while (true)
        {
            int nl = _buffer.AsSpan(_scanned, _end - _scanned).IndexOf((byte)'\n');
            if (nl >= 0)
            {
                nl += _scanned;
                var line = _buffer.AsMemory(_start, nl - _start);
                _start = _scanned = nl + 1;
                if (line.Length > maxLineBytes)
                    return (LineStatus.TooLong, default);
                if (line.Length > 0 && line.Span[^1] == (byte)'\r')
                    line = line[..^1];
                return (LineStatus.Line, line);
            }
            _scanned = _end;
            if (_end - _start > maxLineBytes)
                return (LineStatus.TooLong, default);
            if (_end == _buffer.Length)
                MakeRoom();
            int n = await stream.ReadAsync(_buffer.AsMemory(_end), cancel).ConfigureAwait(false);
            if (n == 0)
            {
                if (_end == _start)
                    return (LineStatus.EndOfStream, default);
                var last = _buffer.AsMemory(_start, _end - _start);
                _start = _scanned = _end;
                return (LineStatus.Line, last);
            }
            _end += n;
        }
    }

    // Moves the unread bytes to the front, or grows the buffer (up to the limit plus one chunk).
    private void MakeRoom()
    {
        int pending = _end - _start;
        if (_start > 0 && pending < _buffer.Length / 2)
        {
            Buffer.BlockCopy(_buffer, _start, _buffer, 0, pending);
        }
        else
        {
            var bigger = new byte[Math.Min(Math.Max(_buffer.Length * 2, ReadChunk), maxLineBytes + 1 + ReadChunk)];
            Buffer.BlockCopy(_buffer, _start, bigger, 0, pending);
            _buffer = bigger;
        }
        _scanned -= _start;
        _start = 0;
        _end = pending;
    }

    /// <summary>Writes one message and its newline; concurrent writers are serialized.</summary>
    public async ValueTask WriteLineAsync(ReadOnlyMemory<byte> message, CancellationToken cancel)
    {
        await _writeLock.WaitAsync(cancel).ConfigureAwait(false);
        try
        {
            await stream.WriteAsync(message, cancel).ConfigureAwait(false);
            await stream.WriteAsync(Newline, cancel).ConfigureAwait(false);
            await stream.FlushAsync(cancel).ConfigureAwait(false);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    public void Dispose()
    {
        stream.Dispose();
        _writeLock.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        await stream.DisposeAsync().ConfigureAwait(false);
        _writeLock.Dispose();
    }
}
