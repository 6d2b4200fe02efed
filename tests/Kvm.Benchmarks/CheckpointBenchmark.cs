using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

/// <summary>
/// Live checkpoints and forks, this VMM against a peer measured in the same run and place. It prints
/// figures and ratios and asserts nothing.
/// <list type="bullet">
/// <item>checkpoint: a guest that writes its RAM all the time (the guest kit's <c>dirty</c>: one word
/// into every 4 KiB page of nearly all its RAM, pass after pass) is checkpointed while it runs: this
/// VMM's <see cref="VmCheckpoint.Take"/> in this process against QEMU 7.2's background snapshot
/// (<c>background-snapshot</c> capability, <c>migrate "exec:cat > FILE"</c>, query-migrate until
/// completed; CheckpointBenchmark.Qemu.cs). Per size: the guest's stop and the whole checkpoint,
/// and the guest's progress (passes per second, read from its RAM) during the checkpoint against
/// before it.</item>
/// <item>fork: N forks of a saved template (<see cref="VmFork.Restore"/>, RAM a private mapping of
/// the memory file) against N eager restores (<see cref="VmSnapshot.Restore"/> with
/// <see cref="MemoryLoad.Eager"/>) of the same template, in this process: the time to build and
/// start all N (their first instruction), to each one's first console line after the restore, and
/// the memory each one's RAM mapping holds (/proc/self/smaps) once it has read its working set.</item>
/// </list>
/// </summary>
internal static partial class CheckpointBenchmark
{
    private static string Usage =>
        "Usage: Kvm.Benchmarks checkpoint [--parts checkpoint,fork] [--runs N] [--sizes 256M,1G] [--forks N] [--fork-memory SIZE]\n" +
        "                                  [--fork-fill SIZE] [--limit S] [--dir FOLDER] [--keep]\n" +
        "  --parts L         what to measure (default both): 'checkpoint', a live checkpoint of a guest writing its RAM against\n" +
        "                    QEMU's background snapshot; 'fork', forks of a template against eager restores of it\n" +
        "  --runs N          checkpoints of each kind per size, and batches of forks and of eager restores (default 1)\n" +
        "  --sizes L         guest RAM sizes of the checkpoint part (default 256M,1G)\n" +
        "  --forks N         forks (and eager restores) per batch (default 16)\n" +
        "  --fork-memory S   the template's RAM (default 128M)\n" +
        "  --fork-fill S     what the template's guest writes and then reads round after round (default 32M)\n" +
        "  --limit S         seconds any one step may take (default 300)\n" +
        "  --dir FOLDER      where checkpoints and templates go (default: a new folder under the temp folder)\n" +
        "  --keep            leave them there afterwards";

    private static readonly string[] AllParts = ["checkpoint", "fork"];

    /// <summary>RAM the dirty guest leaves alone at the top (its stack and page tables lie low, in its image).</summary>
    private const ulong UnwrittenTop = 14UL << 20;

    /// <summary>How long the guest's progress is watched before a checkpoint, for its undisturbed rate.</summary>
    private static readonly TimeSpan RateWindow = TimeSpan.FromSeconds(3);

