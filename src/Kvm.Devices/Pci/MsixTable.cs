using System.Buffers.Binary;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Pci;

/// <summary>
/// The MSI-X table and pending-bit array of one PCI function (PCI Local Bus 3.0, section 6.8.2).
/// Each table entry is 16 bytes: message address (low, high), message data, vector control (bit 0:
/// masked). Entries start masked. A vector signalled while it or the whole function is masked
/// sets its pending bit and is sent when unmasked. Thread-safe: vCPU threads program the table
/// while device workers signal vectors.
/// </summary>
public sealed class MsixTable : IDisposable
{
    public const int EntrySize = 16;
    private const uint VectorControlMask = 1;

    private readonly object _lock = new();
    private readonly Entry[] _entries;
    private readonly IMsiVector?[] _vectors;
    private readonly ulong[] _pending;
    private bool _enabled;
    private bool _functionMasked;

    private struct Entry
    {
        public uint AddressLow, AddressHigh, Data, Control;
        public bool Dirty;          // message changed since it was last given to the vector
        public ulong Address => AddressLow | (ulong)AddressHigh << 32;
    }

    public MsixTable(int vectorCount, IMsiController? controller)
    {
        if (vectorCount < 1 || vectorCount > 2048)
            throw new ArgumentOutOfRangeException(nameof(vectorCount), vectorCount, "MSI-X tables hold 1 to 2048 vectors");
        _entries = new Entry[vectorCount];
        for (int i = 0; i < vectorCount; i++)
            _entries[i] = new Entry { Control = VectorControlMask, Dirty = true };
        _vectors = new IMsiVector?[vectorCount];
        if (controller is not null)
            for (int i = 0; i < vectorCount; i++)
                _vectors[i] = controller.CreateVector();
        _pending = new ulong[(vectorCount + 63) / 64];
    }

    public int VectorCount => _entries.Length;

    /// <summary>Bytes the table occupies in its BAR.</summary>
    public ulong TableSize => (ulong)_entries.Length * EntrySize;

    /// <summary>Bytes the pending-bit array occupies in its BAR (whole qwords).</summary>
    public ulong PbaSize => (ulong)_pending.Length * 8;

    /// <summary>MSI-X Enable in the capability's message control.</summary>
    public bool Enabled
    {
        get { lock (_lock) return _enabled; }
    }

    /// <summary>Applies the Enable and Function Mask bits the guest wrote to message control.</summary>
    public void SetControl(bool enabled, bool functionMasked)
    {
        lock (_lock)
        {
            _enabled = enabled;
            _functionMasked = functionMasked;
            if (enabled && !functionMasked)
                for (int i = 0; i < _entries.Length; i++)
                    DeliverIfPendingLocked(i);
        }
    }

    /// <summary>
    /// Signals vector <paramref name="vector"/>. Returns false when MSI-X is disabled (the caller
    /// falls back to INTx) or the vector does not exist; a masked vector becomes pending (true).
    /// </summary>
    public bool Signal(int vector)
    {
        lock (_lock)
        {
            if (!_enabled || (uint)vector >= (uint)_entries.Length)
                return false;
            if (_functionMasked || (_entries[vector].Control & VectorControlMask) != 0)
            {
                _pending[vector / 64] |= 1UL << (vector % 64);
                return true;
            }
            SendLocked(vector);
            return true;
        }
    }

    public bool IsPending(int vector)
    {
        lock (_lock)
            return (uint)vector < (uint)_entries.Length && (_pending[vector / 64] & (1UL << (vector % 64))) != 0;
    }

    public bool IsMasked(int vector)
    {
        lock (_lock)
            return (uint)vector < (uint)_entries.Length && (_entries[vector].Control & VectorControlMask) != 0;
    }

    /// <summary>The message programmed into entry <paramref name="vector"/>.</summary>
    public (ulong Address, uint Data) GetMessage(int vector)
    {
        lock (_lock)
            return (_entries[vector].Address, _entries[vector].Data);
    }

