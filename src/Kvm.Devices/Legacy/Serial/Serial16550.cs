using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Legacy.Serial;

/// <summary>
/// A 16550A UART: the registers a Linux 8250 driver and a polling guest use. Output goes to a
/// sink as the guest writes it (transmission is instant: THR is always empty again). Input is
/// queued by the host with <see cref="EnqueueInput"/> into a 16-byte receive FIFO. Interrupts are
/// level-triggered on the given line. Loopback mode (MCR bit 4) works as the driver's probe expects.
/// </summary>
public sealed class Serial16550 : IBusDevice, IStatefulDevice
{
    public const ushort Com1Port = 0x3f8;
    public const uint Com1Irq = 4;
    public const int RegisterCount = 8;
    public const int FifoSize = 16;

    // Register offsets.
    public const int Rbr = 0, Thr = 0, Dll = 0, Ier = 1, Dlm = 1, Iir = 2, Fcr = 2, Lcr = 3, Mcr = 4, Lsr = 5, Msr = 6, Scr = 7;

    // IER bits.
    public const byte IerRda = 0x01, IerThre = 0x02, IerRls = 0x04, IerMs = 0x08;
    // IIR values.
    public const byte IirNoInterrupt = 0x01, IirRls = 0x06, IirRda = 0x04, IirThre = 0x02, IirMs = 0x00, IirFifoEnabled = 0xc0;
    // LCR bits.
    public const byte LcrDlab = 0x80;
    // MCR bits.
    public const byte McrDtr = 0x01, McrRts = 0x02, McrOut1 = 0x04, McrOut2 = 0x08, McrLoop = 0x10;
    // LSR bits.
    public const byte LsrDr = 0x01, LsrOe = 0x02, LsrThre = 0x20, LsrTemt = 0x40;
    // MSR bits.
    public const byte MsrDcts = 0x01, MsrDdsr = 0x02, MsrTeri = 0x04, MsrDdcd = 0x08, MsrCts = 0x10, MsrDsr = 0x20, MsrRi = 0x40, MsrDcd = 0x80;
    // FCR bits.
    public const byte FcrEnable = 0x01, FcrClearRx = 0x02, FcrClearTx = 0x04;

    private readonly object _lock = new();
    private readonly Queue<byte> _rx = new();
    private readonly Action<ReadOnlySpan<byte>> _output;
    private readonly IInterruptLine? _irq;
    private byte _ier, _lcr, _mcr, _scr, _fcr, _dll = 0x0c, _dlm, _msrDelta;
    private bool _overrun;
    private bool _thrInterruptPending;
    private bool _irqAsserted;

    /// <param name="output">Receives each byte the guest transmits (on the vCPU thread).</param>
    /// <param name="irq">The interrupt line (IRQ 4 for COM1); null for a polled-only port.</param>
    public Serial16550(Action<ReadOnlySpan<byte>> output, IInterruptLine? irq = null)
    {
        _output = output;
        _irq = irq;
    }

    /// <summary>Bytes written by the guest in total.</summary>
    public long BytesTransmitted { get; private set; }

    /// <summary>Free space in the receive FIFO.</summary>
    public int InputSpace
    {
        get { lock (_lock) return FifoSize - _rx.Count; }
    }

    /// <summary>Queues bytes from the host for the guest to read; returns how many fitted in the FIFO.</summary>
    public int EnqueueInput(ReadOnlySpan<byte> bytes)
    {
        lock (_lock)
        {
            if ((_mcr & McrLoop) != 0)
                return 0; // in loopback the line is disconnected from the outside
            int n = 0;
            foreach (var b in bytes)
            {
                if (_rx.Count >= FifoSize)
                    break;
                _rx.Enqueue(b);
                n++;
            }
            UpdateIrqLocked();
            return n;
        }
    }

    public void Read(ulong offset, Span<byte> data, int vcpuId)
    {
        data.Clear();
        if (offset >= RegisterCount || data.IsEmpty)
            return;
        lock (_lock)
            data[0] = ReadRegisterLocked((int)offset);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId)
    {
        if (offset >= RegisterCount || data.IsEmpty)
            return;
        byte transmitted;
        bool send;
        lock (_lock)
            send = WriteRegisterLocked((int)offset, data[0], out transmitted);
        if (send)
        {
            BytesTransmitted++;
            _output([transmitted]);
        }
    }

    private byte ReadRegisterLocked(int reg)
    {
        bool dlab = (_lcr & LcrDlab) != 0;
        switch (reg)
        {
            case Rbr when dlab:
                return _dll;
            case Rbr:
            {
                byte b = _rx.Count > 0 ? _rx.Dequeue() : (byte)0;
                UpdateIrqLocked();
                return b;
            }
            case Ier when dlab:
                return _dlm;
            case Ier:
                return _ier;
            case Iir:
            {
                byte id = PendingInterruptLocked();
                if (id == IirThre)
                {
                    // Reading IIR while it reports THRE clears that interrupt.
                    _thrInterruptPending = false;
                    UpdateIrqLocked();
                }
                return (byte)(id | ((_fcr & FcrEnable) != 0 ? IirFifoEnabled : 0));
            }
            case Lcr:
                return _lcr;
            case Mcr:
                return _mcr;
            case Lsr:
            {
                byte lsr = LsrThre | LsrTemt;
                if (_rx.Count > 0)
                    lsr |= LsrDr;
                if (_overrun)
                    lsr |= LsrOe;
                _overrun = false; // reading LSR clears the error bits
                UpdateIrqLocked();
                return lsr;
            }
            case Msr:
            {
                byte msr = (byte)(ModemStatusLocked() | _msrDelta);
                _msrDelta = 0;
                UpdateIrqLocked();
                return msr;
            }
            case Scr:
                return _scr;
            default:
                return 0;
        }
    }

