using System.Diagnostics;
using System.Globalization;
using Kvm.Interop.Native;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// A real network made with iproute2 for a test (as root): Linux bridges standing in for switches,
/// and peers (network namespaces joined to a bridge by a veth pair) standing in for other hosts.
/// A VM's tap is put on a bridge by the VMM or the test; <see cref="Dispose"/> removes everything
/// this instance made, and whatever else was left enslaved to its bridges (a tap a VM left).
/// Names are unique per instance and per test process (tests run in parallel, several test
/// processes at once): "kvt", the process id in base 36, "-", an instance counter in two base-36
/// digits (so that no instance's prefix begins another's), then a letter for the kind and a number
/// ("kvt2n9ck-01b1", "kvt2n9ck-01p2h"): interface names stay within the kernel's 15 characters.
/// </summary>
public sealed class NetTopology : IDisposable
{
    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(60);
    private static int _instances;
    private static readonly Lazy<bool> Swept = new(SweepLeftovers);

    private readonly string _prefix;
    private readonly List<string> _bridges = [];
    private readonly List<NetPeer> _peers = [];
    private readonly List<Process> _servers = [];
    private readonly object _lock = new();
    private int _next;
    private bool _disposed;

    private NetTopology(string prefix, string python)
    {
        _prefix = prefix;
        Python = python;
    }

    /// <summary>The beginning of every name this instance gives (interfaces and namespaces).</summary>
    public string Prefix => _prefix;

    /// <summary>The python3 the peers' servers run with.</summary>
    internal string Python { get; }

    public IReadOnlyList<string> Bridges
    {
        get { lock (_lock) return [.. _bridges]; }
    }

    public IReadOnlyList<NetPeer> Peers
    {
        get { lock (_lock) return [.. _peers]; }
    }

    /// <summary>
    /// A new, empty topology. Skips the calling test (fails it under CI) unless this process is
    /// root and iproute2 and python3 are installed.
    /// </summary>
    public static NetTopology Create()
    {
        TestEnvironment.SkipIf(Libc.GetEuid() == 0 ? null
            : "a network topology (bridges, veth pairs, network namespaces) needs root");
        TestEnvironment.RequireProgram("ip", "iproute2");
        TestEnvironment.RequireProgram("python3", "python3");
        _ = Swept.Value;
        int n = Interlocked.Increment(ref _instances);
        return new NetTopology($"kvt{Base36(Environment.ProcessId)}-{Base36(n % (36 * 36)).PadLeft(2, '0')}", TestEnvironment.FindOnPath("python3")!);
    }

    /// <summary>
    /// Joins bridges <paramref name="a"/> and <paramref name="b"/> by a veth pair, up (two switches
    /// and the trunk between them); its ends go with the bridges on <see cref="Dispose"/>.
    /// </summary>
    public void AddTrunk(string a, string b)
    {
        string trunkA = Prefix + "ka", trunkB = Prefix + "kb";
        Ip("link", "add", trunkA, "type", "veth", "peer", "name", trunkB);
        Ip("link", "set", trunkA, "master", a, "up");
        Ip("link", "set", trunkB, "master", b, "up");
    }

    /// <summary>A new bridge (STP off, so ports forward at once), up. Returns its name.</summary>
    public string AddBridge()
    {
        string name = NewName('b');
        lock (_lock)
            _bridges.Add(name);
        Ip("link", "add", name, "type", "bridge", "stp_state", "0");
        Ip("link", "set", name, "up");
        return name;
    }

    /// <summary>
    /// A new peer on <paramref name="bridge"/>: a network namespace whose interface (one end of a
    /// veth pair; the other end is a port of the bridge, up) has <paramref name="cidr"/>
    /// ("10.77.1.1/24"), with lo up. Without a bridge the other end stays alone in the root
    /// namespace, up (<see cref="NetPeer.HostInterface"/>: a host interface a VM's uplink may be).
    /// </summary>
    public NetPeer AddPeer(string? bridge, string cidr)
    {
        string id = NewName('p');
        var peer = new NetPeer(this, ns: id + "n", hostInterface: id + "h", @interface: id + "g", cidr);
        lock (_lock)
            _peers.Add(peer);
        Ip("netns", "add", peer.Namespace);
        Ip("link", "add", peer.HostInterface, "type", "veth", "peer", "name", peer.Interface, "netns", peer.Namespace);
        if (bridge is not null)
            Ip("link", "set", peer.HostInterface, "master", bridge);
        Ip("link", "set", peer.HostInterface, "up");
        Ip("-n", peer.Namespace, "addr", "add", cidr, "dev", peer.Interface);
        Ip("-n", peer.Namespace, "link", "set", peer.Interface, "up");
        Ip("-n", peer.Namespace, "link", "set", "lo", "up");
        return peer;
    }

