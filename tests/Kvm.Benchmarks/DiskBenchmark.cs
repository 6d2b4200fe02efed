using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// Disk I/O benchmark: `vmctl disk bench` against `qemu-img bench` with the same options on images
/// made the same way (by qemu-img create), in the same run, alternating the two tools. Each row's
/// figure is the median over the runs of requests per second, taken from the elapsed time each
/// tool prints for its run (so process start-up is not counted for either tool).
/// </summary>
internal static partial class DiskBenchmark
{
    private const string Usage =
        "Usage: Kvm.Benchmarks disk [--runs N] [--depths 1,8] [--dir FOLDER] [--keep]\n" +
        "  --runs N      timed runs of each tool per row, after one untimed run each (default 5)\n" +
        "  --depths L    queue depths to measure, comma-separated (default 1,8)\n" +
        "  --dir FOLDER  where the images go (default: a new folder under the temp folder)\n" +
        "  --keep        leave the images there afterwards";

    private const ulong MiB = 1 << 20;

    // One row of the table: the bench options, and how to make the image each run uses.
    private sealed record Row(string Name, string[] BenchArgs, int Count, Func<string> Image, bool FreshEachRun);

    public static int Run(string[] args)
    {
        int runs = 5;
        int[] depths = [1, 8];
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
                case "--depths" when i + 1 < args.Length && args[i + 1].Split(',').All(d => int.TryParse(d, out int n) && n > 0):
                    depths = args[++i].Split(',').Select(int.Parse).ToArray();
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

        string vmctl = TestEnvironment.Vmctl;
        if (!Prerequisites.Check([Prerequisites.Vmctl], [Prerequisites.QemuImg]))
            return 1;
        string qemuImg = TestEnvironment.FindOnPath("qemu-img")!;

        var total = Stopwatch.StartNew();
        string loadBefore = LoadAverage();
        string work = dir is null ? Directory.CreateTempSubdirectory("kvm-diskbench-").FullName : Path.GetFullPath(dir);
        Directory.CreateDirectory(work);
        try
        {
            return Measure(vmctl, qemuImg, work, runs, depths, total, loadBefore);
        }
        finally
        {
            if (!keep)
            {
                foreach (var f in Directory.EnumerateFiles(work, "*.qcow2"))
                    File.Delete(f);
                if (dir is null)
                    Directory.Delete(work);
            }
        }
    }

