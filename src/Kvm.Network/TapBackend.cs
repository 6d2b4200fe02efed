using System.Runtime.InteropServices;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Network;

/// <summary>
/// A tap device as a VM's uplink: one non-blocking fd per queue pair of a multi-queue tap,
/// virtio-net headers on every frame, so the guest's checksum and segmentation
/// offloads go to the host stack as they are. The tap is made when it does not exist (and goes
/// away with the last fd), brought up, and put on a bridge when one is named.
/// </summary>
public sealed class TapBackend : INetBackend
{
    private readonly TapHandle[] _queues;
    private readonly bool[] _attached;

    private TapBackend(string device, TapHandle[] queues)
    {
        Device = device;
        _queues = queues;
        _attached = Enumerable.Repeat(true, queues.Length).ToArray();
    }

    /// <summary>The tap device's name.</summary>
    public string Device { get; }

    public string Name => "tap " + Device;

    public int QueuePairs => _queues.Length;

    /// <summary>
    /// Opens (or makes) the tap <paramref name="name"/> (empty: the kernel picks "tapN") with
    /// <paramref name="pairs"/> queues, sets it up and, when <paramref name="bridge"/> is given,
    /// adds it to that bridge. Throws <see cref="IOException"/> naming the tap and what failed.
    /// </summary>
    public static TapBackend Open(string name, int pairs, string? bridge = null)
    {
        if (pairs < 1)
            throw new ArgumentOutOfRangeException(nameof(pairs), pairs, "a tap needs at least one queue");
        if (System.Text.Encoding.UTF8.GetByteCount(name) >= KvmShim.InterfaceNameSize)
            throw new IOException($"tap name '{name}' is longer than {KvmShim.InterfaceNameSize - 1} bytes");
        var queues = new List<TapHandle>();
        string device = name;
        try
        {
            // Always a multi-queue tap when the VMM makes it: a second process (the new one of a
            // hand-over) can then attach its queues while the first still holds its own. A tap
            // someone made single-queue beforehand takes one fd at a time.
            bool multiQueue = true;
            for (int i = 0; i < pairs; i++)
            {
                TapHandle handle;
                string actual;
                try
                {
                    (handle, actual) = KvmShim.OpenTap(device, multiQueue);
                }
                catch (IOException) when (i == 0 && pairs == 1 && device.Length > 0)
                {
                    multiQueue = false;
                    (handle, actual) = KvmShim.OpenTap(device, multiQueue);
                }
                queues.Add(handle);
                device = actual;
            }
            int rc = KvmShim.InterfaceSetUp(device, 1);
            if (rc < 0)
                throw new IOException($"cannot set tap '{device}' up: {Errno.Describe(-rc)}");
            if (!string.IsNullOrEmpty(bridge) && MasterOf(device) != bridge)
            {
                // (A tap already on the bridge is left there: another process of this VM, such as
                // the one handing it over, put it there.)
                rc = KvmShim.BridgeAdd(bridge, device);
                if (rc < 0)
                    throw new IOException($"cannot add tap '{device}' to bridge '{bridge}': {Errno.Describe(-rc)}" +
                        (rc == -Errno.ENODEV ? $" (is there a bridge '{bridge}'? ip link add {bridge} type bridge)" : ""));
            }
            // The offloads the guest accepts are set once it has negotiated them; until then none.
            foreach (var q in queues)
                Check(KvmShim.TapSetOffload(q, 0), device, "TUNSETOFFLOAD");
            return new TapBackend(device, queues.ToArray());
        }
        catch
        {
            foreach (var q in queues)
                q.Dispose();
            throw;
        }
    }

    /// <summary>The bridge (or other master device) <paramref name="device"/> is enslaved to, or null.</summary>
    public static string? MasterOf(string device)
    {
        var link = new FileInfo($"/sys/class/net/{device}/master");
        return link.Exists || link.LinkTarget is not null ? Path.GetFileName(link.LinkTarget) : null;
    }

    private static void Check(int rc, string device, string what)
    {
        if (rc < 0)
            throw new IOException($"tap '{device}': {what} failed: {Errno.Describe(-rc)}");
    }

    public SafeHandle ReceiveHandle(int pair) => _queues[pair];

    public int Receive(int pair, Span<byte> buffer)
    {
        int n = FdIo.Read(_queues[pair], buffer);
        if (n >= 0)
            return n;
        if (n == -Errno.EAGAIN || n == -Errno.EINTR)
            return 0;
        throw new IOException($"tap '{Device}' queue {pair}: read failed: {Errno.Describe(-n)}");
    }

    public bool Send(int pair, ReadOnlySpan<byte> packet) => FdIo.Write(_queues[pair], packet) == packet.Length;

    public void SetOffloads(NetOffloads offloads)
    {
        uint flags = 0;
        if (offloads.HasFlag(NetOffloads.Checksum))
        {
            flags |= KvmShim.TunOffloadCsum;
            // Segmentation offloads need checksum offload (the kernel refuses them alone).
            if (offloads.HasFlag(NetOffloads.Tso4)) flags |= KvmShim.TunOffloadTso4;
            if (offloads.HasFlag(NetOffloads.Tso6)) flags |= KvmShim.TunOffloadTso6;
            if (offloads.HasFlag(NetOffloads.TsoEcn) && (flags & (KvmShim.TunOffloadTso4 | KvmShim.TunOffloadTso6)) != 0)
                flags |= KvmShim.TunOffloadTsoEcn;
        }
        foreach (var q in _queues)
            Check(KvmShim.TapSetOffload(q, flags), Device, "TUNSETOFFLOAD");
    }

    public void SetActivePairs(int count)
    {
        for (int i = 0; i < _queues.Length; i++)
        {
            bool attach = i < count;
            if (_attached[i] == attach)
                continue;
            Check(KvmShim.TapSetQueue(_queues[i], attach), Device, attach ? "attaching queue " + i : "detaching queue " + i);
            _attached[i] = attach;
        }
    }

    public string? Interface => Device;

    public bool LinkUp
    {
        get
        {
            int flags = KvmShim.InterfaceFlags(Device);
            return flags >= 0 && (flags & KvmShim.InterfaceUp) != 0;
        }
    }

    public void Dispose()
    {
        foreach (var q in _queues)
            q.Dispose();
    }
}
