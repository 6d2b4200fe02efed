using System.Text.Json;
using Kvm.Cluster;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// What README.md promises a new user: build the package, install it, and run VMs through kvmd and
/// vmctl. The installed programs (NativeAOT, from /usr/lib/kvm) run with the package's defaults:
/// kvmd started as its unit starts it (ExecStart= with /etc/default/kvmd), its private PostgreSQL
/// cluster made in /var/lib/kvm by its first start, its socket /run/kvm/kvmd.sock open to the group
/// kvm; vmctl as an unprivileged member of that group drives a VM, and one outside it is refused.
/// Not here: systemd itself (these machines have no systemd as PID 1; Kvm.Cluster.Tests verifies the
/// unit with systemd-analyze and checks READY/WATCHDOG notifications against a socket of its own).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class InstalledPackageTests
{
    private const string Unit = "/lib/systemd/system/kvmd.service";
    private const string Vmctl = "/usr/bin/vmctl";
    private const int Nobody = 65534;
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(90);

    [SkippableFact]
    public void TheInstalledPackageRunsAVmThroughKvmdForAMemberOfTheKvmGroup()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        DebianPackage.RequireRoot();
        TestEnvironment.RequireProgram("setpriv", "util-linux");
        TestEnvironment.SkipIf(KvmdHarness.PostgresUnavailable());
        var deb = DebianPackage.Require();
        var files = DebianPackage.Files(deb);
        TestEnvironment.SkipIf(File.Exists("/run/kvm/kvmd.sock") ? "a kvmd already serves /run/kvm/kvmd.sock here" : null);

        LiveProcess? kvmd = null;
        try
        {
            DebianPackage.Install(deb, files);
            kvmd = StartAsTheUnitDoes();
            int kvmGroup = GroupId("kvm");

            // Outside the group: the socket (0660, root:kvm) keeps the user out, and vmctl says why.
            var outsider = AsNobody(null, "list");
            Assert.True(outsider.ExitCode == 1 && outsider.Stderr.Contains("permission denied", StringComparison.Ordinal),
                $"vmctl list outside the group kvm: status {outsider.ExitCode}: {outsider.Stderr}");

            // A member: README's verbs, on the installed programs.
            Ok(kvmGroup, "create", "pkg", "--kernel", TestEnvironment.GuestKit, "--cmdline", "tick period=50");
            Assert.Contains("pkg: running", Ok(kvmGroup, "start", "pkg"), StringComparison.Ordinal);
            var shown = JsonSerializer.Deserialize(Ok(kvmGroup, "show", "pkg", "--json"), KvmdJson.Default.VmDetail)!;
            Assert.Equal("running", shown.Vm.ActualState);
            Assert.StartsWith("/run/kvm/", shown.ConsoleSocket, StringComparison.Ordinal);
            Assert.NotNull(shown.Status);
            using (var console = new ConsoleClient(shown.ConsoleSocket!))
            {
                Assert.True(console.WaitFor("guestkit: tick pwrbtn armed"), console.Text);
                Assert.True(console.WaitForTick(3), console.Text);
                var stop = JsonSerializer.Deserialize(Ok(kvmGroup, "stop", "pkg", "--json"), KvmdJson.Default.VmStopped)!;
                Assert.Equal("guest", stop.Outcome);
                Assert.True(console.WaitFor("guestkit: tick pwrbtn pressed"), console.Text);
            }
            var listed = JsonSerializer.Deserialize(Ok(kvmGroup, "list", "--json"), KvmdJson.Default.VmList)!;
            Assert.Equal("stopped", Assert.Single(listed.Vms, v => v.Name == "pkg").ActualState);
            Ok(kvmGroup, "delete", "pkg");

            // kvmd stops cleanly, its cluster with it; the purge then leaves no state behind.
            Assert.True(Stop(kvmd), "the installed kvmd did not stop within 60 s of SIGTERM");
            DebianPackage.Run("dpkg", ["--purge", DebianPackage.Name], DebianPackage.DpkgTimeout);
            Assert.False(Directory.Exists("/var/lib/kvm"), "/var/lib/kvm (kvmd's state) is left after dpkg --purge");
        }
        finally
        {
            if (kvmd is not null)
            {
                Stop(kvmd);
                kvmd.Dispose();
            }
            KvmdInstance.KillLeftovers("/run/kvm/vms/pkg");
            KvmdInstance.EndServer("/var/lib/kvm/postgres/data");
            DebianPackage.Purge();
        }
    }

    /// <summary>
    /// kvmd as kvmd.service starts it: the unit's ExecStart= line, with the variables of its
    /// EnvironmentFile (/etc/default/kvmd) split into words by the shell, as systemd splits $VAR.
    /// Returns once it answers on /run/kvm/kvmd.sock: its first start makes its cluster (initdb).
    /// </summary>
    private static LiveProcess StartAsTheUnitDoes()
    {
        string execStart = File.ReadLines(Unit).Single(l => l.StartsWith("ExecStart=", StringComparison.Ordinal))["ExecStart=".Length..];
        string environmentFile = File.ReadLines(Unit).Single(l => l.StartsWith("EnvironmentFile=", StringComparison.Ordinal))["EnvironmentFile=".Length..].TrimStart('-');
        var kvmd = LiveProcess.Start("/bin/sh", ["-c", $"set -a; . {environmentFile}; exec {execStart}"]);
        bool up = SpinWait.SpinUntil(() =>
        {
            if (kvmd.Process.HasExited)
                return true;
            if (File.Exists("/run/kvm/kvmd.sock") && TestEnvironment.RunProcess(Vmctl, ["list"], Timeout).ExitCode == 0)
                return true;
            Thread.Sleep(500);
            return false;
        }, KvmdInstance.StartTimeout);
        if (kvmd.Process.HasExited || !up)
        {
            string stderr = kvmd.Process.HasExited ? kvmd.Stderr.Result : "(still running)";
            Stop(kvmd);
            kvmd.Dispose();
            Assert.Fail($"the installed kvmd ({execStart}) did not answer within {KvmdInstance.StartTimeout.TotalSeconds} s: {stderr}");
        }
        return kvmd;
    }

    private static bool Stop(LiveProcess kvmd)
    {
        if (kvmd.Process.HasExited)
            return true;
        Kvm.Interop.Native.Libc.Kill(kvmd.Process.Id, 15);
        return kvmd.WaitForExit(TimeSpan.FromSeconds(60));
    }

    /// <summary>vmctl as user nobody, with <paramref name="group"/> as its only supplementary group (none when null).</summary>
    private static ProcessResult AsNobody(int? group, params string[] args) =>
        TestEnvironment.RunProcess("setpriv",
            [$"--reuid={Nobody}", $"--regid={Nobody}", group is { } g ? $"--groups={g}" : "--clear-groups", "--", Vmctl, .. args], Timeout);

    private static string Ok(int group, params string[] args)
    {
        var r = AsNobody(group, args);
        Assert.True(r.ExitCode == 0, $"vmctl {string.Join(' ', args)} (as nobody in group kvm): status {r.ExitCode}: {r.Stderr}");
        return r.Stdout;
    }

    private static int GroupId(string name)
    {
        var r = DebianPackage.Run("getent", ["group", name]);
        return int.Parse(r.Stdout.Split(':')[2], System.Globalization.CultureInfo.InvariantCulture);
    }
}
