using System.Diagnostics;
using System.Globalization;
using System.Text;
using Kvm.Tests.Shared;
using Xunit.Abstractions;

namespace Kvm.Storage.FuzzTests;

/// <summary>The seed images, made once per test process in a temporary folder that goes away at exit.</summary>
public static class Corpus
{
    private static readonly string Root = MakeRoot();

    /// <summary>
    /// KVM_FUZZ_DIR if set, else /dev/shm when it is a writable tmpfs (thousands of small files are
    /// written and deleted, which is slow on a disk mounted with online discard), else the temp folder.
    /// </summary>
    private static string MakeRoot()
    {
        var parent = Environment.GetEnvironmentVariable("KVM_FUZZ_DIR");
        if (string.IsNullOrEmpty(parent) && Directory.Exists("/dev/shm"))
        {
            try
            {
                var probe = Path.Combine("/dev/shm", $"kvm-storage-fuzz-probe-{Environment.ProcessId}");
                File.WriteAllBytes(probe, [1]);
                File.Delete(probe);
                parent = "/dev/shm";
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
        }
        if (string.IsNullOrEmpty(parent))
            return Directory.CreateTempSubdirectory("kvm-storage-fuzz-").FullName;
        RemoveStale(parent);
        return Directory.CreateDirectory(Path.Combine(parent, $"kvm-storage-fuzz-{Environment.ProcessId}-{Guid.NewGuid():N}")).FullName;
    }

    private static readonly Lazy<IReadOnlyList<Seed>> EngineSeeds = new(() => SeedCorpus.MakeEngineSeeds(Dir("seeds-engine")));

    private static readonly Lazy<IReadOnlyList<Seed>?> QemuSeeds = new(() =>
        Kvm.Tests.Shared.TestEnvironment.FindOnPath("qemu-img") is null || Kvm.Tests.Shared.TestEnvironment.FindOnPath("qemu-io") is null
            ? null
            : SeedCorpus.MakeQemuSeeds(Dir("seeds-qemu")));

    static Corpus()
    {
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            try
            {
                Directory.Delete(Root, recursive: true);
            }
            catch (IOException)
            {
            }
            catch (UnauthorizedAccessException)
            {
            }
        };
    }

