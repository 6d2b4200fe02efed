using System.Text.Json;
using System.Text.Json.Serialization;

namespace Kvm.Vmm.Machine;

/// <summary>JSON form of <see cref="VmSpec"/>, as kvm-vmm reads it (camelCase, enums as strings).</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, UseStringEnumConverter = true,
    WriteIndented = true, UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow)]
[JsonSerializable(typeof(VmSpec))]
public sealed partial class VmSpecJsonContext : JsonSerializerContext
{
    /// <summary>Parses a spec; errors name the path in the document that is wrong.</summary>
    public static VmSpec Parse(string json, string source)
    {
        try
        {
            return JsonSerializer.Deserialize(json, Default.VmSpec)
                ?? throw new ArgumentException($"VM spec {source}: the document is null");
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"VM spec {source}: {e.Message}", e);
        }
    }

    public static string Format(VmSpec spec) => JsonSerializer.Serialize(spec, Default.VmSpec);
}
