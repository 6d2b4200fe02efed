namespace Kvm.Devices.Pci;

/// <summary>What kind of address space a base address register decodes.</summary>
public enum PciBarKind
{
    /// <summary>32-bit memory, not prefetchable.</summary>
    Memory32,

    /// <summary>64-bit memory (uses two BAR registers), not prefetchable.</summary>
    Memory64,
}

/// <summary>A base address register of a PCI function: its index, size (a power of two) and kind.</summary>
public sealed record PciBar(int Index, ulong Size, PciBarKind Kind)
{
    /// <summary>The type bits the low dword of the register reads back with.</summary>
    internal uint TypeBits => Kind == PciBarKind.Memory64 ? 0x4u : 0x0u;
}
