using System.Net.Sockets;
using System.Text;
using Kvm.Rpc;

namespace Kvm.Rpc.Tests;

/// <summary>A connected pair of unix stream sockets (through a listener in a temporary directory).</summary>
internal sealed class SocketPair : IDisposable
{
    private readonly TempDir _dir = new();

    public SocketPair()
    {
        string path = _dir.File("pair.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        Writer = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        Writer.Connect(new UnixDomainSocketEndPoint(path));
        Reader = listener.Accept();
    }

    public Socket Writer { get; }
    public Socket Reader { get; }

    public LineChannel ReaderChannel(int limit) => new(new NetworkStream(Reader, ownsSocket: true), limit);

    public void Send(string text) => Send(Encoding.UTF8.GetBytes(text));

    public void Send(ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
            bytes = bytes[Writer.Send(bytes)..];
    }

    public void Dispose()
    {
        Writer.Dispose();
        Reader.Dispose();
        _dir.Dispose();
    }
}

public sealed class LineChannelTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    private static async Task<(LineStatus Status, string Text)> Read(LineChannel channel)
    {
        using var cts = new CancellationTokenSource(Timeout);
        var (status, line) = await channel.ReadLineAsync(cts.Token);
        return (status, Encoding.UTF8.GetString(line.Span));
    }

    [Fact]
    public async Task A_line_split_across_many_writes_is_returned_only_once_whole()
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(1024);
        string line = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"split\",\"params\":{\"text\":\"h\u00e9llo\"}}";
        byte[] bytes = Encoding.UTF8.GetBytes(line + "\n");
        var read = channel.ReadLineAsync(CancellationToken.None).AsTask();
        // Pieces of 1 to 7 bytes, each after the reader has consumed the one before (and must
        // still be waiting: a part of a line is not a line). The é is split between two pieces.
        int at = 0, piece = 1;
        while (at < bytes.Length - 1)
        {
            int n = Math.Min(piece, bytes.Length - 1 - at);
            pair.Send(bytes.AsSpan(at, n));
            at += n;
            piece = piece % 7 + 1;
            await Task.Delay(5);
            Assert.False(read.IsCompleted, $"ReadLineAsync returned after {at} of {bytes.Length} bytes, before the newline");
        }
        pair.Send(bytes.AsSpan(at));
        var (status, got) = await read.WaitAsync(Timeout);
        Assert.Equal(LineStatus.Line, status);
        Assert.Equal(line, Encoding.UTF8.GetString(got.Span));
    }

    [Fact]
    public async Task Several_lines_in_one_write_are_returned_one_by_one_without_further_reads()
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(1024);
        pair.Send("first\nsecond line\n\nfourth\n");
        // The writer stays open: if the channel lost the lines after the first in its buffer, a
        // read would wait for more data and time out.
        Assert.Equal((LineStatus.Line, "first"), await Read(channel));
        Assert.Equal((LineStatus.Line, "second line"), await Read(channel));
        Assert.Equal((LineStatus.Line, ""), await Read(channel));
        Assert.Equal((LineStatus.Line, "fourth"), await Read(channel));
        var pending = channel.ReadLineAsync(CancellationToken.None).AsTask();
        await Task.Delay(50);
        Assert.False(pending.IsCompleted, "a fifth line came out of four");
        pair.Writer.Shutdown(SocketShutdown.Send);
        Assert.Equal(LineStatus.EndOfStream, (await pending.WaitAsync(Timeout)).Status);
    }

    [Fact]
    public async Task Crlf_line_endings_are_stripped()
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(1024);
        pair.Send("one\r\ntwo\r\n\r\nlast\n");
        Assert.Equal((LineStatus.Line, "one"), await Read(channel));
        Assert.Equal((LineStatus.Line, "two"), await Read(channel));
        Assert.Equal((LineStatus.Line, ""), await Read(channel));
        Assert.Equal((LineStatus.Line, "last"), await Read(channel));
    }

    [Fact]
    public async Task A_last_line_without_newline_before_the_end_of_stream_is_a_line()
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(1024);
        pair.Send("complete\nunterminated");
        pair.Writer.Shutdown(SocketShutdown.Send);
        Assert.Equal((LineStatus.Line, "complete"), await Read(channel));
        Assert.Equal((LineStatus.Line, "unterminated"), await Read(channel));
        Assert.Equal(LineStatus.EndOfStream, (await Read(channel)).Status);
    }

    [Fact]
    public async Task An_empty_stream_is_the_end_of_stream()
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(1024);
        pair.Writer.Shutdown(SocketShutdown.Send);
        Assert.Equal(LineStatus.EndOfStream, (await Read(channel)).Status);
    }

    [Theory]
    [InlineData(10)]
    [InlineData(16384)]      // the read chunk
    [InlineData(100_000)]    // larger than the first buffer, reached by growing it
    public async Task A_line_of_exactly_the_limit_is_accepted_and_one_byte_more_is_too_long(int limit)
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(limit);
        string exact = new string('x', limit - 1) + "y";
        var writer = Task.Run(() =>
        {
            pair.Send(exact + "\n");
            pair.Send(new string('z', limit + 1) + "\n");
        });
        var (status, text) = await Read(channel);
        Assert.Equal(LineStatus.Line, status);
        Assert.Equal(exact, text);
        Assert.Equal(LineStatus.TooLong, (await Read(channel)).Status);
        await writer.WaitAsync(Timeout);
    }

    [Fact]
    public async Task A_too_long_line_is_reported_without_waiting_for_its_newline()
    {
        using var pair = new SocketPair();
        using var channel = pair.ReaderChannel(1000);
        pair.Send(new string('a', 1001)); // no newline, and the writer stays open
        Assert.Equal(LineStatus.TooLong, (await Read(channel)).Status);
    }

    [Fact]
    public async Task Lines_written_from_many_threads_never_interleave()
    {
        const int threads = 8, linesPerThread = 40;
        using var pair = new SocketPair();
        using var writerChannel = new LineChannel(new NetworkStream(pair.Writer, ownsSocket: false), 1 << 20);
        using var reader = pair.ReaderChannel(1 << 20);
        // Lines up to 200 KB: larger than the socket buffer, so a single write is split by the
        // kernel into several sends while other threads wait to write.
        static string LineOf(int thread, int seq)
        {
            int length = new Random(thread * 1000 + seq).Next(1, 200_000);
            return $"{thread}:{seq}:{new string((char)('a' + thread), length)}";
        }
        var writers = Enumerable.Range(0, threads).Select(t => Task.Run(async () =>
        {
            for (int i = 0; i < linesPerThread; i++)
                await writerChannel.WriteLineAsync(Encoding.ASCII.GetBytes(LineOf(t, i)), CancellationToken.None);
        })).ToArray();

        var next = new int[threads];
        for (int received = 0; received < threads * linesPerThread; received++)
        {
            var (status, text) = await Read(reader);
            Assert.Equal(LineStatus.Line, status);
            var parts = text.Split(':', 3);
            Assert.Equal(3, parts.Length);
            int t = int.Parse(parts[0], System.Globalization.CultureInfo.InvariantCulture);
            int seq = int.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture);
            Assert.Equal(next[t], seq);
            Assert.True(text == LineOf(t, seq), $"line {t}:{seq} came out mixed with another ({text.Length} characters)");
            next[t]++;
        }
        await Task.WhenAll(writers).WaitAsync(Timeout);
        Assert.All(next, n => Assert.Equal(linesPerThread, n));
    }
}

