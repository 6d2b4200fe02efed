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

/// <summary>struct kvm_pic_state: one 8259 PIC of the in-kernel irqchip (chip 0 master, 1 slave).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmPicState
{
    public byte LastIrr;
    public byte Irr;
    public byte Imr;
    public byte Isr;
    public byte PriorityAdd;
    public byte IrqBase;
    public byte ReadRegSelect;
    public byte Poll;
    public byte SpecialMask;
    public byte InitState;
    public byte AutoEoi;
    public byte RotateOnAutoEoi;
    public byte SpecialFullyNestedMode;
    public byte Init4;
    public byte Elcr;
    public byte ElcrMask;
}

/// <summary>struct kvm_ioapic_state: the in-kernel IOAPIC (chip 2), its 24 redirection entries as raw 64-bit words.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmIoapicState
{
    public const int Pins = 24;
    public ulong BaseAddress;
    public uint IoRegSel;
    public uint Id;
    public uint Irr;
    public uint Pad;
    public fixed ulong RedirTbl[Pins];
}

/// <summary>struct kvm_irqchip: KVM_GET/SET_IRQCHIP's argument; <see cref="Chip"/> holds a <see cref="KvmPicState"/> or a <see cref="KvmIoapicState"/>.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmIrqchip
{
    public const uint PicMaster = 0;
    public const uint PicSlave = 1;
    public const uint Ioapic = 2;
    public const int ChipBytes = 512;

    public uint ChipId;
    public uint Pad;
    public fixed byte Chip[ChipBytes];
}

/// <summary>struct kvm_pit_channel_state: one channel of the in-kernel 8254 PIT.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmPitChannelState
{
    public uint Count;
    public ushort LatchedCount;
    public byte CountLatched;
    public byte StatusLatched;
    public byte Status;
    public byte ReadState;
    public byte WriteState;
    public byte WriteLatch;
    public byte RwMode;
    public byte Mode;
    public byte Bcd;
    public byte Gate;
    public long CountLoadTime;
}

/// <summary>struct kvm_pit_state2: the in-kernel PIT's three channels and flags (KVM_GET/SET_PIT2).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmPitState2
{
    public const uint FlagHpetLegacy = 1;
    public KvmPitChannelState Channel0;
    public KvmPitChannelState Channel1;
    public KvmPitChannelState Channel2;
    public uint Flags;
    public fixed uint Reserved[9];
}
