using System.Buffers.Binary;
using Kvm.Devices.Bus;

namespace Kvm.Devices.Pci;

/// <summary>
/// A PCI function with a type-0 configuration header (256 bytes): identity registers, command and
/// status, up to six memory BARs that the guest may size and move, a capability list, and the
/// interrupt pin. Writes go through a per-byte write mask, so read-only registers stay read-only.
/// When the guest moves a BAR or turns memory decoding on or off, the function re-registers its
/// BARs on the MMIO bus and tells the subclass (<see cref="OnBarMapped"/>).
/// </summary>
public abstract class PciFunction
{
    public const int ConfigSpaceSize = 256;

    public const int CommandRegister = 0x04;
    public const int StatusRegister = 0x06;
    public const int FirstBarRegister = 0x10;
    public const int CapabilityPointerRegister = 0x34;
    public const int InterruptLineRegister = 0x3c;
    public const int InterruptPinRegister = 0x3d;

    public const ushort CommandIoSpace = 1 << 0;
    public const ushort CommandMemorySpace = 1 << 1;
    public const ushort CommandBusMaster = 1 << 2;
    public const ushort CommandInterruptDisable = 1 << 10;
    private const ushort CommandWritable = CommandIoSpace | CommandMemorySpace | CommandBusMaster | CommandInterruptDisable;

    public const ushort StatusInterrupt = 1 << 3;
    public const ushort StatusCapabilityList = 1 << 4;

    /// <summary>The standard header ends here; capabilities go from here on.</summary>
    private const int FirstCapabilityOffset = 0x40;

    private readonly byte[] _config = new byte[ConfigSpaceSize];
    private readonly byte[] _writeMask = new byte[ConfigSpaceSize];
    private readonly PciBar?[] _bars = new PciBar?[6];
    private readonly ulong?[] _mapped = new ulong?[6];
    private int _nextCapability = FirstCapabilityOffset;
    private int _lastCapabilityLink = CapabilityPointerRegister;
    private IoBus? _mmio;
    private volatile ushort _command;

    /// <summary>Held while the configuration space changes, and while BARs are re-registered.</summary>
    protected readonly object ConfigLock = new();

    protected PciFunction(ushort vendorId, ushort deviceId, uint classCode, byte revision,
        ushort subsystemVendorId = 0, ushort subsystemId = 0, byte interruptPin = 0)
    {
        SetU16(0x00, vendorId);
        SetU16(0x02, deviceId);
        _config[0x08] = revision;
        _config[0x09] = (byte)classCode;          // programming interface
        _config[0x0a] = (byte)(classCode >> 8);   // subclass
        _config[0x0b] = (byte)(classCode >> 16);  // base class
        SetU16(0x2c, subsystemVendorId);
        SetU16(0x2e, subsystemId);
        _config[InterruptPinRegister] = interruptPin;
        SetU16Mask(CommandRegister, CommandWritable);
        _writeMask[0x0c] = 0xff;                  // cache line size
        _writeMask[0x0d] = 0xff;                  // latency timer
        _writeMask[InterruptLineRegister] = 0xff;
    }

    public ushort VendorId => GetU16(0x00);
    public ushort DeviceId => GetU16(0x02);
    /// <summary>The command register; read without the configuration lock (device workers read it).</summary>
    public ushort Command => _command;
    public bool MemoryEnabled => (Command & CommandMemorySpace) != 0;
    public bool InterruptDisabled => (Command & CommandInterruptDisable) != 0;
    public byte InterruptLine
    {
        get { lock (ConfigLock) return _config[InterruptLineRegister]; }
    }

    /// <summary>A short name for messages, such as "virtio-blk".</summary>
    public abstract string Name { get; }

    /// <summary>The slot (device number) on bus 0, once plugged.</summary>
    public int Slot { get; private set; } = -1;

    public IReadOnlyList<PciBar> Bars => _bars.Where(b => b is not null).Select(b => b!).ToArray();

    /// <summary>The address a BAR holds now (0 if unassigned), whether or not decoding is on.</summary>
    public ulong GetBarAddress(int index)
    {
        lock (ConfigLock)
            return BarAddressLocked(index);
    }

    /// <summary>Where a BAR is registered on the MMIO bus now, or null.</summary>
    public ulong? GetMappedAddress(int index)
    {
        lock (ConfigLock)
            return _mapped[index];
    }

    /// <summary>Reads <paramref name="size"/> (1, 2 or 4) bytes of configuration space.</summary>
    public uint ReadConfig(int offset, int size)
    {
        if (!ValidAccess(offset, size))
            return size switch { 1 => 0xff, 2 => 0xffff, _ => 0xffff_ffff };
        lock (ConfigLock)
        {
            if (ReadConfigOverride(offset, size) is { } overridden)
                return overridden;
            ushort status = DynamicStatus;
            uint v = 0;
            for (int i = size - 1; i >= 0; i--)
            {
                int at = offset + i;
                byte b = _config[at];
                if (at == StatusRegister)
                    b |= (byte)status;
                else if (at == StatusRegister + 1)
                    b |= (byte)(status >> 8);
                v = v << 8 | b;
            }
            return v;
        }
    }

