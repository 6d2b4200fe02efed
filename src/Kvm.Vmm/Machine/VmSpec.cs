using Kvm.Hypervisor;

namespace Kvm.Vmm.Machine;

/// <summary>What a VM is made of. Checked by <see cref="Validate"/> before anything is created.</summary>
public sealed record VmSpec
{
    public const ulong DefaultMemory = 256UL << 20;
    public const ulong MinimumMemory = 2UL << 20;
    public const int MaxDisks = 31;

    /// <summary>An ELF kernel with a PVH entry note (the guest kit, or a vmlinux), or a bzImage.</summary>
    public required string Kernel { get; init; }

    /// <summary>An initial ramdisk for a bzImage kernel (placed as the boot protocol says).</summary>
    public string? Initrd { get; init; }
    public string Cmdline { get; init; } = "";
    public ulong MemoryBytes { get; init; } = DefaultMemory;
    public int Cpus { get; init; } = 1;

    /// <summary>Places the debug-exit port at 0xf4: a byte written there ends the VM with that status.</summary>
    public bool DebugExit { get; init; }
    public HugePageMode HugePages { get; init; } = HugePageMode.None;

    /// <summary>Logs dirty pages of guest RAM from the first instruction on.</summary>
    public bool TrackDirtyPages { get; init; }

    /// <summary>CPU features (Linux /proc/cpuinfo names) the vCPUs are told they lack; see <see cref="Cpu.CpuFeatures"/>.</summary>
    public IReadOnlyList<string> HiddenCpuFeatures { get; init; } = [];

    /// <summary>A named CPU model (see <see cref="Cpu.CpuFeatures.Models"/>); its hidden features add to <see cref="HiddenCpuFeatures"/>.</summary>
    public string CpuModel { get; init; } = "host";

    /// <summary>Every feature the vCPUs are told they lack: the model's and the explicitly hidden ones.</summary>
    public IReadOnlyList<string> AllHiddenCpuFeatures() =>
        Cpu.CpuFeatures.HiddenByModel(CpuModel).Concat(HiddenCpuFeatures).Distinct().ToArray();

    /// <summary>virtio-blk disks, in PCI slot order (slot 1 onwards).</summary>
    public IReadOnlyList<DiskSpec> Disks { get; init; } = [];

    /// <summary>virtio-net NICs, in PCI slot order after the disks.</summary>
    public IReadOnlyList<NicSpec> Nics { get; init; } = [];

    /// <summary>Throws <see cref="ArgumentException"/> naming the field and value that are wrong.</summary>
    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Kernel))
            throw new ArgumentException("no kernel given");
        if (Cpus < 1 || Cpus > 255)
            throw new ArgumentException($"cpus {Cpus} is out of range (1 to 255)");
        if (MemoryBytes < MinimumMemory)
            throw new ArgumentException($"memory {GuestMemory.FormatSize(MemoryBytes)} is below the minimum of {GuestMemory.FormatSize(MinimumMemory)}");
        ulong align = HugePages == HugePageMode.None ? GuestMemory.PageSize : 2UL << 20;
        if (MemoryBytes % align != 0)
            throw new ArgumentException($"memory {MemoryBytes} bytes is not a multiple of {GuestMemory.FormatSize(align)}");
        Cpu.CpuFeatures.Model(CpuModel); // throws naming the known models
        if (Disks.Count + Nics.Count > MaxDisks)
            throw new ArgumentException($"{Disks.Count} disks and {Nics.Count} NICs need more than the {MaxDisks} PCI slots left");
        foreach (var d in Disks)
            d.Validate();
        foreach (var n in Nics)
            n.Validate();
        var macs = Nics.GroupBy(n => n.Mac).FirstOrDefault(g => g.Count() > 1);
        if (macs is not null)
            throw new ArgumentException($"two NICs have MAC {macs.Key}");
    }

    /// <summary>Parses sizes such as 4096, 64K, 256M, 2G (binary units; a trailing 'B' or 'iB' is accepted).</summary>
    public static ulong ParseSize(string text)
    {
        string s = text.Trim();
        if (s.EndsWith("iB", StringComparison.OrdinalIgnoreCase))
            s = s[..^2];
        else if (s.EndsWith('B') || s.EndsWith('b'))
            s = s[..^1];
        int shift = 0;
        if (s.Length > 0)
        {
            shift = char.ToUpperInvariant(s[^1]) switch { 'K' => 10, 'M' => 20, 'G' => 30, 'T' => 40, _ => 0 };
            if (shift != 0)
                s = s[..^1];
        }
        if (!ulong.TryParse(s, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out ulong n))
            throw new FormatException($"'{text}' is not a size (examples: 512M, 2G, 65536)");
        ulong v = n << shift;
        if (shift != 0 && v >> shift != n)
            throw new FormatException($"size '{text}' is too large");
        return v;
    }
}
