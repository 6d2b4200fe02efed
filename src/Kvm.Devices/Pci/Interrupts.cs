namespace Kvm.Devices.Pci;

/// <summary>
/// Delivers message-signalled interrupts. On KVM each vector is a GSI routed to an MSI message and
/// signalled through an irqfd; the implementation lives with the VMM, which owns the KVM VM.
/// </summary>
public interface IMsiController
{
    /// <summary>A new vector; its message is unset (it interrupts nobody) until <see cref="IMsiVector.SetMessage"/>.</summary>
    IMsiVector CreateVector();
}

/// <summary>One MSI vector: an (address, data) message and a way to send it.</summary>
public interface IMsiVector : IDisposable
{
    /// <summary>Sets the message the vector sends. Called on vCPU threads when the guest programs it.</summary>
    void SetMessage(ulong address, uint data);

    /// <summary>Sends the message. Called on device worker threads; must not block.</summary>
    void Trigger();
}
