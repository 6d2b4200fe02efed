using System.CommandLine;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;
using Kvm.Rpc;
using Kvm.Control;

namespace Kvm.Cli;

/// <summary>vmctl control (a VM's control socket) and vmctl console (its console socket).</summary>
public static class ControlCommands
{
    private const int ExitFailure = 1;

    /// <summary>Ctrl-]: detaches from a console, as in telnet and virsh.</summary>
    public const byte DetachKey = 0x1d;

    public static Command Control()
    {
        var cmd = new Command("control",
            "Talk to a running VM through its control socket (kvm-vmm --control, vmctl run --control).\n" +
            "Exit status: 0 done; 1 when the VM refused or the socket could not be reached (the reason follows).");
        var json = VmControlJson.Default;
        cmd.Subcommands.Add(Verb("status", "Run state, vCPU states, uptime, exits by reason.", json.VmStatus, PrintStatus));
        cmd.Subcommands.Add(Verb("pause", "Pause every vCPU.", json.StateChange, r => Console.WriteLine(r.State)));
        cmd.Subcommands.Add(Resume());
        cmd.Subcommands.Add(Stop());
        cmd.Subcommands.Add(Save());
        cmd.Subcommands.Add(Checkpoint());
        cmd.Subcommands.Add(Verb("suspend",
            "Suspend the VM for a hand-over: pause it, keep its RAM where it is, capture its device and vCPU state\n" +
            "and close its disk images (which may then be moved or replaced by a copy). 'vmctl control resume\n" +
            "SOCKET [--disk ...] [--vmm PATH]' resumes it in a new kvm-vmm.",
            json.SuspendResult, r => Console.WriteLine($"{r.State} ({(r.Seconds * 1000).ToString("0.#", CultureInfo.InvariantCulture)} ms; state {r.StateBytes} bytes)")));
        cmd.Subcommands.Add(Upgrade());
        cmd.Subcommands.Add(Verb("stats", "Per-disk requests, bytes and service times; per-NIC frames, drops and uplinks; memory.", json.VmStats, PrintStats));
        cmd.Subcommands.Add(Verb("devices", "The VM's devices: id, kind, where the guest finds them.", json.VmDevices, PrintDevices));
        return cmd;
    }

    private static Argument<string> SocketArgument() => new("SOCKET") { Description = "the VM's control socket" };

    /// <summary>A verb that calls the method of its own name without parameters and prints the reply.</summary>
    private static Command Verb<T>(string name, string description, JsonTypeInfo<T> reply, Action<T> print)
    {
        var socket = SocketArgument();
        var json = new Option<bool>("--json") { Description = "print the reply as JSON" };
        var cmd = new Command(name, description) { socket, json };
        cmd.SetAction(p => Guard(p.GetRequiredValue(socket), client =>
        {
            var result = client.CallAsync(name, reply).GetAwaiter().GetResult();
            if (p.GetValue(json))
                Console.WriteLine(JsonSerializer.Serialize(result, reply));
            else
                print(result);
            return 0;
        }));
        return cmd;
    }

    private static Command Stop()
    {
        var socket = SocketArgument();
        var force = new Option<bool>("--force", "-f") { Description = "stop at once, without asking the guest" };
        var timeout = new Option<double>("--timeout", "-t")
        {
            Description = "seconds to wait for the guest to power off after the ACPI power button before forcing the stop",
            DefaultValueFactory = _ => VmControl.DefaultStopTimeoutSeconds,
        };
        var json = new Option<bool>("--json") { Description = "print the reply as JSON" };
        var cmd = new Command("stop", "Stop the VM: the ACPI power button first, forced after --timeout; or forced at once with --force.")
        {
            socket, force, timeout, json,
        };
        cmd.SetAction(p => Guard(p.GetRequiredValue(socket), client =>
        {
            var result = client.CallAsync("stop", new StopRequest(p.GetValue(force), p.GetValue(timeout)),
                VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult).GetAwaiter().GetResult();
            if (p.GetValue(json))
                Console.WriteLine(JsonSerializer.Serialize(result, VmControlJson.Default.StopResult));
            else
                Console.WriteLine($"{result.Outcome}: {result.Reason} ({result.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s)");
            return 0;
        }));
        return cmd;
    }

    private static Command Save()
    {
        var socket = SocketArgument();
        var directory = new Argument<string>("DIR") { Description = "the snapshot directory (created if missing; a snapshot there is replaced once the new one is whole)" };
        var stop = new Option<bool>("--stop") { Description = "stop the VM once it is saved (default: it carries on as it was)" };
        var workingSet = new Option<double?>("--working-set")
        {
            Description = "after the save point, let the VM run SECONDS more (e.g. 1) while every guest page it touches is traced, and " +
                          "record those pages in the snapshot as its working set, which 'vmctl restore DIR --memory lazy' loads before " +
                          "the vCPUs start (then --stop stops it). Needs userfaultfd minor faults (root, Linux 5.14+) and RAM in a memfd, " +
                          "tmpfs or hugetlbfs; without them the snapshot has no working set and the reply says why",
            HelpName = "SECONDS",
        };
        var requireWorkingSet = new Option<bool>("--require-working-set")
        {
            Description = "with --working-set: fail if the working set cannot be traced (the snapshot is written all the same)",
        };
        var json = new Option<bool>("--json") { Description = "print the reply as JSON" };
        var cmd = new Command("save",
            "Save the VM into DIR: pause it (no disk request in flight, images flushed), write its state and RAM,\n" +
            "then let it carry on, or stop it with --stop. 'vmctl restore DIR' starts it again where it was.\n" +
            "With --working-set SECONDS it runs that long first while the pages it touches are recorded.")
        {
            socket, directory, stop, workingSet, requireWorkingSet, json,
        };
        cmd.SetAction(p => Guard(p.GetRequiredValue(socket), client =>
        {
            string dir = Path.GetFullPath(p.GetRequiredValue(directory));
            var result = client.CallAsync("save", new SaveRequest(dir, p.GetValue(stop), p.GetValue(workingSet), p.GetValue(requireWorkingSet)),
                VmControlJson.Default.SaveRequest, VmControlJson.Default.SaveResult).GetAwaiter().GetResult();
            if (p.GetValue(json))
                Console.WriteLine(JsonSerializer.Serialize(result, VmControlJson.Default.SaveResult));
            else
                Console.WriteLine($"saved to {result.Directory}: {result.MemoryBytes} bytes of RAM ({result.MemoryBytesWritten} not zero), " +
                                  $"state {result.StateBytes} bytes; guest paused {(result.PausedSeconds * 1000).ToString("0.#", CultureInfo.InvariantCulture)} ms, " +
                                  $"{result.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s in all; the VM is {result.State}" +
                                  (result.WorkingSetPages is { } pages
                                      ? $"; working set: {pages} pages in {result.WorkingSetRanges} ranges, traced over {result.WorkingSetSeconds?.ToString("0.###", CultureInfo.InvariantCulture)} s"
                                      : result.WorkingSetSkipped is { } why ? $"; no working set: {why}" : ""));
            return 0;
        }));
        return cmd;
    }

    /// <summary>The options 'vmctl control checkpoint' and 'vmctl checkpoint' share.</summary>
    internal static (Option<string?> Rate, Option<bool> CopyDisks) CheckpointOptions() => (
        new Option<string?>("--rate")
        {
            Description = "write guest RAM out at most this fast per second while the VM runs (e.g. 200M; default: as fast as the disk takes it)",
            HelpName = "BYTES",
        },
        new Option<bool>("--copy-disks")
        {
            Description = "copy each disk's content at the checkpoint into DIR (a whole image); default: DIR holds a copy-on-write\n" +
                          "child of the image the VM leaves at the checkpoint, which stays frozen (read-only) for it",
        });

    /// <summary>What a checkpoint does, for both commands' help.</summary>
    internal const string CheckpointHelp =
        "The guest stops only while its state is saved, its RAM is write-protected and its disks move onto new\n" +
        "copy-on-write top images (made beside them beforehand); then it runs on while its RAM as it was at the\n" +
        "stop is written out (a guest write to a page not yet saved waits for it). The checkpoint is a snapshot:\n" +
        "'vmctl restore DIR' starts it, eagerly or lazily. Each checkpoint adds a layer to the VM's disks\n" +
        "(DISK.ckpt-ID.qcow2); the layer below stays read-only; 'vmctl delete-checkpoint DIR' folds it away.\n" +
        "Needs userfaultfd write-protection of shared memory (Linux 5.19+).";

    /// <summary>--rate as bytes per second (null when not given); a usage error names the option.</summary>
    internal static long? ParseRate(string? text)
    {
        try
        {
            return text is null ? null : checked((long)Kvm.Vmm.Machine.VmSpec.ParseSize(text));
        }
        catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
        {
            throw new RpcException(RpcErrorCode.InvalidParams, $"--rate: {e.Message}");
        }
    }

    /// <summary>A checkpoint's reply as lines: the stop and its steps, the phases, RAM, and per disk what the VM writes now.</summary>
    internal static void PrintCheckpoint(CheckpointResult r, string who)
    {
        Console.WriteLine($"{who}checkpoint in {r.Directory}: guest stopped {(r.StopSeconds * 1000).ToString("0.##", CultureInfo.InvariantCulture)} ms " +
                          $"({string.Join(", ", r.StopSteps.Select(s => $"{s.Name} {s.Milliseconds.ToString("0.##", CultureInfo.InvariantCulture)} ms"))}), " +
                          $"{r.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s in all " +
                          $"({string.Join(", ", r.Phases.Select(s => $"{s.Name} {(s.Milliseconds / 1000).ToString("0.###", CultureInfo.InvariantCulture)} s"))}); " +
                          $"{r.MemoryBytes} bytes of RAM ({r.MemoryBytesWritten} not zero), " +
                          $"{r.WritesWaited} guest writes waited for their page; the VM is {r.State}");
        for (int i = 0; i < r.Disks.Count; i++)
            Console.WriteLine(r.Layers[i] is { } layer
                ? $"  disk {i}: checkpoint {r.Disks[i]}; the VM now writes {layer}"
                : $"  disk {i}: read-only, {r.Disks[i]}");
    }

    private static Command Checkpoint()
    {
        var socket = SocketArgument();
        var directory = new Argument<string>("DIR") { Description = "the checkpoint directory (new or empty; created if missing)" };
        var (rate, copyDisks) = CheckpointOptions();
        var json = new Option<bool>("--json") { Description = "print the reply as JSON" };
        var cmd = new Command("checkpoint", "Take a live checkpoint of the VM into DIR. " + CheckpointHelp + "\n" +
            "For a VM kvmd runs, use 'vmctl checkpoint NAME DIR': kvmd records the VM's new disk layers.")
        {
            socket, directory, rate, copyDisks, json,
        };
        cmd.SetAction(p => Guard(p.GetRequiredValue(socket), client =>
        {
            string dir = Path.GetFullPath(p.GetRequiredValue(directory));
            long? bytesPerSecond = ParseRate(p.GetValue(rate));
            var r = client.CallAsync("checkpoint", new CheckpointRequest(dir, bytesPerSecond, p.GetValue(copyDisks)),
                VmControlJson.Default.CheckpointRequest, VmControlJson.Default.CheckpointResult).GetAwaiter().GetResult();
            if (p.GetValue(json))
                Console.WriteLine(JsonSerializer.Serialize(r, VmControlJson.Default.CheckpointResult));
            else
                PrintCheckpoint(r, "");
            return 0;
        }));
        return cmd;
    }

    private static (Option<string> Vmm, Option<string[]> Disks) HandoverOptions() => (
        new Option<string>("--vmm") { Description = "the kvm-vmm binary to hand the VM to (default: the running one's own)" },
        new Option<string[]>("--disk", "-d")
        {
            Description = "the VM's disks in the new process, all of them, in order, as for 'vmctl run --disk': the same disks,\n" +
                "each perhaps at another path (the image moved, or a copy of the same content and size) or with\n" +
                "another serial, then any disks to add. Without --disk the disks stay as they are.",
            AllowMultipleArgumentsPerToken = false,
        });

    private static HandoverRequest HandoverRequestOf(ParseResult p, Option<string> vmm, Option<string[]> disks)
    {
        string? binary = p.GetValue(vmm);
        var list = p.GetValue(disks);
        try
        {
            return new HandoverRequest(
                binary is null ? null : Path.GetFullPath(binary),
                list is null || list.Length == 0 ? null
                    : list.Select(Kvm.Vmm.Machine.DiskSpec.Parse).Select(d => Kvm.Vmm.Machine.DiskSpecDocument.From(d with { Path = Path.GetFullPath(d.Path) })).ToList());
        }
        catch (ArgumentException e)
        {
            throw new RpcException(RpcErrorCode.InvalidParams, $"--disk: {e.Message}");
        }
    }

    private static void PrintHandover(HandoverResult r, bool json)
    {
        if (json)
        {
            Console.WriteLine(JsonSerializer.Serialize(r, VmControlJson.Default.HandoverResult));
            return;
        }
        Console.WriteLine($"running in {r.Vmm} (pid {r.Pid}); guest paused {(r.PausedSeconds * 1000).ToString("0.#", CultureInfo.InvariantCulture)} ms, " +
                          $"{r.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s in all");
        foreach (var change in r.Changes)
            Console.WriteLine($"  {change}");
        if (r.Steps is { Count: > 0 } steps)
        {
            Console.WriteLine("where the pause went:");
            foreach (var step in steps)
                Console.WriteLine($"  {step.Process,-4}{step.Name,-36}{step.Milliseconds.ToString("0.0", CultureInfo.InvariantCulture),9} ms");
        }
    }

    private static Command Resume()
    {
        var socket = SocketArgument();
        var (vmm, disks) = HandoverOptions();
        var json = new Option<bool>("--json") { Description = "print the reply as JSON" };
        var cmd = new Command("resume",
            "Resume a paused VM. A suspended one ('vmctl control suspend') resumes in a new kvm-vmm (--vmm), with\n" +
            "the disks --disk gives: the guest notices nothing; the pause since the suspend is reported.")
        {
            socket, vmm, disks, json,
        };
        cmd.SetAction(p => Guard(p.GetRequiredValue(socket), client =>
        {
            var status = client.CallAsync("status", VmControlJson.Default.VmStatus).GetAwaiter().GetResult();
            var request = HandoverRequestOf(p, vmm, disks);
            if (status.State != "suspended")
            {
                if (request.Vmm is not null || request.Disks is not null)
                    throw new RpcException(RpcErrorCode.InvalidState, $"resume: the VM is {status.State}, not suspended: --vmm and --disk apply to a suspended VM ('vmctl control suspend', or 'vmctl control upgrade')");
                var r = client.CallAsync("resume", VmControlJson.Default.StateChange).GetAwaiter().GetResult();
                Console.WriteLine(p.GetValue(json) ? JsonSerializer.Serialize(r, VmControlJson.Default.StateChange) : r.State);
                return 0;
            }
            var result = client.CallAsync("handover", request, VmControlJson.Default.HandoverRequest, VmControlJson.Default.HandoverResult).GetAwaiter().GetResult();
            PrintHandover(result, p.GetValue(json));
            return 0;
        }));
        return cmd;
    }

    private static Command Upgrade()
    {
        var socket = SocketArgument();
        var (vmm, disks) = HandoverOptions();
        var json = new Option<bool>("--json") { Description = "print the reply as JSON" };
        var cmd = new Command("upgrade",
            "Hand the running VM to a new kvm-vmm process (--vmm: a newer binary; by default the same one) in place:\n" +
            "the new process starts and builds the machine on the VM's RAM (its memfd goes over: nothing of RAM is\n" +
            "copied) while the guest runs; then the guest pauses, its state goes over, and the new process takes the\n" +
            "control and console sockets and runs it. Prints how long the guest was paused and where the pause went.\n" +
            "Console clients are disconnected and attach again. If the new process cannot take the VM, the VM stays\n" +
            "suspended in the old one and 'vmctl control resume SOCKET' tries again.")
        {
            socket, vmm, disks, json,
        };
        cmd.SetAction(p => Guard(p.GetRequiredValue(socket), client =>
        {
            var result = client.CallAsync("handover", HandoverRequestOf(p, vmm, disks), VmControlJson.Default.HandoverRequest,
                VmControlJson.Default.HandoverResult).GetAwaiter().GetResult();
            PrintHandover(result, p.GetValue(json));
            return 0;
        }));
        return cmd;
    }

    /// <summary>Connects to <paramref name="what"/> at <paramref name="socket"/> and runs <paramref name="action"/>; an RPC error is printed as its chain of observations and gives status 1.</summary>
    internal static int Guard(string socket, Func<RpcClient, int> action, string what = "the VM")
    {
        try
        {
            using var client = RpcClient.Connect(socket, what);
            return action(client);
        }
        catch (RpcException e)
        {
            Console.Error.WriteLine($"{VmctlCommands.Program}: {e.Describe()}");
            return ExitFailure;
        }
    }

    private static void PrintStatus(VmStatus s)
    {
        Console.WriteLine($"state: {s.State} (kvm-vmm pid {s.Pid}, up {s.UptimeSeconds.ToString("0.###", CultureInfo.InvariantCulture)} s)");
        Console.WriteLine($"vcpus: {string.Join(", ", s.Vcpus.Select(v => $"{v.Id} {v.State}"))}");
        Console.WriteLine($"exits: {(s.Exits.Count == 0 ? "none" : string.Join(", ", s.Exits.Select(e => $"{e.Key} {e.Value}")))}");
        if (s.StopReason is not null)
            Console.WriteLine($"stopped: {s.StopReason}");
        if (s.PausedBy is not null)
            Console.WriteLine($"paused by {s.PausedBy} (vmctl control resume to go on)");
        if (s.GenerationId is { } id)
            Console.WriteLine($"generation id: {id}");
    }

    private static void PrintStats(VmStats s)
    {
        Console.WriteLine($"memory: guest {s.Memory.GuestBytes} bytes, kvm-vmm resident {s.Memory.ResidentBytes} bytes");
        if (s.Memory.Load is { } l)
            Console.WriteLine($"lazy restore: {l.BytesOnTouch + l.BytesFirst + l.BytesInBackground} of {l.BytesTotal} bytes loaded " +
                              $"({l.BytesFirst} first, {l.BytesOnTouch} on touch, {l.BytesInBackground} in the background), {l.Faults} touches waited" +
                              (l.Seconds is { } t ? $", all in {t.ToString("0.###", CultureInfo.InvariantCulture)} s" : ", still loading"));
        foreach (var d in s.Disks)
        {
            Console.WriteLine($"{d.Id}: {d.Image}{(d.ReadOnly ? " (read-only)" : "")}");
            Console.WriteLine($"  reads {d.Reads} ({d.BytesRead} bytes), writes {d.Writes} ({d.BytesWritten} bytes), flushes {d.Flushes}, " +
                              $"discards {d.Discards}, write-zeroes {d.WriteZeroes}, other {d.Other}, failed {d.Failed}, I/O errors {d.IoErrors}");
            Console.WriteLine($"  service time: mean {d.MeanMicroseconds.ToString("0.#", CultureInfo.InvariantCulture)} us, longest {d.MaxMicroseconds} us");
        }
        foreach (var n in s.Nics ?? [])
        {
            Console.WriteLine($"{n.Id}: {n.Mac}, {n.ActivePairs} of {n.QueuePairs} queue pairs in use" +
                              (n.Policy is null ? "" : $", team {n.Policy}, {n.Failovers} failovers"));
            if (n.TxRate is not null || n.RxRate is not null)
                Console.WriteLine($"  rate now: sending {(n.TxRate is { } t ? $"{t / 1e6:0.###} Mbit/s" : "unlimited")}, receiving " +
                                  $"{(n.RxRate is { } r ? $"{r / 1e6:0.###} Mbit/s" : "unlimited")}" +
                                  (n.BandwidthGroup is null ? "" : $" (bandwidth group {n.BandwidthGroup}, {n.BandwidthMembers} members)"));
            Console.WriteLine($"  received {n.RxPackets} frames ({n.RxBytes} bytes), filtered {n.RxFiltered}, dropped {n.RxDropped}" +
                              (n.RxDosLimited is > 0 ? $" ({n.RxDosLimited} over a DoS rule's limit)" : ""));
            Console.WriteLine($"  sent {n.TxPackets} frames ({n.TxBytes} bytes); dropped: spoofed source {n.TxSpoofed}, too long {n.TxTooLong}, " +
                              $"malformed {n.TxMalformed}, refused by the uplink {n.TxBackendDropped}" +
                              (n.TxDosLimited is > 0 ? $", over a DoS rule's limit {n.TxDosLimited}" : ""));
            foreach (var u in n.Uplinks)
                Console.WriteLine($"  {u.Name}: {(u.Up ? "up" : "DOWN")}{(u.Active ? ", active" : n.Policy is null ? "" : ", standby")}" +
                                  (u.TxPackets is null ? "" : $", sent {u.TxPackets} ({u.TxBytes} bytes), received {u.RxPackets} ({u.RxBytes} bytes), " +
                                   $"dropped {u.TxDropped} out and {u.RxDroppedOnStandby} in on standby, {u.Failures} failures") +
                                  (u.ProbesSent is null ? "" : $", ARP probes {u.ProbesAnswered} answered of {u.ProbesSent}"));
        }
    }

    private static void PrintDevices(VmDevices d)
    {
        foreach (var x in d.Devices)
            Console.WriteLine($"{x.Id,-28} {x.Kind,-18} {x.Location,-22} {x.Detail}");
    }

    public static Command ConsoleCommand()
    {
        var target = new Argument<string>("NAME|SOCKET")
        {
            Description = "a VM kvmd runs (by name), or a console socket (a path with a '/': kvm-vmm --console, vmctl run --console)",
        };
        var cmd = new Command("console",
            "Attach this terminal to a VM's serial console: what the guest writes appears here (the last 64 KiB\n" +
            "first), what you type goes to the guest. Ctrl-] detaches; the VM keeps running. Without a terminal,\n" +
            "standard input is sent and the output copied until the VM's console closes.") { target };
        cmd.SetAction(p => p.GetRequiredValue(target) is var t && t.Contains('/', StringComparison.Ordinal)
            ? Attach(t)
            : KvmdCommands.AttachByName(p, t));
        return cmd;
    }

    internal static int Attach(string path)
    {
        var sock = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            sock.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e)
        {
            sock.Dispose();
            Console.Error.WriteLine($"{VmctlCommands.Program}: cannot attach to the console at {path}: {(File.Exists(path) ? e.Message : "no such socket (is the VM running?)")}");
            return ExitFailure;
        }
        bool tty = Libc.IsATty(0) == 1;
        if (tty)
        {
            KvmShim.TermCbreak(0);
            Console.Error.WriteLine($"{VmctlCommands.Program}: attached to {path}; Ctrl-] detaches");
        }
        var stdout = new StdioStream(StdioHandle.Output, FileAccess.Write);
        var detached = new ManualResetEventSlim();
        var input = new Thread(() =>
        {
            var stdin = new StdioStream(StdioHandle.Input, FileAccess.Read);
            var buf = new byte[256];
            try
            {
                while (true)
                {
                    int n = stdin.Read(buf, 0, buf.Length);
                    if (n <= 0)
                        return;
                    int key = tty ? Array.IndexOf(buf, DetachKey, 0, n) : -1;
                    if (key >= 0)
                    {
                        if (key > 0)
                            sock.Send(buf.AsSpan(0, key));
                        detached.Set();
                        sock.Shutdown(SocketShutdown.Both);
                        return;
                    }
                    sock.Send(buf.AsSpan(0, n));
                }
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
            {
            }
        }) { IsBackground = true };
        input.Start();
        var buffer = new byte[4096];
        try
        {
            while (true)
            {
                int n = sock.Receive(buffer);
                if (n <= 0)
                    break;
                stdout.Write(buffer, 0, n);
                stdout.Flush();
            }
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            // The VM's console went away, or our standard output was closed (a pipe whose reader left).
        }
        finally
        {
            sock.Dispose();
            if (tty)
                KvmShim.TermRestore();
        }
        if (tty)
            Console.Error.WriteLine(detached.IsSet ? $"\r\n{VmctlCommands.Program}: detached" : $"\r\n{VmctlCommands.Program}: the console closed (the VM stopped)");
        return 0;
    }
}
