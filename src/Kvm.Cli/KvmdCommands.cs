using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Kvm.Cluster;
using Kvm.Control;
using Kvm.Rpc;
using Kvm.Vmm.Machine;

namespace Kvm.Cli;

/// <summary>
/// The verbs that manage VMs through kvmd (virsh's habits): create, start, stop, pause, resume,
/// save, checkpoint, upgrade, delete, list, show, console, events, hosts. Each talks to kvmd's socket (--connect).
/// </summary>
public static class KvmdCommands
{
    public const int ExitFailure = 1;
    public const string DefaultSocket = "/run/kvm/kvmd.sock";

    /// <summary>kvmd's socket: --connect, else $KVMD_SOCKET, else /run/kvm/kvmd.sock. Recursive: every verb takes it.</summary>
    public static readonly Option<string> Connect = new("--connect")
    {
        Description = $"kvmd's socket (default: $KVMD_SOCKET, else {DefaultSocket})",
        HelpName = "SOCKET",
        Recursive = true,
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("KVMD_SOCKET") is { Length: > 0 } s ? s : DefaultSocket,
    };

    public const string ExitStatuses = "Exit status: 0 done; 1 when kvmd refused (the reason follows) or could not be reached; 2 for a usage error.";

    public static IEnumerable<Command> Build()
    {
        yield return Create();
        yield return Start();
        yield return Stop();
        yield return NameVerb("pause", "Pause a running VM (its vCPUs stop; its memory and devices stay).", "vm.pause", PrintInfo);
        yield return NameVerb("resume", "Resume a paused VM. One left suspended by an upgrade that failed resumes in a new kvm-vmm (as 'vmctl upgrade NAME').",
            "vm.resume", PrintInfo);
        yield return Save();
        yield return Checkpoint();
        yield return Upgrade();
        yield return Delete();
        yield return List();
        yield return Show();
        yield return Events();
        yield return Hosts();
        yield return Leases();
        yield return Disks();
    }

    private static Argument<string> NameArgument() => new("NAME") { Description = "the VM's name" };

    private static Option<bool> JsonOption() => new("--json") { Description = "print the reply as JSON" };

    /// <summary>Calls kvmd; an RPC error is printed as its chain of observations and gives status 1.</summary>
    internal static int Call(ParseResult parse, Func<RpcClient, int> action) =>
        ControlCommands.Guard(parse.GetRequiredValue(Connect), action, "kvmd");

    private static T Invoke<TParams, T>(RpcClient client, string method, TParams parameters, JsonTypeInfo<TParams> p, JsonTypeInfo<T> r) =>
        client.CallAsync(method, parameters, p, r).GetAwaiter().GetResult();

    private static Command NameVerb(string name, string description, string method, Action<VmInfo> print)
    {
        var vm = NameArgument();
        var json = JsonOption();
        var cmd = new Command(name, $"{description}\n{ExitStatuses}") { vm, json };
        cmd.SetAction(p => Call(p, client =>
        {
            var info = Invoke(client, method, new VmNameRequest(p.GetRequiredValue(vm)), KvmdJson.Default.VmNameRequest, KvmdJson.Default.VmInfo);
            Print(p.GetValue(json), info, KvmdJson.Default.VmInfo, print);
            return 0;
        }));
        return cmd;
    }

    private static void Print<T>(bool json, T value, JsonTypeInfo<T> info, Action<T> print)
    {
        if (json)
            Console.WriteLine(JsonSerializer.Serialize(value, info));
        else
            print(value);
    }

    private static void PrintInfo(VmInfo i) =>
        Console.WriteLine($"{i.Name}: {i.ActualState}{(i.Host is { } h ? $" on {h}" : "")}{(i.Pid is { } pid ? $" (kvm-vmm pid {pid})" : "")}");

