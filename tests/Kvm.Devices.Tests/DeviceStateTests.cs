using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Devices.Legacy.AcpiPm;
using Kvm.Devices.Legacy.DebugExit;
using Kvm.Devices.Legacy.I8042;
using Kvm.Devices.Legacy.Rtc;
using Kvm.Devices.Legacy.Serial;
using Kvm.Devices.Manager;
using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using static Kvm.Devices.Legacy.Serial.Serial16550;

namespace Kvm.Devices.Tests;

/// <summary>
/// The state records of the legacy devices, PCI configuration space, the MSI-X table and a
/// virtqueue: each device is driven into a state through its bus interface, saved through the
/// bytes of its record, restored into a fresh device, and the two are then driven side by side.
/// </summary>
public sealed class DeviceStateTests
{
    /// <summary>One register access of a side-by-side run.</summary>
    private readonly record struct Op(bool Write, ulong Offset, byte Value = 0, int Size = 1)
    {
        public static Op R(ulong offset, int size = 1) => new(false, offset, 0, size);
        public static Op W(ulong offset, byte value) => new(true, offset, value);
    }

    /// <summary>
    /// Runs <paramref name="ops"/> on both devices: every read must give the same bytes and, after
    /// every access, both interrupt lines must be at the same level.
    /// </summary>
    private static void SideBySide(IBusDevice saved, RecordingInterruptLine? savedLine, IBusDevice restored,
        RecordingInterruptLine? restoredLine, IEnumerable<Op> ops)
    {
        int step = 0;
        foreach (var op in ops)
        {
            if (op.Write)
            {
                saved.Write(op.Offset, [op.Value], 0);
                restored.Write(op.Offset, [op.Value], 0);
            }
            else
            {
                var a = new byte[op.Size];
                var b = new byte[op.Size];
                saved.Read(op.Offset, a, 0);
                restored.Read(op.Offset, b, 0);
                Assert.True(a.AsSpan().SequenceEqual(b),
                    $"step {step}: reading offset {op.Offset} gave {Convert.ToHexString(a)} on the saved device, {Convert.ToHexString(b)} on the restored one");
            }
            if (savedLine is not null)
                Assert.True(savedLine.Level == restoredLine!.Level,
                    $"step {step} ({(op.Write ? "write" : "read")} at {op.Offset}): the saved device's line is {savedLine.Level}, the restored one's {restoredLine.Level}");
            step++;
        }
    }

    // ------------------------------------------------------------------ 16550 UART

