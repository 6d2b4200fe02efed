using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Pci;

/// <summary>
/// PCI bus 0 behind configuration mechanism #1: the guest writes an address to CONFIG_ADDRESS
/// (port 0xCF8, 32-bit) and accesses the selected dword through CONFIG_DATA (ports 0xCFC-0xCFF).
/// Register the bus on the port-I/O bus at <see cref="ConfigAddressPort"/> for
/// <see cref="PortCount"/> ports. Functions are plugged one per slot (function 0); their BARs are
/// assigned from a 32-bit MMIO window as firmware would, and the guest may move them.
/// </summary>
public sealed class PciBus : IBusDevice, IStatefulDevice
{
    public const ushort ConfigAddressPort = 0xcf8;
    public const ushort ConfigDataPort = 0xcfc;
    public const int PortCount = 8;
    public const int SlotCount = 32;

    private const uint EnableBit = 0x8000_0000;

    private readonly object _lock = new();
    private readonly PciFunction?[] _slots = new PciFunction?[SlotCount];
    private readonly IoBus _mmio;
    private readonly ulong _windowEnd;
    private ulong _nextBar;
    private uint _address;

    /// <param name="mmio">The bus BARs are registered on.</param>
    /// <param name="windowStart">Start of the 32-bit MMIO window BARs are assigned from.</param>
    /// <param name="windowSize">Its size.</param>
    public PciBus(IoBus mmio, ulong windowStart, ulong windowSize)
    {
        _mmio = mmio;
        _nextBar = windowStart;
        _windowEnd = windowStart + windowSize;
        Plug(new PciHostBridge(), 0, 0);
    }

    public IReadOnlyList<PciFunction> Functions
    {
        get { lock (_lock) return _slots.Where(f => f is not null).Select(f => f!).ToArray(); }
    }

    public PciFunction? this[int slot]
    {
        get { lock (_lock) return (uint)slot < SlotCount ? _slots[slot] : null; }
    }

    /// <summary>
    /// Plugs <paramref name="function"/> into the first free slot, assigns its BARs from the window,
    /// and returns the slot. <paramref name="interruptLine"/> is what its Interrupt Line register
    /// says (the GSI its INTx pin is wired to).
    /// </summary>
    public int Add(PciFunction function, byte interruptLine = 0)
    {
        lock (_lock)
        {
            int slot = Array.IndexOf(_slots, null);
            if (slot < 0)
                throw new InvalidOperationException($"PCI bus 0 is full ({SlotCount} slots): cannot add {function.Name}");
            Plug(function, slot, interruptLine);
            return slot;
        }
    }

    private void Plug(PciFunction function, int slot, byte interruptLine)
    {
        function.Attach(slot, _mmio, interruptLine);
        // Largest BARs first keeps natural alignment without holes between small ones.
        foreach (var bar in function.Bars.OrderByDescending(b => b.Size))
        {
            ulong at = (_nextBar + bar.Size - 1) & ~(bar.Size - 1);
            if (at + bar.Size > _windowEnd || at + bar.Size < at)
                throw new InvalidOperationException(
                    $"the PCI MMIO window has no room for {function.Name} BAR {bar.Index} (0x{bar.Size:x} bytes)");
            function.AssignBar(bar.Index, at);
            _nextBar = at + bar.Size;
        }
        _slots[slot] = function;
    }

    public void Read(ulong offset, Span<byte> data, int vcpuId)
    {
        uint value;
        if (offset == 0)
        {
            if (data.Length != 4)
            {
                data.Fill(0xff);
                return;
            }
            lock (_lock)
                value = _address;
        }
        else if (offset >= 4)
        {
            int byteOffset = (int)(offset - 4);
            value = Target(out var function, out int register) && function is not null
                ? function.ReadConfig(register + byteOffset, data.Length)
                : uint.MaxValue;
        }
        else
        {
            data.Fill(0xff);
            return;
        }
        for (int i = 0; i < data.Length; i++)
            data[i] = (byte)(value >> (8 * i));
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data, int vcpuId)
    {
        uint value = 0;
        for (int i = data.Length - 1; i >= 0; i--)
            value = value << 8 | data[i];
        if (offset == 0)
        {
            // Only a dword write reaches CONFIG_ADDRESS; byte writes to 0xCF8-0xCFB are other
            // chipset registers (0xCF9 is reset control on many) and are not modelled.
            if (data.Length == 4)
                lock (_lock)
                    _address = value & 0x80ff_fffc;
            return;
        }
        if (offset >= 4 && Target(out var function, out int register) && function is not null)
            function.WriteConfig(register + (int)(offset - 4), data.Length, value);
    }

    /// <summary>The function and register CONFIG_ADDRESS selects; false when disabled or not bus 0 function 0.</summary>
    private bool Target(out PciFunction? function, out int register)
    {
        uint a;
        lock (_lock)
            a = _address;
        function = null;
        register = (int)(a & 0xfc);
        if ((a & EnableBit) == 0)
            return false;
        int bus = (int)(a >> 16) & 0xff, slot = (int)(a >> 11) & 0x1f, fn = (int)(a >> 8) & 0x7;
        if (bus != 0 || fn != 0)
            return false;
        lock (_lock)
            function = _slots[slot];
        return function is not null;
    }

    public string StateKind => "pci-bus";

    /// <summary>
    /// The bus's own state: CONFIG_ADDRESS and the host bridge's configuration space. The functions
    /// in the other slots are devices of their own, each with its record.
    /// </summary>
    public void SaveState(StateWriter writer)
    {
        uint address;
        lock (_lock)
            address = _address;
        writer.U32(address).Bytes(_slots[0]!.SaveConfig());
    }

    public void RestoreState(ref StateReader reader)
    {
        uint address = reader.U32("config_address");
        byte[] bridge = reader.Bytes("host_bridge_config", PciFunction.ConfigSpaceSize, exact: true);
        _slots[0]!.RestoreConfig(bridge);
        lock (_lock)
            _address = address & 0x80ff_fffc;
    }
}
