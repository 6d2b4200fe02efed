using System.Buffers.Binary;
using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;
using Kvm.Hypervisor;

namespace Kvm.Devices.Tests;

/// <summary>A buffer of a descriptor chain as the driver describes it.</summary>
public readonly record struct Buf(ulong Address, uint Length, bool Writable = false);

/// <summary>Where a virtio structure lives, as its vendor capability says.</summary>
public readonly record struct VirtioRegion(int Bar, uint Offset, uint Length);

/// <summary>
/// A virtio 1.2 PCI driver written the way a guest writes one: it finds the structures through the
/// capability list in configuration space, then talks to the device only through BAR accesses
/// (<see cref="PciFunction.ReadBar"/>/<see cref="PciFunction.WriteBar"/>) and guest memory.
/// </summary>
public sealed class VirtioDriver
{
    // Common configuration fields (virtio 1.2, 4.1.4.3).
    public const int DeviceFeatureSelect = 0x00, DeviceFeature = 0x04, DriverFeatureSelect = 0x08, DriverFeature = 0x0c,
        ConfigMsixVector = 0x10, NumQueues = 0x12, DeviceStatus = 0x14, ConfigGeneration = 0x15, QueueSelect = 0x16,
        QueueSize = 0x18, QueueMsixVector = 0x1a, QueueEnable = 0x1c, QueueNotifyOff = 0x1e, QueueDesc = 0x20,
        QueueDriver = 0x28, QueueDevice = 0x30;

    public const byte CapVendor = 0x09, CapMsix = 0x11;
    public const byte CfgCommon = 1, CfgNotify = 2, CfgIsr = 3, CfgDevice = 4, CfgPci = 5;

    private readonly Dictionary<int, ushort> _notifyOff = [];

    public VirtioDriver(PciFunction function, GuestMemory memory)
    {
        Function = function;
        Memory = memory;
        // Walk the capability list as a guest does.
        int seen = 0;
        for (int p = (int)function.ReadConfig(PciFunction.CapabilityPointerRegister, 1) & 0xfc; p != 0 && seen++ < 48;
             p = (int)function.ReadConfig(p + 1, 1) & 0xfc)
        {
            byte id = (byte)function.ReadConfig(p, 1);
            if (id == CapMsix)
                MsixCap = p;
            if (id != CapVendor)
                continue;
            byte type = (byte)function.ReadConfig(p + 3, 1);
            var region = new VirtioRegion((int)function.ReadConfig(p + 4, 1), function.ReadConfig(p + 8, 4), function.ReadConfig(p + 12, 4));
            switch (type)
            {
                case CfgCommon: Common ??= region; break;
                case CfgNotify:
                    if (Notify is null)
                    {
                        Notify = region;
                        NotifyMultiplier = function.ReadConfig(p + 16, 4);
                    }
                    break;
                case CfgIsr: Isr ??= region; break;
                case CfgDevice: DeviceConfig ??= region; break;
                case CfgPci: PciCfgCap ??= p; break;
            }
        }
        if (Common is null || Notify is null || Isr is null || DeviceConfig is null || MsixCap is null)
            throw new InvalidOperationException("the function lacks a virtio structure or MSI-X");
    }

    public PciFunction Function { get; }
    public GuestMemory Memory { get; }
    public VirtioRegion? Common { get; }
    public VirtioRegion? Notify { get; }
    public VirtioRegion? Isr { get; }
    public VirtioRegion? DeviceConfig { get; }
    public uint NotifyMultiplier { get; }
    public int? MsixCap { get; }
    public int? PciCfgCap { get; }

    // ------------------------------------------------------------------ raw structure access

    private void ReadRegion(VirtioRegion? r, int offset, Span<byte> data) => Function.ReadBar(r!.Value.Bar, r.Value.Offset + (ulong)offset, data);
    private void WriteRegion(VirtioRegion? r, int offset, ReadOnlySpan<byte> data) => Function.WriteBar(r!.Value.Bar, r.Value.Offset + (ulong)offset, data);

    public byte Read8(int offset)
    {
        Span<byte> b = stackalloc byte[1];
        ReadRegion(Common, offset, b);
        return b[0];
    }

