using System.Buffers.Binary;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Virtio;

/// <summary>
/// A split virtqueue (virtio 1.2, 2.7): its configuration as the driver wrote it through the
/// transport, and, once activated, the device side of the rings. Every index, address and length
/// read from guest memory is checked before use; a broken rule raises
/// <see cref="VirtqueueException"/>, after which the queue must not be used until the device is
/// reset. After activation only one thread (the queue's worker) may pop and push.
/// </summary>
public sealed class Virtqueue
{
    public const ushort NoVector = 0xffff;

    private const ushort DescNext = 1, DescWrite = 2, DescIndirect = 4;
    private const ushort AvailNoInterrupt = 1;
    private const ushort UsedNoNotify = 1;
    private const int DescriptorSize = 16;

    private GuestMemory? _memory;
    private bool _eventIdx;
    private bool _indirect;
    private ushort _lastAvail;
    private ushort _nextUsed;
    private ushort _signalledUsed;
    private bool _signalledValid;
    private bool _short;            // the device gave chains back (Unpop) for want of more, seen up to _shortAt
    private ushort _shortAt;
    private readonly DescriptorChain _chain = new();

    public Virtqueue(int index, ushort maxSize)
    {
        if (maxSize == 0 || !ushort.IsPow2(maxSize) || maxSize > 32768)
            throw new ArgumentOutOfRangeException(nameof(maxSize), maxSize, "a split queue's size is a power of two up to 32768");
        Index = index;
        MaxSize = maxSize;
        Reset();
    }

    public int Index { get; }
    public ushort MaxSize { get; }

    // Configuration the driver writes through the transport before DRIVER_OK.
    public ushort Size { get; set; }
    public bool Enabled { get; set; }
    public ulong DescTable { get; set; }
    public ulong AvailRing { get; set; }
    public ulong UsedRing { get; set; }

    /// <summary>The MSI-X vector for this queue's interrupts (read by workers without a lock).</summary>
    public ushort MsixVector
    {
        get => Volatile.Read(ref _msixVector);
        set => Volatile.Write(ref _msixVector, value);
    }
    private ushort _msixVector;

    public bool IsActive => _memory is not null;

    /// <summary>Back to the reset state the transport shows the driver.</summary>
    public void Reset()
    {
        Size = MaxSize;
        Enabled = false;
        DescTable = AvailRing = UsedRing = 0;
        MsixVector = NoVector;
        _memory = null;
        _lastAvail = _nextUsed = _signalledUsed = 0;
        _signalledValid = false;
        _short = false;
    }

    /// <summary>
    /// Checks the ring addresses and size the driver wrote and starts using them. Throws
    /// <see cref="VirtqueueException"/> naming the field when they are not valid.
    /// </summary>
    public void Activate(GuestMemory memory, bool eventIdx, bool indirect)
    {
        if (Size == 0 || Size > MaxSize || !ushort.IsPow2(Size))
            throw new VirtqueueException($"queue {Index}: size {Size} is not a power of two up to {MaxSize}");
        CheckRing(memory, "descriptor table", DescTable, (ulong)Size * DescriptorSize, 16);
        CheckRing(memory, "available ring", AvailRing, 6 + 2UL * Size, 2);
        CheckRing(memory, "used ring", UsedRing, 6 + 8UL * Size, 4);
        _eventIdx = eventIdx;
        _indirect = indirect;
        _lastAvail = _nextUsed = _signalledUsed = 0;
        _signalledValid = false;
        _short = false;
        _memory = memory;
    }

    /// <summary>The queue's configuration and, when active, where the device is in its rings.</summary>
    public VirtqueueState Save() => new(Size, Enabled, DescTable, AvailRing, UsedRing, MsixVector, IsActive,
        _lastAvail, _nextUsed, _signalledUsed, _signalledValid);

