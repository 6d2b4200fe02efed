using System.Text;
using Kvm.Devices.Bus;
using Kvm.Devices.Legacy.Serial;
using static Kvm.Devices.Legacy.Serial.Serial16550;

namespace Kvm.Devices.Tests;

public class Serial16550Tests
{
    private readonly List<byte> _output = [];
    private readonly RecordingInterruptLine _irq = new();
    private readonly Serial16550 _uart;

    public Serial16550Tests()
    {
        _uart = new Serial16550(bytes => _output.AddRange(bytes.ToArray()), _irq);
    }

    private byte R(int reg)
    {
        var b = new byte[] { 0xee };
        _uart.Read((ulong)reg, b, 0);
        return b[0];
    }

    private void W(int reg, byte value) => _uart.Write((ulong)reg, [value], 0);

    private string Output => Encoding.ASCII.GetString(_output.ToArray());

    [Fact]
    public void ThrWriteGoesToTheOutput()
    {
        foreach (char c in "hi\n")
            W(Thr, (byte)c);

        Assert.Equal("hi\n", Output);
        Assert.Equal(3, _uart.BytesTransmitted);
    }

    [Fact]
    public void ThrWriteThroughTheBusGoesToTheOutput()
    {
        var bus = new IoBus("pio");
        bus.Register(Com1Port, RegisterCount, _uart);

        Assert.True(bus.Write(Com1Port, [(byte)'Z'], 0));
        var lsr = new byte[1];
        Assert.True(bus.Read(Com1Port + Lsr, lsr, 0));

        Assert.Equal("Z", Output);
        Assert.Equal(LsrThre | LsrTemt, lsr[0]);
    }

    [Fact]
    public void DlabSwitchesOffsetsZeroAndOneToTheDivisorLatchAndBack()
    {
        W(Ier, IerRda);
        W(Lcr, LcrDlab | 0x03);
        W(Dll, 0x01);
        W(Dlm, 0x02);
        Assert.Equal(0x01, R(Dll));
        Assert.Equal(0x02, R(Dlm));
        Assert.Empty(_output); // a divisor write is not a transmitted byte

        W(Lcr, 0x03);
        Assert.Equal(IerRda, R(Ier)); // IER kept its value while DLAB was set
        W(Thr, (byte)'A');
        Assert.Equal("A", Output);

        // The divisor survives: set DLAB again and read it back.
        W(Lcr, LcrDlab | 0x03);
        Assert.Equal(0x01, R(Dll));
        Assert.Equal(0x02, R(Dlm));
    }

    [Fact]
    public void DlabSetHidesTheReceiveBuffer()
    {
        Assert.Equal(1, _uart.EnqueueInput([0x42]));
        W(Lcr, LcrDlab);
        W(Dll, 0x07);
        Assert.Equal(0x07, R(Dll));
        Assert.Equal(LsrDr, R(Lsr) & LsrDr); // the byte was not consumed by the divisor read
        W(Lcr, 0);
        Assert.Equal(0x42, R(Rbr));
    }

    [Fact]
    public void LsrReportsTransmitterEmptyAndDataReadyOnlyWithInput()
    {
        Assert.Equal(LsrThre | LsrTemt, R(Lsr));

        _uart.EnqueueInput("x"u8);
        Assert.Equal(LsrThre | LsrTemt | LsrDr, R(Lsr));

        Assert.Equal((byte)'x', R(Rbr));
        Assert.Equal(LsrThre | LsrTemt, R(Lsr));

        W(Thr, (byte)'y'); // transmission is instant: THR is empty again at once
        Assert.Equal(LsrThre | LsrTemt, R(Lsr));
    }

    [Fact]
    public void InputIsReadInFifoOrder()
    {
        Assert.Equal(3, _uart.EnqueueInput("abc"u8));
        Assert.Equal(2, _uart.EnqueueInput("de"u8));

        var got = new List<byte>();
        while ((R(Lsr) & LsrDr) != 0)
            got.Add(R(Rbr));

        Assert.Equal("abcde", Encoding.ASCII.GetString(got.ToArray()));
    }

