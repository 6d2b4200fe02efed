using System.Globalization;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;

namespace Kvm.Vmm.Machine;

/// <summary>Where a VM's NIC reaches the host's network: a tap device, optionally put on a bridge, or a host interface reached through packet sockets.</summary>
public sealed record UplinkSpec
{
    /// <summary>The tap device: used if it exists, made (and gone with the VM) if not; empty: the kernel names one.</summary>
    public string Tap { get; init; } = "";

    /// <summary>A bridge the tap is added to when the VM starts.</summary>
    public string? Bridge { get; init; }

    /// <summary>A host interface (a NIC, a bond, a veth) the VMM sends and receives on itself through packet sockets, instead of a tap.</summary>
    public string? Interface { get; init; }

    public override string ToString() => Interface is not null ? "interface " + Interface
        : "tap " + (Tap.Length == 0 ? "(any)" : Tap) + (Bridge is null ? "" : " on bridge " + Bridge);
}

/// <summary>A virtio-net NIC of a VM: its address, queues, offloads and uplinks.</summary>
public sealed record NicSpec
{
    /// <summary>The guest's MAC address; a random locally administered one unless given (kept in the spec, so a restored VM has the same).</summary>
    public MacAddress Mac { get; init; } = MacAddress.Random();

    /// <summary>Receive/transmit queue pairs, each served by its own threads (Linux uses one per vCPU up to this).</summary>
    public int Queues { get; init; } = 1;

    /// <summary>Checksum and segmentation offloads between guest and host (off: the guest does both itself).</summary>
    public bool Offloads { get; init; } = true;

    /// <summary>Lets the guest send frames with another source MAC and change its address (off: such frames are dropped).</summary>
    public bool AllowSpoofing { get; init; }

    public int Mtu { get; init; } = 1500;

    /// <summary>The most the guest may send, in bits per second (null: no limit).</summary>
    public long? TxLimit { get; init; }

    /// <summary>The most the guest may receive, in bits per second (null: no limit).</summary>
    public long? RxLimit { get; init; }

    /// <summary>Denial-of-service detection on this NIC's traffic, and what it does (null: none).</summary>
    public DosRules? Dos { get; init; }

    /// <summary>The bandwidth group whose uplink this NIC shares with other VMs' NICs, by shares and reservations (null: none).</summary>
    public BandwidthGroupOptions? Bandwidth { get; init; }

    public IReadOnlyList<UplinkSpec> Uplinks { get; init; } = [];

    /// <summary>With several uplinks: how the VMM spreads the VM's frames over them.</summary>
    public TeamPolicy Policy { get; init; } = TeamPolicy.ActiveBackup;

    /// <summary>Active-backup: traffic goes back to the first uplink when it returns.</summary>
    public bool Failback { get; init; } = true;

    /// <summary>How long the first uplink must be up again before traffic goes back to it.</summary>
    public TimeSpan FailbackDelay { get; init; } = TimeSpan.Zero;

    /// <summary>An IPv4 address every uplink probes by ARP; an uplink whose probes go unanswered while another's are answered is down (null: the carrier alone).</summary>
    public System.Net.IPAddress? ArpTarget { get; init; }

    /// <summary>How often each uplink probes the ARP target.</summary>
    public TimeSpan ArpInterval { get; init; } = new TeamOptions().ArpInterval;

    /// <summary>Probe intervals without an answer before an uplink is down.</summary>
    public int ArpMisses { get; init; } = new TeamOptions().ArpMisses;

    public const int MaxUplinks = 8;

    public TeamOptions ToTeamOptions() => new()
    {
        Policy = Policy, Failback = Failback, FailbackDelay = FailbackDelay, ArpTarget = ArpTarget, ArpInterval = ArpInterval, ArpMisses = ArpMisses,
    };

    private static readonly (TeamPolicy Policy, string Name)[] Policies =
        [(TeamPolicy.ActiveBackup, "active-backup"), (TeamPolicy.FlowHash, "flow-hash"), (TeamPolicy.VmPort, "vm-port")];

