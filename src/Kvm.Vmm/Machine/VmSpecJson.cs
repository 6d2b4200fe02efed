using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Hypervisor;

namespace Kvm.Vmm.Machine;

/// <summary>
/// The JSON document form of a <see cref="VmSpec"/> (camelCase, enums as strings). Absent fields
/// take the spec's defaults; unknown fields are refused so a misspelt one is not silently ignored.
/// </summary>
public sealed class VmSpecDocument
{
    public string? Kernel { get; set; }
    public string? Cmdline { get; set; }
    public string? Initrd { get; set; }
    public ulong? MemoryBytes { get; set; }
    public int? Cpus { get; set; }
    public bool? DebugExit { get; set; }
    public HugePageMode? HugePages { get; set; }
    public bool? TrackDirtyPages { get; set; }
    public List<DiskSpecDocument>? Disks { get; set; }
    public List<NicSpecDocument>? Nics { get; set; }
    public List<string>? HiddenCpuFeatures { get; set; }
    public string? CpuModel { get; set; }

    public VmSpec ToSpec(string source)
    {
        if (string.IsNullOrEmpty(Kernel))
            throw new ArgumentException($"VM spec {source}: the field 'kernel' is required");
        var d = new VmSpec { Kernel = Kernel };
        return d with
        {
            Cmdline = Cmdline ?? d.Cmdline,
            Initrd = Initrd ?? d.Initrd,
            MemoryBytes = MemoryBytes ?? d.MemoryBytes,
            Cpus = Cpus ?? d.Cpus,
            DebugExit = DebugExit ?? d.DebugExit,
            HugePages = HugePages ?? d.HugePages,
            TrackDirtyPages = TrackDirtyPages ?? d.TrackDirtyPages,
            Disks = Disks?.Select((x, i) => x.ToSpec(source, i)).ToArray() ?? d.Disks,
            Nics = Nics?.Select((x, i) => x.ToSpec(source, i)).ToArray() ?? d.Nics,
            HiddenCpuFeatures = HiddenCpuFeatures is null ? d.HiddenCpuFeatures
                : Kvm.Vmm.Cpu.CpuFeatures.ParseHidden(string.Join(',', HiddenCpuFeatures.Select(f => "-" + f))),
            CpuModel = CpuModel ?? d.CpuModel,
        };
    }

    public static VmSpecDocument From(VmSpec spec) => new()
    {
        Kernel = spec.Kernel,
        Cmdline = spec.Cmdline,
        Initrd = spec.Initrd,
        MemoryBytes = spec.MemoryBytes,
        Cpus = spec.Cpus,
        DebugExit = spec.DebugExit,
        HugePages = spec.HugePages,
        TrackDirtyPages = spec.TrackDirtyPages,
        Disks = spec.Disks.Count == 0 ? null : spec.Disks.Select(DiskSpecDocument.From).ToList(),
        Nics = spec.Nics.Count == 0 ? null : spec.Nics.Select(NicSpecDocument.From).ToList(),
        HiddenCpuFeatures = spec.HiddenCpuFeatures.Count == 0 ? null : spec.HiddenCpuFeatures.ToList(),
        CpuModel = spec.CpuModel == "host" ? null : spec.CpuModel,
    };
}

/// <summary>The JSON form of a <see cref="DiskSpec"/>.</summary>
public sealed class DiskSpecDocument
{
    public string? Path { get; set; }
    public bool? ReadOnly { get; set; }
    public string? Serial { get; set; }
    public int? Queues { get; set; }

    public DiskSpec ToSpec(string source, int index)
    {
        if (string.IsNullOrEmpty(Path))
            throw new ArgumentException($"VM spec {source}: disks[{index}]: the field 'path' is required");
        var d = new DiskSpec { Path = Path };
        return d with
        {
            ReadOnly = ReadOnly ?? d.ReadOnly,
            Serial = Serial ?? d.Serial,
            Queues = Queues ?? d.Queues,
        };
    }

    public static DiskSpecDocument From(DiskSpec d) => new()
    {
        Path = d.Path,
        ReadOnly = d.ReadOnly,
        Serial = d.Serial,
        Queues = d.Queues,
    };
}

/// <summary>The JSON form of a <see cref="NicSpec"/>; a NIC without "mac" gets a random one.</summary>
public sealed class NicSpecDocument
{
    public string? Mac { get; set; }
    public int? Queues { get; set; }
    public bool? Offloads { get; set; }
    public bool? AllowSpoofing { get; set; }
    public int? Mtu { get; set; }
    public List<UplinkSpecDocument>? Uplinks { get; set; }

