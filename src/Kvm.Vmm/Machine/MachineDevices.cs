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
using Kvm.Devices.Virtio.Net;
using Kvm.Network;
using Kvm.Hypervisor;
using Kvm.Storage;
using Kvm.Vmm.Acpi;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Exits;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Machine;

/// <summary>What the devices of a machine are built on: the VM, its RAM and buses, and the machine's callbacks.</summary>
internal sealed record DeviceContext(
    VmSpec Spec,
    KvmVm Vm,
    GuestMemory Memory,
    IoBus PortIo,
    IoBus Mmio,
    AcpiConfig Acpi,
    Action<ReadOnlySpan<byte>> SerialOutput,
    Action<VmStopReason> RequestStop,
    ILogger Log,
    Action<string, DosAlarm>? TrafficAlarm = null);

/// <summary>
/// The devices of a machine, made from its spec: each one is created, placed on its bus, wired to
/// its interrupt and given to the <see cref="DeviceManager"/> under its stable id here, and
/// nowhere else, so a new device is added in one place. The ids are what snapshots carry:
/// "serial0", "rtc", "i8042", "pm", "debug-exit", "pci-bus", then "virtio-blk0", "virtio-blk1"...
/// in the order of the spec's disks (PCI slots 1 onwards), then "virtio-net0"... for its NICs.
/// </summary>
internal sealed class MachineDevices
{
    private MachineDevices(DeviceManager manager) => Manager = manager;

    public DeviceManager Manager { get; }
    public Serial16550 Serial { get; private set; } = null!;
    public AcpiPmDevice Pm { get; private set; } = null!;
    public AcpiGpeDevice Gpe { get; private set; } = null!;

    /// <summary>The GPE0 block's device id (and state record id); snapshots saved before it existed lack it.</summary>
    public const string GpeId = "gpe";
    public PciBus Pci { get; private set; } = null!;
    public GsiRouting GsiRouting { get; private set; } = null!;
    public List<VirtioPciTransport> Disks { get; } = new();
    public List<VirtioPciTransport> Nics { get; } = new();

    /// <summary>Where the guest finds each device, by id ("port 0x3f8-0x3ff", "pci 00:01.0").</summary>
    public Dictionary<string, string> Locations { get; } = new(StringComparer.Ordinal);

    private static string Ports(ushort first, int count) => count == 1 ? $"port 0x{first:x}" : $"port 0x{first:x}-0x{first + count - 1:x}";