    public ushort Read16(int offset)
    {
        Span<byte> b = stackalloc byte[2];
        ReadRegion(Common, offset, b);
        return BinaryPrimitives.ReadUInt16LittleEndian(b);
    }

    public uint Read32(int offset)
    {
        Span<byte> b = stackalloc byte[4];
        ReadRegion(Common, offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    /// <summary>A 64-bit field read as two dwords, low first (as Linux does).</summary>
    public ulong Read64(int offset) => Read32(offset) | (ulong)Read32(offset + 4) << 32;

    public void Write8(int offset, byte v) => WriteRegion(Common, offset, [v]);

    public void Write16(int offset, ushort v)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, v);
        WriteRegion(Common, offset, b);
    }

    public void Write32(int offset, uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, v);
        WriteRegion(Common, offset, b);
    }

    /// <summary>A 64-bit field written as two dwords, low first.</summary>
    public void Write64(int offset, ulong v)
    {
        Write32(offset, (uint)v);
        Write32(offset + 4, (uint)(v >> 32));
    }

    public void ReadDeviceConfig(int offset, Span<byte> data) => ReadRegion(DeviceConfig, offset, data);

    public byte ReadIsr()
    {
        Span<byte> b = stackalloc byte[1];
        ReadRegion(Isr, 0, b);
        return b[0];
    }

    // ------------------------------------------------------------------ initialisation (3.1.1)

    public byte Status => Read8(DeviceStatus);

    public void WriteStatus(byte status) => Write8(DeviceStatus, status);

    public ulong DeviceFeatures
    {
        get
        {
            Write32(DeviceFeatureSelect, 0);
            ulong low = Read32(DeviceFeature);
            Write32(DeviceFeatureSelect, 1);
            return low | (ulong)Read32(DeviceFeature) << 32;
        }
    }

    public void WriteDriverFeatures(ulong features)
    {
        Write32(DriverFeatureSelect, 0);
        Write32(DriverFeature, (uint)features);
        Write32(DriverFeatureSelect, 1);
        Write32(DriverFeature, (uint)(features >> 32));
    }

    /// <summary>Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; true when the device kept FEATURES_OK.</summary>
    public bool Negotiate(ulong features)
    {
        Reset();
        WriteStatus(VirtioStatus.Acknowledge);
        WriteStatus(VirtioStatus.Acknowledge | VirtioStatus.Driver);
        WriteDriverFeatures(features);
        WriteStatus(VirtioStatus.Acknowledge | VirtioStatus.Driver | VirtioStatus.FeaturesOk);
        return (Status & VirtioStatus.FeaturesOk) != 0;
    }

    /// <summary>Writes 0 to device_status and waits, as the spec asks, until it reads back 0.</summary>
    public void Reset()
    {
        WriteStatus(0);
        if (!Wait.Until(() => Status == 0))
            throw new TimeoutException("device_status did not read back 0 after reset");
        _notifyOff.Clear();
    }

    /// <summary>Programs queue <paramref name="index"/> with rings at <paramref name="layout"/> and enables it.</summary>
    public SplitQueue SetupQueue(int index, ushort size, ulong baseAddress, ushort msixVector = Virtqueue.NoVector)
    {
        var q = new SplitQueue(Memory, size, baseAddress);
        q.Clear();
        Write16(QueueSelect, (ushort)index);
        Write16(QueueSize, size);
        Write64(QueueDesc, q.Desc);
        Write64(QueueDriver, q.Avail);
        Write64(QueueDevice, q.Used);
        Write16(QueueMsixVector, msixVector);
        Write16(QueueEnable, 1);
        _notifyOff[index] = Read16(QueueNotifyOff);
        return q;
    }

    public void DriverOk() =>
        WriteStatus(VirtioStatus.Acknowledge | VirtioStatus.Driver | VirtioStatus.FeaturesOk | VirtioStatus.DriverOk);

    /// <summary>Writes the queue index to the queue's notify address, as a guest kicks a queue.</summary>
    public void Kick(int queue)
    {
        if (!_notifyOff.TryGetValue(queue, out ushort off))
        {
            Write16(QueueSelect, (ushort)queue);
            off = Read16(QueueNotifyOff);
        }
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)queue);
        WriteRegion(Notify, (int)(off * NotifyMultiplier), b);
    }

    public bool WaitForStatusBits(byte bits, TimeSpan? timeout = null) => Wait.Until(() => (Status & bits) == bits, timeout);

    // ------------------------------------------------------------------ MSI-X (through configuration space)

    /// <summary>Sets MSI-X Enable and Function Mask in the capability's message control.</summary>
    public void SetMsix(bool enabled, bool functionMasked = false)
    {
        int control = MsixCap!.Value + 2;
        uint v = Function.ReadConfig(control, 2) & 0x3fffu;
        v |= enabled ? 0x8000u : 0;
        v |= functionMasked ? 0x4000u : 0;
        Function.WriteConfig(control, 2, v);
    }

    /// <summary>Programs MSI-X table entry <paramref name="vector"/> through BAR accesses.</summary>
    public void ProgramMsixEntry(int vector, ulong address, uint data, bool masked)
    {
        uint table = Function.ReadConfig(MsixCap!.Value + 4, 4);
        int bar = (int)(table & 7);
        ulong at = (table & ~7u) + (ulong)vector * 16;
        Span<byte> b = stackalloc byte[4];
        foreach (var (off, val) in new[] { (0u, (uint)address), (4u, (uint)(address >> 32)), (8u, data), (12u, masked ? 1u : 0u) })
        {
            BinaryPrimitives.WriteUInt32LittleEndian(b, val);
            Function.WriteBar(bar, at + off, b);
        }
    }

    /// <summary>The message each vector is programmed with by <see cref="ProgramAllVectors"/>.</summary>
    public static (ulong Address, uint Data) MessageFor(int vector) => (0xfee0_0000UL | (uint)(vector << 12), 0x40u + (uint)vector);

    /// <summary>Programs and unmasks every vector, then enables MSI-X.</summary>
    public void ProgramAllVectors(int count)
    {
        for (int v = 0; v < count; v++)
        {
            var (a, d) = MessageFor(v);
            ProgramMsixEntry(v, a, d, masked: false);
        }
        SetMsix(true);
    }
}

