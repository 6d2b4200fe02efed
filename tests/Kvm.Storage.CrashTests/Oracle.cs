using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Text.Json;
using Kvm.Tests.Shared;

namespace Kvm.Storage.CrashTests;

/// <summary>What <c>qemu-img check --output=json</c> reported (exit 0 clean, 2 corruptions, 3 leaks only).</summary>
public sealed record CheckReport(int ExitCode, long Corruptions, long Leaks, long CheckErrors, string Output)
{
    public bool NoCorruption => ExitCode is 0 or 3 && Corruptions == 0 && CheckErrors == 0;
    public bool Clean => ExitCode == 0 && Corruptions == 0 && Leaks == 0 && CheckErrors == 0;
    public override string ToString() => $"exit {ExitCode}, corruptions {Corruptions}, leaks {Leaks}, check-errors {CheckErrors}: {Output}";
}

/// <summary>qemu-img / qemu-io (the format's judges) and the CrashWriter process.</summary>
public static class Tools
{
    private static readonly TimeSpan Timeout = TimeSpan.FromMinutes(2);

    /// <summary><c>qemu-img check --output=json [-r MODE] IMAGE</c>; throws when check itself cannot run.</summary>
    public static CheckReport Check(string image, string? repair = null)
    {
        var args = new List<string> { "check", "--output=json", "-f", "qcow2" };
        if (repair is not null)
            args.AddRange(["-r", repair]);
        args.Add(image);
        var r = TestEnvironment.RunProcess("qemu-img", args, Timeout);
        string text = r.Stdout.Trim() + (r.Stderr.Length > 0 ? "\nstderr: " + r.Stderr.Trim() : "");
        try
        {
            using var doc = JsonDocument.Parse(r.Stdout);
            var root = doc.RootElement;
            return new CheckReport(r.ExitCode, Long(root, "corruptions"), Long(root, "leaks"), Long(root, "check-errors"), text);
        }
        catch (JsonException)
        {
            // No report at all (e.g. the header could not be parsed): as bad as a corruption.
            return new CheckReport(r.ExitCode, -1, -1, -1, text);
        }
    }

    /// <summary><c>qemu-img convert -O raw</c>: the guest-visible content as qemu sees it.</summary>
    public static void ConvertToRaw(string image, string raw)
    {
        var r = TestEnvironment.RunProcess("qemu-img", ["convert", "-q", "-f", "qcow2", "-O", "raw", image, raw], Timeout);
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"qemu-img convert -f qcow2 -O raw {image} {raw} exited with {r.ExitCode}: {r.Stderr.Trim()}");
    }

    /// <summary>qemu-io reads [offset, offset+length) and checks every byte is <paramref name="pattern"/>; null when it does.</summary>
    public static string? QemuIoVerifyPattern(string image, ulong offset, ulong length, byte pattern)
    {
        string command = string.Create(CultureInfo.InvariantCulture, $"read -P 0x{pattern:x2} {offset} {length}");
        var r = TestEnvironment.RunProcess("qemu-io", ["-r", "-f", "qcow2", "-c", command, image], Timeout);
        if (r.ExitCode != 0 || r.Stdout.Contains("fail", StringComparison.OrdinalIgnoreCase)
            || r.Stderr.Contains("fail", StringComparison.OrdinalIgnoreCase))
            return $"qemu-io -r -f qcow2 -c '{command}' {image} (exit {r.ExitCode}): {r.Stdout.Trim()} {r.Stderr.Trim()}";
        return null;
    }

    private static string? Usable(string dir)
    {
        string dll = Path.GetFullPath(Path.Combine(dir, "CrashWriter.dll"));
        return File.Exists(dll) && File.Exists(Path.ChangeExtension(dll, ".runtimeconfig.json")) ? dll : null;
    }

    private static long Long(JsonElement e, string name) =>
        e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt64() : 0;

    /// <summary>The dotnet host to run CrashWriter.dll with.</summary>
    public static string DotnetHost()
    {
        if (Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host))
            return host;
        if (Environment.ProcessPath is { } self && Path.GetFileNameWithoutExtension(self) == "dotnet")
            return self;
        return TestEnvironment.FindOnPath("dotnet") ?? "dotnet";
    }

    /// <summary>
    /// CrashWriter.dll: next to this assembly, else in the writer project's bin/CONFIGURATION/TFM
    /// folder (recorded at build time, then rebuilt from the repository root as a fallback).
    /// </summary>
    public static string FindWriter()
    {
        var assembly = typeof(Tools).Assembly;
        var candidates = new List<string> { AppContext.BaseDirectory };
        foreach (var m in assembly.GetCustomAttributes<AssemblyMetadataAttribute>())
        {
            if (m.Key == "CrashWriterDirectory" && m.Value is { Length: > 0 })
                candidates.Add(m.Value);
        }
        string configuration = assembly.GetCustomAttribute<AssemblyConfigurationAttribute>()?.Configuration ?? "Release";
        foreach (var dir in candidates)
        {
            if (Usable(dir) is { } found)
                return found;
        }
        try
        {
            string fromRoot = Path.Combine(TestEnvironment.RepoRoot, "tests", "Kvm.Storage.CrashWriter", "bin", configuration, "net10.0");
            candidates.Add(fromRoot);
            if (Usable(fromRoot) is { } found)
                return found;
        }
        catch (InvalidOperationException)
        {
            // not inside the repository
        }
        throw new FileNotFoundException(
            $"CrashWriter.dll not found in {string.Join(", ", candidates)}; build tests/Kvm.Storage.CrashWriter (-c {configuration}) first");
    }
}

