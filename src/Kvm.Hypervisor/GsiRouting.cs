using Kvm.Interop.Structs;

namespace Kvm.Hypervisor;

/// <summary>
/// The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table, so this keeps the
/// default routes of the in-kernel irqchip (GSIs 0-15 to the PIC and the IOAPIC, 16-23 to the
/// IOAPIC only, as KVM sets them up) together with the MSI routes devices add, and writes the
/// whole table whenever an MSI route changes. MSI GSIs are handed out from 24 upwards.
/// </summary>
public sealed class GsiRouting
{
    public const uint IoapicPins = 24;
    private const uint IrqchipPicMaster = 0, IrqchipPicSlave = 1, IrqchipIoapic = 2;

    private readonly KvmVm _vm;
    private readonly object _lock = new();
    private readonly SortedDictionary<uint, (ulong Address, uint Data)?> _msi = new();
    private readonly uint _maxEntries;
    private uint _next = IoapicPins;

    public GsiRouting(KvmVm vm)
    {
        _vm = vm;
        int max = vm.CheckExtension(KvmCap.IrqRouting);
        _maxEntries = max > 0 ? (uint)max : 1024;
    }

    /// <summary>A new GSI for an MSI; it routes nowhere until <see cref="SetMsi"/>.</summary>
    public uint AllocateMsi()
    {
        lock (_lock)
        {
            if (_next >= _maxEntries)
                throw new HypervisorException($"out of GSIs for MSI routes (KVM allows {_maxEntries})");
            uint gsi = _next++;
            _msi[gsi] = null;
            return gsi;
        }
    }

    /// <summary>Points an MSI GSI at a message and installs the table.</summary>
    public void SetMsi(uint gsi, ulong address, uint data)
    {
        lock (_lock)
        {
            if (!_msi.TryGetValue(gsi, out var old))
                throw new ArgumentException($"GSI {gsi} was not allocated for MSI");
            if (old == (address, data))
                return;
            _msi[gsi] = (address, data);
            Commit();
        }
    }

    /// <summary>Removes an MSI GSI's route.</summary>
    public void Release(uint gsi)
    {
        lock (_lock)
        {
            if (_msi.Remove(gsi, out var old) && old is not null)
                Commit();
        }
    }

    private static IEnumerable<KvmIrqRoutingEntry> DefaultEntries()
    {
        for (uint gsi = 0; gsi < IoapicPins; gsi++)
        {
            if (gsi < 16)
                yield return KvmIrqRoutingEntry.Irqchip(gsi, gsi < 8 ? IrqchipPicMaster : IrqchipPicSlave, gsi % 8);
            yield return KvmIrqRoutingEntry.Irqchip(gsi, IrqchipIoapic, gsi);
        }
    }

    private void Commit()
    {
        var entries = new List<KvmIrqRoutingEntry>(DefaultEntries());
        foreach (var (gsi, message) in _msi)
            if (message is { } m)
                entries.Add(KvmIrqRoutingEntry.Msi(gsi, m.Address, m.Data));
        _vm.SetGsiRouting(entries.ToArray());
    }
}