    [Fact]
    public void Serial_RestoredIntoAFreshPort_BehavesAsTheSavedOne_AndDrivesItsLine()
    {
        var outA = new List<byte>();
        var lineA = new RecordingInterruptLine();
        var a = new Serial16550(b => outA.AddRange(b.ToArray()), lineA);
        // Divisor 0x0102 behind DLAB, 8N1, FIFO on, scratch.
        foreach (var (reg, v) in new (int, byte)[] { (Lcr, 0x83), (Dll, 0x02), (Dlm, 0x01), (Lcr, 0x03), (Fcr, 0x07), (Scr, 0x5a) })
            a.Write((ulong)reg, [v], 0);
        // Loopback with RTS, DTR and OUT2: the modem status changes (delta bits), and 17 bytes sent
        // fill the 16-byte receive FIFO and overrun it.
        a.Write(Mcr, [McrLoop | McrRts | McrDtr | McrOut2], 0);
        for (int i = 0; i < 17; i++)
            a.Write(Thr, [(byte)(0x30 + i)], 0);
        a.Write(Ier, [IerRda | IerThre | IerRls | IerMs], 0);
        Assert.True(lineA.Level, "the saved port should have its interrupt asserted (overrun, data, THRE, modem status)");

        byte[] payload = StateBytes.Save(a);
        var outB = new List<byte>();
        var lineB = new RecordingInterruptLine();
        var b = new Serial16550(x => outB.AddRange(x.ToArray()), lineB);
        Assert.Empty(lineB.Levels);
        StateBytes.Restore(b, payload, "serial0");
        Assert.Equal([true], lineB.Levels);                     // driven at restore, once
        Assert.Equal(payload, StateBytes.Save(b));               // every field came across

        var ops = new List<Op>
        {
            Op.R(Iir), Op.R(Lsr),                                // RLS first; reading LSR clears the overrun
            Op.R(Iir),                                           // then received data
        };
        for (int i = 0; i < 17; i++)
            ops.AddRange([Op.R(Rbr), Op.R(Lsr)]);               // the 16 bytes, then an empty FIFO
        ops.AddRange([
            Op.R(Iir), Op.R(Iir),                                // THRE (read clears it), then modem status
            Op.R(Msr), Op.R(Iir),                                // reading MSR clears the deltas: no interrupt
            Op.R(Ier), Op.R(Lcr), Op.R(Mcr), Op.R(Scr),
            Op.W(Lcr, 0x83), Op.R(Dll), Op.R(Dlm), Op.W(Lcr, 0x03),
            Op.W(Mcr, McrDtr | McrRts | McrOut2),                // out of loopback: the terminal is back
            Op.R(Msr), Op.R(Iir),
            Op.W(Thr, (byte)'x'), Op.R(Iir), Op.R(Iir), Op.R(Lsr),
            Op.W(Fcr, 0x01), Op.R(Iir),
        ]);
        SideBySide(a, lineA, b, lineB, ops);
        Assert.Equal("x"u8.ToArray(), outB.ToArray());
        Assert.Equal(outA, outB);
    }

    [Fact]
    public void Serial_RestoredQuietPort_LeavesItsLineAlone_AndKeepsTheDivisor()
    {
        var a = new Serial16550(_ => { }, new RecordingInterruptLine());
        a.Write(Lcr, [0x83], 0);
        a.Write(Dll, [0x01], 0);
        a.Write(Lcr, [0x03], 0);
        var lineB = new RecordingInterruptLine();
        var b = new Serial16550(_ => { }, lineB);
        StateBytes.Restore(b, StateBytes.Save(a));
        Assert.Empty(lineB.Levels);
        b.Write(Lcr, [0x83], 0);
        var dll = new byte[1];
        b.Read(Dll, dll, 0);
        Assert.Equal(0x01, dll[0]);
    }

    [Fact]
    public void Serial_ReceiveFifoLongerThan16_IsRefused()
    {
        var w = new StateWriter();
        new SerialState(0, 3, 0, 0, 1, 1, 0, 0, false, false, new byte[17]).Write(w);
        var b = new Serial16550(_ => { });
        var e = Assert.Throws<StateFormatException>(() => StateBytes.Restore(b, w.ToArray(), "serial0"));
        Assert.Contains("serial0", e.Message);
        Assert.Contains("receive", e.Message);
    }

    // ------------------------------------------------------------------ CMOS RTC

    [Fact]
    public void Rtc_IndexAndCmosBytes_CarryOver()
    {
        var now = new DateTime(2026, 12, 3, 1, 2, 3, DateTimeKind.Utc);
        var a = new CmosRtc(() => now);
        for (int reg = 0x0e; reg < 0x80; reg++)
        {
            a.Write(0, [(byte)reg], 0);
            a.Write(1, [(byte)(reg * 7 + 3)], 0);
        }
        a.Write(0, [0x80 | 0x21], 0);      // NMI masked, register 0x21 selected

        var b = new CmosRtc(() => now);
        StateBytes.Restore(b, StateBytes.Save(a), "rtc");

        var ops = new List<Op> { Op.R(0), Op.R(1) };             // the index itself, and the byte it selects
        for (int reg = 0; reg < 0x80; reg++)
            ops.AddRange([Op.W(0, (byte)reg), Op.R(1)]);
        ops.AddRange([Op.W(0, 0x40), Op.W(1, 0x99), Op.R(1), Op.R(0)]);
        SideBySide(a, null, b, null, ops);

        // And the bytes are the ones written, not merely equal on both (a restore that lost them
        // would read zeros on both only if the saved one lost them too).
        b.Write(0, [0x21], 0);
        var d = new byte[1];
        b.Read(1, d, 0);
        Assert.Equal((byte)(0x21 * 7 + 3), d[0]);
    }