    [Fact]
    public void ReceiveFifoHoldsSixteenBytes()
    {
        var input = Enumerable.Range(1, 20).Select(i => (byte)i).ToArray();

        Assert.Equal(FifoSize, _uart.EnqueueInput(input));
        Assert.Equal(0, _uart.InputSpace);
        Assert.Equal(0, _uart.EnqueueInput([99]));

        Assert.Equal(1, R(Rbr));
        Assert.Equal(2, R(Rbr));
        Assert.Equal(2, _uart.InputSpace);
        Assert.Equal(2, _uart.EnqueueInput([17, 18, 19]));

        var rest = new List<byte>();
        while ((R(Lsr) & LsrDr) != 0)
            rest.Add(R(Rbr));
        Assert.Equal(Enumerable.Range(3, 16).Select(i => (byte)i), rest);
        Assert.Equal(FifoSize, _uart.InputSpace);
    }

    [Fact]
    public void IirWithNothingEnabledReportsNoInterrupt()
    {
        _uart.EnqueueInput("a"u8);
        W(Thr, (byte)'b');
        Assert.Equal(IirNoInterrupt, R(Iir));
    }

    [Fact]
    public void IirGivesReceivedDataPriorityOverThre()
    {
        _uart.EnqueueInput("ab"u8);
        W(Ier, IerRda | IerThre);

        Assert.Equal(IirRda, R(Iir));
        Assert.Equal(IirRda, R(Iir)); // still pending: reading IIR does not clear RDA
        Assert.Equal((byte)'a', R(Rbr));
        Assert.Equal(IirRda, R(Iir));
        Assert.Equal((byte)'b', R(Rbr));

        // With the FIFO drained the THRE interrupt shows, and reading IIR clears it.
        Assert.Equal(IirThre, R(Iir));
        Assert.Equal(IirNoInterrupt, R(Iir));
    }

    [Fact]
    public void ReadingIirClearsAThreInterruptUntilTheNextWrite()
    {
        W(Ier, IerThre);
        Assert.Equal(IirThre, R(Iir));
        Assert.Equal(IirNoInterrupt, R(Iir));

        W(Thr, (byte)'x');
        Assert.Equal(IirThre, R(Iir));
        Assert.Equal(IirNoInterrupt, R(Iir));
    }

    [Fact]
    public void IirShowsFifoBitsOnceTheFifoIsEnabled()
    {
        Assert.Equal(0, R(Iir) & 0xc0);

        W(Fcr, FcrEnable);
        Assert.Equal(IirFifoEnabled | IirNoInterrupt, R(Iir));

        W(Ier, IerThre);
        Assert.Equal(IirFifoEnabled | IirThre, R(Iir));

        W(Fcr, 0);
        Assert.Equal(IirNoInterrupt, R(Iir));
    }

    [Fact]
    public void FcrClearRxEmptiesTheReceiveFifo()
    {
        _uart.EnqueueInput("abc"u8);
        W(Fcr, FcrEnable | FcrClearRx);

        Assert.Equal(0, R(Lsr) & LsrDr);
        Assert.Equal(FifoSize, _uart.InputSpace);

        _uart.EnqueueInput("z"u8);
        Assert.Equal((byte)'z', R(Rbr));
    }

    [Fact]
    public void ReceiveInterruptIsRaisedWhenDataArrivesAndLoweredWhenItIsRead()
    {
        W(Ier, IerRda);
        Assert.False(_irq.Level); // nothing to report yet

        _uart.EnqueueInput("ab"u8);
        Assert.Equal([true], _irq.Levels);

        R(Rbr);
        Assert.True(_irq.Level); // one byte left
        R(Rbr);
        Assert.Equal([true, false], _irq.Levels);
    }

    [Fact]
    public void ReceiveInterruptIsRaisedWhenEnabledWithDataAlreadyQueued()
    {
        _uart.EnqueueInput("a"u8);
        Assert.False(_irq.Level); // IER is zero

        W(Ier, IerRda);
        Assert.True(_irq.Level);

        W(Ier, 0);
        Assert.False(_irq.Level);
    }

    [Fact]
    public void ThreInterruptIsRaisedWhenEnabledAndLoweredByReadingIir()
    {
        W(Ier, IerThre);
        Assert.Equal([true], _irq.Levels);

        Assert.Equal(IirThre, R(Iir));
        Assert.Equal([true, false], _irq.Levels);

        W(Thr, (byte)'q');
        Assert.Equal([true, false, true], _irq.Levels);

        W(Ier, 0);
        Assert.False(_irq.Level);
    }

    [Fact]
    public void FcrClearRxLowersTheReceiveInterrupt()
    {
        W(Ier, IerRda);
        _uart.EnqueueInput("abc"u8);
        Assert.True(_irq.Level);

        W(Fcr, FcrEnable | FcrClearRx);
        Assert.False(_irq.Level);
    }

