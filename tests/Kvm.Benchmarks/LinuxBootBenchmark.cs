using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// Linux boot benchmark: the time from process start to a console line, by default the first line of
/// the initramfs's init (`kvm-guest: init running on ...`, native/linux/init), for Debian's kernel
/// with the busybox initramfs of `make linux`, with the same vCPUs, memory and command line, in two
/// pairs: the PVH vmlinux under `vmctl run` and under QEMU's microvm, and the bzImage under
/// `vmctl run` and under QEMU's q35 (SeaBIOS first). The runs alternate between the VMMs so that all
/// see the same machine load. Each run stops the clock when the line appears on the guest's console
/// (the VMM's stdout), then kills the VMM.
/// </summary>
internal static partial class LinuxBootBenchmark
{
    private const string Usage =
        "Usage: Kvm.Benchmarks linux [--runs N] [--limit S] [--kernels pvh,bzimage] [--marker TEXT]\n" +
        "  --runs N         timed runs of each VMM, alternating (default 3)\n" +
        "  --limit S        seconds a run may take to reach the line before it fails (default 300)\n" +
        "  --kernels L      pvh: vmlinux, vmctl vs QEMU microvm; bzimage: bzImage, vmctl vs QEMU q35 (default both)\n" +
        "  --marker TEXT    the console line that stops the clock (default '" + DefaultMarker + "';\n" +
        "                   'smpboot: Allowing 2 CPUs' is an early kernel milestone)";

    private const string DefaultMarker = "kvm-guest: init running on";
    private const string CommandLine = "console=ttyS0 earlyprintk=ttyS0";
    private const int ConsoleTail = 15;

    /// <summary>One VMM to time: a name for messages and the table, the program, its arguments.</summary>
    private sealed record Side(string Name, string File, string[] Args);

    /// <summary>Two VMMs booting the same kernel: ours first.</summary>
    private sealed record Pair(string Kernel, Side Ours, Side Theirs);

    /// <summary>One timed run: seconds from process start to the line, and the kernel's last timestamp before it.</summary>
    private sealed record Result(double Seconds, double? GuestSeconds);

