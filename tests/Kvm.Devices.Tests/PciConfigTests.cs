using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;

namespace Kvm.Devices.Tests;

/// <summary>
/// PCI configuration mechanism #1 through ports 0xCF8-0xCFF, as firmware or a guest kernel uses
/// it, with the host bridge and a virtio-blk function plugged into the bus.
/// </summary>
public sealed class PciConfigTests : IDisposable
{
    private const ulong WindowStart = 0xc000_0000, WindowSize = 0x1000_0000;
    private readonly IoBus _pio = new("pio");
    private readonly IoBus _mmio = new("mmio");
    private readonly PciBus _bus;
    private readonly BlockRig _rig;
    private readonly int _slot;

    public PciConfigTests()
    {
        _bus = new PciBus(_mmio, WindowStart, WindowSize);
        _pio.Register(PciBus.ConfigAddressPort, PciBus.PortCount, _bus);
        _rig = BlockRig.Create(1 << 20, queues: 2);
        _slot = _bus.Add(_rig.Transport, interruptLine: 11);
    }

    public void Dispose() => _rig.Dispose();

    private static uint Address(int slot, int register, int bus = 0, int function = 0, bool enable = true) =>
        (enable ? 0x8000_0000u : 0) | (uint)bus << 16 | (uint)slot << 11 | (uint)function << 8 | (uint)(register & 0xfc);

