using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Devices.Pci;

namespace Kvm.Devices.Tests;

/// <summary>A minimal PCI function with the BARs a test asks for; BAR accesses are recorded.</summary>
public sealed class TestFunction : PciFunction
{
    private readonly string _name;

    public TestFunction(string name, params (int Index, ulong Size, PciBarKind Kind)[] bars)
        : base(0x1234, 0x5678, classCode: 0xff_00_00, revision: 3)
    {
        _name = name;
        foreach (var (index, size, kind) in bars)
            AddBar(index, size, kind);
    }

    public override string Name => _name;

    public List<(int Bar, ulong Offset, bool Write)> Accesses { get; } = [];

    public override void ReadBar(int index, ulong offset, Span<byte> data)
    {
        Accesses.Add((index, offset, false));
        data.Fill((byte)(0xa0 + index));
    }

    public override void WriteBar(int index, ulong offset, ReadOnlySpan<byte> data) => Accesses.Add((index, offset, true));
}

public sealed class PciBusTests
{
    private static uint ReadConfig(IoBus pio, int slot, int register)
    {
        var a = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(a, 0x8000_0000u | (uint)slot << 11 | (uint)register);
        pio.Write(PciBus.ConfigAddressPort, a, 0);
        var d = new byte[4];
        pio.Read(PciBus.ConfigDataPort, d, 0);
        return BinaryPrimitives.ReadUInt32LittleEndian(d);
    }

    [Fact]
    public void Add_PlugsIntoTheNextFreeSlots_EachAnsweringForItself()
    {
        var mmio = new IoBus("mmio");
        var pio = new IoBus("pio");
        var bus = new PciBus(mmio, 0xc000_0000, 0x100_0000);
        pio.Register(PciBus.ConfigAddressPort, PciBus.PortCount, bus);
        var a = new TestFunction("a");
        var b = new TestFunction("b", (0, 0x1000, PciBarKind.Memory32));
        Assert.Equal(1, bus.Add(a, 5));
        Assert.Equal(2, bus.Add(b, 6));
        Assert.Equal(3, bus.Functions.Count);             // host bridge, a, b
        Assert.Same(a, bus[1]);
        Assert.Same(b, bus[2]);
        Assert.Null(bus[3]);
        Assert.Null(bus[99]);
        Assert.Equal(1, a.Slot);
        Assert.Equal(5u, ReadConfig(pio, 1, 0x3c) & 0xff);
        Assert.Equal(6u, ReadConfig(pio, 2, 0x3c) & 0xff);
        Assert.Equal(0x5678_1234u, ReadConfig(pio, 2, 0));
        Assert.Equal((uint)b.GetBarAddress(0), ReadConfig(pio, 2, 0x10));
        Assert.Equal(0u, ReadConfig(pio, 1, 0x10));
    }

    [Fact]
    public void Bars_FromSeveralFunctions_AreNaturallyAligned_InsideTheWindow_AndDisjoint()
    {
        const ulong start = 0xc000_0000, size = 0x100_0000;
        var bus = new PciBus(new IoBus("mmio"), start + 0x100, size - 0x100);   // an unaligned window start
        var functions = new[]
        {
            new TestFunction("f1", (0, 0x100, PciBarKind.Memory32), (1, 0x10000, PciBarKind.Memory32)),
            new TestFunction("f2", (0, 0x4000, PciBarKind.Memory32), (2, 0x2000, PciBarKind.Memory64)),
            new TestFunction("f3", (5, 0x20, PciBarKind.Memory32)),
        };
        foreach (var f in functions)
            bus.Add(f);
        var ranges = functions.SelectMany(f => f.Bars.Select(b => (At: f.GetBarAddress(b.Index), b.Size))).OrderBy(r => r.At).ToList();
        Assert.Equal(5, ranges.Count);
        foreach (var (at, sz) in ranges)
        {
            Assert.Equal(0UL, at % sz);
            Assert.InRange(at, start + 0x100, start + size - sz);
        }
        for (int i = 1; i < ranges.Count; i++)
            Assert.True(ranges[i - 1].At + ranges[i - 1].Size <= ranges[i].At, "BARs overlap");
    }