    private static Command Start()
    {
        var vm = NameArgument();
        var wait = new Option<double>("--wait")
        {
            Description = "when a disk the VM needs is reserved by another VM, wait up to this many seconds for it to be released (kvmd is told of the release at once), instead of failing at once",
            HelpName = "SECONDS",
        };
        var from = new Option<string>("--from")
        {
            Description = "start the VM from a snapshot ('vmctl save NAME DIR'): it carries on where it was saved instead of booting. " +
                "The saved machine must match the VM's spec in memory, vCPUs and disks",
            HelpName = "DIR",
        };
        var memory = new Option<string>("--memory")
        {
            Description = "with --from: how guest RAM comes back: eager (the default: read all of it before the vCPUs start), lazy " +
                "(start at once; a page comes in when first touched, the rest in the background; needs userfaultfd) or mapped " +
                "(start at once on a private copy-on-write mapping of the snapshot's memory file; see 'vmctl restore --help')",
            HelpName = "eager|lazy|mapped",
        };
        memory.AcceptOnlyFromAmong("eager", "lazy", "mapped");
        var json = JsonOption();
        var cmd = new Command("start",
            "Start a VM defined with 'vmctl create'; returns once it runs. With --from DIR it starts from a snapshot\n" +
            "that 'vmctl save' wrote (kvmd's counterpart of 'vmctl restore DIR', which runs a snapshot in the foreground).\n" +
            ExitStatuses) { vm, wait, from, memory, json };
        cmd.SetAction(p =>
        {
            string? dir = p.GetValue(from);
            if (p.GetValue(memory) is not null && dir is null)
            {
                Console.Error.WriteLine($"{VmctlCommands.Program}: start: --memory applies only with --from (a start from a snapshot)");
                return VmctlCommands.ExitUsage;
            }
            return Call(p, client =>
            {
                var request = new StartVmRequest(p.GetRequiredValue(vm), p.GetValue(wait), dir is null ? null : Path.GetFullPath(dir), p.GetValue(memory));
                var info = Invoke(client, "vm.start", request, KvmdJson.Default.StartVmRequest, KvmdJson.Default.VmInfo);
                Print(p.GetValue(json), info, KvmdJson.Default.VmInfo, PrintInfo);
                return 0;
            });
        });
        return cmd;
    }

    private static Command Save()
    {
        var vm = NameArgument();
        var directory = new Argument<string>("DIR") { Description = "the snapshot directory (created if missing; a snapshot there is replaced once the new one is whole)" };
        var stop = new Option<bool>("--stop") { Description = "stop the VM once it is saved (recorded as a stop asked for; default: it carries on as it was)" };
        var workingSet = new Option<double?>("--working-set")
        {
            Description = "after the save point, let the VM run SECONDS more while every guest page it touches is traced, and record " +
                          "those pages in the snapshot as its working set, which 'vmctl start NAME --from DIR --memory lazy' loads first " +
                          "(as 'vmctl control save --working-set')",
            HelpName = "SECONDS",
        };
        var requireWorkingSet = new Option<bool>("--require-working-set")
        {
            Description = "with --working-set: fail if the working set cannot be traced (the snapshot is written all the same)",
        };
        var json = JsonOption();
        var cmd = new Command("save",
            "Save a running VM into DIR through kvmd: its kvm-vmm pauses it (no disk request in flight, images flushed),\n" +
            "writes its state and RAM, then lets it carry on, or stops it with --stop. 'vmctl start NAME --from DIR'\n" +
            "starts it again where it was. Prints the guest's pause and the bytes written.\n" + ExitStatuses)
        {
            vm, directory, stop, workingSet, requireWorkingSet, json,
        };
        cmd.SetAction(p => Call(p, client =>
        {
            var request = new SaveVmRequest(p.GetRequiredValue(vm), Path.GetFullPath(p.GetRequiredValue(directory)), p.GetValue(stop),
                p.GetValue(workingSet), p.GetValue(requireWorkingSet));
            var r = Invoke(client, "vm.save", request, KvmdJson.Default.SaveVmRequest, KvmdJson.Default.VmSaved);
            Print(p.GetValue(json), r, KvmdJson.Default.VmSaved, x =>
            {
                var s = x.Save;
                Console.WriteLine($"{x.Name}: saved to {s.Directory}: {s.MemoryBytes} bytes of RAM ({s.MemoryBytesWritten} not zero), " +
                                  $"state {s.StateBytes} bytes; guest paused {(s.PausedSeconds * 1000).ToString("0.#", CultureInfo.InvariantCulture)} ms, " +
                                  $"{s.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s in all; the VM is {x.Vm.ActualState}" +
                                  (s.WorkingSetPages is { } pages
                                      ? $"; working set: {pages} pages in {s.WorkingSetRanges} ranges"
                                      : s.WorkingSetSkipped is { } why ? $"; no working set: {why}" : ""));
            });
            return 0;
        }));
        return cmd;
    }

