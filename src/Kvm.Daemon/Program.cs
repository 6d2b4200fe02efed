// kvmd: the host daemon (RPC endpoint for vmctl, inventory and leases, supervisor of kvm-vmm).
// Only the program's shell exists so far: the daemon's services arrive with the RPC and
// inventory layers. It says so instead of pretending to run.
const string usage = """
    Usage: kvmd [--help] [--version]

    The kvm host daemon: serves vmctl over a unix socket, keeps the VM inventory and leases in
    PostgreSQL, and supervises one kvm-vmm process per VM.

    Not available yet in this build: the RPC and inventory layers it serves are still to come.
    Use 'vmctl run' to run a VM in the foreground without the daemon.
    """;

if (args is ["--help" or "-h"])
{
    Console.WriteLine(usage);
    return 0;
}
if (args is ["--version"])
{
    Console.WriteLine($"kvmd {typeof(Program).Assembly.GetName().Version}");
    return 0;
}
Console.Error.WriteLine("kvmd: the daemon is not available in this build yet; use 'vmctl run' (see 'kvmd --help')");
return 1;
