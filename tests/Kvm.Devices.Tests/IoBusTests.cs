using Kvm.Devices.Bus;

namespace Kvm.Devices.Tests;

public class IoBusTests
{
    [Theory]
    [InlineData(0x104, 8)]   // overlaps the tail
    [InlineData(0xfc, 8)]    // overlaps the head
    [InlineData(0x100, 8)]   // same range
    [InlineData(0x102, 2)]   // inside
    [InlineData(0xf0, 0x40)] // contains it
    [InlineData(0x107, 1)]   // last byte only
    [InlineData(0xff, 2)]    // first byte only
    public void OverlappingRegistrationIsRefusedNamingBothRanges(ulong baseAddress, ulong length)
    {
        var bus = new IoBus("pio");
        var first = new RecordingDevice(1);
        bus.Register(0x100, 8, first);

        var e = Assert.Throws<BusException>(() => bus.Register(baseAddress, length, new RecordingDevice(2)));

        Assert.Contains($"0x{baseAddress:x}-0x{baseAddress + length - 1:x}", e.Message);
        Assert.Contains("0x100-0x107", e.Message);
        Assert.Contains("pio", e.Message);
        // The refused registration left the bus as it was.
        var entry = Assert.Single(bus.Entries);
        Assert.Equal(0x100UL, entry.Base);
        Assert.Same(first, entry.Device);
    }

    [Fact]
    public void AdjacentRangesAreAllowedAndKeptSorted()
    {
        var bus = new IoBus("pio");
        var mid = new RecordingDevice(1);
        var high = new RecordingDevice(2);
        var low = new RecordingDevice(3);
        bus.Register(0x100, 8, mid);
        bus.Register(0x108, 8, high);
        bus.Register(0xf8, 8, low);

        Assert.Equal([0xf8UL, 0x100UL, 0x108UL], bus.Entries.Select(e => e.Base));
        Assert.Same(low, bus.Find(0xff, 1)?.Device);
        Assert.Same(mid, bus.Find(0x100, 1)?.Device);
        Assert.Same(mid, bus.Find(0x107, 1)?.Device);
        Assert.Same(high, bus.Find(0x108, 1)?.Device);
        Assert.Null(bus.Find(0x110, 1));
        Assert.Null(bus.Find(0xf7, 1));
    }

    [Fact]
    public void EmptyRangeIsRefused()
    {
        var bus = new IoBus("mmio");
        var e = Assert.Throws<BusException>(() => bus.Register(0x1000, 0, new RecordingDevice()));
        Assert.Contains("0x1000", e.Message);
        Assert.Empty(bus.Entries);
    }

    [Theory]
    [InlineData(ulong.MaxValue, 2)]
    [InlineData(ulong.MaxValue - 3, 8)]
    [InlineData(2, ulong.MaxValue)]
    public void RangeThatWrapsAroundIsRefused(ulong baseAddress, ulong length)
    {
        var bus = new IoBus("mmio");
        var e = Assert.Throws<BusException>(() => bus.Register(baseAddress, length, new RecordingDevice()));
        Assert.Contains("wraps", e.Message);
        Assert.Empty(bus.Entries);
    }

    [Fact]
    public void RangeEndingAtTheTopOfTheAddressSpaceIsAllowed()
    {
        var bus = new IoBus("mmio");
        var dev = new RecordingDevice(4);
        bus.Register(ulong.MaxValue - 7, 8, dev);

        var data = new byte[1];
        Assert.True(bus.Read(ulong.MaxValue, data, 0));
        Assert.Equal(7UL, Assert.Single(dev.Accesses).Offset);
        // An access running past the top is not dispatched.
        Assert.False(bus.Read(ulong.MaxValue - 1, new byte[4], 0));
        Assert.Single(dev.Accesses);
    }

    [Fact]
    public void UnregisterRemovesTheDeviceAndFreesItsRange()
    {
        var bus = new IoBus("pio");
        var a = new RecordingDevice(1);
        var b = new RecordingDevice(2);
        bus.Register(0x60, 1, a);
        bus.Register(0x64, 1, b);

        Assert.True(bus.Unregister(0x60));
        Assert.False(bus.Unregister(0x60));
        Assert.False(bus.Unregister(0x61));

        Assert.False(bus.Write(0x60, [1], 0));
        Assert.Empty(a.Accesses);
        Assert.True(bus.Write(0x64, [2], 0));
        Assert.Single(b.Accesses);

        // The freed range can be registered again.
        var c = new RecordingDevice(3);
        bus.Register(0x60, 4, c);
        Assert.True(bus.Write(0x61, [3], 0));
        Assert.Equal(1UL, Assert.Single(c.Accesses).Offset);
    }

    [Fact]
    public void WriteIsDispatchedWithOffsetRelativeToBaseAndTheVcpuId()
    {
        var bus = new IoBus("pio");
        var other = new RecordingDevice(1);
        var uart = new RecordingDevice(2);
        bus.Register(0x2f8, 8, other);
        bus.Register(0x3f8, 8, uart);

        Assert.True(bus.Write(0x3fd, [0xab, 0xcd], 7));

        var access = Assert.Single(uart.Accesses);
        Assert.True(access.IsWrite);
        Assert.Equal(5UL, access.Offset);
        Assert.Equal([0xab, 0xcd], access.Data);
        Assert.Equal(7, access.VcpuId);
        Assert.Empty(other.Accesses);
        Assert.Equal(0, bus.UnclaimedAccesses);
    }

