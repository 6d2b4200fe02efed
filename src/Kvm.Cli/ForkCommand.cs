using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Control;
using Kvm.Rpc;

namespace Kvm.Cli;

/// <summary>One fork 'vmctl fork' started: its number, process, sockets, log and the disks it writes.</summary>
public sealed record ForkInfo(int Index, string Directory, int Pid, string ControlSocket, string ConsoleSocket, string Log, IReadOnlyList<string> Disks,
    Guid? GenerationId = null);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(ForkInfo))]
internal sealed partial class ForkJson : JsonSerializerContext;

/// <summary>
/// 'vmctl fork DIR --into OUT --count N': N forks of the snapshot in DIR (kvm-vmm --restore DIR
/// --fork OUT/fork-I), each a kvm-vmm of its own in a new session, served on its control and
/// console sockets in OUT/fork-I; returns once every one runs.
/// </summary>
internal static class ForkCommand
{
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(60);

    public static Command Build()
    {
        var directory = new Argument<string>("NAME|DIR")
        {
            Description = "through kvmd: the VM to fork (it must run here: kvmd checkpoints it first), or the forks' base name with\n" +
                          "--from; with --into: the snapshot to fork, a directory 'vmctl control save' or 'vmctl control checkpoint' wrote",
        };
        var into = new Option<string>("--into")
        {
            Description = "fork the snapshot DIR into processes of your own, not through kvmd: OUT/fork-1, OUT/fork-2... each with\n" +
                          "its disks, control and console sockets, log and exit file",
            HelpName = "OUT",
        };
        var from = new Option<string>("--from")
        {
            Description = "through kvmd: fork the snapshot in DIR (saved with --stop, or a checkpoint) instead of a checkpoint of VM NAME",
            HelpName = "DIR",
        };
        var count = new Option<int>("--count", "-n") { Description = "how many forks", DefaultValueFactory = _ => 1 };
        var first = new Option<int>("--first") { Description = "with --into: the number of the first fork (OUT/fork-FIRST...)", DefaultValueFactory = _ => 1 };
        var vmm = new Option<string>("--vmm") { Description = "with --into: the kvm-vmm to run the forks with (default: the one beside vmctl)" };
        var json = new Option<bool>("--json") { Description = "print one JSON object per fork (through kvmd: kvmd's whole reply)" };
        var cmd = new Command("fork",
            "Start forks of a VM: copies that each carry on from one instant, at once, each with an identity of its own.\n" +
            "'vmctl fork NAME --count N' asks kvmd: it checkpoints the running VM NAME (which goes on running), or takes\n" +
            "the snapshot --from DIR, and makes VMs NAME-1, NAME-2... (the first free numbers), each in the inventory\n" +
            "like any VM (start, stop, save, delete them by name). 'vmctl fork DIR --into OUT' starts the forks as\n" +
            "kvm-vmm processes of your own (a new session: they outlive vmctl), without kvmd.\n" +
            "A fork's RAM is a private copy-on-write mapping of the snapshot's memory file: nothing is copied up front\n" +
            "and the forks share every page none of them wrote. Each writable disk becomes a new qcow2 child of the\n" +
            "snapshot's (the snapshot's disk is made read-only: it backs the forks), each NIC gets a new random MAC and\n" +
            "a tap of its own (named by the kernel, on the snapshot's bridge), and the VM a new generation id (ACPI\n" +
            "VMGENID: a guest with the vmgenid driver reseeds its random state). Drive a fork of your own with\n" +
            "'vmctl control ... OUT/fork-I/control.sock' and 'vmctl console OUT/fork-I/console.sock'; save one with\n" +
            "--stop and fork that snapshot for forks of a fork. The snapshot's files must not change while forks run:\n" +
            "fork a checkpoint of a running VM, or a snapshot saved with --stop.\n" +
            "Exit status: 0 when every fork runs; 1 when one did not start (those started before it run on); 2 for a usage error.")
        {
            directory, into, from, count, first, vmm, json,
        };
        cmd.SetAction(p =>
        {
            int n = p.GetValue(count), start = p.GetValue(first);
            if (p.GetValue(into) is null)
            {
                string arg = p.GetRequiredValue(directory);
                if (p.GetResult(first) is { Implicit: false } || p.GetValue(vmm) is not null)
                {
                    Console.Error.WriteLine($"{VmctlCommands.Program}: --first and --vmm go with --into (forks of your own); kvmd names and runs its forks itself");
                    return VmctlCommands.ExitUsage;
                }
                if (arg.Contains('/', StringComparison.Ordinal))
                {
                    Console.Error.WriteLine($"{VmctlCommands.Program}: '{arg}' is not a VM name: fork a snapshot into processes of your own with 'vmctl fork {arg} --into OUT', or through kvmd with 'vmctl fork NAME --from {arg}'");
                    return VmctlCommands.ExitUsage;
                }
                if (n < 1 || n > Kvm.Cluster.Kvmd.MaxForks)
                {
                    Console.Error.WriteLine($"{VmctlCommands.Program}: --count {n}: kvmd makes 1 to {Kvm.Cluster.Kvmd.MaxForks} forks at a time");
                    return VmctlCommands.ExitUsage;
                }
                return KvmdCommands.Call(p, client =>
                {
                    var request = new Kvm.Cluster.ForkVmRequest(arg, n, p.GetValue(from) is { } f ? Path.GetFullPath(f) : null);
                    var r = client.CallAsync("vm.fork", request, Kvm.Cluster.KvmdJson.Default.ForkVmRequest, Kvm.Cluster.KvmdJson.Default.VmForked)
                        .GetAwaiter().GetResult();
                    if (p.GetValue(json))
                    {
                        Console.WriteLine(JsonSerializer.Serialize(r, Kvm.Cluster.KvmdJson.Default.VmForked));
                        return 0;
                    }
                    if (r.Checkpoint is { } c)
                        ControlCommands.PrintCheckpoint(c, $"{arg}: ");
                    foreach (var fork in r.Forks)
                        Console.WriteLine($"{fork.Vm.Name}: {fork.Vm.ActualState}{(fork.Vm.Pid is { } pid ? $" (kvm-vmm pid {pid})" : "")}, a fork of {r.Template}" +
                                          (fork.Macs.Count > 0 ? $", MAC {string.Join(", ", fork.Macs)}" : "") +
                                          (fork.GenerationId is { } g ? $", generation id {g}" : "") +
                                          (fork.Disks.Count > 0 ? $", disks {string.Join(", ", fork.Disks)}" : ""));
                    return 0;
                });
            }
            if (p.GetValue(from) is not null)
            {
                Console.Error.WriteLine($"{VmctlCommands.Program}: --from goes with forks through kvmd; with --into, the snapshot to fork is the argument");
                return VmctlCommands.ExitUsage;
            }
            if (n < 1 || n > 4096)
            {
                Console.Error.WriteLine($"{VmctlCommands.Program}: --count {n}: give 1 to 4096 forks");
                return VmctlCommands.ExitUsage;
            }
            if (start < 0)
            {
                Console.Error.WriteLine($"{VmctlCommands.Program}: --first {start}: fork numbers start at 0 or more");
                return VmctlCommands.ExitUsage;
            }
            string template = Path.GetFullPath(p.GetRequiredValue(directory));
            string output = Path.GetFullPath(p.GetValue(into)!);
            string program = p.GetValue(vmm) is { } v ? Path.GetFullPath(v) : VmControl.DefaultSuccessor();
            try
            {
                // Checked once, before any process starts: a bad snapshot is one error, not N.
                Kvm.Vmm.Snapshot.SnapshotReader.Read(template);
            }
            catch (Exception e) when (e is Kvm.Vmm.Snapshot.SnapshotFormatException or IOException or UnauthorizedAccessException)
            {
                Console.Error.WriteLine($"{VmctlCommands.Program}: {e.Message}");
                return 1;
            }
            for (int i = start; i < start + n; i++)
            {
                ForkInfo fork;
                try
                {
                    fork = StartFork(program, template, output, i);
                }
                catch (Exception e) when (e is IOException or RpcException or System.ComponentModel.Win32Exception or TimeoutException)
                {
                    Console.Error.WriteLine($"{VmctlCommands.Program}: fork {i}: {e.Message}");
                    return 1;
                }
                Console.WriteLine(p.GetValue(json)
                    ? JsonSerializer.Serialize(fork, ForkJson.Default.ForkInfo)
                    : $"fork-{i}: kvm-vmm pid {fork.Pid}, control {fork.ControlSocket}, console {fork.ConsoleSocket}" +
                      (fork.GenerationId is { } g ? $", generation id {g}" : "") +
                      (fork.Disks.Count > 0 ? $", disks {string.Join(", ", fork.Disks)}" : ""));
            }
            return 0;
        });
        return cmd;
    }