    /// <summary>
    /// Takes <paramref name="state"/> over; an active queue is activated again on
    /// <paramref name="memory"/> (its rings checked as on DRIVER_OK) and carries on where it was.
    /// </summary>
    public void Restore(VirtqueueState state, GuestMemory memory, bool eventIdx, bool indirect)
    {
        if (state.Size > MaxSize)
            throw new Manager.DeviceStateException($"queue {Index}: the saved size {state.Size} is more than this queue's {MaxSize}");
        Reset();
        Size = state.Size;
        Enabled = state.Enabled;
        DescTable = state.DescTable;
        AvailRing = state.AvailRing;
        UsedRing = state.UsedRing;
        MsixVector = state.MsixVector;
        if (!state.Active)
            return;
        Activate(memory, eventIdx, indirect);
        _lastAvail = state.LastAvail;
        _nextUsed = state.NextUsed;
        _signalledUsed = state.SignalledUsed;
        _signalledValid = state.SignalledValid;
    }

    /// <summary>Stops using guest memory (device reset).</summary>
    public void Deactivate() => _memory = null;

    private void CheckRing(GuestMemory memory, string name, ulong address, ulong length, ulong align)
    {
        if (address % align != 0)
            throw new VirtqueueException($"queue {Index}: {name} address 0x{address:x} is not {align}-byte aligned");
        if (!memory.IsValid(address, length))
            throw new VirtqueueException($"queue {Index}: {name} 0x{address:x}+0x{length:x} is outside guest RAM");
    }

    private GuestMemory Memory => _memory ?? throw new InvalidOperationException($"queue {Index} is not active");

    /// <summary>How many chains the driver has made available and the device has not taken.</summary>
    public int Pending
    {
        get
        {
            ushort avail = ReadAvailIdx();
            ushort n = (ushort)(avail - _lastAvail);
            if (n > Size)
                throw new VirtqueueException($"queue {Index}: available index {avail} is {n} entries ahead of {_lastAvail}, more than the queue size {Size}");
            return n;
        }
    }

    /// <summary>Takes the next available chain; false when there is none.</summary>
    public bool TryPop(out DescriptorChain chain)
    {
        chain = _chain;
        if (Pending == 0)
            return false;
        var mem = Memory;
        ushort head = mem.ReadU16(AvailRing + 4 + 2UL * (ushort)(_lastAvail % Size));
        _lastAvail++;
        _short = false;
        Walk(head, chain);
        return true;
    }

    /// <summary>
    /// Gives back the last <paramref name="count"/> chains taken and not pushed, because the ring
    /// ran out before the device had enough (<see cref="TryPop"/> returned false): the next
    /// <see cref="TryPop"/> takes them again (the driver does not reuse an entry before it is
    /// used). Until then <see cref="EnableNotifications"/> waits for chains beyond those, not for
    /// an empty ring, so the worker sleeps rather than taking and giving back the same chains.
    /// </summary>
    public void Unpop(int count)
    {
        if (count < 0 || count > Size)
            throw new ArgumentOutOfRangeException(nameof(count), count, $"queue {Index}: cannot give back {count} chains");
        _shortAt = _lastAvail;
        _short = true;
        _lastAvail = (ushort)(_lastAvail - count);
    }

    /// <summary>Puts a finished chain in the used ring with the number of bytes written into it.</summary>
    public void Push(ushort head, uint writtenLength)
    {
        var mem = Memory;
        ulong elem = UsedRing + 4 + 8UL * (ushort)(_nextUsed % Size);
        mem.WriteU32(elem, head);
        mem.WriteU32(elem + 4, writtenLength);
        _nextUsed++;
        // Release: the element is visible before the index that publishes it.
        mem.VolatileWriteU16(UsedRing + 2, _nextUsed);
    }

    /// <summary>
    /// Puts several finished chains in the used ring and publishes them with one index update, so
    /// the driver sees all of them or none: a received frame spread over several buffers
    /// (MRG_RXBUF) must not be seen in part, or the driver reads a frame whose num_buffers says
    /// more buffers than it has yet and drops it (Linux counts it as a length error).
    /// </summary>
    public void Push(ReadOnlySpan<(ushort Head, uint Length)> chains)
    {
        if (chains.Length > Size)
            throw new ArgumentOutOfRangeException(nameof(chains), chains.Length, $"queue {Index}: cannot push {chains.Length} chains into a ring of {Size}");
        var mem = Memory;
        ushort next = _nextUsed;
        foreach (var (head, length) in chains)
        {
            ulong elem = UsedRing + 4 + 8UL * (ushort)(next % Size);
            mem.WriteU32(elem, head);
            mem.WriteU32(elem + 4, length);
            next++;
        }
        _nextUsed = next;
        mem.VolatileWriteU16(UsedRing + 2, _nextUsed);
    }