    public static int Run(string[] args)
    {
        int runs = 1, limit = 300, forks = 16;
        ulong[] sizes = [256UL << 20, 1UL << 30];
        ulong forkMemory = 128UL << 20, forkFill = 32UL << 20;
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
                case "--forks" when i + 1 < args.Length && int.TryParse(args[i + 1], out int f) && f > 0:
                    forks = f;
                    i++;
                    break;
                case "--limit" when i + 1 < args.Length && int.TryParse(args[i + 1], out int s) && s > 0:
                    limit = s;
                    i++;
                    break;
                case "--sizes" when i + 1 < args.Length && args[i + 1].Split(',').All(x => ParseSize(x) >= 64UL << 20):
                    sizes = args[++i].Split(',').Select(x => ParseSize(x)!.Value).ToArray();
                    break;
                case "--fork-memory" when i + 1 < args.Length && ParseSize(args[i + 1]) >= 16UL << 20:
                    forkMemory = ParseSize(args[++i])!.Value;
                    break;
                case "--fork-fill" when i + 1 < args.Length && ParseSize(args[i + 1]) is > 0:
                    forkFill = ParseSize(args[++i])!.Value;
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
        if (forkFill + (2UL << 20) + (4UL << 20) > forkMemory)
        {
            Console.Error.WriteLine($"benchmark: checkpoint: --fork-fill {Mib(forkFill)} does not fit in a {Mib(forkMemory)} template");
            return 2;
        }
        if (!Prerequisites.Check([Prerequisites.GuestKit], [Prerequisites.Qemu]) || !Place.CheckKvm())
            return 1;

        string work = dir is null ? Directory.CreateTempSubdirectory("kvm-ckptbench-").FullName : Path.GetFullPath(dir);
        Directory.CreateDirectory(work);
        try
        {
            string qemuVersion = TestEnvironment.RunProcess("qemu-system-x86_64", ["--version"], TimeSpan.FromSeconds(60)).Stdout.Split('\n')[0].Trim();
            int status = 0;
            if (parts.Contains("checkpoint"))
                status |= MeasureCheckpoints(work, runs, sizes, TimeSpan.FromSeconds(limit), qemuVersion);
            if (parts.Contains("fork"))
            {
                if (parts.Contains("checkpoint"))
                    Console.WriteLine();
                status |= MeasureForks(work, runs, forks, forkMemory, forkFill, TimeSpan.FromSeconds(limit));
            }
            return status;
        }
        finally
        {
            if (!keep && dir is null)
            {
                try
                {
                    Directory.Delete(work, recursive: true);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    // Read-only files (a checkpoint makes its disks' parents read-only): root removes them anyway.
                    Console.Error.WriteLine($"benchmark: checkpoint: could not remove {work}: {e.Message}");
                }
            }
        }
    }

    // ---------------------------------------------------------------- the live checkpoint

    /// <summary>One checkpoint of one side: stop (s), whole (s), the guest's passes per second before and during, and what was written.</summary>
    private sealed record Checkpoint(double StopSeconds, double Seconds, double RateBefore, double RateDuring, long Bytes, string Detail);

    private sealed class SizeFigures
    {
        public List<Checkpoint> Ours { get; } = [];
        public List<Checkpoint> Qemu { get; } = [];

        /// <summary>QEMU's total-time as query-migrate reports it (until its stream was written into the pipe), s.</summary>
        public List<double> QemuReportedTotal { get; } = [];
        public List<string> Failures { get; } = [];
    }

    private static string DirtyCmdline(ulong size) => $"dirty size={(size - GuestBase - UnwrittenTop) >> 10}K passes=1000000";

