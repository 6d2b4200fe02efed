using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Rpc;

// RpcTestPeer call SOCKET METHOD PARAMS_JSON
//   Calls METHOD with PARAMS_JSON through RpcClient and prints one line: "ok RESULT_JSON", or
//   "error CODE MESSAGE" when the server answered with an error (exit status 0 for both).
// RpcTestPeer listen SOCKET
//   Binds and listens on SOCKET, prints "listening", then waits to be killed (the test kills it
//   with SIGKILL, which leaves the socket file behind: a stale socket of a dead server).

if (args.Length == 4 && args[0] == "call")
{
    try
    {
        using var client = RpcClient.Connect(args[1], "the test server");
        using var parameters = JsonDocument.Parse(args[3]);
        var result = await client.CallAsync(args[2], parameters.RootElement, PeerJson.Default.JsonElement, PeerJson.Default.JsonElement);
        Console.WriteLine($"ok {result.GetRawText()}");
    }
    catch (RpcException e)
    {
        Console.WriteLine($"error {e.Code} {e.Message}");
    }
    return 0;
}
if (args.Length == 2 && args[0] == "listen")
{
    var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
    listener.Bind(new UnixDomainSocketEndPoint(args[1]));
    listener.Listen(1);
    Console.WriteLine("listening");
    Console.Out.Flush();
    Thread.Sleep(Timeout.Infinite);
    GC.KeepAlive(listener);
    return 0;
}
Console.Error.WriteLine("usage: RpcTestPeer call SOCKET METHOD PARAMS_JSON | RpcTestPeer listen SOCKET");
return 2;

[JsonSerializable(typeof(JsonElement))]
internal sealed partial class PeerJson : JsonSerializerContext;
