using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Kvm.Interop.Native;

namespace Kvm.Hypervisor;

/// <summary>How guest RAM is backed.</summary>
public enum HugePageMode
{
    /// <summary>Ordinary 4 KiB pages.</summary>
    None,
    /// <summary>Transparent huge pages requested with madvise(MADV_HUGEPAGE).</summary>
    Transparent,
    /// <summary>Pages from the hugetlb pool (MAP_HUGETLB), reserved by the administrator.</summary>
    HugeTlb,
}

/// <summary>One contiguous range of guest-physical RAM and the host mapping behind it.</summary>
public sealed class GuestMemoryRegion
{
    internal GuestMemoryRegion(ulong guestAddress, ulong size, IntPtr host)
    {
        GuestAddress = guestAddress;
        Size = size;
        Host = host;
    }

    public ulong GuestAddress { get; }
    public ulong Size { get; }
    public ulong End => GuestAddress + Size;
    public IntPtr Host { get; }

    public bool Contains(ulong gpa, ulong length) =>
        gpa >= GuestAddress && length <= Size && gpa - GuestAddress <= Size - length;
}

/// <summary>A guest address or range that is not in guest RAM.</summary>
public sealed class GuestMemoryException(string message) : Exception(message);

/// <summary>
/// Guest RAM: anonymous mappings (MAP_NORESERVE) placed at guest-physical addresses.
/// Every access is bounds-checked, since addresses often come from the guest.
/// </summary>
public sealed unsafe class GuestMemory : IDisposable
{
    public const ulong PageSize = 4096;
    private readonly GuestMemoryRegion[] _regions;
    private bool _disposed;

    private GuestMemory(GuestMemoryRegion[] regions, HugePageMode mode)
    {
        _regions = regions;
        HugePages = mode;
        // Every window is made up front: workers on several threads read them without a lock.
        _windows = new Memory<byte>[regions.Length][];
        for (int i = 0; i < regions.Length; i++)
        {
            var r = regions[i];
            var list = new Memory<byte>[(r.Size + MemoryWindow - 1) / MemoryWindow];
            for (ulong w = 0; w < (ulong)list.Length; w++)
            {
                ulong start = w * MemoryWindow;
                list[w] = new NativeMemory((byte*)r.Host + start, (int)Math.Min(MemoryWindow, r.Size - start)).Memory;
            }
            _windows[i] = list;
        }
    }

    public IReadOnlyList<GuestMemoryRegion> Regions => _regions;
    public HugePageMode HugePages { get; }
    public ulong TotalSize
    {
        get
        {
            ulong total = 0;
            foreach (var r in _regions)
                total += r.Size;
            return total;
        }
    }

    /// <summary>Maps guest RAM for the given (guest address, size) ranges.</summary>
    public static GuestMemory Create(IReadOnlyList<(ulong GuestAddress, ulong Size)> layout, HugePageMode mode = HugePageMode.None)
    {
        ulong total = 0;
        for (int i = 0; i < layout.Count; i++)
            total += layout[i].Size;
        CheckHostCanGive(total, mode);
        var regions = new GuestMemoryRegion[layout.Count];
        int mapped = 0;
        try
        {
            ulong align = mode == HugePageMode.None ? PageSize : 2UL << 20;
            for (; mapped < layout.Count; mapped++)
            {
                var (gpa, size) = layout[mapped];
                if (size == 0 || size % align != 0 || gpa % align != 0)
                    throw new GuestMemoryException($"guest RAM range 0x{gpa:x}+0x{size:x} is not aligned to {align} bytes");
                regions[mapped] = new GuestMemoryRegion(gpa, size, Map(size, mode));
            }
            Array.Sort(regions, static (a, b) => a.GuestAddress.CompareTo(b.GuestAddress));
            return new GuestMemory(regions, mode);
        }
        catch
        {
            for (int i = 0; i < mapped; i++)
                Libc.Munmap(regions[i].Host, (nuint)regions[i].Size);
            throw;
        }
    }