    [Fact]
    public void Rtc_CmosOfAnotherSize_IsRefused()
    {
        var w = new StateWriter().U8(0).Bytes(new byte[64]);
        var e = Assert.Throws<StateFormatException>(() => StateBytes.Restore(new CmosRtc(), w.ToArray(), "rtc"));
        Assert.Contains("cmos", e.Message);
        Assert.Throws<DeviceStateException>(() => new CmosRtc().Restore(new RtcState(0, new byte[64])));
    }

    // ------------------------------------------------------------------ i8042

    [Fact]
    public void I8042_PendingWriteCommandByte_TakesItsDataAfterRestore()
    {
        var a = new I8042Controller(_ => { });
        a.CommandPort.Write(0, [0x60], 0);         // write command byte: waits for its data
        var b = new I8042Controller(_ => { });
        StateBytes.Restore(b, StateBytes.Save(a), "i8042");

        var sa = new Pair(a);
        var sb = new Pair(b);
        SideBySide(sa, null, sb, null, [
            Op.R(Pair.Status),
            Op.W(Pair.Data, 0x47),                 // the data byte of the pending command
            Op.R(Pair.Status),
            Op.W(Pair.Command, 0x20),              // read the command byte back
            Op.R(Pair.Status), Op.R(Pair.Data), Op.R(Pair.Status),
        ]);
        b.CommandPort.Write(0, [0x20], 0);
        var d = new byte[1];
        b.DataPort.Read(0, d, 0);
        Assert.Equal(0x47, d[0]);
    }

    [Fact]
    public void I8042_PendingWriteOutputPort_ResetsTheMachineAfterRestore_AndTheOutputBufferIsKept()
    {
        var resetsA = new List<int>();
        var a = new I8042Controller(resetsA.Add);
        a.CommandPort.Write(0, [0xaa], 0);         // self-test: 0x55 waits in the output buffer
        a.CommandPort.Write(0, [0xd1], 0);         // write output port: waits for its data
        var resetsB = new List<int>();
        var b = new I8042Controller(resetsB.Add);
        StateBytes.Restore(b, StateBytes.Save(a), "i8042");

        SideBySide(new Pair(a), null, new Pair(b), null, [Op.R(Pair.Status), Op.R(Pair.Data), Op.R(Pair.Status)]);
        b.DataPort.Write(0, [0xfe], 3);            // bit 0 clear: pulse reset
        Assert.Equal([3], resetsB);
        Assert.Empty(resetsA);
    }

    /// <summary>The i8042's two ports as one bus device: 0 = data, 4 = status/command.</summary>
    private sealed class Pair(I8042Controller c) : IBusDevice
    {
        public const ulong Data = 0, Status = 4, Command = 4;

        public void Read(ulong offset, Span<byte> data, int vcpuId) =>
            (offset == Data ? c.DataPort : c.CommandPort).Read(0, data, vcpuId);