    /// <summary>
    /// Whether the driver wants an interrupt for the chains pushed since the last interrupt: with
    /// RING_EVENT_IDX, when used_event was crossed; otherwise unless it set NO_INTERRUPT.
    /// </summary>
    public bool ShouldInterrupt()
    {
        // The used index store must be visible before the driver's suppression fields are read.
        Interlocked.MemoryBarrier();
        ushort used = _nextUsed;
        if (!_eventIdx)
        {
            bool any = !_signalledValid || used != _signalledUsed;
            _signalledUsed = used;
            _signalledValid = true;
            return any && (Memory.VolatileReadU16(AvailRing) & AvailNoInterrupt) == 0;
        }
        ushort old = _signalledUsed;
        bool valid = _signalledValid;
        _signalledUsed = used;
        _signalledValid = true;
        ushort usedEvent = Memory.VolatileReadU16(AvailRing + 4 + 2UL * Size);
        return !valid || (ushort)(used - usedEvent - 1) < (ushort)(used - old);
    }

    /// <summary>
    /// Asks the driver to notify again for new chains (with RING_EVENT_IDX: sets avail_event to
    /// the next entry; without it: clears NO_NOTIFY) and returns true if the queue is empty, false
    /// if chains arrived meanwhile (process them first). After an <see cref="Unpop"/>, chains
    /// given back do not count: true unless chains arrived beyond them.
    /// </summary>
    public bool EnableNotifications()
    {
        ushort next = _short ? _shortAt : _lastAvail;
        if (_eventIdx)
            Memory.VolatileWriteU16(UsedRing + 4 + 8UL * Size, next);
        else
            Memory.VolatileWriteU16(UsedRing, 0);
        Interlocked.MemoryBarrier();
        int pending = Pending;
        return (ushort)(_lastAvail + pending) == next;
    }

    /// <summary>
    /// Tells the driver it need not notify for a while (the device is polling the ring): with
    /// RING_EVENT_IDX, avail_event is simply left behind; without it, NO_NOTIFY is set.
    /// </summary>
    public void DisableNotifications()
    {
        if (!_eventIdx)
            Memory.VolatileWriteU16(UsedRing, UsedNoNotify);
    }

    /// <summary>
    /// The queue's positions in one line, for a report on a guest that stopped making progress:
    /// the device's (next available entry, next used entry, last used index signalled) and the
    /// driver's (its available index, the used index it sees, its flags and event indexes). Read
    /// without a lock, so a snapshot of a moving queue; reads no descriptor.
    /// </summary>
    public string Describe()
    {
        if (_memory is not { } mem)
            return $"queue {Index}: inactive (size {Size}, {(Enabled ? "enabled" : "disabled")})";
        string Field(ulong gpa) => mem.IsValid(gpa, 2) ? mem.VolatileReadU16(gpa).ToString() : "?";
        return $"queue {Index}: size {Size} vector {MsixVector}; device next-avail {_lastAvail} next-used {_nextUsed} " +
               $"signalled {(_signalledValid ? _signalledUsed.ToString() : "none")}{(_short ? $" short-at {_shortAt}" : "")}; " +
               $"driver avail-idx {Field(AvailRing + 2)} avail-flags {Field(AvailRing)} used-idx {Field(UsedRing + 2)} used-flags {Field(UsedRing)}" +
               (_eventIdx ? $" used-event {Field(AvailRing + 4 + 2UL * Size)} avail-event {Field(UsedRing + 4 + 8UL * Size)}" : "");
    }

    // Ring fields are read and written through GuestMemory, whose writes mark their pages.
    private ushort ReadAvailIdx() => Memory.VolatileReadU16(AvailRing + 2);