    [Fact]
    public void OutsideLoopbackMsrShowsAConnectedTerminal()
    {
        Assert.Equal(MsrDcd | MsrDsr | MsrCts, R(Msr));
        W(Mcr, McrDtr | McrRts | McrOut2);
        Assert.Equal(MsrDcd | MsrDsr | MsrCts, R(Msr));
    }

    [Fact]
    public void LoopbackSendsThrToTheReceiverInsteadOfTheOutput()
    {
        W(Mcr, McrLoop);
        W(Thr, (byte)'L');
        W(Thr, (byte)'B');

        Assert.Empty(_output);
        Assert.Equal(0, _uart.BytesTransmitted);
        Assert.Equal(LsrDr, R(Lsr) & LsrDr);
        Assert.Equal((byte)'L', R(Rbr));
        Assert.Equal((byte)'B', R(Rbr));
        Assert.Equal(0, R(Lsr) & LsrDr);

        // Back out of loopback, THR reaches the output again.
        W(Mcr, 0);
        W(Thr, (byte)'o');
        Assert.Equal("o", Output);
    }

    [Fact]
    public void LoopbackIgnoresHostInput()
    {
        W(Mcr, McrLoop);
        Assert.Equal(0, _uart.EnqueueInput("x"u8));
        Assert.Equal(0, R(Lsr) & LsrDr);
    }

    [Fact]
    public void LoopbackOverflowSetsOverrunUntilLsrIsRead()
    {
        W(Mcr, McrLoop);
        for (int i = 0; i < FifoSize + 1; i++)
            W(Thr, (byte)i);

        Assert.Equal(LsrOe | LsrDr, R(Lsr) & (LsrOe | LsrDr));
        Assert.Equal(0, R(Lsr) & LsrOe);
        for (int i = 0; i < FifoSize; i++)
            Assert.Equal((byte)i, R(Rbr));
        Assert.Equal(0, R(Lsr) & LsrDr);
    }

    [Theory]
    [InlineData(McrRts, MsrCts)]
    [InlineData(McrDtr, MsrDsr)]
    [InlineData(McrOut1, MsrRi)]
    [InlineData(McrOut2, MsrDcd)]
    [InlineData(McrRts | McrDtr | McrOut1 | McrOut2, MsrCts | MsrDsr | MsrRi | MsrDcd)]
    [InlineData(0, 0)]
    public void LoopbackMsrReflectsMcr(int mcr, int expectedStatus)
    {
        W(Mcr, (byte)(McrLoop | mcr));
        Assert.Equal(expectedStatus, R(Msr) & 0xf0);
    }

    [Fact]
    public void LoopbackMsrReportsDeltaBitsOncePerChange()
    {
        // Entering loopback with all modem outputs off drops DCD, DSR and CTS.
        W(Mcr, McrLoop);
        Assert.Equal(MsrDdcd | MsrDdsr | MsrDcts, R(Msr));
        Assert.Equal(0, R(Msr)); // deltas clear on read

        W(Mcr, McrLoop | McrRts);
        Assert.Equal(MsrCts | MsrDcts, R(Msr));
        Assert.Equal(MsrCts, R(Msr));

        W(Mcr, McrLoop | McrRts | McrDtr);
        Assert.Equal(MsrCts | MsrDsr | MsrDdsr, R(Msr));

        W(Mcr, McrLoop | McrRts | McrDtr | McrOut2);
        Assert.Equal(MsrCts | MsrDsr | MsrDcd | MsrDdcd, R(Msr));

        // RI rising sets no delta; RI falling sets TERI (trailing edge).
        W(Mcr, McrLoop | McrRts | McrDtr | McrOut2 | McrOut1);
        Assert.Equal(MsrCts | MsrDsr | MsrDcd | MsrRi, R(Msr));
        W(Mcr, McrLoop | McrRts | McrDtr | McrOut2);
        Assert.Equal(MsrCts | MsrDsr | MsrDcd | MsrTeri, R(Msr));
        Assert.Equal(MsrCts | MsrDsr | MsrDcd, R(Msr));
    }

