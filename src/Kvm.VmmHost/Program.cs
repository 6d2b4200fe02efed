using Kvm.Vmm.Machine;

// kvm-vmm --spec FILE|-   runs the VM the JSON spec describes, in the foreground.
const string program = "kvm-vmm";
ForegroundConsole.UsePlainStandardStreams();
const string usage = """
    Usage: kvm-vmm --spec FILE

    Runs exactly one VM, described by a JSON spec (FILE, or - for standard input), in the
    foreground with its serial console on this terminal. kvmd starts one kvm-vmm per VM; for
    interactive use, 'vmctl run' does the same from command-line options.

    Spec fields: kernel (required), cmdline, memoryBytes, cpus, debugExit, hugePages
    (None, Transparent, HugeTlb), trackDirtyPages. Example:
      {"kernel": "build/guest/guestkit.elf", "cmdline": "hello", "debugExit": true}

    Exit status: the guest's debug-exit status; 130 after Ctrl-C; 1 on failure; 2 for usage errors.
    """;

if (args is ["--help" or "-h"])
{
    Console.WriteLine(usage);
    return 0;
}
if (args is not ["--spec", var source])
{
    Console.Error.WriteLine($"{program}: expected '--spec FILE' (see 'kvm-vmm --help')");
    return 2;
}
VmSpec spec;
try
{
    string json = source == "-" ? Console.In.ReadToEnd() : File.ReadAllText(source);
    spec = VmSpecJsonContext.Parse(json, source);
    spec.Validate();
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
{
    Console.Error.WriteLine($"{program}: {ForegroundRun.Describe(e)}");
    return 2;
}
return ForegroundRun.Execute(spec, program, new StderrLogger(program));
