using Kvm.Interop.Native;
using Xunit;

namespace Kvm.Tests.Shared;

/// <summary>
/// The Debian package kvm as the tests build, install and remove it: build/kvm_VERSION_amd64.deb
/// from <c>make deb</c>, and the guards that keep a test from touching a kvm package or files it
/// did not install itself. The machines that run the tests are disposable (CI's included; the
/// nested KVM host's root is an overlay that ends with it), but a developer's may not be.
/// </summary>
public static class DebianPackage
{
    public const string Name = "kvm";

    /// <summary>
    /// Left while a test's own package is installed: a later run may purge it. Not in /run: the
    /// nested KVM host has its own /run but installs into the host's root file system.
    /// </summary>
    public const string Marker = "/var/tmp/kvm-package-test";

    public static readonly TimeSpan DpkgTimeout = TimeSpan.FromMinutes(5);

    public static readonly string Version = File.ReadAllText(Path.Combine(TestEnvironment.RepoRoot, "VERSION")).Trim();

    public static string DebPath => Path.Combine(TestEnvironment.BuildDir, $"kvm_{Version}_amd64.deb");

    private static readonly Lazy<(string? Deb, string? Missing)> Built = new(Build);

    /// <summary>The package's path, built once per test process; skips (fails under CI) when it cannot be built here, naming what is missing.</summary>
    public static string Require()
    {
        var (deb, missing) = Built.Value;
        TestEnvironment.SkipIf(missing);
        return deb!;
    }

    /// <summary>Skips unless this process is root (dpkg --install, --remove, --purge).</summary>
    public static void RequireRoot() =>
        TestEnvironment.SkipIf(Libc.GetEuid() == 0 ? null : "installing a Debian package needs root (the test runs dpkg --install, --remove, --purge)");

    /// <summary>
    /// build/kvm_VERSION_amd64.deb as <c>make deb</c> makes it. The programs in build/lib are taken
    /// as they are (<c>-o</c>): other test assemblies may be running them, and republishing would
    /// delete them under those tests (make builds them before any test). A package newer than
    /// everything it is made of is used as it is: the nested KVM host's tests use the one the
    /// host's tests built (compressing it under QEMU's TCG takes minutes).
    /// </summary>
    private static (string? Deb, string? Missing) Build()
    {
        var lib = Path.Combine(TestEnvironment.BuildDir, "lib");
        foreach (var p in new[] { "kvmd", "kvm-vmm", "vmctl", "libkvmshim.so" })
        {
            if (!File.Exists(Path.Combine(lib, p)))
                return (null, $"{Path.Combine(lib, p)} is missing (run 'make' first)");
        }
        if (IsFresh(lib))
            return (DebPath, null);
        foreach (var (program, package) in new[] { ("make", "make"), ("dpkg-deb", "dpkg"), ("dpkg-shlibdeps", "dpkg-dev"), ("strip", "binutils"), ("help2man", "help2man") })
        {
            if (TestEnvironment.ProgramUnavailable(program, package) is { } missing)
                return (null, missing);
        }
        var r = TestEnvironment.RunProcess("make",
            ["-C", TestEnvironment.RepoRoot, "--no-print-directory", "-o", Path.Combine(lib, ".published"), "deb"],
            TimeSpan.FromMinutes(10));
        Assert.True(r.ExitCode == 0, $"make deb exited with {r.ExitCode}:\n{r.Stdout}{r.Stderr}");
        Assert.True(File.Exists(DebPath), $"make deb did not make {DebPath}:\n{r.Stdout}");
        return (DebPath, null);
    }