    /// <summary>"active-backup", "flow-hash" or "vm-port".</summary>
    public string? Policy { get; set; }
    public bool? Failback { get; set; }
    public int? FailbackDelayMs { get; set; }

    /// <summary>An IPv4 address every uplink probes by ARP (absent: the carrier alone), how often (ms) and how many misses take an uplink down.</summary>
    public string? ArpTarget { get; set; }
    public int? ArpIntervalMs { get; set; }
    public int? ArpMisses { get; set; }

    /// <summary>Bits per second the guest may send and receive (absent: no limit).</summary>
    public long? TxLimit { get; set; }
    public long? RxLimit { get; set; }

    /// <summary>Denial-of-service detection (absent: none).</summary>
    public DosDocument? Dos { get; set; }

    /// <summary>The bandwidth group this NIC shares an uplink in (absent: none).</summary>
    public BandwidthDocument? Bandwidth { get; set; }

    public NicSpec ToSpec(string source, int index)
    {
        var d = new NicSpec();
        Kvm.Network.MacAddress mac;
        try
        {
            mac = Mac is null ? d.Mac : Kvm.Network.MacAddress.Parse(Mac);
        }
        catch (FormatException e)
        {
            throw new ArgumentException($"VM spec {source}: nics[{index}].mac: {e.Message}");
        }
        var target = ArpTarget is null ? null : NicSpec.ParseIPv4(ArpTarget)
            ?? throw new ArgumentException($"VM spec {source}: nics[{index}].arpTarget: '{ArpTarget}' is not an IPv4 address");
        return d with
        {
            ArpTarget = target,
            ArpInterval = ArpIntervalMs is { } interval ? TimeSpan.FromMilliseconds(interval) : d.ArpInterval,
            ArpMisses = ArpMisses ?? d.ArpMisses,
            Mac = mac,
            Queues = Queues ?? d.Queues,
            Offloads = Offloads ?? d.Offloads,
            AllowSpoofing = AllowSpoofing ?? d.AllowSpoofing,
            Mtu = Mtu ?? d.Mtu,
            Policy = Policy is null ? d.Policy : NicSpec.ParsePolicy(Policy)
                ?? throw new ArgumentException($"VM spec {source}: nics[{index}].policy: '{Policy}' is not {NicSpec.PolicyNames}"),
            Failback = Failback ?? d.Failback,
            TxLimit = TxLimit ?? d.TxLimit,
            RxLimit = RxLimit ?? d.RxLimit,
            Dos = Dos?.ToRules(source, index),
            Bandwidth = Bandwidth?.ToOptions(source, index),
            FailbackDelay = FailbackDelayMs is { } ms ? TimeSpan.FromMilliseconds(ms) : d.FailbackDelay,
            Uplinks = Uplinks?.Select(u => new UplinkSpec { Tap = u.Tap ?? "", Bridge = u.Bridge, Interface = u.Interface }).ToArray()
                ?? throw new ArgumentException($"VM spec {source}: nics[{index}]: the field 'uplinks' is required"),
        };
    }

    public static NicSpecDocument From(NicSpec n) => new()
    {
        Mac = n.Mac.ToString(),
        Queues = n.Queues,
        Offloads = n.Offloads,
        AllowSpoofing = n.AllowSpoofing,
        Mtu = n.Mtu,
        Uplinks = n.Uplinks.Select(u => new UplinkSpecDocument { Tap = u.Interface is null ? u.Tap : null, Bridge = u.Bridge, Interface = u.Interface }).ToList(),
        Policy = NicSpec.PolicyName(n.Policy),
        Failback = n.Failback,
        TxLimit = n.TxLimit,
        RxLimit = n.RxLimit,
        Dos = n.Dos is null ? null : DosDocument.From(n.Dos),
        Bandwidth = n.Bandwidth is null ? null : BandwidthDocument.From(n.Bandwidth),
        FailbackDelayMs = (int)n.FailbackDelay.TotalMilliseconds,
        ArpTarget = n.ArpTarget?.ToString(),
        ArpIntervalMs = n.ArpTarget is null ? null : (int)n.ArpInterval.TotalMilliseconds,
        ArpMisses = n.ArpTarget is null ? null : n.ArpMisses,
    };
}

/// <summary>The JSON form of <see cref="Kvm.Network.BandwidthGroupOptions"/>: the group (a name or a path), its rate, this NIC's shares and reservations (bit/s).</summary>
public sealed class BandwidthDocument
{
    public string? Group { get; set; }
    public long? Rate { get; set; }
    public int? Shares { get; set; }
    public long? TxReservation { get; set; }
    public long? RxReservation { get; set; }

