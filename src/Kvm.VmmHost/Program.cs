using Kvm.Rpc;
using Kvm.Control;
using Kvm.Vmm.Machine;

// kvm-vmm --spec FILE|- [--control SOCKET] [--console SOCKET] [--group NAME]
const string program = "kvm-vmm";
ForegroundConsole.UsePlainStandardStreams();
const string usage = """
    Usage: kvm-vmm --spec FILE [--control SOCKET] [--console SOCKET] [--group NAME]

    Runs exactly one VM, described by a JSON spec (FILE, or - for standard input). kvmd starts one
    kvm-vmm per VM; for interactive use, 'vmctl run' does the same from command-line options.

      --control SOCKET  serve the VM's control socket there: JSON-RPC 2.0, one message per line
                        (methods status, pause, resume, stop, stats, devices; 'vmctl control')
      --console SOCKET  put the serial console on that socket instead of this terminal; clients
                        attach and detach at will ('vmctl console')
      --group NAME      members of this group may use the sockets (mode 0660); without it, only
                        root and this process's user may

    Spec fields: kernel (required), initrd, cmdline, memoryBytes, cpus, debugExit, hugePages
    (None, Transparent, HugeTlb), trackDirtyPages, disks. Example:
      {"kernel": "build/guest/guestkit.elf", "cmdline": "hello", "debugExit": true}

    Exit status: the guest's debug-exit status; 0 when the guest powered off or was stopped
    through the control socket; 130 after Ctrl-C, 143 after SIGTERM; 1 on failure; 2 for usage
    errors.
    """;

if (args is ["--help" or "-h"])
{
    Console.WriteLine(usage);
    return 0;
}
string? source = null;
var host = new VmHostOptions();
for (int i = 0; i < args.Length; i++)
{
    string? Value() => i + 1 < args.Length ? args[++i] : null;
    switch (args[i])
    {
        case "--spec" when source is null:
            source = Value();
            break;
        case "--control":
            host = host with { ControlSocket = Value() ?? "" };
            break;
        case "--console":
            host = host with { ConsoleSocket = Value() ?? "" };
            break;
        case "--group":
            string? group = Value();
            try
            {
                host = host with { Access = RpcAccessPolicy.ForGroup(group ?? "") };
            }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine($"{program}: --group: {e.Message}");
                return 2;
            }
            break;
        default:
            Console.Error.WriteLine($"{program}: unexpected argument '{args[i]}' (see 'kvm-vmm --help')");
            return 2;
    }
}
if (string.IsNullOrEmpty(source) || host.ControlSocket == "" || host.ConsoleSocket == "")
{
    Console.Error.WriteLine($"{program}: expected '--spec FILE', and a path after --control and --console (see 'kvm-vmm --help')");
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
return VmHost.Execute(spec, program, host, new StderrLogger(program));
