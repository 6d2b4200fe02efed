using Kvm.Network;

namespace Kvm.Devices.Virtio.Net;

/// <summary>Options of one virtio-net device.</summary>
public sealed record VirtioNetOptions
{
    /// <summary>The VM's address: in the configuration space, and the only source address its frames may carry unless <see cref="AllowSpoofing"/>.</summary>
    public required MacAddress Mac { get; init; }

    /// <summary>Receive/transmit queue pairs (VIRTIO_NET_F_MQ), each pair served by its own threads.</summary>
    public int QueuePairs { get; init; } = 1;

    public ushort QueueSize { get; init; } = 256;

    /// <summary>Offers checksum and TCP segmentation offloads both ways (off: the guest checksums and segments every frame).</summary>
    public bool Offloads { get; init; } = true;

    /// <summary>Lets frames with another source MAC out, and the guest change its address.</summary>
    public bool AllowSpoofing { get; init; }

    /// <summary>The MTU offered to the guest (VIRTIO_NET_F_MTU); frames without segmentation offload longer than this plus 18 bytes of Ethernet and VLAN headers are dropped.</summary>
    public int Mtu { get; init; } = 1500;

    /// <summary>The most the guest may send, in bits per second (frame bytes; null: no limit).</summary>
    public long? TxLimit { get; init; }

    /// <summary>The most the guest may receive, in bits per second (null: no limit).</summary>
    public long? RxLimit { get; init; }

    /// <summary>Denial-of-service detection on this NIC's traffic (null: none).</summary>
    public DosRules? Dos { get; init; }

    /// <summary>The bandwidth group this NIC shares an uplink with, and its shares and reservations there (null: none).</summary>
    public BandwidthGroupOptions? Bandwidth { get; init; }

    public const int MaxQueuePairs = 16;
    public const int MinMtu = 68, MaxMtu = 65535 - 18;

    /// <summary>Throws <see cref="ArgumentException"/> naming the bad option.</summary>
    public void Validate()
    {
        if (QueuePairs < 1 || QueuePairs > MaxQueuePairs)
            throw new ArgumentException($"queues {QueuePairs} is out of range (1 to {MaxQueuePairs} queue pairs)");
        if (QueueSize < 2 || !ushort.IsPow2(QueueSize) || QueueSize > 32768)
            throw new ArgumentException($"queue size {QueueSize} is not a power of two from 2 to 32768");
        if (Mac.IsMulticast)
            throw new ArgumentException($"mac {Mac} is a multicast address (the first byte must be even)");
        if (Mac.Value == 0)
            throw new ArgumentException("mac 00:00:00:00:00:00 is not a usable address");
        if (TxLimit is <= 0 || RxLimit is <= 0)
            throw new ArgumentException($"a rate limit must be positive (tx {TxLimit}, rx {RxLimit} bit/s)");
        Dos?.Validate();
        Bandwidth?.Validate();
        if (Mtu < MinMtu || Mtu > MaxMtu)
            throw new ArgumentException($"mtu {Mtu} is out of range ({MinMtu} to {MaxMtu})");
    }
}
