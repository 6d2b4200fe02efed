using System.Net.Sockets;
using System.Text;
using Kvm.Control;
using Kvm.Rpc;
using Microsoft.Extensions.Logging.Abstractions;

namespace Kvm.Cluster.Tests;

/// <summary>The console socket server of kvm-vmm (Kvm.Control), on a real unix socket.</summary>
public sealed class ConsoleServerTests
{
    /// <summary>
    /// What the guest wrote just before its VM ended reaches an attached client: the server that
    /// ends sends what it queued before it closes the connection (a guest's last lines, such as a
    /// test's verdict, were lost when it closed at once).
    /// </summary>
    [Fact]
    public async Task OutputWrittenJustBeforeTheServerEndsReachesTheClient()
    {
        string dir = Directory.CreateTempSubdirectory("kvm-console-tests-").FullName;
        try
        {
            string path = Path.Combine(dir, "console.sock");
            var server = new ConsoleServer(path, RpcAccessPolicy.OwnerOnly, UnixFileMode.UserRead | UnixFileMode.UserWrite,
                input => input.Length, NullLogger.Instance);
            server.Start();
            using var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            client.Connect(new UnixDomainSocketEndPoint(path));
            Assert.True(SpinWait.SpinUntil(() => server.AttachedClients == 1, TimeSpan.FromSeconds(10)), "the client was not attached");
            var expected = new StringBuilder();
            for (int i = 0; i < 3000; i++)
            {
                string line = $"guest line {i:D5} {new string('x', 100)}\n";
                expected.Append(line);
                server.Write(Encoding.ASCII.GetBytes(line));
            }
            // More than the socket's buffer holds is still queued when the server ends; the client reads from then on.
            var ending = server.DisposeAsync().AsTask();
            var received = new MemoryStream();
            var buffer = new byte[65536];
            int n;
            try
            {
                while ((n = await client.ReceiveAsync(buffer).WaitAsync(TimeSpan.FromSeconds(10))) > 0)
                    received.Write(buffer, 0, n);
            }
            catch (SocketException)
            {
                // Reset: what was queued is lost (the assertion below says how much).
            }
            await ending.WaitAsync(TimeSpan.FromSeconds(10));
            Assert.Equal(expected.ToString(), Encoding.ASCII.GetString(received.ToArray()));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
