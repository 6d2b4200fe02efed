using System.Diagnostics;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>The vmctl and kvm-vmm programs as a user runs them: exit statuses, console output, errors.</summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class VmctlTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    private static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        if (!File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.Vmctl} is missing (run 'make' first)");
    }

    private static ProcessResult Vmctl(params string[] args) => TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Timeout);

    /// <summary>A failure is one line on stderr that names the problem, with no stack trace.</summary>
    private static void AssertOneLineError(ProcessResult r, int status, string expected)
    {
        Assert.Equal(status, r.ExitCode);
        var lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, $"expected one line on stderr, got:\n{r.Stderr}");
        Assert.StartsWith("vmctl: ", lines[0]);
        Assert.Contains(expected, lines[0]);
        Assert.DoesNotContain("   at ", r.Stderr);
        Assert.DoesNotContain("Exception", r.Stderr);
    }

    [SkippableFact]
    public void RunHelloShowsTheConsoleAndExitsWithTheGuestsStatus()
    {
        Require();
        var r = Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--cmdline", "hello", "--debug-exit");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("guestkit: hello\n", r.Stdout);
        Assert.Equal("", r.Stderr);
    }

    [SkippableFact]
    public void OutputRedirectedToAFileIsAppendedInOrder()
    {
        Require();
        // Shell redirection shares one file offset between the commands; the guest's output must
        // land after 'before' and before 'after', not overwrite the start of the file.
        string log = Path.Combine(Path.GetTempPath(), $"kvm-out-{Guid.NewGuid():N}.txt");
        try
        {
            var r = TestEnvironment.RunProcess("sh",
                ["-c", $"{{ echo before; '{TestEnvironment.Vmctl}' run --kernel '{TestEnvironment.GuestKit}' --cmdline 'exit code=3' --debug-exit; echo after; }} > '{log}' 2>&1"],
                Timeout);
            Assert.Equal(0, r.ExitCode);
            Assert.Equal("before\nguestkit: exit code=3\nafter\n", File.ReadAllText(log));
        }
        finally
        {
            File.Delete(log);
        }
    }

    [SkippableFact]
    public void RunExitCodeIsPassedThrough()
    {
        Require();
        var r = Vmctl("run", "-k", TestEnvironment.GuestKit, "-c", "exit code=42", "--debug-exit", "--memory", "64M", "--cpus", "2");
        Assert.Equal(42, r.ExitCode);
        Assert.Contains("guestkit: exit code=42", r.Stdout);
    }

    [SkippableFact]
    public void TripleFaultIsAOneLineError()
    {
        Require();
        var r = Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--cmdline", "fault", "--debug-exit");
        AssertOneLineError(r, 1, "guest shut down (triple fault)");
    }

    [SkippableFact]
    public void MissingKernelIsAOneLineError()
    {
        Require();
        AssertOneLineError(Vmctl("run", "--kernel", "/nonexistent/kernel.elf"), 1, "kernel /nonexistent/kernel.elf: no such file");
    }

    [SkippableFact]
    public void UnreadableKernelIsAOneLineError()
    {
        Require();
        string dir = Path.Combine(Path.GetTempPath(), $"kvm-dir-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            // A directory in place of the kernel cannot be read as a file, even by root.
            var r = Vmctl("run", "--kernel", dir);
            Assert.Equal(1, r.ExitCode);
            Assert.Contains($"kernel {dir}", r.Stderr);
            Assert.DoesNotContain("   at ", r.Stderr);
        }
        finally
        {
            Directory.Delete(dir);
        }
    }

    [SkippableFact]
    public void NonElfKernelIsAOneLineError()
    {
        Require();
        string path = Path.Combine(Path.GetTempPath(), $"kvm-notelf-{Guid.NewGuid():N}");
        File.WriteAllText(path, "#!/bin/sh\necho not a kernel\n");
        try
        {
            AssertOneLineError(Vmctl("run", "--kernel", path), 1, "not an ELF file");
        }
        finally
        {
            File.Delete(path);
        }
    }

    [SkippableFact]
    public void ElfWithoutPvhNoteIsAOneLineError()
    {
        Require();
        string? trueBin = TestEnvironment.FindOnPath("true");
        Skip.If(trueBin is null, "no 'true' binary on PATH to use as an ELF without a PVH note");
        AssertOneLineError(Vmctl("run", "--kernel", trueBin!), 1, "no PVH entry note");
    }

    [SkippableFact]
    public void TooMuchMemoryIsAOneLineError()
    {
        Require();
        AssertOneLineError(Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--memory", "64T"), 1, "larger than the host's memory");
    }

    [SkippableFact]
    public void BadMemorySizeIsAUsageError()
    {
        Require();
        AssertOneLineError(Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--memory", "lots"), 2, "'lots' is not a size");
    }

    [SkippableFact]
    public void UnknownOptionIsAUsageError()
    {
        Require();
        AssertOneLineError(Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--frobnicate"), 2, "--frobnicate");
    }

    [SkippableFact]
    public void BadCpuCountIsAUsageError()
    {
        Require();
        AssertOneLineError(Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--cpus", "two"), 2, "--cpus 'two' is not a whole number");
        AssertOneLineError(Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--cpus", "0"), 2, "cpus 0 is out of range");
    }

    [SkippableFact]
    public void BadHugePageModeIsAUsageError()
    {
        Require();
        AssertOneLineError(Vmctl("run", "--kernel", TestEnvironment.GuestKit, "--hugepages", "giant"), 2,
            "--hugepages 'giant' is not one of none, transparent, hugetlb");
    }

    [SkippableFact]
    public void UnknownCommandIsAUsageError()
    {
        Require();
        AssertOneLineError(Vmctl("boot"), 2, "Unrecognized command or argument 'boot'");
    }

    [SkippableFact]
    public void MissingKernelOptionIsAUsageError()
    {
        Require();
        AssertOneLineError(Vmctl("run"), 2, "--kernel");
    }

    [SkippableFact]
    public void KvmWithoutPermissionIsExplained()
    {
        Require();
        TestEnvironment.RequireProgram("setpriv", "util-linux");
        Skip.If(Environment.UserName != "root", "needs root to drop to an unprivileged user");
        // /dev/kvm is 0600 root here; run vmctl as 'nobody' so opening it is refused.
        var mode = File.GetUnixFileMode("/dev/kvm");
        Skip.If((mode & UnixFileMode.OtherWrite) != 0, "/dev/kvm is world-writable on this host");
        var r = TestEnvironment.RunProcess("setpriv",
            ["--reuid=nobody", "--regid=nogroup", "--clear-groups", TestEnvironment.Vmctl, "run", "--kernel", CopyGuestKitForAll()], Timeout);
        AssertOneLineError(r, 1, "/dev/kvm: permission denied");
    }

    [SkippableFact]
    public void MissingKvmDeviceIsExplained()
    {
        Require();
        TestEnvironment.RequireProgram("unshare", "util-linux");
        Skip.If(Environment.UserName != "root", "needs root to hide /dev/kvm in a private mount namespace");
        // A private /dev with only the nodes a .NET program needs, and no kvm.
        string script =
            "set -e; mount -t tmpfs tmpfs /dev; mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; " +
            "mknod -m 666 /dev/urandom c 1 9; mknod -m 666 /dev/random c 1 8; exec \"$@\"";
        var r = TestEnvironment.RunProcess("unshare",
            ["--mount", "--propagation", "private", "sh", "-c", script, "sh", TestEnvironment.Vmctl, "run", "--kernel", TestEnvironment.GuestKit], Timeout);
        AssertOneLineError(r, 1, "/dev/kvm is missing");
    }

    [SkippableFact]
    public void SigintStopsTheVmCleanly()
    {
        Require();
        AssertSignalStopsCleanly("INT", 130, "VM stopped (interrupted)");
    }

    [SkippableFact]
    public void SigtermStopsTheVmCleanly()
    {
        Require();
        AssertSignalStopsCleanly("TERM", 143, "VM stopped (terminated)");
    }

    private static void AssertSignalStopsCleanly(string signal, int status, string message)
    {
        // Without --debug-exit the guest kit parks its vCPU after printing; the VM runs until stopped.
        var psi = new ProcessStartInfo(TestEnvironment.Vmctl)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in new[] { "run", "--kernel", TestEnvironment.GuestKit, "--cmdline", "hello", "--cpus", "2" })
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string? line;
        var seen = new List<string>();
        while ((line = p.StandardOutput.ReadLine()) is not null)
        {
            seen.Add(line);
            if (line.Contains("parking vCPU"))
                break;
        }
        Assert.True(line is not null, $"the guest did not park; output: {string.Join('\n', seen)}");
        Assert.False(p.HasExited);
        // The launcher execs the program, so this pid is vmctl itself.
        using (var kill = Process.Start("kill", ["-" + signal, p.Id.ToString()]))
            kill.WaitForExit();
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(20)), "vmctl ended after the signal");
        Assert.Equal(status, p.ExitCode);
        Assert.Equal($"vmctl: {message}", stderr.Result.Trim());
    }

    [SkippableFact]
    public void OnATerminalKeysGoToTheGuestAndCtrlCStopsTheVm()
    {
        Require();
        TestEnvironment.RequireProgram("script", "bsdutils");
        // script(1) gives vmctl a real pseudo-terminal. While the VM runs, keystrokes must reach the
        // guest without being echoed by the terminal; a 0x03 byte becomes SIGINT through the line
        // discipline, as Ctrl-C does; afterwards the shell's 'read' must see an echoing, line-editing
        // terminal again.
        string inner = $"{TestEnvironment.Vmctl} run --kernel {TestEnvironment.GuestKit} --cmdline hello; echo status=$?; read x; echo got=$x";
        // script(1) runs the command with $SHELL. It must be bash: a non-interactive dash dies of
        // the same SIGINT that vmctl handles, so 'echo status' would never run (CI has no SHELL set,
        // and /bin/sh is dash there).
        TestEnvironment.RequireProgram("bash", "bash");
        using var script = LiveProcess.Start("script", ["-q", "-e", "-c", inner, "/dev/null"],
            new Dictionary<string, string?> { ["SHELL"] = TestEnvironment.FindOnPath("bash") });

        Assert.True(script.WaitFor("parking vCPU", Timeout), $"the guest did not park: {script.Output}");
        script.Type("xyz");
        Thread.Sleep(300);
        script.Type("\u0003");
        Assert.True(script.WaitFor("status=", Timeout), $"vmctl did not stop on Ctrl-C: {script.Output}");
        // The terminal may pass "status=130" and its line end on in two pieces: type only once the
        // whole line is out, or the echo of the keys can land between them.
        Assert.True(SpinWait.SpinUntil(() => script.Output[script.Output.IndexOf("status=", StringComparison.Ordinal)..].Contains('\n'), Timeout),
            $"the status line did not end: {script.Output}");
        script.Type("abc\n");
        Assert.True(script.WaitForExit(TimeSpan.FromSeconds(30)), $"the shell did not finish: {script.Output}");

        string text = script.Output;
        Assert.Contains("vmctl: VM stopped (interrupted)", text);
        Assert.Contains("status=130", text);
        string whileRunning = text[..text.IndexOf("vmctl: VM stopped", StringComparison.Ordinal)];
        Assert.False(whileRunning.Contains("xyz", StringComparison.Ordinal), // not echoed: the keys went to the guest's UART
            $"'xyz' was echoed while the VM ran; output:\n{text}");
        Assert.True(text.Contains("abc\ngot=abc", StringComparison.Ordinal), // echoed again once vmctl ended
            $"the terminal did not echo 'abc' after vmctl ended; output:\n{text}");
    }

    [SkippableFact]
    public void HelpDescribesEveryOption()
    {
        Require();
        var root = Vmctl("--help");
        Assert.Equal(0, root.ExitCode);
        Assert.Contains("run", root.Stdout);
        var run = Vmctl("run", "--help");
        Assert.Equal(0, run.ExitCode);
        foreach (var option in new[] { "--kernel", "--cmdline", "--memory", "--cpus", "--debug-exit", "--hugepages", "Ctrl-C", "Exit status" })
            Assert.Contains(option, run.Stdout);
    }

    [SkippableFact]
    public void KvmVmmRunsAJsonSpec()
    {
        Require();
        string spec = $$"""{"kernel": "{{TestEnvironment.GuestKit}}", "cmdline": "exit code=9", "debugExit": true, "memoryBytes": 67108864}""";
        var r = TestEnvironment.RunProcess(TestEnvironment.KvmVmm, ["--spec", "-"], Timeout, stdin: spec);
        Assert.Equal(9, r.ExitCode);
        Assert.Contains("guestkit: exit code=9", r.Stdout);
    }

    [SkippableFact]
    public void KvmVmmRejectsAnUnknownSpecField()
    {
        Require();
        var r = TestEnvironment.RunProcess(TestEnvironment.KvmVmm, ["--spec", "-"], Timeout, stdin: """{"kernel": "x", "memroy": 1}""");
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("memroy", r.Stderr);
        Assert.DoesNotContain("   at ", r.Stderr);
    }

    private static string CopyGuestKitForAll()
    {
        // The unprivileged user must be able to read the kernel; /tmp is world-readable.
        string path = Path.Combine(Path.GetTempPath(), "kvm-test-guestkit.elf");
        File.Copy(TestEnvironment.GuestKit, path, overwrite: true);
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        return path;
    }
}