    private static IntPtr Map(ulong size, HugePageMode mode)
    {
        int flags = Libc.MapPrivate | Libc.MapAnonymous | Libc.MapNoReserve;
        if (mode == HugePageMode.HugeTlb)
            flags |= Libc.MapHugeTlb;
        IntPtr p = Libc.Mmap(IntPtr.Zero, (nuint)size, Libc.ProtRead | Libc.ProtWrite, flags, -1, 0);
        if (p == Libc.MapFailed)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new GuestMemoryException(mode == HugePageMode.HugeTlb
                ? $"cannot map {FormatSize(size)} of guest RAM from hugetlb pages: {Errno.Describe(errno)} (is /proc/sys/vm/nr_hugepages large enough?)"
                : $"cannot map {FormatSize(size)} of guest RAM: {Errno.Describe(errno)}");
        }
        if (mode == HugePageMode.Transparent && Libc.Madvise(p, (nuint)size, Libc.MadvHugePage) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            Libc.Munmap(p, (nuint)size);
            throw new GuestMemoryException($"transparent huge pages are not available: madvise(MADV_HUGEPAGE) failed: {Errno.Describe(errno)}");
        }
        return p;
    }

    /// <summary>Refuses sizes the host cannot back, before anything is mapped.</summary>
    public static void CheckHostCanGive(ulong size, HugePageMode mode)
    {
        if (mode == HugePageMode.HugeTlb)
        {
            ulong free = MeminfoValue("HugePages_Free") * MeminfoValue("Hugepagesize") * 1024;
            if (size > free)
                throw new GuestMemoryException(
                    $"guest memory {FormatSize(size)} needs hugetlb pages but only {FormatSize(free)} are free (raise /proc/sys/vm/nr_hugepages)");
            return;
        }
        if (mode == HugePageMode.Transparent && ReadThpMode() == "never")
            throw new GuestMemoryException("transparent huge pages are disabled on this host (/sys/kernel/mm/transparent_hugepage/enabled is 'never')");
        ulong total = MeminfoValue("MemTotal") * 1024;
        if (total != 0 && size > total)
            throw new GuestMemoryException($"guest memory {FormatSize(size)} is larger than the host's memory ({FormatSize(total)})");
    }

    /// <summary>The number on a /proc/meminfo line ("MemTotal:  24576 kB" gives 24576); 0 if absent.</summary>
    private static ulong MeminfoValue(string key)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
            {
                if (line.Length <= key.Length || line[key.Length] != ':' || !line.StartsWith(key, StringComparison.Ordinal))
                    continue;
                var rest = line.AsSpan(key.Length + 1).Trim();
                int end = rest.IndexOf(' ');
                return ulong.TryParse(end < 0 ? rest : rest[..end], out ulong v) ? v : 0;
            }
        }
        catch (IOException)
        {
        }
        return 0;
    }

    private static string ReadThpMode()
    {
        try
        {
            string s = File.ReadAllText("/sys/kernel/mm/transparent_hugepage/enabled");
            int a = s.IndexOf('['), b = s.IndexOf(']');
            return a >= 0 && b > a ? s[(a + 1)..b] : s.Trim();
        }
        catch (IOException)
        {
            return "unknown";
        }
    }

    /// <summary>A size for messages: whole GiB or MiB when exact, else the byte count with an approximation.</summary>
    public static string FormatSize(ulong bytes) => bytes switch
    {
        >= 1UL << 30 when bytes % (1UL << 30) == 0 => $"{bytes >> 30} GiB",
        >= 1UL << 20 when bytes % (1UL << 20) == 0 => $"{bytes >> 20} MiB",
        >= 1UL << 30 => $"{bytes} bytes ({bytes / (double)(1UL << 30):0.0} GiB)",
        >= 1UL << 20 => $"{bytes} bytes ({bytes / (double)(1UL << 20):0.0} MiB)",
        _ => $"{bytes} bytes",
    };

    /// <summary>The region holding [gpa, gpa+length), or null.</summary>
    public GuestMemoryRegion? FindRegion(ulong gpa, ulong length = 1)
    {
        foreach (var r in _regions)
            if (r.Contains(gpa, length))
                return r;
        return null;
    }

    /// <summary>True when [gpa, gpa+length) lies inside one RAM region.</summary>
    public bool IsValid(ulong gpa, ulong length) => FindRegion(gpa, length) is not null;

    /// <summary>A span over guest RAM; throws when the range is not entirely inside one region.</summary>
    public Span<byte> GetSpan(ulong gpa, int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (length < 0)
            throw new GuestMemoryException($"negative length {length} at guest address 0x{gpa:x}");
        var r = FindRegion(gpa, (ulong)length)
            ?? throw new GuestMemoryException($"guest range 0x{gpa:x}+0x{length:x} is outside guest RAM");
        return new Span<byte>((byte*)r.Host + (gpa - r.GuestAddress), length);
    }

    /// <summary>Like <see cref="GetSpan"/>, without throwing.</summary>
    public bool TryGetSpan(ulong gpa, int length, out Span<byte> span)
    {
        span = default;
        if (_disposed || length < 0)
            return false;
        var r = FindRegion(gpa, (ulong)length);
        if (r is null)
            return false;
        span = new Span<byte>((byte*)r.Host + (gpa - r.GuestAddress), length);
        return true;
    }

    /// <summary>Guest RAM is handed out as Memory in windows of this size (Memory lengths are ints).</summary>
    private const ulong MemoryWindow = 1UL << 30;

    private readonly Memory<byte>[][] _windows;

    /// <summary>
    /// Appends guest RAM [gpa, gpa+length) to <paramref name="into"/> as one or more Memory pieces
    /// (split where it crosses a 1 GiB window: Memory lengths are ints), for vectored I/O straight
    /// into guest RAM. Throws when the range is not inside one region. The pieces are only valid
    /// while this object is not disposed.
    /// </summary>
    public void AppendMemory(ulong gpa, ulong length, List<Memory<byte>> into)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (length == 0)
            return;
        int region = 0;
        while (region < _regions.Length && !_regions[region].Contains(gpa, length))
            region++;
        if (region == _regions.Length)
            throw new GuestMemoryException($"guest range 0x{gpa:x}+0x{length:x} is outside guest RAM");
        ulong offset = gpa - _regions[region].GuestAddress;
        while (length > 0)
        {
            ulong window = offset / MemoryWindow, within = offset % MemoryWindow;
            ulong take = Math.Min(length, MemoryWindow - within);
            into.Add(Window(region, window).Slice((int)within, (int)take));
            offset += take;
            length -= take;
        }
    }

    private Memory<byte> Window(int region, ulong index) => _windows[region][index];

    /// <summary>A window of guest RAM as a Memory; the mapping outlives it (GuestMemory unmaps).</summary>
    private sealed class NativeMemory(byte* pointer, int length) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => new(pointer, length);
        public override MemoryHandle Pin(int elementIndex = 0) => new(pointer + elementIndex);
        public override void Unpin() { }
        protected override void Dispose(bool disposing) { }
    }

    public void Write(ulong gpa, ReadOnlySpan<byte> data) => data.CopyTo(GetSpan(gpa, data.Length));
    public void Read(ulong gpa, Span<byte> destination) => GetSpan(gpa, destination.Length).CopyTo(destination);
    public void Clear(ulong gpa, int length) => GetSpan(gpa, length).Clear();

    public byte ReadU8(ulong gpa) => GetSpan(gpa, 1)[0];
    public ushort ReadU16(ulong gpa) => BinaryPrimitives.ReadUInt16LittleEndian(GetSpan(gpa, 2));
    public uint ReadU32(ulong gpa) => BinaryPrimitives.ReadUInt32LittleEndian(GetSpan(gpa, 4));
    public ulong ReadU64(ulong gpa) => BinaryPrimitives.ReadUInt64LittleEndian(GetSpan(gpa, 8));
    public void WriteU8(ulong gpa, byte v) => GetSpan(gpa, 1)[0] = v;
    public void WriteU16(ulong gpa, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(GetSpan(gpa, 2), v);
    public void WriteU32(ulong gpa, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(GetSpan(gpa, 4), v);
    public void WriteU64(ulong gpa, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(GetSpan(gpa, 8), v);

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        foreach (var r in _regions)
            Libc.Munmap(r.Host, (nuint)r.Size);
    }
}