    /// <summary>"active-backup, flow-hash or vm-port", for messages.</summary>
    public const string PolicyNames = "active-backup, flow-hash or vm-port";

    public static string PolicyName(TeamPolicy p) => Policies.First(x => x.Policy == p).Name;

    /// <summary>The policy a name (as <see cref="PolicyName"/> gives it) stands for, or null.</summary>
    public static TeamPolicy? ParsePolicy(string name) =>
        Policies.FirstOrDefault(x => x.Name == name) is { Name: not null } found ? found.Policy : null;

    public VirtioNetOptions ToOptions() => new()
    {
        Mac = Mac, QueuePairs = Queues, Offloads = Offloads, AllowSpoofing = AllowSpoofing, Mtu = Mtu,
        TxLimit = TxLimit, RxLimit = RxLimit, Dos = Dos, Bandwidth = Bandwidth,
    };

    /// <summary>Throws <see cref="ArgumentException"/> naming the NIC and what is wrong with it.</summary>
    public void Validate()
    {
        if (Bandwidth is { } b && (b.Group.Length == 0 || b.Capacity == 0))
            throw new ArgumentException($"nic {Mac}: shares and reservations need a bandwidth group and its rate (group=NAME,group-rate=RATE)");
        try
        {
            ToOptions().Validate();
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"nic {Mac}: {e.Message}");
        }
        if (Uplinks.Count == 0)
            throw new ArgumentException($"nic {Mac}: no uplink (tap=NAME or dev=INTERFACE)");
        if (Uplinks.Count > MaxUplinks)
            throw new ArgumentException($"nic {Mac}: {Uplinks.Count} uplinks is more than {MaxUplinks}");
        var twice = Uplinks.Where(u => u.Tap.Length > 0).GroupBy(u => u.Tap).FirstOrDefault(g => g.Count() > 1);
        if (twice is not null)
            throw new ArgumentException($"nic {Mac}: tap '{twice.Key}' is named twice");
        var twiceDev = Uplinks.Where(u => u.Interface is not null).GroupBy(u => u.Interface).FirstOrDefault(g => g.Count() > 1);
        if (twiceDev is not null)
            throw new ArgumentException($"nic {Mac}: interface '{twiceDev.Key}' is named twice");
        if (FailbackDelay < TimeSpan.Zero || FailbackDelay > TimeSpan.FromHours(1))
            throw new ArgumentException($"nic {Mac}: failback delay {FailbackDelay.TotalMilliseconds} ms is outside 0 to 1 hour");
        if (ArpTarget is not null && Uplinks.Count < 2)
            throw new ArgumentException($"nic {Mac}: an ARP target needs two uplinks or more (probes choose between uplinks)");
        try
        {
            ToTeamOptions().Validate();
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"nic {Mac}: {e.Message}");
        }
        foreach (var u in Uplinks)
        {
            if (u.Interface is not null)
            {
                if (u.Tap.Length > 0 || u.Bridge is not null)
                    throw new ArgumentException($"nic {Mac}: uplink interface '{u.Interface}' cannot have a tap or a bridge as well");
                if (u.Interface.Length is 0 || System.Text.Encoding.UTF8.GetByteCount(u.Interface) > 15 || u.Interface.Contains('/') || u.Interface.Any(char.IsWhiteSpace))
                    throw new ArgumentException($"nic {Mac}: '{u.Interface}' is not an interface name (1 to 15 bytes, no '/' or spaces)");
                continue;
            }
            if (System.Text.Encoding.UTF8.GetByteCount(u.Tap) > 15 || u.Tap.Contains('/') || u.Tap.Any(char.IsWhiteSpace))
                throw new ArgumentException($"nic {Mac}: tap name '{u.Tap}' is not an interface name (at most 15 bytes, no '/' or spaces)");
            if (u.Bridge is not null && (u.Bridge.Length is 0 or > 15 || u.Bridge.Contains('/') || u.Bridge.Any(char.IsWhiteSpace)))
                throw new ArgumentException($"nic {Mac}: bridge name '{u.Bridge}' is not an interface name (at most 15 bytes, no '/' or spaces)");
        }
    }

    /// <summary>The command-line form's help text.</summary>
    public const string Syntax = "tap=NAME[@BRIDGE]|dev=INTERFACE[,tap=NAME2[@BRIDGE2]|dev=INTERFACE2...][,policy=active-backup|flow-hash|vm-port][,failback=on|off][,failback-delay=MS][,arp-target=IPV4[,arp-interval=MS][,arp-misses=N]][,limit=RATE][,tx-limit=RATE][,rx-limit=RATE][,group=NAME,group-rate=RATE[,shares=N][,reserve=RATE][,tx-reserve=RATE][,rx-reserve=RATE]][,dos=suspend|limit[,dos-pps=N][,dos-syn=N][,dos-udp=N][,dos-icmp=N][,dos-dst=N][,dos-window=MS][,dos-limit=RATE]][,mac=MAC][,queues=N][,offload=on|off][,spoof=drop|allow][,mtu=N]";

    /// <summary>Parses the command-line form (<see cref="Syntax"/>).</summary>
    public static NicSpec Parse(string text)
    {
        var spec = new NicSpec();
        var uplinks = new List<UplinkSpec>();
        foreach (var part in text.Split(','))
        {
            int eq = part.IndexOf('=');
            string key = eq < 0 ? part : part[..eq];
            string? value = eq < 0 ? null : part[(eq + 1)..];
            ArgumentException Fail(string what) => new($"--net '{text}': {what}");
            switch (key)
            {
                case "tap":
                    string name = value ?? "";
                    int at = name.IndexOf('@');
                    uplinks.Add(at < 0 ? new UplinkSpec { Tap = name } : new UplinkSpec { Tap = name[..at], Bridge = name[(at + 1)..] });
                    break;
                case "dev" when value is not null:
                    uplinks.Add(new UplinkSpec { Interface = value });
                    break;
                case "mac" when value is not null:
                    try
                    {
                        spec = spec with { Mac = MacAddress.Parse(value) };
                    }
                    catch (FormatException e)
                    {
                        throw Fail(e.Message);
                    }
                    break;
                case "queues" when value is not null:
                    spec = spec with { Queues = Number(value) ?? throw Fail($"queues '{value}' is not a whole number") };
                    break;
                case "mtu" when value is not null:
                    spec = spec with { Mtu = Number(value) ?? throw Fail($"mtu '{value}' is not a whole number") };
                    break;
                case "offload" or "offloads":
                    spec = spec with { Offloads = value switch { null or "on" or "true" or "1" => true, "off" or "false" or "0" => false, _ => throw Fail($"offload '{value}' is not on or off") } };
                    break;
                case "policy" when value is not null:
                    spec = spec with { Policy = ParsePolicy(value) ?? throw Fail($"policy '{value}' is not {PolicyNames}") };
                    break;
                case "failback":
                    spec = spec with { Failback = value switch { null or "on" or "true" or "1" => true, "off" or "false" or "0" => false, _ => throw Fail($"failback '{value}' is not on or off") } };
                    break;
                case "failback-delay" when value is not null:
                    spec = spec with { FailbackDelay = TimeSpan.FromMilliseconds(Number(value) ?? throw Fail($"failback-delay '{value}' is not a whole number of milliseconds")) };
                    break;
                case "arp-target" when value is not null:
                    spec = spec with { ArpTarget = ParseIPv4(value) ?? throw Fail($"arp-target '{value}' is not an IPv4 address") };
                    break;
                case "arp-interval" when value is not null:
                    spec = spec with { ArpInterval = TimeSpan.FromMilliseconds(Number(value) ?? throw Fail($"arp-interval '{value}' is not a whole number of milliseconds")) };
                    break;
                case "arp-misses" when value is not null:
                    spec = spec with { ArpMisses = Number(value) ?? throw Fail($"arp-misses '{value}' is not a whole number") };
                    break;
                case "group" when value is not null:
                    spec = spec with { Bandwidth = (spec.Bandwidth ?? new BandwidthGroupOptions { Group = value, Capacity = 0 }) with { Group = value } };
                    break;
                case "group-rate" or "reserve" or "tx-reserve" or "rx-reserve" when value is not null:
                    long groupRate;
                    try
                    {
                        groupRate = TokenBucket.ParseRate(value);
                    }
                    catch (FormatException e)
                    {
                        throw Fail($"{key}: {e.Message}");
                    }
                    var group = spec.Bandwidth ?? new BandwidthGroupOptions { Group = "", Capacity = 0 };
                    spec = spec with
                    {
                        Bandwidth = key switch
                        {
                            "group-rate" => group with { Capacity = groupRate },
                            "reserve" => group with { TxReservation = groupRate, RxReservation = groupRate },
                            "tx-reserve" => group with { TxReservation = groupRate },
                            _ => group with { RxReservation = groupRate },
                        },
                    };
                    break;
                case "shares" when value is not null:
                    spec = spec with
                    {
                        Bandwidth = (spec.Bandwidth ?? new BandwidthGroupOptions { Group = "", Capacity = 0 }) with
                        {
                            Shares = Number(value) ?? throw Fail($"shares '{value}' is not a whole number"),
                        },
                    };
                    break;
                case "limit" or "tx-limit" or "rx-limit" when value is not null:
                    long rate;
                    try
                    {
                        rate = TokenBucket.ParseRate(value);
                    }
                    catch (FormatException e)
                    {
                        throw Fail($"{key}: {e.Message}");
                    }
                    spec = spec with { TxLimit = key == "rx-limit" ? spec.TxLimit : rate, RxLimit = key == "tx-limit" ? spec.RxLimit : rate };
                    break;
                case "dos" when value is "suspend" or "limit" or "off":
                    spec = spec with { Dos = value == "off" ? null : (spec.Dos ?? new DosRules()) with { Action = value == "limit" ? DosAction.Limit : DosAction.Suspend } };
                    break;
                case "dos-pps" or "dos-syn" or "dos-udp" or "dos-icmp" or "dos-dst" when value is not null:
                    long? threshold = value == "off" ? null : Number64(value) ?? throw Fail($"{key} '{value}' is not a whole number or off");
                    var rules = spec.Dos ?? new DosRules();
                    spec = spec with
                    {
                        Dos = key switch
                        {
                            "dos-pps" => rules with { PacketsPerSecond = threshold },
                            "dos-syn" => rules with { HalfOpenPerSecond = threshold },
                            "dos-udp" => rules with { UdpPerSecond = threshold },
                            "dos-icmp" => rules with { IcmpPerSecond = threshold },
                            _ => rules with { DestinationsPerSecond = threshold },
                        },
                    };
                    break;
                case "dos-window" when value is not null:
                    spec = spec with { Dos = (spec.Dos ?? new DosRules()) with { Window = TimeSpan.FromMilliseconds(Number(value) ?? throw Fail($"dos-window '{value}' is not a whole number of milliseconds")) } };
                    break;
                case "dos-limit" when value is not null:
                    long to;
                    try
                    {
                        to = TokenBucket.ParseRate(value);
                    }
                    catch (FormatException e)
                    {
                        throw Fail($"dos-limit: {e.Message}");
                    }
                    spec = spec with { Dos = (spec.Dos ?? new DosRules()) with { LimitTo = to } };
                    break;
                case "spoof" when value is "allow" or "drop":
                    spec = spec with { AllowSpoofing = value == "allow" };
                    break;
                default:
                    throw Fail($"unknown option '{part}' (expected {Syntax})");
            }
        }
        spec = spec with { Uplinks = uplinks };
        spec.Validate();
        return spec;
    }

    /// <summary>A dotted-quad IPv4 address, or null (IPAddress.TryParse alone takes "10.1" and IPv6).</summary>
    public static System.Net.IPAddress? ParseIPv4(string s) =>
        System.Net.IPAddress.TryParse(s, out var a) && a.AddressFamily == System.Net.Sockets.AddressFamily.InterNetwork && s.Count(c => c == '.') == 3 ? a : null;

    private static long? Number64(string s) => long.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out long n) ? n : null;

    private static int? Number(string s) => int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : null;
}
