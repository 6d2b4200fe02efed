using System.Buffers.Binary;
using Kvm.Devices.Legacy.AcpiPm;

namespace Kvm.Devices.Tests;

public class AcpiPmDeviceTests
{
    private readonly List<int> _powerOffs = [];
    private readonly RecordingInterruptLine _sci = new();
    private readonly AcpiPmDevice _pm;

    public AcpiPmDeviceTests() => _pm = new AcpiPmDevice(_powerOffs.Add, _sci);

    private ushort Read16(ulong offset)
    {
        Span<byte> b = stackalloc byte[2];
        _pm.Read(offset, b, 0);
        return BinaryPrimitives.ReadUInt16LittleEndian(b);
    }

    private void Write16(ulong offset, ushort value, int vcpu = 0)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, value);
        _pm.Write(offset, b, vcpu);
    }

    [Fact]
    public void AfterResetTheStatusIsClearNothingIsEnabledAndSciEnIsSet()
    {
        Assert.Equal(0, Read16(0));
        Assert.Equal(0, Read16(2));
        Assert.Equal(AcpiPmDevice.ControlSciEnable, Read16(4));
    }

    [Fact]
    public void SciEnCannotBeClearedAndSleepEnableReadsAsZero()
    {
        Write16(4, 0);
        Assert.Equal(AcpiPmDevice.ControlSciEnable, Read16(4));
        Write16(4, 3 << 10);                                   // SLP_TYP 3, no SLP_EN
        Assert.Equal((ushort)(3 << 10 | 1), Read16(4));
        Write16(4, (3 << 10) | AcpiPmDevice.ControlSleepEnable);
        Assert.Equal((ushort)(3 << 10 | 1), Read16(4));
        Assert.Empty(_powerOffs);                              // S3 is not offered: ignored
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void SleepTypeS5WithSleepEnablePowersOff(bool byteWrites)
    {
        ushort value = (AcpiPmDevice.SleepTypeS5 << 10) | AcpiPmDevice.ControlSleepEnable;
        if (byteWrites)
        {
            _pm.Write(4, [(byte)value], 1);
            Assert.Empty(_powerOffs);
            _pm.Write(5, [(byte)(value >> 8)], 1);
        }
        else
        {
            Write16(4, (ushort)(AcpiPmDevice.SleepTypeS5 << 10), 1);   // as Linux does: type first,
            Assert.Empty(_powerOffs);
            Write16(4, value, 1);                                     // then type | SLP_EN
        }
        Assert.Equal([1], _powerOffs);
    }

    [Fact]
    public void ThePowerButtonRaisesTheSciOnlyWhenEnabledAndWriteOneClears()
    {
        _pm.PressPowerButton();
        Assert.Equal(AcpiPmDevice.StatusPowerButton, Read16(0));
        Assert.False(_sci.Level);

        Write16(2, AcpiPmDevice.StatusPowerButton);            // PWRBTN_EN
        Assert.True(_sci.Level);
        Write16(0, AcpiPmDevice.StatusTimer);                  // clearing another bit changes nothing
        Assert.True(_sci.Level);
        Write16(0, AcpiPmDevice.StatusPowerButton);            // write 1 to clear
        Assert.Equal(0, Read16(0));
        Assert.False(_sci.Level);
        Assert.Equal([true, false], _sci.Levels);
    }

    [Fact]
    public void OnlyDefinedEnableBitsStick()
    {
        Write16(2, 0xffff);
        Assert.Equal((ushort)(AcpiPmDevice.StatusTimer | AcpiPmDevice.StatusGlobal | AcpiPmDevice.StatusPowerButton |
            AcpiPmDevice.StatusSleepButton | AcpiPmDevice.StatusRtc), Read16(2));
    }

    [Fact]
    public void WideAndStraddlingAccessesAreByteWise()
    {
        Span<byte> all = stackalloc byte[8];
        _pm.Read(0, all, 0);
        Assert.Equal(new byte[] { 0, 0, 0, 0, 1, 0, 0xff, 0xff }, all.ToArray());   // past the block: all ones
        _pm.Write(2, [0x00, 0x01, 0x00, 0x00], 0);            // PM1_EN = PWRBTN_EN, PM1_CNT low byte
        Assert.Equal(AcpiPmDevice.StatusPowerButton, Read16(2));
        Assert.Equal(AcpiPmDevice.ControlSciEnable, Read16(4));
    }
}