        public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId) =>
            (offset == Data ? c.DataPort : c.CommandPort).Write(0, data, vcpuId);
    }

    // ------------------------------------------------------------------ ACPI PM

    [Fact]
    public void AcpiPm_EnabledAndPressedPowerButton_AssertsTheSciAfterRestore()
    {
        var offA = new List<int>();
        var lineA = new RecordingInterruptLine();
        var a = new AcpiPmDevice(offA.Add, lineA);
        Span<byte> w = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(w, AcpiPmDevice.StatusPowerButton | AcpiPmDevice.StatusGlobal);
        a.Write(2, w, 0);                                     // PM1_EN
        a.Write(5, [(byte)(AcpiPmDevice.SleepTypeS5 << 2)], 0); // SLP_TYP = S5, SLP_EN not set
        a.PressPowerButton();
        Assert.True(lineA.Level);

        var offB = new List<int>();
        var lineB = new RecordingInterruptLine();
        var b = new AcpiPmDevice(offB.Add, lineB);
        StateBytes.Restore(b, StateBytes.Save(a), "pm");
        Assert.Equal([true], lineB.Levels);
        Assert.Equal(a.Registers, b.Registers);

        var ops = new List<Op>();
        for (ulong i = 0; i < AcpiPmDevice.Length; i++)
            ops.Add(Op.R(i));
        ops.AddRange([Op.R(0, 2), Op.R(2, 2), Op.R(4, 2),
            Op.W(1, AcpiPmDevice.StatusPowerButton >> 8),     // write 1 to clear PWRBTN_STS: the SCI drops
            Op.R(0, 2)]);
        SideBySide(a, lineA, b, lineB, ops);
        Assert.False(lineB.Level);

        // The enable bits came across: the next press interrupts the restored device too.
        b.PressPowerButton();
        Assert.True(lineB.Level);
        b.Write(5, [(byte)((AcpiPmDevice.ControlSleepEnable >> 8) | AcpiPmDevice.SleepTypeS5 << 2)], 1);
        Assert.Equal([1], offB);
    }

    [Fact]
    public void AcpiPm_PressedButtonNotEnabled_LeavesTheSciLowAfterRestore()
    {
        var a = new AcpiPmDevice(_ => { }, new RecordingInterruptLine());
        a.PressPowerButton();
        var lineB = new RecordingInterruptLine();
        var b = new AcpiPmDevice(_ => { }, lineB);
        StateBytes.Restore(b, StateBytes.Save(a));
        Assert.Empty(lineB.Levels);
        Assert.Equal(AcpiPmDevice.StatusPowerButton, b.Registers.Status & AcpiPmDevice.StatusPowerButton);
        b.Write(2, [0x00, AcpiPmDevice.StatusPowerButton >> 8], 0);   // enabling it now interrupts
        Assert.Equal([true], lineB.Levels);
    }

    // ------------------------------------------------------------------ debug exit

    [Fact]
    public void DebugExit_HasAnEmptyRecord()
    {
        var d = new DebugExitDevice(_ => { });
        Assert.Empty(StateBytes.Save(d));
        StateBytes.Restore(d, []);
        Assert.Throws<StateFormatException>(() => StateBytes.Restore(d, [1]));
    }

    // ------------------------------------------------------------------ PCI configuration space

    private const ulong Window = 0xc000_0000, WindowSize = 0x1000_0000;

    /// <summary>A bus with an <see cref="IdFunction"/> in slot 1, as firmware leaves it (BARs assigned, decoding off).</summary>
    private static (IoBus Mmio, PciBus Bus, IdFunction Function) Machine(ushort vendor = 0x1234, ushort device = 0x5678)
    {
        var mmio = new IoBus("mmio");
        var bus = new PciBus(mmio, Window, WindowSize);
        var f = new IdFunction(vendor, device);
        bus.Add(f, interruptLine: 10);
        return (mmio, bus, f);
    }

    [Fact]
    public void PciFunction_RestoredConfig_MapsTheBarsWhereTheGuestMovedThem()
    {
        var (mmioA, _, fa) = Machine();
        ulong firmwareBar0 = fa.GetBarAddress(0);
        fa.WriteConfig(0x10, 4, 0xd000_0000);                      // BAR 0 moved
        fa.WriteConfig(0x18, 4, 0x2000_0000);                      // BAR 2 (64-bit) moved above 4 GiB
        fa.WriteConfig(0x1c, 4, 0x1);
        fa.WriteConfig(PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace | PciFunction.CommandBusMaster);
        fa.WriteConfig(PciFunction.InterruptLineRegister, 1, 11);
        Assert.True(mmioA.Read(0xd000_0010, new byte[4], 0));
        byte[] config = fa.SaveConfig();

        var (mmioB, _, fb) = Machine();
        Assert.Null(fb.GetMappedAddress(0));                       // a fresh function does not decode
        fb.RestoreConfig(config);
        Assert.Equal(0xd000_0000UL, fb.GetMappedAddress(0));
        Assert.Equal(0x1_2000_0000UL, fb.GetMappedAddress(2));
        Assert.True(fb.MemoryEnabled);

        var data = new byte[4];
        Assert.True(mmioB.Read(0xd000_0010, data, 0), "the moved BAR 0 does not decode on the restored machine's bus");
        Assert.Equal([0xb0, 0xb0, 0xb0, 0xb0], data);
        Assert.True(mmioB.Read(0x1_2000_0008, data, 0), "the moved BAR 2 does not decode");
        Assert.Equal(new List<(int, ulong, bool)> { (0, 0x10, false), (2, 0x8, false) }, fb.Accesses);
        Assert.False(mmioB.Read(firmwareBar0, data, 0), "BAR 0 still decodes where firmware had put it");

        for (int reg = 0; reg < PciFunction.ConfigSpaceSize; reg += 4)
            Assert.Equal(fa.ReadConfig(reg, 4), fb.ReadConfig(reg, 4));
        Assert.Equal(11, fb.InterruptLine);
    }

    [Fact]
    public void PciFunction_RestoredConfigWithDecodingOff_MapsNothing()
    {
        var (_, _, fa) = Machine();
        fa.WriteConfig(0x10, 4, 0xd000_0000);
        var (mmioB, _, fb) = Machine();
        fb.RestoreConfig(fa.SaveConfig());
        Assert.Null(fb.GetMappedAddress(0));
        Assert.Equal(0xd000_0000UL, fb.GetBarAddress(0));
        Assert.False(mmioB.Read(0xd000_0000, new byte[4], 0));
    }

    [Theory]
    [InlineData((ushort)0x1235, (ushort)0x5678, "0x00")]    // another vendor
    [InlineData((ushort)0x1234, (ushort)0x5679, "0x02")]    // another device
    public void PciFunction_ConfigOfAnotherDeviceKind_IsRefused_NamingTheOffset_AndChangesNothing(ushort vendor, ushort device, string offset)
    {
        var (_, _, fa) = Machine();
        fa.WriteConfig(0x10, 4, 0xd000_0000);
        fa.WriteConfig(PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        var (mmioB, _, fb) = Machine(vendor, device);
        byte[] before = fb.SaveConfig();
        var e = Assert.Throws<DeviceStateException>(() => fb.RestoreConfig(fa.SaveConfig()));
        Assert.Contains($"byte {offset}", e.Message);
        Assert.Equal(before, fb.SaveConfig());
        Assert.Null(fb.GetMappedAddress(0));
        Assert.False(mmioB.Read(0xd000_0000, new byte[4], 0));
    }

    [Fact]
    public void PciFunction_HostBridgeConfig_OrAShortOne_IsRefused()
    {
        var (_, busA, fa) = Machine();
        var (_, _, fb) = Machine();
        var e = Assert.Throws<DeviceStateException>(() => fb.RestoreConfig(busA[0]!.SaveConfig()));
        Assert.Contains("0x00", e.Message);
        Assert.Throws<DeviceStateException>(() => fb.RestoreConfig(fa.SaveConfig().AsSpan(0, 255)));
    }

    [Fact]
    public void PciFunction_ConfigWhoseStatusRegisterDiffers_IsRefused()
    {
        // The stored status bits are fixed by the function's layout (Capabilities List); the
        // dynamic ones (Interrupt Status) are ORed in on reads and never stored. A record that
        // says "no capability list" describes another layout: accepted, the guest would find no
        // virtio structures.
        using var a = BlockRig.Create(1 << 20);
        byte[] config = a.Transport.SaveConfig();
        Assert.NotEqual(0, config[PciFunction.StatusRegister] & PciFunction.StatusCapabilityList);
        config[PciFunction.StatusRegister] &= unchecked((byte)~PciFunction.StatusCapabilityList);
        using var b = BlockRig.Create(1 << 20);
        var e = Assert.Throws<DeviceStateException>(() => b.Transport.RestoreConfig(config));
        Assert.Contains("byte 0x06", e.Message);
        Assert.NotEqual(0u, b.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusCapabilityList);

        config[PciFunction.StatusRegister] |= (byte)PciFunction.StatusCapabilityList;
        config[PciFunction.StatusRegister + 1] = 0x80;      // Detected Parity Error: not this function's
        Assert.Throws<DeviceStateException>(() => b.Transport.RestoreConfig(config));
    }

    [Fact]
    public void PciFunction_ConfigSavedWithAnInterruptPending_IsAccepted()
    {
        using var a = BlockRig.Create(1 << 20);
        a.Start(msix: false);
        a.Do(Virtio.Block.VirtioBlock.TypeIn, 0, inLength: 512);
        Assert.True(a.Intx.WaitForLevel(true, Wait.Timeout));
        Assert.NotEqual(0u, a.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusInterrupt);
        using var b = BlockRig.Create(1 << 20);
        b.Transport.RestoreConfig(a.Transport.SaveConfig());
        Assert.Equal(0u, b.Transport.ReadConfig(PciFunction.StatusRegister, 2) & PciFunction.StatusInterrupt);
    }

    private static void PortWrite32(IBusDevice bus, ulong offset, uint value)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        bus.Write(offset, b, 0);
    }

    private static uint PortRead(IBusDevice bus, ulong offset, int size)
    {
        var b = new byte[4];
        bus.Read(offset, b.AsSpan(0, size), 0);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    [Fact]
    public void PciBus_Record_RestoresConfigAddress_AndTheHostBridgesConfig()
    {
        var (_, busA, fa) = Machine();
        fa.WriteConfig(0x10, 4, 0xd000_0000);
        PortWrite32(busA, 0, 0x8000_000c);                 // host bridge, register 0x0c
        busA.Write(4, [0x10], 0);                          // cache line size
        busA.Write(5, [0x40], 0);                          // latency timer
        PortWrite32(busA, 0, 0x8000_0810);                 // slot 1, BAR 0: left selected

        var (_, busB, fb) = Machine();
        StateBytes.Restore(busB, StateBytes.Save(busA), "pci-bus");
        Assert.Equal(0x8000_0810u, PortRead(busB, 0, 4));
        // CONFIG_DATA reaches the register CONFIG_ADDRESS selects: BAR 0 of B's own function (its
        // record is its own, not the bus's).
        Assert.Equal(fb.ReadConfig(0x10, 4), PortRead(busB, 4, 4));
        PortWrite32(busB, 0, 0x8000_000c);
        Assert.Equal(0x4010u, PortRead(busB, 4, 2));
        Assert.Equal(busA[0]!.SaveConfig(), busB[0]!.SaveConfig());
    }

    [Fact]
    public void PciBus_RecordOfAnotherHostBridge_IsRefused()
    {
        var (_, busA, _) = Machine();
        byte[] payload = StateBytes.Save(busA);
        payload[4 + 4 + 2] ^= 0x01;                        // the bridge's device id, read-only
        var (_, busB, _) = Machine();
        var e = Assert.Throws<DeviceStateException>(() => StateBytes.Restore(busB, payload, "pci-bus"));
        Assert.Contains("0x02", e.Message);
    }

    // ------------------------------------------------------------------ MSI-X

    private static void Program(MsixTable t, int vector, ulong address, uint data, bool masked)
    {
        var b = new byte[4];
        ulong e = (ulong)vector * MsixTable.EntrySize;
        foreach (var (off, val) in new[] { (0ul, (uint)address), (4ul, (uint)(address >> 32)), (8ul, data), (12ul, masked ? 1u : 0u) })
        {
            BinaryPrimitives.WriteUInt32LittleEndian(b, val);
            t.WriteTable(e + off, b);
        }
    }

    private static MsixState RoundTrip(MsixState s)
    {
        var w = new StateWriter();
        s.Write(w);
        var r = new StateReader(w.ToArray(), "msix");
        var back = MsixState.Read(ref r);
        r.End();
        return back;
    }

    [Fact]
    public void Msix_ProgrammedUnmaskedEntries_GetTheirMessageAgain_AndPendingMaskedVectorsAreDeliveredWhenUnmasked()
    {
        var msiA = new RecordingMsiController();
        using var a = new MsixTable(5, msiA);
        a.SetControl(enabled: true, functionMasked: false);
        Program(a, 0, 0xfee0_0000, 0x41, masked: false);
        Program(a, 1, 0xfee0_1000, 0x42, masked: true);
        Program(a, 2, 0x1_fee0_2000, 0x43, masked: false);
        Program(a, 3, 0xfee0_3000, 0x44, masked: false);
        Program(a, 3, 0xfee0_3000, 0x44, masked: true);        // programmed, then masked
        Assert.True(a.Signal(1));                               // masked: pending
        Assert.True(a.Signal(3));
        Assert.True(a.IsPending(1) && a.IsPending(3));

        var msiB = new RecordingMsiController();
        using var b = new MsixTable(5, msiB);
        b.Restore(RoundTrip(a.Save()));

        Assert.Equal([(0xfee0_0000UL, 0x41u)], msiB[0].MessagesSet);
        Assert.Equal([(0x1_fee0_2000UL, 0x43u)], msiB[2].MessagesSet);
        Assert.Equal([(0xfee0_3000UL, 0x44u)], msiB[3].MessagesSet);    // it had been given to its vector
        Assert.Empty(msiB[4].MessagesSet);                              // never programmed
        Assert.Equal(0, msiB.TotalTriggers);
        Assert.True(b.Enabled);
        Assert.True(b.IsPending(1) && b.IsPending(3));
        Assert.True(b.IsMasked(1) && b.IsMasked(3) && b.IsMasked(4));
        Assert.False(b.IsMasked(0) || b.IsMasked(2));
        for (int v = 0; v < 5; v++)
            Assert.Equal(a.GetMessage(v), b.GetMessage(v));
        var pba = new byte[8];
        b.ReadPba(0, pba);
        Assert.Equal(0b1010UL, BinaryPrimitives.ReadUInt64LittleEndian(pba));

        // Signals after the restore reach the programmed destinations.
        Assert.True(b.Signal(0));
        Assert.True(b.Signal(2));
        Assert.Equal([(0xfee0_0000UL, 0x41u)], msiB[0].Sent);
        Assert.Equal([(0x1_fee0_2000UL, 0x43u)], msiB[2].Sent);

        // Unmasking delivers what was pending, with the entry's message.
        Program(b, 1, 0xfee0_1000, 0x42, masked: false);
        Program(b, 3, 0xfee0_3000, 0x44, masked: false);
        Assert.Equal([(0xfee0_1000UL, 0x42u)], msiB[1].Sent);
        Assert.Equal([(0xfee0_3000UL, 0x44u)], msiB[3].Sent);
        Assert.False(b.IsPending(1) || b.IsPending(3));
    }

    [Fact]
    public void Msix_FunctionMaskedTable_KeepsItsPendingBitsUntilTheFunctionIsUnmasked()
    {
        var msiA = new RecordingMsiController();
        using var a = new MsixTable(2, msiA);
        a.SetControl(enabled: true, functionMasked: false);
        Program(a, 0, 0xfee0_0000, 0x51, masked: false);
        a.SetControl(enabled: true, functionMasked: true);
        Assert.True(a.Signal(0));

        var msiB = new RecordingMsiController();
        using var b = new MsixTable(2, msiB);
        b.Restore(RoundTrip(a.Save()));
        Assert.True(b.IsPending(0));
        Assert.Equal(0, msiB[0].Triggers);
        b.SetControl(enabled: true, functionMasked: false);
        Assert.Equal([(0xfee0_0000UL, 0x51u)], msiB[0].Sent);
        Assert.False(b.IsPending(0));
    }

    [Fact]
    public void Msix_TableOfAnotherSize_IsRefused()
    {
        using var a = new MsixTable(3, null);
        using var b = new MsixTable(4, null);
        Assert.Throws<DeviceStateException>(() => b.Restore(RoundTrip(a.Save())));
        using var c = new MsixTable(65, null);
        var s = RoundTrip(b.Save());
        Assert.Throws<DeviceStateException>(() => c.Restore(s with { Entries = new MsixEntryState[65] }));
    }

    // ------------------------------------------------------------------ virtqueue

    private static VirtqueueState RoundTrip(VirtqueueState s)
    {
        var w = new StateWriter();
        s.Write(w);
        var r = new StateReader(w.ToArray(), "queue");
        var back = VirtqueueState.Read(ref r);
        r.End();
        return back;
    }

    [Fact]
    public void Virtqueue_Restored_ContinuesAtTheSavedRingPositions_WithItsInterruptSuppression()
    {
        using var memory = GuestMemory.Create([(0, 1UL << 20)]);
        var driver = new SplitQueue(memory, 8, 0x1000) { EventIdx = true };
        driver.Clear();
        var a = new Virtqueue(0, 16) { Size = 8, Enabled = true, DescTable = driver.Desc, AvailRing = driver.Avail, UsedRing = driver.Used, MsixVector = 3 };
        a.Activate(memory, eventIdx: true, indirect: false);
        // Eleven chains go round the ring of 8 (indices wrap); the device serves ten of them.
        var heads = new List<ushort>();
        for (int i = 0; i < 11; i++)
        {
            heads.Add(driver.AddChain([new Buf(0x8000 + 0x100UL * (uint)i, 16)]));
            if (i < 10)
            {
                Assert.True(a.TryPop(out var chain));
                Assert.Equal(heads[i], chain.Head);
                a.Push(chain.Head, 0);
                driver.TakeUsed();
            }
        }
        driver.UsedEvent = 9;
        Assert.True(a.ShouldInterrupt());            // used 10 passed used_event 9
        driver.UsedEvent = 0x100;                    // the driver wants nothing more for a while

        var saved = RoundTrip(a.Save());
        var b = new Virtqueue(0, 16);
        b.Restore(saved, memory, eventIdx: true, indirect: false);
        Assert.True(b.IsActive);
        Assert.Equal(((ushort)8, true, (ushort)3), (b.Size, b.Enabled, b.MsixVector));
        Assert.Equal(1, b.Pending);
        Assert.True(b.TryPop(out var next));
        Assert.Equal(heads[10], next.Head);
        Assert.False(b.TryPop(out _));
        b.Push(next.Head, 7);
        Assert.Equal(11, driver.UsedIdx);
        Assert.Equal((heads[10], 7u), driver.ReadUsedElement(10));
        Assert.False(b.ShouldInterrupt(), "used_event 0x100 is not passed: a restore that forgot what was signalled interrupts anyway");
        Assert.True(b.EnableNotifications());
        Assert.Equal(11, driver.AvailEvent);
    }

    [Fact]
    public void Virtqueue_Restore_RefusesASizeAboveItsMaximum_AndRingsOutsideRam()
    {
        using var memory = GuestMemory.Create([(0, 1UL << 20)]);
        var state = new VirtqueueState(64, true, 0x1000, 0x2000, 0x3000, Virtqueue.NoVector, true, 0, 0, 0, false);
        var e = Assert.Throws<DeviceStateException>(() => new Virtqueue(2, 32).Restore(state, memory, false, false));
        Assert.Contains("queue 2", e.Message);
        Assert.Throws<VirtqueueException>(() => new Virtqueue(0, 64).Restore(state with { UsedRing = 0x10_0000 }, memory, false, false));
        // An inactive queue keeps its configuration only.
        var q = new Virtqueue(0, 64);
        q.Restore(state with { Active = false, UsedRing = 0x10_0000 }, memory, false, false);
        Assert.False(q.IsActive);
        Assert.Equal(0x10_0000UL, q.UsedRing);
    }
}