    /// <summary>Cuts a link: <paramref name="ifname"/> (in the root namespace) goes down, its carrier with it.</summary>
    public void SetLinkDown(string ifname) => Ip("link", "set", ifname, "down");

    /// <summary>Brings <paramref name="ifname"/> back up.</summary>
    public void SetLinkUp(string ifname) => Ip("link", "set", ifname, "up");

    /// <summary>
    /// A silent failure on a bridge port: the bridge stops forwarding frames to and from
    /// <paramref name="ifname"/> (port state "disabled") while its link and carrier stay up, so
    /// only a probe finds it. Not netem (tc ... netem loss 100%): this machine's kernel has no
    /// sch_netem, and the port state needs no module. A port that goes down and up again
    /// forwards again (with STP off the bridge sets a port that comes up forwarding).
    /// </summary>
    public void DropTraffic(string ifname) => SetPortState(ifname, "0");

    /// <summary>Ends <see cref="DropTraffic"/> on <paramref name="ifname"/>: the port forwards again.</summary>
    public void StopDropping(string ifname) => SetPortState(ifname, "3");

    /// <summary>"disabled" (0) or "forwarding" (3). `bridge link set`: `ip link set ... type bridge_slave state 0` leaves the state as it was (iproute2 6.1).</summary>
    private static void SetPortState(string ifname, string state)
    {
        TestEnvironment.RequireProgram("bridge", "iproute2");
        Run("bridge", "link", "set", "dev", ifname, "state", state);
    }

    /// <summary>The interfaces enslaved to <paramref name="bridge"/> (its ports), by name.</summary>
    public static IReadOnlyList<string> PortsOf(string bridge)
    {
        var r = TestEnvironment.RunProcess("ip", ["-o", "link", "show", "master", bridge], CommandTimeout);
        if (r.ExitCode != 0)
            return [];
        return LinkNames(r.Stdout);
    }

    /// <summary>Every interface of the root namespace whose name begins with <paramref name="prefix"/>.</summary>
    public static IReadOnlyList<string> InterfacesNamed(string prefix) =>
        LinkNames(Run("ip", "-o", "link", "show").Stdout).Where(n => n.StartsWith(prefix, StringComparison.Ordinal)).ToList();