    [Fact]
    public void Bar64_SizesAcrossBothRegisters()
    {
        var mmio = new IoBus("mmio");
        var f = new TestFunction("f", (2, 0x2000, PciBarKind.Memory64));
        new PciBus(mmio, 0xc000_0000, 0x100_0000).Add(f);
        Assert.Equal(4u, f.ReadConfig(0x18, 4) & 0x7);             // 64-bit memory type
        f.WriteConfig(0x18, 4, 0xffff_ffff);
        f.WriteConfig(0x1c, 4, 0xffff_ffff);
        Assert.Equal(0xffff_e004u, f.ReadConfig(0x18, 4));
        Assert.Equal(0xffff_ffffu, f.ReadConfig(0x1c, 4));
        // Placed above 4 GiB, it decodes there.
        f.WriteConfig(0x18, 4, 0x0000_4000);
        f.WriteConfig(0x1c, 4, 0x0000_0010);
        f.WriteConfig(PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        Assert.Equal(0x10_0000_4000UL, f.GetMappedAddress(2));
        var data = new byte[4];
        Assert.True(mmio.Read(0x10_0000_4010, data, 0));
        Assert.Equal((2, 0x10UL, false), Assert.Single(f.Accesses));
    }

    [Fact]
    public void Add_RefusesAFunction_WhenTheBusIsFull()
    {
        var bus = new PciBus(new IoBus("mmio"), 0xc000_0000, 0x100_0000);
        for (int i = 1; i < PciBus.SlotCount; i++)
            Assert.Equal(i, bus.Add(new TestFunction($"f{i}")));
        var e = Assert.Throws<InvalidOperationException>(() => bus.Add(new TestFunction("one too many")));
        Assert.Contains("one too many", e.Message);
    }

    [Fact]
    public void Add_RefusesAFunction_WhoseBarsDoNotFitTheWindow()
    {
        var bus = new PciBus(new IoBus("mmio"), 0xc000_0000, 0x10000);
        bus.Add(new TestFunction("fits", (0, 0x8000, PciBarKind.Memory32)));
        var e = Assert.Throws<InvalidOperationException>(() => bus.Add(new TestFunction("too big", (0, 0x10000, PciBarKind.Memory32))));
        Assert.Contains("too big", e.Message);
    }
}

public sealed class SharedInterruptLineTests
{
    [Fact]
    public void TheLineIsAsserted_WhileAnySourceAssertsIt()
    {
        var line = new RecordingInterruptLine();
        var shared = new SharedInterruptLine(line);
        var a = shared.CreateSource();
        var b = shared.CreateSource();
        a.SetLevel(true);
        Assert.Equal([true], line.Levels);
        b.SetLevel(true);
        a.SetLevel(false);
        Assert.Equal([true], line.Levels);                 // b still asserts it
        b.SetLevel(false);
        Assert.Equal([true, false], line.Levels);
        b.SetLevel(true);
        Assert.Equal([true, false, true], line.Levels);
    }

    [Fact]
    public void RepeatedLevels_FromOneSource_CountOnce()
    {
        var line = new RecordingInterruptLine();
        var shared = new SharedInterruptLine(line);
        var a = shared.CreateSource();
        var b = shared.CreateSource();
        a.SetLevel(false);                                 // never asserted: nothing to do
        Assert.Empty(line.Levels);
        a.SetLevel(true);
        a.SetLevel(true);
        b.SetLevel(false);
        a.SetLevel(false);
        Assert.Equal([true, false], line.Levels);
    }

    [Fact]
    public void ManySourcesFromManyThreads_LeaveTheLineDeasserted_WhenAllAreDone()
    {
        var line = new LevelRecorder();
        var shared = new SharedInterruptLine(line);
        var threads = Enumerable.Range(0, 8).Select(i => new Thread(() =>
        {
            var s = shared.CreateSource();
            for (int k = 0; k < 2000; k++)
                s.SetLevel(k % 3 != 2);
            s.SetLevel(false);
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        var levels = line.Levels;
        Assert.False(line.Level);
        // The underlying line only ever sees changes: never two assertions or two deassertions in a row.
        for (int i = 1; i < levels.Count; i++)
            Assert.NotEqual(levels[i - 1], levels[i]);
    }
}