    private static int MeasureCheckpoints(string work, int runs, ulong[] sizes, TimeSpan limit, string qemuVersion)
    {
        var total = Stopwatch.StartNew();
        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        var figures = new Dictionary<ulong, SizeFigures>();
        string? refusal = Kvm.Hypervisor.RamCheckpointWriter.Refusal();
        if (refusal is null)
        {
            // This process runs JIT-compiled code (kvm-vmm is compiled ahead of time): one untimed
            // checkpoint of a small guest first, so the timed ones do not pay for compiling it.
            string warm = Path.Combine(work, "warm-up");
            Directory.CreateDirectory(warm);
            try
            {
                CheckpointOurs(warm, 0, 64UL << 20, limit);
            }
            catch (Exception e) when (e is BenchmarkFailure or IOException or InvalidOperationException or TimeoutException)
            {
                Console.Error.WriteLine($"benchmark: checkpoint: the warm-up checkpoint failed: {e.Message}");
            }
        }
        foreach (var size in sizes)
        {
            var f = figures[size] = new SizeFigures();
            string folder = Path.Combine(work, "ckpt-" + Mib(size).Replace(" ", "", StringComparison.Ordinal));
            Directory.CreateDirectory(folder);
            for (int run = 0; run < runs; run++)
            {
                if (refusal is not null)
                    Fail(f, "ours", $"this VMM cannot take live checkpoints here: {refusal}");
                else if (!f.Failures.Any(x => x.StartsWith("ours:", StringComparison.Ordinal)))
                {
                    try
                    {
                        f.Ours.Add(CheckpointOurs(folder, run, size, limit));
                    }
                    catch (Exception e) when (e is BenchmarkFailure or IOException or InvalidOperationException or TimeoutException)
                    {
                        Fail(f, "ours", e.Message);
                    }
                }
                if (!f.Failures.Any(x => x.StartsWith("qemu:", StringComparison.Ordinal)))
                {
                    try
                    {
                        var (q, reported) = CheckpointQemu(folder, run, size, limit);
                        f.Qemu.Add(q);
                        f.QemuReportedTotal.Add(reported);
                    }
                    catch (Exception e) when (e is BenchmarkFailure or IOException or InvalidOperationException or TimeoutException)
                    {
                        Fail(f, "qemu", e.Message);
                    }
                }
                Console.Error.WriteLine($"{Mib(size)} checkpoint {run + 1}/{runs}: " +
                                        $"ours {(f.Ours.Count > run ? Describe(f.Ours[^1]) : "failed")}; qemu {(f.Qemu.Count > run ? Describe(f.Qemu[^1]) : "failed")}");
            }
        }

        Console.WriteLine($"live checkpoint of a guest writing its RAM, this VMM against QEMU's background snapshot ({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm}, {qemuVersion})");
        Console.WriteLine($"guest: the guest kit's 'dirty' (1 vCPU): one word into every 4 KiB page from 2 MiB up to {Mib(UnwrittenTop)} below the top of RAM, pass after pass");
        Console.WriteLine("(each pass other values), so every page is written again and again while the checkpoint runs. Ours: VmCheckpoint.Take in this process,");
        Console.WriteLine("RAM a memfd on 4 KiB pages, no rate limit; 'stop' is its StopSeconds, 'total' its Seconds (prepare, stop, write RAM, write the");
        Console.WriteLine("state file; files fsynced). QEMU -M microvm -accel kvm (RAM anonymous memory, its default): migrate-set-capabilities");
        Console.WriteLine("background-snapshot on, max-bandwidth 1 TB/s, migrate \"exec:cat > FILE && sync FILE && touch DONE\", query-migrate every");
        Console.WriteLine("100 ms until completed; 'stop' is query-migrate's downtime, 'total' from the migrate command until DONE exists (synced, as");
        Console.WriteLine("ours); 'qemu own' its total-time (until its stream was in the pipe). Progress: the guest's passes per second read from");
        Console.WriteLine($"its RAM (ours directly, QEMU through HMP 'xp'), during the checkpoint / over {RateWindow.TotalSeconds:0} s just before it. Median of {runs};\n" +
                          "one untimed checkpoint of a 64 MiB guest first (this process's code is JIT-compiled; kvm-vmm's is compiled ahead of time).");
        Console.WriteLine($"{"guest",-9}{"ours stop ms",13}{"qemu stop ms",13}{"qemu/ours",10}{"ours total s",13}{"qemu total s",13}{"qemu own s",11}{"qemu/ours",10}" +
                          $"{"ours prog",10}{"qemu prog",10}{"ours MiB",9}{"qemu MiB",9}");
        foreach (var size in sizes)
        {
            var f = figures[size];
            var oStop = f.Ours.Select(c => c.StopSeconds * 1000).ToList();
            var qStop = f.Qemu.Select(c => c.StopSeconds * 1000).ToList();
            var oTotal = f.Ours.Select(c => c.Seconds).ToList();
            var qTotal = f.Qemu.Select(c => c.Seconds).ToList();
            var oProg = f.Ours.Select(c => c.RateDuring / c.RateBefore).ToList();
            var qProg = f.Qemu.Select(c => c.RateDuring / c.RateBefore).ToList();
            Console.WriteLine($"{Mib(size),-9}{F(oStop, "0.0"),13}{F(qStop, "0.0"),13}{Ratio(qStop, oStop),10}{F(oTotal, "0.00"),13}{F(qTotal, "0.00"),13}" +
                              $"{F(f.QemuReportedTotal, "0.00"),11}{Ratio(qTotal, oTotal),10}{F(oProg, "0.000"),10}{F(qProg, "0.000"),10}" +
                              $"{F(f.Ours.Select(c => c.Bytes / 1048576.0).ToList(), "0.0"),9}{F(f.Qemu.Select(c => c.Bytes / 1048576.0).ToList(), "0.0"),9}");
        }
        Console.WriteLine("qemu/ours above 1: this VMM stops the guest for less, or finishes sooner. prog: the guest's rate during the checkpoint as a");
        Console.WriteLine("fraction of its rate before (1: not slowed). MiB: what each wrote (ours: the memory file's non-zero pages and the state;");
        Console.WriteLine("QEMU: its stream).");
        foreach (var size in sizes)
        {
            var f = figures[size];
            foreach (var c in f.Ours)
                Console.WriteLine($"{Mib(size)} ours: {c.Detail}");
            foreach (var c in f.Qemu)
                Console.WriteLine($"{Mib(size)} qemu: {c.Detail}");
            foreach (var failure in f.Failures)
                Console.WriteLine($"{Mib(size)} not measured: {failure}");
        }
        Console.WriteLine($"({total.Elapsed.TotalSeconds:0} s in all; load average {loadBefore} before, {LoadAverage()} after)");
        return figures.Values.Any(f => f.Ours.Count == 0) ? 1 : 0;
    }

