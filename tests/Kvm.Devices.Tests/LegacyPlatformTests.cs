using Kvm.Devices.Bus;
using Kvm.Devices.Legacy.I8042;
using Kvm.Devices.Legacy.Rtc;

namespace Kvm.Devices.Tests;

public class CmosRtcTests
{
    private static readonly DateTime Moment = new(2026, 11, 22, 21, 7, 59, DateTimeKind.Utc);   // a Sunday

    private static (IoBus Bus, CmosRtc Rtc) Make(Func<DateTime>? clock = null)
    {
        var bus = new IoBus("pio");
        var rtc = new CmosRtc(clock ?? (() => Moment));
        bus.Register(CmosRtc.Port, CmosRtc.PortCount, rtc);
        return (bus, rtc);
    }

    private static byte Read(IoBus bus, byte register)
    {
        bus.Write(0x70, [register], 0);
        Span<byte> b = stackalloc byte[1];
        bus.Read(0x71, b, 0);
        return b[0];
    }

    [Theory]
    [InlineData(CmosRtc.Seconds, 0x59)]
    [InlineData(CmosRtc.Minutes, 0x07)]
    [InlineData(CmosRtc.Hours, 0x21)]
    [InlineData(CmosRtc.DayOfWeek, 0x01)]
    [InlineData(CmosRtc.DayOfMonth, 0x22)]
    [InlineData(CmosRtc.Month, 0x11)]
    [InlineData(CmosRtc.Year, 0x26)]
    [InlineData(CmosRtc.Century, 0x20)]
    public void TimeRegistersReadTheClockInBcd(byte register, byte expected)
    {
        var (bus, _) = Make();
        Assert.Equal(expected, Read(bus, register));
    }

    [Fact]
    public void StatusRegistersDescribeARunning24HourBcdClock()
    {
        var (bus, _) = Make();
        Assert.Equal(0, Read(bus, CmosRtc.StatusA) & 0x80);     // never mid-update
        Assert.Equal(0x02, Read(bus, CmosRtc.StatusB) & 0x06);  // 24-hour, BCD
        Assert.Equal(0x80, Read(bus, CmosRtc.StatusD));         // battery good
    }

    [Fact]
    public void TheNmiMaskBitDoesNotChangeTheRegisterAndTheIndexReadsBack()
    {
        var (bus, _) = Make();
        Assert.Equal(0x21, Read(bus, CmosRtc.Hours | 0x80));
        Span<byte> b = stackalloc byte[1];
        bus.Read(0x70, b, 0);
        Assert.Equal(CmosRtc.Hours | 0x80, b[0]);
    }

    [Fact]
    public void OtherCmosBytesAreStorageAndTheClockCannotBeSet()
    {
        var (bus, _) = Make();
        bus.Write(0x70, [0x40], 0);
        bus.Write(0x71, [0xab], 0);
        bus.Write(0x70, [CmosRtc.Minutes], 0);
        bus.Write(0x71, [0x33], 0);
        Assert.Equal(0xab, Read(bus, 0x40));
        Assert.Equal(0x07, Read(bus, CmosRtc.Minutes));
        Assert.Equal(0, Read(bus, 0x41));
    }

    [Fact]
    public void TheClockFollowsItsSource()
    {
        var now = Moment;
        var (bus, _) = Make(() => now);
        now = now.AddSeconds(1).AddYears(74);   // 2100-11-22 21:08:00
        Assert.Equal(0x00, Read(bus, CmosRtc.Seconds));
        Assert.Equal(0x08, Read(bus, CmosRtc.Minutes));
        Assert.Equal(0x00, Read(bus, CmosRtc.Year));
        Assert.Equal(0x21, Read(bus, CmosRtc.Century));
    }

    [Fact]
    public void WideAccessesReadAllOnesAndWriteNothing()
    {
        var (bus, _) = Make();
        bus.Write(0x70, [CmosRtc.Hours, 0], 0);     // a 2-byte write across both ports: ignored
        Span<byte> two = stackalloc byte[2];
        bus.Read(0x70, two, 0);
        Assert.Equal(0xffff, BitConverter.ToUInt16(two));
    }
}

public class I8042ControllerTests
{
    private readonly List<int> _resets = new();
    private readonly IoBus _bus = new("pio");
    private readonly I8042Controller _kbc;

    public I8042ControllerTests()
    {
        _kbc = new I8042Controller(_resets.Add);
        _bus.Register(I8042Controller.DataPortAddress, 1, _kbc.DataPort);
        _bus.Register(I8042Controller.CommandPortAddress, 1, _kbc.CommandPort);
    }

    private byte In(ushort port)
    {
        Span<byte> b = stackalloc byte[1];
        _bus.Read(port, b, 0);
        return b[0];
    }

    private void Out(ushort port, byte value, int vcpu = 0) => _bus.Write(port, [value], vcpu);

    [Fact]
    public void PulseResetCommandResetsTheMachineFromTheVcpuThatAsked()
    {
        Out(0x64, 0xfe, vcpu: 1);
        Assert.Equal([1], _resets);
        Assert.Equal(1, _kbc.Resets);
    }

    [Fact]
    public void ClearingTheResetBitOfTheOutputPortResets()
    {
        Out(0x64, 0xd1);
        Out(0x60, 0xde);        // A20 on, reset bit (0) clear
        Assert.Single(_resets);
        Out(0x64, 0xd1);
        Out(0x60, 0x03);        // reset bit set: no reset
        Assert.Single(_resets);
    }

    [Fact]
    public void SelfTestsAnswerAsAWorkingController()
    {
        Assert.Equal(0, In(0x64) & 0x01);      // nothing to read yet
        Out(0x64, 0xaa);
        Assert.Equal(0x01, In(0x64) & 0x01);
        Assert.Equal(0x55, In(0x60));
        Assert.Equal(0, In(0x64) & 0x01);      // read: output buffer empty again
        Out(0x64, 0xab);
        Assert.Equal(0x00, In(0x60));
        Assert.Empty(_resets);
    }

    [Fact]
    public void TheCommandByteIsKept()
    {
        Out(0x64, 0x60);
        Out(0x60, 0x61);
        Out(0x64, 0x20);
        Assert.Equal(0x61, In(0x60));
    }

    [Fact]
    public void OtherCommandsAndKeyboardBytesDoNothing()
    {
        foreach (byte c in new byte[] { 0xad, 0xae, 0xa7, 0xa8, 0xff, 0xf1 })
            Out(0x64, c);
        Out(0x60, 0xf4);        // "enable scanning" for a keyboard that is not there
        Assert.Empty(_resets);
        Assert.Equal(0, In(0x64) & 0x01);
    }
}
