using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// <see cref="NetTopology"/> itself, without a VM (root, no KVM): two peers on a bridge reach
/// each other, its byte servers move what they say they move, a cut or silently dropping port
/// stops the traffic, and disposing leaves nothing behind, a tap left on its bridge included.
/// </summary>
public sealed class NetTopologyTests
{
    /// <summary>Fetches from ADDR PORT until the server closes: prints "N SHA256".</summary>
    private const string FetchScript = """
        import hashlib, socket, sys
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
        h, n = hashlib.sha256(), 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        print(n, h.hexdigest())
        """;

    /// <summary>Sends N random bytes to ADDR PORT, half-closes, waits for the server to close: prints "SHA256".</summary>
    private const string SendScript = """
        import hashlib, os, socket, sys
        data = os.urandom(int(sys.argv[3]))
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        while c.recv(1 << 16):
            pass
        print(hashlib.sha256(data).hexdigest())
        """;

    private const int Bytes = 3 << 20;

    [SkippableFact]
    public async Task TwoPeersOnABridgeReachEachOtherAndDisposeRemovesEverything()
    {
        string prefix, bridge, tap;
        NetPeer a, b;
        using (var net = NetTopology.Create())
        {
            TestEnvironment.RequireProgram("ping", "iputils-ping");
            prefix = net.Prefix;
            bridge = net.AddBridge();
            a = net.AddPeer(bridge, "10.77.1.1/24");
            b = net.AddPeer(bridge, "10.77.1.2/24");
            Assert.All(new[] { bridge, a.HostInterface, b.HostInterface }, n => Assert.InRange(n.Length, 1, 15));
            Assert.Equal(new[] { a.HostInterface, b.HostInterface }.Order(StringComparer.Ordinal), NetTopology.PortsOf(bridge).Order(StringComparer.Ordinal));

            AssertPings(a, b.Address);
            AssertPings(b, a.Address);

            // a serves, b fetches; b sinks, a sends: each crosses the bridge.
            var served = a.ServeBytes(5001, Bytes);
            var fetched = b.Run("python3", "-c", FetchScript, a.Address, "5001");
            Assert.True(fetched.ExitCode == 0, $"fetch from {a.Address}:5001: {fetched.Stdout}{fetched.Stderr}");
            Assert.Equal($"{Bytes} {served.Sha256}", fetched.Stdout.Trim());
            await served.Done.WaitAsync(TimeSpan.FromSeconds(60));

            var sink = b.ReceiveBytes(5002);
            var sent = a.Run("python3", "-c", SendScript, b.Address, "5002", Bytes.ToString(System.Globalization.CultureInfo.InvariantCulture));
            Assert.True(sent.ExitCode == 0, $"send to {b.Address}:5002: {sent.Stdout}{sent.Stderr}");
            var received = await sink.WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal((Bytes, sent.Stdout.Trim()), received);

            // A cut port, then a port that silently drops b's traffic while its link stays up; both come back.
            net.SetLinkDown(b.HostInterface);
            AssertNoPing(a, b.Address);
            net.SetLinkUp(b.HostInterface);
            AssertPings(a, b.Address);
            net.DropTraffic(b.HostInterface);
            Assert.Contains("state UP", NetTopology.Ip("-o", "link", "show", b.HostInterface).Stdout, StringComparison.Ordinal);
            AssertNoPing(a, b.Address);
            net.StopDropping(b.HostInterface);
            AssertPings(a, b.Address);

            // What a VM leaves: a tap on the bridge, under a name the topology did not give.
            tap = $"kvttap{Environment.ProcessId % 100000}";
            NetTopology.Ip("tuntap", "add", tap, "mode", "tap");
            NetTopology.Ip("link", "set", tap, "master", bridge);
            Assert.Contains(tap, NetTopology.PortsOf(bridge));

            // Something already gone is no trouble.
            NetTopology.Ip("netns", "delete", b.Namespace);
        }

        Assert.Empty(NetTopology.InterfacesNamed(prefix));
        Assert.Empty(NetTopology.NamespacesNamed(prefix));
        Assert.Empty(NetTopology.InterfacesNamed(tap));
        Assert.DoesNotContain(bridge, NetTopology.InterfacesNamed("kvt"));
    }

    [SkippableFact]
    public void TopologiesHaveTheirOwnNames()
    {
        using var one = NetTopology.Create();
        using var two = NetTopology.Create();
        Assert.NotEqual(one.Prefix, two.Prefix);
        Assert.False(one.Prefix.StartsWith(two.Prefix, StringComparison.Ordinal) || two.Prefix.StartsWith(one.Prefix, StringComparison.Ordinal),
            $"{one.Prefix} and {two.Prefix}: one's names could be taken for the other's");
        Assert.NotEqual(one.AddBridge(), two.AddBridge());
    }

    private static void AssertPings(NetPeer from, string address)
    {
        var r = from.Run("ping", "-c", "3", "-i", "0.2", "-W", "5", address);
        Assert.True(r.ExitCode == 0, $"ping {address} from {from.Namespace} (exit {r.ExitCode}): {r.Stdout}{r.Stderr}");
    }

    private static void AssertNoPing(NetPeer from, string address)
    {
        var r = from.Run("ping", "-c", "2", "-i", "0.2", "-W", "1", address);
        Assert.True(r.ExitCode != 0, $"ping {address} from {from.Namespace} was answered: {r.Stdout}");
    }
}
