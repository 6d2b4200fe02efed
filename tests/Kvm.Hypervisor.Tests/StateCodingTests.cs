using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using Kvm.Hypervisor.State;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// <see cref="StateWriter"/> and <see cref="StateReader"/>: every field kind written and read back,
/// the byte layout each one has, and every refusal naming the record, the field and the offset.
/// </summary>
public class StateCodingTests
{
    [Fact]
    public void EveryFieldKindRoundTrips()
    {
        var msrs = new[] { new KvmMsrEntry { Index = 0x10, Data = 12345 }, new KvmMsrEntry { Index = 0xc000_0080, Data = 0xd01 } };
        var w = new StateWriter()
            .U8(0xab).Bool(true).Bool(false).U16(0xbeef).U32(0xdead_beef).I32(-5).U64(0x0123_4567_89ab_cdef).I64(long.MinValue)
            .Bytes([1, 2, 3]).Bytes([]).String("serial0 ünïcode").String("")
            .Struct(new KvmMpState { MpState = KvmMpState.Halted })
            .Structs<KvmMsrEntry>(msrs).Structs<KvmMsrEntry>([])
            .U32(3).Bytes([9, 9, 9, 9]);
        Assert.Equal(w.Length, w.WrittenSpan.Length);
        Assert.Equal(w.WrittenSpan.ToArray(), w.ToArray());

        var r = new StateReader(w.ToArray(), "test");
        Assert.Equal(w.Length, r.Remaining);
        Assert.Equal(0xab, r.U8("u8"));
        Assert.True(r.Bool("yes"));
        Assert.False(r.Bool("no"));
        Assert.Equal(0xbeef, r.U16("u16"));
        Assert.Equal(0xdead_beefu, r.U32("u32"));
        Assert.Equal(-5, r.I32("i32"));
        Assert.Equal(0x0123_4567_89ab_cdefUL, r.U64("u64"));
        Assert.Equal(long.MinValue, r.I64("i64"));
        Assert.Equal([1, 2, 3], r.Bytes("bytes"));
        Assert.Empty(r.Bytes("empty", maxLength: 0));
        Assert.Equal("serial0 ünïcode", r.String("string"));
        Assert.Equal("", r.String("empty string"));
        Assert.Equal(KvmMpState.Halted, r.Struct<KvmMpState>("mp").MpState);
        Assert.Equal(msrs, r.Structs<KvmMsrEntry>("msrs", 2));
        Assert.Empty(r.Structs<KvmMsrEntry>("no msrs", 0));
        Assert.Equal(3u, r.U32("ranged", 1, 3));
        Assert.Equal([9, 9, 9, 9], r.Bytes("exact", 4, exact: true));
        Assert.Equal(w.Length, r.Position);
        Assert.Equal(0, r.Remaining);
        r.End();
    }

    [Fact]
    public void TheBytesAreLittleEndianWithLengthsInFront()
    {
        var bytes = new StateWriter().U16(0x0102).U32(0x03040506).String("ab").Struct(new KvmMpState { MpState = 7 })
            .Structs<KvmMpState>([new KvmMpState { MpState = 8 }]).ToArray();
        Assert.Equal(Convert.FromHexString("0201" + "06050403" + "02000000" + "6162" + "04000000" + "07000000" + "01000000" + "04000000" + "08000000"), bytes);
    }

    [Fact]
    public void AKernelStructKeepsEveryByte()
    {
        var regs = new KvmRegs { Rax = 1, Rbx = 2, Rcx = 3, Rsp = 0x7000, Rip = 0xfff0, Rflags = 0x202 };
        var sregs = new KvmSregs();
        sregs.Cr0 = 0x8000_0011;
        sregs.Efer = 0x500;
        var w = new StateWriter().Struct(regs).Struct(sregs);
        Assert.Equal(8 + Unsafe.SizeOf<KvmRegs>() + Unsafe.SizeOf<KvmSregs>(), w.Length);
        var r = new StateReader(w.ToArray(), "vcpu0");
        Assert.Equal(regs, r.Struct<KvmRegs>("regs"));
        var back = r.Struct<KvmSregs>("sregs");
        Assert.Equal(0x8000_0011UL, back.Cr0);
        Assert.Equal(0x500UL, back.Efer);
        r.End();
    }

    // ------------------------------------------------------------------ refusals

    private delegate void ReadAction(ref StateReader r);

    /// <summary>Reads <paramref name="bytes"/> with <paramref name="read"/>, which must fail with exactly <paramref name="message"/>.</summary>
    private static void Refused(byte[] bytes, ReadAction read, string message)
    {
        var e = Assert.Throws<StateFormatException>(() =>
        {
            var r = new StateReader(bytes, "serial0");
            read(ref r);
        });
        Assert.Equal(message, e.Message);
    }