    private static Command Checkpoint()
    {
        var vm = NameArgument();
        var directory = new Argument<string>("DIR") { Description = "the checkpoint directory (new or empty; created if missing)" };
        var (rate, copyDisks) = ControlCommands.CheckpointOptions();
        var json = JsonOption();
        var cmd = new Command("checkpoint",
            "Take a live checkpoint of a running VM into DIR through kvmd. " + ControlCommands.CheckpointHelp + "\n" +
            "kvmd records the VM's new disk layers in the inventory (the VM's spec, the disks and their reservations):\n" +
            "the VM restarts on them, never on a frozen layer.\n" + ExitStatuses)
        {
            vm, directory, rate, copyDisks, json,
        };
        cmd.SetAction(p => Call(p, client =>
        {
            var request = new CheckpointVmRequest(p.GetRequiredValue(vm), Path.GetFullPath(p.GetRequiredValue(directory)),
                ControlCommands.ParseRate(p.GetValue(rate)), p.GetValue(copyDisks));
            var r = Invoke(client, "vm.checkpoint", request, KvmdJson.Default.CheckpointVmRequest, KvmdJson.Default.VmCheckpointed);
            Print(p.GetValue(json), r, KvmdJson.Default.VmCheckpointed, x => ControlCommands.PrintCheckpoint(x.Checkpoint, $"{x.Name}: "));
            return 0;
        }));
        return cmd;
    }

    private static Command Upgrade()
    {
        var vm = NameArgument();
        var vmm = new Option<string>("--vmm")
        {
            Description = "the kvm-vmm binary to hand the VM to (default: the one kvmd starts VMs with)",
            HelpName = "PATH",
        };
        var json = JsonOption();
        var cmd = new Command("upgrade",
            "Hand a running VM to a new kvm-vmm process in place, through kvmd: the new process starts and builds the\n" +
            "machine on the VM's RAM (its memfd goes over: nothing of RAM is copied) while the guest runs; then the guest\n" +
            "pauses, its state goes over, the new process takes the VM's sockets and runs it, and kvmd supervises it from\n" +
            "then on (a new pid; the VM never stopped). Prints the guest's pause.\n" +
            "A paused VM is refused (resume it first). If the new process cannot take the VM, it stays suspended in the\n" +
            "old one and 'vmctl resume NAME' (or 'vmctl upgrade NAME') tries again.\n" + ExitStatuses)
        {
            vm, vmm, json,
        };
        cmd.SetAction(p => Call(p, client =>
        {
            string? binary = p.GetValue(vmm);
            var request = new UpgradeVmRequest(p.GetRequiredValue(vm), binary is null ? null : Path.GetFullPath(binary));
            var r = Invoke(client, "vm.upgrade", request, KvmdJson.Default.UpgradeVmRequest, KvmdJson.Default.VmUpgraded);
            Print(p.GetValue(json), r, KvmdJson.Default.VmUpgraded, x =>
                Console.WriteLine($"{x.Name}: running in {x.Handover.Vmm} (kvm-vmm pid {x.OldPid} -> {x.Handover.Pid}); guest paused " +
                                  $"{(x.Handover.PausedSeconds * 1000).ToString("0.#", CultureInfo.InvariantCulture)} ms, " +
                                  $"{x.Handover.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s in all"));
            return 0;
        }));
        return cmd;
    }