    /// <summary>Writes <paramref name="size"/> (1, 2 or 4) bytes of configuration space; read-only bits keep their value.</summary>
    public void WriteConfig(int offset, int size, uint value)
    {
        if (!ValidAccess(offset, size))
            return;
        lock (ConfigLock)
        {
            for (int i = 0; i < size; i++)
            {
                byte b = (byte)(value >> (8 * i));
                int at = offset + i;
                _config[at] = (byte)((_config[at] & ~_writeMask[at]) | (b & _writeMask[at]));
            }
            bool touchesBars = offset < FirstBarRegister + 24 && offset + size > FirstBarRegister;
            bool touchesCommand = offset < CommandRegister + 2 && offset + size > CommandRegister;
            _command = GetU16(CommandRegister);
            if (touchesBars || touchesCommand)
                UpdateMappingsLocked();
            ConfigWritten(offset, size, value);
        }
    }

    /// <summary>An access to one of this function's BARs, at <paramref name="offset"/> into it.</summary>
    public abstract void ReadBar(int index, ulong offset, Span<byte> data);

    public abstract void WriteBar(int index, ulong offset, ReadOnlySpan<byte> data);

    /// <summary>Declares a memory BAR. Call from the constructor; <paramref name="size"/> must be a power of two, at least 16.</summary>
    protected void AddBar(int index, ulong size, PciBarKind kind)
    {
        if (size < 16 || !ulong.IsPow2(size))
            throw new ArgumentException($"BAR size {size} is not a power of two of at least 16 bytes", nameof(size));
        int last = kind == PciBarKind.Memory64 ? index + 1 : index;
        if (index < 0 || last > 5 || _bars[index] is not null || (kind == PciBarKind.Memory64 && _bars[index + 1] is not null))
            throw new ArgumentException($"BAR {index} cannot hold a {kind} BAR", nameof(index));
        if (kind == PciBarKind.Memory32 && size > 1UL << 31)
            throw new ArgumentException($"a 32-bit BAR cannot be {size} bytes", nameof(size));
        var bar = new PciBar(index, size, kind);
        _bars[index] = bar;
        int reg = FirstBarRegister + 4 * index;
        SetU32(reg, bar.TypeBits);
        SetU32Mask(reg, (uint)~(size - 1) & 0xffff_fff0u);
        if (kind == PciBarKind.Memory64)
            SetU32Mask(reg + 4, (uint)(~(size - 1) >> 32));
    }

    /// <summary>
    /// Appends a capability of <paramref name="length"/> bytes (ID and next pointer included) to the
    /// list and returns its offset. The caller fills the body and marks writable bytes.
    /// </summary>
    protected int AddCapability(byte id, int length)
    {
        if (length < 2)
            throw new ArgumentOutOfRangeException(nameof(length));
        int at = (_nextCapability + 3) & ~3;
        if (at + length > ConfigSpaceSize)
            throw new InvalidOperationException($"{Name}: no room for a {length}-byte capability in configuration space");
        _config[at] = id;
        _config[at + 1] = 0;
        _config[_lastCapabilityLink] = (byte)at;
        _lastCapabilityLink = at + 1;
        _nextCapability = at + length;
        SetU16(StatusRegister, (ushort)(GetU16(StatusRegister) | StatusCapabilityList));
        return at;
    }

    /// <summary>Raw access to configuration bytes for subclasses (call under <see cref="ConfigLock"/> after construction).</summary>
    protected Span<byte> ConfigBytes(int offset, int length) => _config.AsSpan(offset, length);

    protected void SetWriteMask(int offset, ReadOnlySpan<byte> mask) => mask.CopyTo(_writeMask.AsSpan(offset));

