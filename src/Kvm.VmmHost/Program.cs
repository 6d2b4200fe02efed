using Kvm.Rpc;
using Kvm.Control;
using Kvm.Vmm.Machine;

// kvm-vmm (--spec FILE|- | --restore DIR | --take-over SOCKET) [--control SOCKET] [--console SOCKET] [--group NAME] [--log FILE] [--exit-file FILE] [--new-session] [--verbose]
const string program = "kvm-vmm";
ForegroundConsole.UsePlainStandardStreams();
const string usage = """
    Usage: kvm-vmm --spec FILE [--control SOCKET] [--console SOCKET] [--group NAME]
                   [--log FILE] [--exit-file FILE] [--new-session] [--verbose]
           kvm-vmm --restore DIR [--memory eager|lazy|mapped] [--fork DIR | --fork-spec FILE] [the same options]
           kvm-vmm --take-over SOCKET --control SOCKET --console SOCKET [the same options]

    Runs exactly one VM, described by a JSON spec (FILE, or - for standard input), or restored
    from a snapshot directory that 'save' wrote (the VM carries on where it was saved). kvmd
    starts one kvm-vmm per VM; for interactive use, 'vmctl run' and 'vmctl restore' do the same
    from command-line options.

      --restore DIR     restore the VM saved in DIR (its state file and memory file); a damaged
                        snapshot, one of another format version, or one saved on a host with CPU
                        features this one lacks is refused before anything starts
      --take-over SOCKET
                        take over a running VM from another kvm-vmm, which started this one
                        for a hand-over (control methods handover and suspend; 'vmctl control
                        upgrade'): guest RAM stays where it is, the VM's state comes over the
                        socket, and this process takes the control and console socket paths
      --memory MODE     how guest RAM comes back: eager (the default) reads all of it before the
                        vCPUs start; lazy starts them at once, a page comes in when first touched
                        while the rest is loaded in the background (needs userfaultfd: root, or
                        access to /dev/userfaultfd); mapped starts them at once on a private
                        copy-on-write mapping of the memory file (pages shared by every VM
                        mapped from it, copied when written; no handover or checkpoint)
      --fork DIR        with --restore: run a fork of the snapshot (a copy with an identity
                        of its own), its disks in DIR (created if missing): RAM mapped (as
                        --memory mapped), each writable disk a new qcow2 child of the
                        snapshot's in DIR (which makes the snapshot's disk read-only), each
                        NIC a new random MAC and a tap of its own (named by the kernel, on the
                        snapshot's bridge); the VM gets a new generation id (ACPI VMGENID)
      --fork-spec FILE  with --restore: run a fork whose files another program made (kvmd's
                        'vm.fork'): the machine FILE describes (its disks hold the snapshot's
                        content, its NICs have their own MACs), RAM mapped, a new generation id
      --control SOCKET  serve the VM's control socket there: JSON-RPC 2.0, one message per line
                        (methods status, pause, resume, stop, save, suspend, handover, stats,
                        devices, fence; 'vmctl control')
      --console SOCKET  put the serial console on that socket instead of this terminal; clients
                        attach and detach at will ('vmctl console')
      --group NAME      members of this group may use the sockets (mode 0660); without it, only
                        root and this process's user may
      --log FILE        append this process's output (its log) to FILE instead of the terminal
      --exit-file FILE  record how the VM ended there (JSON: status, reason, failed, pid, at)
                        just before exiting, for a supervisor that is not this process's parent
      --new-session     leave the caller's session (setsid): signals to the terminal or to the
                        caller's process group do not reach the VM (kvmd starts VMs this way)
      --verbose         log what the VMM does, not only warnings and errors: the machine built,
                        the vCPUs started and stopped, and for --restore each step of the
                        restore with its time since the process started

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
string? restore = null;
string? takeOver = null;
string? memory = null;
string? fork = null;
string? forkSpec = null;
string? log = null;
bool newSession = false;
bool verbose = false;
var host = new VmHostOptions();
for (int i = 0; i < args.Length; i++)
{
    string? Value() => i + 1 < args.Length ? args[++i] : null;
    switch (args[i])
    {
        case "--spec" when source is null:
            source = Value();
            break;
        case "--restore" when restore is null:
            restore = Value() ?? "";
            break;
        case "--take-over" when takeOver is null:
            takeOver = Value() ?? "";
            break;
        case "--memory" when memory is null:
            memory = Value() ?? "";
            break;
        case "--fork" when fork is null:
            fork = Value() ?? "";
            break;
        case "--fork-spec" when forkSpec is null:
            forkSpec = Value() ?? "";
            break;
        case "--control":
            host = host with { ControlSocket = Value() ?? "" };
            break;
        case "--console":
            host = host with { ConsoleSocket = Value() ?? "" };
            break;
        case "--log":
            log = Value() ?? "";
            break;
        case "--exit-file":
            host = host with { ExitFile = Value() ?? "" };
            break;
        case "--new-session":
            newSession = true;
            break;
        case "--verbose":
            verbose = true;
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
int sources = (string.IsNullOrEmpty(source) ? 0 : 1) + (string.IsNullOrEmpty(restore) ? 0 : 1) + (string.IsNullOrEmpty(takeOver) ? 0 : 1);
if (sources != 1 || (memory is not null && restore is null) || ((fork ?? forkSpec) is not null && restore is null) || (fork is not null && forkSpec is not null)
    || host.ControlSocket == "" || host.ConsoleSocket == "" || log == "" || host.ExitFile == "" || fork == "" || forkSpec == "")
{
    Console.Error.WriteLine($"{program}: expected one of '--spec FILE', '--restore DIR' or '--take-over SOCKET' (--memory and one of --fork or --fork-spec only with --restore), and a path after --control, --console, --log, --exit-file, --fork and --fork-spec (see 'kvm-vmm --help')");
    return 2;
}
if (takeOver is not null && (host.ControlSocket is null || host.ConsoleSocket is null))
{
    Console.Error.WriteLine($"{program}: --take-over needs --control and --console: the sockets the VM is served on");
    return 2;
}
if ((fork ?? forkSpec) is not null && memory is not (null or "mapped"))
{
    Console.Error.WriteLine($"{program}: a fork maps the template's RAM (--memory mapped); --memory {memory} does not go with it");
    return 2;
}
if (memory is not null && memory is not ("eager" or "lazy" or "mapped"))
{
    Console.Error.WriteLine($"{program}: --memory '{memory}' is not one of: eager, lazy, mapped");
    return 2;
}
if (newSession && Kvm.Interop.Native.Libc.SetSid() < 0)
{
    // Fails only for a process group leader, which a freshly started child is not: say so and go on.
    Console.Error.WriteLine($"{program}: --new-session: setsid failed (errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}); staying in the caller's session");
}
if (log is not null)
{
    try
    {
        // Standard output and error both go to the log, appended, from here on (the .NET console
        // streams write to fds 1 and 2 directly, so the dup2 redirects them too).
        using var file = File.Open(log, new FileStreamOptions { Mode = FileMode.Append, Access = FileAccess.Write, Share = FileShare.ReadWrite });
        if (Kvm.Interop.Native.Libc.Dup2(file.SafeFileHandle, 1) < 0 || Kvm.Interop.Native.Libc.Dup2(file.SafeFileHandle, 2) < 0)
            throw new IOException($"dup2 failed (errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()})");
    }
    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
    {
        Console.Error.WriteLine($"{program}: --log {log}: {e.Message}");
        return 1;
    }
}
VmLaunch launch;
try
{
    if (takeOver is not null)
        launch = new TakeOverLaunch(takeOver);
    else if (restore is not null && fork is not null)
        launch = ForkLaunch.Open(Path.GetFullPath(restore), Path.GetFullPath(fork));
    else if (restore is not null && forkSpec is not null)
    {
        var spec = VmSpecJsonContext.Parse(File.ReadAllText(forkSpec), forkSpec);
        spec.Validate();
        launch = ForkLaunch.OpenWithSpec(Path.GetFullPath(restore), spec);
    }
    else if (restore is not null)
        launch = RestoreLaunch.Open(restore, new Kvm.Vmm.Snapshot.RestoreOptions
        {
            Memory = Kvm.Vmm.Snapshot.VmSnapshot.ParseMemoryLoad(memory ?? "eager"),
            Clock = Kvm.Vmm.Snapshot.StepClock.SinceProcessStart("restore"),
        });
    else
    {
        string json = source == "-" ? Console.In.ReadToEnd() : File.ReadAllText(source!);
        var spec = VmSpecJsonContext.Parse(json, source!);
        spec.Validate();
        launch = spec;
    }
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
{
    Console.Error.WriteLine($"{program}: {ForegroundRun.Describe(e)}");
    return 2;
}
catch (Kvm.Vmm.Snapshot.SnapshotFormatException e)
{
    Console.Error.WriteLine($"{program}: {e.Message}");
    return 1;
}
return VmHost.Execute(launch, program, host, new StderrLogger(program, verbose ? Microsoft.Extensions.Logging.LogLevel.Information : Microsoft.Extensions.Logging.LogLevel.Warning));