    /// <summary>Starts fork <paramref name="index"/> and waits until its control socket answers from its process.</summary>
    private static ForkInfo StartFork(string program, string template, string output, int index)
    {
        string dir = Path.Combine(output, $"fork-{index.ToString(CultureInfo.InvariantCulture)}");
        Directory.CreateDirectory(dir);
        string control = Path.Combine(dir, "control.sock"), console = Path.Combine(dir, "console.sock");
        string log = Path.Combine(dir, "kvm-vmm.log"), exit = Path.Combine(dir, "exit");
        if (Path.Exists(control))
            throw new IOException($"{control} exists: is fork {index} running already? (a new fork goes into a new directory)");
        var info = new ProcessStartInfo(program)
        {
            UseShellExecute = false,
            RedirectStandardInput = true,
            WorkingDirectory = "/",
        };
        foreach (var a in new[]
                 {
                     "--restore", template, "--fork", dir, "--control", control, "--console", console,
                     "--log", log, "--exit-file", exit, "--new-session",
                 })
            info.ArgumentList.Add(a);
        using var process = Process.Start(info) ?? throw new IOException($"cannot run {program}");
        process.StandardInput.Close();
        var clock = Stopwatch.StartNew();
        while (true)
        {
            if (process.HasExited)
                throw new IOException($"kvm-vmm (pid {process.Id}) exited with status {process.ExitCode} before the fork ran: {Tail(log)}");
            if (File.Exists(control) && TryStatus(control) is { } status && status.Pid == process.Id)
                return new ForkInfo(index, dir, process.Id, control, console, log, status.Disks ?? [], status.GenerationId);
            if (clock.Elapsed > StartTimeout)
                throw new TimeoutException($"kvm-vmm (pid {process.Id}) did not answer on {control} within {StartTimeout.TotalSeconds} s (log: {log})");
            Thread.Sleep(20);
        }
    }

    private static VmStatus? TryStatus(string socket)
    {
        try
        {
            using var client = RpcClient.Connect(socket, "the fork");
            return client.CallAsync("status", VmControlJson.Default.VmStatus).GetAwaiter().GetResult();
        }
        catch (RpcException)
        {
            return null;
        }
    }

    /// <summary>The last lines of kvm-vmm's log: why it did not start.</summary>
    private static string Tail(string log)
    {
        try
        {
            var lines = File.ReadAllLines(log);
            return string.Join(" | ", lines.Skip(Math.Max(0, lines.Length - 3)));
        }
        catch (IOException)
        {
            return $"(no log at {log})";
        }
    }
}
