using Kvm.Tests.Shared;

/// <summary>
/// Where a benchmark runs, for its output: absolute times differ by orders of magnitude between a
/// host with /dev/kvm and the nested KVM host that tests/kvm-host/kvm-host boots under QEMU's TCG
/// (which sets KVM_NESTED_HOST=1 for the command it runs), so every result names the place.
/// </summary>
internal static class Place
{
    /// <summary>True inside tests/kvm-host/kvm-host.</summary>
    public static bool Nested => Environment.GetEnvironmentVariable("KVM_NESTED_HOST") == "1";

    /// <summary>Where a VM benchmark measures: the host's own /dev/kvm, or the nested host's.</summary>
    public static string ForVm => Nested
        ? $"measured in the nested KVM host under QEMU TCG ({Environment.ProcessorCount} vCPUs, {Kernel()})"
        : $"measured on the host with /dev/kvm ({Environment.ProcessorCount} CPUs, {Kernel()})";

    /// <summary>Where a benchmark that needs no KVM (the disk engine against qemu-img) measures.</summary>
    public static string ForDisk => Nested
        ? $"measured in the nested KVM host under QEMU TCG ({Environment.ProcessorCount} vCPUs, {Kernel()})"
        : $"measured on the host ({Environment.ProcessorCount} CPUs, {Kernel()})";

    /// <summary>
    /// True when /dev/kvm can be used; otherwise says why, and how `make bench` gets a KVM where
    /// the machine has none, and returns false.
    /// </summary>
    public static bool CheckKvm()
    {
        if (TestEnvironment.KvmUnavailable() is not { } why)
            return true;
        Console.Error.WriteLine($"benchmark: {why}; 'make bench' runs the VM benchmarks inside a nested KVM host " +
                                "(tests/kvm-host/kvm-host) where this machine has none");
        return false;
    }

    private static string Kernel()
    {
        try
        {
            return "Linux " + File.ReadAllText("/proc/sys/kernel/osrelease").Trim();
        }
        catch (IOException)
        {
            return "Linux";
        }
    }
}
