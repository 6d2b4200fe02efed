using Kvm.Interop.Native;
using Kvm.Tests.Shared;

namespace Kvm.Cluster.Tests;

/// <summary>
/// The Debian package: <c>make deb</c> from the programs in build/lib, lintian, and a real
/// install, use and removal on this machine (as root; the machines that run the tests are
/// disposable, CI's included). The package is removed and purged even when a check fails, and the
/// test refuses to start where a kvm package, or any file it would install, is already there and
/// not its own.
/// </summary>
public sealed class PackageTests : IClassFixture<PackageTests.BuiltPackage>
{
    private const string Package = "kvm";

    /// <summary>Left in /run while the test's own package is installed: a later run may purge it.</summary>
    private const string Marker = "/run/kvm-package-test";

    private static readonly TimeSpan DpkgTimeout = TimeSpan.FromMinutes(5);

    private readonly BuiltPackage _deb;

    public PackageTests(BuiltPackage deb) => _deb = deb;

    [SkippableFact]
    public void Lintian_reports_no_errors_and_no_warnings()
    {
        var deb = _deb.Require();
        TestEnvironment.RequireProgram("lintian", "lintian");

        // -I shows the informational tags too, for the log; only E and W lines fail the test. Each
        // overridden tag has its reason in packaging/lintian-overrides.
        var r = TestEnvironment.RunProcess("lintian", ["-I", "--tag-display-limit", "0", deb], TimeSpan.FromMinutes(5));
        var complaints = Lines(r.Stdout).Where(l => l.StartsWith("E: ", StringComparison.Ordinal) || l.StartsWith("W: ", StringComparison.Ordinal)).ToList();
        Assert.True(complaints.Count == 0 && r.ExitCode == 0,
            $"lintian {deb} (exit {r.ExitCode}):\n{r.Stdout}{r.Stderr}");
    }

    [SkippableFact]
    public void The_package_holds_the_programs_in_usr_lib_kvm_with_links_on_PATH()
    {
        var deb = _deb.Require();
        var r = Run("dpkg-deb", ["--contents", deb]);
        // "-rwxr-xr-x root/root 1147208 2026-12-02 13:39 ./usr/lib/kvm/kvmd" (symlinks: "... -> target")
        var entries = Lines(r.Stdout).Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .ToDictionary(f => f[5].TrimStart('.'), f => (Mode: f[0], Owner: f[1], Target: f.Length > 7 ? f[7] : null));

        Assert.All(entries.Values, e => Assert.Equal("root/root", e.Owner));
        foreach (var p in new[] { "kvmd", "kvm-vmm", "vmctl" })
            Assert.Equal("-rwxr-xr-x", entries[$"/usr/lib/kvm/{p}"].Mode);
        Assert.Equal("-rw-r--r--", entries["/usr/lib/kvm/libkvmshim.so"].Mode);
        Assert.Equal("../lib/kvm/kvmd", entries["/usr/sbin/kvmd"].Target);
        Assert.Equal("../lib/kvm/vmctl", entries["/usr/bin/vmctl"].Target);
        Assert.Equal("-rw-r--r--", entries["/lib/systemd/system/kvmd.service"].Mode);
        Assert.Contains("/usr/lib/tmpfiles.d/kvm.conf", entries.Keys);
        Assert.Contains("/etc/default/kvmd", entries.Keys);
        Assert.Contains("/var/lib/kvm/", entries.Keys);
        Assert.DoesNotContain(entries.Keys, k => k.EndsWith(".dbg", StringComparison.Ordinal) || k.StartsWith("/run", StringComparison.Ordinal));

        var control = Run("dpkg-deb", ["--field", deb, "Package", "Version", "Architecture", "Depends"]).Stdout;
        Assert.Contains("Package: kvm\n", control);
        Assert.Contains($"Version: {BuiltPackage.Version}\n", control);
        Assert.Contains("Architecture: amd64\n", control);
        Assert.Matches(@"Depends: .*libc6 \(>= [0-9.]+\)", control);
    }

