using System.Globalization;

namespace Kvm.Tests.Shared;

/// <summary>
/// The TCP receiver that measures a guest's stream, shared by the network tests (failover, rate
/// limits) and the network benchmark's failover part, so that both measure the same way: a python3
/// script run in a peer's network namespace (ip netns exec). It takes one client and reads until
/// the client closes, printing "listening" once it listens, "got N" every MiB and at the end
/// "done N SHA256 GAP_MS RATE GAP_END": the bytes, their SHA-256, the longest time between two
/// reads in milliseconds (the outage a failover caused), the rate in bit/s from the first MiB to
/// the end (past TCP's slow start), and how many bytes had arrived when that longest silence ended
/// (so a reader can tell whether it came where the link was cut, or somewhere else). Given a
/// threshold, it also prints "silence START END N" for every time between two reads at least
/// that long, as it ends: its start and end on CLOCK_MONOTONIC (python's time.monotonic, the
/// clock of .NET's Stopwatch on Linux), in seconds, and the bytes received before it, so that a
/// caller can find the silence around a moment it noted (a link going down).
/// </summary>
public static class StreamReceiver
{
    private const string Script = """
        import hashlib, socket, sys, time
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(sys.argv[1]))); s.listen(1); print("listening", flush=True)
        quiet = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else None
        c, _ = s.accept(); h = hashlib.sha256(); n = 0; mark = 1 << 20; last = time.monotonic(); gap = 0.0; gap_end = 0; t1 = None; n1 = 0
        while True:
            d = c.recv(65536)
            now = time.monotonic()
            if not d: break
            if n > 0 and now - last > gap: gap = now - last; gap_end = n
            if n > 0 and quiet is not None and now - last >= quiet: print("silence %.6f %.6f %d" % (last, now, n), flush=True)
            last = now; h.update(d); n += len(d)
            if t1 is None and n >= 1 << 20: t1 = now; n1 = n
            if n >= mark:
                print("got", n, flush=True); mark += 1 << 20
        rate = int((n - n1) * 8 / (last - t1)) if t1 is not None and last > t1 else 0
        print("done", n, h.hexdigest(), int(gap * 1000), rate, gap_end, flush=True)
        """;

    /// <summary>
    /// The arguments to ip(8) that run the receiver with <paramref name="python"/> on
    /// <paramref name="port"/> in namespace <paramref name="ns"/>; with
    /// <paramref name="silenceMs"/>, it reports every silence at least that long.
    /// </summary>
    public static string[] IpArguments(string ns, string python, int port, int? silenceMs = null) =>
        ["netns", "exec", ns, python, "-c", Script, port.ToString(CultureInfo.InvariantCulture),
         .. silenceMs is { } ms ? [ms.ToString(CultureInfo.InvariantCulture)] : Array.Empty<string>()];

    /// <summary>The moment now on the receiver's clock (CLOCK_MONOTONIC), in seconds.</summary>
    public static double Now() => System.Diagnostics.Stopwatch.GetTimestamp() / (double)System.Diagnostics.Stopwatch.Frequency;

    /// <summary>The receiver's "silence START END N" line, parsed; null for any other line.</summary>
    public static StreamSilence? Silence(string line)
    {
        string[] f = line.Split(' ');
        if (f.Length != 4 || f[0] != "silence"
            || !double.TryParse(f[1], NumberStyles.Float, CultureInfo.InvariantCulture, out double start)
            || !double.TryParse(f[2], NumberStyles.Float, CultureInfo.InvariantCulture, out double end)
            || !long.TryParse(f[3], NumberStyles.None, CultureInfo.InvariantCulture, out long bytes))
            return null;
        return new StreamSilence(start, end, bytes);
    }

    /// <summary>The receiver's "got N" line as N, or null for any other line.</summary>
    public static long? Got(string line) =>
        line.StartsWith("got ", StringComparison.Ordinal) && long.TryParse(line.AsSpan(4), NumberStyles.None, CultureInfo.InvariantCulture, out long n) ? n : null;

    /// <summary>The receiver's "done ..." line, parsed; null for any other line or a malformed one.</summary>
    public static StreamReceived? Done(string line)
    {
        string[] f = line.Split(' ');
        if (f.Length != 6 || f[0] != "done"
            || !long.TryParse(f[1], NumberStyles.None, CultureInfo.InvariantCulture, out long bytes)
            || !int.TryParse(f[3], NumberStyles.None, CultureInfo.InvariantCulture, out int gap)
            || !long.TryParse(f[4], NumberStyles.None, CultureInfo.InvariantCulture, out long rate)
            || !long.TryParse(f[5], NumberStyles.None, CultureInfo.InvariantCulture, out long gapEnd))
            return null;
        return new StreamReceived(bytes, f[2], gap, rate, gapEnd);
    }
}

/// <summary>
/// What a <see cref="StreamReceiver"/> got: the bytes and their SHA-256 (hex), the longest silence
/// between two reads in milliseconds, the rate in bit/s past the first MiB, and the bytes received
/// when the longest silence ended.
/// </summary>
public sealed record StreamReceived(long Bytes, string Sha256, int GapMs, long RateBits, long GapEndBytes);

/// <summary>A silence a <see cref="StreamReceiver"/> reported: its start and end in seconds on CLOCK_MONOTONIC, and the bytes received before it.</summary>
public sealed record StreamSilence(double Start, double End, long BytesBefore)
{
    /// <summary>How long it lasted, in milliseconds.</summary>
    public double Ms => (End - Start) * 1000;
}