    private static int Measure(string vmctl, string qemuImg, string work, int runs, int[] depths, Stopwatch total, string loadBefore)
    {
        string P(string name) => Path.Combine(work, name);
        void QemuImg(params string[] a) => Check(qemuImg, a);

        // The images that hold data, written once by qemu-img bench and shared by every row that
        // only reads them or uses them as a backing file:
        //  scatter: 4 GiB, one 64 KiB cluster of data at the start of every MiB (4096 clusters);
        //  seq:     256 MiB, all of it data.
        const int scatterClusters = 4096;
        string scatter = P("scatter-base.qcow2"), seq = P("seq-base.qcow2");
        QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", scatter, $"{scatterClusters * MiB}");
        QemuImg("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "16", "-c", $"{scatterClusters}", "-s", "64K", "-S", "1M", "--pattern", "0x5a", scatter);
        QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", seq, "256M");
        QemuImg("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "16", "-c", "4096", "-s", "64K", "--pattern", "0x5a", seq);
        string scatterOverlay = Overlay(P("scatter-overlay.qcow2"), scatter);
        string seqOverlay = Overlay(P("seq-overlay.qcow2"), seq);
        Check("sync", []); // nothing of the set-up left for the kernel to write back during the runs

        string Overlay(string path, string backing)
        {
            File.Delete(path);
            QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", backing, "-F", "qcow2", path);
            return path;
        }
        string Fresh(ulong size)
        {
            string path = P("fresh.qcow2");
            File.Delete(path);
            QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, $"{size}");
            return path;
        }
        string FreshWithBitmap(ulong size)
        {
            string path = Fresh(size);
            QemuImg("bitmap", "--add", "-g", "65536", path, "backup"); // an enabled bitmap both tools keep up to date
            return path;
        }

        // Scattered rows step 1 MiB between 4 KiB requests (qemu-img bench has no random mode), so
        // every write lands in a cluster of its own. Write rows stay inside the image (no wrap); read
        // rows wrap around it (the offsets stay cluster-aligned) to run long enough to time.
        const int scatterWrites = 4000, scatterReads = 50000, seqReads = 10000, seqWrites = 4000;
        string[] Scattered(int n, bool w) => [.. (w ? new[] { "-w", "--pattern", "0xa5" } : []), "-c", $"{n}", "-s", "4K", "-S", "1M"];
        string[] Sequential(int n, bool w) => [.. (w ? new[] { "-w", "--pattern", "0xa5" } : []), "-c", $"{n}", "-s", "64K"];
        var rows = new List<Row>
        {
            new("4K scattered write, unallocated", Scattered(scatterWrites, true), scatterWrites, () => Fresh(4096 * MiB), true),
            new("4K scattered read, allocated", Scattered(scatterReads, false), scatterReads, () => scatter, false),
            new("64K sequential read", Sequential(seqReads, false), seqReads, () => seq, false),
            new("64K sequential write, unallocated", Sequential(seqWrites, true), seqWrites, () => Fresh(256 * MiB), true),
            new("4K scattered write, backing (COW)", Scattered(scatterWrites, true), scatterWrites, () => Overlay(P("fresh.qcow2"), scatter), true),
            new("4K scattered read via backing", Scattered(scatterReads, false), scatterReads, () => scatterOverlay, false),
            new("64K sequential read via backing", Sequential(seqReads, false), seqReads, () => seqOverlay, false),
            new("64K sequential write, backing", Sequential(seqWrites, true), seqWrites, () => Overlay(P("fresh.qcow2"), seq), true),
            new("4K scattered write, enabled bitmap", Scattered(scatterWrites, true), scatterWrites, () => FreshWithBitmap(4096 * MiB), true),
        };

        var results = new List<(string Name, double Ours, double Theirs)>();
        foreach (int depth in depths)
        {
            foreach (var row in rows)
            {
                string[] opts = [.. row.BenchArgs, "-d", $"{depth}"];
                string[] ours = ["disk", "bench", .. opts];
                string[] theirs = ["bench", "-f", "qcow2", "-t", "writeback", .. opts];
                var a = new List<double>();
                var b = new List<double>();
                bool checkedOnce = false;
                // Run 0 of each tool is untimed (warm-up); then the tools take turns going first.
                for (int r = 0; r <= runs; r++)
                {
                    for (int k = 0; k < 2; k++)
                    {
                        bool vmctlTurn = (k == 0) == (r % 2 == 0);
                        string image = row.Image();
                        double seconds = vmctlTurn ? Bench(vmctl, [.. ours, image]) : Bench(qemuImg, [.. theirs, image]);
                        if (vmctlTurn && row.FreshEachRun && !checkedOnce)
                        {
                            Check(qemuImg, ["check", "-q", image]); // vmctl's writes leave a clean image
                            checkedOnce = true;
                        }
                        if (r > 0)
                            (vmctlTurn ? a : b).Add(row.Count / seconds);
                    }
                }
                results.Add(($"{row.Name}, depth {depth}", Median(a), Median(b)));
            }
        }
        total.Stop();

        Console.WriteLine($"vmctl disk bench vs qemu-img bench ({DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {Place.ForDisk}, " +
                          $"{CpuModel()}, {QemuVersion(qemuImg)}; needs no KVM)");
        Console.WriteLine($"images: qcow2, 64 KiB clusters, made by qemu-img create, on {FileSystem(work)} ({work}); qemu-img -t writeback");
        Console.WriteLine("(both tools go through the host page cache); no flushes during runs; median of " +
                          $"{runs} alternating runs each after one warm-up; 'scattered' = stepped 1 MiB apart");
        Console.WriteLine($"{"row",-48}{"vmctl ops/s",13}{"qemu-img ops/s",16}{"ratio",8}");
        foreach (var (name, ours, theirs) in results)
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{name,-48}{ours,13:0}{theirs,16:0}{ours / theirs,8:0.00}"));
        Console.WriteLine($"ratio = vmctl/qemu-img; above 1 means vmctl is faster.  ({total.Elapsed.TotalSeconds:0} s in all; " +
                          $"load average {loadBefore} before, {LoadAverage()} after)");
        return 0;
    }

    // Runs one bench and returns the elapsed seconds the tool reports for its requests.
    private static double Bench(string file, string[] args)
    {
        var r = TestEnvironment.RunProcess(file, args, TimeSpan.FromSeconds(60));
        var m = Elapsed().Match(r.Stdout);
        if (r.ExitCode != 0 || !m.Success)
            throw new InvalidOperationException($"{file} {string.Join(' ', args)} exited {r.ExitCode}: {r.Stdout.Trim()} {r.Stderr.Trim()}");
        double s = double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
        return Math.Max(s, 0.0005); // both print milliseconds; a run too short to time counts as half of one
    }

    private static void Check(string file, string[] args)
    {
        var r = TestEnvironment.RunProcess(file, args, TimeSpan.FromSeconds(120));
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"{file} {string.Join(' ', args)} exited {r.ExitCode}: {r.Stdout.Trim()} {r.Stderr.Trim()}");
    }

    [GeneratedRegex(@"Run completed in ([0-9.]+) seconds")]
    private static partial Regex Elapsed();

    /// <summary>The median of the runs (both benchmarks report it).</summary>
    internal static double Median(List<double> v)
    {
        var s = v.Order().ToArray();
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    private static string CpuModel() =>
        File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? "unknown CPU";

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));

    private static string QemuVersion(string qemuImg) =>
        TestEnvironment.RunProcess(qemuImg, ["--version"], TimeSpan.FromSeconds(10)).Stdout.Split('\n')[0].Replace("qemu-img version", "qemu-img").Trim();

    // The type of the file system holding a folder: the longest mount point that contains it.
    private static string FileSystem(string folder)
    {
        string best = "", type = "unknown file system";
        foreach (var line in File.ReadLines("/proc/self/mounts"))
        {
            var f = line.Split(' ');
            if (f.Length < 3)
                continue;
            string mount = f[1].Replace("\\040", " ");
            string prefix = mount.EndsWith('/') ? mount : mount + "/";
            if ((folder == mount || folder.StartsWith(prefix, StringComparison.Ordinal)) && mount.Length >= best.Length)
                (best, type) = (mount, f[2]);
        }
        return type;
    }
}