/// <summary>Tests that measure the whole process (allocated bytes, memory): they run alone.</summary>
[CollectionDefinition(nameof(RunsAlone), DisableParallelization = true)]
public sealed class RunsAlone;

[Collection(nameof(RunsAlone))]
public sealed class LineChannelMemoryTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    private static async Task<(LineStatus Status, string Text)> Read(LineChannel channel)
    {
        using var cts = new CancellationTokenSource(Timeout);
        var (status, line) = await channel.ReadLineAsync(cts.Token);
        return (status, Encoding.UTF8.GetString(line.Span));
    }

    [Fact]
    public async Task A_flood_without_newlines_is_too_long_after_reading_about_the_limit_in_bounded_memory()
    {
        const int limit = 256 << 10;
        const int flood = 32 << 20;
        using var pair = new SocketPair();
        using var stream = new NetworkStream(pair.Reader, ownsSocket: false);
        using var channel = new LineChannel(stream, limit);
        var chunk = new byte[64 << 10];
        chunk.AsSpan().Fill((byte)'A');
        var writer = Task.Factory.StartNew(() =>
        {
            for (int sent = 0; sent < flood; sent += chunk.Length)
                pair.Send(chunk);
            pair.Writer.Shutdown(SocketShutdown.Send);
        }, TaskCreationOptions.LongRunning);

        long before = GC.GetTotalAllocatedBytes(precise: true);
        var (status, _) = await Read(channel);
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        Assert.Equal(LineStatus.TooLong, status);

        // What the channel did not read is still in the socket: drain and count it.
        long left = 0;
        var drain = new byte[1 << 20];
        int n;
        while ((n = await stream.ReadAsync(drain)) > 0)
            left += n;
        await writer.WaitAsync(Timeout);
        long consumed = flood - left;
        Assert.InRange(consumed, limit + 1, limit + 1 + 16384);
        // Its buffer grows to the limit plus one read chunk; doubling on the way allocates less
        // than that again. A channel that kept the flood would allocate tens of MiB.
        Assert.True(allocated < 3 * limit + (256 << 10), $"reading a {flood}-byte flood with a {limit}-byte limit allocated {allocated} bytes");
    }

}
