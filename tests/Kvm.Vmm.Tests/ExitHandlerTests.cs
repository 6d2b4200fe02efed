using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Interop.Structs;
using Kvm.Vmm.Exits;
using L = Kvm.Interop.Structs.KvmRunLayout;

namespace Kvm.Vmm.Tests;

/// <summary>A bus device that records accesses; reads return a running counter, one byte at a time.</summary>
public sealed class ProbeDevice : IBusDevice
{
    public List<(bool Write, ulong Offset, byte[] Data, int Vcpu)> Accesses { get; } = [];
    private byte _next = 0x40;

    public void Read(ulong offset, Span<byte> data, int vcpuId)
    {
        for (int i = 0; i < data.Length; i++)
            data[i] = _next++;
        Accesses.Add((false, offset, data.ToArray(), vcpuId));
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId) => Accesses.Add((true, offset, data.ToArray(), vcpuId));
}

public class ExitHandlerTests
{
    // The kvm_run mapping is several pages; KVM puts port I/O data in the second one.
    private const int MappingSize = 3 * 4096;
    private const int PioDataOffset = 4096;
    private const uint Vcpu = 2;

    private readonly IoBus _pio = new("pio");
    private readonly IoBus _mmio = new("mmio");
    private readonly ProbeDevice _com1 = new();
    private readonly ProbeDevice _com2 = new();
    private readonly ProbeDevice _mmioDev = new();

    public ExitHandlerTests()
    {
        _pio.Register(0x3f8, 8, _com1);
        _pio.Register(0x2f8, 8, _com2);
        _mmio.Register(0xd000_0000, 0x1000, _mmioDev);
    }

