using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Legacy.Rtc;

/// <summary>
/// The PC's CMOS real-time clock at ports 0x70 (index; bit 7 masks NMI) and 0x71 (data): the time
/// registers read the host's clock (UTC) in BCD with the 24-hour format, as firmware leaves them;
/// status registers A-D report a running clock that is never mid-update; the other bytes of the
/// 128-byte CMOS are plain storage. Setting the time is accepted and ignored (the guest's clock
/// follows the host's). No alarm or periodic interrupts.
/// </summary>
public sealed class CmosRtc(Func<DateTime>? clock = null) : IBusDevice, IStatefulDevice
{
    public const ushort Port = 0x70;
    public const int PortCount = 2;

    public const byte Seconds = 0x00, Minutes = 0x02, Hours = 0x04, DayOfWeek = 0x06, DayOfMonth = 0x07,
        Month = 0x08, Year = 0x09, StatusA = 0x0a, StatusB = 0x0b, StatusC = 0x0c, StatusD = 0x0d, Century = 0x32;

    /// <summary>Status A: divider 32.768 kHz, rate 1024 Hz; the update-in-progress bit (7) stays clear.</summary>
    private const byte StatusAValue = 0x26;

    /// <summary>Status B: 24-hour mode (bit 1), BCD (bit 2 clear), no interrupts enabled.</summary>
    private const byte StatusBValue = 0x02;

    /// <summary>Status D: the CMOS battery is good (valid RAM and time).</summary>
    private const byte StatusDValue = 0x80;

    private readonly object _lock = new();
    private readonly byte[] _cmos = new byte[128];
    private readonly Func<DateTime> _clock = clock ?? (() => DateTime.UtcNow);
    private byte _index;

    public void Read(ulong offset, Span<byte> data, int vcpuId)
    {
        data.Fill(0xff);
        if (data.Length != 1)
            return;
        lock (_lock)
            data[0] = offset == 0 ? _index : ReadRegister((byte)(_index & 0x7f));
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId)
    {
        if (data.Length != 1)
            return;
        lock (_lock)
        {
            if (offset == 0)
                _index = data[0];
            else
                WriteRegister((byte)(_index & 0x7f), data[0]);
        }
    }

    private byte ReadRegister(byte register)
    {
        var now = _clock();
        return register switch
        {
            Seconds => Bcd(now.Second),
            Minutes => Bcd(now.Minute),
            Hours => Bcd(now.Hour),
            DayOfWeek => Bcd((int)now.DayOfWeek + 1),     // 1 = Sunday
            DayOfMonth => Bcd(now.Day),
            Month => Bcd(now.Month),
            Year => Bcd(now.Year % 100),
            Century => Bcd(now.Year / 100),
            StatusA => StatusAValue,
            StatusB => StatusBValue,
            StatusC => 0,                                 // no interrupt flags (reading would clear them)
            StatusD => StatusDValue,
            _ => _cmos[register],
        };
    }

    private void WriteRegister(byte register, byte value)
    {
        switch (register)
        {
            case <= Year or Century or StatusA or StatusB or StatusC or StatusD:
                break;      // the clock follows the host; its format and status are fixed
            default:
                _cmos[register] = value;
                break;
        }
    }

    private static byte Bcd(int value) => (byte)(value / 10 << 4 | value % 10);

    public string StateKind => "cmos-rtc";

    /// <summary>The index register and the CMOS bytes (the time itself follows the host's clock and is not state).</summary>
    public RtcState Save()
    {
        lock (_lock)
            return new RtcState(_index, [.. _cmos]);
    }

    public void Restore(RtcState state)
    {
        if (state.Cmos.Length != _cmos.Length)
            throw new DeviceStateException($"the saved CMOS has {state.Cmos.Length} bytes, not {_cmos.Length}");
        lock (_lock)
        {
            _index = state.Index;
            state.Cmos.CopyTo(_cmos, 0);
        }
    }

    public void SaveState(StateWriter writer) => Save().Write(writer);

    public void RestoreState(ref StateReader reader) => Restore(RtcState.Read(ref reader));
}

/// <summary>The state of a <see cref="CmosRtc"/>: the selected register and the 128 CMOS bytes.</summary>
public sealed record RtcState(byte Index, byte[] Cmos)
{
    public void Write(StateWriter w) => w.U8(Index).Bytes(Cmos);

    public static RtcState Read(ref StateReader r) => new(r.U8("index"), r.Bytes("cmos", 128, exact: true));
}