    /// <summary>Whether the package exists and is newer than the programs, the packaging files, the unit and VERSION.</summary>
    private static bool IsFresh(string lib)
    {
        if (!File.Exists(DebPath))
            return false;
        var built = File.GetLastWriteTimeUtc(DebPath);
        var inputs = new[] { "kvmd", "kvm-vmm", "vmctl", "libkvmshim.so" }.Select(p => Path.Combine(lib, p))
            .Concat(Directory.EnumerateFiles(Path.Combine(TestEnvironment.RepoRoot, "packaging")))
            .Concat(Directory.EnumerateFiles(Path.Combine(TestEnvironment.RepoRoot, "systemd")))
            .Append(Path.Combine(TestEnvironment.RepoRoot, "VERSION"));
        return inputs.All(f => File.GetLastWriteTimeUtc(f) < built);
    }

    /// <summary>The package's dpkg status abbreviation ("ii ", "rc "), or null when dpkg does not know it as installed or configured.</summary>
    public static string? Status()
    {
        var r = TestEnvironment.RunProcess("dpkg-query", ["--show", "--showformat=${db:Status-Abbrev}", Name], TimeSpan.FromSeconds(30));
        return r.ExitCode != 0 || r.Stdout.StartsWith("un", StringComparison.Ordinal) || r.Stdout.Length == 0 ? null : r.Stdout;
    }

    /// <summary>The package's paths (files, links and directories) as dpkg-deb lists them.</summary>
    public static List<string> Files(string deb) =>
        Lines(Run("dpkg-deb", ["--contents", deb]).Stdout)
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[5].TrimStart('.').TrimEnd('/'))
            .Where(p => p.Length > 0)
            .ToList();

    /// <summary>Directories other packages have too (/usr/bin, /lib/systemd/system, ...): dpkg leaves them.</summary>
    public static bool IsSharedDirectory(string path) => path is not ("/usr/lib/kvm" or "/var/lib/kvm" or "/usr/share/doc/kvm");

    /// <summary>
    /// Installs the package (dpkg --install) after refusing (skipping, or failing under CI) where
    /// that would touch what is not the test's own: an installed kvm package, or a file of the
    /// package already on disk. A kvm package a previous run left (its marker is in /run) is
    /// purged first. Pair with <see cref="Purge"/> in a finally.
    /// </summary>
    public static void Install(string deb, List<string> files)
    {
        if (Status() is { } status)
        {
            if (!File.Exists(Marker))
            {
                TestEnvironment.SkipIf($"a package named '{Name}' is on this machine (dpkg status '{status.Trim()}') and no test installed it: " +
                                       "the test would replace and purge it (remove it with 'dpkg --purge kvm' to run this test)");
            }
            Run("dpkg", ["--purge", Name], DpkgTimeout);
        }
        var existing = files.Where(f => File.Exists(f) || Directory.Exists(f) && !IsSharedDirectory(f)).ToList();
        if (existing.Count > 0)
        {
            TestEnvironment.SkipIf($"{string.Join(", ", existing)} already exist here and belong to no kvm package: " +
                                   "installing and purging the package would replace or delete them");
        }
        File.WriteAllText(Marker, $"installed by a test (pid {Environment.ProcessId}); the next run may purge it\n");
        Run("dpkg", ["--install", deb], DpkgTimeout);
    }

    /// <summary>Purges the package if dpkg knows it, whatever failed before; removes the marker once it is gone.</summary>
    public static void Purge()
    {
        if (Status() is not null)
            TestEnvironment.RunProcess("dpkg", ["--purge", Name], DpkgTimeout);
        if (Status() is null)
            File.Delete(Marker);
    }

    /// <summary>Runs a program, asserting that it exits with 0.</summary>
    public static ProcessResult Run(string file, string[] args, TimeSpan? timeout = null)
    {
        var r = TestEnvironment.RunProcess(file, args, timeout ?? TimeSpan.FromMinutes(1));
        Assert.True(r.ExitCode == 0, $"{file} {string.Join(' ', args)} exited with {r.ExitCode}:\n{r.Stdout}{r.Stderr}");
        return r;
    }

    public static IEnumerable<string> Lines(string s) => s.Split('\n', StringSplitOptions.RemoveEmptyEntries);
}
