using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Legacy.AcpiPm;

/// <summary>
/// The ACPI PM1a fixed-hardware registers (ACPI 6.x, 4.8.3) behind one 6-port block: PM1_STS at
/// +0 and PM1_EN at +2 (the event block, 4 bytes), PM1_CNT at +4 (the control block, 2 bytes).
/// <list type="bullet">
/// <item>PM1_CNT.SCI_EN always reads 1: there is no SMI command port, so the platform is always in ACPI mode.</item>
/// <item>Writing SLP_EN with SLP_TYP = <see cref="SleepTypeS5"/> (the value the DSDT's \_S5 names) powers the VM off.
///   Other sleep states are not offered (the DSDT names no \_S1-\_S4), so other SLP_TYP values are ignored.</item>
/// <item><see cref="PressPowerButton"/> sets PWRBTN_STS; the SCI (level-triggered) is asserted while a status
///   bit and its enable bit are both set. Status bits are cleared by writing 1 to them.</item>
/// </list>
/// Accesses of any width and alignment within the block work byte by byte, as on real chipsets.
/// </summary>
public sealed class AcpiPmDevice(Action<int> powerOff, IInterruptLine? sci = null) : IBusDevice, IStatefulDevice
{
    public const int Length = 6;

    /// <summary>The SLP_TYP value of S5 (soft off) that the DSDT's \_S5 package carries.</summary>
    public const int SleepTypeS5 = 5;

    public const ushort StatusTimer = 1 << 0, StatusBusMaster = 1 << 4, StatusGlobal = 1 << 5,
        StatusPowerButton = 1 << 8, StatusSleepButton = 1 << 9, StatusRtc = 1 << 10, StatusWake = 1 << 15;
    public const ushort ControlSciEnable = 1 << 0, ControlSleepEnable = 1 << 13;
    private const int SleepTypeShift = 10;
    private const ushort SleepTypeMask = 7 << SleepTypeShift;

    // Bits a guest may enable: timer, global, power button, sleep button, RTC.
    private const ushort EnableMask = StatusTimer | StatusGlobal | StatusPowerButton | StatusSleepButton | StatusRtc;
    // Control bits that keep what the guest wrote (SCI_EN is fixed at 1, SLP_EN reads as 0).
    private const ushort ControlKeepMask = 0x1ffe & ~ControlSleepEnable;

    private readonly object _lock = new();
    private ushort _status;
    private ushort _enable;
    private ushort _control = ControlSciEnable;
    private bool _sciAsserted;

    /// <summary>PM1_STS, PM1_EN and PM1_CNT as the guest reads them.</summary>
    public (ushort Status, ushort Enable, ushort Control) Registers
    {
        get { lock (_lock) return (_status, _enable, _control); }
    }

    /// <summary>Presses the power button: the guest's OSPM sees PWRBTN_STS and, if it enabled it, an SCI.</summary>
    public void PressPowerButton()
    {
        lock (_lock)
        {
            _status |= StatusPowerButton;
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
            BinaryPrimitives.WriteUInt16LittleEndian(regs[4..], _control);
        }
        for (int i = 0; i < data.Length; i++)
        {
            ulong at = offset + (ulong)i;
            data[i] = at < Length ? regs[(int)at] : (byte)0xff;
        }
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId)
    {
        int sleepType = -1;
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
                switch (at >> 1)
                {
                    case 0:
                        _status &= (ushort)~value;          // write 1 to clear
                        break;
                    case 1:
                        _enable = (ushort)((_enable & ~laneMask) | (value & laneMask & EnableMask));
                        break;
                    case 2:
                        _control = (ushort)((_control & ~(laneMask & ControlKeepMask)) | (value & laneMask & ControlKeepMask) | ControlSciEnable);
                        if ((value & laneMask & ControlSleepEnable) != 0)
                            sleepType = (_control & SleepTypeMask) >> SleepTypeShift;
                        break;
                }
            }
            UpdateSciLocked();
        }
        if (sleepType == SleepTypeS5)
            powerOff(vcpuId);
    }

    private void UpdateSciLocked()
    {
        bool level = (_status & _enable) != 0;
        if (level == _sciAsserted)
            return;
        _sciAsserted = level;
        sci?.SetLevel(level);
    }

    public string StateKind => "acpi-pm";

    public AcpiPmState Save()
    {
        lock (_lock)
            return new AcpiPmState(_status, _enable, _control);
    }

    /// <summary>Takes <paramref name="state"/> over and drives the SCI to what it implies.</summary>
    public void Restore(AcpiPmState state)
    {
        lock (_lock)
        {
            _status = state.Status;
            _enable = (ushort)(state.Enable & EnableMask);
            _control = (ushort)((state.Control & ControlKeepMask) | ControlSciEnable);
            _sciAsserted = false;
            UpdateSciLocked();
        }
    }

    public void SaveState(StateWriter writer) => Save().Write(writer);

    public void RestoreState(ref StateReader reader) => Restore(AcpiPmState.Read(ref reader));
}

/// <summary>The state of an <see cref="AcpiPmDevice"/>: PM1_STS, PM1_EN and PM1_CNT.</summary>
public sealed record AcpiPmState(ushort Status, ushort Enable, ushort Control)
{
    public void Write(StateWriter w) => w.U16(Status).U16(Enable).U16(Control);

    public static AcpiPmState Read(ref StateReader r) => new(r.U16("pm1_status"), r.U16("pm1_enable"), r.U16("pm1_control"));
}
