namespace Kvm.Devices.Bus;

/// <summary>A registration was refused: empty, wrapping, or overlapping another device.</summary>
public sealed class BusException(string message) : Exception(message);

/// <summary>
/// A bus of address ranges (the port I/O space or the MMIO space). Devices are kept sorted by base
/// address; overlapping registrations are refused. Lookups read an immutable array, so vCPU threads
/// never take a lock to dispatch.
/// </summary>
public sealed class IoBus(string name)
{
    private readonly object _lock = new();
    private Entry[] _entries = [];

    public string Name { get; } = name;

    public readonly record struct Entry(ulong Base, ulong Length, IBusDevice Device)
    {
        public ulong Last => Base + Length - 1;
    }

    public IReadOnlyList<Entry> Entries => Volatile.Read(ref _entries);

    /// <summary>Accesses that no device claimed, for diagnostics.</summary>
    public long UnclaimedAccesses => Interlocked.Read(ref _unclaimed);
    private long _unclaimed;

    public void Register(ulong baseAddress, ulong length, IBusDevice device)
    {
        if (length == 0)
            throw new BusException($"{Name}: cannot register an empty range at 0x{baseAddress:x}");
        if (baseAddress + (length - 1) < baseAddress)
            throw new BusException($"{Name}: range 0x{baseAddress:x}+0x{length:x} wraps around the address space");
        lock (_lock)
        {
            var entry = new Entry(baseAddress, length, device);
            foreach (var e in _entries)
            {
                if (entry.Base <= e.Last && e.Base <= entry.Last)
                    throw new BusException(
                        $"{Name}: range 0x{baseAddress:x}-0x{entry.Last:x} ({device.GetType().Name}) overlaps 0x{e.Base:x}-0x{e.Last:x} ({e.Device.GetType().Name})");
            }
            // Insert in order; the array is replaced whole so readers never see it half-written.
            var next = new Entry[_entries.Length + 1];
            int at = 0;
            while (at < _entries.Length && _entries[at].Base < baseAddress)
                at++;
            Array.Copy(_entries, 0, next, 0, at);
            next[at] = entry;
            Array.Copy(_entries, at, next, at + 1, _entries.Length - at);
            Volatile.Write(ref _entries, next);
        }
    }

    /// <summary>Removes the registration that starts at <paramref name="baseAddress"/>; false if none.</summary>
    public bool Unregister(ulong baseAddress)
    {
        lock (_lock)
        {
            var list = _entries.Where(e => e.Base != baseAddress).ToArray();
            if (list.Length == _entries.Length)
                return false;
            Volatile.Write(ref _entries, list);
            return true;
        }
    }

    /// <summary>The entry whose range holds all of [address, address+length), or null.</summary>
    public Entry? Find(ulong address, int length)
    {
        var entries = Volatile.Read(ref _entries);
        int lo = 0, hi = entries.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            var e = entries[mid];
            if (address < e.Base)
                hi = mid - 1;
            else if (address > e.Last)
                lo = mid + 1;
            else
                return length <= 0 || (ulong)(length - 1) <= e.Last - address ? e : null;
        }
        return null;
    }

    /// <summary>Dispatches a read; an unclaimed read returns all ones (an open bus) and false.</summary>
    public bool Read(ulong address, Span<byte> data, int vcpuId)
    {
        if (Find(address, data.Length) is { } e)
        {
            e.Device.Read(address - e.Base, data, vcpuId);
            return true;
        }
        data.Fill(0xff);
        Interlocked.Increment(ref _unclaimed);
        return false;
    }

    /// <summary>Dispatches a write; an unclaimed write is dropped and returns false.</summary>
    public bool Write(ulong address, ReadOnlySpan<byte> data, int vcpuId)
    {
        if (Find(address, data.Length) is { } e)
        {
            e.Device.Write(address - e.Base, data, vcpuId);
            return true;
        }
        Interlocked.Increment(ref _unclaimed);
        return false;
    }
}
