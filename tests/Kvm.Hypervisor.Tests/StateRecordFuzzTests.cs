using System.Buffers.Binary;
using System.Diagnostics;
using Kvm.Hypervisor.State;
using Kvm.Interop.Structs;
using Kvm.Tests.Shared;
using Xunit.Abstractions;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// Seeded mutation fuzz of the records of <see cref="VcpuState"/> and <see cref="VmState"/> read
/// through <see cref="StateReader"/>: truncation at every field boundary and at every byte, struct
/// sizes and counts set wrong or huge, booleans out of range, bit flips, inserted and deleted
/// bytes. Each read (followed by <see cref="StateReader.End"/>) must succeed or throw
/// <see cref="StateFormatException"/> naming the record: no other exception, and no more allocated
/// than about the record's own size.
/// </summary>
public class StateRecordFuzzTests(ITestOutputHelper output)
{
    private const int Iterations = 5000;

    private static readonly uint[] Interesting =
    [
        0, 1, 2, 3, 4, 8, 15, 16, 24, 0x7f, 0x80, 0xff, 0x100, 0x400, 0xfff, 0x1000, 0x1001, 0xffff, 0x10000,
        0x7fff_ffff, 0x8000_0000, 0x8000_0001, 0xffff_fff0, 0xffff_fffc, 0xffff_ffff,
    ];

    /// <summary>A vCPU's state with a value in every part.</summary>
    public static unsafe VcpuState Vcpu()
    {
        var sregs = new KvmSregs { Cr0 = 0x8005_0033, Cr3 = 0x1000, Cr4 = 0x6f0, Efer = 0xd01, ApicBase = 0xfee0_0900 };
        var xsave = new KvmXsave();
        for (int i = 0; i < 1024; i++)
            xsave.Region[i] = (uint)(i * 2654435761u);
        var xcrs = new KvmXcrs { NrXcrs = 1 };
        xcrs.XcrWords[1] = 7;
        var lapic = new KvmLapicState();
        lapic.Regs[0x20] = 3;
        return new VcpuState
        {
            Id = 3,
            TscKhz = 2_100_000,
            Regs = new KvmRegs { Rax = 1, Rbx = 2, Rsp = 0x8000, Rip = 0x10_0000, Rflags = 0x202 },
            Sregs = sregs,
            Xsave = xsave,
            Xcrs = xcrs,
            Msrs = [.. Enumerable.Range(0, 40).Select(i => new KvmMsrEntry { Index = (uint)(0xc000_0080 + i), Data = (ulong)i * 0x1111 })],
            Lapic = lapic,
            MpState = new KvmMpState { MpState = KvmMpState.Halted },
            Events = new KvmVcpuEvents { InterruptNr = 0x20, InterruptInjected = 1 },
            Debugregs = new KvmDebugregs { Dr6 = 0xffff0ff0, Dr7 = 0x400 },
        };
    }

    /// <summary>A VM's state, with the in-kernel irqchip and PIT or without.</summary>
    public static unsafe VmState Vm(bool chips)
    {
        KvmIrqchip Chip(uint id)
        {
            var c = new KvmIrqchip { ChipId = id };
            for (int i = 0; i < KvmIrqchip.ChipBytes; i++)
                c.Chip[i] = (byte)(i + id);
            return c;
        }
        return new VmState
        {
            PicMaster = chips ? Chip(KvmIrqchip.PicMaster) : null,
            PicSlave = chips ? Chip(KvmIrqchip.PicSlave) : null,
            Ioapic = chips ? Chip(KvmIrqchip.Ioapic) : null,
            Pit = chips ? new KvmPitState2 { Flags = KvmPitState2.FlagHpetLegacy } : null,
            Clock = new KvmClockData { Clock = 123_456_789, Flags = 2 },
            Routes = [.. Enumerable.Range(0, 24).Select(i => KvmIrqRoutingEntry.Irqchip((uint)i, i < 16 ? 0u : 2u, (uint)i % 8))],
        };
    }

    /// <summary>The field kinds of a record in order, as its Write writes them.</summary>
    private enum F { U32, Bool, Struct, Structs }

    private static readonly F[] VcpuFields = [F.U32, F.U32, F.Struct, F.Struct, F.Struct, F.Struct, F.Structs, F.Struct, F.Struct, F.Struct, F.Struct];
    private static readonly F[] VmChipsFields = [F.Bool, F.Struct, F.Struct, F.Struct, F.Bool, F.Struct, F.Struct, F.Structs];
    private static readonly F[] VmBareFields = [F.Bool, F.Bool, F.Struct, F.Structs];