    [Fact]
    public void ReadIsDispatchedAndReturnsTheDeviceData()
    {
        var bus = new IoBus("mmio");
        var dev = new RecordingDevice(9);
        bus.Register(0xfee0_0000, 0x1000, dev);

        var data = new byte[4];
        Assert.True(bus.Read(0xfee0_0020, data, 3));

        var access = Assert.Single(dev.Accesses);
        Assert.False(access.IsWrite);
        Assert.Equal(0x20UL, access.Offset);
        Assert.Equal(3, access.VcpuId);
        Assert.Equal(Enumerable.Range(0, 4).Select(i => RecordingDevice.ReadValue(9, 0x20, i)), data);
    }

    [Fact]
    public void AccessEndingExactlyAtTheEndOfTheRangeIsDispatched()
    {
        var bus = new IoBus("pio");
        var dev = new RecordingDevice();
        bus.Register(0x100, 8, dev);

        Assert.True(bus.Write(0x104, [1, 2, 3, 4], 0));
        Assert.Equal(4UL, Assert.Single(dev.Accesses).Offset);
    }

    [Theory]
    [InlineData(0x106, 4)]
    [InlineData(0x107, 2)]
    [InlineData(0x100, 9)]
    [InlineData(0xff, 2)]   // starts before the device
    public void AccessStraddlingTheRangeIsNotDispatched(ulong address, int length)
    {
        var bus = new IoBus("pio");
        var dev = new RecordingDevice();
        bus.Register(0x100, 8, dev);

        var data = new byte[length];
        Assert.False(bus.Read(address, data, 0));
        Assert.All(data, b => Assert.Equal(0xff, b));
        Assert.False(bus.Write(address, new byte[length], 0));

        Assert.Empty(dev.Accesses);
        Assert.Equal(2, bus.UnclaimedAccesses);
    }

    [Fact]
    public void StraddlingAccessIsNotSentToTheNextDeviceEither()
    {
        var bus = new IoBus("pio");
        var a = new RecordingDevice(1);
        var b = new RecordingDevice(2);
        bus.Register(0x100, 8, a);
        bus.Register(0x108, 8, b);

        Assert.False(bus.Write(0x106, [1, 2, 3, 4], 0));
        Assert.Empty(a.Accesses);
        Assert.Empty(b.Accesses);
    }

    [Fact]
    public void UnclaimedReadFillsOnesAndUnclaimedWriteIsDroppedAndBothAreCounted()
    {
        var bus = new IoBus("pio");
        var dev = new RecordingDevice();
        bus.Register(0x100, 8, dev);
        Assert.Equal(0, bus.UnclaimedAccesses);

        var data = new byte[] { 0, 1, 2, 3 };
        Assert.False(bus.Read(0x80, data, 0));
        Assert.Equal([0xff, 0xff, 0xff, 0xff], data);
        Assert.Equal(1, bus.UnclaimedAccesses);

        Assert.False(bus.Write(0x80, [0x55], 0));
        Assert.Equal(2, bus.UnclaimedAccesses);

        Assert.True(bus.Write(0x100, [0x55], 0));
        Assert.Equal(2, bus.UnclaimedAccesses);

        Assert.Single(dev.Accesses);

        Array.Fill(data, (byte)0x12);
        Assert.False(new IoBus("empty").Read(0, data, 0));
        Assert.Equal([0xff, 0xff, 0xff, 0xff], data);
    }

    [Fact]
    public void LookupWithManyDevicesAgreesWithALinearSearch()
    {
        var rng = new Random(20240611);
        var bus = new IoBus("mmio");

        // 200 non-overlapping ranges with random sizes and gaps (some gaps are zero: adjacent ranges).
        var ranges = new List<(ulong Base, ulong Length, RecordingDevice Device)>();
        ulong next = (ulong)rng.Next(1, 64);
        for (int i = 0; i < 200; i++)
        {
            ulong length = (ulong)rng.Next(1, 40);
            ranges.Add((next, length, new RecordingDevice((byte)i)));
            next += length + (ulong)(rng.Next(0, 3) == 0 ? 0 : rng.Next(1, 30));
        }
        foreach (var r in ranges.OrderBy(_ => rng.Next()))
            bus.Register(r.Base, r.Length, r.Device);

        Assert.Equal(ranges.Select(r => r.Base), bus.Entries.Select(e => e.Base));

        for (int probe = 0; probe < 20000; probe++)
        {
            ulong address;
            if (probe % 2 == 0)
            {
                // Near a boundary of a random range, where off-by-one errors live.
                var r = ranges[rng.Next(ranges.Count)];
                address = rng.Next(2) == 0 ? r.Base + (ulong)rng.Next(0, 3) - 1 : r.Base + r.Length - 1 + (ulong)rng.Next(0, 3) - 1;
            }
            else
            {
                address = (ulong)rng.NextInt64(0, (long)next + 64);
            }
            int length = new[] { 1, 2, 4, 8 }[rng.Next(4)];

            var expected = ranges.Where(r => address >= r.Base && address + (ulong)length <= r.Base + r.Length).ToList();
            Assert.True(expected.Count <= 1);

            var found = bus.Find(address, length);
            if (expected.Count == 0)
            {
                Assert.Null(found);
                continue;
            }
            Assert.NotNull(found);
            Assert.Same(expected[0].Device, found.Value.Device);

            // And the dispatched access reaches that device at the right offset.
            var dev = expected[0].Device;
            int before = dev.Accesses.Count;
            var data = new byte[length];
            Assert.True(bus.Read(address, data, probe));
            Assert.Equal(before + 1, dev.Accesses.Count);
            Assert.Equal(address - expected[0].Base, dev.Accesses[^1].Offset);
            Assert.Equal(probe, dev.Accesses[^1].VcpuId);
        }
    }
}