    /// <summary>Every network namespace whose name begins with <paramref name="prefix"/>.</summary>
    public static IReadOnlyList<string> NamespacesNamed(string prefix) =>
        Run("ip", "netns", "list").Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => l.Split(' ')[0]).Where(n => n.StartsWith(prefix, StringComparison.Ordinal)).ToList();

    /// <summary>Runs ip with <paramref name="args"/>; throws with its output when it fails.</summary>
    public static ProcessResult Ip(params string[] args) => Run("ip", args);

    /// <summary>Runs a program to completion; throws with its output when it fails.</summary>
    public static ProcessResult Run(string program, params string[] args)
    {
        var r = TestEnvironment.RunProcess(program, args, CommandTimeout);
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"{program} {string.Join(' ', args)} failed (exit {r.ExitCode}): {r.Stderr.Trim()}{r.Stdout.Trim()}");
        return r;
    }

    /// <summary>Keeps a server a peer started, to kill it on <see cref="Dispose"/> if it still runs.</summary>
    internal void Track(Process server)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _servers.Add(server);
        }
    }

    /// <summary>
    /// Kills the servers, deletes the namespaces (their veth ends and the pairs go with them), the
    /// host ends still there, every interface enslaved to one of its bridges and the bridges.
    /// What is already gone is skipped.
    /// </summary>
    public void Dispose()
    {
        List<Process> servers;
        List<NetPeer> peers;
        List<string> bridges;
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            servers = [.. _servers];
            peers = [.. _peers];
            bridges = [.. _bridges];
        }
        foreach (var p in servers)
        {
            try
            {
                if (!p.HasExited)
                    p.Kill(entireProcessTree: true);
                p.WaitForExit();
            }
            catch (InvalidOperationException)
            {
            }
            p.Dispose();
        }
        foreach (var peer in peers)
        {
            Quietly("netns", "delete", peer.Namespace);
            Quietly("link", "delete", peer.HostInterface);
        }
        foreach (var bridge in bridges)
        {
            foreach (var port in PortsOf(bridge))
                Quietly("link", "delete", port);
            Quietly("link", "delete", bridge);
        }
        // Anything else named as this instance names things (a peer half made when a command failed).
        foreach (var name in InterfacesNamedQuietly(_prefix))
            Quietly("link", "delete", name);
    }

    private static IReadOnlyList<string> InterfacesNamedQuietly(string prefix)
    {
        try
        {
            return InterfacesNamed(prefix);
        }
        catch (InvalidOperationException)
        {
            return [];
        }
    }

    /// <summary>Runs ip, ignoring a failure (the object is already gone).</summary>
    private static void Quietly(params string[] args)
    {
        try
        {
            TestEnvironment.RunProcess("ip", args, CommandTimeout);
        }
        catch (TimeoutException)
        {
        }
    }

    private string NewName(char kind) =>
        $"{_prefix}{kind}{Interlocked.Increment(ref _next).ToString(CultureInfo.InvariantCulture)}";

    /// <summary>"3: kvt1a2-01b1: &lt;BROADCAST,...&gt; ..." and "4: kvt1a2-01p2h@if3: ..." → the names.</summary>
    private static List<string> LinkNames(string ipOneline) =>
        ipOneline.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => l.Split(':', 3))
            .Where(f => f.Length >= 2)
            .Select(f => f[1].Trim().Split('@')[0])
            .ToList();

    private static string Base36(int value)
    {
        const string digits = "0123456789abcdefghijklmnopqrstuvwxyz";
        var s = new System.Text.StringBuilder();
        do
        {
            s.Insert(0, digits[value % 36]);
            value /= 36;
        }
        while (value > 0);
        return s.ToString();
    }

    /// <summary>
    /// Once per test process: removes what test processes that died without disposing left
    /// (interfaces and namespaces named "kvt" + the base-36 id of a process that no longer runs + "-").
    /// </summary>
    private static bool SweepLeftovers()
    {
        static bool Dead(string name)
        {
            int x = name.IndexOf('-', StringComparison.Ordinal);
            if (!name.StartsWith("kvt", StringComparison.Ordinal) || x <= 3)
                return false;
            int pid = 0;
            foreach (char c in name[3..x])
            {
                int d = char.IsAsciiDigit(c) ? c - '0' : char.IsAsciiLetterLower(c) ? c - 'a' + 10 : -1;
                if (d < 0)
                    return false;
                pid = pid * 36 + d;
            }
            return pid != Environment.ProcessId && !Directory.Exists($"/proc/{pid}");
        }
        try
        {
            foreach (var ns in NamespacesNamed("kvt").Where(Dead))
                Quietly("netns", "delete", ns);
            foreach (var name in InterfacesNamed("kvt").Where(Dead))
                Quietly("link", "delete", name);
        }
        catch (InvalidOperationException)
        {
        }
        return true;
    }
}

/// <summary>
/// A peer of a <see cref="NetTopology"/>: a network namespace (<see cref="Namespace"/>) whose
/// interface <see cref="Interface"/> has <see cref="Cidr"/>, joined by a veth pair to a bridge,
/// where its end is <see cref="HostInterface"/> (the port to cut or make drop).
/// </summary>
public sealed class NetPeer
{
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(120);   // python3 starting in a loaded nested host

    /// <summary>How long a server waits for its client, and for each of its reads and writes.</summary>
    public static readonly TimeSpan ServerTimeout = TimeSpan.FromMinutes(15);

    private readonly NetTopology _topology;

    internal NetPeer(NetTopology topology, string ns, string hostInterface, string @interface, string cidr)
    {
        _topology = topology;
        Namespace = ns;
        HostInterface = hostInterface;
        Interface = @interface;
        Cidr = cidr;
    }

    public string Namespace { get; }