    [SkippableFact]
    public void The_package_installs_runs_and_is_removed_and_purged_without_leaving_anything()
    {
        var deb = _deb.Require();
        RequireRoot();
        TestEnvironment.RequireProgram("systemd-analyze", "systemd");
        var files = PackageFiles(deb);
        RefuseToCollide(files);

        var before = Snapshot();
        File.WriteAllText(Marker, $"installed by {nameof(PackageTests)} (pid {Environment.ProcessId}); the next run may purge it\n");
        try
        {
            Run("dpkg", ["--install", deb], DpkgTimeout);
            Assert.Equal("ii ", Status());

            // The unit as installed: systemd-analyze also checks that ExecStart= exists and is
            // executable, and that the man page in Documentation= is there.
            var verify = TestEnvironment.RunProcess("systemd-analyze", ["verify", "/lib/systemd/system/kvmd.service"], TimeSpan.FromMinutes(1));
            Assert.True(verify.ExitCode == 0 && (verify.Stdout + verify.Stderr).Trim().Length == 0,
                $"systemd-analyze verify kvmd.service (exit {verify.ExitCode}):\n{verify.Stdout}{verify.Stderr}");

            Assert.Equal(0, TestEnvironment.RunProcess("getent", ["group", "kvm"], TimeSpan.FromSeconds(30)).ExitCode);
            Assert.True(Directory.Exists("/var/lib/kvm"), "/var/lib/kvm is missing after installation");
            Assert.True(Directory.Exists("/run/kvm"), "/run/kvm (tmpfiles.d) is missing after installation");

            // The programs run from the installed files, through the links on PATH: each finds its
            // real path and what lies beside it.
            Assert.Contains("Usage: kvmd", Run("/usr/sbin/kvmd", ["--help"]).Stdout);
            Assert.Contains($"kvmd {BuiltPackage.Version}", Run("/usr/sbin/kvmd", ["--version"]).Stdout);
            Assert.Contains("vmctl", Run("/usr/bin/vmctl", ["--help"]).Stdout);
            Assert.Contains(BuiltPackage.Version, Run("/usr/bin/vmctl", ["--version"]).Stdout);
            Assert.Contains("Usage: kvm-vmm", Run("/usr/lib/kvm/kvm-vmm", ["--help"]).Stdout);

            Run("dpkg", ["--remove", Package], DpkgTimeout);
            // Removed: the package's files are gone; its conffile (/etc/default/kvmd) stays until
            // the purge, as dpkg keeps configuration.
            Assert.Equal("rc ", Status());
            var left = files.Where(f => f != "/etc/default/kvmd" && (File.Exists(f) || Directory.Exists(f) && !IsSharedDirectory(f))).ToList();
            Assert.True(left.Count == 0, $"left after dpkg --remove: {string.Join(", ", left)}");

            Run("dpkg", ["--purge", Package], DpkgTimeout);
            Assert.Null(Status());
            // Purged: the file system is as before the installation, but for the kvm group when the
            // package made it (system groups stay: files elsewhere may belong to them).
            var after = Snapshot();
            var added = after.Except(before).ToList();
            var removed = before.Except(after).ToList();
            Assert.True(added.Count == 0 && removed.Count == 0,
                $"after dpkg --purge, added: [{string.Join(", ", added)}]; removed: [{string.Join(", ", removed)}]");
        }
        finally
        {
            // Whatever failed above, the package goes.
            if (Status() is not null)
                TestEnvironment.RunProcess("dpkg", ["--purge", Package], DpkgTimeout);
            if (Status() is null)
                File.Delete(Marker);
        }
    }

