using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace Kvm.Network;

/// <summary>How a NIC joins a <see cref="BandwidthGroup"/>: the group, its capacity, and what this NIC claims of it.</summary>
public sealed record BandwidthGroupOptions
{
    /// <summary>The group's name (its file in <see cref="BandwidthGroup.DefaultDirectory"/>) or the path of its file.</summary>
    public required string Group { get; init; }

    /// <summary>What the uplink the group shares carries, in bits per second, each way.</summary>
    public required long Capacity { get; init; }

    /// <summary>This NIC's weight against the group's other NICs.</summary>
    public int Shares { get; init; } = BandwidthClaim.DefaultShares;

    /// <summary>Bits per second this NIC keeps while it wants them, sending and receiving.</summary>
    public long TxReservation { get; init; }
    public long RxReservation { get; init; }

    /// <summary>How long a member that stopped updating (its process died or hangs) still counts.</summary>
    public TimeSpan StaleAfter { get; init; } = TimeSpan.FromSeconds(3);

    public const int MaxShares = 100_000;

    /// <summary>Throws <see cref="ArgumentException"/> naming what is wrong.</summary>
    public void Validate()
    {
        if (Group.Length == 0 || !Group.Contains('/') && (Group.Length > 64 || !Group.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.') || Group[0] == '.'))
            throw new ArgumentException($"bandwidth group '{Group}' is neither a name (letters, digits, '-', '_', '.'; at most 64) nor a path");
        if (Capacity <= 0)
            throw new ArgumentException($"bandwidth group {Group}: capacity {Capacity} bit/s is not positive");
        if (Shares is < 1 or > MaxShares)
            throw new ArgumentException($"shares {Shares} is outside 1 to {MaxShares}");
        if (TxReservation < 0 || RxReservation < 0 || TxReservation > Capacity || RxReservation > Capacity)
            throw new ArgumentException($"a reservation (tx {TxReservation}, rx {RxReservation} bit/s) is outside 0 to the group's capacity {Capacity} bit/s");
    }
}

/// <summary>One member of a bandwidth group as the group's file shows it.</summary>
public sealed record BandwidthMember(string Name, int Pid, int Shares, long TxReservation, long RxReservation, long? TxLimit, long? RxLimit,
    long TxUsed, long RxUsed, bool TxBacklogged, bool RxBacklogged, long TxRate, long RxRate);

/// <summary>
/// NICs of several VMs (several VMM processes) that share one uplink, dividing its capacity by
/// <see cref="BandwidthAllocator"/>. There is no coordinator: the group is a small file (a header
/// and one slot per member) that each member's VMM updates every period under an exclusive lock
/// (flock): it writes what it used and whether its bucket held it back, reads every live member's
/// claim, computes every member's rate with the same pure function, and sets its own buckets to its
/// own. A VMM that dies stops updating its slot and drops out of the sum after
/// <see cref="BandwidthGroupOptions.StaleAfter"/>. So VMs started alone (`vmctl run`) share as well
/// as VMs under kvmd, and nothing stalls when kvmd restarts.
/// </summary>
public sealed class BandwidthGroup : IDisposable
{
    private static readonly byte[] Magic = "KVMBWG01"u8.ToArray();
    public const int Slots = 64, SlotSize = 128, HeaderSize = 64, FileSize = HeaderSize + Slots * SlotSize;
    private const int NameSize = 24;

    private readonly BandwidthGroupOptions _options;
    private readonly long? _txLimit, _rxLimit;
    private readonly long _id;
    private readonly string _name;
    private int _slot = -1;
    private bool _disposed;

    /// <summary>Where a group named without a path lives: /run/kvm/bandwidth for root, else under $XDG_RUNTIME_DIR (or /tmp).</summary>
    public static string DefaultDirectory => Environment.IsPrivilegedProcess
        ? "/run/kvm/bandwidth"
        : Path.Combine(Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR") is { Length: > 0 } run ? run : "/tmp", $"kvm-bandwidth-{Environment.UserName}");

    /// <summary>The file of group <paramref name="group"/> (a name or a path).</summary>
    public static string PathOf(string group) => group.Contains('/') ? group : Path.Combine(DefaultDirectory, group);

    /// <summary>Joins (creating the file if need be) as <paramref name="name"/>, claiming the limits given.</summary>
    public BandwidthGroup(BandwidthGroupOptions options, string name, long? txLimit, long? rxLimit)
    {
        options.Validate();
        _options = options;
        _txLimit = txLimit;
        _rxLimit = rxLimit;
        _name = name;
        _id = BinaryPrimitives.ReadInt64LittleEndian(RandomNumberGenerator.GetBytes(8)) | 1;    // never 0 (a free slot)
        FilePath = PathOf(options.Group);
        string? directory = Path.GetDirectoryName(FilePath);
        if (!string.IsNullOrEmpty(directory))
            Directory.CreateDirectory(directory);
        Locked(file => { Claim(file, Now()); return 0; });
    }

    public string FilePath { get; }

    /// <summary>This member's rates after the last <see cref="Update"/> (or the join).</summary>
    public (long Tx, long Rx) Rates { get; private set; }

    /// <summary>The members the last <see cref="Update"/> counted.</summary>
    public IReadOnlyList<BandwidthMember> Members { get; private set; } = [];

    /// <summary>Slots the last <see cref="Update"/> left out because they hold no member's claim (negative or impossible values), each with what is wrong.</summary>
    public IReadOnlyList<string> Malformed { get; private set; } = [];

    /// <summary>What makes slot <paramref name="s"/> (in use) not a member's claim, or null.</summary>
    private static string? ProblemOf(ReadOnlySpan<byte> s, long now)
    {
        int shares = BinaryPrimitives.ReadInt32LittleEndian(s[12..]);
        long stamp = BinaryPrimitives.ReadInt64LittleEndian(s[16..]);
        long txReserve = BinaryPrimitives.ReadInt64LittleEndian(s[24..]), rxReserve = BinaryPrimitives.ReadInt64LittleEndian(s[32..]);
        long txLimit = BinaryPrimitives.ReadInt64LittleEndian(s[40..]), rxLimit = BinaryPrimitives.ReadInt64LittleEndian(s[48..]);
        long txUsed = BinaryPrimitives.ReadInt64LittleEndian(s[56..]), rxUsed = BinaryPrimitives.ReadInt64LittleEndian(s[64..]);
        if (shares is < 1 or > BandwidthGroupOptions.MaxShares)
            return $"shares {shares}";
        if (txReserve < 0 || rxReserve < 0 || txLimit < 0 || rxLimit < 0 || txUsed < 0 || rxUsed < 0)
            return $"reservations {txReserve}/{rxReserve}, limits {txLimit}/{rxLimit}, use {txUsed}/{rxUsed}";
        if (stamp > now + 60_000)
            return $"updated at {stamp} ms, after now ({now} ms)";
        return null;
    }

    private static long Now() => DateTimeOffset.UtcNow.ToUnixTimeMilliseconds();

    /// <summary>
    /// Publishes what this member used in the last period (bits per second) and whether its
    /// buckets held it back, and returns its rates for the next period.
    /// </summary>
    public (long Tx, long Rx) Update(long txUsed, bool txBacklogged, long rxUsed, bool rxBacklogged)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return Locked(file =>
        {
            long now = Now();
            if (ReadId(file, _slot) != _id)
                Claim(file, now);                // counted as gone (we stalled): join again
            WriteSlot(file, _slot, now, txUsed, rxUsed, txBacklogged, rxBacklogged, Rates.Tx, Rates.Rx);
            Rates = Compute(file, now);
            BinaryPrimitives.WriteInt64LittleEndian(file.AsSpan(SlotAt(_slot) + 88), Rates.Tx);
            BinaryPrimitives.WriteInt64LittleEndian(file.AsSpan(SlotAt(_slot) + 96), Rates.Rx);
            return Rates;
        });
    }

    private static int SlotAt(int slot) => HeaderSize + slot * SlotSize;

    private static long ReadId(byte[] file, int slot) => BinaryPrimitives.ReadInt64LittleEndian(file.AsSpan(SlotAt(slot)));

    /// <summary>Takes a free or stale slot and computes the first rates.</summary>
    private void Claim(byte[] file, long now)
    {
        long stale = (long)_options.StaleAfter.TotalMilliseconds;
        int free = -1;
        for (int i = 0; i < Slots && free < 0; i++)
        {
            var s = file.AsSpan(SlotAt(i));
            if (BinaryPrimitives.ReadInt64LittleEndian(s) == 0 || now - BinaryPrimitives.ReadInt64LittleEndian(s[16..]) > stale || ProblemOf(s, now) is not null)
                free = i;
        }
        if (free < 0)
            throw new IOException($"bandwidth group {FilePath}: all {Slots} members' places are taken");
        _slot = free;
        file.AsSpan(SlotAt(free), SlotSize).Clear();
        // A newcomer is held back until it is counted: it starts as wanting more.
        WriteSlot(file, free, now, 0, 0, true, true, 0, 0);
        Rates = Compute(file, now);
    }

    private void WriteSlot(byte[] file, int slot, long now, long txUsed, long rxUsed, bool txBacklogged, bool rxBacklogged, long txRate, long rxRate)
    {
        var s = file.AsSpan(SlotAt(slot), SlotSize);
        BinaryPrimitives.WriteInt64LittleEndian(s, _id);
        BinaryPrimitives.WriteInt32LittleEndian(s[8..], Environment.ProcessId);
        BinaryPrimitives.WriteInt32LittleEndian(s[12..], _options.Shares);
        BinaryPrimitives.WriteInt64LittleEndian(s[16..], now);
        BinaryPrimitives.WriteInt64LittleEndian(s[24..], _options.TxReservation);
        BinaryPrimitives.WriteInt64LittleEndian(s[32..], _options.RxReservation);
        BinaryPrimitives.WriteInt64LittleEndian(s[40..], _txLimit ?? 0);
        BinaryPrimitives.WriteInt64LittleEndian(s[48..], _rxLimit ?? 0);
        BinaryPrimitives.WriteInt64LittleEndian(s[56..], txUsed);
        BinaryPrimitives.WriteInt64LittleEndian(s[64..], rxUsed);
        BinaryPrimitives.WriteInt32LittleEndian(s[72..], (txBacklogged ? 1 : 0) | (rxBacklogged ? 2 : 0));
        BinaryPrimitives.WriteInt64LittleEndian(s[88..], txRate);
        BinaryPrimitives.WriteInt64LittleEndian(s[96..], rxRate);
        var name = s.Slice(104, NameSize);
        name.Clear();
        byte[] bytes = Encoding.UTF8.GetBytes(_name);
        bytes.AsSpan(0, Math.Min(bytes.Length, NameSize)).CopyTo(name);
    }

    private static BandwidthMember ReadMember(ReadOnlySpan<byte> s)
    {
        long txLimit = BinaryPrimitives.ReadInt64LittleEndian(s[40..]), rxLimit = BinaryPrimitives.ReadInt64LittleEndian(s[48..]);
        int flags = BinaryPrimitives.ReadInt32LittleEndian(s[72..]);
        var name = s.Slice(104, NameSize);
        int end = name.IndexOf((byte)0);
        return new BandwidthMember(Encoding.UTF8.GetString(end < 0 ? name : name[..end]), BinaryPrimitives.ReadInt32LittleEndian(s[8..]),
            BinaryPrimitives.ReadInt32LittleEndian(s[12..]), BinaryPrimitives.ReadInt64LittleEndian(s[24..]), BinaryPrimitives.ReadInt64LittleEndian(s[32..]),
            txLimit > 0 ? txLimit : null, rxLimit > 0 ? rxLimit : null, BinaryPrimitives.ReadInt64LittleEndian(s[56..]),
            BinaryPrimitives.ReadInt64LittleEndian(s[64..]), (flags & 1) != 0, (flags & 2) != 0,
            BinaryPrimitives.ReadInt64LittleEndian(s[88..]), BinaryPrimitives.ReadInt64LittleEndian(s[96..]));
    }

    /// <summary>Every live member's claim through the allocator; this member's rates.</summary>
    private (long Tx, long Rx) Compute(byte[] file, long now)
    {
        long stale = (long)_options.StaleAfter.TotalMilliseconds;
        var members = new List<BandwidthMember>();
        var malformed = new List<string>();
        int mine = -1;
        for (int i = 0; i < Slots; i++)
        {
            var s = file.AsSpan(SlotAt(i), SlotSize);
            long id = BinaryPrimitives.ReadInt64LittleEndian(s);
            if (id == 0 || now - BinaryPrimitives.ReadInt64LittleEndian(s[16..]) > stale)
                continue;
            if (ProblemOf(s, now) is { } problem)
            {
                // Not a member's claim (the file was written by something else): it is left out,
                // and its place is taken by the next member to join; the others share as before.
                malformed.Add($"slot {i}: {problem}");
                continue;
            }
            var m = ReadMember(s);
            if (i == _slot)
                mine = members.Count;
            members.Add(m);
        }
        Members = members;
        Malformed = malformed;
        if (mine < 0)
            throw new InvalidDataException($"bandwidth group {FilePath}: this member's slot {_slot} is not a member's claim ({string.Join("; ", malformed)})");
        long capacity = _options.Capacity;
        var tx = BandwidthAllocator.Allocate(capacity, members.Select(m => new BandwidthClaim(m.Shares, m.TxReservation, m.TxLimit, m.TxUsed, m.TxBacklogged)).ToArray());
        var rx = BandwidthAllocator.Allocate(capacity, members.Select(m => new BandwidthClaim(m.Shares, m.RxReservation, m.RxLimit, m.RxUsed, m.RxBacklogged)).ToArray());
        // A rate of 0 (reservations fill the uplink) would stop the NIC for good: keep a trickle.
        return (Math.Max(tx[mine], (long)BandwidthAllocator.MinimumRate), Math.Max(rx[mine], (long)BandwidthAllocator.MinimumRate));
    }

    /// <summary>Opens the group's file exclusively (waiting for another member's update), reads it whole, runs <paramref name="work"/> on it and writes it back.</summary>
    private T Locked<T>(Func<byte[], T> work)
    {
        FileStream? stream = null;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        while (stream is null)
        {
            try
            {
                stream = new FileStream(FilePath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (IOException) when (DateTime.UtcNow < deadline && File.Exists(FilePath))
            {
                Thread.Sleep(1);        // another member is updating (it holds the lock for microseconds)
            }
        }
        using (stream)
        {
            var file = new byte[FileSize];
            int n = RandomAccess.Read(stream.SafeFileHandle, file, 0);
            if (n == 0)
            {
                Magic.CopyTo(file, 0);
                BinaryPrimitives.WriteInt64LittleEndian(file.AsSpan(8), _options.Capacity);
            }
            else if (n != FileSize || !file.AsSpan(0, 8).SequenceEqual(Magic))
                throw new InvalidDataException($"bandwidth group {FilePath}: not a bandwidth group file ({n} bytes, magic '{Encoding.ASCII.GetString(file, 0, Math.Min(n, 8))}'; expected {FileSize} bytes starting 'KVMBWG01')");
            else if (BinaryPrimitives.ReadInt64LittleEndian(file.AsSpan(8)) is var capacity && capacity != _options.Capacity)
                throw new InvalidDataException($"bandwidth group {FilePath} shares {capacity} bit/s; this NIC says {_options.Capacity} bit/s");
            var result = work(file);
            RandomAccess.Write(stream.SafeFileHandle, file, 0);
            return result;
        }
    }

    /// <summary>Leaves the group: the slot is freed, the others share what it had.</summary>
    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        try
        {
            Locked(file =>
            {
                if (_slot >= 0 && ReadId(file, _slot) == _id)
                    file.AsSpan(SlotAt(_slot), SlotSize).Clear();
                return 0;
            });
        }
        catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException)
        {
            // The slot goes stale by itself.
        }
    }
}
