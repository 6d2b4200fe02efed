using System.Buffers.Binary;
using Kvm.Devices.Pci;

namespace Kvm.Devices.Tests;

/// <summary>The MSI-X table and pending-bit array (PCI Local Bus 3.0, 6.8.2), on recorded vectors.</summary>
public sealed class MsixTableTests
{
    private readonly RecordingMsiController _msi = new();

    private static void W32(MsixTable t, ulong offset, uint value)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        t.WriteTable(offset, b);
    }

    private static uint R32(MsixTable t, ulong offset)
    {
        var b = new byte[4];
        t.ReadTable(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static void Program(MsixTable t, int vector, ulong address, uint data, bool masked)
    {
        ulong e = (ulong)vector * MsixTable.EntrySize;
        W32(t, e, (uint)address);
        W32(t, e + 4, (uint)(address >> 32));
        W32(t, e + 8, data);
        W32(t, e + 12, masked ? 1u : 0u);
    }

    private static ulong Pba(MsixTable t, int qword)
    {
        var b = new byte[8];
        t.ReadPba((ulong)qword * 8, b);
        return BinaryPrimitives.ReadUInt64LittleEndian(b);
    }

    [Fact]
    public void Entries_StartMaskedAndZero_AndEachVectorIsCreated()
    {
        using var t = new MsixTable(4, _msi);
        Assert.Equal(4, _msi.Vectors.Count);
        Assert.Equal(64UL, t.TableSize);
        Assert.Equal(8UL, t.PbaSize);
        Assert.False(t.Enabled);
        for (int v = 0; v < 4; v++)
        {
            Assert.True(t.IsMasked(v));
            Assert.Equal(0u, R32(t, (ulong)v * 16));
            Assert.Equal(0u, R32(t, (ulong)v * 16 + 8));
            Assert.Equal(1u, R32(t, (ulong)v * 16 + 12));
        }
    }

    [Fact]
    public void Signal_WhileMsixIsDisabled_IsRefused_SoTheCallerUsesIntx()
    {
        using var t = new MsixTable(2, _msi);
        Program(t, 0, 0xfee0_0000, 0x31, masked: false);
        Assert.False(t.Signal(0));
        Assert.False(t.IsPending(0));
        Assert.Equal(0, _msi.TotalTriggers);
        t.SetControl(enabled: true, functionMasked: false);
        Assert.False(t.Signal(2));       // no such vector
        Assert.False(t.Signal(-1));
        Assert.True(t.Signal(0));
        Assert.Equal(1, _msi[0].Triggers);
    }

    [Fact]
    public void UnmaskedVector_SendsTheProgrammedMessage()
    {
        using var t = new MsixTable(3, _msi);
        t.SetControl(true, false);
        Program(t, 2, 0x1_fee0_2000, 0x4142, masked: false);
        Assert.True(t.Signal(2));
        Assert.Equal([(0x1_fee0_2000UL, 0x4142u)], _msi[2].Sent);
        Assert.Equal(0, _msi[0].Triggers + _msi[1].Triggers);
    }

    [Fact]
    public void MaskedVector_BecomesPending_AndIsSentOnceOnUnmask()
    {
        using var t = new MsixTable(2, _msi);
        t.SetControl(true, false);
        Program(t, 1, 0xfee0_1000, 0x77, masked: true);
        Assert.True(t.Signal(1));
        Assert.True(t.Signal(1));                    // signals while masked coalesce into one pending bit
        Assert.True(t.IsPending(1));
        Assert.Equal(2UL, Pba(t, 0));
        Assert.Equal(0, _msi[1].Triggers);

        W32(t, 16 + 12, 0);                          // unmask
        Assert.Equal([(0xfee0_1000UL, 0x77u)], _msi[1].Sent);
        Assert.False(t.IsPending(1));
        Assert.Equal(0UL, Pba(t, 0));

        W32(t, 16 + 12, 1);                          // mask, unmask again: nothing pending, nothing sent
        W32(t, 16 + 12, 0);
        Assert.Equal(1, _msi[1].Triggers);
    }

    [Fact]
    public void FunctionMask_HoldsEveryVectorPending_UntilCleared()
    {
        using var t = new MsixTable(3, _msi);
        Program(t, 0, 0xfee0_0000, 1, masked: false);
        Program(t, 2, 0xfee0_0000, 3, masked: false);
        t.SetControl(enabled: true, functionMasked: true);
        Assert.True(t.Signal(0));
        Assert.True(t.Signal(2));
        Assert.Equal(0b101UL, Pba(t, 0));
        Assert.Equal(0, _msi.TotalTriggers);
        // Unmasking an entry while the function is masked delivers nothing.
        W32(t, 2 * 16 + 12, 0);
        Assert.Equal(0, _msi.TotalTriggers);

        t.SetControl(enabled: true, functionMasked: false);
        Assert.Equal([(0xfee0_0000UL, 1u)], _msi[0].Sent);
        Assert.Equal([(0xfee0_0000UL, 3u)], _msi[2].Sent);
        Assert.Equal(0UL, Pba(t, 0));
    }

    [Fact]
    public void Unmasking_GivesTheProgrammedMessageToTheVector_BeforeAnyInterrupt()
    {
        using var t = new MsixTable(2, _msi);
        t.SetControl(true, false);
        Program(t, 1, 0xfee0_3000, 0x99, masked: true);
        Assert.Empty(_msi[1].MessagesSet);          // a masked entry's message is not in use yet
        W32(t, 16 + 12, 0);
        Assert.Equal((0xfee0_3000UL, 0x99u), _msi[1].MessagesSet[^1]);
        Assert.Equal(0, _msi[1].Triggers);

        // A changed message on an unmasked entry reaches the vector too.
        W32(t, 16 + 8, 0x9a);
        Assert.Equal((0xfee0_3000UL, 0x9au), _msi[1].MessagesSet[^1]);
        Assert.Equal((0xfee0_3000UL, 0x9au), t.GetMessage(1));
        t.Signal(1);
        Assert.Equal((0xfee0_3000UL, 0x9au), _msi[1].Sent[^1]);
    }

    [Fact]
    public void OddWidthOrMisalignedAccesses_AreIgnored_AndReadAsZero()
    {
        using var t = new MsixTable(2, _msi);
        Program(t, 0, 0xfee0_0000, 0x1234_5678, masked: true);
        t.WriteTable(8, [0xff]);                     // byte
        t.WriteTable(8, [0xff, 0xff]);               // word
        t.WriteTable(10, [0xff, 0xff, 0xff, 0xff]);  // misaligned dword
        t.WriteTable(4, new byte[8]);                // misaligned qword
        t.WriteTable(12, [0, 0]);                    // word write to vector control: no unmask
        t.WriteTable(32, [1, 2, 3, 4]);              // beyond the table
        Assert.Equal(0x1234_5678u, R32(t, 8));
        Assert.Equal(0xfee0_0000u, R32(t, 0));
        Assert.True(t.IsMasked(0));

        var b = new byte[2];
        b.AsSpan().Fill(0xee);
        t.ReadTable(8, b);
        Assert.Equal([0, 0], b);
        var d = new byte[4];
        d.AsSpan().Fill(0xee);
        t.ReadTable(9, d);
        Assert.Equal([0, 0, 0, 0], d);
        t.ReadTable(32, d);
        Assert.Equal([0, 0, 0, 0], d);
    }

    [Fact]
    public void QwordAccesses_CoverTwoDwords()
    {
        using var t = new MsixTable(2, _msi);
        var q = new byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(q, 0x0000_0001_fee0_4000);
        t.WriteTable(16, q);
        BinaryPrimitives.WriteUInt64LittleEndian(q, 0x0000_0000_0000_00ab);   // data 0xab, control 0: unmasked
        t.WriteTable(24, q);
        Assert.Equal((0x1_fee0_4000UL, 0xabu), t.GetMessage(1));
        Assert.False(t.IsMasked(1));
        var back = new byte[8];
        t.ReadTable(16, back);
        Assert.Equal(0x0000_0001_fee0_4000UL, BinaryPrimitives.ReadUInt64LittleEndian(back));
    }

    [Fact]
    public void Pba_HasABitPerVector_ReadableAsDwordsOrQwords_AndIgnoresWrites()
    {
        using var t = new MsixTable(70, _msi);
        Assert.Equal(16UL, t.PbaSize);
        t.SetControl(true, false);
        foreach (int v in new[] { 0, 33, 63, 64, 69 })
            Assert.True(t.Signal(v));                // all masked: all pending
        Assert.Equal(1UL | 1UL << 33 | 1UL << 63, Pba(t, 0));
        Assert.Equal(1UL | 1UL << 5, Pba(t, 1));
        var d = new byte[4];
        t.ReadPba(4, d);
        Assert.Equal(1u << 1 | 1u << 31, BinaryPrimitives.ReadUInt32LittleEndian(d));
        t.ReadPba(8, d);
        Assert.Equal(1u | 1u << 5, BinaryPrimitives.ReadUInt32LittleEndian(d));
        t.ReadPba(2, d);                              // misaligned
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(d));
        Assert.True(t.IsPending(64));
        Assert.False(t.IsPending(65));
        Assert.False(t.IsPending(70));
    }

    [Fact]
    public void Reset_MasksEverything_ClearsPendingBits_AndDisables()
    {
        using var t = new MsixTable(2, _msi);
        t.SetControl(true, false);
        Program(t, 0, 0xfee0_0000, 5, masked: false);
        Program(t, 1, 0xfee0_0000, 6, masked: true);
        t.Signal(1);
        t.Reset();
        Assert.False(t.Enabled);
        Assert.True(t.IsMasked(0));
        Assert.False(t.IsPending(1));
        Assert.Equal((0UL, 0u), t.GetMessage(0));
        t.SetControl(true, false);
        W32(t, 16 + 12, 0);
        Assert.Equal(0, _msi[1].Triggers);           // the pending bit did not survive the reset
    }

    [Fact]
    public void Dispose_DisposesEveryVector()
    {
        var t = new MsixTable(3, _msi);
        t.Dispose();
        Assert.All(_msi.Vectors, v => Assert.True(v.Disposed));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(2049)]
    public void VectorCount_OutsideOneTo2048_IsRefused(int count) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => new MsixTable(count, _msi));

    [Fact]
    public void ConcurrentSignalsAndMaskToggles_LoseNoInterrupt()
    {
        // Every signal is either sent at once or left pending and sent on unmask: after the last
        // unmask nothing is pending, and at least one message went out after the last signal.
        using var t = new MsixTable(1, _msi);
        t.SetControl(true, false);
        Program(t, 0, 0xfee0_0000, 1, masked: false);
        var stop = false;
        var signaller = new Thread(() =>
        {
            for (int i = 0; i < 20000; i++)
                t.Signal(0);
            Volatile.Write(ref stop, true);
        });
        signaller.Start();
        while (!Volatile.Read(ref stop))
        {
            W32(t, 12, 1);
            W32(t, 12, 0);
        }
        signaller.Join();
        W32(t, 12, 0);
        Assert.False(t.IsPending(0));
        Assert.True(_msi[0].Triggers >= 1);
    }
}
