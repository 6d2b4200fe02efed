using System.Globalization;
using System.Text.Json;
using Kvm.Tests.Shared;

namespace Kvm.Storage.Tests;

/// <summary>One image of <c>qemu-img info --output=json --backing-chain</c>.</summary>
public sealed record QemuImageInfo(
    string Filename,
    string Format,
    ulong VirtualSize,
    long? ClusterSize,
    string? BackingFilename,
    string? FullBackingFilename,
    string? BackingFormat,
    string? Compat,
    int? RefcountBits,
    bool? Corrupt,
    int SnapshotCount,
    string Json);

/// <summary><c>qemu-img check --output=json</c>: exit code 0 clean, 2 corruptions, 3 leaks.</summary>
public sealed record QemuCheckResult(
    int ExitCode,
    long Corruptions,
    long Leaks,
    long CheckErrors,
    long AllocatedClusters,
    long CompressedClusters,
    long TotalClusters,
    string Json)
{
    public bool Clean => ExitCode == 0 && Corruptions == 0 && Leaks == 0 && CheckErrors == 0;

    public override string ToString() =>
        $"exit {ExitCode}, corruptions {Corruptions}, leaks {Leaks}, check-errors {CheckErrors}: {Json}";
}

/// <summary>One entry of <c>qemu-img map --output=json</c>.</summary>
public sealed record QemuMapEntry(ulong Start, ulong Length, int Depth, bool Present, bool Zero, bool Data, ulong? Offset);

/// <summary><c>qemu-img compare</c>: exit 0 identical, 1 different.</summary>
public sealed record QemuCompareResult(bool Identical, string Output);

/// <summary>
/// Runs qemu-img and qemu-io (Debian qemu-utils), the oracles for the image format. Every
/// unexpected failure throws with the full command line, exit code and stderr.
/// </summary>
public static class QemuImg
{
    private static readonly TimeSpan Timeout = TimeSpan.FromMinutes(5);

