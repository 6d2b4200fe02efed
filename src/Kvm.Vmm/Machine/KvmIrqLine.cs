using Kvm.Devices.Bus;
using Kvm.Hypervisor;

namespace Kvm.Vmm.Machine;

/// <summary>An interrupt line of the in-kernel PIC/IOAPIC, for devices that raise legacy IRQs.</summary>
public sealed class KvmIrqLine(KvmVm vm, uint irq) : IInterruptLine
{
    public uint Irq { get; } = irq;

    public void SetLevel(bool asserted) => vm.SetIrqLine(Irq, asserted);
}