    private void SetAddress(uint address)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, address);
        _pio.Write(PciBus.ConfigAddressPort, b, 0);
    }

    private uint PortRead(ushort port, int size)
    {
        Span<byte> b = stackalloc byte[4];
        _pio.Read(port, b[..size], 0);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void PortWrite(ushort port, int size, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _pio.Write(port, b[..size], 0);
    }

    /// <summary>A configuration read of <paramref name="size"/> bytes through CONFIG_DATA (0xCFC + register % 4).</summary>
    private uint Cfg(int slot, int register, int size = 4, int bus = 0, int function = 0)
    {
        SetAddress(Address(slot, register, bus, function));
        return PortRead((ushort)(PciBus.ConfigDataPort + (register & 3)), size);
    }

    private void CfgWrite(int slot, int register, int size, uint value)
    {
        SetAddress(Address(slot, register));
        PortWrite((ushort)(PciBus.ConfigDataPort + (register & 3)), size, value);
    }

    [Fact]
    public void ConfigAddress_RoundTrips_AndOnlyDwordWritesLatchIt()
    {
        SetAddress(0x8000_1234);
        Assert.Equal(0x8000_1234u, PortRead(PciBus.ConfigAddressPort, 4));
        SetAddress(0x8001_0800);
        Assert.Equal(0x8001_0800u, PortRead(PciBus.ConfigAddressPort, 4));

        // Byte and word writes to 0xCF8-0xCFB are other chipset registers, not CONFIG_ADDRESS.
        PortWrite(PciBus.ConfigAddressPort, 1, 0x55);
        PortWrite(PciBus.ConfigAddressPort, 2, 0x5555);
        PortWrite(PciBus.ConfigAddressPort + 1, 1, 0x06);    // 0xCF9, the reset control register on many chipsets
        PortWrite(PciBus.ConfigAddressPort + 2, 2, 0xaaaa);
        Assert.Equal(0x8001_0800u, PortRead(PciBus.ConfigAddressPort, 4));
    }

    [Fact]
    public void ConfigAddress_ReservedAndLowBits_ReadAsZero()
    {
        SetAddress(0xffff_ffff);
        Assert.Equal(0x80ff_fffcu, PortRead(PciBus.ConfigAddressPort, 4));
    }

    [Fact]
    public void AbsentFunctions_ReadAllOnes_AndIgnoreWrites()
    {
        Assert.Equal(0xffff_ffffu, Cfg(17, 0));                      // empty slot
        Assert.Equal(0xffffu, Cfg(17, 2, 2));
        Assert.Equal(0xffu, Cfg(17, 3, 1));
        Assert.Equal(0xffff_ffffu, Cfg(_slot, 0, function: 1));      // only function 0 exists
        Assert.Equal(0xffff_ffffu, Cfg(0, 0, bus: 1));               // only bus 0 exists
        SetAddress(Address(_slot, 0, enable: false));                // enable bit clear: no configuration cycle
        Assert.Equal(0xffff_ffffu, PortRead(PciBus.ConfigDataPort, 4));
        CfgWrite(17, 0x3c, 1, 5);
        Assert.Equal(0xffff_ffffu, Cfg(17, 0x3c));
    }

    [Fact]
    public void HostBridge_IsAtSlotZero()
    {
        Assert.Equal(0, _bus[0]!.Slot);
        Assert.Equal((uint)PciHostBridge.BridgeDeviceId << 16 | PciHostBridge.BridgeVendorId, Cfg(0, 0));
        Assert.Equal(0x06_00_00u, Cfg(0, 8) >> 8);                  // class: bridge, host bridge
        Assert.Equal(0u, Cfg(0, 6, 2) & PciFunction.StatusCapabilityList);   // no capabilities
        Assert.Equal(0u, Cfg(0, 0x10));                              // no BARs
        Assert.Equal(0u, Cfg(0, 0x0e, 1));                          // header type 0, single function
        Assert.Equal(1, _slot);
    }

    [Fact]
    public void VirtioFunction_HasTheModernVirtioIdentity()
    {
        Assert.Equal(0x1af4u, Cfg(_slot, 0, 2));
        Assert.Equal(0x1042u, Cfg(_slot, 2, 2));                     // 0x1040 + device type 2 (block)
        Assert.Equal(1u, Cfg(_slot, 8, 1));                          // revision 1: non-transitional
        Assert.Equal(0x01_80_00u, Cfg(_slot, 8) >> 8);              // mass storage, other
        Assert.Equal(0x1af4u, Cfg(_slot, 0x2c, 2));                  // subsystem vendor
        Assert.Equal(0u, Cfg(_slot, 0x0e, 1));
        Assert.Equal(11u, Cfg(_slot, 0x3c, 1));                      // interrupt line as plugged
        Assert.Equal(1u, Cfg(_slot, 0x3d, 1));                       // INTA#
        Assert.Equal((uint)PciFunction.StatusCapabilityList, Cfg(_slot, 6, 2) & PciFunction.StatusCapabilityList);
    }

    [Fact]
    public void ReadOnlyRegisters_KeepTheirValues_WhateverIsWritten()
    {
        int[] readOnly = [0x00, 0x08, 0x0c & ~3, 0x2c, 0x34];
        var before = readOnly.ToDictionary(r => r, r => Cfg(_slot, r));
        foreach (int r in readOnly)
            CfgWrite(_slot, r, 4, 0xffff_ffff);
        CfgWrite(_slot, 0x3c, 4, 0x0000_0005);   // line is writable, pin is not
        CfgWrite(_slot, 0x3c, 4, 0xffff_ff05);
        foreach (int r in readOnly.Where(r => r != 0x0c))
            Assert.Equal(before[r], Cfg(_slot, r));
        Assert.Equal(0u, Cfg(_slot, 0x0e, 1));                      // header type and BIST inside the 0x0c dword
        Assert.Equal(0u, Cfg(_slot, 0x0f, 1));
        Assert.Equal(5u, Cfg(_slot, 0x3c, 1));
        Assert.Equal(1u, Cfg(_slot, 0x3d, 1));

        // Command: only the bits the function implements stick; reserved bits read zero.
        CfgWrite(_slot, PciFunction.CommandRegister, 2, 0xffff);
        uint cmd = Cfg(_slot, PciFunction.CommandRegister, 2);
        Assert.Equal((uint)(PciFunction.CommandMemorySpace | PciFunction.CommandBusMaster), cmd & 0x6);
        Assert.Equal(0u, cmd & 0xf800);
    }

    [Fact]
    public void Bars_AreAssignedInTheWindow_AlignedToTheirSize()
    {
        ulong bar0 = _rig.Transport.GetBarAddress(0), bar1 = _rig.Transport.GetBarAddress(1);
        Assert.Equal((uint)bar0, Cfg(_slot, 0x10));
        Assert.Equal((uint)bar1, Cfg(_slot, 0x14));
        foreach (var (at, size) in new[] { (bar0, VirtioPciTransport.Bar0Size), (bar1, VirtioPciTransport.MsixBarSize) })
        {
            Assert.InRange(at, WindowStart, WindowStart + WindowSize - size);
            Assert.Equal(0UL, at % size);
        }
        Assert.True(bar0 + VirtioPciTransport.Bar0Size <= bar1 || bar1 + VirtioPciTransport.MsixBarSize <= bar0, "BARs overlap");
    }

    [Fact]
    public void BarSizing_ReadsBackTheSizeMask_ThenTheAddressIsRestored()
    {
        CfgWrite(_slot, PciFunction.CommandRegister, 2, 0);         // decode off while sizing, as Linux does
        foreach (var (reg, size) in new[] { (0x10, VirtioPciTransport.Bar0Size), (0x14, VirtioPciTransport.MsixBarSize) })
        {
            uint original = Cfg(_slot, reg);
            CfgWrite(_slot, reg, 4, 0xffff_ffff);
            uint mask = Cfg(_slot, reg);
            Assert.Equal(0u, mask & 0xf);                            // 32-bit memory, not prefetchable
            Assert.Equal(size, (ulong)(~(mask & ~0xfu) + 1));
            CfgWrite(_slot, reg, 4, original);
            Assert.Equal(original, Cfg(_slot, reg));
        }
        // Unimplemented BARs are hardwired to zero.
        for (int reg = 0x18; reg <= 0x24; reg += 4)
        {
            CfgWrite(_slot, reg, 4, 0xffff_ffff);
            Assert.Equal(0u, Cfg(_slot, reg));
        }
    }

    [Fact]
    public void BarRelocation_TheMmioBusSeesTheBar_OnlyAtItsAddress_AndOnlyWithMemoryDecode()
    {
        ulong bar0 = _rig.Transport.GetBarAddress(0);
        Assert.Null(_mmio.Find(bar0, 1));                            // decode is off after reset
        Assert.Null(_rig.Transport.GetMappedAddress(0));

        CfgWrite(_slot, PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        var e = _mmio.Find(bar0 + VirtioPciTransport.IsrOffset, 1);
        Assert.NotNull(e);
        Assert.Equal(bar0, e.Value.Base);
        Assert.Equal(VirtioPciTransport.Bar0Size, e.Value.Length);
        Assert.NotNull(_mmio.Find(_rig.Transport.GetBarAddress(1), 4));

        // The guest moves BAR 0.
        const uint moved = 0xd000_0000;
        CfgWrite(_slot, 0x10, 4, moved);
        Assert.Null(_mmio.Find(bar0, 1));
        Assert.Equal(moved, _mmio.Find(moved + 0x3fff, 1)?.Base);
        Assert.Equal(moved, _rig.Transport.GetMappedAddress(0));

        // An MMIO access at the new address reaches the common configuration: num_queues.
        var b = new byte[2];
        Assert.True(_mmio.Read(moved + VirtioDriver.NumQueues, b, 0));
        Assert.Equal(2, BinaryPrimitives.ReadUInt16LittleEndian(b));
        // And a write does too: device_status.
        Assert.True(_mmio.Write(moved + VirtioDriver.DeviceStatus, [VirtioStatus.Acknowledge], 0));
        Assert.Equal(VirtioStatus.Acknowledge, _rig.Transport.Status);

        // Decode off: gone; on again: back at the moved address.
        CfgWrite(_slot, PciFunction.CommandRegister, 2, 0);
        Assert.Null(_mmio.Find(moved, 1));
        Assert.Null(_mmio.Find(_rig.Transport.GetBarAddress(1), 1));
        Assert.False(_mmio.Read(moved + VirtioDriver.NumQueues, b, 0));
        CfgWrite(_slot, PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        Assert.Equal(moved, _mmio.Find(moved, 1)?.Base);
    }

    [Fact]
    public void BarMovedOntoAnotherDevice_DecodesNothing_UntilMovedAway()
    {
        var other = new RecordingDevice(7);
        _mmio.Register(0xe000_0000, 0x10000, other);
        CfgWrite(_slot, PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        CfgWrite(_slot, 0x10, 4, 0xe000_4000);
        Assert.Null(_rig.Transport.GetMappedAddress(0));
        Assert.Same(other, _mmio.Find(0xe000_4000, 1)?.Device);      // the other device keeps its range
        CfgWrite(_slot, 0x10, 4, 0xe010_0000);
        Assert.Equal(0xe010_0000UL, _rig.Transport.GetMappedAddress(0));
        Assert.Same(other, _mmio.Find(0xe000_4000, 1)?.Device);
    }

    [Fact]
    public void ByteAndWordAccesses_ThroughCfdCfeCff_SelectTheRightBytes()
    {
        SetAddress(Address(_slot, 0));
        Assert.Equal(0xf4u, PortRead(0xcfc, 1));
        Assert.Equal(0x1au, PortRead(0xcfd, 1));
        Assert.Equal(0x42u, PortRead(0xcfe, 1));
        Assert.Equal(0x10u, PortRead(0xcff, 1));
        Assert.Equal(0x1af4u, PortRead(0xcfc, 2));
        Assert.Equal(0x1042u, PortRead(0xcfe, 2));

        // Latency timer (0x0d) through 0xCFD; interrupt line (0x3c) through 0xCFC.
        SetAddress(Address(_slot, 0x0c));
        PortWrite(0xcfd, 1, 0x40);
        Assert.Equal(0x40u, Cfg(_slot, 0x0d, 1));
        SetAddress(Address(_slot, 0x3c));
        PortWrite(0xcfc, 1, 9);
        Assert.Equal(9u, Cfg(_slot, 0x3c, 1));
        Assert.Equal(9, _rig.Transport.InterruptLine);
        // Command through a word write at 0xCFC, status (read-only here) at 0xCFE untouched.
        uint status = Cfg(_slot, 6, 2);
        SetAddress(Address(_slot, 4));
        PortWrite(0xcfc, 2, PciFunction.CommandMemorySpace);
        PortWrite(0xcfe, 2, 0);
        Assert.Equal((uint)PciFunction.CommandMemorySpace, Cfg(_slot, 4, 2));
        Assert.Equal(status, Cfg(_slot, 6, 2));
    }

    private List<(int At, byte Id)> WalkCapabilities()
    {
        var list = new List<(int, byte)>();
        int p = (int)Cfg(_slot, PciFunction.CapabilityPointerRegister, 1);
        while (p != 0)
        {
            Assert.True(p >= 0x40 && p <= 0xfc && p % 4 == 0, $"capability pointer 0x{p:x} is not a dword in the device-specific area");
            Assert.True(list.Count < 48, "the capability list loops");
            list.Add((p, (byte)Cfg(_slot, p, 1)));
            p = (int)Cfg(_slot, p + 1, 1);
        }
        return list;
    }

    [Fact]
    public void CapabilityList_HoldsMsixAndTheFiveVirtioStructures()
    {
        var caps = WalkCapabilities();
        var msix = Assert.Single(caps, c => c.Id == 0x11);
        uint control = Cfg(_slot, msix.At + 2, 2);
        Assert.Equal(3u, (control & 0x7ff) + 1);                    // config + 2 queues
        Assert.Equal(0u, control & 0xc000);                          // disabled and unmasked at reset
        Assert.Equal((uint)VirtioPciTransport.MsixBar, Cfg(_slot, msix.At + 4) & 7);
        Assert.Equal(0u, Cfg(_slot, msix.At + 4) & ~7u);
        Assert.Equal((uint)VirtioPciTransport.MsixBar, Cfg(_slot, msix.At + 8) & 7);
        Assert.Equal((uint)VirtioPciTransport.MsixPbaOffset, Cfg(_slot, msix.At + 8) & ~7u);

        var vendor = caps.Where(c => c.Id == 0x09).Select(c => (
            c.At,
            Len: Cfg(_slot, c.At + 2, 1), Type: Cfg(_slot, c.At + 3, 1), Bar: Cfg(_slot, c.At + 4, 1),
            Offset: Cfg(_slot, c.At + 8), Length: Cfg(_slot, c.At + 12))).ToList();
        Assert.Equal([1u, 2u, 3u, 4u, 5u], vendor.Select(v => v.Type).Order());
        var byType = vendor.ToDictionary(v => v.Type);

        Assert.Equal((0u, (uint)VirtioPciTransport.CommonOffset), (byType[1].Bar, byType[1].Offset));
        Assert.True(byType[1].Length >= 0x38, "common configuration is 0x38 bytes");
        Assert.Equal((0u, (uint)VirtioPciTransport.NotifyOffset), (byType[2].Bar, byType[2].Offset));
        Assert.True(byType[2].Len >= 20, "the notify capability carries notify_off_multiplier");
        uint multiplier = Cfg(_slot, byType[2].At + 16);
        Assert.Equal(VirtioPciTransport.NotifyMultiplier, multiplier);
        Assert.True(byType[2].Length >= 2 * multiplier + 2, "every queue's notify address lies inside the structure");
        Assert.Equal((0u, (uint)VirtioPciTransport.IsrOffset), (byType[3].Bar, byType[3].Offset));
        Assert.True(byType[3].Length >= 1);
        Assert.Equal((0u, (uint)VirtioPciTransport.DeviceConfigOffset), (byType[4].Bar, byType[4].Offset));
        Assert.True(byType[4].Length >= 60, "virtio_blk_config is 60 bytes");
        Assert.True(byType[5].Len >= 20, "the PCI configuration access capability carries pci_cfg_data");
        foreach (var v in vendor.Where(v => v.Type != 5))
        {
            Assert.True(v.Len >= 16);
            Assert.True(v.Offset + (ulong)v.Length <= VirtioPciTransport.Bar0Size, $"structure {v.Type} does not fit in BAR 0");
        }
    }

    [Fact]
    public void MsixControl_EnableAndFunctionMaskAreWritable_TableSizeIsNot()
    {
        int at = WalkCapabilities().Single(c => c.Id == 0x11).At;
        CfgWrite(_slot, at + 2, 2, 0xffff);
        Assert.Equal(0xc000u | 2, Cfg(_slot, at + 2, 2));
        Assert.True(_rig.Transport.Msix.Enabled);
        CfgWrite(_slot, at, 4, 0x0000_0000);    // a dword write over id, next and control
        Assert.Equal(0x11u, Cfg(_slot, at, 1));
        Assert.Equal(2u, Cfg(_slot, at + 2, 2));
        Assert.False(_rig.Transport.Msix.Enabled);
    }

    [Fact]
    public void PciCfgWindow_ReadsAndWritesTheCommonConfiguration()
    {
        int cap = WalkCapabilities().Where(c => c.Id == 0x09).Single(c => Cfg(_slot, c.At + 3, 1) == 5).At;
        void Window(uint bar, uint offset, uint length)
        {
            CfgWrite(_slot, cap + 4, 1, bar);
            CfgWrite(_slot, cap + 8, 4, offset);
            CfgWrite(_slot, cap + 12, 4, length);
        }

        // num_queues, a word at 0x12.
        Window(0, VirtioDriver.NumQueues, 2);
        Assert.Equal(2u, Cfg(_slot, cap + 16, 4) & 0xffff);

        // device_status, a byte at 0x14: write through the window, see it in the device.
        Window(0, VirtioDriver.DeviceStatus, 1);
        CfgWrite(_slot, cap + 16, 1, VirtioStatus.Acknowledge);
        Assert.Equal(VirtioStatus.Acknowledge, _rig.Transport.Status);
        CfgWrite(_slot, cap + 16, 1, VirtioStatus.Acknowledge | VirtioStatus.Driver);
        Assert.Equal(VirtioStatus.Acknowledge | VirtioStatus.Driver, _rig.Transport.Status);
        Assert.Equal((uint)(VirtioStatus.Acknowledge | VirtioStatus.Driver), Cfg(_slot, cap + 16, 1));

        // device_feature (dword at 4) with device_feature_select = 1: VERSION_1 is bit 0 of the high half.
        Window(0, VirtioDriver.DeviceFeatureSelect, 4);
        CfgWrite(_slot, cap + 16, 4, 1);
        Window(0, VirtioDriver.DeviceFeature, 4);
        Assert.Equal(1u, Cfg(_slot, cap + 16) & 1);

        // A queue address dword.
        Window(0, VirtioDriver.QueueDesc, 4);
        CfgWrite(_slot, cap + 16, 4, 0x0012_3000);
        _rig.Driver.Write16(VirtioDriver.QueueSelect, 0);
        Assert.Equal(0x0012_3000UL, _rig.Driver.Read64(VirtioDriver.QueueDesc));

        // Reset through the window.
        Window(0, VirtioDriver.DeviceStatus, 1);
        CfgWrite(_slot, cap + 16, 1, 0);
        Assert.Equal(0, _rig.Transport.Status);
    }

    [Fact]
    public void MsixBar_TableAndPba_AreReachableThroughMmio()
    {
        CfgWrite(_slot, PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        ulong bar1 = _rig.Transport.GetBarAddress(1);
        var dword = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(dword, 0xfee0_1000);
        Assert.True(_mmio.Write(bar1 + 16, dword, 0));              // entry 1, address low
        BinaryPrimitives.WriteUInt32LittleEndian(dword, 0x4321);
        Assert.True(_mmio.Write(bar1 + 16 + 8, dword, 0));          // entry 1, data
        Assert.Equal((0xfee0_1000UL, 0x4321u), _rig.Transport.Msix.GetMessage(1));
        Assert.True(_mmio.Read(bar1 + 16 + 12, dword, 0));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(dword));   // still masked
        var qword = new byte[8];
        Assert.True(_mmio.Read(bar1 + VirtioPciTransport.MsixPbaOffset, qword, 0));
        Assert.Equal(0UL, BinaryPrimitives.ReadUInt64LittleEndian(qword));

        // A vector signalled while masked shows in the PBA, which the guest cannot write.
        CfgWrite(_slot, WalkCapabilities().Single(c => c.Id == 0x11).At + 2, 2, 0x8000);
        Assert.True(_rig.Transport.Msix.Signal(1));
        Assert.True(_mmio.Read(bar1 + VirtioPciTransport.MsixPbaOffset, qword, 0));
        Assert.Equal(2UL, BinaryPrimitives.ReadUInt64LittleEndian(qword));
        Assert.True(_mmio.Write(bar1 + VirtioPciTransport.MsixPbaOffset, new byte[8], 0));
        Assert.True(_rig.Transport.Msix.IsPending(1));
    }
}
