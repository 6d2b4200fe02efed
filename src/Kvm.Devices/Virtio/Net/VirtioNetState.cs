using Kvm.Hypervisor.State;
using Kvm.Network;

namespace Kvm.Devices.Virtio.Net;

/// <summary>What a guest knows of a <see cref="VirtioNet"/> device beyond its queues: its addresses, queue pairs in use, a pending announcement and its receive filter.</summary>
public sealed record VirtioNetState(MacAddress ConfiguredMac, MacAddress Mac, int QueuePairs, int ActivePairs, ushort Announce, RxFilter Filter)
{
    public void Write(StateWriter w)
    {
        w.U64(ConfiguredMac.Value).U64(Mac.Value).I32(QueuePairs).I32(ActivePairs).U16(Announce);
        w.Bool(Filter.Promiscuous).Bool(Filter.AllMulticast).Bool(Filter.AllUnicast).Bool(Filter.NoMulticast)
            .Bool(Filter.NoUnicast).Bool(Filter.NoBroadcast).Bool(Filter.UnicastOverflow).Bool(Filter.MulticastOverflow);
        foreach (var table in new[] { Filter.Unicast, Filter.Multicast })
        {
            w.I32(table.Count);
            foreach (var mac in table)
                w.U64(mac.Value);
        }
    }

    public static VirtioNetState Read(ref StateReader r)
    {
        var configured = ReadMac(ref r, "configured_mac");
        var mac = ReadMac(ref r, "mac");
        int pairs = (int)r.U32("queue_pairs", 1, VirtioNetOptions.MaxQueuePairs);
        int active = (int)r.U32("active_pairs", 1, (uint)pairs);
        ushort announce = r.U16("announce");
        if ((announce & ~VirtioNet.StatusAnnounce) != 0)
            throw r.Error("announce", $"0x{announce:x} holds bits other than ANNOUNCE");
        var filter = new RxFilter
        {
            Promiscuous = r.Bool("promiscuous"), AllMulticast = r.Bool("all_multicast"), AllUnicast = r.Bool("all_unicast"),
            NoMulticast = r.Bool("no_multicast"), NoUnicast = r.Bool("no_unicast"), NoBroadcast = r.Bool("no_broadcast"),
            UnicastOverflow = r.Bool("unicast_overflow"), MulticastOverflow = r.Bool("multicast_overflow"),
        };
        var tables = new MacAddress[2][];
        for (int t = 0; t < 2; t++)
        {
            int n = (int)r.U32(t == 0 ? "unicast_entries" : "multicast_entries", 0, VirtioNet.MaxFilterEntries);
            tables[t] = new MacAddress[n];
            for (int i = 0; i < n; i++)
                tables[t][i] = ReadMac(ref r, "filter_mac");
        }
        return new(configured, mac, pairs, active, announce, filter with { Unicast = tables[0], Multicast = tables[1] });
    }

    private static MacAddress ReadMac(ref StateReader r, string field)
    {
        ulong v = r.U64(field);
        if (v >> 48 != 0)
            throw r.Error(field, $"0x{v:x} is not a 48-bit address");
        return new MacAddress(v);
    }
}