    private static void Fail(SizeFigures f, string side, string message)
    {
        f.Failures.Add($"{side}: {message}");
        Console.Error.WriteLine($"benchmark: checkpoint: {side}: {message}");
    }

    private static string Describe(Checkpoint c) =>
        $"stop {c.StopSeconds * 1000:0.0} ms, total {c.Seconds:0.00} s, progress {c.RateDuring:0.0}/{c.RateBefore:0.0} passes/s";

    private static Checkpoint CheckpointOurs(string folder, int run, ulong size, TimeSpan limit)
    {
        var spec = new VmSpec { Kernel = TestEnvironment.GuestKit, Cmdline = DirtyCmdline(size), MemoryBytes = size, Cpus = 1, DebugExit = true };
        var serial = new Console1();
        using var vm = VirtualMachine.Create(spec, serial.Write);
        var progress = new DirtyProgress(size, gpa => vm.Memory.ReadU64(gpa));
        try
        {
            vm.Start();
            progress.WaitWritten(limit, () => vm.Stopped.IsCompleted ? $"the guest stopped: {vm.Stopped.Result.Describe()}; console: {serial.Text}" : null);
            double before = progress.Rate(RateWindow);
            var (p0, t0) = (progress.Passes(), Stopwatch.GetTimestamp());
            var taken = VmCheckpoint.Take(vm, Path.Combine(folder, $"ours-{run}"));
            var (p1, t1) = (progress.Passes(), Stopwatch.GetTimestamp());
            if (vm.Stopped.IsCompleted)
                throw new BenchmarkFailure($"the guest stopped during the checkpoint: {vm.Stopped.Result.Describe()}; console: {serial.Text}");
            double during = (p1 - p0) / Stopwatch.GetElapsedTime(t0, t1).TotalSeconds;
            string detail = $"stop {taken.StopSeconds * 1000:0.00} ms ({Steps(taken.StopSteps)}); total {taken.Seconds:0.000} s ({Steps(taken.Phases)}); " +
                            $"RAM: {taken.Memory.BytesWritten >> 20} MiB written, {taken.Memory.Faults} guest writes waited, " +
                            $"{taken.Memory.BytesOnWrite >> 20} MiB saved on a write, {taken.Memory.BytesInBackground >> 20} MiB in the background; " +
                            $"guest {during:0.0} passes/s during, {before:0.0} before";
            long bytes = Directory.EnumerateFiles(taken.Directory).Sum(AllocatedBytes);
            Directory.Delete(taken.Directory, recursive: true);
            return new Checkpoint(taken.StopSeconds, taken.Seconds, before, during, bytes, detail);
        }
        finally
        {
            vm.RequestStop(new HostStop("benchmark over"));
            vm.Stopped.Wait(limit);
        }
    }