/// <summary>
/// A split virtqueue as the driver keeps it (virtio 1.2, 2.7): descriptor table, available and used
/// rings in guest memory, free descriptors, and the indices the driver tracks.
/// </summary>
public sealed class SplitQueue
{
    public const ushort Next = 1, Write = 2, Indirect = 4;
    public const ushort AvailNoInterrupt = 1;

    private readonly Stack<ushort> _free = new();
    private readonly Dictionary<ushort, ushort[]> _chains = [];
    private ushort _availIdx;
    private ushort _lastUsed;

    public SplitQueue(GuestMemory memory, ushort size, ulong baseAddress)
    {
        Memory = memory;
        Size = size;
        Desc = baseAddress;
        Avail = Desc + 16UL * size;
        Used = (Avail + 6 + 2UL * size + 4095) & ~4095UL;
    }

    /// <summary>Bytes the rings take from their base address.</summary>
    public static ulong Footprint(ushort size) => ((16UL * size + 6 + 2UL * size + 4095) & ~4095UL) + ((6 + 8UL * size + 4095) & ~4095UL);

    public GuestMemory Memory { get; }
    public ushort Size { get; }
    public ulong Desc { get; }
    public ulong Avail { get; }
    public ulong Used { get; }

    /// <summary>
    /// With RING_EVENT_IDX: after taking used buffers, write used_event = the next used index, as
    /// Linux does when it re-enables callbacks (otherwise the device rightly stops interrupting).
    /// </summary>
    public bool AutoUsedEvent { get; set; }

    /// <summary>RING_EVENT_IDX was negotiated: kicks follow avail_event rather than used->flags.</summary>
    public bool EventIdx { get; set; }

    private ushort _kickedAt;

