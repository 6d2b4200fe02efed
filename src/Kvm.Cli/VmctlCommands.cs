using System.CommandLine;
using System.CommandLine.Parsing;
using Kvm.Hypervisor;
using Kvm.Vmm.Machine;

namespace Kvm.Cli;

/// <summary>The vmctl command tree.</summary>
public static class VmctlCommands
{
    public const string Program = "vmctl";
    public const int ExitUsage = 2;

    public static RootCommand Build()
    {
        var root = new RootCommand(
            "vmctl: run and manage virtual machines on KVM.\n\n" +
            "'vmctl run' boots one VM in the foreground with its serial console on this terminal, with no daemon.\n" +
            "'vmctl create', 'start', 'stop', 'list' and the other VM verbs manage VMs through kvmd.");
        root.Options.Add(KvmdCommands.Connect);
        root.Subcommands.Add(RunCommand());
        root.Subcommands.Add(RestoreCommand());
        root.Subcommands.Add(DeleteCheckpointCommand());
        root.Subcommands.Add(ForkCommand.Build());
        root.Subcommands.Add(DiskCommands.Build());
        root.Subcommands.Add(ControlCommands.Control());
        root.Subcommands.Add(ControlCommands.ConsoleCommand());
        foreach (var verb in KvmdCommands.Build())
            root.Subcommands.Add(verb);
        return root;
    }