    /// <summary>Reads the table at <paramref name="offset"/> (dword or qword accesses; others read as zero).</summary>
    public void ReadTable(ulong offset, Span<byte> data)
    {
        data.Clear();
        if (!IsAligned(offset, data.Length) || offset + (ulong)data.Length > TableSize)
            return;
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i += 4)
                BinaryPrimitives.WriteUInt32LittleEndian(data[i..], ReadDwordLocked(offset + (ulong)i));
        }
    }

    /// <summary>Writes the table (dword or qword accesses; others are ignored).</summary>
    public void WriteTable(ulong offset, ReadOnlySpan<byte> data)
    {
        if (!IsAligned(offset, data.Length) || offset + (ulong)data.Length > TableSize)
            return;
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i += 4)
                WriteDwordLocked(offset + (ulong)i, BinaryPrimitives.ReadUInt32LittleEndian(data[i..]));
        }
    }

    /// <summary>Reads the pending-bit array; writes to it are ignored (it is read-only).</summary>
    public void ReadPba(ulong offset, Span<byte> data)
    {
        data.Clear();
        if (!IsAligned(offset, data.Length) || offset + (ulong)data.Length > PbaSize)
            return;
        lock (_lock)
        {
            for (int i = 0; i < data.Length; i += 4)
            {
                ulong at = offset + (ulong)i;
                ulong word = _pending[at / 8];
                BinaryPrimitives.WriteUInt32LittleEndian(data[i..], (uint)(at % 8 == 0 ? word : word >> 32));
            }
        }
    }

    /// <summary>Back to the power-on state: every entry masked and cleared, nothing pending, disabled.</summary>
    public void Reset()
    {
        lock (_lock)
        {
            for (int i = 0; i < _entries.Length; i++)
                _entries[i] = new Entry { Control = VectorControlMask, Dirty = true };
            Array.Clear(_pending);
            _enabled = false;
            _functionMasked = false;
        }
    }

    private static bool IsAligned(ulong offset, int length) =>
        (length == 4 || length == 8) && offset % (ulong)length == 0;

    private uint ReadDwordLocked(ulong offset)
    {
        ref var e = ref _entries[offset / EntrySize];
        return (offset % EntrySize) switch
        {
            0 => e.AddressLow,
            4 => e.AddressHigh,
            8 => e.Data,
            _ => e.Control,
        };
    }

    private void WriteDwordLocked(ulong offset, uint value)
    {
        int index = (int)(offset / EntrySize);
        ref var e = ref _entries[index];
        switch (offset % EntrySize)
        {
            case 0:
                e.Dirty |= e.AddressLow != (value & ~3u);
                e.AddressLow = value & ~3u;     // message address is dword-aligned
                break;
            case 4:
                e.Dirty |= e.AddressHigh != value;
                e.AddressHigh = value;
                break;
            case 8:
                e.Dirty |= e.Data != value;
                e.Data = value;
                break;
            default:
                e.Control = value & VectorControlMask;  // other bits are reserved
                break;
        }
        if ((e.Control & VectorControlMask) == 0 && _enabled && !_functionMasked)
        {
            // An unmasked entry: give a changed message to the vector now, on the vCPU thread,
            // rather than later on a worker's signalling path.
            FlushMessageLocked(index);
            DeliverIfPendingLocked(index);
        }
    }

    private void DeliverIfPendingLocked(int index)
    {
        ulong bit = 1UL << (index % 64);
        if ((_pending[index / 64] & bit) == 0 || (_entries[index].Control & VectorControlMask) != 0)
            return;
        _pending[index / 64] &= ~bit;
        SendLocked(index);
    }

    private void SendLocked(int index)
    {
        FlushMessageLocked(index);
        _vectors[index]?.Trigger();
    }

    private void FlushMessageLocked(int index)
    {
        ref var e = ref _entries[index];
        if (!e.Dirty)
            return;
        e.Dirty = false;
        _vectors[index]?.SetMessage(e.Address, e.Data);
    }

    /// <summary>The table, the pending bits and the enable and mask bits as they are now.</summary>
    public MsixState Save()
    {
        lock (_lock)
        {
            var entries = new MsixEntryState[_entries.Length];
            for (int i = 0; i < entries.Length; i++)
            {
                var e = _entries[i];
                entries[i] = new MsixEntryState(e.AddressLow, e.AddressHigh, e.Data, e.Control, Programmed: !e.Dirty);
            }
            return new MsixState(_enabled, _functionMasked, entries, [.. _pending]);
        }
    }

    /// <summary>
    /// Takes <paramref name="state"/> over. Entries whose message had been given to their vector are
    /// given it again (on KVM: their MSI routes are installed), so a vector signalled after the
    /// restore reaches the same destination; pending bits stay pending until unmasked.
    /// </summary>
    public void Restore(MsixState state)
    {
        if (state.Entries.Length != _entries.Length)
            throw new DeviceStateException($"the saved MSI-X table has {state.Entries.Length} vectors, this one {_entries.Length}");
        if (state.Pending.Length != _pending.Length)
            throw new DeviceStateException($"the saved MSI-X pending bits have {state.Pending.Length} words, not {_pending.Length}");
        lock (_lock)
        {
            _enabled = state.Enabled;
            _functionMasked = state.FunctionMasked;
            state.Pending.CopyTo(_pending, 0);
            for (int i = 0; i < _entries.Length; i++)
            {
                var e = state.Entries[i];
                _entries[i] = new Entry { AddressLow = e.AddressLow & ~3u, AddressHigh = e.AddressHigh, Data = e.Data, Control = e.Control & VectorControlMask, Dirty = true };
                if (e.Programmed)
                    FlushMessageLocked(i);
            }
        }
    }

    public void Dispose()
    {
        foreach (var v in _vectors)
            v?.Dispose();
    }
}

/// <summary>One MSI-X table entry; <paramref name="Programmed"/>: its message was given to its vector.</summary>
public readonly record struct MsixEntryState(uint AddressLow, uint AddressHigh, uint Data, uint Control, bool Programmed);

/// <summary>The state of an <see cref="MsixTable"/>.</summary>
public sealed record MsixState(bool Enabled, bool FunctionMasked, MsixEntryState[] Entries, ulong[] Pending)
{
    public void Write(StateWriter w)
    {
        w.Bool(Enabled).Bool(FunctionMasked).U32((uint)Entries.Length);
        foreach (var e in Entries)
            w.U32(e.AddressLow).U32(e.AddressHigh).U32(e.Data).U32(e.Control).Bool(e.Programmed);
        w.U32((uint)Pending.Length);
        foreach (var p in Pending)
            w.U64(p);
    }

    public static MsixState Read(ref StateReader r)
    {
        bool enabled = r.Bool("msix_enabled"), masked = r.Bool("msix_function_masked");
        var entries = new MsixEntryState[r.U32("msix_vectors", 1, 2048)];
        for (int i = 0; i < entries.Length; i++)
            entries[i] = new MsixEntryState(r.U32("msix_address_low"), r.U32("msix_address_high"), r.U32("msix_data"),
                r.U32("msix_control"), r.Bool("msix_programmed"));
        var pending = new ulong[r.U32("msix_pending_words", 1, 32)];
        for (int i = 0; i < pending.Length; i++)
            pending[i] = r.U64("msix_pending");
        return new MsixState(enabled, masked, entries, pending);
    }
}
