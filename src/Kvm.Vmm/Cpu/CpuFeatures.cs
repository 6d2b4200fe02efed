using Kvm.Interop.Structs;

namespace Kvm.Vmm.Cpu;

/// <summary>
/// CPU features a VM can be told its CPU lacks, by the names Linux's /proc/cpuinfo uses. Hiding a
/// feature clears its CPUID bit on every vCPU (the host's KVM still has it, the guest just does not
/// use it): a VM moving between hosts of different CPUs must see only what both have, and a host
/// whose KVM cannot run an instruction (PVM here cannot emulate `lock cmpxchg16b`) can hide it.
/// </summary>
/// <summary>A named CPU model: it keeps the features of x86-64 psABI levels up to <paramref name="Level"/>.</summary>
public sealed record CpuModel(string Name, int Level, string Description);

public static class CpuFeatures
{
    private enum Reg { Eax, Ebx, Ecx, Edx }

    // Level: the x86-64 psABI micro-architecture level that requires the feature (2, 3 or 4), or 0.
    private sealed record Feature(uint Leaf, uint Index, Reg Register, int Bit, int Level = 0);

    private static readonly Dictionary<string, Feature> Known = new(StringComparer.Ordinal)
    {
        ["sse3"] = new(1, 0, Reg.Ecx, 0, 2),
        ["pclmulqdq"] = new(1, 0, Reg.Ecx, 1),
        ["ssse3"] = new(1, 0, Reg.Ecx, 9, 2),
        ["fma"] = new(1, 0, Reg.Ecx, 12, 3),
        ["cx16"] = new(1, 0, Reg.Ecx, 13, 2),
        ["pcid"] = new(1, 0, Reg.Ecx, 17),
        ["sse4_1"] = new(1, 0, Reg.Ecx, 19, 2),
        ["sse4_2"] = new(1, 0, Reg.Ecx, 20, 2),
        ["x2apic"] = new(1, 0, Reg.Ecx, 21),
        ["movbe"] = new(1, 0, Reg.Ecx, 22, 3),
        ["popcnt"] = new(1, 0, Reg.Ecx, 23, 2),
        ["tsc_deadline_timer"] = new(1, 0, Reg.Ecx, 24),
        ["aes"] = new(1, 0, Reg.Ecx, 25),
        ["xsave"] = new(1, 0, Reg.Ecx, 26, 3),
        ["avx"] = new(1, 0, Reg.Ecx, 28, 3),
        ["f16c"] = new(1, 0, Reg.Ecx, 29, 3),
        ["rdrand"] = new(1, 0, Reg.Ecx, 30),
        ["fsgsbase"] = new(7, 0, Reg.Ebx, 0),
        ["bmi1"] = new(7, 0, Reg.Ebx, 3, 3),
        ["hle"] = new(7, 0, Reg.Ebx, 4),
        ["avx2"] = new(7, 0, Reg.Ebx, 5, 3),
        ["smep"] = new(7, 0, Reg.Ebx, 7),
        ["bmi2"] = new(7, 0, Reg.Ebx, 8, 3),
        ["erms"] = new(7, 0, Reg.Ebx, 9),
        ["invpcid"] = new(7, 0, Reg.Ebx, 10),
        ["rtm"] = new(7, 0, Reg.Ebx, 11),
        ["avx512f"] = new(7, 0, Reg.Ebx, 16, 4),
        ["avx512dq"] = new(7, 0, Reg.Ebx, 17, 4),
        ["rdseed"] = new(7, 0, Reg.Ebx, 18),
        ["adx"] = new(7, 0, Reg.Ebx, 19),
        ["smap"] = new(7, 0, Reg.Ebx, 20),
        ["avx512ifma"] = new(7, 0, Reg.Ebx, 21),
        ["clflushopt"] = new(7, 0, Reg.Ebx, 23),
        ["clwb"] = new(7, 0, Reg.Ebx, 24),
        ["avx512cd"] = new(7, 0, Reg.Ebx, 28, 4),
        ["sha_ni"] = new(7, 0, Reg.Ebx, 29),
        ["avx512bw"] = new(7, 0, Reg.Ebx, 30, 4),
        ["avx512vl"] = new(7, 0, Reg.Ebx, 31, 4),
        ["avx512vbmi"] = new(7, 0, Reg.Ecx, 1),
        ["umip"] = new(7, 0, Reg.Ecx, 2),
        ["pku"] = new(7, 0, Reg.Ecx, 3),
        ["gfni"] = new(7, 0, Reg.Ecx, 8),
        ["vaes"] = new(7, 0, Reg.Ecx, 9),
        ["vpclmulqdq"] = new(7, 0, Reg.Ecx, 10),
        ["la57"] = new(7, 0, Reg.Ecx, 16),
        ["rdpid"] = new(7, 0, Reg.Ecx, 22),
        ["xsaveopt"] = new(0xd, 1, Reg.Eax, 0),
        ["xsavec"] = new(0xd, 1, Reg.Eax, 1),
        ["xsaves"] = new(0xd, 1, Reg.Eax, 3),
        ["lahf_lm"] = new(0x8000_0001, 0, Reg.Ecx, 0, 2),
        ["abm"] = new(0x8000_0001, 0, Reg.Ecx, 5, 3),
        ["sse4a"] = new(0x8000_0001, 0, Reg.Ecx, 6),
        ["3dnowprefetch"] = new(0x8000_0001, 0, Reg.Ecx, 8),
        ["xop"] = new(0x8000_0001, 0, Reg.Ecx, 11),
        ["fma4"] = new(0x8000_0001, 0, Reg.Ecx, 16),
        ["tbm"] = new(0x8000_0001, 0, Reg.Ecx, 21),
        ["pdpe1gb"] = new(0x8000_0001, 0, Reg.Edx, 26),
        ["rdtscp"] = new(0x8000_0001, 0, Reg.Edx, 27),
    };

