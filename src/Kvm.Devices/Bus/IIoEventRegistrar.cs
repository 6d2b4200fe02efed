using Kvm.Hypervisor;

namespace Kvm.Devices.Bus;

/// <summary>
/// Binds an eventfd to guest writes at an MMIO address, so they signal the eventfd in the kernel
/// instead of exiting to a vCPU thread (KVM_IOEVENTFD). Implemented by the VMM over its KVM VM.
/// </summary>
public interface IIoEventRegistrar
{
    void AddMmio(EventFd fd, ulong address, uint length);

    void RemoveMmio(EventFd fd, ulong address, uint length);
}