    /// <summary>
    /// Whether the chains published since the last call need a notification, as Linux's
    /// virtqueue_kick_prepare decides: with EVENT_IDX when avail_event was passed, otherwise unless
    /// the device set VIRTQ_USED_F_NO_NOTIFY. A device that asks not to be notified and then
    /// forgets to look at the ring hangs a driver that follows this.
    /// </summary>
    public bool NeedsKick()
    {
        Interlocked.MemoryBarrier();     // the new avail idx is visible before the device's fields are read
        ushort old = _kickedAt, now = _availIdx;
        _kickedAt = now;
        if (EventIdx)
            return (ushort)(now - AvailEvent - 1) < (ushort)(now - old);
        return (UsedFlags & 1) == 0;
    }

    /// <summary>The driver's next available index (what it last published).</summary>
    public ushort AvailIdx => _availIdx;

    public ushort LastUsed => _lastUsed;

    public int FreeDescriptors => _free.Count;

    /// <summary>Zeroes the rings and frees every descriptor.</summary>
    public void Clear()
    {
        Memory.Clear(Desc, (int)Footprint(Size));
        _free.Clear();
        for (int i = Size - 1; i >= 0; i--)
            _free.Push((ushort)i);
        _chains.Clear();
        _availIdx = 0;
        _lastUsed = 0;
        _kickedAt = 0;
    }

    public void WriteDescriptor(int index, ulong address, uint length, ushort flags, ushort next) =>
        WriteDescriptorAt(Desc + 16UL * (uint)index, address, length, flags, next);

    public void WriteDescriptorAt(ulong at, ulong address, uint length, ushort flags, ushort next)
    {
        Memory.WriteU64(at, address);
        Memory.WriteU32(at + 8, length);
        Memory.WriteU16(at + 12, flags);
        Memory.WriteU16(at + 14, next);
    }

    /// <summary>Puts <paramref name="head"/> in the next available ring slot and publishes it (idx written last).</summary>
    public void Publish(ushort head)
    {
        Memory.WriteU16(Avail + 4 + 2UL * (ushort)(_availIdx % Size), head);
        _availIdx++;
        Interlocked.MemoryBarrier();
        Memory.WriteU16(Avail + 2, _availIdx);
        Interlocked.MemoryBarrier();
    }

    /// <summary>Writes the available index directly (for malformed-input tests).</summary>
    public void SetAvailIdx(ushort idx)
    {
        _availIdx = idx;
        _kickedAt = idx;
        Interlocked.MemoryBarrier();
        Memory.WriteU16(Avail + 2, idx);
        Interlocked.MemoryBarrier();
    }

    /// <summary>Writes an available ring slot without publishing it.</summary>
    public void WriteAvailSlot(int slot, ushort head) => Memory.WriteU16(Avail + 4 + 2UL * (uint)slot, head);

    public ushort AvailFlags
    {
        get => Memory.ReadU16(Avail);
        set { Memory.WriteU16(Avail, value); Interlocked.MemoryBarrier(); }
    }

    /// <summary>used_event (with EVENT_IDX): interrupt me once the used index passes this.</summary>
    public ushort UsedEvent
    {
        get => Memory.ReadU16(Avail + 4 + 2UL * Size);
        set { Memory.WriteU16(Avail + 4 + 2UL * Size, value); Interlocked.MemoryBarrier(); }
    }

    /// <summary>avail_event (with EVENT_IDX), written by the device.</summary>
    public ushort AvailEvent => Memory.VolatileReadU16(Used + 4 + 8UL * Size);

    public ushort UsedIdx => Memory.VolatileReadU16(Used + 2);

    public ushort UsedFlags => Memory.ReadU16(Used);

    /// <summary>Builds a chain of direct descriptors from free ones and publishes it; returns the head.</summary>
    public ushort AddChain(IReadOnlyList<Buf> buffers)
    {
        if (buffers.Count == 0 || buffers.Count > _free.Count)
            throw new InvalidOperationException($"{buffers.Count} descriptors wanted, {_free.Count} free");
        var ids = new ushort[buffers.Count];
        for (int i = 0; i < ids.Length; i++)
            ids[i] = _free.Pop();
        for (int i = 0; i < ids.Length; i++)
        {
            var b = buffers[i];
            bool last = i == ids.Length - 1;
            WriteDescriptor(ids[i], b.Address, b.Length, (ushort)((b.Writable ? Write : 0) | (last ? 0 : Next)), last ? (ushort)0 : ids[i + 1]);
        }
        _chains[ids[0]] = ids;
        Publish(ids[0]);
        return ids[0];
    }