    private static string Steps(IReadOnlyList<PauseStep> steps) =>
        string.Join(", ", steps.Select(s => $"{s.Name} {s.Milliseconds.ToString("0.##", CultureInfo.InvariantCulture)} ms"));

    /// <summary>The bytes a file holds on disk (holes not counted): st_blocks * 512, from stat(1)'s %b.</summary>
    private static long AllocatedBytes(string path)
    {
        var r = TestEnvironment.RunProcess("stat", ["-c", "%b", path], TimeSpan.FromSeconds(30));
        return r.ExitCode == 0 && long.TryParse(r.Stdout.Trim(), CultureInfo.InvariantCulture, out long blocks) ? blocks * 512 : new FileInfo(path).Length;
    }

    /// <summary>
    /// Where the guest kit's <c>dirty</c> stands, read from its RAM: page i of its region holds
    /// <c>addr ^ ((pass + 1) * 0x9e3779b97f4a7c15)</c> after pass <c>pass</c> wrote it, and the
    /// pages before the one being written hold the current pass, the rest the one before.
    /// </summary>
    private sealed class DirtyProgress(ulong size, Func<ulong, ulong> read)
    {
        private const ulong Golden = 0x9e3779b97f4a7c15UL;
        private static readonly ulong Inverse = ModInverse(Golden);
        private readonly ulong _pages = (size - GuestBase - UnwrittenTop) / 4096;

        /// <summary>The pass that wrote the page at <paramref name="gpa"/>, or -1 when none has.</summary>
        private long PassAt(ulong gpa)
        {
            ulong k = (read(gpa) ^ gpa) * Inverse;
            return k is >= 1 and <= 1_000_000 ? (long)k - 1 : -1;
        }

        /// <summary>Passes done so far, with the fraction of the current one.</summary>
        public double Passes()
        {
            long p = PassAt(GuestBase);
            if (p < 0)
                return 0;
            // The first page that does not yet hold pass p: from there on, pass p - 1 (or nothing yet).
            ulong lo = 1, hi = _pages;
            while (lo < hi)
            {
                ulong mid = lo + (hi - lo) / 2;
                if (PassAt(GuestBase + mid * 4096) == p)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            return p + (double)lo / _pages;
        }

        /// <summary>Waits until the guest has written its whole region once and a half (no zero page left).</summary>
        public void WaitWritten(TimeSpan limit, Func<string?> ended)
        {
            var clock = Stopwatch.StartNew();
            while (Passes() < 1.5)
            {
                if (ended() is { } why)
                    throw new BenchmarkFailure(why);
                if (clock.Elapsed > limit)
                    throw new BenchmarkFailure($"the guest did not write its RAM once within {limit.TotalSeconds:0} s (at {Passes():0.00} passes)");
                Thread.Sleep(200);
            }
        }

        /// <summary>Passes per second over <paramref name="window"/>.</summary>
        public double Rate(TimeSpan window)
        {
            var (p0, t0) = (Passes(), Stopwatch.GetTimestamp());
            Thread.Sleep(window);
            var (p1, t1) = (Passes(), Stopwatch.GetTimestamp());
            return (p1 - p0) / Stopwatch.GetElapsedTime(t0, t1).TotalSeconds;
        }

        private static ulong ModInverse(ulong a)
        {
            ulong x = a;                // Newton's iteration: correct to 3, 6, 12, 24, 48, 96 bits
            for (int i = 0; i < 5; i++)
                x *= 2 - a * x;
            return x;
        }
    }

    /// <summary>The guest kit's RAM area: the first 2 MiB boundary at or above the end of its image (from its ELF program headers).</summary>
    private static ulong GuestBase => _guestBase ??= ImageAreaBase(TestEnvironment.GuestKit);

    private static ulong? _guestBase;

    private static ulong ImageAreaBase(string elf)
    {
        var b = File.ReadAllBytes(elf);
        ulong phoff = BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(0x20));
        int phentsize = BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(0x36)), phnum = BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(0x38));
        ulong end = 0;
        for (int i = 0; i < phnum; i++)
        {
            var h = b.AsSpan((int)phoff + i * phentsize);
            if (BinaryPrimitives.ReadUInt32LittleEndian(h) != 1)        // PT_LOAD
                continue;
            end = Math.Max(end, BinaryPrimitives.ReadUInt64LittleEndian(h[0x18..]) + BinaryPrimitives.ReadUInt64LittleEndian(h[0x28..]));
        }
        const ulong Huge = 2UL << 20;
        return (end + Huge - 1) & ~(Huge - 1);
    }

    // ---------------------------------------------------------------- forks

