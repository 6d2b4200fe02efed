namespace Kvm.Devices.Bus;

/// <summary>
/// A device on a bus. Offsets are relative to the start of the range the device was registered at;
/// <c>vcpuId</c> names the vCPU making the access. Accesses are 1, 2, 4 or 8 bytes, little-endian.
/// </summary>
public interface IBusDevice
{
    void Read(ulong offset, Span<byte> data, int vcpuId);
    void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId);
}

/// <summary>An interrupt line a device drives (an IOAPIC/PIC pin, in the end).</summary>
public interface IInterruptLine
{
    void SetLevel(bool asserted);
}
