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
        "Usage: Kvm.Benchmarks blk [--runs N] [--time SECONDS] [--formats raw,qcow2] [--dir FOLDER] [--keep]\n" +
        "  --runs N        timed runs of each VMM per row (default 3)\n" +
        "  --time SECONDS  how long the guest runs each measurement (default 3)\n" +
        "  --formats L     image formats to measure (default raw,qcow2)\n" +
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
        string? dir = null;
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

        if (!Prerequisites.Check([Prerequisites.GuestKit, Prerequisites.Vmctl], [Prerequisites.Qemu, Prerequisites.QemuImg, Prerequisites.QemuIo]))
            return 1;

        string work = dir is null ? Directory.CreateTempSubdirectory("kvm-blkbench-").FullName : Path.GetFullPath(dir);
        Directory.CreateDirectory(work);
        try
        {
            return Measure(work, runs, seconds, formats);
        }
        finally
        {
            if (!keep && dir is null)
                Directory.Delete(work, recursive: true);
        }
    }

    private static int Measure(string work, int runs, int seconds, string[] formats)
    {
        var total = Stopwatch.StartNew();
        Console.WriteLine($"blk-bench under vmctl run vs QEMU q35 virtio-blk-pci ({DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, " +
                          $"{Environment.MachineName}, {Environment.ProcessorCount} CPUs, {Qemu("--version").Split('\n')[0].Trim()})");
        Console.WriteLine($"guest: guest kit, 1 vCPU, 256 MiB, polling driver, 1 queue; {DiskSize} images filled with data first, " +
                          $"page cache on both sides (QEMU cache=writeback); {seconds} s per measurement, median of {runs} alternating runs");
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
            foreach (var row in Rows)
            {
                string cmd = $"blk-bench rw={row.Rw} bs={row.Bs} qd={row.Qd} time={seconds}";
                var a = new List<double>();
                var b = new List<double>();
                for (int r = 0; r < runs; r++)
                {
                    a.Add(Figure(RunOurs(cmd, ours), row));
                    b.Add(Figure(RunQemu(cmd, theirs, format), row));
                }
                double ma = DiskBenchmark.Median(a), mb = DiskBenchmark.Median(b);
                string unit = row.Throughput ? "MB/s" : "IOPS";
                Console.WriteLine($"{$"{format} {row.Name} ({unit})",-36}{ma,12:0}{mb,12:0}{ma / mb,8:0.00}");
            }
        }
        Console.WriteLine($"ratio = vmctl/qemu; above 1 means vmctl is faster.  ({total.Elapsed.TotalSeconds:0} s in all)");
        return 0;
    }

    private static string RunOurs(string cmd, string image) =>
        Guest(TestEnvironment.Vmctl, ["run", "--kernel", TestEnvironment.GuestKit, "--cmdline", cmd, "--debug-exit",
            "--memory", "256M", "--disk", image], expectedStatus: 0);

    private static string RunQemu(string cmd, string image, string format) =>
        Guest("qemu-system-x86_64",
        [
            "-accel", "kvm", "-M", "q35", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", TestEnvironment.GuestKit, "-append", cmd,
            "-drive", $"file={image},if=none,id=d0,format={format},cache=writeback",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,addr=0x3",
        ], expectedStatus: 1);

    /// <summary>The figure a row compares: IOPS, or MB/s (10^6 bytes) for throughput rows.</summary>
    private static double Figure(string output, Row row)
    {
        var m = BenchLine().Match(output);
        if (!m.Success)
            throw new InvalidOperationException($"no blk-bench result in the guest's output:\n{output}");
        double iops = double.Parse(m.Groups["iops"].Value, CultureInfo.InvariantCulture);
        double kibps = double.Parse(m.Groups["kibps"].Value, CultureInfo.InvariantCulture);
        return row.Throughput ? kibps * 1024 / 1e6 : iops;
    }

    [GeneratedRegex(@"guestkit: blk-bench .*iops=(?<iops>\d+) kibps=(?<kibps>\d+)")]
    private static partial Regex BenchLine();

    /// <summary>Runs a program to its end and returns its output; any other exit status than <paramref name="expectedStatus"/> throws.</summary>
    private static string Guest(string file, string[] args, int expectedStatus = 0)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var x in args)
            psi.ArgumentList.Add(x);
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEndAsync();
        string output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != expectedStatus)
            throw new InvalidOperationException($"{file} {string.Join(' ', args)} exited {p.ExitCode}:\n{output}{err.Result}");
        return output;
    }

    private static void Tool(string file, params string[] args) => Guest(file, args);

    private static string Qemu(string arg) => Guest("qemu-system-x86_64", [arg]);
}
