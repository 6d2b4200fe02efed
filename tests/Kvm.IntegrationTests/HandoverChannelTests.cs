using System.Net.Sockets;
using System.Text;
using Kvm.Control;
using Kvm.Interop.Handles;

namespace Kvm.IntegrationTests;

/// <summary>
/// The hand-over protocol's channel (<see cref="HandoverChannel"/>) on a real unix socket, without
/// a VM: messages split or joined however the stream delivers them, and every way the other
/// process can go wrong (silence, nonsense, a message too long, a hang-up, a refusal) ends in an
/// error that names the peer and what was awaited.
/// </summary>
public sealed class HandoverChannelTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-handover-").FullName;
    private readonly Socket _raw;
    private readonly HandoverChannel _channel;

    public HandoverChannelTests()
    {
        string path = Path.Combine(_dir, "s");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        _raw = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _raw.Connect(new UnixDomainSocketEndPoint(path));
        _channel = new HandoverChannel(listener.Accept(), "the test peer");
    }

    public void Dispose()
    {
        _channel.Dispose();
        _raw.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    private static readonly TimeSpan Short = TimeSpan.FromMilliseconds(300);

    [Fact]
    public void MessagesArriveWholeHoweverTheStreamCutsThem()
    {
        _raw.Send(Encoding.UTF8.GetBytes("{\"kind\":\"hello\",\"pid\":12}\n{\"kind\":\"rea"));
        Assert.Equal(new HandoverMessage("hello", Pid: 12), _channel.Expect("hello", Short));
        _raw.Send(Encoding.UTF8.GetBytes("dy\",\"pid\":13}\n"));
        Assert.Equal(13, _channel.Expect("ready", Short).Pid);
    }

    [Fact]
    public void AMessageSentByAChannelIsReadBackWithItsDescriptor()
    {
        using var other = new HandoverChannel(_raw, "the other end");
        string file = Path.Combine(_dir, "f");
        File.WriteAllText(file, "content");
        using var handle = File.OpenHandle(file);
        var sent = new HandoverMessage("offer", Pid: 1, SpecJson: "{}", Layout: [new HandoverRange(0, 4096, 0)], State: "AAAA");
        other.Send(sent, handle);
        var fds = new List<ReceivedFdHandle>();
        var got = _channel.Expect("offer", Short, fds);
        Assert.Equal(sent.SpecJson, got.SpecJson);
        Assert.Equal(sent.Layout, got.Layout);
        Assert.Single(fds);
        fds[0].Dispose();
    }

    [Fact]
    public void SilenceIsATimeoutNamingThePeerAndTheMessageAwaited()
    {
        var e = Assert.Throws<IOException>(() => _channel.Expect("ready", Short));
        Assert.Contains("the test peer did not send 'ready'", e.Message);
    }

    [Fact]
    public void AHangUpNonsenseOrTheWrongMessageIsAnError()
    {
        _raw.Send(Encoding.UTF8.GetBytes("{\"kind\":\"go\"}\nnot json\n"));
        Assert.Contains("sent 'go' where 'ready' was due", Assert.Throws<IOException>(() => _channel.Expect("ready", Short)).Message);
        Assert.Contains("malformed", Assert.Throws<IOException>(() => _channel.Expect("ready", Short)).Message);
        _raw.Shutdown(SocketShutdown.Send);
        Assert.Contains("closed the hand-over connection while this side waited for 'running'",
            Assert.Throws<IOException>(() => _channel.Expect("running", Short)).Message);
    }

    [Fact]
    public void ARefusalCarriesThePeersWords()
    {
        _raw.Send(Encoding.UTF8.GetBytes("{\"kind\":\"failed\",\"error\":\"virtio-blk0: the saved disk had 32768 sectors\"}\n"));
        var e = Assert.Throws<HandoverException>(() => _channel.Expect("ready", Short));
        Assert.Equal("the test peer: virtio-blk0: the saved disk had 32768 sectors", e.Message);
    }
}