    private static byte[] Page(KvmExitReason reason)
    {
        var page = new byte[MappingSize];
        page.AsSpan().Fill(0xee);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.ExitReason), (uint)reason);
        return page;
    }

    private static byte[] IoPage(byte direction, int size, ushort port, uint count, ulong dataOffset = PioDataOffset)
    {
        var page = Page(KvmExitReason.Io);
        page[L.IoDirection] = direction;
        page[L.IoSize] = (byte)size;
        BinaryPrimitives.WriteUInt16LittleEndian(page.AsSpan(L.IoPort), port);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.IoCount), count);
        BinaryPrimitives.WriteUInt64LittleEndian(page.AsSpan(L.IoDataOffset), dataOffset);
        return page;
    }

    private static byte[] MmioPage(ulong address, uint len, bool isWrite)
    {
        var page = Page(KvmExitReason.Mmio);
        BinaryPrimitives.WriteUInt64LittleEndian(page.AsSpan(L.MmioPhysAddr), address);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.MmioLen), len);
        page[L.MmioIsWrite] = isWrite ? (byte)1 : (byte)0;
        return page;
    }

    private ExitOutcome Run(byte[] page, uint vcpu = Vcpu)
    {
        var exit = VcpuExit.Decode(page);
        return ExitHandler.Handle(exit, _pio, _mmio, vcpu);
    }

    private static T StopOf<T>(ExitOutcome outcome) where T : VmStopReason
    {
        Assert.True(outcome.ShouldStop);
        return Assert.IsType<T>(outcome.Stop);
    }

    [Fact]
    public void PortOutGoesToTheDeviceAtThatPort()
    {
        var page = IoPage(KvmIoDirection.Out, 1, 0x3fb, 1);
        page[PioDataOffset] = 0x83;

        var outcome = Run(page);

        Assert.False(outcome.ShouldStop);
        Assert.Null(outcome.Stop);
        var a = Assert.Single(_com1.Accesses);
        Assert.True(a.Write);
        Assert.Equal(3UL, a.Offset);
        Assert.Equal([0x83], a.Data);
        Assert.Equal((int)Vcpu, a.Vcpu);
        Assert.Empty(_com2.Accesses);
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void WidePortOutPassesAllBytes(int size)
    {
        var page = IoPage(KvmIoDirection.Out, size, 0x2f8, 1);
        byte[] value = [0x11, 0x22, 0x33, 0x44];
        value.AsSpan(0, size).CopyTo(page.AsSpan(PioDataOffset));

        Assert.False(Run(page).ShouldStop);

        var a = Assert.Single(_com2.Accesses);
        Assert.Equal(0UL, a.Offset);
        Assert.Equal(value[..size], a.Data);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void PortInFillsTheRunPageDataFromTheDevice(int size)
    {
        var page = IoPage(KvmIoDirection.In, size, 0x3f9, 1);

        Assert.False(Run(page).ShouldStop);

        var a = Assert.Single(_com1.Accesses);
        Assert.False(a.Write);
        Assert.Equal(1UL, a.Offset);
        Assert.Equal(a.Data, page.AsSpan(PioDataOffset, size).ToArray());
        Assert.Equal(Enumerable.Range(0x40, size).Select(i => (byte)i), page.AsSpan(PioDataOffset, size).ToArray());
        Assert.Equal(0xee, page[PioDataOffset + size]); // nothing written past the value
    }

    [Fact]
    public void PortInFromAnUnclaimedPortReadsAllOnes()
    {
        var page = IoPage(KvmIoDirection.In, 2, 0x80, 1);
        page[PioDataOffset] = 0;
        page[PioDataOffset + 1] = 0;

        Assert.False(Run(page).ShouldStop);

        Assert.Equal([0xff, 0xff], page.AsSpan(PioDataOffset, 2).ToArray());
        Assert.Equal(1, _pio.UnclaimedAccesses);
    }

    [Fact]
    public void PortIoHonoursTheDataOffset()
    {
        const int offset = 6000;
        var page = IoPage(KvmIoDirection.Out, 1, 0x3f8, 1, offset);
        page[offset] = 0x5a;

        Run(page);

        Assert.Equal([0x5a], Assert.Single(_com1.Accesses).Data);
    }

    [Fact]
    public void StringPortOutDispatchesEveryElementInOrder()
    {
        var page = IoPage(KvmIoDirection.Out, 2, 0x3f8, 5);
        for (int i = 0; i < 10; i++)
            page[PioDataOffset + i] = (byte)(0xa0 + i);

        Assert.False(Run(page).ShouldStop);

        Assert.Equal(5, _com1.Accesses.Count);
        for (int i = 0; i < 5; i++)
        {
            Assert.True(_com1.Accesses[i].Write);
            Assert.Equal(0UL, _com1.Accesses[i].Offset);
            Assert.Equal([(byte)(0xa0 + 2 * i), (byte)(0xa1 + 2 * i)], _com1.Accesses[i].Data);
        }
    }

    [Fact]
    public void StringPortInFillsEveryElementInOrder()
    {
        var page = IoPage(KvmIoDirection.In, 1, 0x3fd, 3);

        Assert.False(Run(page).ShouldStop);

        Assert.Equal(3, _com1.Accesses.Count);
        Assert.All(_com1.Accesses, a => Assert.Equal(5UL, a.Offset));
        Assert.Equal([0x40, 0x41, 0x42], page.AsSpan(PioDataOffset, 3).ToArray());
        Assert.Equal(0xee, page[PioDataOffset + 3]);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(5)]
    [InlineData(6)]
    [InlineData(7)]
    [InlineData(8)]
    public void MmioWriteOfEachLengthReachesTheDevice(int len)
    {
        var page = MmioPage(0xd000_0010, (uint)len, isWrite: true);
        byte[] value = [1, 2, 3, 4, 5, 6, 7, 8];
        value.CopyTo(page.AsSpan(L.MmioData));

        Assert.False(Run(page).ShouldStop);

        var a = Assert.Single(_mmioDev.Accesses);
        Assert.True(a.Write);
        Assert.Equal(0x10UL, a.Offset);
        Assert.Equal(value[..len], a.Data);
        Assert.Equal((int)Vcpu, a.Vcpu);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(5)]
    [InlineData(6)]
    [InlineData(7)]
    [InlineData(8)]
    public void MmioReadOfEachLengthFillsTheRunPage(int len)
    {
        var page = MmioPage(0xd000_0ff8, (uint)len, isWrite: false);

        Assert.False(Run(page).ShouldStop);

        var a = Assert.Single(_mmioDev.Accesses);
        Assert.False(a.Write);
        Assert.Equal(0xff8UL, a.Offset);
        Assert.Equal(Enumerable.Range(0x40, len).Select(i => (byte)i), page.AsSpan(L.MmioData, len).ToArray());
        Assert.All(page.AsSpan(L.MmioData + len, 8 - len).ToArray(), b => Assert.Equal(0xee, b));
    }

    [Fact]
    public void MmioReadOfUnclaimedAddressReadsAllOnes()
    {
        var page = MmioPage(0xfeb0_0000, 4, isWrite: false);
        Assert.False(Run(page).ShouldStop);
        Assert.Equal([0xff, 0xff, 0xff, 0xff], page.AsSpan(L.MmioData, 4).ToArray());
        Assert.Empty(_mmioDev.Accesses);
    }

    public static TheoryData<string, byte[]> MalformedPages()
    {
        var d = new TheoryData<string, byte[]>
        {
            { "size 3", IoPage(KvmIoDirection.In, 3, 0x3f8, 1) },
            { "size 0", IoPage(KvmIoDirection.In, 0, 0x3f8, 1) },
            { "size 8", IoPage(KvmIoDirection.Out, 8, 0x3f8, 1) },
            { "count 0", IoPage(KvmIoDirection.In, 1, 0x3f8, 0) },
            { "data offset past the page", IoPage(KvmIoDirection.In, 1, 0x3f8, 1, MappingSize + 1) },
            { "data running past the page", IoPage(KvmIoDirection.In, 4, 0x3f8, 1, MappingSize - 2) },
            { "string data running past the page", IoPage(KvmIoDirection.In, 1, 0x3f8, 4097, MappingSize - 4096) },
            { "huge count", IoPage(KvmIoDirection.In, 4, 0x3f8, uint.MaxValue) },
            { "offset near 2^64", IoPage(KvmIoDirection.In, 1, 0x3f8, 4, ulong.MaxValue - 1) },
            { "MMIO length 0", MmioPage(0xd000_0000, 0, false) },
            { "MMIO length 9", MmioPage(0xd000_0000, 9, true) },
            { "MMIO length 2^32-1", MmioPage(0xd000_0000, uint.MaxValue, false) },
        };
        return d;
    }

    [Theory]
    [MemberData(nameof(MalformedPages))]
    public void MalformedExitStopsTheVmWithoutTouchingDevicesOrMemory(string what, byte[] page)
    {
        var before = (byte[])page.Clone();

        var stop = StopOf<VmmFaultStop>(Run(page));

        Assert.Equal(Vcpu, stop.VcpuId);
        Assert.Contains("malformed", stop.Describe());
        Assert.Empty(_com1.Accesses);
        Assert.Empty(_mmioDev.Accesses);
        Assert.Equal(0, _pio.UnclaimedAccesses + _mmio.UnclaimedAccesses);
        Assert.True(before.AsSpan().SequenceEqual(page), $"{what}: the run page was modified");
    }

    [Fact]
    public void MalformedPortExitNamesTheBadField()
    {
        var stop = StopOf<VmmFaultStop>(Run(IoPage(KvmIoDirection.In, 3, 0x3f8, 1)));
        Assert.Contains("size 3", stop.Describe());
        Assert.Contains($"vCPU {Vcpu}", stop.Describe());
    }

    [Fact]
    public void TooShortRunPageIsMalformed()
    {
        var page = Page(KvmExitReason.Hlt)[..100];
        var stop = StopOf<VmmFaultStop>(Run(page));
        Assert.Contains("100 bytes", stop.Describe());
    }

    [Fact]
    public void ShutdownIsATripleFault()
    {
        var stop = StopOf<GuestShutdownStop>(Run(Page(KvmExitReason.Shutdown), 1));
        Assert.Equal(1u, stop.VcpuId);
        Assert.Contains("triple fault", stop.Describe());
        Assert.Contains("vCPU 1", stop.Describe());
    }

    private static byte[] InternalErrorPage(uint suberror, uint ndata, int filled)
    {
        var page = Page(KvmExitReason.InternalError);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.InternalSuberror), suberror);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.InternalNdata), ndata);
        for (int i = 0; i < filled; i++)
            BinaryPrimitives.WriteUInt64LittleEndian(page.AsSpan(L.InternalData + i * 8), 0x1000UL * (ulong)(i + 1) + 0xab);
        return page;
    }

    [Fact]
    public void InternalErrorCarriesSuberrorAndData()
    {
        var stop = StopOf<InternalErrorStop>(Run(InternalErrorPage(1, 3, 3)));

        Assert.Equal(Vcpu, stop.VcpuId);
        Assert.Equal(1u, stop.Suberror);
        Assert.Equal([0x10abUL, 0x20abUL, 0x30abUL], stop.Data);
        var text = stop.Describe();
        Assert.Contains("suberror 1 (emulation failure)", text);
        Assert.Contains("0x10ab", text);
        Assert.Contains("0x30ab", text);
        Assert.Contains($"vCPU {Vcpu}", text);
    }

    [Fact]
    public void InternalErrorDataCountIsClampedTo16()
    {
        var stop = StopOf<InternalErrorStop>(Run(InternalErrorPage(1, 1000, 16)));
        Assert.Equal(16, stop.Data.Length);
        Assert.Equal(Enumerable.Range(1, 16).Select(i => 0x1000UL * (ulong)i + 0xab), stop.Data);
    }

    [Fact]
    public void InternalErrorWithoutDataDescribesJustTheSuberror()
    {
        var stop = StopOf<InternalErrorStop>(Run(InternalErrorPage(3, 0, 0)));
        Assert.Empty(stop.Data);
        Assert.Contains("suberror 3 (event delivery failed)", stop.Describe());
    }

    [Theory]
    [InlineData(2u, "exception while delivering an exception")]
    [InlineData(4u, "unexpected exit reason")]
    [InlineData(99u, "unknown")]
    public void InternalErrorSuberrorsAreNamed(uint suberror, string name)
    {
        var stop = StopOf<InternalErrorStop>(Run(InternalErrorPage(suberror, 0, 0)));
        Assert.Contains($"suberror {suberror} ({name})", stop.Describe());
    }

    [Fact]
    public void FailEntryCarriesTheHardwareReasonAndCpu()
    {
        var page = Page(KvmExitReason.FailEntry);
        BinaryPrimitives.WriteUInt64LittleEndian(page.AsSpan(L.FailEntryReason), 0x8000_0021);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.FailEntryCpu), 7);

        var stop = StopOf<FailEntryStop>(Run(page));

        Assert.Equal(0x8000_0021UL, stop.HardwareReason);
        Assert.Equal(7u, stop.Cpu);
        Assert.Equal(Vcpu, stop.VcpuId);
        Assert.Contains("0x80000021", stop.Describe());
        Assert.Contains("host CPU 7", stop.Describe());
    }

    private static byte[] SystemEventPage(KvmSystemEvent type)
    {
        var page = Page(KvmExitReason.SystemEvent);
        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(L.SystemEventType), (uint)type);
        return page;
    }

    [Fact]
    public void SystemEventResetStopsWithAReset()
    {
        var stop = StopOf<GuestResetStop>(Run(SystemEventPage(KvmSystemEvent.Reset)));
        Assert.Equal(Vcpu, stop.VcpuId);
        Assert.False(stop.IsError);
        Assert.Contains("reset", stop.Describe());
    }

    [Fact]
    public void SystemEventShutdownStopsWithAShutdown()
    {
        var stop = StopOf<GuestShutdownStop>(Run(SystemEventPage(KvmSystemEvent.Shutdown)));
        Assert.Equal(Vcpu, stop.VcpuId);
        Assert.Contains("shutdown", stop.Describe());
        Assert.DoesNotContain("triple fault", stop.Describe());
    }

    [Fact]
    public void SystemEventCrashStopsNamingTheCrash()
    {
        var stop = StopOf<GuestShutdownStop>(Run(SystemEventPage(KvmSystemEvent.Crash)));
        Assert.Contains("crash", stop.Describe());
    }

    [Theory]
    [InlineData(KvmExitReason.Hlt)]
    [InlineData(KvmExitReason.Intr)]
    [InlineData(KvmExitReason.IrqWindowOpen)]
    public void HltAndIntrContinue(KvmExitReason reason)
    {
        var outcome = Run(Page(reason));
        Assert.False(outcome.ShouldStop);
        Assert.Equal(ExitOutcome.Continue, outcome);
    }

    [Theory]
    [InlineData(0u)]     // KVM_EXIT_UNKNOWN
    [InlineData(1u)]     // KVM_EXIT_EXCEPTION
    [InlineData(3u)]     // KVM_EXIT_HYPERCALL
    [InlineData(4u)]     // KVM_EXIT_DEBUG
    [InlineData(16u)]    // KVM_EXIT_NMI
    [InlineData(12345u)]
    public void UnknownExitReasonsStop(uint reason)
    {
        var stop = StopOf<UnhandledExitStop>(Run(Page((KvmExitReason)reason)));
        Assert.Equal(reason, stop.ExitReason);
        Assert.Equal(Vcpu, stop.VcpuId);
        Assert.Contains($"({reason})", stop.Describe());
        Assert.Contains("unhandled exit", stop.Describe());
    }

    [Fact]
    public void DecodedPortExitAliasesThePage()
    {
        var page = IoPage(KvmIoDirection.In, 2, 0x3f8, 1);
        var exit = VcpuExit.Decode(page);
        Assert.Equal(KvmExitReason.Io, exit.Reason);
        Assert.False(exit.IsWrite);
        Assert.Equal(0x3f8, exit.Port);
        Assert.Equal(2, exit.Size);
        Assert.Equal(1u, exit.Count);
        Assert.Null(exit.Malformed);
        exit.Data[0] = 0x99;
        Assert.Equal(0x99, page[PioDataOffset]);
    }
}