    public static TheoryData<string> Records => ["vcpu", "vm", "vm-bare"];

    private static (byte[] Bytes, F[] Fields, Func<byte[], object> Read) Seed(string name)
    {
        var w = new StateWriter();
        switch (name)
        {
            case "vcpu":
                Vcpu().Write(w);
                return (w.ToArray(), VcpuFields, b => { var r = new StateReader(b, "vcpu3"); var s = VcpuState.Read(ref r); r.End(); return s; });
            case "vm":
                Vm(true).Write(w);
                return (w.ToArray(), VmChipsFields, b => { var r = new StateReader(b, "vm"); var s = VmState.Read(ref r); r.End(); return s; });
            default:
                Vm(false).Write(w);
                return (w.ToArray(), VmBareFields, b => { var r = new StateReader(b, "vm"); var s = VmState.Read(ref r); r.End(); return s; });
        }
    }

    /// <summary>Where each field starts, and where its length prefixes (struct sizes, counts, element sizes) and booleans lie.</summary>
    private static (List<int> Boundaries, List<int> Prefixes, List<int> Bools) Walk(byte[] bytes, F[] fields)
    {
        var boundaries = new List<int>();
        var prefixes = new List<int>();
        var bools = new List<int>();
        int p = 0;
        foreach (var f in fields)
        {
            boundaries.Add(p);
            switch (f)
            {
                case F.U32:
                    p += 4;
                    break;
                case F.Bool:
                    bools.Add(p);
                    p += 1;
                    break;
                case F.Struct:
                    prefixes.Add(p);
                    p += 4 + (int)BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(p));
                    break;
                case F.Structs:
                    prefixes.Add(p);
                    prefixes.Add(p + 4);
                    boundaries.Add(p + 4);
                    boundaries.Add(p + 8);
                    p += 8 + (int)(BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(p)) * BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(p + 4)));
                    break;
            }
        }
        Assert.Equal(bytes.Length, p);
        boundaries.Add(p);
        return (boundaries, prefixes, bools);
    }

    private enum Outcome { Accepted, Refused }

    private static Outcome ReadOnce(Func<byte[], object> read, byte[] bytes, string name, Dictionary<string, string>? samples = null)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        var cpuBefore = ThreadCpuTime.Now;
        Outcome outcome;
        try
        {
            read(bytes);
            outcome = Outcome.Accepted;
        }
        catch (StateFormatException e)
        {
            Assert.StartsWith("state record '", e.Message, StringComparison.Ordinal);
            Assert.Contains("field '", e.Message, StringComparison.Ordinal);
            Assert.Contains(" at offset ", e.Message, StringComparison.Ordinal);
            if (samples is not null && samples.Count < 30)
                samples.TryAdd(System.Text.RegularExpressions.Regex.Replace(e.Message, @"\d+", "#"), $"{name}: {e.Message}");
            outcome = Outcome.Refused;
        }
        catch (Exception e)
        {
            Assert.Fail($"{name}: {e.GetType().Name}: {e.Message}\nrecord ({bytes.Length} bytes) starts {Convert.ToHexString(bytes.AsSpan(0, Math.Min(bytes.Length, 64)))}\n{e}");
            throw;
        }
        var cpu = ThreadCpuTime.Now - cpuBefore;
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        long bound = 2L * bytes.Length + (64 << 10);
        Assert.True(allocated <= bound, $"{name}: reading a {bytes.Length}-byte record allocated {allocated} bytes (bound {bound})");
        // CPU time, not wall clock: a loaded machine (or the nested host's TCG) may leave the thread waiting for a CPU for seconds.
        Assert.True(cpu < TimeSpan.FromSeconds(1), $"{name}: one read used {cpu.TotalSeconds:0.00} s of CPU");
        return outcome;
    }

    [Theory]
    [MemberData(nameof(Records))]
    public void EveryTruncationIsRefused(string record)
    {
        var (bytes, fields, read) = Seed(record);
        read(bytes);
        for (int cut = 0; cut < bytes.Length; cut++)
            Assert.Equal(Outcome.Refused, ReadOnce(read, bytes[..cut], $"{record} cut at {cut}"));
        // At each field boundary the message names a field, at the boundary or inside the field.
        var (boundaries, _, _) = Walk(bytes, fields);
        foreach (int b in boundaries.Where(b => b < bytes.Length))
        {
            var e = Assert.Throws<StateFormatException>(() => read(bytes[..b]));
            Assert.Contains($"at offset {b}:", e.Message, StringComparison.Ordinal);
        }
    }

    [Theory]
    [MemberData(nameof(Records))]
    public void EveryLengthPrefixSetToEveryBoundaryValueIsRefusedOrRead(string record)
    {
        var (bytes, fields, read) = Seed(record);
        var (_, prefixes, bools) = Walk(bytes, fields);
        int refused = 0;
        foreach (int at in prefixes)
        {
            uint original = BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at));
            foreach (uint v in Interesting.Concat([original - 1, original + 1, (uint)bytes.Length, (uint)bytes.Length / 16]))
            {
                var b = (byte[])bytes.Clone();
                BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), v);
                if (ReadOnce(read, b, $"{record}: prefix@{at}=0x{v:x}") == Outcome.Refused)
                    refused++;
                else
                    Assert.Equal(original, v);
            }
        }
        foreach (int at in bools)
        {
            for (int v = 2; v < 256; v += 37)
            {
                var b = (byte[])bytes.Clone();
                b[at] = (byte)v;
                var e = Assert.Throws<StateFormatException>(() => read(b));
                Assert.Contains($"at offset {at}: value {v} is not a boolean", e.Message, StringComparison.Ordinal);
            }
        }
        Assert.True(refused > 0);
    }

    [Theory]
    [MemberData(nameof(Records))]
    public void MutatedRecordsOnlyEverThrowStateFormatException(string record)
    {
        var (bytes, fields, read) = Seed(record);
        var (boundaries, prefixes, bools) = Walk(bytes, fields);
        var counts = new Dictionary<Outcome, int>();
        var samples = new Dictionary<string, string>();
        int stable = record.Aggregate(0x57a7e, (h, c) => unchecked(h * 31 + c)) & 0x7fff_ffff;
        for (int i = 0; i < Iterations; i++)
        {
            var rng = new Random(unchecked(stable * 31 + i * 7919));
            var b = (byte[])bytes.Clone();
            var what = new List<string>();
            for (int m = rng.Next(1, 4); m > 0; m--)
            {
                switch (rng.Next(9))
                {
                    case 0:
                        if (b.Length > 0)
                        {
                            int at = rng.Next(b.Length);
                            b[at] ^= (byte)(1 << rng.Next(8));
                            what.Add($"flip@{at}");
                        }
                        break;
                    case 1:
                    {
                        int at = Math.Clamp(boundaries[rng.Next(boundaries.Count)] + rng.Next(-3, 4), 0, b.Length);
                        b = b[..at];
                        what.Add($"cut@{at}");
                        break;
                    }
                    case 2:
                    {
                        int at = rng.Next(b.Length + 1);
                        b = b[..at];
                        what.Add($"cut@{at}");
                        break;
                    }
                    case 3:
                    case 4:
                    case 5:
                    {
                        int at = prefixes[rng.Next(prefixes.Count)];
                        if (at + 4 > b.Length)
                            break;
                        uint v = rng.Next(3) == 0
                            ? BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(at)) + (uint)rng.Next(-4, 5)
                            : Interesting[rng.Next(Interesting.Length)];
                        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), v);
                        what.Add($"prefix@{at}=0x{v:x}");
                        break;
                    }
                    case 6:
                        if (bools.Count > 0)
                        {
                            int at = bools[rng.Next(bools.Count)];
                            if (at < b.Length)
                            {
                                b[at] = (byte)rng.Next(256);
                                what.Add($"bool@{at}={b[at]}");
                            }
                        }
                        break;
                    case 7:
                    {
                        int at = Math.Min(boundaries[rng.Next(boundaries.Count)], b.Length);
                        var extra = new byte[rng.Next(1, 24)];
                        rng.NextBytes(extra);
                        b = [.. b[..at], .. extra, .. b[at..]];
                        what.Add($"insert{extra.Length}@{at}");
                        break;
                    }
                    default:
                        if (b.Length > 0)
                        {
                            int at = rng.Next(b.Length);
                            int n = Math.Min(rng.Next(1, 24), b.Length - at);
                            b = [.. b[..at], .. b[(at + n)..]];
                            what.Add($"delete{n}@{at}");
                        }
                        break;
                }
            }
            var outcome = ReadOnce(read, b, $"{record}:{i} ({string.Join(' ', what)})", samples);
            counts[outcome] = counts.GetValueOrDefault(outcome) + 1;
        }
        output.WriteLine($"{record}: {string.Join(", ", counts.Select(c => $"{c.Key} {c.Value}"))}");
        foreach (var s in samples.Values)
            output.WriteLine(s);
        Assert.True(counts.GetValueOrDefault(Outcome.Refused) > Iterations / 2);
        Assert.True(counts.GetValueOrDefault(Outcome.Accepted) > 0, "no mutation was accepted (bit flips inside a struct should be)");
    }
}