    // Features that exist only with another one: hiding the key hides the values too.
    private static readonly (string Feature, string[] Needs)[] Dependents =
    [
        ("xsave", ["avx", "xsaveopt", "xsavec", "xsaves"]),
        ("avx", ["avx2", "fma", "f16c", "avx512f", "vaes", "vpclmulqdq", "xop", "fma4"]),
        ("avx512f", ["avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi"]),
    ];

    /// <summary>
    /// Named CPU models: each hides the features above an x86-64 psABI level, so that a VM sees
    /// the same instruction set on every host that has at least that level. <c>host</c> hides nothing.
    /// </summary>
    public static IReadOnlyList<CpuModel> Models { get; } =
    [
        new("host", int.MaxValue, "everything this host's KVM offers (the default)"),
        new("x86-64-v3", 3, "up to AVX2, BMI1/2, FMA, MOVBE, XSAVE: hides AVX-512"),
        new("x86-64-v2", 2, "up to SSE4.2, POPCNT, CMPXCHG16B: hides AVX, XSAVE and newer"),
        new("x86-64", 1, "the x86-64 baseline (SSE2): hides CMPXCHG16B, SSE3 and newer"),
    ];

    /// <summary>The model called <paramref name="name"/>; throws <see cref="ArgumentException"/> naming the known ones.</summary>
    public static CpuModel Model(string name) =>
        Models.FirstOrDefault(m => m.Name == name)
        ?? throw new ArgumentException($"cpu model '{name}' is unknown (known: {string.Join(", ", Models.Select(m => m.Name))})");

    /// <summary>The features model <paramref name="model"/> hides (with what depends on them).</summary>
    public static IReadOnlyList<string> HiddenByModel(string model)
    {
        int level = Model(model).Level;
        return Known.Where(kv => kv.Value.Level > level).Select(kv => kv.Key).ToArray();
    }

    /// <summary>The feature names this VMM can hide.</summary>
    public static IReadOnlyCollection<string> Names => Known.Keys;

