using System.Net.Sockets;
using System.Text;
using Kvm.Cluster.Systemd;

namespace Kvm.Cluster.Tests;

/// <summary>
/// SystemdNotifier against a real unix datagram socket bound by the test, standing in for systemd's
/// notification socket: each test receives exactly the datagrams the notifier sent.
/// </summary>
public sealed class SystemdNotifierTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-notify-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Each_call_sends_its_assignments_as_one_datagram_to_a_socket_path()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        var n = new SystemdNotifier(systemd.Name);
        Assert.True(n.IsEnabled);
        Assert.Null(n.WatchdogInterval);

        Assert.True(n.Ready());
        Assert.True(n.Status("serving /run/kvm/kvmd.sock,\n3 VMs"));
        Assert.True(n.Ready("up"));
        Assert.True(n.ExtendTimeout(TimeSpan.FromSeconds(90)));
        Assert.True(n.Stopping());

        Assert.Equal(
            ["READY=1", "STATUS=serving /run/kvm/kvmd.sock, 3 VMs", "READY=1\nSTATUS=up", "EXTEND_TIMEOUT_USEC=90000000", "STOPPING=1"],
            systemd.ReceiveAll());
    }

    [Fact]
    public void Reloading_carries_the_monotonic_clock_in_microseconds()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        var before = Environment.TickCount64 * 1000;
        Assert.True(new SystemdNotifier(systemd.Name).Reloading());
        var after = Environment.TickCount64 * 1000;

        var lines = Assert.Single(systemd.ReceiveAll()).Split('\n');
        Assert.Equal("RELOADING=1", lines[0]);
        Assert.StartsWith("MONOTONIC_USEC=", lines[1]);
        // Environment.TickCount64 reads CLOCK_MONOTONIC_COARSE: the same clock, a few ms coarser.
        var usec = long.Parse(lines[1]["MONOTONIC_USEC=".Length..]);
        Assert.InRange(usec, before - 50_000, after + 50_000);
    }

    [Fact]
    public void An_abstract_socket_name_is_written_with_an_at_sign()
    {
        var name = $"kvm-notify-test-{Environment.ProcessId}-{Guid.NewGuid():N}";
        using var systemd = Listener.Abstract(name);
        var n = new SystemdNotifier("@" + name, watchdogUsec: "30000000");

        Assert.True(n.Ready());
        Assert.True(n.Watchdog());

        Assert.Equal(["READY=1", "WATCHDOG=1"], systemd.ReceiveAll());
    }

    [Fact]
    public void The_watchdog_interval_comes_from_WATCHDOG_USEC_for_this_process()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        Assert.Equal(TimeSpan.FromSeconds(30), new SystemdNotifier(systemd.Name, "30000000").WatchdogInterval);
        Assert.Equal(TimeSpan.FromSeconds(30), new SystemdNotifier(systemd.Name, "30000000", Environment.ProcessId.ToString()).WatchdogInterval);
        Assert.Null(new SystemdNotifier(systemd.Name, "0").WatchdogInterval);
        Assert.Null(new SystemdNotifier(systemd.Name, "30s").WatchdogInterval);
        Assert.Null(new SystemdNotifier(systemd.Name, "-1").WatchdogInterval);
        Assert.Null(new SystemdNotifier(null, "30000000").WatchdogInterval);
    }

    [Fact]
    public void WATCHDOG_PID_of_another_process_disables_the_watchdog()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        var other = Environment.ProcessId == 1 ? "2" : "1";
        var n = new SystemdNotifier(systemd.Name, "30000000", other);

        Assert.Null(n.WatchdogInterval);
        Assert.False(n.Watchdog());
        Assert.True(n.Ready());
        Assert.Null(new SystemdNotifier(systemd.Name, "30000000", "not-a-pid").WatchdogInterval);

        Assert.Equal(["READY=1"], systemd.ReceiveAll());
    }

    [Fact]
    public async Task Without_NOTIFY_SOCKET_everything_is_a_no_op()
    {
        foreach (var socket in new string?[] { null, "" })
        {
            var n = new SystemdNotifier(socket, "30000000");
            Assert.False(n.IsEnabled);
            Assert.Null(n.WatchdogInterval);
            Assert.False(n.Ready());
            Assert.False(n.Status("x"));
            Assert.False(n.Watchdog());
            Assert.False(n.Reloading());
            Assert.False(n.Stopping());
            // No watchdog: the keep-alive loop returns at once instead of running until cancelled.
            await n.RunWatchdogAsync(() => true, CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(5));
        }
    }

    [Fact]
    public void A_socket_that_is_neither_a_path_nor_an_abstract_name_disables_notifications()
    {
        foreach (var socket in new[] { "vsock:2:1234", "@", "relative/path" })
            Assert.False(new SystemdNotifier(socket).Ready());
    }

    [Fact]
    public void A_socket_nobody_listens_on_makes_calls_return_false_without_throwing()
    {
        var n = new SystemdNotifier(Path.Combine(_dir, "nobody"), "30000000");
        Assert.True(n.IsEnabled);
        Assert.False(n.Ready());
        Assert.False(n.Watchdog());
    }

    [Fact]
    public void FromEnvironment_reads_the_variables_and_unsets_them_for_child_processes()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        Environment.SetEnvironmentVariable("NOTIFY_SOCKET", systemd.Name);
        Environment.SetEnvironmentVariable("WATCHDOG_USEC", "2000000");
        Environment.SetEnvironmentVariable("WATCHDOG_PID", Environment.ProcessId.ToString());
        try
        {
            var n = SystemdNotifier.FromEnvironment();
            Assert.Equal(TimeSpan.FromSeconds(2), n.WatchdogInterval);
            Assert.Null(Environment.GetEnvironmentVariable("NOTIFY_SOCKET"));
            Assert.Null(Environment.GetEnvironmentVariable("WATCHDOG_USEC"));
            Assert.Null(Environment.GetEnvironmentVariable("WATCHDOG_PID"));
            Assert.True(n.Ready());
            Assert.Equal(["READY=1"], systemd.ReceiveAll());

            Assert.False(SystemdNotifier.FromEnvironment().IsEnabled);
        }
        finally
        {
            Environment.SetEnvironmentVariable("NOTIFY_SOCKET", null);
            Environment.SetEnvironmentVariable("WATCHDOG_USEC", null);
            Environment.SetEnvironmentVariable("WATCHDOG_PID", null);
        }
    }

    [Fact]
    public async Task The_keep_alive_loop_pings_at_half_the_interval_only_while_healthy()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        // 400 ms: a ping every 200 ms.
        var n = new SystemdNotifier(systemd.Name, "400000");
        var healthy = true;
        using var stop = new CancellationTokenSource();
        var loop = n.RunWatchdogAsync(() => Volatile.Read(ref healthy), stop.Token);

        // The first ping goes at once, then one per tick.
        Assert.Equal("WATCHDOG=1", systemd.Receive(TimeSpan.FromSeconds(5)));
        Assert.Equal("WATCHDOG=1", systemd.Receive(TimeSpan.FromSeconds(5)));

        Volatile.Write(ref healthy, false);
        // At most one ping already decided before the change; then the status says why, and no pings.
        var next = systemd.Receive(TimeSpan.FromSeconds(5));
        if (next == "WATCHDOG=1")
            next = systemd.Receive(TimeSpan.FromSeconds(5));
        Assert.StartsWith("STATUS=unhealthy", next);
        Assert.Null(systemd.Receive(TimeSpan.FromMilliseconds(700)));

        Volatile.Write(ref healthy, true);
        Assert.Equal("WATCHDOG=1", systemd.Receive(TimeSpan.FromSeconds(5)));
        Assert.Equal("STATUS=healthy again", systemd.Receive(TimeSpan.FromSeconds(5)));

        stop.Cancel();
        await loop.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task A_health_check_that_throws_counts_as_unhealthy_and_names_the_error()
    {
        using var systemd = Listener.AtPath(Path.Combine(_dir, "notify"));
        var n = new SystemdNotifier(systemd.Name, "400000");
        using var stop = new CancellationTokenSource();
        var loop = n.RunWatchdogAsync(_ => throw new InvalidOperationException("database unreachable"), stop.Token);

        Assert.Equal("STATUS=unhealthy: database unreachable; watchdog pings withheld", systemd.Receive(TimeSpan.FromSeconds(5)));
        Assert.Null(systemd.Receive(TimeSpan.FromMilliseconds(700)));

        stop.Cancel();
        await loop.WaitAsync(TimeSpan.FromSeconds(5));
    }

    /// <summary>A bound unix datagram socket: what systemd listens on.</summary>
    private sealed class Listener : IDisposable
    {
        private readonly Socket _socket = new(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);

        private Listener(string name, string address)
        {
            Name = name;
            _socket.Bind(new UnixDomainSocketEndPoint(address));
        }

        /// <summary>NOTIFY_SOCKET's value for this socket.</summary>
        public string Name { get; }

        public static Listener AtPath(string path) => new(path, path);

        public static Listener Abstract(string name) => new("@" + name, "\0" + name);

        /// <summary>The next datagram within <paramref name="timeout"/>, or null.</summary>
        public string? Receive(TimeSpan timeout)
        {
            if (!_socket.Poll(timeout, SelectMode.SelectRead))
                return null;
            var buffer = new byte[4096];
            var n = _socket.Receive(buffer);
            return Encoding.UTF8.GetString(buffer, 0, n);
        }

        /// <summary>Every datagram already queued (the sends were synchronous), in order.</summary>
        public string[] ReceiveAll()
        {
            var all = new List<string>();
            while (Receive(TimeSpan.FromMilliseconds(100)) is { } message)
                all.Add(message);
            return [.. all];
        }

        public void Dispose() => _socket.Dispose();
    }
}
