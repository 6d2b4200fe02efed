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
        var directory = new Argument<string>("DIR") { Description = "the snapshot to fork: a directory 'vmctl control save' or 'vmctl control checkpoint' wrote" };
        var into = new Option<string>("--into")
        {
            Description = "where the forks go: OUT/fork-1, OUT/fork-2... each with its disks, control and console sockets, log and exit file",
            HelpName = "OUT",
            Required = true,
        };
        var count = new Option<int>("--count", "-n") { Description = "how many forks", DefaultValueFactory = _ => 1 };
        var first = new Option<int>("--first") { Description = "the number of the first fork (OUT/fork-FIRST...)", DefaultValueFactory = _ => 1 };
        var vmm = new Option<string>("--vmm") { Description = "the kvm-vmm to run the forks with (default: the one beside vmctl)" };
        var json = new Option<bool>("--json") { Description = "print one JSON object per fork" };
        var cmd = new Command("fork",
            "Start forks of a saved VM: copies that each carry on from the snapshot's instant, in a kvm-vmm of their\n" +
            "own (a new session: they outlive vmctl), at once. A fork's RAM is a private copy-on-write mapping of the\n" +
            "snapshot's memory file: nothing is copied up front and the forks share every page none of them wrote.\n" +
            "Each writable disk becomes a new qcow2 child of the snapshot's in the fork's directory (the snapshot's\n" +
            "disk is made read-only: it backs the forks), each NIC gets a new random MAC. Drive a fork with\n" +
            "'vmctl control ... OUT/fork-I/control.sock' and 'vmctl console OUT/fork-I/console.sock'; save one with\n" +
            "--stop and fork that snapshot for forks of a fork. The snapshot's files must not change while forks run:\n" +
            "fork a checkpoint of a running VM, or a snapshot saved with --stop.\n" +
            "Exit status: 0 when every fork runs; 1 when one did not start (those started before it run on).")
        {
            directory, into, count, first, vmm, json,
        };
        cmd.SetAction(p =>
        {
            int n = p.GetValue(count), start = p.GetValue(first);
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
            string output = Path.GetFullPath(p.GetRequiredValue(into));
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
