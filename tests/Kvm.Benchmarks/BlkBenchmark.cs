using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// virtio-blk benchmark: the guest kit's `blk-bench` under `vmctl run --disk` and under QEMU
/// (q35, virtio-blk-pci, modern only), same guest, same memory and vCPUs, images of the same kind
/// made the same way, in the same run, alternating the two VMMs. The guest measures itself with
/// its calibrated TSC, so boot time (SeaBIOS takes seconds under PVM) does not count for either.
/// Each row prints the median of the runs and the ratio.
/// </summary>
internal static partial class BlkBenchmark
{
    private const string Usage =
        "Usage: Kvm.Benchmarks blk [--runs N] [--time SECONDS] [--formats raw,qcow2] [--rows TEXT] [--dir FOLDER] [--keep]\n" +
        "  --runs N        timed runs of each VMM per row (default 3)\n" +
        "  --time SECONDS  how long the guest runs each measurement (default 3)\n" +
        "  --formats L     image formats to measure (default raw,qcow2)\n" +
        "  --rows TEXT     only the rows whose name holds TEXT (like 'QD32' or 'write')\n" +
        "  --dir FOLDER    where the images go (default: a new folder under the temp folder)\n" +
        "  --keep          leave the images there afterwards";

    private const string DiskSize = "256M";

    private sealed record Row(string Name, string Rw, string Bs, int Qd, bool Throughput);

    private static readonly Row[] Rows =
    [
        new("4K random read, QD1", "randread", "4K", 1, false),
        new("4K random read, QD32", "randread", "4K", 32, false),
        new("4K random write, QD1", "randwrite", "4K", 1, false),
        new("4K random write, QD32", "randwrite", "4K", 32, false),
        new("64K sequential read, QD8", "read", "64K", 8, true),
        new("64K sequential write, QD8", "write", "64K", 8, true),
    ];

