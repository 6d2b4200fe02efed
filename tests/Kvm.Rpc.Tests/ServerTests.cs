using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using Kvm.Rpc;
using Kvm.Tests.Shared;

namespace Kvm.Rpc.Tests;

/// <summary>The server's limits and the life cycle of its socket file.</summary>
public sealed class ServerTests
{
    /// <summary>An echo request of exactly <paramref name="length"/> bytes (its text padded with y), or its envelope when length is 0.</summary>
    private static string EchoOfLength(int id, int length)
    {
        string envelope = $"{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"echo\",\"params\":{{\"text\":\"\"}}}}";
        return length == 0 ? envelope : envelope.Replace("\"\"}}", $"\"{new string('y', length - envelope.Length)}\"}}}}", StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_message_over_the_limit_gets_message_too_large_and_only_its_connection_closes()
    {
        await using var server = new TestServer(o => o with { MaxMessageBytes = 4096 });
        using var bystander = server.Raw();
        await Response.AssertStillWorksAsync(bystander, id: 1);

        foreach (bool withNewline in new[] { false, true })
        {
            using var offender = server.Raw();
            await Response.AssertStillWorksAsync(offender, id: 2);
            // A request whose text is one byte over the limit; without a newline the server must
            // not wait for one. The server may close while we still write: ignore that.
            string big = EchoOfLength(3, 4097);
            var send = offender.SendBytesAsync(Encoding.ASCII.GetBytes(withNewline ? big + "\n" : big));
            var error = Response.AssertError(await offender.ReceiveAsync(), RpcErrorCode.MessageTooLarge, "null");
            Assert.Contains("4096", error.GetProperty("message").GetString(), StringComparison.Ordinal);
            Assert.Empty(await offender.ExpectClosedAsync());
            try
            {
                await send;
            }
            catch (IOException)
            {
            }
            Assert.NotNull(server.Logger.WaitFor(e => e.EventId.Id == 5003, TimeSpan.FromSeconds(5)));
        }

        await Response.AssertStillWorksAsync(bystander, id: 4);
        using var newcomer = server.Raw();
        await Response.AssertStillWorksAsync(newcomer, id: 5);
        // A message of exactly the limit is served.
        string exact = EchoOfLength(6, 4096);
        Assert.Equal(4096, exact.Length);
        await newcomer.SendAsync(exact);
        Assert.Equal(4096 - EchoOfLength(6, 0).Length, Response.AssertResult(await newcomer.ReceiveAsync(), "6").GetProperty("text").GetString()!.Length);
    }

    [Fact]
    public async Task One_connection_more_than_the_maximum_gets_too_many_connections_and_is_closed()
    {
        await using var server = new TestServer(o => o with { MaxConnections = 2 });
        using var first = server.Raw();
        using var second = server.Raw();
        await Response.AssertStillWorksAsync(first, id: 1);
        await Response.AssertStillWorksAsync(second, id: 2);

        using (var third = server.Raw())
        {
            var error = Response.AssertError(await third.ReceiveAsync(), RpcErrorCode.TooManyConnections, "null");
            Assert.Contains("2", error.GetProperty("message").GetString(), StringComparison.Ordinal);
            Assert.Empty(await third.ExpectClosedAsync());
        }
        Assert.NotNull(server.Logger.WaitFor(e => e.EventId.Id == 5002, TimeSpan.FromSeconds(5)));
        // The RpcClient reports the refusal as the same error.
        using (var refused = server.Client())
        {
            var e = await Assert.ThrowsAsync<RpcException>(() => refused.CallAsync("notes", TestJson.Default.NotesResult));
            Assert.Equal(RpcErrorCode.TooManyConnections, e.Code);
        }

        await Response.AssertStillWorksAsync(first, id: 3);
        first.Dispose();
        Assert.True(SpinWait.SpinUntil(() => server.Server.OpenConnections <= 1, TimeSpan.FromSeconds(10)),
            $"{server.Server.OpenConnections} connections still counted after one of two closed");
        using var fourth = server.Raw();
        await Response.AssertStillWorksAsync(fourth, id: 4);
        await Response.AssertStillWorksAsync(second, id: 5);
    }

    [Fact]
    public async Task Blank_lines_between_messages_are_ignored()
    {
        await using var server = new TestServer();
        using var peer = server.Raw();
        await peer.SendBytesAsync(Encoding.ASCII.GetBytes("\n\n   \n\t\n\r\n \t \r\n"));
        await peer.SendAsync("""{"jsonrpc":"2.0","id":"only","method":"add","params":{"a":1,"b":2}}""");
        Assert.Equal(3, Response.AssertResult(await peer.ReceiveAsync(), "\"only\"").GetProperty("sum").GetInt64());
        await peer.SendBytesAsync(Encoding.ASCII.GetBytes("\n\n"));
        peer.Socket.Shutdown(SocketShutdown.Send);
        Assert.Empty(await peer.ExpectClosedAsync());
    }

    [Fact]
    public async Task A_stale_socket_left_by_a_killed_server_is_replaced()
    {
        using var dir = new TempDir();
        string path = dir.File("stale.sock");
        using (var dead = LiveProcess.Start(TestPeer.DotnetHost(), [TestPeer.Find(), "listen", path]))
        {
            Assert.True(dead.WaitFor("listening", TimeSpan.FromSeconds(30)), $"the listener did not start: {dead.Tail()}");
            dead.Process.Kill();
            Assert.True(dead.WaitForExit(TimeSpan.FromSeconds(10)));
        }
        Assert.True(File.Exists(path), "SIGKILL should leave the socket file behind");
        Assert.ThrowsAny<SocketException>(() => RawPeer.Connect(path).Dispose());

        await using var server = new TestServer(dir: dir, name: "stale.sock");
        using var peer = server.Raw();
        await Response.AssertStillWorksAsync(peer);
    }

    [Fact]
    public async Task A_socket_a_live_server_answers_on_is_refused_naming_it_and_keeps_working()
    {
        await using var live = new TestServer();
        var e = Assert.ThrowsAny<IOException>(() => new RpcServer(live.Options, live.Dispatcher, live.Logger));
        Assert.Contains(live.SocketPath, e.Message, StringComparison.Ordinal);
        Assert.True(File.Exists(live.SocketPath));
        using var peer = live.Raw();
        await Response.AssertStillWorksAsync(peer);
    }

    /// <summary>
    /// A server that takes the path over (a VM handed to a new kvm-vmm) replaces a live server's
    /// socket file in one rename: new clients reach the new server, the old one keeps the
    /// connections it has, and once told to leave the file it no longer removes it when disposed.
    /// </summary>
    [Fact]
    public async Task A_server_taking_the_path_over_replaces_a_live_one_which_then_leaves_the_file_alone()
    {
        using var dir = new TempDir();
        var old = new TestServer(dir: dir);
        using var oldPeer = old.Raw();
        await Response.AssertStillWorksAsync(oldPeer, id: 1);
        var taker = new RpcServer(old.Options with { TakeOver = true }, old.Dispatcher, old.Logger);
        taker.Start();
        try
        {
            // Until it takes the path, clients still reach the old server.
            using (var before = old.Raw())
            {
                await Response.AssertStillWorksAsync(before, id: 5);
                Assert.Equal(0, taker.OpenConnections);
            }
            taker.TakePath();
            using var newPeer = old.Raw();
            await Response.AssertStillWorksAsync(newPeer, id: 2);
            Assert.Equal(1, taker.OpenConnections);
            await Response.AssertStillWorksAsync(oldPeer, id: 3);

            old.Server.LeaveSocketFile = true;
            await old.DisposeAsync();
            Assert.True(File.Exists(old.SocketPath));
            using var later = old.Raw();
            await Response.AssertStillWorksAsync(later, id: 4);
        }
        finally
        {
            await taker.DisposeAsync();
        }
        Assert.False(File.Exists(old.SocketPath));
    }

    /// <summary>
    /// A server made to take the path over that ends before it takes it (the hand-over failed)
    /// leaves the path to the live server and removes its hidden socket file.
    /// </summary>
    [Fact]
    public async Task A_server_that_never_takes_the_path_leaves_it_and_no_file_of_its_own()
    {
        using var dir = new TempDir();
        var old = new TestServer(dir: dir);
        var before = Directory.GetFiles(dir.Path).Order().ToArray();
        var taker = new RpcServer(old.Options with { TakeOver = true }, old.Dispatcher, old.Logger);
        taker.Start();
        Assert.Single(Directory.GetFiles(dir.Path).Except(before));
        await taker.DisposeAsync();
        Assert.Equal(before, Directory.GetFiles(dir.Path).Order().ToArray());
        using var peer = old.Raw();
        await Response.AssertStillWorksAsync(peer, id: 1);
        await old.DisposeAsync();
    }

    [Fact]
    public void A_regular_file_at_the_socket_path_is_refused_and_left_as_it_was()
    {
        using var dir = new TempDir();
        string path = dir.File("disk.img");
        byte[] content = Encoding.ASCII.GetBytes("not a socket: a file someone cares about\n");
        File.WriteAllBytes(path, content);
        var logger = new CapturingLogger();
        var e = Assert.ThrowsAny<IOException>(() => new RpcServer(new RpcServerOptions { SocketPath = path }, new RpcDispatcher(logger), logger));
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
        Assert.Equal(content, File.ReadAllBytes(path));
    }

    [Fact]
    public async Task The_socket_file_gets_the_configured_mode()
    {
        await using var server = new TestServer(o => o with { SocketMode = (UnixFileMode)Convert.ToInt32("600", 8) });
        Assert.Equal((UnixFileMode)Convert.ToInt32("600", 8), File.GetUnixFileMode(server.SocketPath));
        await using var open = new TestServer(o => o with { SocketMode = (UnixFileMode)Convert.ToInt32("666", 8) }, name: "open.sock");
        Assert.Equal((UnixFileMode)Convert.ToInt32("666", 8), File.GetUnixFileMode(open.SocketPath));
    }

    [Fact]
    public async Task Disposing_the_server_removes_the_socket_file_and_ends_open_connections()
    {
        var server = new TestServer();
        try
        {
            using var idle = server.Raw();
            using var busy = server.Raw();
            await Response.AssertStillWorksAsync(idle, id: 1);
            await Response.AssertStillWorksAsync(busy, id: 2);
            await busy.SendBytesAsync(Encoding.ASCII.GetBytes("""{"jsonrpc":"2.0","id":3,"method":"no"""));  // half a request

            var watch = Stopwatch.StartNew();
            await server.Server.DisposeAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(10));
            Assert.False(File.Exists(server.SocketPath), "the socket file is still there");
            Assert.Empty(await idle.ExpectClosedAsync());
            Assert.Empty(await busy.ExpectClosedAsync());
            Assert.Equal(0, server.Server.OpenConnections);
            Assert.ThrowsAny<SocketException>(() => RawPeer.Connect(server.SocketPath).Dispose());
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(10));
        }
        finally
        {
            await server.DisposeAsync();
        }
    }

    [Fact]
    public void The_client_names_the_server_and_the_path_when_nothing_listens()
    {
        using var dir = new TempDir();
        string path = dir.File("nobody-home.sock");
        var e = Assert.Throws<RpcException>(() => RpcClient.Connect(path, "kvmd"));
        Assert.Equal(RpcErrorCode.OperationFailed, e.Code);
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
        Assert.Contains("kvmd", e.Message, StringComparison.Ordinal);
    }
}
