using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>
/// Save and restore (issue 11's benchmark): for each guest size, this VMM (kvm-vmm, its control
/// socket's <c>save</c>, then <c>kvm-vmm --restore DIR --memory eager|lazy</c>) against QEMU
/// (QMP <c>migrate "exec:cat > FILE"</c>, then <c>-incoming</c> from that file and <c>cont</c>),
/// both running the guest kit's <c>restore-touch</c> workload, in the same run and place, the runs
/// alternating. It prints medians and ratios and asserts nothing.
/// <list type="bullet">
/// <item>save: the guest has filled its RAM with a pattern and is paused (ours: <c>pause</c>;
/// QEMU: <c>stop</c>); timed is the save alone, until the files are written and synced.</item>
/// <item>restore to first instruction: from process start until the guest's first serial byte after
/// the restore. The guest polls COM1 for a byte; each restored VMM is sent one (ours on stdin at
/// once, it reaches the UART after the restore; QEMU's once its incoming migration completed, before
/// <c>cont</c>) and the guest prints its line the moment it sees it.</item>
/// <item>working set: right after that line the guest reads one word of each page of the last
/// 64 MiB of its filled RAM (checking the pattern) and reports how long that took by its TSC; the
/// VMM process's page faults over that time come from /proc/PID/stat.</item>
/// <item>working set first: a snapshot saved with a working-set window while the guest reads its
/// working set (restore-touch busy=1), restored lazily with the recorded pages loaded before the
/// vCPUs start, against plain lazy, eager and QEMU.</item>
/// </list>
/// The 'pause' part (SnapshotBenchmark.Pause.cs) measures upgrade in place and suspend/resume.
/// </summary>
internal static partial class SnapshotBenchmark
{
    private static string Usage =>
        "Usage: Kvm.Benchmarks snapshot [--parts restore,pause] [--runs N] [--sizes 256M,1G] [--touch SIZE] [--modes M,...] [--working-set S]\n" +
        "                                [--limit S] [--dir FOLDER] [--keep] [--qemu-memfd]\n" +
        "  --parts L       what to measure (default both): 'restore', save and restore against QEMU's migration to and from a file;\n" +
        "                  'pause', the guest's pause for an upgrade in place and a suspend/resume against QEMU's local live migration\n" +
        "  --runs N        saves and restores of each kind, or hand-overs of each kind, per size, alternating this VMM and QEMU (default 5)\n" +
        "  --sizes L       guest RAM sizes (default 256M,1G)\n" +
        "  --touch SIZE    the working set the guest reads after the restore (default 64M)\n" +
        "  --modes L       this VMM's restore modes to measure (default: all of " + string.Join(',', Modes.Select(m => m.Name)) + ")\n" +
        "  --working-set S the working-set window of the 'working set' mode's save, in seconds (default 120: in the nested host a traced first touch costs 2-4 ms, and a shorter window sees only part of a 64 MiB working set)\n" +
        "  --limit S       seconds any one step (a boot and fill, a save, a restore) may take (default 600)\n" +
        "  --dir FOLDER    where the snapshots go (default: a new folder under the temp folder)\n" +
        "  --keep          leave the snapshots there afterwards\n" +
        "  --qemu-memfd    back QEMU's guest RAM with a memfd, as kvm-vmm's is (default: QEMU's own, anonymous memory,\n" +
        "                  which it puts on transparent huge pages)";

    /// <summary>
    /// One way this VMM restores, with the snapshot it restores from: <paramref name="BusyGuest"/>
    /// makes the saved guest read its working set round and round while it waits (restore-touch
    /// busy=1), <paramref name="WorkingSet"/> saves it running, with a working-set window
    /// (control <c>save</c> with <c>workingSetSeconds</c>, <c>--working-set</c> seconds; a paused
    /// VM is refused one), instead of paused.
    /// </summary>
    private sealed record Mode(string Name, string What, string[] RestoreArgs, bool BusyGuest = false, bool WorkingSet = false);

    // The restore modes of this VMM, in the order of the tables. Each distinct (BusyGuest,
    // WorkingSet) gets its own saved VM.
    private static readonly Mode[] Modes =
    [
        new("eager", "kvm-vmm --restore DIR --memory eager: all RAM read in before the vCPUs start", ["--memory", "eager"]),
        new("lazy", "kvm-vmm --restore DIR --memory lazy: vCPUs start at once, pages come in on touch (userfaultfd) and in the background",
            ["--memory", "lazy"]),
        // Issue 11's working set first: the pages the guest touched during a window after the save
        // point (it reads its working set round and round meanwhile) are loaded before the vCPUs start.
        new("working set", "kvm-vmm --restore DIR --memory lazy from a snapshot saved with a working-set window: the recorded pages " +
            "loaded before the vCPUs start, the rest on touch and in the background", ["--memory", "lazy"], BusyGuest: true, WorkingSet: true),
    ];

    /// <summary>--working-set S: the working-set window of the "working set" mode's save, in seconds.</summary>
    private static double _workingSetSeconds = 120;

    private const string ReadyLine = "guestkit: restore-touch ready";
    private const string ResumedLine = "guestkit: restore-touch resumed";
    private const string TouchedLine = "guestkit: restore-touch touched";

    private static readonly string[] AllParts = ["restore", "pause"];

    /// <summary>RAM the guest does not fill: the 2 MiB under its region (the kit's image) and this much at the top.</summary>
    private const ulong UnfilledTop = 14UL << 20;

