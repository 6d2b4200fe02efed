using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Devices.Pci;
using Kvm.Hypervisor.State;
using Kvm.Storage;

namespace Kvm.Devices.Tests;

/// <summary>Saving and restoring a device through the bytes of its record, as a snapshot carries it.</summary>
public static class StateBytes
{
    /// <summary>The payload <see cref="IStatefulDevice.SaveState"/> writes.</summary>
    public static byte[] Save(IStatefulDevice device)
    {
        var w = new StateWriter();
        device.SaveState(w);
        return w.ToArray();
    }

    /// <summary>Reads <paramref name="payload"/> into <paramref name="device"/> and refuses bytes left over, as the device manager does.</summary>
    public static void Restore(IStatefulDevice device, byte[] payload, string record = "test")
    {
        var r = new StateReader(payload, record);
        device.RestoreState(ref r);
        r.End();
    }
}

/// <summary>
/// A PCI function whose identity the test chooses, with a 4 KiB 32-bit BAR 0 and a 16 KiB 64-bit
/// BAR 2; BAR accesses are recorded.
/// </summary>
public sealed class IdFunction : PciFunction
{
    public const ulong Bar0Size = 0x1000, Bar2Size = 0x4000;

    private readonly string _name;

    public IdFunction(ushort vendorId = 0x1234, ushort deviceId = 0x5678, string name = "id-function")
        : base(vendorId, deviceId, classCode: 0xff_00_00, revision: 1, interruptPin: 1)
    {
        _name = name;
        AddBar(0, Bar0Size, PciBarKind.Memory32);
        AddBar(2, Bar2Size, PciBarKind.Memory64);
    }

    public override string Name => _name;

    public List<(int Bar, ulong Offset, bool Write)> Accesses { get; } = [];

    public override void ReadBar(int index, ulong offset, Span<byte> data)
    {
        lock (Accesses)
            Accesses.Add((index, offset, false));
        data.Fill((byte)(0xb0 + index));
    }

    public override void WriteBar(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        lock (Accesses)
            Accesses.Add((index, offset, true));
    }
}

/// <summary>Records the notify addresses a transport binds to eventfds (KVM_IOEVENTFD stands in).</summary>
public sealed class RecordingIoEvents : IIoEventRegistrar
{
    private readonly List<(bool Add, ulong Address, uint Length)> _calls = [];

    public IReadOnlyList<(bool Add, ulong Address, uint Length)> Calls
    {
        get { lock (_calls) return _calls.ToArray(); }
    }

    public void AddMmio(Kvm.Hypervisor.EventFd fd, ulong address, uint length)
    {
        lock (_calls)
            _calls.Add((true, address, length));
    }

    public void RemoveMmio(Kvm.Hypervisor.EventFd fd, ulong address, uint length)
    {
        lock (_calls)
            _calls.Add((false, address, length));
    }
}

/// <summary>A disk image in memory that counts its flushes: cheap enough to build thousands of devices on.</summary>
public sealed class MemoryImage(ulong size, bool readOnly = false) : IBlockImage
{
    private readonly byte[] _bytes = new byte[size];
    private int _flushes;

    public string Path => "memory";
    public ulong Size => size;
    public bool ReadOnly => readOnly;
    public IBlockImage? Backing => null;
    public int Flushes => Volatile.Read(ref _flushes);
    public bool Disposed { get; private set; }

    private void Check(ulong offset, ulong length)
    {
        if (offset > size || length > size - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"0x{offset:x}+0x{length:x} is beyond 0x{size:x}");
    }

    public void Read(ulong offset, Span<byte> destination)
    {
        Check(offset, (ulong)destination.Length);
        lock (_bytes)
            _bytes.AsSpan((int)offset, destination.Length).CopyTo(destination);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> source)
    {
        if (readOnly)
            throw new InvalidOperationException("read-only image");
        Check(offset, (ulong)source.Length);
        lock (_bytes)
            source.CopyTo(_bytes.AsSpan((int)offset));
    }

    public void WriteZeroes(ulong offset, ulong length)
    {
        Check(offset, length);
        lock (_bytes)
            _bytes.AsSpan((int)offset, (int)length).Clear();
    }

    public void Discard(ulong offset, ulong length) => WriteZeroes(offset, length);

    public void Flush() => Interlocked.Increment(ref _flushes);

    public IReadOnlyList<Extent> GetAllocation(ulong offset, ulong length) => [new Extent(offset, length, ExtentKind.Data)];

    public void Dispose() => Disposed = true;
}
