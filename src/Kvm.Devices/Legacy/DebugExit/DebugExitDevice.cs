using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Legacy.DebugExit;

/// <summary>
/// A port that ends the VM when the guest writes to it, with the byte written as the VM's status.
/// (QEMU's isa-debug-exit, by contrast, exits with status*2+1.) Reads return zero.
/// </summary>
public sealed class DebugExitDevice(Action<byte> onExit) : IBusDevice, IStatefulDevice
{
    /// <summary>The port this project places the device at, as QEMU's iobase=0xf4.</summary>
    public const ushort DefaultPort = 0xf4;

    /// <summary>The width of the port range (QEMU's iosize=0x04).</summary>
    public const int Length = 4;

    public void Read(ulong offset, Span<byte> data, int vcpuId) => data.Clear();

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId)
    {
        if (data.Length > 0)
            onExit(data[0]);
    }

    public string StateKind => "debug-exit";

    /// <summary>The port has no state: the record is empty.</summary>
    public void SaveState(StateWriter writer) { }

    public void RestoreState(ref StateReader reader) { }
}
