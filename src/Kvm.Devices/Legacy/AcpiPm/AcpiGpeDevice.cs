using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Legacy.AcpiPm;

/// <summary>
/// The ACPI GPE0 block (ACPI 6.x, 4.8.4.1): <see cref="Count"/> general-purpose events, a status
/// register (GPE0_STS, 2 bytes at +0) and an enable register (GPE0_EN, 2 bytes at +2), so the
/// FADT's GPE0_BLK_LEN is 4. The VMM raises an event (<see cref="Raise"/>): its status bit is set,
/// and the SCI (level-triggered, shared with the PM1 registers) is asserted while a status bit and
/// its enable bit are both set. The guest clears a status bit by writing 1 to it; the DSDT's
/// \_GPE._Exx method then runs (GPE 0: the VM generation id's Notify).
/// Accesses of any width and alignment within the block work byte by byte.
/// </summary>
public sealed class AcpiGpeDevice(IInterruptLine? sci = null) : IBusDevice, IStatefulDevice
{
    /// <summary>Bytes of the block: status then enable, two bytes each.</summary>
    public const int Length = 4;

    /// <summary>General-purpose events in the block (8 per status byte).</summary>
    public const int Count = 16;

    private readonly object _lock = new();
    private ushort _status;
    private ushort _enable;
    private bool _sciAsserted;

    /// <summary>GPE0_STS and GPE0_EN as the guest reads them.</summary>
    public (ushort Status, ushort Enable) Registers
    {
        get { lock (_lock) return (_status, _enable); }
    }

    /// <summary>Signals general-purpose event <paramref name="gpe"/> (0 to <see cref="Count"/> - 1): an SCI if the guest enabled it, now or later.</summary>
    public void Raise(int gpe)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(gpe);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(gpe, Count);
        lock (_lock)
        {
            _status |= (ushort)(1 << gpe);
            UpdateSciLocked();
        }
    }

    public void Read(ulong offset, Span<byte> data, int vcpuId)
    {
        Span<byte> regs = stackalloc byte[Length];
        lock (_lock)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(regs, _status);
            BinaryPrimitives.WriteUInt16LittleEndian(regs[2..], _enable);
        }
        for (int i = 0; i < data.Length; i++)
        {
            ulong at = offset + (ulong)i;
            data[i] = at < Length ? regs[(int)at] : (byte)0xff;
        }
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId)
    {
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i++)
            {
                ulong at = offset + (ulong)i;
                if (at >= Length)
                    break;
                int shift = (int)(at & 1) * 8;
                ushort value = (ushort)(data[i] << shift);
                ushort laneMask = (ushort)(0xff << shift);
                if (at < 2)
                    _status &= (ushort)~value;          // write 1 to clear
                else
                    _enable = (ushort)((_enable & ~laneMask) | (value & laneMask));
            }
            UpdateSciLocked();
        }
    }

    private void UpdateSciLocked()
    {
        bool level = (_status & _enable) != 0;
        if (level == _sciAsserted)
            return;
        _sciAsserted = level;
        sci?.SetLevel(level);
    }

    public string StateKind => "acpi-gpe";

    public AcpiGpeState Save()
    {
        lock (_lock)
            return new AcpiGpeState(_status, _enable);
    }

    /// <summary>Takes <paramref name="state"/> over and drives the SCI to what it implies.</summary>
    public void Restore(AcpiGpeState state)
    {
        lock (_lock)
        {
            _status = state.Status;
            _enable = state.Enable;
            _sciAsserted = false;
            UpdateSciLocked();
        }
    }

    public void SaveState(StateWriter writer) => Save().Write(writer);

    public void RestoreState(ref StateReader reader) => Restore(AcpiGpeState.Read(ref reader));
}

/// <summary>The state of an <see cref="AcpiGpeDevice"/>: GPE0_STS and GPE0_EN.</summary>
public sealed record AcpiGpeState(ushort Status, ushort Enable)
{
    public void Write(StateWriter w) => w.U16(Status).U16(Enable);

    public static AcpiGpeState Read(ref StateReader r) => new(r.U16("gpe0_status"), r.U16("gpe0_enable"));
}
