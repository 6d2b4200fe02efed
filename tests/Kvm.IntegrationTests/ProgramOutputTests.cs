using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>The three programs' standard output as shell pipelines use it. Needs no KVM.</summary>
public class ProgramOutputTests
{
    public static TheoryData<string, string> Programs => new()
    {
        { "vmctl", "--help" },
        { "vmctl", "image --help" },
        { "kvm-vmm", "--help" },
        { "kvmd", "--help" },
    };

    /// <summary>
    /// <c>vmctl list | head -1</c>: the reader is gone before the program writes (EPIPE). The
    /// program ends as it would have (status 0 here) and says nothing of it: no exception, no
    /// abort. The writer sleeps first, so its read end is closed for certain when it writes.
    /// </summary>
    [Theory]
    [MemberData(nameof(Programs))]
    public void OutputIntoAClosedPipeEndsQuietly(string program, string args)
    {
        string path = Path.Combine(TestEnvironment.BuildDir, "bin", program);
        Assert.True(File.Exists(path), $"{path} is missing (run 'make' first)");
        string script = $"{{ sleep 0.3; exec '{path}' {args}; }} | {{ exec 0<&-; sleep 1; }}; exit ${{PIPESTATUS[0]}}";
        var r = TestEnvironment.RunProcess("bash", ["-c", script], TimeSpan.FromSeconds(60));
        Assert.True(r.ExitCode == 0, $"{program} {args} into a closed pipe exited {r.ExitCode}; stderr:\n{r.Stderr}");
        Assert.Equal("", r.Stderr);
    }
}