    /// <summary>One batch of N VMs from the template: seconds from the first build to each one started, to each one's first line; each one's RAM (kB by smaps field).</summary>
    private sealed record Batch(double[] Started, double[] FirstLine, Dictionary<string, long>[] Memory);

    private static int MeasureForks(string work, int runs, int count, ulong memory, ulong fill, TimeSpan limit)
    {
        var total = Stopwatch.StartNew();
        DateTime started = DateTime.UtcNow;
        string loadBefore = LoadAverage();
        string template = Path.Combine(work, "template");
        string cmdline = $"pattern size={fill >> 10}K rounds=1000000";
        var spec = new VmSpec { Kernel = TestEnvironment.GuestKit, Cmdline = cmdline, MemoryBytes = memory, Cpus = 1, DebugExit = true };
        var serial = new Console1();
        try
        {
            using var vm = VirtualMachine.Create(spec, serial.Write);
            vm.Start();
            if (!serial.WaitLines(l => l.StartsWith("guestkit: pattern round 1", StringComparison.Ordinal), limit) || vm.Stopped.IsCompleted)
                throw new BenchmarkFailure($"the template's guest did not read its pattern once within {limit.TotalSeconds:0} s; console: {serial.Text}");
            vm.Pause();
            VmSnapshot.Save(vm, template);
            vm.RequestStop(new HostStop("template saved"));
            vm.Stopped.Wait(limit);
        }
        catch (Exception e) when (e is BenchmarkFailure or IOException or InvalidOperationException)
        {
            Console.Error.WriteLine($"benchmark: checkpoint: fork: the template: {e.Message}");
            return 1;
        }

        var forks = new List<Batch>();
        var eager = new List<Batch>();
        var failures = new List<string>();
        // Untimed, one of each first: this process runs JIT-compiled code, and the batch that came
        // first would pay for compiling what both use.
        foreach (var name in new[] { "forks", "eager" })
        {
            try
            {
                RunBatch(name, template, Path.Combine(work, $"warm-up-{name}"), 1, limit);
            }
            catch (Exception e) when (e is BenchmarkFailure or IOException or InvalidOperationException or TimeoutException)
            {
                Console.Error.WriteLine($"benchmark: checkpoint: the warm-up of {name} failed: {e.Message}");
            }
        }
        for (int run = 0; run < runs; run++)
        {
            foreach (var (name, list) in new[] { ("forks", forks), ("eager", eager) })
            {
                if (failures.Any(f => f.StartsWith(name + ":", StringComparison.Ordinal)))
                    continue;
                try
                {
                    list.Add(RunBatch(name, template, Path.Combine(work, $"{name}-{run}"), count, limit));
                    var b = list[^1];
                    Console.Error.WriteLine($"{name} {run + 1}/{runs}: {count} started in {b.Started.Max() * 1000:0} ms, first lines {b.FirstLine.Min() * 1000:0}-{b.FirstLine.Max() * 1000:0} ms, " +
                                            $"Pss {b.Memory.Average(m => m["Pss"]) / 1024:0.0} MiB each");
                }
                catch (Exception e) when (e is BenchmarkFailure or IOException or InvalidOperationException or TimeoutException)
                {
                    failures.Add($"{name}: {e.Message}");
                    Console.Error.WriteLine($"benchmark: checkpoint: {name}: {e.Message}");
                }
            }
        }

        Console.WriteLine($"forks of a saved VM against eager restores of it, {count} at once in this process ({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm})");
        Console.WriteLine($"template: the guest kit's '{cmdline}' (1 vCPU, {Mib(memory)}): it writes a pattern over {Mib(fill)}, then reads it back round after");
        Console.WriteLine("round, printing a line after each; saved (VmSnapshot.Save, paused) just after its first round's line. forks: VmFork.Restore (RAM a");
        Console.WriteLine($"private copy-on-write mapping of the template's memory file); eager: VmSnapshot.Restore with MemoryLoad.Eager (all RAM read into the");
        Console.WriteLine($"VM's memfd first). Each batch builds and starts {count} VMs one after another; 'started' is when the last one's vCPU was started");
        Console.WriteLine("(its first instruction), 'first line' when the last one printed its first line after the restore (the end of a round, having");
        Console.WriteLine("read the rest of its pattern), both from the first build. Memory: each VM's RAM mapping in /proc/self/smaps once every VM");
        Console.WriteLine($"printed two lines (read all {Mib(fill)} at least once), mean per VM. The template's files were just written (page cache). Median of {runs};\n" +
                          "one untimed VM of each kind first (this process's code is JIT-compiled; kvm-vmm's is compiled ahead of time).");
        Console.WriteLine($"{"",-8}{"started ms",11}{"per s",8}{"first line ms",14}{"per s",8}{"median first ms",16}{"Rss MiB",9}{"Pss MiB",9}{"Priv_Dirty MiB",15}");
        foreach (var (name, list) in new[] { ("forks", forks), ("eager", eager) })
        {
            if (list.Count == 0)
            {
                Console.WriteLine($"{name,-8}{"failed",11}");
                continue;
            }
            var st = list.Select(b => b.Started.Max()).ToList();
            var fl = list.Select(b => b.FirstLine.Max()).ToList();
            Console.WriteLine($"{name,-8}{Median(st) * 1000,11:0}{count / Median(st),8:0.0}{Median(fl) * 1000,14:0}{count / Median(fl),8:0.0}" +
                              $"{Median(list.Select(b => Median(b.FirstLine))) * 1000,16:0}" +
                              $"{Median(list.Select(b => b.Memory.Average(m => m["Rss"]))) / 1024,9:0.0}" +
                              $"{Median(list.Select(b => b.Memory.Average(m => m["Pss"]))) / 1024,9:0.0}" +
                              $"{Median(list.Select(b => b.Memory.Average(m => m["Private_Dirty"]))) / 1024,15:0.0}");
        }
        if (forks.Count > 0 && eager.Count > 0)
        {
            double Of(List<Batch> l, Func<Batch, double> f) => Median(l.Select(f));
            Console.WriteLine($"ratios eager/forks: to all started {Of(eager, b => b.Started.Max()) / Of(forks, b => b.Started.Max()):0.00}, " +
                              $"to all first lines {Of(eager, b => b.FirstLine.Max()) / Of(forks, b => b.FirstLine.Max()):0.00}, " +
                              $"Pss per VM {Of(eager, b => b.Memory.Average(m => m["Pss"])) / Of(forks, b => b.Memory.Average(m => m["Pss"])):0.00} " +
                              "(above 1: forks start sooner, print sooner, hold less)");
        }
        foreach (var f in failures)
            Console.WriteLine($"not measured: {f}");
        Console.WriteLine($"({total.Elapsed.TotalSeconds:0} s in all; load average {loadBefore} before, {LoadAverage()} after)");
        return forks.Count == 0 ? 1 : 0;
    }

