using System.CommandLine;
using Kvm.Hypervisor;
using Kvm.Vmm.Machine;

namespace Kvm.Cli;

/// <summary>The options that describe a VM (vmctl run and vmctl create share them), and the spec they make.</summary>
public sealed class SpecOptions
{
    private readonly Option<FileInfo> _kernel;
    private readonly Option<FileInfo?> _initrd;
    private readonly Option<string> _cmdline;
    private readonly Option<string> _memory;
    private readonly Option<int> _cpus;
    private readonly Option<bool> _debugExit;
    private readonly Option<HugePageMode> _hugePages;
    private readonly Option<string[]> _disks;
    private readonly Option<string[]> _nics;
    private readonly Option<string> _cpuFeatures;
    private readonly Option<string> _cpuModel;

    public SpecOptions(bool kernelRequired)
    {
        _kernel = new Option<FileInfo>("--kernel", "-k")
        {
            Description = "kernel to boot: an ELF with a PVH entry note (such as build/guest/guestkit.elf or a vmlinux), or a bzImage",
            Required = kernelRequired,
        };
        _initrd = new Option<FileInfo?>("--initrd", "-i")
        {
            Description = "initial ramdisk for a bzImage kernel",
        };
        _cmdline = new Option<string>("--cmdline", "-c")
        {
            Description = "kernel command line (for the guest kit: the workload and its key=value arguments)",
            DefaultValueFactory = _ => "",
        };
        _memory = new Option<string>("--memory", "-m")
        {
            Description = "guest RAM size, with K, M or G suffix",
            DefaultValueFactory = _ => "256M",
        };
        _cpus = new Option<int>("--cpus")
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
        _debugExit = new Option<bool>("--debug-exit")
        {
            Description = "add the debug-exit port at 0xf4; vmctl then exits with the byte the guest writes there",
        };
        _hugePages = new Option<HugePageMode>("--hugepages")
        {
            Description = "back guest RAM (a memfd) with huge pages: none, transparent (shmem THP through madvise; /sys/kernel/mm/transparent_hugepage/shmem_enabled must allow it) or hugetlb (the reserved pool)",
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

        _disks = new Option<string[]>("--disk", "-d")
        {
            Description = "give the VM a virtio-blk disk on a raw or qcow2 image (repeatable; PCI slots in order).\n" +
                "Options after the path: readonly (the guest cannot write), serial=ID (what the guest reads as\n" +
                "the disk's ID, up to 20 characters), queues=N (request queues served in parallel, 1 to 64)",
            HelpName = "PATH[,readonly][,serial=ID][,queues=N]",
            DefaultValueFactory = _ => [],
        };

        _nics = new Option<string[]>("--net", "-n")
        {
            Description = "give the VM a virtio-net NIC (repeatable; PCI slots after the disks). tap=NAME uses the tap\n" +
                "device NAME, made if missing (needs CAP_NET_ADMIN), @BRIDGE puts it on that bridge; mac=MAC (default:\n" +
                "random, locally administered), queues=N (queue pairs, 1 to 16), offload=off (no checksum or TSO\n" +
                "offloads), spoof=allow (let frames with another source MAC out; by default they are dropped), mtu=N.\n" +
                "Several tap= make a team the VMM runs: policy=active-backup (default; failback=off, failback-delay=MS),\n" +
                "flow-hash (flows spread over the uplinks) or vm-port (the VM's frames on one uplink chosen by its MAC).\n" +
                "limit=RATE (tx-limit=, rx-limit=): the most the VM sends and receives, in bit/s (10M, 1.5G).\n" +
                "dos=suspend|limit: denial-of-service detection (dos-pps=, dos-syn=, dos-udp=, dos-icmp=, dos-dst=\n" +
                "thresholds per second or off, dos-window=MS, dos-limit=RATE); see README",
            HelpName = NicSpec.Syntax,
            DefaultValueFactory = _ => [],
        };

        _cpuFeatures = new Option<string>("--cpu-features")
        {
            Description = "CPU features the guest is told its CPU lacks, as Linux names them: -cx16,-xsave (see README)",
            HelpName = "-NAME[,-NAME...]",
        };

        _cpuModel = new Option<string>("--cpu-model")
        {
            Description = "a named CPU model, so the guest sees the same instruction set on every host that has it:\n" +
                string.Join("\n", Kvm.Vmm.Cpu.CpuFeatures.Models.Select(m => $"  {m.Name,-10} {m.Description}")),
            HelpName = string.Join("|", Kvm.Vmm.Cpu.CpuFeatures.Models.Select(m => m.Name)),
            DefaultValueFactory = _ => "host",
        };
    }

    public void AddTo(Command command)
    {
        command.Options.Add(_kernel);
        command.Options.Add(_initrd);
        command.Options.Add(_cmdline);
        command.Options.Add(_memory);
        command.Options.Add(_cpus);
        command.Options.Add(_debugExit);
        command.Options.Add(_hugePages);
        command.Options.Add(_disks);
        command.Options.Add(_nics);
        command.Options.Add(_cpuFeatures);
        command.Options.Add(_cpuModel);
    }

    /// <summary>Whether a kernel was given (vmctl create takes either the options or --spec).</summary>
    public bool HasKernel(ParseResult parse) => parse.GetValue(_kernel) is not null;

    /// <summary>The spec the options describe; every path absolute. Throws FormatException or ArgumentException naming what is wrong.</summary>
    public VmSpec Spec(ParseResult parse) => new()
    {
        Kernel = parse.GetRequiredValue(_kernel).FullName,
        Initrd = parse.GetValue(_initrd)?.FullName,
        Cmdline = parse.GetValue(_cmdline) ?? "",
        MemoryBytes = VmSpec.ParseSize(parse.GetRequiredValue(_memory)),
        Cpus = parse.GetValue(_cpus),
        DebugExit = parse.GetValue(_debugExit),
        HugePages = parse.GetValue(_hugePages),
        Disks = (parse.GetValue(_disks) ?? []).Select(DiskSpec.Parse).Select(d => d with { Path = Path.GetFullPath(d.Path) }).ToArray(),
        Nics = (parse.GetValue(_nics) ?? []).Select(NicSpec.Parse).ToArray(),
        HiddenCpuFeatures = parse.GetValue(_cpuFeatures) is { } f ? Kvm.Vmm.Cpu.CpuFeatures.ParseHidden(f) : [],
        CpuModel = parse.GetValue(_cpuModel) ?? "host",
    };
}
