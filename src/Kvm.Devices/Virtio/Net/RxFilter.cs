using Kvm.Network;

namespace Kvm.Devices.Virtio.Net;

/// <summary>
/// Which received frames the guest wants (VIRTIO_NET_CTRL_RX modes and the MAC table), by
/// destination address. Immutable: the control queue replaces it while receive workers read it.
/// </summary>
public sealed record RxFilter
{
    /// <summary>After reset: promiscuous until the driver says otherwise, as a NIC whose filter is not yet programmed passes everything.</summary>
    public static readonly RxFilter Initial = new() { Promiscuous = true };

    public bool Promiscuous { get; init; }
    public bool AllMulticast { get; init; }
    public bool AllUnicast { get; init; }
    public bool NoMulticast { get; init; }
    public bool NoUnicast { get; init; }
    public bool NoBroadcast { get; init; }
    public IReadOnlyList<MacAddress> Unicast { get; init; } = [];
    public IReadOnlyList<MacAddress> Multicast { get; init; } = [];
    public bool UnicastOverflow { get; init; }
    public bool MulticastOverflow { get; init; }

    public RxFilter With(byte command, bool on) => command switch
    {
        VirtioNet.RxPromisc => this with { Promiscuous = on },
        VirtioNet.RxAllMulti => this with { AllMulticast = on },
        VirtioNet.RxAllUni => this with { AllUnicast = on },
        VirtioNet.RxNoMulti => this with { NoMulticast = on },
        VirtioNet.RxNoUni => this with { NoUnicast = on },
        VirtioNet.RxNoBcast => this with { NoBroadcast = on },
        _ => throw new ArgumentOutOfRangeException(nameof(command), command, "not a receive-mode command"),
    };

    /// <summary>Whether a frame to <paramref name="destination"/> goes to a guest whose address is <paramref name="own"/>.</summary>
    public bool Accepts(MacAddress destination, MacAddress own)
    {
        if (Promiscuous)
            return true;
        if (destination.IsBroadcast)
            return !NoBroadcast;
        if (destination.IsMulticast)
            return !NoMulticast && (AllMulticast || MulticastOverflow || Contains(Multicast, destination));
        return !NoUnicast && (destination == own || AllUnicast || UnicastOverflow || Contains(Unicast, destination));
    }

    private static bool Contains(IReadOnlyList<MacAddress> table, MacAddress mac)
    {
        for (int i = 0; i < table.Count; i++)
            if (table[i] == mac)
                return true;
        return false;
    }
}