    private void Walk(ushort head, DescriptorChain chain)
    {
        chain.Clear(head);
        if (head >= Size)
            throw new VirtqueueException($"queue {Index}: available ring entry {head} is not below the queue size {Size}");
        var mem = Memory;
        ulong table = DescTable;
        int tableSize = Size;
        bool inIndirect = false;
        int budget = Size;          // descriptors a chain may use in all, indirect ones included
        ushort index = head;
        Span<byte> desc = stackalloc byte[DescriptorSize];
        bool sawWritable = false;

        while (true)
        {
            if (--budget < 0)
                throw new VirtqueueException($"queue {Index}: descriptor chain from head {head} is longer than the queue size {Size} (a loop?)");
            mem.Read(table + (ulong)index * DescriptorSize, desc);
            ulong addr = BinaryPrimitives.ReadUInt64LittleEndian(desc);
            uint len = BinaryPrimitives.ReadUInt32LittleEndian(desc[8..]);
            ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(desc[12..]);
            ushort next = BinaryPrimitives.ReadUInt16LittleEndian(desc[14..]);

            if ((flags & DescIndirect) != 0)
            {
                if (!_indirect)
                    throw new VirtqueueException($"queue {Index}: descriptor {index} is indirect, but INDIRECT_DESC was not negotiated");
                if (inIndirect)
                    throw new VirtqueueException($"queue {Index}: indirect table holds an indirect descriptor (nesting is not allowed)");
                if ((flags & DescNext) != 0)
                    throw new VirtqueueException($"queue {Index}: descriptor {index} has both INDIRECT and NEXT set");
                if (len == 0 || len % DescriptorSize != 0)
                    throw new VirtqueueException($"queue {Index}: indirect table length {len} is not a non-zero multiple of 16");
                budget++;           // the indirect descriptor itself carries no buffer
                if (len / DescriptorSize > (uint)budget)
                    throw new VirtqueueException($"queue {Index}: indirect table of {len / DescriptorSize} descriptors makes the chain longer than the queue size {Size}");
                if (!mem.IsValid(addr, len))
                    throw new VirtqueueException($"queue {Index}: indirect table 0x{addr:x}+0x{len:x} is outside guest RAM");
                table = addr;
                tableSize = (int)(len / DescriptorSize);
                inIndirect = true;
                index = 0;
                continue;
            }

            bool writable = (flags & DescWrite) != 0;
            if (!writable && sawWritable)
                throw new VirtqueueException($"queue {Index}: device-readable descriptor {index} follows a device-writable one");
            sawWritable |= writable;
            if (len > 0)
            {
                if (addr + len < addr)
                    throw new VirtqueueException($"queue {Index}: descriptor {index} range 0x{addr:x}+0x{len:x} wraps around");
                if (!mem.IsValid(addr, len))
                    throw new VirtqueueException($"queue {Index}: descriptor {index} buffer 0x{addr:x}+0x{len:x} is outside guest RAM");
                chain.Add(new ChainSegment(addr, len, writable));
            }

            if ((flags & DescNext) == 0)
                return;
            if (next >= tableSize)
                throw new VirtqueueException($"queue {Index}: descriptor {index} points to next {next}, beyond the {(inIndirect ? "indirect table" : "queue")} size {tableSize}");
            index = next;
        }
    }
}

/// <summary>The state of a <see cref="Virtqueue"/>: what the driver configured and the device's ring positions.</summary>
public sealed record VirtqueueState(ushort Size, bool Enabled, ulong DescTable, ulong AvailRing, ulong UsedRing, ushort MsixVector,
    bool Active, ushort LastAvail, ushort NextUsed, ushort SignalledUsed, bool SignalledValid)
{
    public void Write(StateWriter w) => w.U16(Size).Bool(Enabled).U64(DescTable).U64(AvailRing).U64(UsedRing).U16(MsixVector)
        .Bool(Active).U16(LastAvail).U16(NextUsed).U16(SignalledUsed).Bool(SignalledValid);

    public static VirtqueueState Read(ref StateReader r) => new(r.U16("queue_size"), r.Bool("queue_enabled"),
        r.U64("queue_desc"), r.U64("queue_avail"), r.U64("queue_used"), r.U16("queue_msix_vector"), r.Bool("queue_active"),
        r.U16("queue_last_avail"), r.U16("queue_next_used"), r.U16("queue_signalled_used"), r.Bool("queue_signalled_valid"));
}