    /// <summary>
    /// Deletes folders that earlier runs left behind (a test host that is killed does not run
    /// ProcessExit): kvm-storage-fuzz-PID-* whose process is gone.
    /// </summary>
    private static void RemoveStale(string parent)
    {
        foreach (var dir in Directory.EnumerateDirectories(parent, "kvm-storage-fuzz-*-*"))
        {
            var parts = Path.GetFileName(dir).Split('-');
            if (parts.Length < 5 || !int.TryParse(parts[3], NumberStyles.None, CultureInfo.InvariantCulture, out int pid) || Directory.Exists($"/proc/{pid}"))
                continue;
            try
            {
                Directory.Delete(dir, recursive: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
        }
    }

    /// <summary>A new folder under the corpus root.</summary>
    public static string Dir(string name) => Directory.CreateDirectory(Path.Combine(Root, name)).FullName;

    public static IReadOnlyList<Seed> Engine => EngineSeeds.Value;

    /// <summary>The qemu-made seeds; skips the calling test when qemu-img or qemu-io is missing.</summary>
    public static IReadOnlyList<Seed> Qemu
    {
        get
        {
            FuzzTests.Qemu.Require();
            return QemuSeeds.Value!;
        }
    }
}

/// <summary>Totals of a fuzz run, printed to the test output.</summary>
public sealed class FuzzStats
{
    public int Cases;
    public readonly Dictionary<string, int> Outcomes = new();
    public readonly Dictionary<string, int> Kinds = new();
    public TimeSpan Slowest;
    public string SlowestCase = "";
    public long MostAllocated;
    public string MostAllocatedCase = "";
    public readonly Stopwatch Clock = Stopwatch.StartNew();
    public readonly Dictionary<string, (int Cases, TimeSpan Time)> PerSeed = new();

    private readonly List<(TimeSpan Time, string Id)> _times = new();

    public void Add(string id, string kind, CaseResult r)
    {
        Cases++;
        _times.Add((r.Elapsed, $"{id} {kind} {r.Outcome}"));
        Outcomes[r.Outcome] = Outcomes.GetValueOrDefault(r.Outcome) + 1;
        Kinds[kind] = Kinds.GetValueOrDefault(kind) + 1;
        if (r.Elapsed > Slowest)
        {
            Slowest = r.Elapsed;
            SlowestCase = id;
        }
        if (r.Allocated > MostAllocated)
        {
            MostAllocated = r.Allocated;
            MostAllocatedCase = id;
        }
    }

    public override string ToString()
    {
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"{Cases} cases in {Clock.Elapsed.TotalSeconds:F1} s; slowest {Slowest.TotalMilliseconds:F0} ms ({SlowestCase}); most allocated {MostAllocated / 1024} KiB ({MostAllocatedCase})\n");
        sb.Append("outcomes: ").AppendJoin(", ", Outcomes.OrderByDescending(o => o.Value).Select(o => $"{o.Key} {o.Value}")).Append('\n');
        sb.Append("per seed (cases, wall time): ").AppendJoin(", ", PerSeed.Select(p => $"{p.Key} {p.Value.Cases} {p.Value.Time.TotalSeconds:F1} s")).Append('\n');
        sb.Append("slowest: ").AppendJoin(", ", _times.OrderByDescending(t => t.Time).Take(8).Select(t => $"{t.Id} {t.Time.TotalMilliseconds:F0} ms")).Append('\n');
        sb.Append(CultureInfo.InvariantCulture, $"median case {(_times.Count == 0 ? 0 : _times.Select(t => t.Time.TotalMilliseconds).Order().ElementAt(_times.Count / 2)):F1} ms\n");
        sb.Append("mutations: ").AppendJoin(", ", Kinds.OrderBy(k => k.Key, StringComparer.Ordinal).Select(k => $"{k.Key} {k.Value}"));
        return sb.ToString();
    }
}

/// <summary>
/// Runs seeded mutation cases over a set of seeds and collects every failure, each with what it
/// takes to run it again: the test, the seed image, the case number and the mutation.
/// </summary>
public sealed class FuzzCampaign(string stream, string testName, ITestOutputHelper output)
{
    private readonly List<(string Signature, string Text)> _failures = new();

    public FuzzStats Stats { get; } = new();

    /// <summary>Mutation cases over one seed: read-only, or read-write when <paramref name="readWrite"/> is set.</summary>
    public void Run(Seed seed, int cases, bool readWrite, bool qemuOracle = false)
    {
        cases = Math.Max(1, (int)(cases * FuzzHarness.Scale));
        // A private copy of the seed's folder (its backing files), so that parallel tests do not share files.
        var work = Corpus.Dir($"{stream}-{seed.Name}");
        var watchedOthers = new List<WatchedFile>();
        foreach (var other in seed.Others)
        {
            var copy = Path.Combine(work, Path.GetFileName(other));
            File.Copy(other, copy, overwrite: true);
            watchedOthers.Add(new WatchedFile(copy, fullHash: false));
        }
        var mutator = new Qcow2Mutator(seed.Bytes());
        var clock = Stopwatch.StartNew();
        int ran = 0;
        for (int i = 0; i < cases; i++)
        {
            if (!FuzzHarness.Selected(seed.Name, i))
                continue;
            var rng = FuzzHarness.CaseRandom(stream, seed.Name, i);
            var mutation = mutator.Mutate(rng);
            var file = Path.Combine(work, $"case-{i}.qcow2");
            File.WriteAllBytes(file, mutation.Bytes);
            var result = readWrite
                ? FuzzHarness.RunReadWrite(file, watchedOthers, rng)
                : FuzzHarness.RunReadOnly(file, [new WatchedFile(file, fullHash: true, FuzzHarness.Hash(mutation.Bytes)), .. watchedOthers], rng);
            if (qemuOracle && result.Failure is null && result.Outcome == "opened clean" && Qcow2Layout.Parse(mutation.Bytes).IsQcow2)
                result = QemuOracle(work, i, mutation.Bytes, file, result);
            Record($"{seed.Name}:{i}", mutation.Kind.ToString(), mutation.Description, result, mutation.Bytes);
            TryDelete(file);
            ran++;
        }
        Stats.PerSeed[seed.Name] = (ran, clock.Elapsed);
        foreach (var w in watchedOthers)
        {
            if (w.Changed(forceHash: true) is { } what)
                _failures.Add(("backing file modified", $"[{seed.Name}] {Path.GetFileName(w.Path)} changed during the {ran} cases ({what})"));
        }
    }