    [Fact]
    public void ARecordThatEndsEarlyIsNamed()
    {
        Refused([1, 2], (ref StateReader r) => r.U32("divisor"), "state record 'serial0', field 'divisor' at offset 0: needs 4 bytes but the record has 2 left");
        Refused([1, 2, 3], (ref StateReader r) => { r.U16("a"); r.U16("b"); }, "state record 'serial0', field 'b' at offset 2: needs 2 bytes but the record has 1 left");
        Refused([], (ref StateReader r) => r.U8("lcr"), "state record 'serial0', field 'lcr' at offset 0: needs 1 bytes but the record has 0 left");
        Refused([1, 2, 3, 4, 5, 6, 7], (ref StateReader r) => r.U64("tsc"), "state record 'serial0', field 'tsc' at offset 0: needs 8 bytes but the record has 7 left");
        Refused([1, 2, 3, 4, 5, 6, 7], (ref StateReader r) => r.I64("tsc"), "state record 'serial0', field 'tsc' at offset 0: needs 8 bytes but the record has 7 left");
        Refused([1, 2, 3], (ref StateReader r) => r.I32("n"), "state record 'serial0', field 'n' at offset 0: needs 4 bytes but the record has 3 left");
        // A length that runs past the end.
        Refused([10, 0, 0, 0, 1, 2], (ref StateReader r) => r.Bytes("fifo"), "state record 'serial0', field 'fifo' at offset 4: needs 10 bytes but the record has 2 left");
        Refused([0xff, 0xff, 0xff, 0x7f, 1], (ref StateReader r) => r.Bytes("fifo"), "state record 'serial0', field 'fifo' at offset 4: needs 2147483647 bytes but the record has 1 left");
        Refused([0xff, 0xff, 0xff, 0xff], (ref StateReader r) => r.Bytes("fifo"), "state record 'serial0', field 'fifo' at offset 0: length 4294967295 is more than the 2147483647 bytes allowed");
        Refused([5, 0, 0, 0, (byte)'a'], (ref StateReader r) => r.String("name"), "state record 'serial0', field 'name' at offset 4: needs 5 bytes but the record has 1 left");
    }

    [Fact]
    public void AValueOutOfRangeIsNamedAtItsField()
    {
        Refused([1, 2], (ref StateReader r) => { r.U8("a"); r.Bool("enabled"); }, "state record 'serial0', field 'enabled' at offset 1: value 2 is not a boolean (0 or 1)");
        Refused([9, 0, 0, 0], (ref StateReader r) => r.U32("chip", 1, 5), "state record 'serial0', field 'chip' at offset 0: value 9 is outside 1 to 5");
        Refused([0, 0, 0, 0], (ref StateReader r) => r.U32("chip", 1, 5), "state record 'serial0', field 'chip' at offset 0: value 0 is outside 1 to 5");
        Refused([0, 5, 0, 0, 0, 1, 2, 3, 4, 5], (ref StateReader r) => { r.U8("x"); r.Bytes("fifo", maxLength: 4); }, "state record 'serial0', field 'fifo' at offset 1: length 5 is more than the 4 bytes allowed");
        Refused([3, 0, 0, 0, 1, 2, 3], (ref StateReader r) => r.Bytes("key", 4, exact: true), "state record 'serial0', field 'key' at offset 0: length 3 is not the 4 bytes expected");
        Refused([2, 0, 0, 0, 0xc3, 0x28], (ref StateReader r) => r.String("name"), "state record 'serial0', field 'name' at offset 0: the string is not valid UTF-8");
        var longName = new StateWriter().String(new string('x', 4097)).ToArray();
        Refused(longName, (ref StateReader r) => r.String("name"), "state record 'serial0', field 'name' at offset 0: length 4097 is more than the 4096 bytes allowed");
        Refused(new StateWriter().String("abcdef").ToArray(), (ref StateReader r) => r.String("name", maxLength: 5), "state record 'serial0', field 'name' at offset 0: length 6 is more than the 5 bytes allowed");
    }