    /// <summary>Writes the buffers as an indirect table at <paramref name="table"/> and publishes one descriptor for it.</summary>
    public ushort AddIndirect(ulong table, IReadOnlyList<Buf> buffers)
    {
        for (int i = 0; i < buffers.Count; i++)
        {
            var b = buffers[i];
            bool last = i == buffers.Count - 1;
            WriteDescriptorAt(table + 16UL * (uint)i, b.Address, b.Length, (ushort)((b.Writable ? Write : 0) | (last ? 0 : Next)), last ? (ushort)0 : (ushort)(i + 1));
        }
        ushort head = _free.Pop();
        WriteDescriptor(head, table, (uint)(16 * buffers.Count), Indirect, 0);
        _chains[head] = [head];
        Publish(head);
        return head;
    }

    /// <summary>Takes a descriptor from the free list, for hand-made chains.</summary>
    public ushort AllocDescriptor() => _free.Pop();

    /// <summary>Reads used ring element <paramref name="slot"/> (modulo the size).</summary>
    public (uint Id, uint Length) ReadUsedElement(ushort position)
    {
        ulong e = Used + 4 + 8UL * (ushort)(position % Size);
        return (Memory.ReadU32(e), Memory.ReadU32(e + 4));
    }

    /// <summary>The used elements the device added since the last call; their descriptors go back to the free list.</summary>
    public List<(uint Id, uint Length)> TakeUsed() => TakeUsed(int.MaxValue);

    /// <summary>Like <see cref="TakeUsed()"/>, at most <paramref name="max"/> elements (the device may be adding more meanwhile).</summary>
    public List<(uint Id, uint Length)> TakeUsed(int max)
    {
        var list = new List<(uint, uint)>();
        ushort idx = UsedIdx;
        Interlocked.MemoryBarrier();
        while (_lastUsed != idx && list.Count < max)
        {
            var e = ReadUsedElement(_lastUsed);
            list.Add(e);
            _lastUsed++;
            if (e.Id < Size && _chains.Remove((ushort)e.Id, out var ids))
                foreach (var id in ids)
                    _free.Push(id);
        }
        if (AutoUsedEvent)
            UsedEvent = _lastUsed;
        return list;
    }

    /// <summary>Waits until the used index is <paramref name="idx"/> (or beyond).</summary>
    public bool WaitForUsedIdx(ushort idx, TimeSpan? timeout = null) =>
        Wait.Until(() => (short)(UsedIdx - idx) >= 0, timeout);

    /// <summary>Waits until the device has used every chain published so far.</summary>
    public bool WaitAllUsed(TimeSpan? timeout = null) => WaitForUsedIdx(_availIdx, timeout);

    /// <summary>
    /// This driver queue (free descriptors, chains in flight, its indices) over
    /// <paramref name="memory"/>, which holds a copy of this one's guest RAM: the driver of a guest
    /// restored into another machine carries on with it.
    /// </summary>
    public SplitQueue CopyOnto(GuestMemory memory)
    {
        var q = new SplitQueue(memory, Size, Desc) { AutoUsedEvent = AutoUsedEvent, EventIdx = EventIdx };
        foreach (var id in _free.Reverse())
            q._free.Push(id);
        foreach (var (head, ids) in _chains)
            q._chains[head] = ids;
        q._availIdx = _availIdx;
        q._lastUsed = _lastUsed;
        q._kickedAt = _kickedAt;
        return q;
    }
}

/// <summary>A bump allocator over a range of guest memory, for request buffers.</summary>
public sealed class GuestArena(GuestMemory memory, ulong start, ulong size)
{
    private ulong _used;

    public GuestMemory Memory => memory;
    public ulong Start => start;
    public ulong End => start + size;

    public ulong Alloc(ulong length, ulong align = 16)
    {
        ulong at = (start + _used + align - 1) & ~(align - 1);
        if (at + length > start + size)
            throw new InvalidOperationException($"guest arena exhausted: 0x{length:x} bytes wanted");
        _used = at + length - start;
        return at;
    }

    public void Reset() => _used = 0;
}