    public static int Run(string[] args)
    {
        int runs = 3, limit = 300;
        string marker = DefaultMarker;
        string[] kernels = ["pvh", "bzimage"];
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
                case "--kernels" when i + 1 < args.Length && args[i + 1].Split(',').All(k => k is "pvh" or "bzimage"):
                    kernels = args[++i].Split(',');
                    break;
                case "--marker" when i + 1 < args.Length && args[i + 1].Length > 0:
                    marker = args[++i];
                    break;
                case "--help" or "-h":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    return Prerequisites.UnknownArgument(args[i], Usage);
            }
        }

        string linux = Path.Combine(TestEnvironment.BuildDir, "linux");
        string vmlinux = Path.Combine(linux, "vmlinux"), bzImage = Path.Combine(linux, "bzImage");
        string initrd = Path.Combine(linux, "initramfs.cpio.gz");
        if (!Prerequisites.Check([(vmlinux, "Debian's vmlinux"), (bzImage, "Debian's bzImage"), (initrd, "the test initramfs")], [],
                buildHint: "make linux")
            || !Prerequisites.Check([Prerequisites.Vmctl], [Prerequisites.Qemu])
            || !Place.CheckKvm())
            return 1;
        string vmctl = TestEnvironment.Vmctl;
        string qemu = TestEnvironment.FindOnPath("qemu-system-x86_64")!;

        string[] qemuCommon =
        [
            "-accel", "kvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-smp", "2", "-m", "512M", "-initrd", initrd, "-append", CommandLine,
        ];
        var pairs = new List<Pair>();
        if (kernels.Contains("pvh"))
        {
            // microvm's defaults (acpi=on in QEMU 7.2, qboot as firmware) give the kernel the MADT it
            // counts CPUs from, so no further machine options are needed.
            pairs.Add(new Pair("vmlinux via PVH",
                new Side("vmctl run (vmlinux)", vmctl,
                    ["run", "--kernel", vmlinux, "--initrd", initrd, "--cpus", "2", "--memory", "512M", "--cmdline", CommandLine]),
                new Side("qemu -M microvm", qemu, ["-M", "microvm", "-kernel", vmlinux, .. qemuCommon])));
        }
        if (kernels.Contains("bzimage"))
        {
            pairs.Add(new Pair("bzImage",
                new Side("vmctl run (bzImage)", vmctl,
                    ["run", "--kernel", bzImage, "--initrd", initrd, "--cpus", "2", "--memory", "512M", "--cmdline", CommandLine]),
                new Side("qemu -M q35", qemu, ["-M", "q35", "-kernel", bzImage, .. qemuCommon])));
        }

        // A full boot is too slow to spend one per VMM on warming up. What a cold first run would
        // pay for is the page cache: read the kernels and the initramfs once, and start each program
        // once for something quick (vmctl's executable, QEMU's binary and libraries).
        foreach (var file in new[] { vmlinux, bzImage, initrd })
        {
            using var f = File.OpenRead(file);
            f.CopyTo(Stream.Null);
        }
        TestEnvironment.RunProcess(vmctl, ["run", "--help"], TimeSpan.FromSeconds(60));
        TestEnvironment.RunProcess(qemu, ["--version"], TimeSpan.FromSeconds(60));

        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var results = pairs.Select(_ => (Ours: new List<Result>(), Theirs: new List<Result>())).ToList();
        var failures = new List<string>();
        for (int i = 0; i < runs; i++)
        {
            for (int k = 0; k < pairs.Count; k++)
            {
                var (pair, (a, b)) = (pairs[k], results[k]);
                foreach (var (side, list) in new[] { (pair.Ours, a), (pair.Theirs, b) })
                {
                    // A VMM that failed once is not run again; the others go on.
                    if (failures.Any(f => f.StartsWith(side.Name + ":", StringComparison.Ordinal)))
                        continue;
                    try
                    {
                        list.Add(Time(side, marker, limit));
                        Console.Error.WriteLine($"run {i + 1}/{runs}: {side.Name} {list[^1].Seconds:0.00} s");
                    }
                    catch (BenchmarkFailure e)
                    {
                        failures.Add($"{side.Name}: {e.Message}");
                        Console.Error.WriteLine($"benchmark: linux: {side.Name}: {e.Message}");
                    }
                }
            }
        }

        Console.WriteLine($"Linux boot to '{marker}' (Debian's cloud kernel, from 'make linux'," +
                          $" with its busybox initramfs, 2 vCPUs, 512 MiB), {runs} runs each, alternating " +
                          $"({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm})");
        Console.WriteLine($"{"",-24}{"median s",12}{"mean s",12}{"min s",12}{"kernel s",12}");
        for (int k = 0; k < pairs.Count; k++)
        {
            var (pair, (a, b)) = (pairs[k], results[k]);
            Row(pair.Ours.Name, a);
            Row(pair.Theirs.Name, b);
            if (a.Count > 0 && b.Count > 0)
            {
                double ma = DiskBenchmark.Median(a.Select(r => r.Seconds).ToList()), mb = DiskBenchmark.Median(b.Select(r => r.Seconds).ToList());
                Console.WriteLine($"  ratio {pair.Kernel}, vmctl/{pair.Theirs.Name} (median): {ma / mb:0.00}   (below 1 means vmctl is faster)");
            }
            else
            {
                Console.WriteLine($"  ratio {pair.Kernel}: none (a side failed)");
            }
        }
        Console.WriteLine($"'kernel s': median of the kernel's last console timestamp before the line; " +
                          $"load average {loadBefore} before, {LoadAverage()} after");
        return failures.Count == 0 ? 0 : 1;
    }

    /// <summary>
    /// Starts the VMM, reads its console until the line appears and returns the time since the start;
    /// then kills it (with its children) and waits for it. Throws <see cref="BenchmarkFailure"/> when the
    /// VMM ends first or the limit passes, naming the VMM and showing its last console lines.
    /// </summary>
    private static Result Time(Side side, string marker, int limitSeconds)
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
        var reader = Task.Run(() => WaitForMarker(p.StandardOutput, console, sw, marker));
        bool done = reader.Wait(TimeSpan.FromSeconds(limitSeconds));
        (double Seconds, string? Line, double? Kernel)? found = done ? reader.Result : null;

        Prerequisites.EndAndDrain(p, reader);

        if (found is { } hit && hit.Line is not null)
            return new Result(hit.Seconds, hit.Kernel);

        string why = done
            ? $"{side.Name} exited with status {p.ExitCode} after {sw.Elapsed.TotalSeconds:0.0} s without printing '{marker}'"
            : $"{side.Name} did not print '{marker}' within {limitSeconds} s";
        var text = new StringBuilder(why);
        text.Append($"\n  command: {side.File} {string.Join(' ', side.Args.Select(Quote))}");
        text.Append($"\n  last console lines:{Lines(console)}");
        text.Append($"\n  last stderr lines:{Lines(errors)}");
        throw new BenchmarkFailure(text.ToString());
    }

    /// <summary>
    /// Reads the console in chunks until the marker appears (returns the time, its line, and the
    /// kernel's timestamp on the last line that had one) or the pipe ends.
    /// </summary>
    private static (double Seconds, string? Line, double? Kernel) WaitForMarker(StreamReader output, Tail console, Stopwatch sw, string marker)
    {
        var buffer = new char[4096];
        var line = new StringBuilder();
        double? kernel = null;
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
                if (complete.Contains(marker, StringComparison.Ordinal))
                    return (sw.Elapsed.TotalSeconds, complete, GuestTime(complete) ?? kernel);
                kernel = GuestTime(complete) ?? kernel;
            }
            // The console comes a byte per port write, so the marker can arrive before its line ends.
            string partial = line.ToString();
            if (partial.Contains(marker, StringComparison.Ordinal))
            {
                console.Add(partial);
                return (sw.Elapsed.TotalSeconds, partial, GuestTime(partial) ?? kernel);
            }
        }
        if (line.Length > 0)
            console.Add(line.ToString());
        return (sw.Elapsed.TotalSeconds, null, kernel);
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
        return t.Count == 0 ? "none" : $"{DiskBenchmark.Median(t):0.00}";
    }

    private static void Row(string name, List<Result> v)
    {
        if (v.Count == 0)
        {
            Console.WriteLine($"{name,-24}{"failed",12}");
            return;
        }
        var s = v.Select(r => r.Seconds).ToList();
        Console.WriteLine($"{name,-24}{DiskBenchmark.Median(s),12:0.00}{s.Average(),12:0.00}{s.Min(),12:0.00}{GuestMedian(v),12}");
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
}