    /// <summary>Parses and runs; usage errors print one line and return 2.</summary>
    public static int Invoke(this RootCommand root, string[] args)
    {
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            string command = string.Join(' ', CommandPath(parse.CommandResult));
            // An unknown word explains the rest ("command not provided" follows from it), so it goes first.
            var error = parse.Errors.FirstOrDefault(e => e.Message.StartsWith("Unrecognized", StringComparison.Ordinal)) ?? parse.Errors[0];
            Console.Error.WriteLine($"{Program}: {error.Message.TrimEnd('.')} (see '{command} --help')");
            return ExitUsage;
        }
        return parse.Invoke();
    }

    private static IEnumerable<string> CommandPath(CommandResult? r)
    {
        var names = new Stack<string>();
        for (SymbolResult? s = r; s is not null; s = s.Parent)
            if (s is CommandResult c)
                names.Push(c.Command is RootCommand ? Program : c.Command.Name);
        return names;
    }

    private static Command RunCommand()
    {
        var specOptions = new SpecOptions(kernelRequired: true);
        var control = new Option<string>("--control")
        {
            Description = "also serve the VM's control socket at this path (see 'vmctl control')",
            HelpName = "SOCKET",
        };
        var consoleSocket = new Option<string>("--console")
        {
            Description = "put the serial console on a socket at this path instead of this terminal (see 'vmctl console')",
            HelpName = "SOCKET",
        };

        var run = new Command("run",
            "Boot one VM in the foreground. Its serial console (COM1) is this terminal; Ctrl-C stops the VM.\n" +
            "Exit status: with --debug-exit, the status the guest wrote; 130 after Ctrl-C; 1 when the VM failed\n" +
            "(guest shut down, KVM error) or could not start; 2 for a usage error.");
        specOptions.AddTo(run);
        run.Options.Add(control);
        run.Options.Add(consoleSocket);
        run.SetAction(parse =>
        {
            VmSpec spec;
            try
            {
                spec = specOptions.Spec(parse);
                spec.Validate();
            }
            catch (Exception e) when (e is FormatException or ArgumentException)
            {
                Console.Error.WriteLine($"{Program}: {e.Message}");
                return ExitUsage;
            }
            var host = new Kvm.Control.VmHostOptions
            {
                ControlSocket = parse.GetValue(control),
                ConsoleSocket = parse.GetValue(consoleSocket),
            };
            return Kvm.Control.VmHost.Execute(spec, Program, host, new StderrLogger(Program));
        });
        return run;
    }

    private static Command RestoreCommand()
    {
        var directory = new Argument<string>("DIR") { Description = "a snapshot directory ('vmctl control save')" };
        var memory = new Option<string>("--memory")
        {
            Description = "how guest RAM comes back: eager (read all of it before the vCPUs start), lazy (start at once;\n" +
                "a page comes in when first touched, the rest in the background; needs userfaultfd) or mapped (start at\n" +
                "once on a private copy-on-write mapping of the memory file: pages shared in the page cache by every VM\n" +
                "mapped from the snapshot, a page copied when the guest writes it; the file must not change meanwhile)",
            DefaultValueFactory = _ => "eager",
            HelpName = "eager|lazy|mapped",
        };
        memory.AcceptOnlyFromAmong("eager", "lazy", "mapped");
        var control = new Option<string>("--control") { Description = "also serve the VM's control socket at this path (see 'vmctl control')", HelpName = "SOCKET" };
        var consoleSocket = new Option<string>("--console") { Description = "put the serial console on a socket at this path instead of this terminal", HelpName = "SOCKET" };
        var cmd = new Command("restore",
            "Start a saved VM in the foreground where it was saved: same devices, RAM, registers and timers. A damaged\n" +
            "snapshot, one of another format version, or one saved with CPU features this host lacks is refused.\n" +
            "Exit status: as 'vmctl run'.")
        {
            directory, memory, control, consoleSocket,
        };
        cmd.SetAction(parse =>
        {
            VmLaunch launch;
            try
            {
                launch = RestoreLaunch.Open(Path.GetFullPath(parse.GetRequiredValue(directory)), new Kvm.Vmm.Snapshot.RestoreOptions
                {
                    Memory = Kvm.Vmm.Snapshot.VmSnapshot.ParseMemoryLoad(parse.GetValue(memory)!),
                });
            }
            catch (Exception e) when (e is Kvm.Vmm.Snapshot.SnapshotFormatException or ArgumentException or IOException)
            {
                Console.Error.WriteLine($"{Program}: {e.Message}");
                return 1;
            }
            var host = new Kvm.Control.VmHostOptions
            {
                ControlSocket = parse.GetValue(control),
                ConsoleSocket = parse.GetValue(consoleSocket),
            };
            return Kvm.Control.VmHost.Execute(launch, Program, host, new StderrLogger(Program));
        });
        return cmd;
    }

    private static Command DeleteCheckpointCommand()
    {
        var words = new Argument<string[]>("[NAME] DIR")
        {
            Description = "the checkpoint directory ('vmctl control checkpoint' or 'vmctl checkpoint NAME DIR'); with the VM's\n" +
                          "NAME first, through kvmd, which records the fold in its inventory",
            Arity = new ArgumentArity(1, 2),
        };
        var cmd = new Command("delete-checkpoint",
            "Delete a live checkpoint and fold the disk layer it kept frozen into the layer the VM went on with\n" +
            "(what the guest sees does not change; the VM may keep running if it has been checkpointed again since).\n" +
            "Refused while a VM restored from the checkpoint runs, while a VM still writes to that layer, or while\n" +
            "the checkpoint's disk backs forks. For a VM kvmd runs, name it: 'vmctl delete-checkpoint NAME DIR'.\n" +
            "Exit status: 0 deleted; 1 refused or failed (the reason follows).")
        {
            words,
        };
        cmd.SetAction(parse =>
        {
            var given = parse.GetRequiredValue(words);
            string dir = Path.GetFullPath(given[^1]);
            if (given.Length == 2)
                return KvmdCommands.Call(parse, client =>
                {
                    var r = client.CallAsync("vm.delete-checkpoint", new Kvm.Cluster.DeleteCheckpointRequest(given[0], dir),
                        Kvm.Cluster.KvmdJson.Default.DeleteCheckpointRequest, Kvm.Cluster.KvmdJson.Default.CheckpointDeleted).GetAwaiter().GetResult();
                    Console.WriteLine(r.Folded.Count == 0
                        ? $"{r.Name}: deleted checkpoint {r.Directory}"
                        : $"{r.Name}: deleted checkpoint {r.Directory}; folded away {string.Join(", ", r.Folded)}");
                    return 0;
                });
            try
            {
                IReadOnlyList<string> folded;
                using (var bar = ProgressBar.ForTerminal("fold"))
                    folded = Kvm.Vmm.Snapshot.VmCheckpoint.Delete(dir, bar);
                Console.WriteLine(folded.Count == 0
                    ? $"deleted checkpoint {dir}"
                    : $"deleted checkpoint {dir}; folded away {string.Join(", ", folded)}");
                return 0;
            }
            catch (Exception e) when (e is Kvm.Vmm.Snapshot.SnapshotFormatException or Kvm.Storage.ImageFormatException or ArgumentException or IOException
                                          or UnauthorizedAccessException)
            {
                Console.Error.WriteLine($"{Program}: {e.Message}");
                return 1;
            }
        });
        return cmd;
    }
}