    /// <summary>
    /// Builds every device of <paramref name="ctx"/>'s spec into <paramref name="manager"/>.
    /// <paramref name="images"/> are the spec's disks, opened; each one the devices take over is
    /// set to null in the list (what is left there is the caller's to dispose of on failure).
    /// </summary>
    public static MachineDevices Build(DeviceContext ctx, DeviceManager manager, IList<IBlockImage?> images)
    {
        var d = new MachineDevices(manager);
        var vm = ctx.Vm;

        d.Serial = manager.Add("serial0", new Serial16550(ctx.SerialOutput, new KvmIrqLine(vm, Serial16550.Com1Irq)));
        ctx.PortIo.Register(Serial16550.Com1Port, Serial16550.RegisterCount, d.Serial);
        d.Locations["serial0"] = Ports(Serial16550.Com1Port, Serial16550.RegisterCount);

        ctx.PortIo.Register(CmosRtc.Port, CmosRtc.PortCount, manager.Add("rtc", new CmosRtc()));
        d.Locations["rtc"] = Ports(CmosRtc.Port, CmosRtc.PortCount);

        var i8042 = manager.Add("i8042", new I8042Controller(vcpu => ctx.RequestStop(new GuestResetStop((uint)vcpu))));
        ctx.PortIo.Register(I8042Controller.DataPortAddress, 1, i8042.DataPort);
        ctx.PortIo.Register(I8042Controller.CommandPortAddress, 1, i8042.CommandPort);
        d.Locations["i8042"] = $"ports 0x{I8042Controller.DataPortAddress:x}, 0x{I8042Controller.CommandPortAddress:x}";

        // ACPI PM1a registers where the FADT says (AcpiConfig.PmIoBase); S5 powers the VM off.
        // The GPE0 block beside them (GPE 0: a new VM generation id); both raise the one SCI.
        var sci = new SharedInterruptLine(new KvmIrqLine(vm, AcpiConfig.SciIrq));
        d.Pm = manager.Add("pm", new AcpiPmDevice(vcpu => ctx.RequestStop(new GuestPowerOffStop((uint)vcpu)),
            sci.CreateSource()));
        ctx.PortIo.Register(ctx.Acpi.PmIoBase!.Value, AcpiPmDevice.Length, d.Pm);
        d.Locations["pm"] = Ports(ctx.Acpi.PmIoBase!.Value, AcpiPmDevice.Length);
        d.Gpe = manager.Add(GpeId, new AcpiGpeDevice(sci.CreateSource()));
        ctx.PortIo.Register(ctx.Acpi.GpeIoBase!.Value, AcpiGpeDevice.Length, d.Gpe);
        d.Locations[GpeId] = Ports(ctx.Acpi.GpeIoBase!.Value, AcpiGpeDevice.Length);

        if (ctx.Spec.DebugExit)
        {
            ctx.PortIo.Register(DebugExitDevice.DefaultPort, DebugExitDevice.Length,
                manager.Add("debug-exit", new DebugExitDevice(status => ctx.RequestStop(new DebugExitStop(status)))));
            d.Locations["debug-exit"] = Ports(DebugExitDevice.DefaultPort, DebugExitDevice.Length);
        }

        // The PCI bus behind ports 0xCF8-0xCFF; one virtio-blk function per disk, slots 1 onwards.
        d.Pci = manager.Add("pci-bus", new PciBus(ctx.Mmio, X86Layout.PciMmioStart, X86Layout.PciMmioSize));
        ctx.PortIo.Register(PciBus.ConfigAddressPort, PciBus.PortCount, d.Pci);
        d.Locations["pci-bus"] = Ports(PciBus.ConfigAddressPort, PciBus.PortCount);
        d.GsiRouting = new GsiRouting(vm);
        var msi = new KvmMsiController(vm, d.GsiRouting);
        var ioevents = new KvmIoEventRegistrar(vm);
        var intxLines = new Dictionary<byte, SharedInterruptLine>();
        // The INTx line of a PCI slot, shared by the slots wired to the same GSI.
        (byte Gsi, SharedInterruptLine Line) IntxLine(int slot)
        {
            byte gsi = X86Layout.PciIntxGsi(slot);
            if (!intxLines.TryGetValue(gsi, out var line))
                intxLines[gsi] = line = new SharedInterruptLine(new KvmIrqLine(vm, gsi));
            return (gsi, line);
        }
        for (int i = 0; i < ctx.Spec.Disks.Count; i++)
        {
            var (gsi, line) = IntxLine(i + 1);
            var image = images[i]!;
            images[i] = null;       // the device owns it from here on
            var block = new VirtioBlock($"virtio-blk{i}", image, ctx.Spec.Disks[i].ToOptions(), ctx.Log);
            VirtioPciTransport transport;
            try
            {
                transport = new VirtioPciTransport(block, ctx.Memory, msi, line.CreateSource(), ioevents, ctx.Log);
            }
            catch
            {
                block.Dispose();
                throw;
            }
            manager.Add($"virtio-blk{i}", transport);
            d.Disks.Add(transport);
            int at = d.Pci.Add(transport, gsi);
            d.Locations[$"virtio-blk{i}"] = $"pci 00:{at:x2}.0";
        }
        // One virtio-net function per NIC, in the slots after the disks.
        for (int i = 0; i < ctx.Spec.Nics.Count; i++)
        {
            var nic = ctx.Spec.Nics[i];
            var (gsi, line) = IntxLine(ctx.Spec.Disks.Count + i + 1);
            var backend = OpenBackend($"virtio-net{i}", nic);
            VirtioPciTransport transport;
            var net = new VirtioNet($"virtio-net{i}", backend, nic.ToOptions(), ctx.Log);
            string nicId = $"virtio-net{i}";
            net.DosAlarm += (_, alarm) =>
            {
                VmmLog.TrafficAlarm(ctx.Log, nicId, alarm.Cleared ? "cleared" : "fired", alarm.Describe());
                ctx.TrafficAlarm?.Invoke(nicId, alarm);
            };
            if (backend is NicTeam team)
            {
                string name = net.Name;
                team.Changed += change =>
                {
                    VmmLog.TeamChanged(ctx.Log, name, change.Uplink, change.Up ? "up" : "down", change.Reason,
                        change.Active.Count == 0 ? "no uplink" : string.Join(", ", change.Active));
                    // The guest announces its addresses (gratuitous ARP) when its driver can.
                    net.Announce();
                };
            }
            try
            {
                transport = new VirtioPciTransport(net, ctx.Memory, msi, line.CreateSource(), ioevents, ctx.Log);
            }
            catch
            {
                net.Dispose();
                throw;
            }
            manager.Add($"virtio-net{i}", transport);
            d.Nics.Add(transport);
            int at = d.Pci.Add(transport, gsi);
            d.Locations[$"virtio-net{i}"] = $"pci 00:{at:x2}.0 ({backend.Name}, {nic.Mac})";
        }
        return d;
    }

    /// <summary>A NIC's backend: its tap or host interface, or a team of its uplinks. Throws <see cref="IOException"/> naming the NIC and the uplink.</summary>
    private static INetBackend OpenBackend(string name, NicSpec nic)
    {
        var taps = new List<INetBackend>();
        try
        {
            foreach (var uplink in nic.Uplinks)
                taps.Add(uplink.Interface is { } device
                    ? PacketBackend.Open(device, nic.Queues, nic.Mac)
                    : TapBackend.Open(uplink.Tap, nic.Queues, uplink.Bridge));
            return taps.Count == 1 ? taps[0] : new NicTeam(taps, nic.ToTeamOptions(), nic.Mac);
        }
        catch (Exception e) when (e is IOException or ArgumentException)
        {
            foreach (var t in taps)
                t.Dispose();
            throw new IOException($"{name} ({nic.Mac}): {e.Message}", e);
        }
    }
}