    private static Batch RunBatch(string name, string template, string folder, int count, TimeSpan limit)
    {
        var vms = new List<VirtualMachine>();
        var consoles = new Console1[count];
        var startedAt = new double[count];
        try
        {
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < count; i++)
            {
                var c = consoles[i] = new Console1(clock);
                var vm = name == "forks"
                    ? VmFork.Restore(template, Path.Combine(folder, $"fork-{i}"), c.Write).Vm
                    : VmSnapshot.Restore(template, c.Write, new RestoreOptions { Memory = MemoryLoad.Eager });
                vms.Add(vm);
                vm.Start();
                startedAt[i] = clock.Elapsed.TotalSeconds;
            }
            var first = new double[count];
            for (int i = 0; i < count; i++)
            {
                if (!consoles[i].WaitLines(_ => true, limit, 1))
                    throw new BenchmarkFailure($"{name} {i} printed no line within {limit.TotalSeconds:0} s; console: {consoles[i].Text}; {vms[i].DescribeState()}");
                var (at, line) = consoles[i].Line(0);
                if (!line.StartsWith("guestkit: pattern round", StringComparison.Ordinal))
                    throw new BenchmarkFailure($"{name} {i}: its first line after the restore was '{line}'");
                first[i] = at;
            }
            for (int i = 0; i < count; i++)
                if (!consoles[i].WaitLines(_ => true, limit, 2))
                    throw new BenchmarkFailure($"{name} {i} printed no second line within {limit.TotalSeconds:0} s; console: {consoles[i].Text}");
            var memory = vms.Select(v => SmapsOf(v.Memory.Regions.Select(r => r.Host))).ToArray();
            return new Batch(startedAt, first, memory);
        }
        finally
        {
            foreach (var vm in vms)
            {
                vm.RequestStop(new HostStop("benchmark over"));
                vm.Stopped.Wait(limit);
                vm.Dispose();
            }
        }
    }

    /// <summary>The kilobytes smaps gives by field, summed over this process's mappings that start at <paramref name="starts"/>.</summary>
    private static Dictionary<string, long> SmapsOf(IEnumerable<IntPtr> starts)
    {
        var heads = starts.Select(s => $"{(ulong)s:x}-").ToHashSet();
        var fields = new Dictionary<string, long>(StringComparer.Ordinal) { ["Rss"] = 0, ["Pss"] = 0, ["Private_Dirty"] = 0 };
        bool inside = false;
        foreach (var line in File.ReadLines("/proc/self/smaps"))
        {
            if (MappingLine().IsMatch(line))
            {
                inside = heads.Contains(line[..(line.IndexOf('-') + 1)]);
                continue;
            }
            if (inside && line.EndsWith(" kB", StringComparison.Ordinal) && line.IndexOf(':') is > 0 and var colon)
                fields[line[..colon]] = fields.GetValueOrDefault(line[..colon]) + long.Parse(line[(colon + 1)..^3].Trim(), CultureInfo.InvariantCulture);
        }
        return fields;
    }

    [GeneratedRegex(@"^[0-9a-f]+-[0-9a-f]+ [rwxsp-]{4} ")]
    private static partial Regex MappingLine();

    /// <summary>A VM's serial output, with when each line was complete (on the clock given).</summary>
    private sealed class Console1(Stopwatch? clock = null)
    {
        private readonly object _lock = new();
        private readonly StringBuilder _text = new();
        private readonly StringBuilder _line = new();
        private readonly List<(double At, string Line)> _lines = [];

        public void Write(ReadOnlySpan<byte> data)
        {
            string s = Encoding.UTF8.GetString(data);
            lock (_lock)
            {
                _text.Append(s);
                foreach (char c in s)
                {
                    if (c == '\n')
                    {
                        _lines.Add((clock?.Elapsed.TotalSeconds ?? 0, _line.ToString().TrimEnd('\r')));
                        _line.Clear();
                        Monitor.PulseAll(_lock);
                    }
                    else
                        _line.Append(c);
                }
            }
        }

        public string Text
        {
            get { lock (_lock) return _text.Length > 2000 ? "..." + _text.ToString()[^2000..] : _text.ToString(); }
        }

        public (double At, string Line) Line(int i)
        {
            lock (_lock)
                return _lines[i];
        }

        /// <summary>Waits until <paramref name="count"/> lines match <paramref name="match"/>.</summary>
        public bool WaitLines(Func<string, bool> match, TimeSpan limit, int count = 1)
        {
            var deadline = Stopwatch.StartNew();
            lock (_lock)
            {
                while (_lines.Count(l => match(l.Line)) < count)
                {
                    var left = limit - deadline.Elapsed;
                    if (left <= TimeSpan.Zero)
                        return false;
                    Monitor.Wait(_lock, left < TimeSpan.FromSeconds(1) ? left : TimeSpan.FromSeconds(1));
                }
                return true;
            }
        }
    }

    // ---------------------------------------------------------------- helpers

    private static ulong? ParseSize(string text) => SnapshotBenchmark.ParseSize(text);

    private static string Mib(ulong bytes) => bytes >= 1UL << 30 && bytes % (1UL << 30) == 0 ? $"{bytes >> 30} GiB" : $"{bytes >> 20} MiB";

    private static string F(List<double> v, string format) => v.Count == 0 ? "-" : Median(v).ToString(format, CultureInfo.InvariantCulture);

    private static string Ratio(List<double> a, List<double> b) => a.Count == 0 || b.Count == 0 ? "-" : $"{Median(a) / Median(b):0.00}";

    private static double Median(IEnumerable<double> values)
    {
        var s = values.Order().ToArray();
        return s.Length == 0 ? double.NaN : s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    private static string LoadAverage() => string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3));
}
