using Kvm.Tests.Shared;

namespace Kvm.Cluster.Tests;

/// <summary>
/// The Debian package: <c>make deb</c> from the programs in build/lib, lintian, and a real
/// install, use and removal on this machine (as root; the machines that run the tests are
/// disposable, CI's included). The package is removed and purged even when a check fails, and the
/// test refuses to start where a kvm package, or any file it would install, is already there and
/// not its own.
/// </summary>
public sealed class PackageTests
{
    [SkippableFact]
    public void Lintian_reports_no_errors_and_no_warnings()
    {
        var deb = DebianPackage.Require();
        TestEnvironment.RequireProgram("lintian", "lintian");

        // -I shows the informational tags too, for the log; only E and W lines fail the test. Each
        // overridden tag has its reason in packaging/lintian-overrides.
        var r = TestEnvironment.RunProcess("lintian", ["-I", "--tag-display-limit", "0", deb], TimeSpan.FromMinutes(5));
        var complaints = DebianPackage.Lines(r.Stdout).Where(l => l.StartsWith("E: ", StringComparison.Ordinal) || l.StartsWith("W: ", StringComparison.Ordinal)).ToList();
        Assert.True(complaints.Count == 0 && r.ExitCode == 0,
            $"lintian {deb} (exit {r.ExitCode}):\n{r.Stdout}{r.Stderr}");
    }

    [SkippableFact]
    public void The_package_holds_the_programs_in_usr_lib_kvm_with_links_on_PATH()
    {
        var deb = DebianPackage.Require();
        var r = DebianPackage.Run("dpkg-deb", ["--contents", deb]);
        // "-rwxr-xr-x root/root 1147208 2026-12-02 13:39 ./usr/lib/kvm/kvmd" (symlinks: "... -> target")
        var entries = DebianPackage.Lines(r.Stdout).Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries))
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

        var control = DebianPackage.Run("dpkg-deb", ["--field", deb, "Package", "Version", "Architecture", "Depends"]).Stdout;
        Assert.Contains("Package: kvm\n", control);
        Assert.Contains($"Version: {DebianPackage.Version}\n", control);
        Assert.Contains("Architecture: amd64\n", control);
        Assert.Matches(@"Depends: .*libc6 \(>= [0-9.]+\)", control);
    }

    [SkippableFact]
    public void The_package_installs_runs_and_is_removed_and_purged_without_leaving_anything()
    {
        var deb = DebianPackage.Require();
        DebianPackage.RequireRoot();
        TestEnvironment.RequireProgram("systemd-analyze", "systemd");
        var files = DebianPackage.Files(deb);

        var before = Snapshot();
        try
        {
            DebianPackage.Install(deb, files);
            Assert.Equal("ii ", DebianPackage.Status());

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
            Assert.Contains("Usage: kvmd", DebianPackage.Run("/usr/sbin/kvmd", ["--help"]).Stdout);
            Assert.Contains($"kvmd {DebianPackage.Version}", DebianPackage.Run("/usr/sbin/kvmd", ["--version"]).Stdout);
            Assert.Contains("vmctl", DebianPackage.Run("/usr/bin/vmctl", ["--help"]).Stdout);
            Assert.Contains(DebianPackage.Version, DebianPackage.Run("/usr/bin/vmctl", ["--version"]).Stdout);
            Assert.Contains("Usage: kvm-vmm", DebianPackage.Run("/usr/lib/kvm/kvm-vmm", ["--help"]).Stdout);

            DebianPackage.Run("dpkg", ["--remove", DebianPackage.Name], DebianPackage.DpkgTimeout);
            // Removed: the package's files are gone; its conffile (/etc/default/kvmd) stays until
            // the purge, as dpkg keeps configuration.
            Assert.Equal("rc ", DebianPackage.Status());
            var left = files.Where(f => f != "/etc/default/kvmd" && (File.Exists(f) || Directory.Exists(f) && !DebianPackage.IsSharedDirectory(f))).ToList();
            Assert.True(left.Count == 0, $"left after dpkg --remove: {string.Join(", ", left)}");

            DebianPackage.Run("dpkg", ["--purge", DebianPackage.Name], DebianPackage.DpkgTimeout);
            Assert.Null(DebianPackage.Status());
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
            DebianPackage.Purge();
        }
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
}