    [Fact]
    public void AStructOfAnotherSizeIsNamed()
    {
        var mp = new StateWriter().U8(0).Struct(new KvmMpState()).ToArray();
        mp[1] = 5; // the size: 5, not 4
        Refused(mp, (ref StateReader r) => { r.U8("x"); r.Struct<KvmMpState>("mp_state"); }, "state record 'serial0', field 'mp_state' at offset 1: size 5 is not the 4 bytes of KvmMpState on this host");
        var regs = new StateWriter().Struct(new KvmRegs()).ToArray();
        Refused(regs[..100], (ref StateReader r) => r.Struct<KvmRegs>("regs"), $"state record 'serial0', field 'regs' at offset 4: needs {Unsafe.SizeOf<KvmRegs>()} bytes but the record has 96 left");
        BinaryPrimitives.WriteUInt32LittleEndian(regs, uint.MaxValue);
        Refused(regs, (ref StateReader r) => r.Struct<KvmRegs>("regs"), $"state record 'serial0', field 'regs' at offset 0: size 4294967295 is not the {Unsafe.SizeOf<KvmRegs>()} bytes of KvmRegs on this host");
    }

    [Fact]
    public void AStructArrayWithABadCountOrElementSizeIsNamed()
    {
        var msrs = new StateWriter().Structs<KvmMsrEntry>([new KvmMsrEntry { Index = 1 }, new KvmMsrEntry { Index = 2 }]).ToArray();
        Refused(msrs, (ref StateReader r) => r.Structs<KvmMsrEntry>("msrs", 1), "state record 'serial0', field 'msrs' at offset 0: count 2 is more than the 1 allowed");
        var huge = (byte[])msrs.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(huge, uint.MaxValue);
        Refused(huge, (ref StateReader r) => r.Structs<KvmMsrEntry>("msrs", 4096), "state record 'serial0', field 'msrs' at offset 0: count 4294967295 is more than the 4096 allowed");
        var many = (byte[])msrs.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(many, 4000);
        Refused(many, (ref StateReader r) => r.Structs<KvmMsrEntry>("msrs", 4096), "state record 'serial0', field 'msrs' at offset 8: needs 64000 bytes but the record has 32 left");
        var wide = (byte[])msrs.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(wide.AsSpan(4), 24);
        Refused(wide, (ref StateReader r) => r.Structs<KvmMsrEntry>("msrs", 4096), "state record 'serial0', field 'msrs' at offset 4: element size 24 is not the 16 bytes of KvmMsrEntry on this host");
        Refused(msrs[..6], (ref StateReader r) => r.Structs<KvmMsrEntry>("msrs", 4096), "state record 'serial0', field 'msrs' at offset 4: needs 4 bytes but the record has 2 left");
    }

    [Fact]
    public void BytesLeftAfterTheLastFieldAreNamed()
    {
        Refused([1, 0, 0, 0, 7, 7, 7], (ref StateReader r) => { r.U32("a"); r.End(); }, "state record 'serial0', field '(end)' at offset 4: 3 bytes are left after the last field");
        var ok = new StateReader([1, 0, 0, 0], "x");
        ok.U32("a");
        ok.End();
    }

    [Fact]
    public void ErrorNamesTheCurrentOffset()
    {
        var r = new StateReader([1, 2, 3, 4, 5, 6], "rtc");
        r.U16("a");
        Assert.Equal("state record 'rtc', field 'cmos' at offset 2: bad index", r.Error("cmos", "bad index").Message);
    }

    // ------------------------------------------------------------------ the records of the hypervisor's owners

    [Fact]
    public void VcpuStateRoundTripsThroughItsRecord()
    {
        var state = StateRecordFuzzTests.Vcpu();
        var w = new StateWriter();
        state.Write(w);
        var r = new StateReader(w.ToArray(), "vcpu3");
        var back = VcpuState.Read(ref r);
        r.End();
        Assert.Equal(state.Id, back.Id);
        Assert.Equal(state.TscKhz, back.TscKhz);
        Assert.Equal(state.Regs, back.Regs);
        Assert.Equal(state.Msrs, back.Msrs);
        Assert.Equal(state.MpState, back.MpState);
        Assert.Equal(state.Sregs.Cr4, back.Sregs.Cr4);
        var again = new StateWriter();
        back.Write(again);
        Assert.Equal(w.ToArray(), again.ToArray());
    }

    [Fact]
    public void VmStateRoundTripsThroughItsRecordWithAndWithoutChips()
    {
        foreach (bool chips in new[] { true, false })
        {
            var state = StateRecordFuzzTests.Vm(chips);
            var w = new StateWriter();
            state.Write(w);
            var r = new StateReader(w.ToArray(), "vm");
            var back = VmState.Read(ref r);
            r.End();
            Assert.Equal(chips, back.Ioapic.HasValue);
            Assert.Equal(chips, back.PicMaster.HasValue);
            Assert.Equal(chips, back.Pit.HasValue);
            Assert.Equal(state.Clock.Clock, back.Clock.Clock);
            Assert.Equal(state.Routes.Length, back.Routes.Length);
            var again = new StateWriter();
            back.Write(again);
            Assert.Equal(w.ToArray(), again.ToArray());
        }
    }
}
