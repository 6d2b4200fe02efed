using System.Runtime.InteropServices;

namespace Kvm.Network;

/// <summary>Offloads the guest accepts in frames it receives (virtio-net GUEST_* features).</summary>
[Flags]
public enum NetOffloads
{
    None = 0,
    Checksum = 1,
    Tso4 = 2,
    Tso6 = 4,
    TsoEcn = 8,
}

/// <summary>
/// Where a virtio-net device's frames go and come from: one or more queue pairs, each with its own
/// receive side. Every frame travels with the 12-byte virtio-net header (struct virtio_net_hdr_v1)
/// in front, so checksum and segmentation offloads pass through untouched.
/// </summary>
public interface INetBackend : IDisposable
{
    /// <summary>For messages, such as "tap kvm0".</summary>
    string Name { get; }

    int QueuePairs { get; }

    /// <summary>An fd that is readable while frames wait for <paramref name="pair"/>'s receive queue.</summary>
    SafeHandle ReceiveHandle(int pair);

    /// <summary>
    /// Reads one waiting frame, header first, into <paramref name="buffer"/> (room for
    /// <see cref="VirtioNetHeader.Size"/> + 65535 + 18 bytes); returns its length, 0 when none waits.
    /// </summary>
    int Receive(int pair, Span<byte> buffer);

    /// <summary>Sends one frame, header first; false when the backend dropped it (full, link down, refused).</summary>
    bool Send(int pair, ReadOnlySpan<byte> packet);

    /// <summary>Which offloads received frames may carry from now on (the rest is finished before they arrive).</summary>
    void SetOffloads(NetOffloads offloads);

    /// <summary>How many queue pairs the guest uses: the backend delivers to the first <paramref name="count"/> only.</summary>
    void SetActivePairs(int count);

    /// <summary>Whether the backend can carry frames now (a team: any uplink up).</summary>
    bool LinkUp => true;

    /// <summary>The host interface its frames cross (a tap's name), where a team listens for its probes' answers; null: none.</summary>
    string? Interface => null;
}

/// <summary>The virtio-net header (virtio 1.2, 5.1.6): what offload a frame carries.</summary>
public static class VirtioNetHeader
{
    public const int Size = 12;
    public const byte FlagNeedsCsum = 1, FlagDataValid = 2;
    public const byte GsoNone = 0, GsoTcpV4 = 1, GsoUdp = 3, GsoTcpV6 = 4, GsoEcn = 0x80;

    /// <summary>The largest frame with its header a backend hands over: a 64 KiB GSO frame plus Ethernet and VLAN headers.</summary>
    public const int MaxPacket = Size + 65535 + 18;
}
