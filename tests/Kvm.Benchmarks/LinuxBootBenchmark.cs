using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// Linux boot benchmark: the time from process start to the console line `smpboot: Allowing 2 CPUs`
/// for Debian's kernel (build/linux/vmlinux, entered through its PVH note) under `vmctl run` and
/// under QEMU's microvm, with the same vCPUs, memory and command line, alternating the two VMMs so
/// both see the same machine load. Each run stops the clock when the line appears on the guest's
/// console (the VMM's stdout), then kills the VMM. Under PVM (this project's machines) the kernel's
/// CPL0 code is emulated, so one run takes tens of seconds.
/// </summary>
internal static partial class LinuxBootBenchmark
{
    private const string Usage =
        "Usage: Kvm.Benchmarks linux [--runs N] [--limit S]\n" +
        "  --runs N   timed runs of each VMM, alternating (default 3)\n" +
        "  --limit S  seconds a run may take to reach the line before it fails (default 300)";

    private const string Marker = "smpboot: Allowing 2 CPUs";
    private const string CommandLine = "console=ttyS0 earlyprintk=ttyS0";
    private const int ConsoleTail = 15;

    /// <summary>One VMM to time: a name for messages and the table, the program, its arguments.</summary>
    private sealed record Side(string Name, string File, string[] Args);

    /// <summary>One timed run: seconds from process start to the line, and the kernel's own timestamp on it.</summary>
    private sealed record Result(double Seconds, double? GuestSeconds);

