using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using Kvm.Storage;
using Kvm.Vmm.Machine;

namespace Kvm.Cli;

/// <summary>
/// vmctl disk bench: the access pattern of <c>qemu-img bench</c> (same options, same offsets, same
/// flush points, same summary lines) run against one <see cref="IBlockImage"/>, so that the two
/// tools can be compared on the same image in the same run.
/// </summary>
public static class DiskBenchCommand
{
    private const int MaxDepth = 1024;

    public static Command Build()
    {
        var file = new Argument<string>("FILE") { Description = "the image (its backing chain is opened too)" };
        var count = new Option<int>("--count", "-c") { Description = "number of requests", DefaultValueFactory = _ => 75000 };
        var depth = new Option<int>("--depth", "-d")
        {
            Description = $"requests in flight at once; each runs on its own thread against the one image (1 to {MaxDepth})",
            DefaultValueFactory = _ => 64,
        };
        var size = new Option<string>("--size", "-s") { Description = "bytes per request (K, M suffixes)", DefaultValueFactory = _ => "4K" };
        var step = new Option<string>("--step", "-S") { Description = "distance between the starts of consecutive requests (default, or 0: the request size, i.e. sequential)" };
        var offset = new Option<string>("--offset", "-o") { Description = "where the first request starts", DefaultValueFactory = _ => "0" };
        var write = new Option<bool>("--write", "-w") { Description = "write instead of read (the image is opened read-write)" };
        var pattern = new Option<string>("--pattern") { Description = "the byte written by write requests (decimal, 0x hex or 0 octal)", DefaultValueFactory = _ => "0" };
        var flushInterval = new Option<int>("--flush-interval")
        {
            Description = "write tests: whenever the number of requests not yet sent is a multiple of N, let the requests in flight finish, then flush (0 = never)",
            DefaultValueFactory = _ => 0,
        };
        var format = new Option<string>("--format", "-f") { Description = "qcow2 or raw (default: probed)" };
        format.AcceptOnlyFromAmong("qcow2", "raw");
        var cmd = new Command("bench",
            "Time a run of fixed-size requests, as 'qemu-img bench' does with the same options: request i starts at\n" +
            "OFFSET + i*STEP, wrapped around the image size (OFFSET for the first; qemu-img 7.2 wraps modulo the\n" +
            "image size the same way). A request that would run past the end of the image is refused before the run.\n" +
            "Prints the elapsed time, requests per second and MB/s (1 MB = 10^6 bytes).")
        {
            file, count, depth, size, step, offset, write, pattern, flushInterval, format,
        };
        cmd.SetAction(p => DiskCommands.Guard(() =>
        {
            var settings = new BenchSettings(
                Count: p.GetValue(count),
                Depth: p.GetValue(depth),
                Size: ParseByteCount(p.GetRequiredValue(size), "request size (--size)"),
                Step: p.GetValue(step) is { } s ? ParseByteCount(s, "step (--step)") : 0,
                Offset: ParseOffset(p.GetRequiredValue(offset)),
                Write: p.GetValue(write),
                Pattern: ParsePattern(p.GetRequiredValue(pattern)),
                FlushInterval: p.GetValue(flushInterval));
            settings = settings.Validated();
            using var image = DiskImage.Open(p.GetRequiredValue(file), new ImageOpenOptions { ReadOnly = !settings.Write }, p.GetValue(format));
            settings.CheckFits(image.Size);

            Console.WriteLine($"Sending {settings.Count} {(settings.Write ? "write" : "read")} requests, {settings.Size} bytes each, " +
                              $"{settings.Depth} in parallel (starting at offset {settings.Offset}, step size {settings.Step})");
            if (settings.FlushInterval > 0)
                Console.WriteLine($"Sending flush every {settings.FlushInterval} requests");
            var elapsed = Run(image, settings);
            double seconds = elapsed.TotalSeconds;
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"Run completed in {seconds:0.000} seconds."));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"Requests per second: {settings.Count / seconds:0.0}"));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"Throughput: {(double)settings.Count * settings.Size / seconds / 1e6:0.00} MB/s"));
            return 0;
        }));
        return cmd;
    }

    /// <summary>The options of one run, checked as qemu-img bench checks them.</summary>
    public sealed record BenchSettings(int Count, int Depth, int Size, int Step, ulong Offset, bool Write, byte Pattern, int FlushInterval)
    {
        public BenchSettings Validated()
        {
            if (Count < 1)
                throw new ArgumentException($"request count (--count) must be at least 1, not {Count}");
            if (Depth < 1 || Depth > MaxDepth)
                throw new ArgumentException($"queue depth (--depth) must be between 1 and {MaxDepth}, not {Depth}");
            if (Size < 1)
                throw new ArgumentException("request size (--size) must be at least 1 byte");
            if (FlushInterval < 0)
                throw new ArgumentException($"--flush-interval must not be negative, not {FlushInterval}");
            if (FlushInterval > 0 && !Write)
                throw new ArgumentException("--flush-interval is only available in write tests (-w)");
            if (FlushInterval > 0 && FlushInterval < Depth)
                throw new ArgumentException($"--flush-interval ({FlushInterval}) can't be smaller than the depth ({Depth})");
            // No more threads than requests; a step of 0 means "the request size", as in qemu-img.
            return this with { Depth = Math.Min(Depth, Count), Step = Step == 0 ? Size : Step };
        }

        /// <summary>Where request <paramref name="i"/> starts: the first at the offset as given, later ones wrapped modulo the image size.</summary>
        public ulong OffsetOf(long i, ulong imageSize) =>
            i == 0 ? Offset : imageSize == 0 ? 0 : (Offset + (ulong)i * (ulong)Step) % imageSize;

        /// <summary>Refuses the run up front when any request would reach past the end of the image.</summary>
        public void CheckFits(ulong imageSize)
        {
            for (long i = 0; i < Count; i++)
            {
                ulong start = OffsetOf(i, imageSize);
                if (start > imageSize || (ulong)Size > imageSize - start)
                    throw new ArgumentException(
                        $"request {i + 1} of {Count} would cover [{start}, {start + (ulong)Size}), past the end of the {imageSize}-byte image " +
                        "(offsets wrap modulo the image size; choose an offset, size and step that keep every request inside)");
            }
        }
    }

    /// <summary>
    /// Runs the requests on <c>Depth</c> threads (the calling thread is one of them) that take request
    /// numbers from a shared counter. With a flush interval, the run stops taking new requests at each
    /// flush point, waits for those in flight, and flushes: qemu-img bench's points are where the
    /// number of requests not yet sent is a multiple of the interval (after the first batch of Depth,
    /// and at the end).
    /// </summary>
    public static TimeSpan Run(IBlockImage image, BenchSettings s)
    {
        ulong imageSize = image.Size;
        long next = 0;
        long batchEnd = NextFlushPoint(s, s.Depth);
        var failures = new List<Exception>();
        bool stop = false;
        using var barrier = s.FlushInterval > 0
            ? new Barrier(s.Depth, _ =>
            {
                // Every worker is waiting here: the requests before batchEnd have all completed.
                if (!Volatile.Read(ref stop))
                    image.Flush();
                Volatile.Write(ref next, batchEnd);
                batchEnd = NextFlushPoint(s, batchEnd + 1);
            })
            : null;
        using var go = new ManualResetEventSlim(false);

        void Worker()
        {
            var buffer = GC.AllocateUninitializedArray<byte>(s.Size);
            buffer.AsSpan().Fill(s.Pattern);
            try
            {
                go.Wait();
                while (!Volatile.Read(ref stop))
                {
                    long i = Interlocked.Increment(ref next) - 1;
                    if (i < Volatile.Read(ref batchEnd))
                    {
                        ulong at = s.OffsetOf(i, imageSize);
                        if (s.Write)
                            image.Write(at, buffer);
                        else
                            image.Read(at, buffer);
                        continue;
                    }
                    if (barrier is null || Volatile.Read(ref batchEnd) >= s.Count)
                        break; // every request has been taken
                    barrier.SignalAndWait();
                }
            }
            catch (Exception e)
            {
                lock (failures)
                    failures.Add(e is BarrierPostPhaseException { InnerException: { } inner } ? inner : e);
                Volatile.Write(ref stop, true);
            }
            finally
            {
                barrier?.RemoveParticipant();
            }
        }

        var threads = new Thread[s.Depth - 1];
        for (int t = 0; t < threads.Length; t++)
        {
            threads[t] = new Thread(Worker) { IsBackground = true, Name = $"bench {t + 1}" };
            threads[t].Start();
        }
        var clock = Stopwatch.StartNew();
        go.Set();
        Worker();
        foreach (var t in threads)
            t.Join();
        if (failures.Count > 0)
            throw failures[0];
        if (s.FlushInterval > 0)
            image.Flush(); // no requests left to send: 0 is a multiple of the interval
        clock.Stop();
        return clock.Elapsed;
    }

    // The first flush point at or after `from` requests sent (and never past the last request).
    private static long NextFlushPoint(BenchSettings s, long from)
    {
        if (s.FlushInterval == 0)
            return s.Count;
        long f = s.FlushInterval;
        long point = from + (((s.Count - from) % f) + f) % f;
        return Math.Min(point, s.Count);
    }

    private static int ParseByteCount(string text, string what)
    {
        ulong v;
        try
        {
            v = VmSpec.ParseSize(text);
        }
        catch (FormatException)
        {
            throw new FormatException($"{what} '{text}' is not a byte count (examples: 4096, 4K, 1M)");
        }
        if (v > int.MaxValue)
            throw new ArgumentException($"{what} {text} is larger than {int.MaxValue} bytes");
        return (int)v;
    }

    private static ulong ParseOffset(string text)
    {
        try
        {
            return VmSpec.ParseSize(text);
        }
        catch (FormatException)
        {
            throw new FormatException($"offset (--offset) '{text}' is not a byte count (examples: 0, 512K, 1G)");
        }
    }

    /// <summary>A byte as C's strtoul with base 0 reads it (as qemu-img does): 0x hex, leading-0 octal, else decimal.</summary>
    private static byte ParsePattern(string text)
    {
        string t = text.Trim();
        int radix = 10;
        if (t.StartsWith("0x", StringComparison.OrdinalIgnoreCase))
        {
            radix = 16;
            t = t[2..];
        }
        else if (t.Length > 1 && t[0] == '0')
        {
            radix = 8;
            t = t[1..];
        }
        ulong v = 0;
        bool ok = t.Length > 0;
        foreach (char c in t)
        {
            int digit = c is >= '0' and <= '9' ? c - '0' : c is >= 'a' and <= 'f' ? c - 'a' + 10 : c is >= 'A' and <= 'F' ? c - 'A' + 10 : 99;
            if (digit >= radix || v > 255)
            {
                ok = false;
                break;
            }
            v = v * (ulong)radix + (ulong)digit;
        }
        if (!ok || v > 255)
            throw new FormatException($"pattern byte (--pattern) '{text}' is not a number from 0 to 255");
        return (byte)v;
    }
}
