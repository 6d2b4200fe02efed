using System.Runtime.InteropServices;
using System.Text;
using Kvm.Interop.Handles;

namespace Kvm.Interop.Native;

/// <summary>Tap devices, host interfaces and waiting on fds. Each returns -errno on failure.</summary>
public static unsafe partial class KvmShim
{
    /// <summary>IFNAMSIZ: interface names are at most 15 bytes.</summary>
    public const int InterfaceNameSize = 16;

    // TUN_F_* offload flags (linux/if_tun.h) for TUNSETOFFLOAD.
    public const uint TunOffloadCsum = 0x01, TunOffloadTso4 = 0x02, TunOffloadTso6 = 0x04, TunOffloadTsoEcn = 0x08;

    // Interface flags (linux/if.h).
    public const int InterfaceUp = 0x1, InterfaceRunning = 0x40, InterfaceLowerUp = 0x10000;

    [LibraryImport(Library, EntryPoint = "kvmshim_tap_open", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int TapOpen(string name, int multiQueue, byte* outName);

    /// <summary>
    /// Opens a queue of the tap device <paramref name="name"/> (created when missing; empty: the
    /// kernel names it), non-blocking, with 12-byte virtio-net headers. Returns the handle and the
    /// device's name, or throws <see cref="IOException"/> naming the device and the cause.
    /// </summary>
    public static (TapHandle Handle, string Name) OpenTap(string name, bool multiQueue)
    {
        byte* outName = stackalloc byte[InterfaceNameSize];
        int fd = TapOpen(name, multiQueue ? 1 : 0, outName);
        if (fd < 0)
            throw new IOException($"cannot open tap device '{name}': {Errno.Describe(-fd)}" + (fd == -Errno.EPERM
                ? " (creating or attaching a tap needs CAP_NET_ADMIN, or a tap made beforehand for this user: ip tuntap add NAME mode tap user USER)"
                : ""));
        var span = new ReadOnlySpan<byte>(outName, InterfaceNameSize);
        int end = span.IndexOf((byte)0);
        return (new TapHandle(fd), Encoding.UTF8.GetString(span[..(end < 0 ? span.Length : end)]));
    }

    [LibraryImport(Library, EntryPoint = "kvmshim_tap_set_offload")]
    private static partial int TapSetOffloadFd(SafeHandle fd, uint flags);

    /// <summary>TUNSETOFFLOAD (TUN_F_* flags): what frames read from the tap may leave undone.</summary>
    public static int TapSetOffload(TapHandle tap, uint flags) => TapSetOffloadFd(tap, flags);

    [LibraryImport(Library, EntryPoint = "kvmshim_tap_set_queue")]
    private static partial int TapSetQueueFd(SafeHandle fd, int attach);

    /// <summary>TUNSETQUEUE: attaches or detaches this queue of a multi-queue tap.</summary>
    public static int TapSetQueue(TapHandle tap, bool attach) => TapSetQueueFd(tap, attach ? 1 : 0);

    [LibraryImport(Library, EntryPoint = "kvmshim_if_index", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int InterfaceIndex(string name);

    [LibraryImport(Library, EntryPoint = "kvmshim_if_flags", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int InterfaceFlags(string name);

    [LibraryImport(Library, EntryPoint = "kvmshim_if_set_up", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int InterfaceSetUp(string name, int up);

    [LibraryImport(Library, EntryPoint = "kvmshim_bridge_add", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int BridgeAdd(string bridge, string name);

    [LibraryImport(Library, EntryPoint = "kvmshim_arp_socket")]
    private static partial int ArpSocket(int ifindex, byte* mac);

    /// <summary>
    /// A non-blocking packet socket on interface <paramref name="device"/> that gets a copy of each
    /// ARP frame addressed to <paramref name="mac"/> crossing it either way (a tap's frames to its
    /// reader included). Throws <see cref="IOException"/> naming the device and the cause.
    /// </summary>
    public static PacketSocketHandle OpenArpSocket(string device, ReadOnlySpan<byte> mac)
    {
        if (mac.Length != 6)
            throw new ArgumentException("a MAC address is 6 bytes", nameof(mac));
        int index = InterfaceIndex(device);
        if (index < 0)
            throw new IOException($"cannot find interface '{device}': {Errno.Describe(-index)}");
        int fd;
        fixed (byte* m = mac)
            fd = ArpSocket(index, m);
        if (fd < 0)
            throw new IOException($"cannot open a packet socket on '{device}': {Errno.Describe(-fd)}" +
                (fd == -Errno.EPERM ? " (ARP probes need CAP_NET_RAW)" : ""));
        return new PacketSocketHandle(fd);
    }

    [LibraryImport(Library, EntryPoint = "kvmshim_packet_socket")]
    private static partial int PacketSocket(int ifindex, byte* mac, int* fanout);

    /// <summary>
    /// A non-blocking packet socket that makes host interface <paramref name="device"/> a VM's
    /// uplink: 10-byte virtio-net headers before every frame both ways, only frames addressed to
    /// <paramref name="mac"/> or a group address received (not the host's own or the VM's sent
    /// ones), the interface told to accept <paramref name="mac"/> and all multicast. With
    /// <paramref name="fanout"/> 0 the socket starts a new fanout group (flows spread by hash)
    /// and <paramref name="fanout"/> becomes its token for the next sockets of the VM, which pass
    /// it to join; null: no fanout. Throws <see cref="IOException"/> naming the device and the cause.
    /// </summary>
    public static PacketSocketHandle OpenPacketSocket(string device, ReadOnlySpan<byte> mac, ref int? fanout)
    {
        if (mac.Length != 6)
            throw new ArgumentException("a MAC address is 6 bytes", nameof(mac));
        int index = InterfaceIndex(device);
        if (index < 0)
            throw new IOException($"cannot find interface '{device}': {Errno.Describe(-index)}");
        int group = fanout ?? -1, fd;
        fixed (byte* m = mac)
            fd = PacketSocket(index, m, &group);
        if (fd < 0)
            throw new IOException($"cannot open a packet socket on '{device}': {Errno.Describe(-fd)}" +
                (fd == -Errno.EPERM ? " (a host interface uplink needs CAP_NET_RAW)" : ""));
        if (fanout is not null)
            fanout = group;
        return new PacketSocketHandle(fd);
    }

    [LibraryImport(Library, EntryPoint = "kvmshim_poll2")]
    private static partial int Poll2(int fd1, int fd2, int timeoutMs);

    /// <summary>
    /// Waits until <paramref name="first"/> or <paramref name="second"/> (when given) is readable,
    /// or <paramref name="timeoutMs"/> passes (negative: no end). Returns bit 1 for the first, bit 2
    /// for the second, 0 on timeout; throws <see cref="IOException"/> when poll fails.
    /// </summary>
    public static int PollRead(SafeHandle first, SafeHandle? second, int timeoutMs)
    {
        bool r1 = false, r2 = false;
        try
        {
            first.DangerousAddRef(ref r1);
            second?.DangerousAddRef(ref r2);
            int rc = Poll2((int)first.DangerousGetHandle(), second is null ? -1 : (int)second.DangerousGetHandle(), timeoutMs);
            if (rc < 0)
                throw new IOException($"poll failed: {Errno.Describe(-rc)}");
            return rc;
        }
        finally
        {
            if (r2)
                second!.DangerousRelease();
            if (r1)
                first.DangerousRelease();
        }
    }
}

/// <summary>read(2) and write(2) on a non-blocking fd, for code outside this project (no unsafe code there).</summary>
public static unsafe partial class FdIo
{
    /// <summary>Reads into <paramref name="buffer"/>: the bytes read, or -errno (-EAGAIN when nothing is waiting).</summary>
    public static int Read(SafeFdHandle fd, Span<byte> buffer)
    {
        fixed (byte* p = buffer)
        {
            nint n = Libc.Read(fd, p, (nuint)buffer.Length);
            return n >= 0 ? (int)n : -Marshal.GetLastPInvokeError();
        }
    }

    [LibraryImport(KvmShim.Library, EntryPoint = "kvmshim_recv_whole")]
    private static partial long RecvWholeRaw(SafeHandle fd, byte* buffer, ulong length);

    /// <summary>Receives one datagram into <paramref name="buffer"/>: its whole length (more than the buffer when it was cut), or -errno.</summary>
    public static int ReceiveDatagram(SafeFdHandle fd, Span<byte> buffer)
    {
        fixed (byte* p = buffer)
            return (int)RecvWholeRaw(fd, p, (ulong)buffer.Length);
    }

    [LibraryImport(KvmShim.Library, EntryPoint = "kvmshim_write2")]
    private static partial long Write2Raw(SafeHandle fd, byte* a, ulong alen, byte* b, ulong blen);

    /// <summary>Writes <paramref name="first"/> and then <paramref name="second"/> as one record (writev): the bytes written, or -errno.</summary>
    public static int Write(SafeFdHandle fd, ReadOnlySpan<byte> first, ReadOnlySpan<byte> second)
    {
        fixed (byte* a = first)
        fixed (byte* b = second)
            return (int)Write2Raw(fd, a, (ulong)first.Length, b, (ulong)second.Length);
    }

    /// <summary>Writes <paramref name="data"/>: the bytes written, or -errno.</summary>
    public static int Write(SafeFdHandle fd, ReadOnlySpan<byte> data)
    {
        fixed (byte* p = data)
        {
            nint n = Libc.Write(fd, p, (nuint)data.Length);
            return n >= 0 ? (int)n : -Marshal.GetLastPInvokeError();
        }
    }
}

public static partial class KvmShim
{
    [LibraryImport(Library, EntryPoint = "kvmshim_epoll_create")]
    private static partial int EpollCreateRaw();

    [LibraryImport(Library, EntryPoint = "kvmshim_epoll_add")]
    private static partial int EpollAddRaw(SafeHandle epoll, SafeHandle fd);

    [LibraryImport(Library, EntryPoint = "kvmshim_epoll_remove")]
    private static partial int EpollRemoveRaw(SafeHandle epoll, SafeHandle fd);

    /// <summary>Adds <paramref name="fd"/> to <paramref name="epoll"/> (readable while it is); throws <see cref="IOException"/>.</summary>
    public static void EpollAdd(EpollHandle epoll, SafeHandle fd)
    {
        int rc = EpollAddRaw(epoll, fd);
        if (rc < 0)
            throw new IOException($"epoll_ctl ADD failed: {Errno.Describe(-rc)}");
    }

    /// <summary>Removes <paramref name="fd"/> from <paramref name="epoll"/>; throws <see cref="IOException"/>.</summary>
    public static void EpollRemove(EpollHandle epoll, SafeHandle fd)
    {
        int rc = EpollRemoveRaw(epoll, fd);
        if (rc < 0)
            throw new IOException($"epoll_ctl DEL failed: {Errno.Describe(-rc)}");
    }

    [LibraryImport(Library, EntryPoint = "kvmshim_link_events_open")]
    private static partial int LinkEventsOpen();

    [LibraryImport(Library, EntryPoint = "kvmshim_link_events_drain")]
    private static partial int LinkEventsDrain(SafeHandle fd);

    /// <summary>
    /// A netlink socket that turns readable whenever a host interface changes (up, down, carrier,
    /// added, removed); throws <see cref="IOException"/> when it cannot be opened.
    /// </summary>
    public static LinkEventsHandle OpenLinkEvents()
    {
        int fd = LinkEventsOpen();
        if (fd < 0)
            throw new IOException($"cannot open a netlink socket for link changes: {Errno.Describe(-fd)}");
        return new LinkEventsHandle(fd);
    }

    /// <summary>Reads the changes waiting on <paramref name="events"/>: whether any link changed (or changes were lost and every link must be read again); throws <see cref="IOException"/>.</summary>
    public static bool DrainLinkEvents(LinkEventsHandle events)
    {
        int rc = LinkEventsDrain(events);
        if (rc < 0)
            throw new IOException($"reading link changes from netlink failed: {Errno.Describe(-rc)}");
        return rc > 0;
    }

    /// <summary>An epoll instance readable while any of <paramref name="fds"/> is; throws <see cref="IOException"/> when it cannot be made.</summary>
    public static EpollHandle EpollOf(IEnumerable<SafeHandle> fds)
    {
        int fd = EpollCreateRaw();
        if (fd < 0)
            throw new IOException($"epoll_create1 failed: {Errno.Describe(-fd)}");
        var epoll = new EpollHandle(fd);
        foreach (var f in fds)
        {
            int rc = EpollAddRaw(epoll, f);
            if (rc < 0)
            {
                epoll.Dispose();
                throw new IOException($"epoll_ctl ADD failed: {Errno.Describe(-rc)}");
            }
        }
        return epoll;
    }
}