    private static Command Create()
    {
        var vm = NameArgument();
        var specOptions = new SpecOptions(kernelRequired: false);
        var specFile = new Option<FileInfo>("--spec")
        {
            Description = "take the VM's spec from this JSON file (kvm-vmm's spec) instead of the options",
            HelpName = "FILE",
        };
        var start = new Option<bool>("--start") { Description = "start the VM at once" };
        var restart = new Option<string>("--restart")
        {
            Description = "when the VM ends without being asked to: 'no' (it stays down), 'on-failure' (started again after a crash or a failure status), 'always' (also after the guest powers off); at most 5 quick restarts in a row, 1 s apart doubling",
            HelpName = "POLICY",
            DefaultValueFactory = _ => "no",
        };
        restart.AcceptOnlyFromAmong("no", "on-failure", "always");
        var json = JsonOption();
        var cmd = new Command("create",
            "Define a VM in kvmd's inventory, with the same options as 'vmctl run' or a spec file; --start starts it.\n" +
            ExitStatuses) { vm };
        specOptions.AddTo(cmd);
        cmd.Options.Add(specFile);
        cmd.Options.Add(start);
        cmd.Options.Add(restart);
        cmd.Options.Add(json);
        cmd.SetAction(p =>
        {
            string specJson;
            try
            {
                if (p.GetValue(specFile) is { } file)
                {
                    if (specOptions.HasKernel(p))
                        throw new ArgumentException("give either --spec or --kernel and the other options, not both");
                    var spec = VmSpecJsonContext.Parse(File.ReadAllText(file.FullName), file.FullName);
                    specJson = VmSpecJsonContext.Format(Absolute(spec, file.DirectoryName ?? "."));
                }
                else if (specOptions.HasKernel(p))
                {
                    var spec = specOptions.Spec(p);
                    spec.Validate();
                    specJson = VmSpecJsonContext.Format(spec);
                }
                else
                {
                    throw new ArgumentException("give the VM's kernel (--kernel) or a spec file (--spec)");
                }
            }
            catch (Exception e) when (e is FormatException or ArgumentException or IOException or UnauthorizedAccessException)
            {
                Console.Error.WriteLine($"{VmctlCommands.Program}: create: {e.Message}");
                return VmctlCommands.ExitUsage;
            }
            return Call(p, client =>
            {
                using var doc = JsonDocument.Parse(specJson);
                var info = Invoke(client, "vm.create", new CreateVmRequest(p.GetRequiredValue(vm), doc.RootElement.Clone(), p.GetValue(start), p.GetRequiredValue(restart)),
                    KvmdJson.Default.CreateVmRequest, KvmdJson.Default.VmInfo);
                Print(p.GetValue(json), info, KvmdJson.Default.VmInfo, PrintInfo);
                return 0;
            });
        });
        return cmd;
    }

    /// <summary>A spec file's relative paths are relative to the file's directory.</summary>
    private static VmSpec Absolute(VmSpec spec, string baseDirectory)
    {
        string Full(string path) => Path.GetFullPath(path, baseDirectory);
        return spec with
        {
            Kernel = Full(spec.Kernel),
            Initrd = spec.Initrd is { } i ? Full(i) : null,
            Disks = spec.Disks.Select(d => d with { Path = Full(d.Path) }).ToArray(),
        };
    }

