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
