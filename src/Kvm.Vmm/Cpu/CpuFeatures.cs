using Kvm.Interop.Structs;

namespace Kvm.Vmm.Cpu;

/// <summary>
/// CPU features a VM can be told its CPU lacks, by the names Linux's /proc/cpuinfo uses. Hiding a
/// feature clears its CPUID bit on every vCPU (the host's KVM still has it, the guest just does not
/// use it): a VM moving between hosts of different CPUs must see only what both have, and a host
/// whose KVM cannot run an instruction (PVM here cannot emulate `lock cmpxchg16b`) can hide it.
/// </summary>
public static class CpuFeatures
{
    private enum Reg { Eax, Ebx, Ecx, Edx }

    private sealed record Feature(uint Leaf, uint Index, Reg Register, int Bit);

    private static readonly Dictionary<string, Feature> Known = new(StringComparer.Ordinal)
    {
        ["sse3"] = new(1, 0, Reg.Ecx, 0),
        ["pclmulqdq"] = new(1, 0, Reg.Ecx, 1),
        ["ssse3"] = new(1, 0, Reg.Ecx, 9),
        ["fma"] = new(1, 0, Reg.Ecx, 12),
        ["cx16"] = new(1, 0, Reg.Ecx, 13),
        ["pcid"] = new(1, 0, Reg.Ecx, 17),
        ["sse4_1"] = new(1, 0, Reg.Ecx, 19),
        ["sse4_2"] = new(1, 0, Reg.Ecx, 20),
        ["x2apic"] = new(1, 0, Reg.Ecx, 21),
        ["movbe"] = new(1, 0, Reg.Ecx, 22),
        ["popcnt"] = new(1, 0, Reg.Ecx, 23),
        ["tsc_deadline_timer"] = new(1, 0, Reg.Ecx, 24),
        ["aes"] = new(1, 0, Reg.Ecx, 25),
        ["xsave"] = new(1, 0, Reg.Ecx, 26),
        ["avx"] = new(1, 0, Reg.Ecx, 28),
        ["f16c"] = new(1, 0, Reg.Ecx, 29),
        ["rdrand"] = new(1, 0, Reg.Ecx, 30),
        ["bmi1"] = new(7, 0, Reg.Ebx, 3),
        ["avx2"] = new(7, 0, Reg.Ebx, 5),
        ["bmi2"] = new(7, 0, Reg.Ebx, 8),
        ["erms"] = new(7, 0, Reg.Ebx, 9),
        ["avx512f"] = new(7, 0, Reg.Ebx, 16),
        ["rdseed"] = new(7, 0, Reg.Ebx, 18),
        ["adx"] = new(7, 0, Reg.Ebx, 19),
        ["smap"] = new(7, 0, Reg.Ebx, 20),
        ["sha_ni"] = new(7, 0, Reg.Ebx, 29),
        ["umip"] = new(7, 0, Reg.Ecx, 2),
        ["pku"] = new(7, 0, Reg.Ecx, 3),
        ["la57"] = new(7, 0, Reg.Ecx, 16),
        ["rdpid"] = new(7, 0, Reg.Ecx, 22),
        ["smep"] = new(7, 0, Reg.Ebx, 7),
        ["lahf_lm"] = new(0x8000_0001, 0, Reg.Ecx, 0),
        ["abm"] = new(0x8000_0001, 0, Reg.Ecx, 5),
        ["pdpe1gb"] = new(0x8000_0001, 0, Reg.Edx, 26),
        ["rdtscp"] = new(0x8000_0001, 0, Reg.Edx, 27),
    };

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

    /// <summary>Clears the CPUID bits of <paramref name="hidden"/> in <paramref name="table"/>, and what depends on them.</summary>
    public static void Hide(KvmCpuidEntry2[] table, IReadOnlyCollection<string> hidden)
    {
        var names = new HashSet<string>(hidden, StringComparer.Ordinal);
        // Features that only exist with another: without XSAVE there is no AVX and no OSXSAVE.
        if (names.Contains("xsave"))
            names.UnionWith(["avx", "avx2", "fma", "f16c", "avx512f"]);
        if (names.Contains("avx"))
            names.UnionWith(["avx2", "fma", "f16c", "avx512f"]);
        foreach (var name in names)
        {
            if (!Known.TryGetValue(name, out var f))
                throw new ArgumentException($"unknown CPU feature '{name}'");
            for (int i = 0; i < table.Length; i++)
            {
                ref var e = ref table[i];
                if (e.Function != f.Leaf || e.Index != f.Index)
                    continue;
                uint mask = ~(1u << f.Bit);
                switch (f.Register)
                {
                    case Reg.Eax: e.Eax &= mask; break;
                    case Reg.Ebx: e.Ebx &= mask; break;
                    case Reg.Ecx: e.Ecx &= mask; break;
                    case Reg.Edx: e.Edx &= mask; break;
                }
                if (name == "xsave" && f.Leaf == 1)
                    e.Ecx &= ~(1u << 27);       // OSXSAVE
            }
        }
    }
}
