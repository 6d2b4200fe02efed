using Kvm.Hypervisor.State;

namespace Kvm.Devices.Manager;

/// <summary>
/// A device the <see cref="DeviceManager"/> owns: it can be paused (quiesced: no request in flight,
/// no worker running), its state written as a record, and that record read back into a freshly
/// built device of the same kind, which stays paused until <see cref="Resume"/>.
/// </summary>
public interface IStatefulDevice
{
    /// <summary>What the record holds, such as "serial16550"; a record of another kind is refused.</summary>
    string StateKind { get; }

    /// <summary>Stops the device's own activity (workers, timers) and finishes what is in flight. Idempotent.</summary>
    void Pause() { }

    /// <summary>Starts what <see cref="Pause"/> stopped (or what a restore set up). Idempotent.</summary>
    void Resume() { }

    /// <summary>Writes the device's state (the device is paused).</summary>
    void SaveState(StateWriter writer);

    /// <summary>
    /// Replaces the device's state with a record <see cref="SaveState"/> wrote. Called on a paused,
    /// freshly built device; throws <see cref="StateFormatException"/> for a record that does not
    /// fit it (naming the field), or <see cref="DeviceStateException"/> when the device differs
    /// from the saved one in a way the guest would notice.
    /// </summary>
    void RestoreState(ref StateReader reader);
}

/// <summary>A saved device does not match the device it is restored into (another size, fewer features...).</summary>
public sealed class DeviceStateException(string message) : Exception(message);