    /// <summary>Adds a case's result, keeping its failure (if any) for the final report.</summary>
    public void Record(string id, string kind, string description, CaseResult result, byte[]? bytes = null)
    {
        Stats.Add(id, kind, result);
        if (result.Failure is null)
            return;
        string keep = bytes is null ? "" : FuzzHarness.Keep(bytes, $"{stream}-{id.Replace(':', '-')}.qcow2");
        _failures.Add((result.Signature, $"[{id} {kind}] {description}\n      => outcome '{result.Outcome}'{keep}\n      {result.Failure}"));
    }

    /// <summary>Cases where the engine's check found no corruption but qemu-img check did (before any write).</summary>
    public List<string> QemuDisagreements { get; } = new();

    /// <summary>
    /// For a read-write case that opened clean: qemu-img check on the damaged image as it was, and
    /// after the engine's writes. If qemu found it free of corruption before, it must still do so.
    /// </summary>
    private CaseResult QemuOracle(string work, int caseIndex, byte[] before, string after, CaseResult result)
    {
        var pre = Path.Combine(work, $"pre-{caseIndex}.qcow2");
        File.WriteAllBytes(pre, before);
        var preCheck = Qemu.Check(pre);
        TryDelete(pre);
        var postCheck = Qemu.Check(after);
        static string Summary(ProcessResult r)
        {
            string text = (r.Stdout + r.Stderr).Trim().ReplaceLineEndings(" | ");
            return $"exit {r.ExitCode}: {text[..Math.Min(400, text.Length)]}";
        }
        if (preCheck.ExitCode == 2)
        {
            QemuDisagreements.Add($"{caseIndex}: {Summary(preCheck)}");
            return result with { Outcome = "opened clean, qemu-img check: corrupt before" };
        }
        if (preCheck.ExitCode == 1)
            QemuDisagreements.Add($"{caseIndex} (qemu-img cannot check it): {Summary(preCheck)}");
        if (preCheck.ExitCode is 0 or 3 && postCheck.ExitCode is not (0 or 3))
            return result with
            {
                Outcome = "opened clean, qemu-img check: corrupt after the engine's writes",
                Failure = $"qemu-img check found the image clean before the engine's writes ({Summary(preCheck)}) and not after ({Summary(postCheck)})",
                Signature = "qemu-img check corrupt after writes",
            };
        return result with { Outcome = $"opened clean, qemu-img check {preCheck.ExitCode} -> {postCheck.ExitCode}" };
    }

    /// <summary>A failure found outside <see cref="Record"/> (e.g. a case that ended other than expected).</summary>
    public void AddFailure(string signature, string text) => _failures.Add((signature, text));

    private static void TryDelete(string file)
    {
        try
        {
            File.Delete(file);
        }
        catch (IOException)
        {
        }
    }

    /// <summary>Prints the totals and fails with every failure (grouped by cause, then each case) if there were any.</summary>
    public void Finish()
    {
        output.WriteLine($"{testName}: {Stats}");
        foreach (var d in QemuDisagreements)
            output.WriteLine($"engine check clean, qemu-img check corrupt: {d}");
        if (_failures.Count == 0)
            return;
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"{_failures.Count} of {Stats.Cases} fuzz cases failed in {testName}.\n");
        sb.Append("Causes:\n");
        foreach (var g in _failures.GroupBy(f => f.Signature).OrderByDescending(g => g.Count()))
            sb.Append(CultureInfo.InvariantCulture, $"  {g.Count(),5} x {g.Key}\n");
        sb.Append("Cases (reproduce one with KVM_FUZZ_ONLY=<seed>:<case> dotnet test tests/Kvm.Storage.FuzzTests -c Release ")
          .Append(CultureInfo.InvariantCulture, $"--filter \"FullyQualifiedName~{testName}\"; add KVM_FUZZ_KEEP=<dir> to keep the damaged file):\n");
        foreach (var (_, text) in _failures)
            sb.Append("  ").Append(text).Append('\n');
        output.WriteLine(sb.ToString());
        Assert.Fail(sb.ToString());
    }
}