    /// <summary>
    /// Parses a list such as <c>-cx16,-xsave</c>: each item a '-' and a feature name. Returns the
    /// names to hide; throws <see cref="ArgumentException"/> naming an unknown or malformed item.
    /// </summary>
    public static IReadOnlyList<string> ParseHidden(string text)
    {
        var hidden = new List<string>();
        foreach (var raw in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            if (raw.Length < 2 || raw[0] != '-')
                throw new ArgumentException($"--cpu-features '{raw}': write '-NAME' to hide a feature (features cannot be added beyond the host's)");
            string name = raw[1..].ToLowerInvariant();
            if (!Known.ContainsKey(name))
                throw new ArgumentException($"--cpu-features: unknown feature '{name}' (known: {string.Join(", ", Known.Keys.Order())})");
            if (!hidden.Contains(name))
                hidden.Add(name);
        }
        return hidden;
    }

    /// <summary>Whether feature <paramref name="name"/> is present in <paramref name="table"/>.</summary>
    public static bool IsSet(IEnumerable<KvmCpuidEntry2> table, string name)
    {
        if (!Known.TryGetValue(name, out var f))
            throw new ArgumentException($"unknown CPU feature '{name}'");
        foreach (var entry in table)
        {
            var e = entry;
            if (e.Function == f.Leaf && e.Index == f.Index)
                return (Register(ref e, f.Register) & (1u << f.Bit)) != 0;
        }
        return false;
    }

    /// <summary>Sets feature <paramref name="name"/>'s CPUID bit in <paramref name="table"/> (where its leaf is present; false if it is not).</summary>
    public static bool Set(KvmCpuidEntry2[] table, string name)
    {
        if (!Known.TryGetValue(name, out var f))
            throw new ArgumentException($"unknown CPU feature '{name}'");
        for (int i = 0; i < table.Length; i++)
        {
            ref var e = ref table[i];
            if (e.Function == f.Leaf && e.Index == f.Index)
            {
                Register(ref e, f.Register) |= 1u << f.Bit;
                return true;
            }
        }
        return false;
    }

    /// <summary>
    /// The known features <paramref name="wanted"/> has that <paramref name="offered"/> lacks, by
    /// name: what a VM that ran with CPUID <paramref name="wanted"/> would lose on a host whose KVM
    /// offers <paramref name="offered"/> (KVM_GET_SUPPORTED_CPUID).
    /// </summary>
    public static IReadOnlyList<string> Missing(IReadOnlyList<KvmCpuidEntry2> wanted, IReadOnlyList<KvmCpuidEntry2> offered) =>
        Known.Keys.Where(name => IsSet(wanted, name) && !IsSet(offered, name)).Order(StringComparer.Ordinal).ToArray();

    private static ref uint Register(ref KvmCpuidEntry2 e, Reg r)
    {
        switch (r)
        {
            case Reg.Eax: return ref e.Eax;
            case Reg.Ebx: return ref e.Ebx;
            case Reg.Ecx: return ref e.Ecx;
            default: return ref e.Edx;
        }
    }

    /// <summary>Clears the CPUID bits of <paramref name="hidden"/> in <paramref name="table"/>, and what depends on them.</summary>
    public static void Hide(KvmCpuidEntry2[] table, IReadOnlyCollection<string> hidden)
    {
        var names = new HashSet<string>(hidden, StringComparer.Ordinal);
        foreach (var (feature, needs) in Dependents)        // in order: xsave -> avx -> avx512f -> ...
        {
            if (names.Contains(feature))
                names.UnionWith(needs);
        }
        foreach (var name in names)
        {
            if (!Known.TryGetValue(name, out var f))
                throw new ArgumentException($"unknown CPU feature '{name}'");
            for (int i = 0; i < table.Length; i++)
            {
                ref var e = ref table[i];
                if (e.Function != f.Leaf || e.Index != f.Index)
                    continue;
                Register(ref e, f.Register) &= ~(1u << f.Bit);
                if (name == "xsave" && f.Leaf == 1)
                    e.Ecx &= ~(1u << 27);       // OSXSAVE
            }
        }
    }
}
