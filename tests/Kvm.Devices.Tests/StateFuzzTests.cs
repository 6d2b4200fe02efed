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
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Xunit.Abstractions;
using static Kvm.Devices.Virtio.Block.VirtioBlock;

namespace Kvm.Devices.Tests;

/// <summary>
/// Seeded fuzzing of every device kind's state record: a record saved from a device in a
/// non-trivial state is mutated (bit flips, bytes set to edge values, truncation, appended bytes,
/// lengths and counts made huge) and restored into a fresh device, as the device manager does. The
/// restore must end normally or with <see cref="StateFormatException"/> or
/// <see cref="DeviceStateException"/>; a device that accepted the record must then stand a
/// guest's register accesses. Set KVM_FUZZ_SEED to replay a seed; failures name the seed, the
/// kind and the iteration.
/// </summary>
public sealed class StateFuzzTests(ITestOutputHelper output)
{
    private const int Iterations = 3000;

    private static int Seed => int.TryParse(Environment.GetEnvironmentVariable("KVM_FUZZ_SEED"), out int s) ? s : 20261203;

    /// <summary>One mutation of <paramref name="payload"/>; <paramref name="what"/> says which, for the failure message.</summary>
    private static byte[] Mutate(Random rng, byte[] payload, out string what)
    {
        var b = payload.ToList();
        int kind = rng.Next(9);
        var prefixes = LengthPrefixes(b);
        if ((kind is 0 or 1 && b.Count == 0) || (kind == 4 && b.Count < 4) || (kind == 5 && b.Count < 8) ||
            (kind is 7 or 8 && prefixes.Count == 0))
            kind = 3;
        switch (kind)
        {
            case 0:
            {
                int flips = rng.Next(1, 5);
                var at = new List<string>();
                for (int i = 0; i < flips; i++)
                {
                    int pos = rng.Next(b.Count), bit = rng.Next(8);
                    b[pos] ^= (byte)(1 << bit);
                    at.Add($"{pos}.{bit}");
                }
                what = $"bit flips at {string.Join(",", at)}";
                break;
            }
            case 1:
            {
                int pos = rng.Next(b.Count);
                byte v = new byte[] { 0, 1, 2, 0x7f, 0x80, 0xfe, 0xff }[rng.Next(7)];
                b[pos] = v;
                what = $"byte {pos} = 0x{v:x2}";
                break;
            }
            case 2:
            {
                int keep = rng.Next(b.Count + 1);
                b.RemoveRange(keep, b.Count - keep);
                what = $"truncated to {keep}";
                break;
            }
            case 3:
            {
                int n = rng.Next(1, 9);
                for (int i = 0; i < n; i++)
                    b.Add((byte)rng.Next(256));
                what = $"{n} bytes appended";
                break;
            }
            case 7:
            {
                // An array longer than its owner expects, whole: the length grows and the bytes are there.
                int pos = prefixes[rng.Next(prefixes.Count)];
                uint len = BinaryPrimitives.ReadUInt32LittleEndian(b.GetRange(pos, 4).ToArray());
                int more = rng.Next(1, 9);
                var span = new byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(span, len + (uint)more);
                b.RemoveRange(pos, 4);
                b.InsertRange(pos, span);
                b.InsertRange(pos + 4 + (int)len, Enumerable.Range(0, more).Select(_ => (byte)rng.Next(256)));
                what = $"length at {pos} grown by {more}, with the bytes";
                break;
            }
            case 8:
            {
                // An array shorter than its owner expects, whole.
                int pos = prefixes[rng.Next(prefixes.Count)];
                uint len = BinaryPrimitives.ReadUInt32LittleEndian(b.GetRange(pos, 4).ToArray());
                int less = rng.Next(1, (int)Math.Min(len, 8) + 1);
                var span = new byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(span, len - (uint)less);
                b.RemoveRange(pos, 4);
                b.InsertRange(pos, span);
                b.RemoveRange(pos + 4, less);
                what = $"length at {pos} shrunk by {less}, with the bytes";
                break;
            }
            case 4:
            {
                // A length or count made huge, negative as an int, or just past what fits; half the
                // time at a place that holds a plausible length already.
                int pos = prefixes.Count > 0 && rng.Next(2) == 0 ? prefixes[rng.Next(prefixes.Count)] : rng.Next(b.Count - 3);
                uint old = BinaryPrimitives.ReadUInt32LittleEndian(b.GetRange(pos, 4).ToArray());
                uint v = rng.Next(8) switch
                {
                    0 => 0xffff_ffff,
                    1 => 0x7fff_ffff,
                    2 => 0x8000_0000,
                    3 => 0xffff,
                    4 => (uint)(b.Count - pos - 4),                 // a length that takes exactly the rest
                    5 or 6 => old + (uint)rng.Next(-8, 9),          // a length or count a little off
                    _ => (uint)rng.Next(),
                };
                var span = new byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(span, v);
                for (int i = 0; i < 4; i++)
                    b[pos + i] = span[i];
                what = $"u32 at {pos} = 0x{v:x}";
                break;
            }
            case 5:
            {
                int pos = rng.Next(b.Count - 7);
                ulong v = new ulong[] { ulong.MaxValue, 1UL << 63, 0xffff_ffff_ffff_f000, (ulong)rng.NextInt64() }[rng.Next(4)];
                var span = new byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(span, v);
                for (int i = 0; i < 8; i++)
                    b[pos + i] = span[i];
                what = $"u64 at {pos} = 0x{v:x}";
                break;
            }
            default:
            {
                // Several mutations at once.
                var once = Mutate(rng, payload, out string first);
                var twice = Mutate(rng, once, out string second);
                what = $"{first}; {second}";
                return twice;
            }
        }
        return [.. b];
    }

