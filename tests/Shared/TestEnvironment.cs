using System.Diagnostics;

namespace Kvm.Tests.Shared;

/// <summary>
/// The trait that says what a test class needs from the machine. A class whose tests run VMs
/// carries <c>[Trait(Requires.Trait, Requires.Kvm)]</c>: tests/run-tests.sh runs those inside the
/// nested KVM host (tests/kvm-host) where this machine has no usable /dev/kvm, and the rest here.
/// </summary>
public static class Requires
{
    public const string Trait = "Requires";
    public const string Kvm = "kvm";
}

/// <summary>Where the build products are, and what this host offers (for skip messages).</summary>
public static class TestEnvironment
{
    private static readonly Lazy<string> Root = new(FindRepoRoot);

    /// <summary>The repository root (the folder holding Kvm.sln).</summary>
    public static string RepoRoot => Root.Value;

    /// <summary>build/ (override with KVM_BUILD_DIR).</summary>
    public static string BuildDir => Environment.GetEnvironmentVariable("KVM_BUILD_DIR") ?? Path.Combine(RepoRoot, "build");

    public static string GuestKit => Path.Combine(BuildDir, "guest", "guestkit.elf");
    public static string Vmctl => Path.Combine(BuildDir, "bin", "vmctl");
    public static string KvmVmm => Path.Combine(BuildDir, "bin", "kvm-vmm");
    public static string Kvmd => Path.Combine(BuildDir, "bin", "kvmd");

    /// <summary>
    /// A second copy of the kvm-vmm binary (with the shim it loads from beside it) in
    /// <paramref name="directory"/>, created if missing: a "newer" kvm-vmm to upgrade a VM to.
    /// Returns the copy's path.
    /// </summary>
    public static string CopyKvmVmm(string directory)
    {
        Directory.CreateDirectory(directory);
        string real = Path.GetFullPath(new FileInfo(KvmVmm).ResolveLinkTarget(true)?.FullName ?? KvmVmm);
        string copy = Path.Combine(directory, "kvm-vmm");
        File.Copy(real, copy);
        File.Copy(Path.Combine(Path.GetDirectoryName(real)!, "libkvmshim.so"), Path.Combine(directory, "libkvmshim.so"));
        File.SetUnixFileMode(copy, File.GetUnixFileMode(real));
        return copy;
    }

    /// <summary>Skips the calling test, naming what is missing, unless /dev/kvm is usable.</summary>
    public static void RequireKvm() => SkipIf(KvmUnavailable());

    /// <summary>Skips unless build/guest/guestkit.elf exists.</summary>
    public static void RequireGuestKit() => SkipIf(GuestKitUnavailable());

    /// <summary>Skips unless <paramref name="name"/> is on PATH.</summary>
    public static void RequireProgram(string name, string package) => SkipIf(ProgramUnavailable(name, package));

    /// <summary>True under CI (CI=true), where a test may not skip for lack of what it needs.</summary>
    public static bool InCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    /// <summary>
    /// Skips the calling test with <paramref name="why"/> on a user's machine; fails it under CI,
    /// which must never pass over a test that did not run.
    /// </summary>
    public static void SkipIf(string? why)
    {
        if (why is null)
            return;
        if (InCi)
            Xunit.Assert.Fail($"{why} (CI=true: a test that cannot run here is a failure, not a skip)");
        throw new Xunit.SkipException(why);
    }

    /// <summary>Null when /dev/kvm can be opened read-write, else why not.</summary>
    public static string? KvmUnavailable()
    {
        if (!File.Exists("/dev/kvm"))
            return "/dev/kvm is missing (this host has no KVM; 'make test' runs the KVM tests in a nested KVM host)";
        try
        {
            using var f = new FileStream("/dev/kvm", FileMode.Open, FileAccess.ReadWrite);
            return null;
        }
        catch (UnauthorizedAccessException)
        {
            return "/dev/kvm is not accessible to this user (needs root or the kvm group)";
        }
        catch (IOException e)
        {
            return $"/dev/kvm cannot be opened: {e.Message}";
        }
    }

    /// <summary>Null when the guest kit has been built, else why not.</summary>
    public static string? GuestKitUnavailable() =>
        File.Exists(GuestKit) ? null : $"{GuestKit} is missing (run 'make' first)";

    /// <summary>Null when a program is on PATH, else a message naming it.</summary>
    public static string? ProgramUnavailable(string name, string package) =>
        FindOnPath(name) is null ? $"{name} is not installed (Debian package {package})" : null;

    public static string? FindOnPath(string name)
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            var p = Path.Combine(dir, name);
            if (File.Exists(p))
                return p;
        }
        return null;
    }

    /// <summary>Runs a program to completion (with a timeout) and returns status, stdout and stderr.</summary>
    public static ProcessResult RunProcess(string file, IEnumerable<string> args, TimeSpan timeout, string? stdin = null)
    {
        using var p = StartRedirected(file, args);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (stdin is not null)
            p.StandardInput.Write(stdin);
        p.StandardInput.Close();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            throw new TimeoutException($"{file} {string.Join(' ', args)} did not finish within {timeout}");
        }
        p.WaitForExit();
        return new ProcessResult(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Starts a program with stdin, stdout and stderr redirected, and extra environment variables.</summary>
    public static Process StartRedirected(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string?>? environment = null)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        foreach (var (k, v) in environment ?? new Dictionary<string, string?>())
            psi.Environment[k] = v;
        return Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {file}");
    }

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Kvm.sln")))
                return dir.FullName;
        }
        throw new InvalidOperationException($"Kvm.sln not found above {AppContext.BaseDirectory}");
    }
}

public sealed record ProcessResult(int ExitCode, string Stdout, string Stderr);
