using System.Buffers.Binary;
using Kvm.Devices.Legacy.AcpiPm;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Tests;

public class AcpiGpeDeviceTests
{
    private readonly RecordingInterruptLine _sci = new();
    private readonly AcpiGpeDevice _gpe;

    public AcpiGpeDeviceTests() => _gpe = new AcpiGpeDevice(_sci);

    private ushort Read16(ulong offset)
    {
        Span<byte> b = stackalloc byte[2];
        _gpe.Read(offset, b, 0);
        return BinaryPrimitives.ReadUInt16LittleEndian(b);
    }

    private void Write8(ulong offset, byte value) => _gpe.Write(offset, [value], 0);

    [Fact]
    public void A_raised_event_asserts_the_sci_only_once_enabled_and_until_its_status_is_cleared()
    {
        _gpe.Raise(0);
        Assert.Equal(1, Read16(0));
        Assert.False(_sci.Level);               // not enabled yet

        Write8(2, 0x01);                        // GPE0_EN bit 0, as OSPM does for a GPE with an _E00 method
        Assert.True(_sci.Level);
        Assert.Equal(1, Read16(2));

        Write8(0, 0x02);                        // clearing another bit changes nothing
        Assert.True(_sci.Level);
        Write8(0, 0x01);                        // write 1 to clear
        Assert.Equal(0, Read16(0));
        Assert.False(_sci.Level);
        Assert.Equal([true, false], _sci.Levels);
    }

    [Fact]
    public void The_second_byte_holds_events_8_to_15_and_accesses_past_the_block_read_all_ones()
    {
        Write8(3, 0x80);                        // enable GPE 15
        _gpe.Raise(15);
        Assert.Equal(0x8000, Read16(0));
        Assert.True(_sci.Level);
        Span<byte> b = stackalloc byte[4];
        _gpe.Read(2, b, 0);
        Assert.Equal([0x00, 0x80, 0xff, 0xff], b.ToArray());
        Assert.Throws<ArgumentOutOfRangeException>(() => _gpe.Raise(AcpiGpeDevice.Count));
    }

    [Fact]
    public void Its_state_round_trips_and_a_restored_pending_event_asserts_the_sci()
    {
        Write8(2, 0x01);
        _gpe.Raise(0);
        var w = new StateWriter();
        _gpe.SaveState(w);

        var line = new RecordingInterruptLine();
        var copy = new AcpiGpeDevice(line);
        var r = new StateReader(w.ToArray(), "gpe");
        copy.RestoreState(ref r);
        r.End();
        Assert.Equal(_gpe.Registers, copy.Registers);
        Assert.True(line.Level);
    }
}
