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
            "'vmctl run' boots one VM in the foreground with its serial console on this terminal.");
        root.Subcommands.Add(RunCommand());
        root.Subcommands.Add(DiskCommands.Build());
        root.Subcommands.Add(ControlCommands.Control());
        root.Subcommands.Add(ControlCommands.ConsoleCommand());
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
        var kernel = new Option<FileInfo>("--kernel", "-k")
        {
            Description = "kernel to boot: an ELF with a PVH entry note (such as build/guest/guestkit.elf or a vmlinux), or a bzImage",
            Required = true,
        };
        var initrd = new Option<FileInfo?>("--initrd", "-i")
        {
            Description = "initial ramdisk for a bzImage kernel",
        };
        var cmdline = new Option<string>("--cmdline", "-c")
        {
            Description = "kernel command line (for the guest kit: the workload and its key=value arguments)",
            DefaultValueFactory = _ => "",
        };
        var memory = new Option<string>("--memory", "-m")
        {
            Description = "guest RAM size, with K, M or G suffix",
            DefaultValueFactory = _ => "256M",
        };
        var cpus = new Option<int>("--cpus")
        {
            Description = "number of vCPUs",
            DefaultValueFactory = _ => 1,
            CustomParser = r =>
            {
                string text = r.Tokens.Count > 0 ? r.Tokens[^1].Value : "";
                if (int.TryParse(text, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int n))
                    return n;
                r.AddError($"--cpus '{text}' is not a whole number");
                return 0;
            },
        };
        var debugExit = new Option<bool>("--debug-exit")
        {
            Description = "add the debug-exit port at 0xf4; vmctl then exits with the byte the guest writes there",
        };
        var hugePages = new Option<HugePageMode>("--hugepages")
        {
            Description = "back guest RAM with huge pages: none, transparent (THP through madvise) or hugetlb (the reserved pool)",
            HelpName = "none|transparent|hugetlb",
            DefaultValueFactory = _ => HugePageMode.None,
            CustomParser = r =>
            {
                string text = r.Tokens.Count > 0 ? r.Tokens[^1].Value : "";
                switch (text.ToLowerInvariant())
                {
                    case "none": return HugePageMode.None;
                    case "transparent" or "thp": return HugePageMode.Transparent;
                    case "hugetlb": return HugePageMode.HugeTlb;
                    default:
                        r.AddError($"--hugepages '{text}' is not one of none, transparent, hugetlb");
                        return HugePageMode.None;
                }
            },
        };

        var disks = new Option<string[]>("--disk", "-d")
        {
            Description = "give the VM a virtio-blk disk on a raw or qcow2 image (repeatable; PCI slots in order).\n" +
                "Options after the path: readonly (the guest cannot write), serial=ID (what the guest reads as\n" +
                "the disk's ID, up to 20 characters), queues=N (request queues served in parallel, 1 to 64)",
            HelpName = "PATH[,readonly][,serial=ID][,queues=N]",
            DefaultValueFactory = _ => [],
        };

        var cpuFeatures = new Option<string>("--cpu-features")
        {
            Description = "CPU features the guest is told its CPU lacks, as Linux names them: -cx16,-xsave (see README)",
            HelpName = "-NAME[,-NAME...]",
        };

        var cpuModel = new Option<string>("--cpu-model")
        {
            Description = "a named CPU model, so the guest sees the same instruction set on every host that has it:\n" +
                string.Join("\n", Kvm.Vmm.Cpu.CpuFeatures.Models.Select(m => $"  {m.Name,-10} {m.Description}")),
            HelpName = string.Join("|", Kvm.Vmm.Cpu.CpuFeatures.Models.Select(m => m.Name)),
            DefaultValueFactory = _ => "host",
        };

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
            "(guest shut down, KVM error) or could not start; 2 for a usage error.")
        {
            kernel, initrd, cmdline, memory, cpus, debugExit, hugePages, cpuModel, cpuFeatures, disks, control, consoleSocket,
        };
        run.SetAction(parse =>
        {
            VmSpec spec;
            try
            {
                spec = new VmSpec
                {
                    Kernel = parse.GetRequiredValue(kernel).FullName,
                    Initrd = parse.GetValue(initrd)?.FullName,
                    Cmdline = parse.GetValue(cmdline) ?? "",
                    MemoryBytes = VmSpec.ParseSize(parse.GetRequiredValue(memory)),
                    Cpus = parse.GetValue(cpus),
                    DebugExit = parse.GetValue(debugExit),
                    HugePages = parse.GetValue(hugePages),
                    Disks = (parse.GetValue(disks) ?? []).Select(DiskSpec.Parse).ToArray(),
                    HiddenCpuFeatures = parse.GetValue(cpuFeatures) is { } f ? Kvm.Vmm.Cpu.CpuFeatures.ParseHidden(f) : [],
                    CpuModel = parse.GetValue(cpuModel) ?? "host",
                };
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
}