    [Fact]
    public void ModemStatusInterruptFollowsDeltaBits()
    {
        W(Ier, IerMs);
        Assert.False(_irq.Level);

        W(Mcr, McrLoop | McrRts); // CTS, DSR, DCD change on entering loopback
        Assert.True(_irq.Level);
        Assert.Equal(IirMs, R(Iir));

        R(Msr);
        Assert.False(_irq.Level);
        Assert.Equal(IirNoInterrupt, R(Iir));
    }

    [Fact]
    public void ScratchRegisterHoldsWhatIsWritten()
    {
        W(Scr, 0xa5);
        Assert.Equal(0xa5, R(Scr));
        W(Scr, 0x5a);
        Assert.Equal(0x5a, R(Scr));
        Assert.Empty(_output);
    }

    [Fact]
    public void LinuxStyleProbeFindsA16550A()
    {
        // As drivers/tty/serial/8250/8250_port.c autoconfig() does.
        // IER test: writable low nibble.
        byte savedIer = R(Ier);
        W(Ier, 0);
        byte scratch2 = (byte)(R(Ier) & 0x0f);
        W(Ier, 0x0f);
        byte scratch3 = (byte)(R(Ier) & 0x0f);
        W(Ier, savedIer);
        Assert.Equal(0, scratch2);
        Assert.Equal(0x0f, scratch3);

        // Scratch register test (the 8250-vs-16450 check).
        W(Scr, 0xa5);
        byte s1 = R(Scr);
        W(Scr, 0x5a);
        byte s2 = R(Scr);
        Assert.Equal(0xa5, s1);
        Assert.Equal(0x5a, s2);

        // Loopback test: MCR = LOOP | OUT2 | RTS must show DCD | CTS in MSR.
        byte savedMcr = R(Mcr);
        W(Mcr, McrLoop | 0x0a);
        byte status1 = (byte)(R(Msr) & 0xf0);
        W(Mcr, savedMcr);
        Assert.Equal(0x90, status1);

        // EFR probe: LCR = 0xBF, write 0 to offset 2 (EFR on a 16650; FCR here).
        W(Lcr, 0xbf);
        W(2, 0);

        // FIFO test: IIR bits 7:6 = 3 means a 16550A.
        W(Lcr, 0);
        W(Fcr, FcrEnable);
        Assert.Equal(3, R(Iir) >> 6);

        // No byte reached the outside during the probe.
        Assert.Empty(_output);
    }

    [Fact]
    public void LinuxStyleFifoSizeProbeCountsSixteenBytes()
    {
        // As 8250 size_fifo(): in loopback, send 256 bytes and count what comes back.
        W(Fcr, FcrEnable | FcrClearRx | FcrClearTx);
        W(Mcr, McrLoop);
        for (int i = 0; i < 256; i++)
            W(Thr, (byte)i);
        int count = 0;
        while ((R(Lsr) & LsrDr) != 0 && count < 512)
        {
            R(Rbr);
            count++;
        }
        W(Mcr, 0);

        Assert.Equal(FifoSize, count);
        Assert.Empty(_output);
    }

    [Fact]
    public void LinuxStartupThreTestsSeeTheInterruptEachTimeThriIsEnabled()
    {
        // As serial8250_do_startup(): the UART_BUG_THRE and UART_BUG_TXEN checks.
        W(Ier, IerThre);
        byte iir1 = R(Iir);
        W(Ier, 0);
        W(Ier, IerThre);
        byte iir = R(Iir);
        W(Ier, 0);
        Assert.Equal(0, iir1 & IirNoInterrupt);
        Assert.Equal(0, iir & IirNoInterrupt);

        W(Ier, IerThre);
        byte lsr = R(Lsr);
        iir = R(Iir);
        W(Ier, 0);
        Assert.False((lsr & LsrTemt) != 0 && (iir & IirNoInterrupt) != 0, "THRE interrupt missing after enabling THRI (UART_BUG_TXEN)");
        Assert.False(_irq.Level);
    }

    [Fact]
    public void WorksWithoutAnInterruptLine()
    {
        var output = new List<byte>();
        var polled = new Serial16550(b => output.AddRange(b.ToArray()));
        polled.Write(Ier, [IerRda | IerThre], 0);
        polled.EnqueueInput("k"u8);
        var data = new byte[1];
        polled.Read(Iir, data, 0);
        Assert.Equal(IirRda, data[0]);
        polled.Read(Rbr, data, 0);
        Assert.Equal((byte)'k', data[0]);
        polled.Write(Thr, [(byte)'p'], 0);
        Assert.Equal([(byte)'p'], output);
    }
}