/// <summary>How a writer run ended.</summary>
/// <param name="RunTime">From the start of the process to its end.</param>
/// <param name="WriteTime">From "opened" to the end of the process: the time spent writing.</param>
public sealed record WriterRun(IReadOnlyList<string> Lines, string Stderr, int ExitCode, bool Opened, bool Done, int LastFlushed,
    TimeSpan RunTime, TimeSpan WriteTime, bool KilledByUs)
{
    /// <summary>Killed after it opened the image and before it finished.</summary>
    public bool KilledMidRun => KilledByUs && Opened && !Done;
}

/// <summary>When to kill a writer: <paramref name="Delay"/> after it printed "flushed
/// <paramref name="AfterFlush"/>", or after "opened" when AfterFlush is 0, or after "closing" (it
/// is closing the image) when AfterFlush is negative. A zero delay kills as soon as the line is
/// read.</summary>
public sealed record KillAt(int AfterFlush, TimeSpan Delay)
{
    public override string ToString() =>
        (Delay == TimeSpan.Zero ? "right " : FormattableString.Invariant($"{Delay.TotalMilliseconds:0.0} ms "))
        + (AfterFlush == 0 ? "after 'opened'" : AfterFlush < 0 ? "after 'closing'" : FormattableString.Invariant($"after 'flushed {AfterFlush}'"));
}

/// <summary>
/// Runs <c>dotnet CrashWriter.dll IMAGE SEED SLOTS SLOT_SIZE</c> and kills it with SIGKILL at the
/// moment <see cref="KillAt"/> describes (or lets it finish when there is none).
/// </summary>
public static class Writer
{
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(60);
    private static readonly TimeSpan RunTimeout = TimeSpan.FromSeconds(120);

    public static WriterRun Run(string writerDll, string image, ulong seed, int slots, int slotSize, KillAt? kill)
    {
        var psi = new ProcessStartInfo(Tools.DotnetHost())
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add(writerDll);
        psi.ArgumentList.Add(image);
        psi.ArgumentList.Add(seed.ToString(CultureInfo.InvariantCulture));
        psi.ArgumentList.Add(slots.ToString(CultureInfo.InvariantCulture));
        psi.ArgumentList.Add(slotSize.ToString(CultureInfo.InvariantCulture));
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";

        var lines = new List<string>();
        using var opened = new ManualResetEventSlim();
        using var triggered = new ManualResetEventSlim();
        bool killed = false;
        var clock = Stopwatch.StartNew();
        TimeSpan openedAt = TimeSpan.Zero, triggeredAt = TimeSpan.Zero;
        string trigger = kill is null ? "" : kill.AfterFlush == 0 ? "opened" : kill.AfterFlush < 0 ? "closing" : string.Create(CultureInfo.InvariantCulture, $"flushed {kill.AfterFlush}");
        bool killOnRead = kill is not null && kill.Delay == TimeSpan.Zero;
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start the CrashWriter process");

        void Kill()
        {
            lock (lines)
            {
                if (killed)
                    return;
                killed = true;
            }
            try
            {
                p.Kill(); // SIGKILL, this process only
            }
            catch (InvalidOperationException)
            {
                // already gone
            }
        }

        var stderr = p.StandardError.ReadToEndAsync();
        var reader = new Thread(() =>
        {
            string? line;
            while ((line = p.StandardOutput.ReadLine()) is not null)
            {
                var now = clock.Elapsed;
                if (line == trigger)
                {
                    if (killOnRead)
                        Kill();
                    triggeredAt = now;
                }
                lock (lines)
                    lines.Add(line);
                if (line == "opened")
                {
                    openedAt = now;
                    opened.Set();
                }
                if (line == trigger)
                    triggered.Set();
            }
            opened.Set(); // EOF: wake the waiters whatever happened
            triggered.Set();
        }) { IsBackground = true, Name = "CrashWriter stdout" };
        reader.Start();

        try
        {
            if (!opened.Wait(StartTimeout))
                throw new TimeoutException($"CrashWriter did not open {image} within {StartTimeout}");
            if (kill is not null && !killOnRead)
            {
                if (!triggered.Wait(RunTimeout))
                    throw new TimeoutException($"CrashWriter on {image} did not print '{trigger}' within {RunTimeout}");
                if (triggeredAt != TimeSpan.Zero)
                {
                    var until = triggeredAt + kill.Delay;
                    var wait = until - clock.Elapsed - TimeSpan.FromMilliseconds(1);
                    if (wait <= TimeSpan.Zero || !p.WaitForExit(wait))
                    {
                        while (clock.Elapsed < until)
                            Thread.SpinWait(20);
                        Kill();
                    }
                }
            }
            if (!p.WaitForExit(RunTimeout))
            {
                Kill();
                throw new TimeoutException($"CrashWriter on {image} did not finish within {RunTimeout}");
            }
        }
        finally
        {
            if (!p.HasExited)
                Kill();
            p.WaitForExit();
            reader.Join();
        }
        var runTime = clock.Elapsed;

        string[] all;
        lock (lines)
            all = [.. lines];
        int lastFlushed = 0;
        foreach (var l in all)
        {
            if (l.StartsWith("flushed ", StringComparison.Ordinal))
                lastFlushed = int.Parse(l.AsSpan(8), NumberStyles.None, CultureInfo.InvariantCulture);
        }
        return new WriterRun(all, stderr.Result, p.ExitCode, all.Contains("opened"), all.Contains("done"), lastFlushed, runTime,
            openedAt == TimeSpan.Zero ? TimeSpan.Zero : runTime - openedAt, killed);
    }
}