    // Returns true when the write transmitted a byte to the outside.
    private bool WriteRegisterLocked(int reg, byte value, out byte transmitted)
    {
        transmitted = 0;
        bool dlab = (_lcr & LcrDlab) != 0;
        switch (reg)
        {
            case Thr when dlab:
                _dll = value;
                return false;
            case Thr:
                _thrInterruptPending = true; // THR empties at once
                if ((_mcr & McrLoop) != 0)
                {
                    if (_rx.Count < FifoSize)
                        _rx.Enqueue(value);
                    else
                        _overrun = true;
                    UpdateIrqLocked();
                    return false;
                }
                transmitted = value;
                UpdateIrqLocked();
                return true;
            case Ier when dlab:
                _dlm = value;
                return false;
            case Ier:
            {
                bool thriWasOff = (_ier & IerThre) == 0;
                _ier = (byte)(value & 0x0f);
                if (thriWasOff && (_ier & IerThre) != 0)
                    _thrInterruptPending = true; // enabling THRI with an empty THR raises it
                UpdateIrqLocked();
                return false;
            }
            case Fcr:
                _fcr = (byte)(value & 0xc9);
                if ((value & FcrClearRx) != 0)
                    _rx.Clear();
                UpdateIrqLocked();
                return false;
            case Lcr:
                _lcr = value;
                return false;
            case Mcr:
            {
                byte before = ModemStatusLocked();
                _mcr = (byte)(value & 0x1f);
                byte after = ModemStatusLocked();
                byte changed = (byte)(before ^ after);
                if ((changed & MsrCts) != 0) _msrDelta |= MsrDcts;
                if ((changed & MsrDsr) != 0) _msrDelta |= MsrDdsr;
                if ((changed & MsrDcd) != 0) _msrDelta |= MsrDdcd;
                if ((before & MsrRi) != 0 && (after & MsrRi) == 0) _msrDelta |= MsrTeri;
                UpdateIrqLocked();
                return false;
            }
            case Scr:
                _scr = value;
                return false;
            default:
                return false; // LSR and MSR are read-only
        }
    }

    private byte ModemStatusLocked()
    {
        if ((_mcr & McrLoop) == 0)
            return MsrDcd | MsrDsr | MsrCts; // a connected terminal
        byte m = 0;
        if ((_mcr & McrRts) != 0) m |= MsrCts;
        if ((_mcr & McrDtr) != 0) m |= MsrDsr;
        if ((_mcr & McrOut1) != 0) m |= MsrRi;
        if ((_mcr & McrOut2) != 0) m |= MsrDcd;
        return m;
    }

    // The highest-priority pending and enabled interrupt, as an IIR identification value.
    private byte PendingInterruptLocked()
    {
        if ((_ier & IerRls) != 0 && _overrun)
            return IirRls;
        if ((_ier & IerRda) != 0 && _rx.Count > 0)
            return IirRda;
        if ((_ier & IerThre) != 0 && _thrInterruptPending)
            return IirThre;
        if ((_ier & IerMs) != 0 && _msrDelta != 0)
            return IirMs;
        return IirNoInterrupt;
    }

    private void UpdateIrqLocked()
    {
        bool level = PendingInterruptLocked() != IirNoInterrupt;
        if (level == _irqAsserted || _irq is null)
        {
            _irqAsserted = level;
            return;
        }
        _irqAsserted = level;
        _irq.SetLevel(level);
    }

    public string StateKind => "serial16550";

    /// <summary>The registers and the receive FIFO as they are now.</summary>
    public SerialState Save()
    {
        lock (_lock)
            return new SerialState(_ier, _lcr, _mcr, _scr, _fcr, _dll, _dlm, _msrDelta, _overrun, _thrInterruptPending, [.. _rx]);
    }

    /// <summary>Takes <paramref name="state"/> over and drives the interrupt line to what it implies.</summary>
    public void Restore(SerialState state)
    {
        lock (_lock)
        {
            (_ier, _lcr, _mcr, _scr, _fcr, _dll, _dlm, _msrDelta) =
                (state.Ier, state.Lcr, state.Mcr, state.Scr, state.Fcr, state.Dll, state.Dlm, state.MsrDelta);
            _overrun = state.Overrun;
            _thrInterruptPending = state.ThrInterruptPending;
            _rx.Clear();
            foreach (var b in state.Receive)
                _rx.Enqueue(b);
            _irqAsserted = false;
            UpdateIrqLocked();
        }
    }

    public void SaveState(StateWriter writer) => Save().Write(writer);

    public void RestoreState(ref StateReader reader) => Restore(SerialState.Read(ref reader));
}

/// <summary>The state of a <see cref="Serial16550"/>: its registers and the bytes waiting in its receive FIFO.</summary>
public sealed record SerialState(byte Ier, byte Lcr, byte Mcr, byte Scr, byte Fcr, byte Dll, byte Dlm, byte MsrDelta,
    bool Overrun, bool ThrInterruptPending, byte[] Receive)
{
    public void Write(StateWriter w) => w.U8(Ier).U8(Lcr).U8(Mcr).U8(Scr).U8(Fcr).U8(Dll).U8(Dlm).U8(MsrDelta)
        .Bool(Overrun).Bool(ThrInterruptPending).Bytes(Receive);

    public static SerialState Read(ref StateReader r) => new(r.U8("ier"), r.U8("lcr"), r.U8("mcr"), r.U8("scr"),
        r.U8("fcr"), r.U8("dll"), r.U8("dlm"), r.U8("msr_delta"), r.Bool("overrun"), r.Bool("thr_interrupt_pending"),
        r.Bytes("receive", Serial16550.FifoSize));
}