    /// <summary>Skips the calling test unless qemu-img and qemu-io are installed.</summary>
    public static void Require()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
    }

    /// <summary><c>qemu-img create -f FORMAT [-o cluster_size=…,OPTIONS] [-b BACKING -F FMT] PATH [SIZE]</c>.</summary>
    public static void Create(string path, string format, ulong? size, int? clusterSize = null,
        string? backing = null, string? backingFormat = null, IEnumerable<string>? extraOptions = null)
    {
        var args = new List<string> { "create", "-q", "-f", format };
        var options = new List<string>();
        if (clusterSize is { } cs)
            options.Add($"cluster_size={cs}");
        if (extraOptions is not null)
            options.AddRange(extraOptions);
        if (options.Count > 0)
            args.AddRange(["-o", string.Join(',', options)]);
        if (backing is not null)
        {
            args.AddRange(["-b", backing]);
            if (backingFormat is not null)
                args.AddRange(["-F", backingFormat]);
        }
        args.Add(path);
        if (size is { } s)
            args.Add(s.ToString(CultureInfo.InvariantCulture));
        RunChecked("qemu-img", args);
    }

    /// <summary>The image and then each image of its backing chain, in order.</summary>
    public static IReadOnlyList<QemuImageInfo> Info(string path)
    {
        var r = RunChecked("qemu-img", ["info", "--output=json", "--backing-chain", path]);
        using var doc = JsonDocument.Parse(r.Stdout);
        var list = new List<QemuImageInfo>();
        if (doc.RootElement.ValueKind == JsonValueKind.Array)
        {
            foreach (var e in doc.RootElement.EnumerateArray())
                list.Add(ParseInfo(e));
        }
        else
        {
            list.Add(ParseInfo(doc.RootElement));
        }
        return list;
    }

    /// <summary>
    /// <c>qemu-img check --output=json [-r leaks|all]</c>. Returns the parsed report for exit codes
    /// 0, 2 and 3; any other exit (check could not run) throws.
    /// </summary>
    public static QemuCheckResult Check(string path, string? format = null, string? repair = null)
    {
        var args = new List<string> { "check", "--output=json" };
        if (format is not null)
            args.AddRange(["-f", format]);
        if (repair is not null)
            args.AddRange(["-r", repair]);
        args.Add(path);
        var r = Run("qemu-img", args);
        if (r.ExitCode is not (0 or 2 or 3))
            throw Failure("qemu-img", args, r);
        JsonElement root;
        try
        {
            using var doc = JsonDocument.Parse(r.Stdout);
            root = doc.RootElement.Clone();
        }
        catch (JsonException e)
        {
            throw new InvalidOperationException($"{CommandLine("qemu-img", args)} printed no JSON report: {r.Stdout}\n{r.Stderr}", e);
        }
        return new QemuCheckResult(
            r.ExitCode,
            Long(root, "corruptions"),
            Long(root, "leaks"),
            Long(root, "check-errors"),
            Long(root, "allocated-clusters"),
            Long(root, "compressed-clusters"),
            Long(root, "total-clusters"),
            r.Stdout.Trim() + (r.Stderr.Length > 0 ? "\n" + r.Stderr.Trim() : ""));
    }

    /// <summary><c>qemu-img compare</c> (guest-visible content; sizes may differ if the tail is zeros).</summary>
    public static QemuCompareResult Compare(string a, string b, string? formatA = null, string? formatB = null, bool strict = false)
    {
        var args = new List<string> { "compare" };
        if (formatA is not null)
            args.AddRange(["-f", formatA]);
        if (formatB is not null)
            args.AddRange(["-F", formatB]);
        if (strict)
            args.Add("-s");
        args.AddRange([a, b]);
        var r = Run("qemu-img", args);
        return r.ExitCode switch
        {
            0 => new QemuCompareResult(true, r.Stdout.Trim()),
            1 => new QemuCompareResult(false, r.Stdout.Trim()),
            _ => throw Failure("qemu-img", args, r),
        };
    }

    /// <summary><c>qemu-img map --output=json</c>.</summary>
    public static IReadOnlyList<QemuMapEntry> Map(string path, string? format = null)
    {
        var args = new List<string> { "map", "--output=json" };
        if (format is not null)
            args.AddRange(["-f", format]);
        args.Add(path);
        var r = RunChecked("qemu-img", args);
        using var doc = JsonDocument.Parse(r.Stdout);
        var list = new List<QemuMapEntry>();
        foreach (var e in doc.RootElement.EnumerateArray())
        {
            list.Add(new QemuMapEntry(
                e.GetProperty("start").GetUInt64(),
                e.GetProperty("length").GetUInt64(),
                e.GetProperty("depth").GetInt32(),
                e.TryGetProperty("present", out var p) && p.GetBoolean(),
                e.GetProperty("zero").GetBoolean(),
                e.GetProperty("data").GetBoolean(),
                e.TryGetProperty("offset", out var o) ? o.GetUInt64() : null));
        }
        return list;
    }

    /// <summary><c>qemu-img convert [-f SRCFMT] -O FORMAT [-c] [-o OPTIONS] SRC DST</c>.</summary>
    public static void Convert(string source, string destination, string outputFormat, string? sourceFormat = null,
        bool compress = false, int? clusterSize = null, IEnumerable<string>? extraOptions = null)
    {
        var args = new List<string> { "convert", "-q" };
        if (sourceFormat is not null)
            args.AddRange(["-f", sourceFormat]);
        args.AddRange(["-O", outputFormat]);
        if (compress)
            args.Add("-c");
        var options = new List<string>();
        if (clusterSize is { } cs)
            options.Add($"cluster_size={cs}");
        if (extraOptions is not null)
            options.AddRange(extraOptions);
        if (options.Count > 0)
            args.AddRange(["-o", string.Join(',', options)]);
        args.AddRange([source, destination]);
        RunChecked("qemu-img", args);
    }

    /// <summary>Internal snapshots: <c>qemu-img snapshot -c NAME</c> (create) or <c>-a NAME</c> (apply).</summary>
    public static void Snapshot(string path, string action, string name) =>
        RunChecked("qemu-img", ["snapshot", action, name, path]);

    /// <summary>
    /// qemu-io: <c>qemu-io -f FORMAT -c CMD1 -c CMD2 … PATH</c>, e.g. <c>write -P 0xab 0 64k</c>.
    /// Throws when any command fails (qemu-io exits non-zero, e.g. on a pattern mismatch).
    /// </summary>
    public static string Io(string path, string format, params string[] commands)
    {
        var args = new List<string> { "-f", format };
        foreach (var c in commands)
            args.AddRange(["-c", c]);
        args.Add(path);
        var r = RunChecked("qemu-io", args);
        if (r.Stdout.Contains("failed", StringComparison.OrdinalIgnoreCase))
            throw Failure("qemu-io", args, r);
        return r.Stdout;
    }

    /// <summary>Runs qemu-img with arbitrary arguments; throws unless it exits 0.</summary>
    public static ProcessResult Run(params string[] args) => RunChecked("qemu-img", args);

    private static ProcessResult RunChecked(string program, IReadOnlyList<string> args)
    {
        var r = Run(program, args);
        if (r.ExitCode != 0)
            throw Failure(program, args, r);
        return r;
    }

    private static ProcessResult Run(string program, IReadOnlyList<string> args) =>
        TestEnvironment.RunProcess(program, args, Timeout);

    private static InvalidOperationException Failure(string program, IReadOnlyList<string> args, ProcessResult r) =>
        new($"{CommandLine(program, args)} exited with {r.ExitCode}\nstderr: {r.Stderr.Trim()}\nstdout: {r.Stdout.Trim()}");

    private static string CommandLine(string program, IReadOnlyList<string> args) =>
        program + " " + string.Join(' ', args.Select(a => a.Contains(' ') || a.Length == 0 ? $"'{a}'" : a));

    private static long Long(JsonElement e, string name) =>
        e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt64() : 0;

    private static QemuImageInfo ParseInfo(JsonElement e)
    {
        string? Str(string name) => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
        string? compat = null;
        int? refcountBits = null;
        bool? corrupt = null;
        if (e.TryGetProperty("format-specific", out var fs) && fs.TryGetProperty("data", out var data))
        {
            if (data.TryGetProperty("compat", out var c))
                compat = c.GetString();
            if (data.TryGetProperty("refcount-bits", out var rb))
                refcountBits = rb.GetInt32();
            if (data.TryGetProperty("corrupt", out var co))
                corrupt = co.GetBoolean();
        }
        var snapshots = e.TryGetProperty("snapshots", out var snaps) && snaps.ValueKind == JsonValueKind.Array
            ? snaps.GetArrayLength() : 0;
        return new QemuImageInfo(
            Str("filename") ?? "",
            Str("format") ?? "",
            e.GetProperty("virtual-size").GetUInt64(),
            e.TryGetProperty("cluster-size", out var cl) ? cl.GetInt64() : null,
            Str("backing-filename"),
            Str("full-backing-filename"),
            Str("backing-filename-format"),
            compat,
            refcountBits,
            corrupt,
            snapshots,
            e.GetRawText());
    }
}