    /// <summary>The veth end in the root namespace, a port of the bridge (or alone, with no bridge).</summary>
    public string HostInterface { get; }

    /// <summary>The veth end in the namespace, holding <see cref="Cidr"/>.</summary>
    public string Interface { get; }

    /// <summary>The address with its prefix length: "10.77.1.1/24".</summary>
    public string Cidr { get; }

    /// <summary>The address alone: "10.77.1.1".</summary>
    public string Address => Cidr.Split('/')[0];

    /// <summary>Runs <paramref name="command"/> in the namespace (ip netns exec) to completion; its exit status and output, whatever they are.</summary>
    public ProcessResult Run(params string[] command) => Run(TimeSpan.FromMinutes(2), command);

    /// <summary>As <see cref="Run(string[])"/>, with a time limit (a TimeoutException past it).</summary>
    public ProcessResult Run(TimeSpan timeout, params string[] command) =>
        TestEnvironment.RunProcess("ip", ["netns", "exec", Namespace, .. command], timeout);

    /// <summary>
    /// Starts `iperf3 -s` on <paramref name="port"/> in the namespace (for a guest's `iperf` check);
    /// returns it once it listens, its standard output open for the lines it prints after
    /// "Server listening". --forceflush: into a pipe iperf3 would hold its lines back.
    /// </summary>
    public Process StartIperfServer(int port = 5201)
    {
        var server = TestEnvironment.StartRedirected("ip", ["netns", "exec", Namespace, "iperf3", "-s", "-p", port.ToString(CultureInfo.InvariantCulture), "--forceflush"]);
        server.StandardInput.Close();
        _topology.Track(server);
        var listening = Task.Run(() =>
        {
            string? line;
            while ((line = server.StandardOutput.ReadLine()) is not null && !line.Contains("Server listening", StringComparison.Ordinal)) { }
            return line is not null;
        });
        if (!listening.Wait(StartTimeout) || !listening.Result)
            throw new InvalidOperationException($"iperf3 -s -p {port} in {Namespace} did not start listening: {server.StandardError.ReadToEnd()}");
        return server;
    }

    /// <summary>
    /// Starts a TCP server on <paramref name="port"/> in the namespace that sends
    /// <paramref name="bytes"/> random bytes to its first client, then closes its sending side,
    /// waits for the client to close and ends. Returns once it listens.
    /// </summary>
    public ServedBytes ServeBytes(int port, long bytes)
    {
        var (process, first) = StartServer("serve", port, bytes);
        // "listening SHA256"
        string sha = first.Split(' ')[1];
        return new ServedBytes(bytes, sha, Task.Run(() =>
        {
            string rest = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            if (process.ExitCode != 0 || !rest.Contains($"sent {bytes}", StringComparison.Ordinal))
                throw new InvalidOperationException($"the byte server on {Address}:{port} failed (exit {process.ExitCode}): {rest}{process.StandardError.ReadToEnd()}");
        }));
    }

    /// <summary>
    /// Starts a TCP sink on <paramref name="port"/> in the namespace: it takes one client and
    /// reads until the client closes. Returns once it listens; the task ends with the count and
    /// SHA-256 (hex) of what it received.
    /// </summary>
    public Task<(long Count, string Sha256)> ReceiveBytes(int port)
    {
        var (process, _) = StartServer("sink", port, 0);
        return Task.Run(() =>
        {
            string rest = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            // "got N SHA256"
            string[] got = rest.Trim().Split(' ');
            if (process.ExitCode != 0 || got.Length != 3 || got[0] != "got")
                throw new InvalidOperationException($"the byte sink on {Address}:{port} failed (exit {process.ExitCode}): {rest}{process.StandardError.ReadToEnd()}");
            return (long.Parse(got[1], CultureInfo.InvariantCulture), got[2]);
        });
    }