    public Kvm.Network.BandwidthGroupOptions ToOptions(string source, int index) => new()
    {
        Group = Group ?? throw new ArgumentException($"VM spec {source}: nics[{index}].bandwidth: the field 'group' is required"),
        Capacity = Rate ?? throw new ArgumentException($"VM spec {source}: nics[{index}].bandwidth: the field 'rate' is required"),
        Shares = Shares ?? Kvm.Network.BandwidthClaim.DefaultShares,
        TxReservation = TxReservation ?? 0,
        RxReservation = RxReservation ?? 0,
    };

    public static BandwidthDocument From(Kvm.Network.BandwidthGroupOptions o) => new()
    {
        Group = o.Group, Rate = o.Capacity, Shares = o.Shares, TxReservation = o.TxReservation, RxReservation = o.RxReservation,
    };
}

/// <summary>
/// The JSON form of <see cref="Kvm.Network.DosRules"/>: "action" is "suspend" or "limit"; a
/// threshold absent takes its default, a threshold of 0 turns its rule off.
/// </summary>
public sealed class DosDocument
{
    public string? Action { get; set; }
    public long? PacketsPerSecond { get; set; }
    public long? HalfOpenPerSecond { get; set; }
    public long? UdpPerSecond { get; set; }
    public long? IcmpPerSecond { get; set; }
    public long? DestinationsPerSecond { get; set; }
    public int? WindowMs { get; set; }
    public long? LimitTo { get; set; }

    public Kvm.Network.DosRules ToRules(string source, int index)
    {
        var d = new Kvm.Network.DosRules();
        static long? Rule(long? value, long? fallback) => value is null ? fallback : value == 0 ? null : value;
        return d with
        {
            Action = Action switch
            {
                null or "suspend" => Kvm.Network.DosAction.Suspend,
                "limit" => Kvm.Network.DosAction.Limit,
                _ => throw new ArgumentException($"VM spec {source}: nics[{index}].dos.action: '{Action}' is not suspend or limit"),
            },
            PacketsPerSecond = Rule(PacketsPerSecond, d.PacketsPerSecond),
            HalfOpenPerSecond = Rule(HalfOpenPerSecond, d.HalfOpenPerSecond),
            UdpPerSecond = Rule(UdpPerSecond, d.UdpPerSecond),
            IcmpPerSecond = Rule(IcmpPerSecond, d.IcmpPerSecond),
            DestinationsPerSecond = Rule(DestinationsPerSecond, d.DestinationsPerSecond),
            Window = WindowMs is { } ms ? TimeSpan.FromMilliseconds(ms) : d.Window,
            LimitTo = LimitTo ?? d.LimitTo,
        };
    }

    public static DosDocument From(Kvm.Network.DosRules r) => new()
    {
        Action = r.Action == Kvm.Network.DosAction.Limit ? "limit" : "suspend",
        PacketsPerSecond = r.PacketsPerSecond ?? 0,
        HalfOpenPerSecond = r.HalfOpenPerSecond ?? 0,
        UdpPerSecond = r.UdpPerSecond ?? 0,
        IcmpPerSecond = r.IcmpPerSecond ?? 0,
        DestinationsPerSecond = r.DestinationsPerSecond ?? 0,
        WindowMs = (int)r.Window.TotalMilliseconds,
        LimitTo = r.LimitTo,
    };
}

/// <summary>The JSON form of an <see cref="UplinkSpec"/>.</summary>
public sealed class UplinkSpecDocument
{
    public string? Tap { get; set; }
    public string? Bridge { get; set; }
    public string? Interface { get; set; }
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, UseStringEnumConverter = true,
    WriteIndented = true, UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(VmSpecDocument))]
public sealed partial class VmSpecJsonContext : JsonSerializerContext
{
    /// <summary>Parses a spec; errors name the source and the path in the document that is wrong.</summary>
    public static VmSpec Parse(string json, string source)
    {
        VmSpecDocument? doc;
        try
        {
            doc = JsonSerializer.Deserialize(json, Default.VmSpecDocument);
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"VM spec {source}: {e.Message}", e);
        }
        return (doc ?? throw new ArgumentException($"VM spec {source}: the document is null")).ToSpec(source);
    }

    public static string Format(VmSpec spec) => JsonSerializer.Serialize(global::Kvm.Vmm.Machine.VmSpecDocument.From(spec), Default.VmSpecDocument);
}
