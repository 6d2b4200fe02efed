using Kvm.Tests.Shared;

/// <summary>What a benchmark needs before it starts: built files and installed peers, each missing one named.</summary>
internal static class Prerequisites
{
    public static readonly (string Path, string What) GuestKit = (TestEnvironment.GuestKit, "the guest kit");
    public static readonly (string Path, string What) Vmctl = (TestEnvironment.Vmctl, "vmctl");
    public static readonly (string Path, string What) Kvmd = (TestEnvironment.Kvmd, "kvmd");
    public static readonly (string Path, string What) KvmVmm = (TestEnvironment.KvmVmm, "kvm-vmm");
    public static readonly (string Program, string Package) Qemu = ("qemu-system-x86_64", "qemu-system-x86");
    public static readonly (string Program, string Package) QemuImg = ("qemu-img", "qemu-utils");
    public static readonly (string Program, string Package) QemuIo = ("qemu-io", "qemu-utils");
    public static readonly (string Program, string Package) Psql = ("psql", "postgresql-client");

    /// <summary>
    /// True when every file exists (built by <c>make</c>, or by <paramref name="buildHint"/>) and
    /// every program is on PATH; otherwise prints the first missing one and returns false.
    /// </summary>
    public static bool Check(IEnumerable<(string Path, string What)> files, IEnumerable<(string Program, string Package)> programs,
        string buildHint = "make")
    {
        foreach (var (path, what) in files)
        {
            if (!File.Exists(path))
            {
                Console.Error.WriteLine($"benchmark: {what} is missing at {path} (run '{buildHint}' first)");
                return false;
            }
        }
        foreach (var (program, package) in programs)
        {
            if (TestEnvironment.FindOnPath(program) is null)
            {
                Console.Error.WriteLine($"benchmark: {program} is not installed (Debian package {package})");
                return false;
            }
        }
        return true;
    }

    /// <summary>Reports an argument the benchmark does not know, with its usage; returns the usage-error status.</summary>
    public static int UnknownArgument(string argument, string usage)
    {
        Console.Error.WriteLine($"benchmark: unknown argument '{argument}'\n{usage}");
        return 2;
    }

    /// <summary>
    /// Ends <paramref name="p"/> (with its children) if it still runs and waits for it, then lets
    /// <paramref name="reader"/>, which reads its output, finish: the pipe closed with the process.
    /// </summary>
    public static void EndAndDrain(System.Diagnostics.Process p, Task reader)
    {
        try
        {
            p.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // It had ended.
        }
        p.WaitForExit();
        try
        {
            reader.Wait(TimeSpan.FromSeconds(10));
        }
        catch (AggregateException)
        {
        }
    }
}
