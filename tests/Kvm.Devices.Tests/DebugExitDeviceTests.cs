using Kvm.Devices.Bus;
using Kvm.Devices.Legacy.DebugExit;

namespace Kvm.Devices.Tests;

public class DebugExitDeviceTests
{
    private readonly List<byte> _exits = [];
    private readonly DebugExitDevice _dev;

    public DebugExitDeviceTests() => _dev = new DebugExitDevice(_exits.Add);

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(0x2a)]
    [InlineData(0xff)]
    public void ByteWriteCallsTheCallbackWithThatByte(byte status)
    {
        _dev.Write(0, [status], 0);
        Assert.Equal([status], _exits);
    }

    [Fact]
    public void WiderWritesUseTheLowByte()
    {
        _dev.Write(0, [0x11, 0x22], 0);
        _dev.Write(0, [0x33, 0x44, 0x55, 0x66], 1);
        Assert.Equal([0x11, 0x33], _exits);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void ReadsReturnZeroAndDoNotExit(int width)
    {
        var data = Enumerable.Repeat((byte)0xa5, width).ToArray();
        _dev.Read(0, data, 0);
        Assert.All(data, b => Assert.Equal(0, b));
        Assert.Empty(_exits);
    }

    [Fact]
    public void WriteThroughTheBusAtTheDefaultPortExits()
    {
        var bus = new IoBus("pio");
        bus.Register(DebugExitDevice.DefaultPort, DebugExitDevice.Length, _dev);

        Assert.True(bus.Write(0xf4, [0x07, 0, 0, 0], 0));
        Assert.Equal([0x07], _exits);

        var data = new byte[] { 0xff };
        Assert.True(bus.Read(0xf4, data, 0));
        Assert.Equal(0, data[0]);
        Assert.Single(_exits);
    }
}