    private static Command Stop()
    {
        var vm = NameArgument();
        var force = new Option<bool>("--force", "-f") { Description = "stop at once, without asking the guest" };
        var timeout = new Option<double>("--timeout", "-t")
        {
            Description = "seconds to wait for the guest to power off after the ACPI power button before forcing the stop",
            DefaultValueFactory = _ => VmControl.DefaultStopTimeoutSeconds,
        };
        var json = JsonOption();
        var cmd = new Command("stop", "Stop a VM: the ACPI power button first, forced after --timeout; or forced at once with --force.\n" + ExitStatuses)
        {
            vm, force, timeout, json,
        };
        cmd.SetAction(p => Call(p, client =>
        {
            var r = Invoke(client, "vm.stop", new StopVmRequest(p.GetRequiredValue(vm), p.GetValue(force), p.GetValue(timeout)),
                KvmdJson.Default.StopVmRequest, KvmdJson.Default.VmStopped);
            Print(p.GetValue(json), r, KvmdJson.Default.VmStopped,
                x => Console.WriteLine($"{x.Name}: {x.Outcome}: {x.Reason} ({x.Seconds.ToString("0.###", CultureInfo.InvariantCulture)} s)"));
            return 0;
        }));
        return cmd;
    }

    private static Command Delete()
    {
        var vm = NameArgument();
        var force = new Option<bool>("--force", "-f") { Description = "delete a running VM too (it is stopped at once)" };
        var cmd = new Command("delete", "Delete a VM from the inventory, with its logs and runtime files (not its disk images).\n" + ExitStatuses) { vm, force };
        cmd.SetAction(p => Call(p, client =>
        {
            var info = Invoke(client, "vm.delete", new DeleteVmRequest(p.GetRequiredValue(vm), p.GetValue(force)), KvmdJson.Default.DeleteVmRequest, KvmdJson.Default.VmInfo);
            Console.WriteLine($"{info.Name}: deleted");
            return 0;
        }));
        return cmd;
    }

    private static Command List()
    {
        var json = JsonOption();
        var cmd = new Command("list", "Every VM in the inventory: its state, what it should be, and the host that runs it.\n" + ExitStatuses) { json };
        cmd.SetAction(p => Call(p, client =>
        {
            var list = client.CallAsync("vm.list", KvmdJson.Default.VmList).GetAwaiter().GetResult();
            Print(p.GetValue(json), list, KvmdJson.Default.VmList, l =>
            {
                Console.WriteLine($"{"NAME",-24} {"STATE",-10} {"DESIRED",-8} {"HOST",-16} PID");
                foreach (var v in l.Vms)
                    Console.WriteLine($"{v.Name,-24} {v.ActualState,-10} {v.DesiredState,-8} {v.Host ?? "-",-16} {(v.Pid is { } pid ? pid.ToString(CultureInfo.InvariantCulture) : "-")}");
            });
            return 0;
        }));
        return cmd;
    }

    private static Command Show()
    {
        var vm = NameArgument();
        var json = JsonOption();
        var cmd = new Command("show", "A VM in detail: its state, spec, and when it runs, its vCPUs, exits and sockets.\n" + ExitStatuses) { vm, json };
        cmd.SetAction(p => Call(p, client =>
        {
            var d = Invoke(client, "vm.show", new VmNameRequest(p.GetRequiredValue(vm)), KvmdJson.Default.VmNameRequest, KvmdJson.Default.VmDetail);
            Print(p.GetValue(json), d, KvmdJson.Default.VmDetail, x =>
            {
                var v = x.Vm;
                Console.WriteLine($"name:    {v.Name} ({v.Id})");
                Console.WriteLine($"state:   {v.ActualState} (desired: {v.DesiredState}){(v.Host is { } h ? $" on {h}" : "")}");
                Console.WriteLine($"restart: {v.Restart}");
                if (x.Status is { } s)
                {
                    Console.WriteLine($"kvm-vmm: pid {s.Pid}, up {s.UptimeSeconds.ToString("0.###", CultureInfo.InvariantCulture)} s");
                    Console.WriteLine($"vcpus:   {string.Join(", ", s.Vcpus.Select(c => $"{c.Id} {c.State}"))}");
                }
                if (x.LastExit is { } e)
                    Console.WriteLine($"ended:   {e.At:u}, status {e.Status}: {e.Reason}");
                if (x.ConsoleSocket is { } c)
                    Console.WriteLine($"console: {c}");
                if (x.ControlSocket is { } ctl)
                    Console.WriteLine($"control: {ctl}");
                if (x.Log is { } log)
                    Console.WriteLine($"log:     {log}");
                Console.WriteLine($"spec:    {x.Spec.GetRawText()}");
            });
            return 0;
        }));
        return cmd;
    }

    /// <summary>vmctl console NAME: asks kvmd where the VM's console socket is, then attaches.</summary>
    internal static int AttachByName(ParseResult parse, string name)
    {
        ConsoleEndpoint? endpoint = null;
        int status = Call(parse, client =>
        {
            endpoint = Invoke(client, "vm.console", new VmNameRequest(name), KvmdJson.Default.VmNameRequest, KvmdJson.Default.ConsoleEndpoint);
            return 0;
        });
        return endpoint is null ? status : ControlCommands.Attach(endpoint.Socket);
    }

    private static Command Events()
    {
        var follow = new Option<bool>("--follow", "-f") { Description = "keep showing events as they happen (Ctrl-C ends)" };
        var after = new Option<long>("--after") { Description = "show events after this id (default: the last 20, or with --follow only new ones)", DefaultValueFactory = _ => -1 };
        var json = JsonOption();
        var cmd = new Command("events", "What happened in the inventory, in order: VMs created, started, stopped, failed; hosts; leases.\n" + ExitStatuses)
        {
            follow, after, json,
        };
        cmd.SetAction(p => Call(p, client =>
        {
            bool asJson = p.GetValue(json);
            long last = p.GetValue(after);
            if (last < 0)
            {
                // Without --after: the last 20 events, or with --follow only the ones that come next.
                var now = Invoke(client, "events.wait", new EventsRequest(0, 0, 1), KvmdJson.Default.EventsRequest, KvmdJson.Default.EventList);
                last = p.GetValue(follow) ? now.Newest : Math.Max(0, now.Newest - 20);
            }
            do
            {
                var page = Invoke(client, "events.wait", new EventsRequest(last, p.GetValue(follow) ? 30 : 0, 1000), KvmdJson.Default.EventsRequest, KvmdJson.Default.EventList);
                foreach (var e in page.Events)
                {
                    if (asJson)
                        Console.WriteLine(JsonSerializer.Serialize(e, KvmdJson.Default.EventInfo));
                    else
                        Console.WriteLine($"{e.Id,6} {e.At.ToLocalTime():yyyy-MM-dd HH:mm:ss.fff} {e.Kind,-18} {e.Subject,-24} {(e.Host ?? "-"),-12} {e.Data.GetRawText()}");
                }
                last = page.Last;
                if (!p.GetValue(follow) && page.Events.Count < 1000)
                    break;
            }
            while (true);
            return 0;
        }));
        return cmd;
    }

    private static Command Hosts()
    {
        var json = JsonOption();
        var cmd = new Command("hosts", "The hosts that run kvmd against this inventory, and when each was last seen alive.\n" + ExitStatuses) { json };
        cmd.SetAction(p => Call(p, client =>
        {
            var list = client.CallAsync("hosts.list", KvmdJson.Default.HostList).GetAwaiter().GetResult();
            Print(p.GetValue(json), list, KvmdJson.Default.HostList, l =>
            {
                Console.WriteLine($"{"NAME",-20} {"LAST SEEN",-24} ID");
                foreach (var h in l.Hosts)
                    Console.WriteLine($"{h.Name + (h.Self ? " *" : ""),-20} {h.LastSeen.ToLocalTime():yyyy-MM-dd HH:mm:ss},{(DateTimeOffset.UtcNow - h.LastSeen).TotalSeconds,6:0}s ago {h.Id}");
            });
            return 0;
        }));
        return cmd;
    }

    private static Command Leases()
    {
        var json = JsonOption();
        var cmd = new Command("leases", "The leases: a host runs a VM only while it holds the VM's lease; the generation grows at every acquisition.\n" + ExitStatuses) { json };
        cmd.SetAction(p => Call(p, client =>
        {
            var list = client.CallAsync("leases.list", KvmdJson.Default.LeaseList).GetAwaiter().GetResult();
            Print(p.GetValue(json), list, KvmdJson.Default.LeaseList, l =>
            {
                Console.WriteLine($"{"KIND",-5} {"RESOURCE",-24} {"HOLDER",-16} {"GEN",5} EXPIRES");
                foreach (var x in l.Leases)
                    Console.WriteLine($"{x.Kind,-5} {x.Resource ?? x.ResourceId.ToString(),-24} {x.Owner ?? "-",-16} {x.Generation,5} " +
                        (x.ExpiresAt is { } e ? $"{e.ToLocalTime():yyyy-MM-dd HH:mm:ss.fff} ({(e - DateTimeOffset.UtcNow).TotalSeconds:0.0} s)" : "-"));
            });
            return 0;
        }));
        return cmd;
    }

    private static Command Disks()
    {
        var json = JsonOption();
        var cmd = new Command("disks", "The disk images the inventory knows (registered when a VM using them starts) and who holds them: a writable\n" +
            "disk exclusively, read-only and backing images shared.\n" + ExitStatuses) { json };
        cmd.SetAction(p => Call(p, client =>
        {
            var list = client.CallAsync("disks.list", KvmdJson.Default.DiskList).GetAwaiter().GetResult();
            Print(p.GetValue(json), list, KvmdJson.Default.DiskList, l =>
            {
                foreach (var d in l.Disks)
                {
                    Console.WriteLine($"{d.Path} ({d.Format}, {d.SizeBytes} bytes{(d.Backing is { } b ? $", over {b}" : "")})");
                    foreach (var r in d.Reservations)
                        Console.WriteLine($"  {r.Mode,-9} {(r.Vm is { } vm ? $"VM '{vm}' on " : "")}host '{r.Host}'{(r.Generation is { } g ? $" (lease generation {g})" : "")}");
                }
            });
            return 0;
        }));
        return cmd;
    }
}