    /// <summary>
    /// Starts a UDP sink on <paramref name="port"/> in the namespace and returns once it listens.
    /// It counts the payload bytes of the datagrams it gets until 3 s pass without one; the task
    /// ends with all of them, those that came <paramref name="settle"/> or later after the first
    /// (Late), and the time from that point to the last datagram (LateSpan, seconds).
    /// </summary>
    public Task<(long Total, long Late, double LateSpan)> CountDatagrams(int port, TimeSpan settle)
    {
        var (process, _) = StartScript($"the UDP sink on {Namespace} port {port}", DatagramScript, line => line == "listening",
            port.ToString(CultureInfo.InvariantCulture), settle.TotalSeconds.ToString(CultureInfo.InvariantCulture),
            ServerTimeout.TotalSeconds.ToString(CultureInfo.InvariantCulture));
        return Task.Run(() =>
        {
            string rest = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            // "got TOTAL LATE SPAN"
            string[] got = rest.Trim().Split(' ');
            if (process.ExitCode != 0 || got.Length != 4 || got[0] != "got")
                throw new InvalidOperationException($"the UDP sink on {Address}:{port} failed (exit {process.ExitCode}): {rest}{process.StandardError.ReadToEnd()}");
            return (long.Parse(got[1], CultureInfo.InvariantCulture), long.Parse(got[2], CultureInfo.InvariantCulture),
                double.Parse(got[3], CultureInfo.InvariantCulture));
        });
    }

    private const string DatagramScript = """
        import socket, sys, time
        port, settle, timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("", port))
        s.settimeout(timeout)
        print("listening", flush=True)
        first = last = None; total = late = 0
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            now = time.monotonic()
            if first is None:
                first = now
                s.settimeout(3)
            total += len(b); last = now
            if now - first >= settle:
                late += len(b)
        span = 0.0 if first is None else max(0.0, last - first - settle)
        print("got", total, late, "%.3f" % span, flush=True)
        """;

    private (Process Process, string FirstLine) StartServer(string mode, int port, long bytes) =>
        StartScript($"the {mode} server on {Namespace} port {port}", ServerScript, line => line.StartsWith("listening", StringComparison.Ordinal),
            mode, port.ToString(CultureInfo.InvariantCulture), bytes.ToString(CultureInfo.InvariantCulture),
            ServerTimeout.TotalSeconds.ToString(CultureInfo.InvariantCulture));

    /// <summary>Starts a Python <paramref name="script"/> in the namespace and returns once its first line says it listens.</summary>
    private (Process Process, string FirstLine) StartScript(string what, string script, Func<string, bool> listening, params string[] args)
    {
        var process = TestEnvironment.StartRedirected("ip", ["netns", "exec", Namespace, _topology.Python, "-c", script, .. args]);
        process.StandardInput.Close();
        _topology.Track(process);
        var first = process.StandardOutput.ReadLineAsync();
        if (!first.Wait(StartTimeout) || first.Result is null || !listening(first.Result))
        {
            if (!process.HasExited)
                process.Kill(entireProcessTree: true);
            throw new InvalidOperationException(
                $"{what} did not start listening: {(first.IsCompleted ? first.Result : "(no line)")} {process.StandardError.ReadToEnd()}");
        }
        return (process, first.Result);
    }

    /// <summary>
    /// The servers: "serve PORT BYTES TIMEOUT" prints "listening SHA256", sends the bytes to the
    /// first client, half-closes, drains until the client closes (closing earlier could reset
    /// data still in flight), prints "sent BYTES". "sink PORT 0 TIMEOUT" prints "listening",
    /// reads from the first client until it closes, prints "got N SHA256".
    /// </summary>
    private const string ServerScript = """
        import hashlib, os, socket, sys
        mode, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.listen(1)
        s.settimeout(timeout)
        if mode == "serve":
            data = os.urandom(count)
            print("listening", hashlib.sha256(data).hexdigest(), flush=True)
            conn, _ = s.accept()
            s.close()
            conn.settimeout(timeout)
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):
                pass
            conn.close()
            print("sent", len(data), flush=True)
        else:
            print("listening", flush=True)
            conn, _ = s.accept()
            s.close()
            conn.settimeout(timeout)
            h, n = hashlib.sha256(), 0
            while True:
                b = conn.recv(1 << 16)
                if not b:
                    break
                h.update(b)
                n += len(b)
            conn.close()
            print("got", n, h.hexdigest(), flush=True)
        """;
}

/// <summary>What <see cref="NetPeer.ServeBytes"/> serves: the count, their SHA-256 (hex), and a task that ends when the server has sent them all and its client closed (faults when the server failed).</summary>
public sealed record ServedBytes(long Count, string Sha256, Task Done);