    public static int Run(string[] args)
    {
        int runs = 3, seconds = 3;
        string[] formats = ["raw", "qcow2"];
        string? dir = null, only = null;
        bool keep = false;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--runs" when i + 1 < args.Length && int.TryParse(args[i + 1], out int n) && n > 0:
                    runs = n;
                    i++;
                    break;
                case "--time" when i + 1 < args.Length && int.TryParse(args[i + 1], out int t) && t > 0:
                    seconds = t;
                    i++;
                    break;
                case "--formats" when i + 1 < args.Length && args[i + 1].Split(',').All(f => f is "raw" or "qcow2"):
                    formats = args[++i].Split(',');
                    break;
                case "--rows" when i + 1 < args.Length:
                    only = args[++i];
                    break;
                case "--dir" when i + 1 < args.Length:
                    dir = args[++i];
                    break;
                case "--keep":
                    keep = true;
                    break;
                case "--help" or "-h":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    return Prerequisites.UnknownArgument(args[i], Usage);
            }
        }

        if (!Prerequisites.Check([Prerequisites.GuestKit, Prerequisites.Vmctl], [Prerequisites.Qemu, Prerequisites.QemuImg, Prerequisites.QemuIo])
            || !Place.CheckKvm())
            return 1;

        string work = dir is null ? Directory.CreateTempSubdirectory("kvm-blkbench-").FullName : Path.GetFullPath(dir);
        Directory.CreateDirectory(work);
        try
        {
            return Measure(work, runs, seconds, formats, only);
        }
        catch (RunFailure e)
        {
            // qemu-img or qemu-io, making the images: nothing to measure without them.
            Console.Error.WriteLine($"benchmark: blk: {e.Message}");
            return 1;
        }
        finally
        {
            if (!keep && dir is null)
                Directory.Delete(work, recursive: true);
        }
    }

    private static int Measure(string work, int runs, int seconds, string[] formats, string? only)
    {
        var total = Stopwatch.StartNew();
        var failures = new List<string>();
        string loadBefore = LoadAverage();
        // A run boots the guest (SeaBIOS first under QEMU), measures for `seconds`, and ends; in the
        // nested KVM host the boot alone takes tens of seconds. A run past this limit is stopped.
        int limit = seconds + 300;
        Console.WriteLine($"blk-bench under vmctl run vs QEMU q35 virtio-blk-pci ({DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, " +
                          $"{Place.ForVm}, {Qemu("--version").Split('\n')[0].Trim()})");
        Console.WriteLine($"guest: guest kit, 1 vCPU, 256 MiB, polling driver, 1 queue; {DiskSize} images filled with data first, " +
                          $"on {work}; page cache on both sides (QEMU cache=writeback); {seconds} s per measurement, median of {runs} alternating runs");
        Console.WriteLine($"{"row",-36}{"vmctl",12}{"qemu",12}{"ratio",8}");
        foreach (var format in formats)
        {
            // One filled image per VMM, so writes overwrite allocated data on both sides.
            string ours = Path.Combine(work, $"ours.{format}"), theirs = Path.Combine(work, $"qemu.{format}");
            foreach (var image in new[] { ours, theirs })
            {
                Tool("qemu-img", "create", "-q", "-f", format, image, DiskSize);
                Tool("qemu-io", "-f", format, "-c", $"write -P 0x5a 0 {DiskSize}", image);
            }
            foreach (var row in Rows.Where(r => only is null || r.Name.Contains(only, StringComparison.OrdinalIgnoreCase)))
            {
                string cmd = $"blk-bench rw={row.Rw} bs={row.Bs} qd={row.Qd} time={seconds}";
                string name = $"{format} {row.Name} ({(row.Throughput ? "MB/s" : "IOPS")})";
                var a = new List<double>();
                var b = new List<double>();
                string? failedOurs = null, failedQemu = null;
                // A side that fails once is not run again for this row; the other side still is.
                for (int r = 0; r < runs; r++)
                {
                    if (failedOurs is null)
                        failedOurs = Attempt(() => a.Add(Figure(RunOurs(cmd, ours, limit), row)));
                    if (failedQemu is null)
                        failedQemu = Attempt(() => b.Add(Figure(RunQemu(cmd, theirs, format, limit), row)));
                }
                foreach (var (side, why) in new[] { ("vmctl", failedOurs), ("qemu", failedQemu) })
                {
                    if (why is not null)
                        failures.Add($"{name}, {side}: {why}");
                }
                string ma = failedOurs is null ? $"{DiskBenchmark.Median(a):0}" : "failed";
                string mb = failedQemu is null ? $"{DiskBenchmark.Median(b):0}" : "failed";
                string ratio = failedOurs is null && failedQemu is null ? $"{DiskBenchmark.Median(a) / DiskBenchmark.Median(b):0.00}" : "-";
                Console.WriteLine($"{name,-36}{ma,12}{mb,12}{ratio,8}");
            }
        }
        Console.WriteLine($"ratio = vmctl/qemu; above 1 means vmctl is faster.  ({total.Elapsed.TotalSeconds:0} s in all; " +
                          $"load average {loadBefore} before, {LoadAverage()} after)");
        foreach (var f in failures)
            Console.Error.WriteLine($"benchmark: blk: {f}");
        return failures.Count == 0 ? 0 : 1;
    }

    /// <summary>Runs one measurement; null when it worked, else why it failed.</summary>
    private static string? Attempt(Action measure)
    {
        try
        {
            measure();
            return null;
        }
        catch (RunFailure e)
        {
            return e.Message;
        }
    }

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));

    private static string RunOurs(string cmd, string image, int limit) =>
        Guest(TestEnvironment.Vmctl, ["run", "--kernel", TestEnvironment.GuestKit, "--cmdline", cmd, "--debug-exit",
            "--memory", "256M", "--disk", image], expectedStatus: 0, limit);

    // cache=writeback goes through the host's page cache, like vmctl, and works on any file system;
    // cache=none would need O_DIRECT, which tmpfs, overlayfs and virtiofs refuse.
    private static string RunQemu(string cmd, string image, string format, int limit) =>
        Guest("qemu-system-x86_64",
        [
            "-accel", "kvm", "-M", "q35", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", TestEnvironment.GuestKit, "-append", cmd,
            "-drive", $"file={image},if=none,id=d0,format={format},cache=writeback",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,addr=0x3",
        ], expectedStatus: 1, limit);

    /// <summary>The figure a row compares: IOPS, or MB/s (10^6 bytes) for throughput rows.</summary>
    private static double Figure(string output, Row row)
    {
        var m = BenchLine().Match(output);
        if (!m.Success)
            throw new RunFailure($"no blk-bench result in the guest's output; its last lines:{Last(output)}");
        double iops = double.Parse(m.Groups["iops"].Value, CultureInfo.InvariantCulture);
        double kibps = double.Parse(m.Groups["kibps"].Value, CultureInfo.InvariantCulture);
        return row.Throughput ? kibps * 1024 / 1e6 : iops;
    }

    [GeneratedRegex(@"guestkit: blk-bench .*iops=(?<iops>\d+) kibps=(?<kibps>\d+)")]
    private static partial Regex BenchLine();

    /// <summary>
    /// Runs a program to its end (stopping it after <paramref name="limitSeconds"/>) and returns its
    /// output; any other exit status than <paramref name="expectedStatus"/> throws <see cref="RunFailure"/>
    /// with the command, the status and the last lines it printed.
    /// </summary>
    private static string Guest(string file, string[] args, int expectedStatus = 0, int limitSeconds = 600)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var x in args)
            psi.ArgumentList.Add(x);
        string command = $"{file} {string.Join(' ', args.Select(a => a.Contains(' ') ? $"\"{a}\"" : a))}";
        var sw = Stopwatch.StartNew();
        using var p = Process.Start(psi) ?? throw new RunFailure($"cannot start {command}");
        p.StandardInput.Close();
        var err = p.StandardError.ReadToEndAsync();
        var output = p.StandardOutput.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(limitSeconds)))
        {
            try
            {
                p.Kill(entireProcessTree: true);
            }
            catch (InvalidOperationException)
            {
                // It ended just now.
            }
            p.WaitForExit();
            throw new RunFailure($"did not end within {limitSeconds} s and was stopped\n  command: {command}" +
                                 $"\n  last output lines:{Last(output.Result)}\n  last stderr lines:{Last(err.Result)}");
        }
        p.WaitForExit();
        if (p.ExitCode != expectedStatus)
        {
            // QEMU's isa-debug-exit makes its status the guest's status * 2 + 1.
            string guest = file.EndsWith("qemu-system-x86_64", StringComparison.Ordinal) && p.ExitCode % 2 == 1
                ? $" (the guest's exit status {(p.ExitCode - 1) / 2} through isa-debug-exit)"
                : "";
            throw new RunFailure($"exited with status {p.ExitCode}{guest} after {sw.Elapsed.TotalSeconds:0.0} s, " +
                                 $"expected {expectedStatus}\n  command: {command}" +
                                 $"\n  last output lines:{Last(output.Result)}\n  last stderr lines:{Last(err.Result)}");
        }
        return output.Result;
    }

    private static string Last(string text, int lines = 10)
    {
        var l = text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(x => x.TrimEnd('\r')).TakeLast(lines).ToArray();
        return l.Length == 0 ? " (none)" : string.Concat(l.Select(x => "\n    " + x));
    }

    private static void Tool(string file, params string[] args) => Guest(file, args);

    private static string Qemu(string arg) => Guest("qemu-system-x86_64", [arg]);

    /// <summary>One run of a VMM or tool that did not end as expected.</summary>
    private sealed class RunFailure(string message) : Exception(message);
}
