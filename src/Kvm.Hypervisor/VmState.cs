using Kvm.Hypervisor.State;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor;

/// <summary>
/// What KVM holds for a whole VM that a snapshot carries: the in-kernel PICs and IOAPIC, the PIT,
/// the kvmclock, and the GSI routing table (which only user space knows: KVM cannot report it).
/// Restored into a fresh VM built the same way (irqchip and PIT created), before its vCPUs run.
/// </summary>
public sealed class VmState
{
    public required KvmIrqchip? PicMaster { get; init; }
    public required KvmIrqchip? PicSlave { get; init; }
    public required KvmIrqchip? Ioapic { get; init; }
    public required KvmPitState2? Pit { get; init; }
    public required KvmClockData Clock { get; init; }
    public required KvmIrqRoutingEntry[] Routes { get; init; }

    /// <summary>Reads the state of <paramref name="vm"/>, whose vCPUs must not be running.</summary>
    public static VmState Save(KvmVm vm) => new()
    {
        PicMaster = vm.HasIrqchip ? vm.GetIrqchip(KvmIrqchip.PicMaster) : null,
        PicSlave = vm.HasIrqchip ? vm.GetIrqchip(KvmIrqchip.PicSlave) : null,
        Ioapic = vm.HasIrqchip ? vm.GetIrqchip(KvmIrqchip.Ioapic) : null,
        Pit = vm.HasPit ? vm.GetPit2() : null,
        Clock = vm.GetClock(),
        Routes = [.. vm.GsiRoutes],
    };

    /// <summary>
    /// Writes this state into <paramref name="vm"/>. Refused, before anything is written, when the
    /// VM lacks a chip the state has or has one the state lacks: the machines must match.
    /// </summary>
    public void Restore(KvmVm vm)
    {
        if (vm.HasIrqchip != Ioapic.HasValue)
            throw new HypervisorException(Ioapic.HasValue
                ? "the saved VM had an in-kernel irqchip (PIC and IOAPIC) and this one has none"
                : "this VM has an in-kernel irqchip and the saved one had none");
        if (vm.HasPit != Pit.HasValue)
            throw new HypervisorException(Pit.HasValue
                ? "the saved VM had an in-kernel PIT and this one has none"
                : "this VM has an in-kernel PIT and the saved one had none");
        if (Routes.Length > 0)
            vm.SetGsiRouting(Routes);
        if (PicMaster is { } master)
            vm.SetIrqchip(master);
        if (PicSlave is { } slave)
            vm.SetIrqchip(slave);
        if (Ioapic is { } ioapic)
            vm.SetIrqchip(ioapic);
        if (Pit is { } pit)
            vm.SetPit2(pit);
        // Only the clock value: the flags KVM_GET_CLOCK reports (stable TSC, realtime) are not input.
        vm.SetClock(new KvmClockData { Clock = Clock.Clock });
    }

    /// <summary>The most GSI routes a record may hold (KVM allows 4096).</summary>
    public const int MaxRoutes = 4096;

    /// <summary>Writes this state as a record's fields (read back by <see cref="Read"/>).</summary>
    public void Write(StateWriter w)
    {
        w.Bool(Ioapic.HasValue);
        if (PicMaster is { } master && PicSlave is { } slave && Ioapic is { } ioapic)
            w.Struct(master).Struct(slave).Struct(ioapic);
        w.Bool(Pit.HasValue);
        if (Pit is { } pit)
            w.Struct(pit);
        w.Struct(Clock).Structs<KvmIrqRoutingEntry>(Routes);
    }

    public static VmState Read(ref StateReader r)
    {
        KvmIrqchip? master = null, slave = null, ioapic = null;
        if (r.Bool("irqchip"))
        {
            master = r.Struct<KvmIrqchip>("pic_master");
            slave = r.Struct<KvmIrqchip>("pic_slave");
            ioapic = r.Struct<KvmIrqchip>("ioapic");
        }
        KvmPitState2? pit = r.Bool("pit") ? r.Struct<KvmPitState2>("pit_state") : null;
        return new VmState
        {
            PicMaster = master,
            PicSlave = slave,
            Ioapic = ioapic,
            Pit = pit,
            Clock = r.Struct<KvmClockData>("clock"),
            Routes = r.Structs<KvmIrqRoutingEntry>("routes", MaxRoutes),
        };
    }
}