    /// <summary>The package's paths (files, links and directories) as dpkg-deb lists them.</summary>
    private static List<string> PackageFiles(string deb) =>
        Lines(Run("dpkg-deb", ["--contents", deb]).Stdout)
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[5].TrimStart('.').TrimEnd('/'))
            .Where(p => p.Length > 0)
            .ToList();

    /// <summary>Directories other packages have too (/usr/bin, /lib/systemd/system, ...): dpkg leaves them.</summary>
    private static bool IsSharedDirectory(string path) => path is not ("/usr/lib/kvm" or "/var/lib/kvm" or "/usr/share/doc/kvm");

    /// <summary>
    /// Refuses (skips, or fails under CI) where installing would touch what is not the test's own:
    /// an installed kvm package, or a file of the package already on disk. A kvm package a previous
    /// run of this test left (its marker is in /run) is purged first.
    /// </summary>
    private static void RefuseToCollide(List<string> files)
    {
        if (Status() is { } status)
        {
            if (!File.Exists(Marker))
            {
                TestEnvironment.SkipIf($"a package named '{Package}' is on this machine (dpkg status '{status.Trim()}') and this test did not install it: " +
                                       "it would replace and purge it (remove it with 'dpkg --purge kvm' to run this test)");
            }
            Run("dpkg", ["--purge", Package], DpkgTimeout);
        }
        var existing = files.Where(f => File.Exists(f) || Directory.Exists(f) && !IsSharedDirectory(f)).ToList();
        if (existing.Count > 0)
        {
            TestEnvironment.SkipIf($"{string.Join(", ", existing)} already exist here and belong to no kvm package: " +
                                   "installing and purging the package would replace or delete them");
        }
    }

    private static void RequireRoot() =>
        TestEnvironment.SkipIf(Libc.GetEuid() == 0 ? null : "installing a Debian package needs root (this test runs dpkg --install, --remove, --purge)");

    /// <summary>The package's dpkg status abbreviation ("ii ", "rc "), or null when dpkg does not know it as installed or configured.</summary>
    private static string? Status()
    {
        var r = TestEnvironment.RunProcess("dpkg-query", ["--show", "--showformat=${db:Status-Abbrev}", Package], TimeSpan.FromSeconds(30));
        return r.ExitCode != 0 || r.Stdout.StartsWith("un", StringComparison.Ordinal) || r.Stdout.Length == 0 ? null : r.Stdout;
    }

    /// <summary>
    /// Every path under the trees a package can touch: /etc, /usr (with /lib, /bin, /sbin on
    /// merged-/usr systems), /var/lib, and /run/kvm. Not dpkg's own database, nor the backups
    /// addgroup leaves of /etc/group and /etc/gshadow (the kvm group stays after a purge).
    /// </summary>
    private static HashSet<string> Snapshot()
    {
        var paths = new HashSet<string>(StringComparer.Ordinal);
        foreach (var root in new[] { "/etc", "/usr", "/var/lib", "/run/kvm" })
            Walk(root, paths);
        foreach (var p in new[] { "/lib", "/bin", "/sbin", "/lib64" })
        {
            if (Directory.Exists(p) && new DirectoryInfo(p).LinkTarget is null)
                Walk(p, paths);
        }
        paths.RemoveWhere(p => p.StartsWith("/var/lib/dpkg/", StringComparison.Ordinal)
                               || p is "/etc/group-" or "/etc/gshadow-" or "/etc/passwd-" or "/etc/shadow-");
        return paths;
    }

    /// <summary>Adds <paramref name="root"/> and everything below it, listing symbolic links without following them.</summary>
    private static void Walk(string root, HashSet<string> paths)
    {
        if (!Directory.Exists(root))
            return;
        paths.Add(root);
        var options = new EnumerationOptions { IgnoreInaccessible = true, AttributesToSkip = 0 };
        var pending = new Stack<string>([root]);
        while (pending.TryPop(out var dir))
        {
            foreach (var entry in new DirectoryInfo(dir).EnumerateFileSystemInfos("*", options))
            {
                paths.Add(entry.FullName);
                if (entry is DirectoryInfo && entry.LinkTarget is null)
                    pending.Push(entry.FullName);
            }
        }
    }

    private static ProcessResult Run(string file, string[] args, TimeSpan? timeout = null)
    {
        var r = TestEnvironment.RunProcess(file, args, timeout ?? TimeSpan.FromMinutes(1));
        Assert.True(r.ExitCode == 0, $"{file} {string.Join(' ', args)} exited with {r.ExitCode}:\n{r.Stdout}{r.Stderr}");
        return r;
    }

    private static IEnumerable<string> Lines(string s) => s.Split('\n', StringSplitOptions.RemoveEmptyEntries);

    /// <summary>
    /// build/kvm_VERSION_amd64.deb as <c>make deb</c> makes it, once for the class. The programs
    /// in build/lib are taken as they are (<c>-o</c>): other test assemblies may be running them,
    /// and republishing would delete them under those tests (make builds them before any test).
    /// </summary>
    public sealed class BuiltPackage
    {
        public static readonly string Version = File.ReadAllText(Path.Combine(TestEnvironment.RepoRoot, "VERSION")).Trim();

        private readonly Lazy<(string? Deb, string? Missing)> _built = new(Build);

        /// <summary>The package's path; skips (fails under CI) when it cannot be built here, naming what is missing.</summary>
        public string Require()
        {
            var (deb, missing) = _built.Value;
            TestEnvironment.SkipIf(missing);
            return deb!;
        }

        private static (string? Deb, string? Missing) Build()
        {
            var lib = Path.Combine(TestEnvironment.RepoRoot, "build", "lib");
            foreach (var p in new[] { "kvmd", "kvm-vmm", "vmctl", "libkvmshim.so" })
            {
                if (!File.Exists(Path.Combine(lib, p)))
                    return (null, $"{Path.Combine(lib, p)} is missing (run 'make' first)");
            }
            foreach (var (program, package) in new[] { ("make", "make"), ("dpkg-deb", "dpkg"), ("dpkg-shlibdeps", "dpkg-dev"), ("strip", "binutils"), ("help2man", "help2man") })
            {
                if (TestEnvironment.ProgramUnavailable(program, package) is { } missing)
                    return (null, missing);
            }
            var r = TestEnvironment.RunProcess("make",
                ["-C", TestEnvironment.RepoRoot, "--no-print-directory", "-o", Path.Combine(lib, ".published"), "deb"],
                TimeSpan.FromMinutes(10));
            Assert.True(r.ExitCode == 0, $"make deb exited with {r.ExitCode}:\n{r.Stdout}{r.Stderr}");
            var deb = Path.Combine(TestEnvironment.RepoRoot, "build", $"kvm_{Version}_amd64.deb");
            Assert.True(File.Exists(deb), $"make deb did not make {deb}:\n{r.Stdout}");
            return (deb, null);
        }
    }
}