    public static int Run(string[] args)
    {
        int runs = 5, limit = 600;
        ulong[] sizes = [256UL << 20, 1UL << 30];
        ulong touch = 64UL << 20;
        var modes = Modes.ToList();
        string[] parts = AllParts;
        string? dir = null;
        bool keep = false;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--parts" when i + 1 < args.Length && args[i + 1].Split(',').All(AllParts.Contains):
                    parts = args[++i].Split(',');
                    break;
                case "--runs" when i + 1 < args.Length && int.TryParse(args[i + 1], out int n) && n > 0:
                    runs = n;
                    i++;
                    break;
                case "--limit" when i + 1 < args.Length && int.TryParse(args[i + 1], out int s) && s > 0:
                    limit = s;
                    i++;
                    break;
                case "--sizes" when i + 1 < args.Length && args[i + 1].Split(',').All(x => ParseSize(x) >= 64UL << 20):
                    sizes = args[++i].Split(',').Select(x => ParseSize(x)!.Value).ToArray();
                    break;
                case "--touch" when i + 1 < args.Length && ParseSize(args[i + 1]) is > 0:
                    touch = ParseSize(args[++i])!.Value;
                    break;
                case "--working-set" when i + 1 < args.Length && double.TryParse(args[i + 1], NumberStyles.Float, CultureInfo.InvariantCulture, out double w) && w > 0:
                    _workingSetSeconds = w;
                    i++;
                    break;
                case "--modes" when i + 1 < args.Length && args[i + 1].Split(',').All(m => Modes.Any(x => x.Name == m)):
                    var names = args[++i].Split(',');
                    modes = Modes.Where(m => names.Contains(m.Name)).ToList();
                    break;
                case "--dir" when i + 1 < args.Length:
                    dir = args[++i];
                    break;
                case "--keep":
                    keep = true;
                    break;
                case "--qemu-memfd":
                    _qemuMemfd = true;
                    break;
                case "--help" or "-h":
                    Console.WriteLine(Usage);
                    return 0;
                default:
                    return Prerequisites.UnknownArgument(args[i], Usage);
            }
        }
        if (sizes.Any(s => touch + UnfilledTop + (2UL << 20) > s))
        {
            Console.Error.WriteLine($"benchmark: snapshot: the working set ({touch >> 20} MiB) does not fit in the smallest guest");
            return 2;
        }

        if (!Prerequisites.Check([Prerequisites.GuestKit, Prerequisites.KvmVmm], [Prerequisites.Qemu]) || !Place.CheckKvm())
            return 1;

        string work = dir is null ? Directory.CreateTempSubdirectory("kvm-snapbench-").FullName : Path.GetFullPath(dir);
        Directory.CreateDirectory(work);
        try
        {
            string qemuVersion = TestEnvironment.RunProcess("qemu-system-x86_64", ["--version"], TimeSpan.FromSeconds(60)).Stdout.Split('\n')[0].Trim();
            int status = 0;
            if (parts.Contains("restore"))
                status |= Measure(work, runs, sizes, touch, modes, TimeSpan.FromSeconds(limit), qemuVersion);
            if (parts.Contains("pause"))
            {
                if (parts.Contains("restore"))
                    Console.WriteLine();
                status |= MeasurePauses(work, runs, sizes, TimeSpan.FromSeconds(limit), qemuVersion);
            }
            return status;
        }
        finally
        {
            if (!keep && dir is null)
                Directory.Delete(work, recursive: true);
        }
    }

    /// <summary>A size argument (bytes, or with K, M or G); null when it is not one. The checkpoint part parses its sizes with it too.</summary>
    internal static ulong? ParseSize(string text)
    {
        var m = SizeText().Match(text);
        if (!m.Success)
            return null;
        ulong n = ulong.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
        return m.Groups[2].Value.ToUpperInvariant() switch { "K" => n << 10, "M" => n << 20, "G" => n << 30, _ => n };
    }

    [GeneratedRegex(@"^(\d+)([KMGkmg]?)$")]
    private static partial Regex SizeText();

    private static string Mib(ulong bytes) => bytes >= 1UL << 30 && bytes % (1UL << 30) == 0 ? $"{bytes >> 30} GiB" : $"{bytes >> 20} MiB";

    /// <summary>The figures of one guest size.</summary>
    private sealed class SizeResults
    {
        public List<double> OurSave { get; } = [];
        public List<double> OurSaveReported { get; } = [];
        public List<double> QemuSave { get; } = [];
        public long OurFileBytes { get; set; }
        public long QemuFileBytes { get; set; }
        public Dictionary<string, List<Restore>> Restores { get; } = [];
        public List<WorkingSetSave> WorkingSetSaves { get; } = [];
        public List<string> Failures { get; } = [];
    }

    /// <summary>A save with a working-set window: seconds as the client saw it (the window included), the guest's pause, the pages recorded and their ranges.</summary>
    private sealed record WorkingSetSave(double Seconds, double PausedSeconds, long Pages, int Ranges);

    /// <summary>
    /// One restore: seconds from process start to the guest's first byte, to the end of its
    /// working-set line; the guest's own time for the working set; the VMM process's page faults
    /// from the first line to the working-set line.
    /// </summary>
    /// <paramref name="Loader"/>: for a lazy restore of ours, its loader's counters (control socket
    /// <c>stats</c>) once the working set was touched. <paramref name="HugeBytes"/>: the VMM's RAM
    /// mapped with huge pages then (AnonHugePages + ShmemPmdMapped in /proc/PID/smaps_rollup).
    private sealed record Restore(double First, double Touched, double GuestTouch, long MinorFaults, long MajorFaults, long HugeBytes,
        LoaderCounts? Loader);

    /// <summary>A lazy loader's counters: touches that waited, bytes loaded on touch, before the vCPUs started (a working set) and in the background, seconds to load all (null: not yet).</summary>
    private sealed record LoaderCounts(long Faults, long BytesOnTouch, long BytesFirst, long BytesInBackground, double? Seconds);

    private static int Measure(string work, int runs, ulong[] sizes, ulong touch, List<Mode> modes, TimeSpan limit, string qemuVersion)
    {
        var total = Stopwatch.StartNew();
        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var results = new Dictionary<ulong, SizeResults>();
        foreach (var size in sizes)
        {
            var r = results[size] = new SizeResults();
            try
            {
                MeasureSize(work, runs, size, touch, modes, limit, r);
            }
            catch (BenchmarkFailure e)
            {
                r.Failures.Add(e.Message);
                Console.Error.WriteLine($"benchmark: snapshot: {Mib(size)}: {e.Message}");
            }
        }

        Console.WriteLine($"save and restore, kvm-vmm against QEMU ({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm}, {qemuVersion})");
        Console.WriteLine($"guest: the guest kit's 'restore-touch', 1 vCPU; QEMU -M microvm -accel kvm" +
                          (_qemuMemfd ? " with its RAM in a memfd (memory-backend-memfd, as kvm-vmm's)" : " (its RAM anonymous memory, QEMU's default)") + ". It fills its RAM from 2 MiB up to " +
                          $"{Mib(UnfilledTop)} below the top with a pattern of non-zero words (so neither VMM can skip zero pages), then waits, " +
                          $"polling COM1 for a byte. Snapshots on {work}; median of {runs}, this VMM and QEMU alternating.");
        Console.WriteLine();
        Console.WriteLine("save of the paused guest: ours 'pause', then the timed control-socket 'save DIR' (state and memory files, fsynced);");
        Console.WriteLine("QEMU 'stop', then the timed QMP 'migrate \"exec:cat > FILE && sync FILE && touch DONE\"' until its MIGRATION event says");
        Console.WriteLine("completed and DONE exists (max-bandwidth raised to 1 TB/s so its rate limit does not count; events on). Between runs");
        Console.WriteLine("both guests run again briefly (resume/cont), since QEMU saves a stopped VM only once.");
        Console.WriteLine($"{"guest",-10}{"ours s",10}{"(own)",10}{"qemu s",10}{"qemu/ours",11}{"ours MiB",10}{"qemu MiB",10}");
        foreach (var size in sizes)
        {
            var r = results[size];
            if (r.OurSave.Count == 0 && r.QemuSave.Count == 0)
            {
                Console.WriteLine($"{Mib(size),-10}{"failed",10}");
                continue;
            }
            Console.WriteLine($"{Mib(size),-10}{F(r.OurSave, "0.000"),10}{F(r.OurSaveReported, "0.000"),10}{F(r.QemuSave, "0.000"),10}" +
                              $"{Ratio(r.QemuSave, r.OurSave),11}{r.OurFileBytes / 1048576.0,10:0.0}{r.QemuFileBytes / 1048576.0,10:0.0}");
        }
        Console.WriteLine("(own): the save's duration as kvm-vmm reports it; ours s is the control-socket call as the client sees it. MiB: what");
        Console.WriteLine("each wrote (ours: the state file and the memory file's non-zero pages; QEMU: its migration stream, zero pages as flags).");
        Console.WriteLine();
        Console.WriteLine("restore to first instruction: from starting the process until the guest's first serial byte after the restore, in ms.");
        Console.WriteLine("The restored guest goes on polling COM1; it is sent a byte (ours: on stdin at once, which kvm-vmm feeds to the UART once");
        Console.WriteLine("the VM is restored; QEMU: -incoming defer, QMP migrate-incoming \"exec:cat FILE\", the byte once its MIGRATION event");
        Console.WriteLine("says completed, then 'cont') and prints the moment it sees it. QEMU loads all RAM before the guest runs.");
        Console.WriteLine("Snapshot files were just written, so they are in the page cache for both.");
        var header = new StringBuilder($"{"guest",-10}");
        foreach (var m in modes)
            header.Append($"{"ours " + m.Name,18}");
        header.Append($"{"qemu",10}");
        foreach (var m in modes)
            header.Append($"{"qemu/" + m.Name,18}");
        Console.WriteLine(header);
        foreach (var size in sizes)
        {
            var r = results[size];
            var line = new StringBuilder($"{Mib(size),-10}");
            foreach (var m in modes)
                line.Append($"{F(FirstOf(r, m.Name), "0.0"),18}");
            line.Append($"{F(FirstOf(r, "qemu"), "0.0"),10}");
            foreach (var m in modes)
                line.Append($"{Ratio(FirstOf(r, "qemu"), FirstOf(r, m.Name)),18}");
            Console.WriteLine(line);
        }
        Console.WriteLine("qemu/MODE above 1 means this VMM reaches the guest's first instruction sooner (issue 11's target: at least 10).");
        Console.WriteLine();
        Console.WriteLine($"working set after the restore: right after its first line the guest reads one word of every 4 KiB page of the last " +
                          $"{Mib(touch)} of its filled RAM");
        Console.WriteLine("(checking the pattern): 'touch ms' is the guest's own TSC time for that, 'to all touched' the host's from process start");
        Console.WriteLine("to the guest's report; faults: the VMM process's minflt/majflt (/proc/PID/stat) from the first line to the report (a");
        Console.WriteLine("userfaultfd wait is not counted there); huge MiB: the VMM's RAM mapped with huge pages then (smaps_rollup). For a lazy");
        Console.WriteLine("restore, its loader's counters (control socket 'stats') when the guest reported: touches that waited for their 64 KiB");
        Console.WriteLine("chunk, MiB loaded before the vCPUs started (the recorded working set), because touched, and by the background loader so far,");
        Console.WriteLine("seconds until all RAM was in ('loading': not yet).");
        Console.WriteLine($"{"guest",-10}{"restore",-18}{"touch ms",10}{"to all touched ms",19}{"minflt",10}{"majflt",10}{"huge MiB",10}" +
                          $"{"waited",10}{"first MiB",11}{"on touch MiB",14}{"in bg MiB",11}{"all in s",10}");
        foreach (var size in sizes)
        {
            var r = results[size];
            foreach (var name in modes.Select(m => m.Name).Append("qemu"))
            {
                if (!r.Restores.TryGetValue(name, out var list) || list.Count == 0)
                {
                    Console.WriteLine($"{Mib(size),-10}{(name == "qemu" ? "qemu" : "ours " + name),-18}{"failed",10}");
                    continue;
                }
                Console.WriteLine($"{Mib(size),-10}{(name == "qemu" ? "qemu" : "ours " + name),-18}" +
                                  $"{Median(list.Select(x => x.GuestTouch * 1000)),10:0.0}{Median(list.Select(x => x.Touched * 1000)),19:0.0}" +
                                  $"{Median(list.Select(x => (double)x.MinorFaults)),10:0}{Median(list.Select(x => (double)x.MajorFaults)),10:0}" +
                                  $"{Median(list.Select(x => x.HugeBytes / 1048576.0)),10:0}" +
                                  (list.All(x => x.Loader is not null)
                                      ? $"{Median(list.Select(x => (double)x.Loader!.Faults)),10:0}{Median(list.Select(x => x.Loader!.BytesFirst / 1048576.0)),11:0.0}" +
                                        $"{Median(list.Select(x => x.Loader!.BytesOnTouch / 1048576.0)),14:0.0}" +
                                        $"{Median(list.Select(x => x.Loader!.BytesInBackground / 1048576.0)),11:0.0}" +
                                        $"{(list.All(x => x.Loader!.Seconds is not null) ? Median(list.Select(x => x.Loader!.Seconds!.Value)).ToString("0.00", CultureInfo.InvariantCulture) : "loading"),10}"
                                      : $"{"-",10}{"-",11}{"-",14}{"-",11}{"-",10}"));
            }
        }
        if (modes.Any(m => m.Name == "eager") && modes.Any(m => m.Name == "lazy"))
        {
            foreach (var size in sizes)
            {
                var r = results[size];
                if (r.Restores.TryGetValue("eager", out var e) && r.Restores.TryGetValue("lazy", out var l) && e.Count > 0 && l.Count > 0)
                    Console.WriteLine($"{Mib(size)}: to all touched, lazy/eager {Median(l.Select(x => x.Touched)) / Median(e.Select(x => x.Touched)):0.00}; " +
                                      $"touch alone, lazy/eager {Median(l.Select(x => x.GuestTouch)) / Median(e.Select(x => x.GuestTouch)):0.00}");
            }
        }
        if (modes.Any(m => m.WorkingSet))
            PrintWorkingSet(sizes, results, touch);
        Console.WriteLine($"({total.Elapsed.TotalSeconds:0} s in all; load average {loadBefore} before, {LoadAverage()} after)");
        var failures = results.Values.SelectMany(r => r.Failures).ToList();
        foreach (var f in failures)
            Console.Error.WriteLine($"benchmark: snapshot: {f}");
        return failures.Count == 0 ? 0 : 1;
    }

    /// <summary>The "working set" mode against plain lazy, eager and QEMU: issue 11's target, from REAP, is a working-set read ~3x+ faster than plain lazy with far fewer faults.</summary>
    private static void PrintWorkingSet(ulong[] sizes, Dictionary<ulong, SizeResults> results, ulong touch)
    {
        const string ws = "working set";
        Console.WriteLine();
        Console.WriteLine($"working set first: the 'working set' snapshot is saved with the guest running and reading its {Mib(touch)} working set round and");
        Console.WriteLine($"round (restore-touch busy=1), with a working-set window of {_workingSetSeconds.ToString(CultureInfo.InvariantCulture)} s (control 'save' with workingSetSeconds and");
        Console.WriteLine("requireWorkingSet): the pages touched in that window are recorded, and a --memory lazy restore loads them before the");
        Console.WriteLine("vCPUs start. save s: the control-socket call, the window included; paused s: the guest's pause for the save.");
        Console.WriteLine($"{"guest",-10}{"save s",10}{"paused s",10}{"pages",10}{"MiB",8}{"ranges",8}");
        foreach (var size in sizes)
        {
            var w = results[size].WorkingSetSaves;
            if (w.Count == 0)
            {
                Console.WriteLine($"{Mib(size),-10}{"failed",10}");
                continue;
            }
            Console.WriteLine($"{Mib(size),-10}{Median(w.Select(x => x.Seconds)),10:0.000}{Median(w.Select(x => x.PausedSeconds)),10:0.000}" +
                              $"{Median(w.Select(x => (double)x.Pages)),10:0}{Median(w.Select(x => x.Pages * 4096 / 1048576.0)),8:0.0}{Median(w.Select(x => (double)x.Ranges)),8:0}");
        }
        foreach (var size in sizes)
        {
            var w = results[size].WorkingSetSaves;
            if (w.Count > 0 && Median(w.Select(x => (double)x.Pages)) < touch / 4096)
                Console.WriteLine($"({Mib(size)}: the window saw fewer pages than the {touch / 4096} of the working set: a longer one (--working-set) would see them all.)");
        }
        Console.WriteLine("Ratios, medians (above 1: the working-set restore is better): 'touch' the guest's own time to read its working set after the");
        Console.WriteLine("restore, 'touched' the host's from process start to the guest's report, 'first' to the guest's first byte, 'waited' the");
        Console.WriteLine("loader's touches that waited for a chunk (lazy's over the working-set restore's; 'inf': none waited).");
        Console.WriteLine($"{"guest",-10}{"lazy/ws touch",15}{"lazy/ws touched",17}{"lazy/ws waited",15}{"eager/ws touch",16}{"eager/ws touched",18}" +
                          $"{"ws/lazy first",15}{"qemu/ws first",15}{"qemu/ws touched",17}");
        foreach (var size in sizes)
        {
            var r = results[size];
            List<double> Of(string name, Func<Restore, double> f) => r.Restores.TryGetValue(name, out var l) ? l.Select(f).ToList() : [];
            var wsWaited = Of(ws, x => x.Loader?.Faults ?? double.NaN);
            var lazyWaited = Of("lazy", x => x.Loader?.Faults ?? double.NaN);
            string waited = wsWaited.Count == 0 || lazyWaited.Count == 0 ? "-"
                : Median(wsWaited) == 0 ? "inf" : $"{Median(lazyWaited) / Median(wsWaited):0.0}";
            Console.WriteLine($"{Mib(size),-10}{Ratio(Of("lazy", x => x.GuestTouch), Of(ws, x => x.GuestTouch)),15}{Ratio(Of("lazy", x => x.Touched), Of(ws, x => x.Touched)),17}" +
                              $"{waited,15}{Ratio(Of("eager", x => x.GuestTouch), Of(ws, x => x.GuestTouch)),16}{Ratio(Of("eager", x => x.Touched), Of(ws, x => x.Touched)),18}" +
                              $"{Ratio(Of(ws, x => x.First), Of("lazy", x => x.First)),15}{Ratio(Of("qemu", x => x.First), Of(ws, x => x.First)),15}" +
                              $"{Ratio(Of("qemu", x => x.Touched), Of(ws, x => x.Touched)),17}");
        }
        Console.WriteLine("Issue 11's target (after REAP): lazy/ws touch at least about 3, with far fewer waits; ws/lazy first is what loading the");
        Console.WriteLine("working set first costs before the guest runs.");
    }

    private static List<double> FirstOf(SizeResults r, string name) =>
        r.Restores.TryGetValue(name, out var l) ? l.Select(x => x.First * 1000).ToList() : [];

    private static string F(List<double> v, string format) => v.Count == 0 ? "failed" : Median(v).ToString(format, CultureInfo.InvariantCulture);

    private static string Ratio(List<double> a, List<double> b) => a.Count == 0 || b.Count == 0 ? "-" : $"{Median(a) / Median(b):0.00}";

    private static double Median(IEnumerable<double> values)
    {
        var s = values.Order().ToArray();
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));

    private static string Cmdline(ulong size, ulong touch, bool busy) =>
        $"restore-touch fill={(size - (2UL << 20) - UnfilledTop) >> 10}K touch={touch >> 10}K busy={(busy ? 1 : 0)}";

    private static void MeasureSize(string work, int runs, ulong size, ulong touch, List<Mode> modes, TimeSpan limit, SizeResults r)
    {
        string folder = Path.Combine(work, Mib(size).Replace(" ", "", StringComparison.Ordinal));
        Directory.CreateDirectory(folder);
        string qemuFile = Path.Combine(folder, "qemu.migration");

        // Boot and fill: one VM of ours per kind of snapshot the modes need, and one QEMU. All wait,
        // paused, while another saves; the runs alternate between them.
        var kinds = modes.Select(m => (m.BusyGuest, m.WorkingSet)).Distinct().ToList();
        var ours = new List<(Guest Vm, LineClient Control, string Dir)>();
        Guest? qemu = null;
        LineClient? qmp = null;
        try
        {
            for (int k = 0; k < kinds.Count; k++)
            {
                string socket = Path.Combine(folder, $"ours{k}.sock"), spec = Path.Combine(folder, $"ours{k}.json");
                File.WriteAllText(spec, JsonSerializer.Serialize(new Dictionary<string, object>
                {
                    ["kernel"] = TestEnvironment.GuestKit,
                    ["cmdline"] = Cmdline(size, touch, kinds[k].BusyGuest),
                    ["memoryBytes"] = size,
                    ["cpus"] = 1,
                    ["debugExit"] = true,
                }));
                var vm = Guest.Start($"kvm-vmm ({Mib(size)})", TestEnvironment.KvmVmm, ["--spec", spec, "--control", socket]);
                ours.Add((vm, null!, Path.Combine(folder, $"ours{k}")));
            }
            string qmpSocket = Path.Combine(folder, "qmp-save.sock");
            using (var listener = Listen(qmpSocket))
            {
                qemu = Guest.Start($"qemu ({Mib(size)})", QemuPath, [.. QemuArgs(size, Cmdline(size, touch, busy: false)), "-chardev", $"socket,id=qmp,path={qmpSocket}", "-mon", "chardev=qmp,mode=control"]);
                qmp = LineClient.AcceptQmp(listener, qmpSocket, () => qemu.Process.HasExited, limit);
            }
            qmp.Qmp("migrate-set-capabilities", """{"capabilities":[{"capability":"events","state":true}]}""").Dispose();
            qmp.Qmp("migrate-set-parameters", """{"max-bandwidth":1000000000000}""").Dispose();
            for (int k = 0; k < ours.Count; k++)
            {
                ours[k].Vm.WaitLine(ReadyLine, limit);
                var control = LineClient.Connect(Path.Combine(folder, $"ours{k}.sock"), limit);
                control.Call("pause").Dispose();
                ours[k] = (ours[k].Vm, control, ours[k].Dir);
            }
            qemu.WaitLine(ReadyLine, limit);
            qmp.Qmp("stop").Dispose();

            for (int run = 0; run < runs; run++)
            {
                for (int k = 0; k < ours.Count; k++)
                {
                    var (_, control, snapshot) = ours[k];
                    bool workingSet = kinds[k].WorkingSet;
                    // A working set is traced while the VM runs on after the save point: it is saved
                    // running (and paused again afterwards, so that it does not load the host while
                    // the others are measured); the others are saved paused.
                    if (run > 0 || workingSet)
                        control.Call("resume").Dispose();
                    if (!workingSet)
                        control.Call("pause").Dispose();
                    if (Directory.Exists(snapshot))
                        Directory.Delete(snapshot, recursive: true);
                    string extra = workingSet
                        ? $",\"workingSetSeconds\":{_workingSetSeconds.ToString(CultureInfo.InvariantCulture)},\"requireWorkingSet\":true"
                        : "";
                    var clock = Stopwatch.StartNew();
                    using var reply = control.Call("save", $"{{\"directory\":{JsonSerializer.Serialize(snapshot)}{extra}}}");
                    double seconds = clock.Elapsed.TotalSeconds;
                    if (workingSet)
                    {
                        var result = reply.RootElement.GetProperty("result");
                        r.WorkingSetSaves.Add(new WorkingSetSave(seconds,
                            result.TryGetProperty("pausedSeconds", out var ps) && ps.ValueKind == JsonValueKind.Number ? ps.GetDouble() : 0,
                            result.TryGetProperty("workingSetPages", out var p) && p.ValueKind == JsonValueKind.Number ? p.GetInt64() : 0,
                            result.TryGetProperty("workingSetRanges", out var g) && g.ValueKind == JsonValueKind.Number ? g.GetInt32() : 0));
                        // Only now: the reply lives in the client's buffer, which the next call reuses.
                        control.Call("pause").Dispose();
                    }
                    if (k == 0)
                    {
                        r.OurSave.Add(seconds);
                        r.OurSaveReported.Add(reply.RootElement.GetProperty("result").GetProperty("seconds").GetDouble());
                        var result = reply.RootElement.GetProperty("result");
                        r.OurFileBytes = result.GetProperty("stateBytes").GetInt64() + result.GetProperty("memoryBytesWritten").GetInt64();
                    }
                }
                if (run > 0)
                {
                    qmp.Qmp("cont").Dispose();
                    qmp.Qmp("stop").Dispose();
                }
                string done = qemuFile + ".done";
                File.Delete(qemuFile);
                File.Delete(done);
                qmp.ClearEvents();
                var qclock = Stopwatch.StartNew();
                qmp.Qmp("migrate", $"{{\"uri\":{JsonSerializer.Serialize($"exec:cat > {qemuFile} && sync {qemuFile} && touch {done}")}}}").Dispose();
                qmp.WaitMigration();
                if (!SpinWait.SpinUntil(() => File.Exists(done), limit))
                    throw new BenchmarkFailure($"QEMU's migration to {qemuFile} completed, but its writer did not finish within {limit.TotalSeconds:0} s");
                r.QemuSave.Add(qclock.Elapsed.TotalSeconds);
                r.QemuFileBytes = new FileInfo(qemuFile).Length;
                Console.Error.WriteLine($"{Mib(size)} save {run + 1}/{runs}: ours {r.OurSave[^1]:0.000} s, qemu {r.QemuSave[^1]:0.000} s");
            }
        }
        finally
        {
            foreach (var (vm, control, _) in ours)
            {
                control?.Dispose();
                vm.Dispose();
            }
            qmp?.Dispose();
            qemu?.Dispose();
        }

        // Restores, alternating: each of our modes, then QEMU.
        for (int run = 0; run < runs; run++)
        {
            foreach (var m in modes)
            {
                string snapshot = ours[kinds.IndexOf((m.BusyGuest, m.WorkingSet))].Dir;
                Attempt(r, m.Name, () => RestoreOurs(snapshot, m, size, limit));
            }
            Attempt(r, "qemu", () => RestoreQemu(folder, qemuFile, size, touch, limit));
            Console.Error.WriteLine($"{Mib(size)} restore {run + 1}/{runs}: " + string.Join(", ", modes.Select(m => m.Name).Append("qemu")
                .Select(n => r.Restores.TryGetValue(n, out var l) && l.Count > run ? $"{n} {l[^1].First * 1000:0.0} ms to first, {l[^1].Touched * 1000:0.0} ms to touched" : $"{n} failed")));
        }
    }

    /// <summary>Runs one restore into the results, unless that kind already failed once (then it is not run again).</summary>
    private static void Attempt(SizeResults r, string name, Func<Restore> restore)
    {
        if (r.Failures.Any(f => f.StartsWith(name + ":", StringComparison.Ordinal)))
            return;
        try
        {
            var list = r.Restores.TryGetValue(name, out var l) ? l : r.Restores[name] = [];
            list.Add(restore());
        }
        catch (BenchmarkFailure e)
        {
            r.Failures.Add($"{name}: {e.Message}");
            Console.Error.WriteLine($"benchmark: snapshot: {name}: {e.Message}");
        }
    }

    private static Restore RestoreOurs(string snapshot, Mode mode, ulong size, TimeSpan limit)
    {
        // With a control socket, as kvmd starts kvm-vmm: its stats carry a lazy loader's counters.
        string socket = snapshot + ".sock";
        File.Delete(socket);
        using var vm = Guest.Start($"kvm-vmm --restore ({mode.Name}, {Mib(size)})", TestEnvironment.KvmVmm,
            ["--restore", snapshot, .. mode.RestoreArgs, "--control", socket]);
        // kvm-vmm feeds stdin to the UART only once the VM is restored: the byte cannot be lost.
        vm.Send("g");
        return Finish(vm, limit, expectedStatus: 0, () =>
        {
            using var control = LineClient.Connect(socket, limit);
            using var stats = control.Call("stats");
            if (!stats.RootElement.GetProperty("result").GetProperty("memory").TryGetProperty("load", out var l))
                return null;
            return new LoaderCounts(l.GetProperty("faults").GetInt64(), l.GetProperty("bytesOnTouch").GetInt64(),
                l.TryGetProperty("bytesFirst", out var f) && f.ValueKind == JsonValueKind.Number ? f.GetInt64() : 0,
                l.GetProperty("bytesInBackground").GetInt64(),
                l.TryGetProperty("seconds", out var t) && t.ValueKind == JsonValueKind.Number ? t.GetDouble() : null);
        });
    }

    private static Restore RestoreQemu(string folder, string file, ulong size, ulong touch, TimeSpan limit)
    {
        string socket = Path.Combine(folder, "qmp-restore.sock");
        using var listener = Listen(socket);
        using var vm = Guest.Start($"qemu -incoming ({Mib(size)})", QemuPath,
            [.. QemuArgs(size, Cmdline(size, touch, busy: false)), "-chardev", $"socket,id=qmp,path={socket}", "-mon", "chardev=qmp,mode=control", "-incoming", "defer"]);
        using var qmp = LineClient.AcceptQmp(listener, socket, () => vm.Process.HasExited, limit);
        qmp.Qmp("migrate-set-capabilities", """{"capabilities":[{"capability":"events","state":true}]}""").Dispose();
        qmp.ClearEvents();
        qmp.Qmp("migrate-incoming", $"{{\"uri\":{JsonSerializer.Serialize($"exec:cat {file}")}}}").Dispose();
        qmp.WaitMigration();
        // Only now: a byte that reached the UART during the incoming migration would be overwritten by its saved state.
        vm.Send("g");
        qmp.Qmp("cont").Dispose();
        return Finish(vm, limit, expectedStatus: 1, () => null);
    }

    /// <summary>Waits for the guest's lines after the restore, lets it end, and returns the figures.</summary>
    private static Restore Finish(Guest vm, TimeSpan limit, int expectedStatus, Func<LoaderCounts?> loader)
    {
        var first = vm.WaitLine(ResumedLine, limit);
        if (!vm.FirstLine.StartsWith(ResumedLine, StringComparison.Ordinal))
            throw new BenchmarkFailure($"{vm.Name}: the guest printed something before '{ResumedLine}':{vm.Tail()}");
        var touched = vm.WaitLine(TouchedLine, limit);
        var faultsAfter = vm.Faults();
        long huge = vm.HugeBytes();
        var counts = loader();
        var faultsBefore = vm.FaultsAtFirstLine ?? throw new BenchmarkFailure($"{vm.Name}: no page-fault counts at the first line");
        var m = NsField().Match(touched.Line);
        if (!m.Success)
            throw new BenchmarkFailure($"{vm.Name}: no ns= in '{touched.Line}'");
        vm.Send("x");
        vm.WaitExit(limit, expectedStatus);
        return new Restore(vm.Seconds(first.At), vm.Seconds(touched.At), long.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) / 1e9,
            faultsAfter.Minor - faultsBefore.Minor, faultsAfter.Major - faultsBefore.Major, huge, counts);
    }

    [GeneratedRegex(@" ns=(\d+)")]
    private static partial Regex NsField();

    private static string QemuPath => TestEnvironment.FindOnPath("qemu-system-x86_64")!;

    /// <summary>--qemu-memfd: QEMU's guest RAM a memfd (memory-backend-memfd), as kvm-vmm's, rather than its anonymous memory.</summary>
    private static bool _qemuMemfd;

    private static string[] QemuArgs(ulong size, string cmdline) =>
    [
        .. _qemuMemfd ? new[] { "-object", $"memory-backend-memfd,id=ram,size={size >> 20}M", "-machine", "memory-backend=ram" } : [],
        "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-smp", "1", "-m", $"{size >> 20}M",
        "-kernel", TestEnvironment.GuestKit, "-append", cmdline,
    ];

    /// <summary>A listening unix socket that QEMU connects its QMP monitor to, so nobody polls for QEMU's socket.</summary>
    private static Socket Listen(string path)
    {
        File.Delete(path);
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Bind(new UnixDomainSocketEndPoint(path));
        s.Listen(1);
        return s;
    }

    /// <summary>
    /// A VMM process running the guest kit: stdout read as it arrives, each line stamped with the
    /// time its first byte arrived; the process's page-fault counts taken when the restored guest's
    /// first line is complete.
    /// </summary>
    private sealed class Guest : IDisposable
    {
        private readonly List<(long At, string Line)> _lines = [];
        private readonly object _lock = new();
        private readonly Thread _reader;
        private readonly Task<string> _stderr;
        private readonly long _started;

        private Guest(string name, Process process, long started)
        {
            Name = name;
            Process = process;
            _started = started;
            _stderr = process.StandardError.ReadToEndAsync();
            _reader = new Thread(Read) { IsBackground = true, Name = "guest output" };
            _reader.Start();
        }

        public string Name { get; }
        public Process Process { get; }
        public (long Minor, long Major)? FaultsAtFirstLine { get; private set; }

        /// <summary>The lines so far, each with when its first byte arrived.</summary>
        public List<(long At, string Line)> Lines()
        {
            lock (_lock)
                return [.. _lines];
        }

        /// <summary>The first line the guest printed (empty before it printed one).</summary>
        public string FirstLine
        {
            get { lock (_lock) return _lines.Count == 0 ? "" : _lines[0].Line; }
        }

        public static Guest Start(string name, string file, string[] args)
        {
            long started = Stopwatch.GetTimestamp();
            try
            {
                return new Guest(name, TestEnvironment.StartRedirected(file, args), started);
            }
            catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception)
            {
                throw new BenchmarkFailure($"cannot start {file}: {e.Message}");
            }
        }

        public double Seconds(long at) => Stopwatch.GetElapsedTime(_started, at).TotalSeconds;

        private void Read()
        {
            var stream = Process.StandardOutput.BaseStream;
            var buffer = new byte[4096];
            var line = new StringBuilder();
            long lineAt = 0;
            try
            {
                int n;
                while ((n = stream.Read(buffer, 0, buffer.Length)) > 0)
                {
                    long now = Stopwatch.GetTimestamp();
                    for (int i = 0; i < n; i++)
                    {
                        if (line.Length == 0 && lineAt == 0)
                            lineAt = now;
                        char c = (char)buffer[i];
                        if (c == '\n')
                        {
                            string text = line.ToString().TrimEnd('\r');
                            if (text.StartsWith(ResumedLine, StringComparison.Ordinal) && FaultsAtFirstLine is null)
                                FaultsAtFirstLine = Faults();
                            lock (_lock)
                            {
                                _lines.Add((lineAt, text));
                                Monitor.PulseAll(_lock);
                            }
                            line.Clear();
                            lineAt = 0;
                        }
                        else
                            line.Append(c);
                    }
                }
            }
            catch (IOException)
            {
            }
            lock (_lock)
            {
                _ended = true;
                Monitor.PulseAll(_lock);
            }
        }

        private bool _ended;

        /// <summary>Waits for the first line that starts with <paramref name="prefix"/>: when its first byte arrived, and the line.</summary>
        public (long At, string Line) WaitLine(string prefix, TimeSpan limit)
        {
            var deadline = Stopwatch.StartNew();
            lock (_lock)
            {
                while (true)
                {
                    foreach (var l in _lines)
                        if (l.Line.StartsWith(prefix, StringComparison.Ordinal))
                            return l;
                    if (_lines.Any(l => l.Line.StartsWith("guestkit: error", StringComparison.Ordinal)))
                        break;
                    var left = limit - deadline.Elapsed;
                    if (_ended || left <= TimeSpan.Zero)
                        break;
                    Monitor.Wait(_lock, left < TimeSpan.FromSeconds(1) ? left : TimeSpan.FromSeconds(1));
                }
            }
            throw new BenchmarkFailure($"{Name}: no '{prefix}' line {(_ended ? "before it ended" : $"within {limit.TotalSeconds:0} s")}; " +
                                       $"its output:{Tail()}{StderrTail()}");
        }

        public string Tail(int n = 10)
        {
            lock (_lock)
            {
                var l = _lines.TakeLast(n).Select(x => "\n    " + x.Line).ToArray();
                return l.Length == 0 ? " (none)" : string.Concat(l);
            }
        }

        private string StderrTail()
        {
            if (!Process.HasExited)
                return "";
            _stderr.Wait(TimeSpan.FromSeconds(5));
            var l = _stderr.IsCompleted ? _stderr.Result.Split('\n', StringSplitOptions.RemoveEmptyEntries).TakeLast(10).ToArray() : [];
            return $"\n  it exited with status {Process.ExitCode}; stderr:{(l.Length == 0 ? " (none)" : string.Concat(l.Select(x => "\n    " + x)))}";
        }

        public void Send(string text)
        {
            try
            {
                Process.StandardInput.Write(text);
                Process.StandardInput.Flush();
            }
            catch (IOException e)
            {
                throw new BenchmarkFailure($"{Name}: writing to its stdin: {e.Message}{StderrTail()}");
            }
        }

        /// <summary>minflt and majflt of the process so far (all its threads, the ended ones too): /proc/PID/stat fields 10 and 12.</summary>
        public (long Minor, long Major) Faults()
        {
            try
            {
                string stat = File.ReadAllText($"/proc/{Process.Id}/stat");
                var f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
                return (long.Parse(f[7], CultureInfo.InvariantCulture), long.Parse(f[9], CultureInfo.InvariantCulture));
            }
            catch (IOException e)
            {
                throw new BenchmarkFailure($"{Name}: reading its page faults: {e.Message}");
            }
        }

        /// <summary>The process's memory mapped with huge pages (AnonHugePages + ShmemPmdMapped + FilePmdMapped of /proc/PID/smaps_rollup), in bytes.</summary>
        public long HugeBytes()
        {
            try
            {
                long kib = 0;
                foreach (var line in File.ReadLines($"/proc/{Process.Id}/smaps_rollup"))
                {
                    if (line.StartsWith("AnonHugePages:", StringComparison.Ordinal) || line.StartsWith("ShmemPmdMapped:", StringComparison.Ordinal)
                        || line.StartsWith("FilePmdMapped:", StringComparison.Ordinal))
                        kib += long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture);
                }
                return kib * 1024;
            }
            catch (IOException e)
            {
                throw new BenchmarkFailure($"{Name}: reading its smaps_rollup: {e.Message}");
            }
        }

        public void WaitExit(TimeSpan limit, int expectedStatus)
        {
            if (!Process.WaitForExit(limit))
                throw new BenchmarkFailure($"{Name}: did not end within {limit.TotalSeconds:0} s after its last byte; its output:{Tail()}");
            Process.WaitForExit();
            if (Process.ExitCode != expectedStatus)
                throw new BenchmarkFailure($"{Name}: exited with status {Process.ExitCode}, expected {expectedStatus}; its output:{Tail()}{StderrTail()}");
        }

        public void Dispose()
        {
            try
            {
                if (!Process.HasExited)
                {
                    Process.Kill(entireProcessTree: true);
                    Process.WaitForExit();
                }
            }
            catch (InvalidOperationException)
            {
            }
            _reader.Join(TimeSpan.FromSeconds(10));
            Process.Dispose();
        }
    }
}
