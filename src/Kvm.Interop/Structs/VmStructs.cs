using System.Runtime.InteropServices;

namespace Kvm.Interop.Structs;

/// <summary>struct kvm_userspace_memory_region.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmUserspaceMemoryRegion
{
    public const uint LogDirtyPages = 1, ReadOnly = 2;
    public uint Slot;
    public uint Flags;
    public ulong GuestPhysAddr;
    public ulong MemorySize;
    public ulong UserspaceAddr;
}

/// <summary>struct kvm_irq_routing_entry: one GSI route (irqchip pin or MSI message).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmIrqRoutingEntry
{
    public const uint TypeIrqchip = 1, TypeMsi = 2;
    public uint Gsi;
    public uint Type;
    public uint Flags;
    public uint Pad;
    /// <summary>The union u: for irqchip {irqchip, pin}; for MSI {address_lo, address_hi, data, devid}.</summary>
    public fixed uint U[8];

    public static KvmIrqRoutingEntry Irqchip(uint gsi, uint irqchip, uint pin)
    {
        var e = new KvmIrqRoutingEntry { Gsi = gsi, Type = TypeIrqchip };
        e.U[0] = irqchip;
        e.U[1] = pin;
        return e;
    }

    public static KvmIrqRoutingEntry Msi(uint gsi, ulong address, uint data)
    {
        var e = new KvmIrqRoutingEntry { Gsi = gsi, Type = TypeMsi };
        e.U[0] = (uint)address;
        e.U[1] = (uint)(address >> 32);
        e.U[2] = data;
        return e;
    }
}

/// <summary>struct kvm_clock_data: the VM's kvmclock.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmClockData
{
    public ulong Clock;
    public uint Flags;
    public uint Pad0;
    public ulong Realtime;
    public ulong HostTsc;
    public fixed uint Pad[4];
}
