using Kvm.Devices.Bus;

namespace Kvm.Devices.Tests;

/// <summary>One access a <see cref="RecordingDevice"/> saw.</summary>
public sealed record Access(bool IsWrite, ulong Offset, byte[] Data, int VcpuId);

/// <summary>
/// A bus device that records every access. Reads return bytes derived from the device tag, the
/// offset and the byte index, so a test can tell which device answered and at which offset.
/// </summary>
public sealed class RecordingDevice(byte tag = 0) : IBusDevice
{
    public List<Access> Accesses { get; } = [];
    public byte Tag { get; } = tag;

    public static byte ReadValue(byte tag, ulong offset, int index) => (byte)(tag * 31 + (int)(offset & 0xff) * 7 + index + 1);

    public void Read(ulong offset, Span<byte> data, int vcpuId)
    {
        for (int i = 0; i < data.Length; i++)
            data[i] = ReadValue(Tag, offset, i);
        Accesses.Add(new Access(false, offset, data.ToArray(), vcpuId));
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId) =>
        Accesses.Add(new Access(true, offset, data.ToArray(), vcpuId));
}

/// <summary>An interrupt line that records every level change the device drives.</summary>
public sealed class RecordingInterruptLine : IInterruptLine
{
    public List<bool> Levels { get; } = [];

    /// <summary>The current level (false before the first change).</summary>
    public bool Level => Levels.Count > 0 && Levels[^1];

    public void SetLevel(bool asserted) => Levels.Add(asserted);
}