    /// <summary>Offsets of u32 values that could be the length of the bytes after them (1 to 4096, within the record).</summary>
    private static List<int> LengthPrefixes(List<byte> b)
    {
        var found = new List<int>();
        var bytes = b.ToArray();
        for (int pos = 0; pos + 4 <= bytes.Length; pos++)
        {
            uint v = BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(pos));
            if (v is >= 1 and <= 4096 && pos + 4 + v <= bytes.Length)
                found.Add(pos);
        }
        return found;
    }

    /// <summary>A device kind: how to build a fresh one, and what a guest does to one that took a record.</summary>
    private sealed record Kind(string Name, byte[] Seed, Func<IStatefulDevice> Fresh, Action<IStatefulDevice>? Poke = null);

    private void Run(Kind kind, int iterations = Iterations)
    {
        var rng = new Random(Seed ^ kind.Name.Aggregate(17, (h, c) => h * 31 + c));
        int accepted = 0, formatErrors = 0, deviceErrors = 0;
        // The unmutated record is accepted.
        var clean = kind.Fresh();
        try
        {
            StateBytes.Restore(clean, kind.Seed, kind.Name);
        }
        finally
        {
            (clean as IDisposable)?.Dispose();
        }
        for (int i = 0; i < iterations; i++)
        {
            byte[] payload = Mutate(rng, kind.Seed, out string what);
            var device = kind.Fresh();
            string stage = "restore";
            try
            {
                try
                {
                    StateBytes.Restore(device, payload, kind.Name);
                    accepted++;
                    stage = "guest accesses after the restore";
                    kind.Poke?.Invoke(device);
                }
                catch (StateFormatException e) when (stage == "restore")
                {
                    formatErrors++;
                    Assert.Contains($"'{kind.Name}'", e.Message);
                }
                catch (DeviceStateException) when (stage == "restore")
                {
                    deviceErrors++;
                }
                stage = "disposal";
                (device as IDisposable)?.Dispose();
            }
            catch (Exception e)
            {
                Assert.Fail($"{kind.Name}, seed {Seed}, iteration {i} ({what}): {stage} threw {e.GetType().Name}: {e}");
            }
        }
        output.WriteLine($"{kind.Name}: seed {Seed}, {iterations} mutated records: {accepted} accepted, {formatErrors} refused as malformed, {deviceErrors} as another device");
        Assert.True(formatErrors > 0, "no mutation was refused: the fuzzer is not reaching the reader");
    }

    /// <summary>Every register of a port-I/O device, read and written with a few values.</summary>
    private static void PokePorts(IBusDevice d, int ports)
    {
        var one = new byte[1];
        for (int round = 0; round < 2; round++)
            for (ulong p = 0; p < (ulong)ports; p++)
            {
                d.Read(p, one, 0);
                d.Read(p, new byte[2], 0);
                if (p != 0 || round == 1)
                    d.Write(p, [(byte)(0x5a ^ p)], 0);
            }
    }

    [Fact]
    public void Serial()
    {
        var a = new Serial16550(_ => { }, new RecordingInterruptLine());
        foreach (var (reg, v) in new (int, byte)[] { (3, 0x83), (0, 0x02), (1, 0x01), (3, 0x03), (2, 0x07), (7, 0x5a), (4, 0x1b) })
            a.Write((ulong)reg, [v], 0);
        for (int i = 0; i < 17; i++)
            a.Write(0, [(byte)i], 0);
        a.Write(1, [0x0f], 0);
        Run(new Kind("serial0", StateBytes.Save(a), () => new Serial16550(_ => { }, new RecordingInterruptLine()),
            d => PokePorts((Serial16550)d, Serial16550.RegisterCount)));
    }

    [Fact]
    public void Rtc()
    {
        var a = new CmosRtc();
        a.Write(0, [0x40], 0);
        a.Write(1, [0x12], 0);
        Run(new Kind("rtc", StateBytes.Save(a), () => new CmosRtc(), d => PokePorts((CmosRtc)d, CmosRtc.PortCount)));
    }

    [Fact]
    public void I8042()
    {
        var a = new I8042Controller(_ => { });
        a.CommandPort.Write(0, [0xaa], 0);
        a.CommandPort.Write(0, [0x60], 0);
        Run(new Kind("i8042", StateBytes.Save(a), () => new I8042Controller(_ => { }), d =>
        {
            var c = (I8042Controller)d;
            PokePorts(c.DataPort, 1);
            PokePorts(c.CommandPort, 1);
        }));
    }

    [Fact]
    public void AcpiPm()
    {
        var a = new AcpiPmDevice(_ => { }, new RecordingInterruptLine());
        a.Write(2, [0x21, 0x01], 0);
        a.PressPowerButton();
        Run(new Kind("pm", StateBytes.Save(a), () => new AcpiPmDevice(_ => { }, new RecordingInterruptLine()),
            d => PokePorts((AcpiPmDevice)d, AcpiPmDevice.Length)));
    }

    [Fact]
    public void DebugExit()
    {
        // An empty record: every mutation that leaves bytes is refused, truncation is the record itself.
        Run(new Kind("debug-exit", [], () => new DebugExitDevice(_ => { })), iterations: 300);
    }

    [Fact]
    public void PciBus()
    {
        var mmio = new IoBus("mmio");
        var a = new PciBus(mmio, 0xc000_0000, 0x1000_0000);
        a.Add(new IdFunction());
        a.Write(0, [0x0c, 0x00, 0x00, 0x80], 0);
        a.Write(4, [0x10], 0);
        a.Write(0, [0x10, 0x08, 0x00, 0x80], 0);
        Run(new Kind("pci-bus", StateBytes.Save(a), () =>
        {
            var b = new PciBus(new IoBus("mmio"), 0xc000_0000, 0x1000_0000);
            b.Add(new IdFunction());
            return b;
        }, d =>
        {
            var bus = (PciBus)d;
            var four = new byte[4];
            bus.Read(0, four, 0);
            for (ulong p = 4; p < 8; p++)
            {
                bus.Read(p, new byte[1], 0);
                bus.Write(p, [0xff], 0);
            }
        }));
    }

    /// <summary>
    /// The virtio-blk transport: its record holds configuration space, the MSI-X table, the
    /// negotiation, two queues' positions and the disk's own record. Records are saved from a
    /// running device (MSI-X on, and INTx with the ISR set), restored into fresh transports over
    /// in-memory disks and a copy of the saved machine's RAM, plugged into a PCI bus; one that is
    /// accepted is resumed, kicked, its registers read, and disposed of.
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void VirtioBlockTransport(bool msix)
    {
        using var rig = BlockRig.Create(1 << 20, queues: 2, queueSize: 64);
        var busA = new PciBus(new IoBus("mmio-a"), 0xc000_0000, 0x1000_0000);
        busA.Add(rig.Transport, interruptLine: 11);
        rig.Transport.WriteConfig(PciFunction.FirstBarRegister, 4, 0xd000_0000);
        rig.Transport.WriteConfig(PciFunction.CommandRegister, 2, PciFunction.CommandMemorySpace);
        rig.Start(msix: msix);
        for (int i = 0; i < 4; i++)
        {
            rig.Do(TypeIn, (ulong)i, inLength: 512);
            rig.Do(TypeOut, (ulong)i, new byte[512], queue: 1);
        }
        rig.Submit(Blk.Build(rig.Arena, TypeIn, 9, inLength: 512));
        rig.Transport.Pause();
        byte[] seed = StateBytes.Save(rig.Transport);
        rig.CloseDevice();
        using var memory = GuestMemory.Create([(0, BlockRig.RamSize)]);
        memory.Write(0, rig.Memory.GetSpan(0, (int)BlockRig.RamSize));

        // What a resumed device may write: the rings, and the buffers of the request left in them.
        // Put back after each accepted record, so every iteration starts from the saved RAM.
        var rings = memory.GetSpan(0, 0x40000).ToArray();
        var buffers = memory.GetSpan(BlockRig.DataBase, 0x10_0000).ToArray();
        var log = new RecordingLogger();
        Run(new Kind("virtio-blk0", seed, () =>
        {
            var block = new VirtioBlock("fuzz", new MemoryImage(1 << 20), new VirtioBlockOptions { Queues = 2, QueueSize = 64 });
            var t = new VirtioPciTransport(block, memory, new RecordingMsiController(), new LevelRecorder(), new RecordingIoEvents(), log)
            {
                PollTime = TimeSpan.Zero,
            };
            new PciBus(new IoBus("mmio"), 0xc000_0000, 0x1000_0000).Add(t, interruptLine: 11);
            t.Pause();
            return t;
        }, d =>
        {
            var t = (VirtioPciTransport)d;
            t.Resume();
            var data = new byte[4];
            for (ulong off = 0; off < 0x38; off += 4)
                t.ReadBar(0, off, data);
            t.ReadBar(0, VirtioPciTransport.IsrOffset, new byte[1]);
            for (int q = 0; q < 2; q++)
                t.WriteBar(0, VirtioPciTransport.NotifyOffset + (ulong)q * VirtioPciTransport.NotifyMultiplier, [(byte)q, 0]);
            for (int reg = 0; reg < PciFunction.ConfigSpaceSize; reg += 4)
                t.ReadConfig(reg, 4);
            t.Pause();
            memory.Write(0, rings);
            memory.Write(BlockRig.DataBase, buffers);
        }), iterations: 1500);
        Assert.Empty(log.WorkerFailures);
    }
    /// <summary>
    /// The virtio-net transport: a device with its receive filter, MAC table, two active pairs and
    /// a pending announcement, paused and saved; records restored into fresh transports over a copy
    /// of its RAM. One that is accepted is resumed, kicked, its registers read, and disposed of.
    /// </summary>
    [Fact]
    public void VirtioNetTransport()
    {
        var options = new Kvm.Devices.Virtio.Net.VirtioNetOptions { Mac = Eth.VmMac, QueuePairs = 2, QueueSize = 64 };
        using var rig = NetRig.Create(options, ramSize: 4UL << 20);
        rig.Start();
        rig.Control(Kvm.Devices.Virtio.Net.VirtioNet.CtrlRx, Kvm.Devices.Virtio.Net.VirtioNet.RxPromisc, [0]);
        rig.Control(Kvm.Devices.Virtio.Net.VirtioNet.CtrlMac, Kvm.Devices.Virtio.Net.VirtioNet.MacTableSet, NetRig.MacTable([Eth.OtherMac], [Eth.Multicast]));
        rig.Control(Kvm.Devices.Virtio.Net.VirtioNet.CtrlMq, Kvm.Devices.Virtio.Net.VirtioNet.MqVqPairsSet, [2, 0]);
        rig.Net.Announce();
        rig.PostRx(4);
        rig.Transport.Pause();
        byte[] seed = StateBytes.Save(rig.Transport);
        using var memory = GuestMemory.Create([(0, rig.RamSize)]);
        memory.Write(0, rig.Memory.GetSpan(0, (int)rig.RamSize));
        var saved = memory.GetSpan(0, (int)rig.RamSize).ToArray();
        var log = new RecordingLogger();
        Run(new Kind("virtio-net0", seed, () =>
        {
            var net = new Kvm.Devices.Virtio.Net.VirtioNet("fuzz", new SocketPairBackend(2), options);
            var t = new VirtioPciTransport(net, memory, new RecordingMsiController(), new LevelRecorder(), new RecordingIoEvents(), log)
            {
                PollTime = TimeSpan.Zero,
            };
            t.Pause();
            return t;
        }, d =>
        {
            var t = (VirtioPciTransport)d;
            t.Resume();
            var data = new byte[4];
            for (ulong off = 0; off < 0x38; off += 4)
                t.ReadBar(0, off, data);
            for (int off = 0; off < 12; off += 2)
                t.ReadBar(0, VirtioPciTransport.DeviceConfigOffset + (ulong)off, data.AsSpan(0, 2));
            t.ReadBar(0, VirtioPciTransport.IsrOffset, new byte[1]);
            for (int q = 0; q < 5; q++)
                t.WriteBar(0, VirtioPciTransport.NotifyOffset + (ulong)q * VirtioPciTransport.NotifyMultiplier, [(byte)q, 0]);
            ((SocketPairBackend)((Kvm.Devices.Virtio.Net.VirtioNet)t.Device).Backend).Inject(0, Eth.Packet(Eth.Frame(Eth.VmMac, Eth.PeerMac, 60)));
            t.Pause();
            memory.Write(0, saved);
        }), iterations: 1500);
        Assert.Empty(log.WorkerFailures);
    }
}