    public static int Run(string[] args)
    {
        int runs = 3, limit = 300;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--runs" when i + 1 < args.Length && int.TryParse(args[i + 1], out int n) && n > 0:
                    runs = n;
                    i++;
                    break;
                case "--limit" when i + 1 < args.Length && int.TryParse(args[i + 1], out int s) && s > 0:
                    limit = s;
                    i++;
                    break;
                case "--help" or "-h":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    return Prerequisites.UnknownArgument(args[i], Usage);
            }
        }

        string vmlinux = Path.Combine(TestEnvironment.BuildDir, "linux", "vmlinux");
        if (!Prerequisites.Check([(vmlinux, "Debian's vmlinux")], [], buildHint: "make linux")
            || !Prerequisites.Check([Prerequisites.Vmctl], [Prerequisites.Qemu]))
            return 1;
        string vmctl = TestEnvironment.Vmctl;
        string qemu = TestEnvironment.FindOnPath("qemu-system-x86_64")!;

        var ours = new Side("vmctl run", vmctl,
            ["run", "--kernel", vmlinux, "--cpus", "2", "--memory", "512M", "--cmdline", CommandLine]);
        // microvm's defaults (acpi=on in QEMU 7.2, qboot as firmware) give the kernel the MADT it
        // counts CPUs from, so no further machine options are needed for the line.
        var theirs = new Side("qemu-system-x86_64", qemu,
        [
            "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-smp", "2", "-m", "512M", "-kernel", vmlinux, "-append", CommandLine,
        ]);

        // A full boot is far too slow here to spend one per VMM on warming up. What a cold first run
        // would pay for is the page cache: read the kernel once, and start each program once for
        // something quick (vmctl's runtime and assemblies, QEMU's binary and libraries).
        using (var f = File.OpenRead(vmlinux))
            f.CopyTo(Stream.Null);
        TestEnvironment.RunProcess(vmctl, ["run", "--help"], TimeSpan.FromSeconds(60));
        TestEnvironment.RunProcess(qemu, ["--version"], TimeSpan.FromSeconds(60));

        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var a = new List<Result>();
        var b = new List<Result>();
        try
        {
            for (int i = 0; i < runs; i++)
            {
                a.Add(Time(ours, limit));
                b.Add(Time(theirs, limit));
                Console.Error.WriteLine($"run {i + 1}/{runs}: {ours.Name} {a[^1].Seconds:0.00} s, {theirs.Name} {b[^1].Seconds:0.00} s");
            }
        }
        catch (BenchmarkFailure e)
        {
            Console.Error.WriteLine($"benchmark: {e.Message}");
            return 1;
        }

        Console.WriteLine($"Linux boot to '{Marker}' ({Path.GetFileName(vmlinux)} via PVH, 2 vCPUs, 512 MiB), {runs} runs each, alternating " +
                          $"({Environment.MachineName}, {Environment.ProcessorCount} CPUs, {started:yyyy-MM-dd HH:mm} UTC)");
        Console.WriteLine($"{"",-22}{"median s",12}{"mean s",12}{"min s",12}");
        Row(ours.Name, a);
        Row(theirs.Name, b);
        double ma = DiskBenchmark.Median(a.Select(r => r.Seconds).ToList()), mb = DiskBenchmark.Median(b.Select(r => r.Seconds).ToList());
        Console.WriteLine($"ratio vmctl/qemu (median): {ma / mb:0.00}   (below 1 means vmctl is faster)");
        Console.WriteLine($"kernel timestamp on the line (median): vmctl {GuestMedian(a)}, qemu {GuestMedian(b)}; " +
                          $"load average {loadBefore} before, {LoadAverage()} after");
        return 0;
    }

    /// <summary>
    /// Starts the VMM, reads its console until the line appears and returns the time since the start;
    /// then kills it (with its children) and waits for it. Throws <see cref="BenchmarkFailure"/> when the
    /// VMM ends first or the limit passes, naming the VMM and showing its last console lines.
    /// </summary>
    private static Result Time(Side side, int limitSeconds)
    {
        var psi = new ProcessStartInfo(side.File)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var x in side.Args)
            psi.ArgumentList.Add(x);

        var console = new Tail(ConsoleTail);
        var errors = new Tail(ConsoleTail);
        var sw = Stopwatch.StartNew();
        using var p = Process.Start(psi) ?? throw new BenchmarkFailure($"{side.Name}: cannot start {side.File}");
        p.StandardInput.Close(); // the console's input: nothing to type, and no terminal to read from
        // stderr (vmctl's errors, QEMU's warnings) drains on its own so its pipe never fills.
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
                errors.Add(e.Data);
        };
        p.BeginErrorReadLine();

        // The console is read as it comes, on a task of its own, so the limit holds even when the
        // guest prints nothing: ending the process closes the pipe and the task with it.
        var reader = Task.Run(() => WaitForMarker(p.StandardOutput, console, sw));
        bool done = reader.Wait(TimeSpan.FromSeconds(limitSeconds));
        (double Seconds, string? Line)? found = done ? reader.Result : null;

        try
        {
            p.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // It had exited already.
        }
        p.WaitForExit();
        // The pipe has closed with the process, so the reader ends too (before the process is disposed).
        try
        {
            reader.Wait(TimeSpan.FromSeconds(10));
        }
        catch (AggregateException)
        {
        }

        if (found is { } hit && hit.Line is not null)
            return new Result(hit.Seconds, GuestTime(hit.Line));

        string why = done
            ? $"{side.Name} exited with status {p.ExitCode} after {sw.Elapsed.TotalSeconds:0.0} s without printing '{Marker}'"
            : $"{side.Name} did not print '{Marker}' within {limitSeconds} s";
        var text = new StringBuilder(why);
        text.Append($"\n  command: {side.File} {string.Join(' ', side.Args.Select(Quote))}");
        text.Append($"\n  last console lines:{Lines(console)}");
        text.Append($"\n  last stderr lines:{Lines(errors)}");
        throw new BenchmarkFailure(text.ToString());
    }

    /// <summary>Reads the console in chunks until the marker appears (returns the time and its line) or the pipe ends.</summary>
    private static (double Seconds, string? Line) WaitForMarker(StreamReader output, Tail console, Stopwatch sw)
    {
        var buffer = new char[4096];
        var line = new StringBuilder();
        int n;
        while ((n = output.Read(buffer, 0, buffer.Length)) > 0)
        {
            for (int i = 0; i < n; i++)
            {
                if (buffer[i] != '\n')
                {
                    line.Append(buffer[i]);
                    continue;
                }
                string complete = line.ToString().TrimEnd('\r');
                line.Clear();
                console.Add(complete);
                if (complete.Contains(Marker, StringComparison.Ordinal))
                    return (sw.Elapsed.TotalSeconds, complete);
            }
            // The console comes a byte per port write, so the marker can arrive before its line ends.
            string partial = line.ToString();
            if (partial.Contains(Marker, StringComparison.Ordinal))
            {
                console.Add(partial);
                return (sw.Elapsed.TotalSeconds, partial);
            }
        }
        if (line.Length > 0)
            console.Add(line.ToString());
        return (sw.Elapsed.TotalSeconds, null);
    }

    /// <summary>The kernel's timestamp at the start of a console line (`[    7.616326] ...`), in seconds.</summary>
    private static double? GuestTime(string line)
    {
        var m = Timestamp().Match(line);
        return m.Success ? double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) : null;
    }

    [GeneratedRegex(@"\[\s*([0-9]+\.[0-9]+)\]")]
    private static partial Regex Timestamp();

    private static string GuestMedian(List<Result> v)
    {
        var t = v.Where(r => r.GuestSeconds is not null).Select(r => r.GuestSeconds!.Value).ToList();
        return t.Count == 0 ? "none" : $"{DiskBenchmark.Median(t):0.00} s";
    }

    private static void Row(string name, List<Result> v)
    {
        var s = v.Select(r => r.Seconds).ToList();
        Console.WriteLine($"{name,-22}{DiskBenchmark.Median(s),12:0.00}{s.Average(),12:0.00}{s.Min(),12:0.00}");
    }

    private static string Lines(Tail t)
    {
        var lines = t.Lines();
        return lines.Length == 0 ? " (none)" : string.Concat(lines.Select(l => "\n    " + l));
    }

    private static string Quote(string s) => s.Contains(' ') ? $"\"{s}\"" : s;

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));

    /// <summary>The last few lines of a stream, added to from one thread and read from another.</summary>
    private sealed class Tail(int capacity)
    {
        private readonly Queue<string> _lines = new();

        public void Add(string line)
        {
            lock (_lines)
            {
                if (_lines.Count == capacity)
                    _lines.Dequeue();
                _lines.Enqueue(line);
            }
        }

        public string[] Lines()
        {
            lock (_lines)
                return [.. _lines];
        }
    }

    private sealed class BenchmarkFailure(string message) : Exception(message);
}