    protected void SetU16(int offset, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(offset), v);
    protected void SetU32(int offset, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(_config.AsSpan(offset), v);
    protected ushort GetU16(int offset) => BinaryPrimitives.ReadUInt16LittleEndian(_config.AsSpan(offset));
    protected uint GetU32(int offset) => BinaryPrimitives.ReadUInt32LittleEndian(_config.AsSpan(offset));
    protected void SetU16Mask(int offset, ushort m) => BinaryPrimitives.WriteUInt16LittleEndian(_writeMask.AsSpan(offset), m);
    protected void SetU32Mask(int offset, uint m) => BinaryPrimitives.WriteUInt32LittleEndian(_writeMask.AsSpan(offset), m);

    /// <summary>Called under <see cref="ConfigLock"/> after every configuration write.</summary>
    protected virtual void ConfigWritten(int offset, int size, uint value) { }

    /// <summary>Status register bits the function's state sets (such as Interrupt Status), ORed into reads.</summary>
    protected virtual ushort DynamicStatus => 0;

    /// <summary>Lets a subclass answer a configuration read itself (under <see cref="ConfigLock"/>); null reads the bytes.</summary>
    protected virtual uint? ReadConfigOverride(int offset, int size) => null;

    /// <summary>Called under <see cref="ConfigLock"/> when a BAR appears at an address, moves, or stops decoding (null).</summary>
    protected virtual void OnBarMapped(int index, ulong? address) { }

    /// <summary>Called by the bus when the function is plugged into <paramref name="slot"/>.</summary>
    internal void Attach(int slot, IoBus mmio, byte interruptLine)
    {
        lock (ConfigLock)
        {
            Slot = slot;
            _mmio = mmio;
            _config[InterruptLineRegister] = interruptLine;
        }
    }

    /// <summary>Sets a BAR's address, as firmware would before the guest starts.</summary>
    internal void AssignBar(int index, ulong address)
    {
        lock (ConfigLock)
        {
            var bar = _bars[index] ?? throw new ArgumentException($"{Name} has no BAR {index}");
            if (address % bar.Size != 0)
                throw new ArgumentException($"{Name} BAR {index} address 0x{address:x} is not aligned to its size 0x{bar.Size:x}");
            int reg = FirstBarRegister + 4 * index;
            SetU32(reg, (uint)address | bar.TypeBits);
            if (bar.Kind == PciBarKind.Memory64)
                SetU32(reg + 4, (uint)(address >> 32));
            UpdateMappingsLocked();
        }
    }

    private ulong BarAddressLocked(int index)
    {
        var bar = _bars[index];
        if (bar is null)
            return 0;
        int reg = FirstBarRegister + 4 * index;
        ulong address = GetU32(reg) & 0xffff_fff0u;
        if (bar.Kind == PciBarKind.Memory64)
            address |= (ulong)GetU32(reg + 4) << 32;
        return address;
    }

    private void UpdateMappingsLocked()
    {
        bool decode = (GetU16(CommandRegister) & CommandMemorySpace) != 0;
        for (int i = 0; i < 6; i++)
        {
            var bar = _bars[i];
            if (bar is null)
                continue;
            ulong address = BarAddressLocked(i);
            ulong? want = decode && address != 0 && address + bar.Size > address ? address : null;
            if (want == _mapped[i])
                continue;
            if (_mapped[i] is { } old)
                _mmio?.Unregister(old);
            _mapped[i] = null;
            if (want is { } at && _mmio is not null)
            {
                try
                {
                    _mmio.Register(at, bar.Size, new BarWindow(this, i));
                    _mapped[i] = at;
                }
                catch (BusException)
                {
                    // The guest placed the BAR over another device: it decodes nothing until moved,
                    // as on hardware where the conflict would be the guest's problem.
                }
            }
            OnBarMapped(i, _mapped[i]);
        }
    }

    /// <summary>The 256 bytes of configuration space as the guest left them.</summary>
    public byte[] SaveConfig()
    {
        lock (ConfigLock)
            return [.. _config];
    }

    /// <summary>
    /// Takes saved configuration bytes over (BAR addresses, command, capability bodies), then
    /// re-registers the BARs where they say and tells the subclass (<see cref="OnBarMapped"/>).
    /// The read-only bytes (identity, BAR types, capability layout) must match this function's:
    /// a saved function of another kind or layout is refused, naming the first differing offset.
    /// </summary>
    public void RestoreConfig(ReadOnlySpan<byte> config)
    {
        if (config.Length != ConfigSpaceSize)
            throw new Manager.DeviceStateException($"{Name}: saved configuration space has {config.Length} bytes, not {ConfigSpaceSize}");
        lock (ConfigLock)
        {
            for (int i = 0; i < ConfigSpaceSize; i++)
            {
                // The status register is no exception: its dynamic bits are ORed in on reads and
                // never stored, so the stored ones are the fixed ones (Capabilities List) and must match.
                if (((config[i] ^ _config[i]) & ~_writeMask[i]) != 0)
                    throw new Manager.DeviceStateException(
                        $"{Name}: saved configuration byte 0x{i:x2} is 0x{config[i]:x2} where this function has read-only 0x{_config[i]:x2} (another device or layout)");
            }
            config.CopyTo(_config);
            _command = GetU16(CommandRegister);
            UpdateMappingsLocked();
        }
    }

    private static bool ValidAccess(int offset, int size) =>
        size is 1 or 2 or 4 && offset >= 0 && offset + size <= ConfigSpaceSize && offset % size == 0;

    /// <summary>Routes bus accesses in one BAR's range to the function.</summary>
    private sealed class BarWindow(PciFunction function, int index) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data, int vcpuId) => function.ReadBar(index, offset, data);
        public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId) => function.WriteBar(index, offset, data);
    }
}
