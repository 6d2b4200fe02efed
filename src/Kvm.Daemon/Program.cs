using System.Runtime.InteropServices;
using Kvm.Cluster;
using Kvm.Cluster.Systemd;
using Kvm.Rpc;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

// kvmd: the host daemon. Wiring only: the services are Kvm.Cluster's.
const string program = "kvmd";
ForegroundConsole.UsePlainStandardStreams();
var defaults = new KvmdOptions();
string usage = $"""
    Usage: kvmd [--socket PATH] [--state-dir DIR] [--run-dir DIR] [--database CONNSTRING]
                [--host-name NAME] [--group NAME] [--vmm PATH]
                [--lease-duration S] [--lease-renew S] [--fence-margin S] [--fence-action stop|pause]
                [--no-takeover]

    The kvm host daemon: serves vmctl over a unix socket, keeps the VM inventory in PostgreSQL,
    and runs one kvm-vmm process per VM. VMs outlive kvmd: stopping, restarting or upgrading kvmd
    leaves them running, and the next kvmd finds them again.

      --socket PATH        the RPC socket vmctl talks to (default {defaults.Socket})
      --state-dir DIR      persistent state: the private PostgreSQL cluster, VM logs (default {defaults.StateDirectory})
      --run-dir DIR        runtime files: each VM's sockets, spec and exit record (default {defaults.RunDirectory})
      --database CONNSTR   a shared PostgreSQL cluster, as an Npgsql connection string (what several
                           hosts need; also KVMD_DATABASE); without it kvmd runs a private cluster
                           under the state directory (initdb and pg_ctl from the installed server)
      --host-name NAME     this host's name in the inventory (default: the machine's host name)
      --group NAME         members of this group may use kvmd's and the VMs' sockets (default {defaults.Group};
                           root only when the group does not exist)
      --vmm PATH           the kvm-vmm executable (default: beside kvmd's own executable)

    Leases (a host runs a VM only while it holds the VM's lease; README explains the choice):
      --lease-duration S   how long a VM lease lasts unless renewed (default {defaults.LeaseDuration.TotalSeconds} s)
      --lease-renew S      how often leases are renewed (default {defaults.LeaseRenewInterval.TotalSeconds} s)
      --fence-margin S     a VM whose lease was not renewed stops (or pauses) by itself this long
                           before the lease could expire (default {defaults.FenceMargin.TotalSeconds} s)
      --fence-action A     stop or pause (default {defaults.FenceAction})
      --no-takeover        never start VMs whose host stopped renewing their leases (default: this
                           host takes them over once their lease has expired)

    SIGTERM or SIGINT stops kvmd; the VMs go on running.
    """;

if (args is ["--help" or "-h"])
{
    Console.WriteLine(usage);
    return 0;
}
if (args is ["--version"])
{
    Console.WriteLine($"kvmd {typeof(Kvmd).Assembly.GetName().Version}");
    return 0;
}
var options = defaults with { Database = Environment.GetEnvironmentVariable("KVMD_DATABASE") is { Length: > 0 } env ? env : null };
for (int i = 0; i < args.Length; i++)
{
    string arg = args[i];
    if (arg == "--no-takeover")
    {
        options = options with { Takeover = false };
        continue;
    }
    if (i + 1 >= args.Length)
    {
        Console.Error.WriteLine($"{program}: {(arg.StartsWith("--", StringComparison.Ordinal) ? $"{arg} needs a value" : $"unexpected argument '{arg}'")} (see 'kvmd --help')");
        return 2;
    }
    string value = args[++i];
    switch (arg)
    {
        case "--socket": options = options with { Socket = Path.GetFullPath(value) }; break;
        case "--state-dir": options = options with { StateDirectory = Path.GetFullPath(value) }; break;
        case "--run-dir": options = options with { RunDirectory = Path.GetFullPath(value) }; break;
        case "--database": options = options with { Database = value }; break;
        case "--host-name": options = options with { HostName = value }; break;
        case "--group": options = options with { Group = value }; break;
        case "--vmm": options = options with { Vmm = Path.GetFullPath(value) }; break;
        case "--lease-duration" or "--lease-renew" or "--fence-margin":
            if (!double.TryParse(value, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double seconds) || !(seconds > 0) || seconds > 86400)
            {
                Console.Error.WriteLine($"{program}: {arg} '{value}' is not a number of seconds (above 0, at most 86400)");
                return 2;
            }
            var span = TimeSpan.FromSeconds(seconds);
            options = arg switch
            {
                "--lease-duration" => options with { LeaseDuration = span },
                "--lease-renew" => options with { LeaseRenewInterval = span },
                _ => options with { FenceMargin = span },
            };
            break;
        case "--fence-action": options = options with { FenceAction = value }; break;
        default:
            Console.Error.WriteLine($"{program}: unexpected argument '{arg}' (see 'kvmd --help')");
            return 2;
    }
}

try
{
    options.Validate();
}
catch (ArgumentException e)
{
    Console.Error.WriteLine($"{program}: {e.Message} (see 'kvmd --help')");
    return 2;
}
var logger = new StderrLogger(program, LogLevel.Information);
// Under systemd (Type=notify): READY once serving, a watchdog while running, STOPPING at the end.
// Read and removed from the environment first, so that no child (kvm-vmm, postgres) inherits it.
var systemd = SystemdNotifier.FromEnvironment(logger: logger);
// The first start makes the private cluster (initdb): minutes on a slow machine.
systemd.ExtendTimeout(TimeSpan.FromMinutes(5));
using var stop = new CancellationTokenSource();
using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Cancel(); });
using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Cancel(); });
Kvmd kvmd;
try
{
    kvmd = await Kvmd.StartAsync(options, logger, stop.Token);
}
catch (Exception e) when (e is RpcException or IOException or UnauthorizedAccessException)
{
    Console.Error.WriteLine($"{program}: cannot start: {(e is RpcException r ? r.Describe() : e.Message)}");
    return 1;
}
catch (OperationCanceledException)
{
    return 0;
}
string serving = $"serving {options.Socket} as host '{kvmd.Host.Name}', {kvmd.Supervisor.Running.Count} VM(s) running";
Console.Error.WriteLine($"{program}: {serving}");
systemd.Ready(serving);
var watchdog = systemd.RunWatchdogAsync(() => true, stop.Token);
try
{
    await Task.Delay(Timeout.Infinite, stop.Token);
}
catch (OperationCanceledException)
{
}
string stopping = $"stopping; {kvmd.Supervisor.Running.Count} VM(s) go on running";
Console.Error.WriteLine($"{program}: {stopping}");
systemd.Stopping(stopping);
await kvmd.DisposeAsync();
try
{
    await watchdog;
}
catch (OperationCanceledException)
{
}
return 0;
