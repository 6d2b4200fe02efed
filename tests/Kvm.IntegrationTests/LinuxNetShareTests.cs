using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Xunit.Abstractions;

namespace Kvm.IntegrationTests;

/// <summary>
/// Two VMs whose NICs share an uplink in one bandwidth group, shares 1:3: the peer's port (the
/// uplink) is shaped to the group's rate (tc tbf), both guests send to the peer at once (iperf3,
/// one server each), and the peer measures each stream while both run: each has its share of
/// what the uplink carried (1/4 and 3/4) within 5%, and the two fill the uplink (their payload at
/// least 90% of its rate: TCP/IP and Ethernet headers are the rest).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
[Collection(QuietCollection.Name)]
public partial class LinuxNetShareTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(600);
    private const string Peer = "10.77.8.1";
    private const long Rate = 20_000_000;

    [GeneratedRegex(@"^\[\s*\d+\]\s+(\d+\.\d+)-(\d+\.\d+)\s+sec\s+\S+\s+\S+\s+(\d+(?:\.\d+)?)\s+Mbits/sec\s*$")]
    private static partial Regex Interval();

    [SkippableFact]
    public void TwoVmsOnASharedUplinkGetItsRateByTheirShares()
    {
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        NetTopology.Run("tc", "qdisc", "add", "dev", peer.HostInterface, "root", "tbf", "rate", "20mbit", "burst", "64kb", "latency", "500ms");
        string dir = Directory.CreateTempSubdirectory("kvm-share-").FullName;
        var vms = new List<VirtualMachine>();
        try
        {
            int[] shares = [100, 300];
            var servers = new Process[2];
            var serials = new SerialCapture[2];
            var runs = new Task<VmStopReason>[2];
            using var cancel = new CancellationTokenSource(Timeout);
            for (int i = 0; i < 2; i++)
            {
                servers[i] = peer.StartIperfServer(5201 + i);
                var nic = new NicSpec
                {
                    Uplinks = [new UplinkSpec { Tap = net.Prefix + "t" + i, Bridge = bridge }],
                    Bandwidth = new BandwidthGroupOptions { Group = Path.Combine(dir, "uplink"), Capacity = Rate, Shares = shares[i] },
                };
                // Each guest waits for the go (a connection to port 6000+i) before it sends for 14 s.
                var spec = LinuxNetGuest.Spec($"10.77.8.{2 + i}", Peer, $"ping:{Peer},tcpget:{Peer}:{6000 + i}:0,iperf:{Peer}:14:send:1:{5201 + i}", nic);
                serials[i] = new SerialCapture();
                var vm = VirtualMachine.Create(spec, serials[i].Write);
                vms.Add(vm);
                runs[i] = Task.Run(() => vm.Run(cancel.Token));
            }
            Assert.True(SpinWait.SpinUntil(() => serials.All(s => s.Text.Contains($"kvm-guest: ping {Peer} ok")) || runs.Any(r => r.IsCompleted), Timeout),
                "the guests did not reach the peer");
            // Each server's one-second intervals as they come (--forceflush: at each interval's
            // end), stamped with the time they arrived.
            var clock = Stopwatch.StartNew();
            var readers = servers.Select(s => Task.Run(() =>
            {
                var lines = new List<(double At, double Start, double Rate)>();
                string? line;
                while ((line = s.StandardOutput.ReadLine()) is not null)
                    if (Interval().Match(line) is { Success: true } m)
                        lines.Add((clock.Elapsed.TotalSeconds, double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture),
                            double.Parse(m.Groups[3].Value, CultureInfo.InvariantCulture) * 1e6));
                return lines;
            })).ToArray();
            // Both go at once: the two go servers start together (python takes seconds to start in
            // a busy nested host; one after the other, the first stream would be over before the
            // second began), and each guest tries to connect every second.
            var go = new[] { Task.Run(() => peer.ServeBytes(6000, 0)), Task.Run(() => peer.ServeBytes(6001, 0)) };
            Task.WaitAll(go, Timeout);
            var reasons = runs.Select(r => r.WaitAsync(Timeout).GetAwaiter().GetResult()).ToArray();
            for (int i = 0; i < 2; i++)
                Assert.True(reasons[i] == new DebugExitStop(0), $"guest {i}'s verdict: {reasons[i].Describe()}; console:\n{serials[i].Text}");
            foreach (var s in servers)
                s.Kill();
            var seen = readers.Select(r => r.WaitAsync(Timeout).GetAwaiter().GetResult()).ToArray();
            for (int i = 0; i < 2; i++)
                output.WriteLine($"stream {i}: " + string.Join(", ", seen[i].Select(l => $"{l.At:0.0}s {l.Rate / 1e6:0.0}")));

            // The intervals in which both streams ran, each stream's first 3 s left out (slow start).
            double from = seen.Max(l => l.First(x => x.Start >= 3).At), to = seen.Min(l => l.Last().At) - 1;
            Assert.True(to - from >= 5, $"the streams ran together from {from:0.0} s to {to:0.0} s only");
            var rates = seen.Select(l => l.Where(x => x.At >= from && x.At <= to).Average(x => x.Rate)).ToArray();
            var nets = vms.Select(v => (VirtioNet)v.Nics.Single().Device).ToArray();
            double total = rates.Sum();
            output.WriteLine($"shares 1:3 of {Rate / 1e6} Mbit/s: {rates[0] / 1e6:0.00} and {rates[1] / 1e6:0.00} Mbit/s of payload, " +
                             $"{100 * rates[0] / total:0.0}% and {100 * rates[1] / total:0.0}% (expected 25% and 75%); members {nets[0].Bandwidth!.Members.Count}");
            Assert.InRange(rates[0] / total / 0.25, 0.95, 1.05);
            Assert.InRange(rates[1] / total / 0.75, 0.95, 1.05);
            Assert.True(total >= 0.9 * Rate, $"together {total / 1e6:0.00} Mbit/s: the group left the uplink idle");
        }
        finally
        {
            foreach (var vm in vms)
                vm.Dispose();
            Directory.Delete(dir, recursive: true);
        }
    }
}
