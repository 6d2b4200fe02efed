using Kvm.Devices.Bus;
using Kvm.Devices.Pci;
using Kvm.Hypervisor;
using Kvm.Interop.Native;

namespace Kvm.Vmm.Machine;

/// <summary>MSI vectors on KVM: each is a GSI with an MSI route, signalled through an irqfd.</summary>
public sealed class KvmMsiController(KvmVm vm, GsiRouting routing) : IMsiController
{
    public IMsiVector CreateVector()
    {
        uint gsi = routing.AllocateMsi();
        var fd = new EventFd();
        try
        {
            vm.AddIrqfd(fd, gsi);
        }
        catch
        {
            fd.Dispose();
            routing.Release(gsi);
            throw;
        }
        return new Vector(vm, routing, gsi, fd);
    }

    private sealed class Vector(KvmVm vm, GsiRouting routing, uint gsi, EventFd fd) : IMsiVector
    {
        private int _disposed;

        public void SetMessage(ulong address, uint data) => routing.SetMsi(gsi, address, data);

        public void Trigger() => fd.Signal();

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0)
                return;
            try { vm.RemoveIrqfd(fd, gsi); }
            catch (KvmIoctlException) { /* the VM is being torn down */ }
            catch (ObjectDisposedException) { }
            fd.Dispose();
            routing.Release(gsi);
        }
    }
}

/// <summary>Queue notifications bound to eventfds with KVM_IOEVENTFD.</summary>
public sealed class KvmIoEventRegistrar(KvmVm vm) : IIoEventRegistrar
{
    public void AddMmio(EventFd fd, ulong address, uint length) => vm.AddIoeventfd(fd, address, length, pio: false);

    public void RemoveMmio(EventFd fd, ulong address, uint length) => vm.RemoveIoeventfd(fd, address, length, pio: false);
}
