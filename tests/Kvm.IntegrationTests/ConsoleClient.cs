using System.Net.Sockets;
using System.Text;
using System.Text.RegularExpressions;

namespace Kvm.IntegrationTests;

/// <summary>A console client that collects what the guest prints.</summary>
internal sealed partial class ConsoleClient : IDisposable
{
    private readonly Socket _socket = new(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
    private readonly StringBuilder _text = new();
    private readonly Task _reader;

    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    public ConsoleClient(string path)
    {
        _socket.Connect(new UnixDomainSocketEndPoint(path));
        _reader = Task.Run(() =>
        {
            var buf = new byte[4096];
            try
            {
                int n;
                while ((n = _socket.Receive(buf)) > 0)
                    lock (_text)
                        _text.Append(Encoding.UTF8.GetString(buf, 0, n));
            }
            catch (SocketException)
            {
            }
            catch (ObjectDisposedException)
            {
            }
        });
    }

    public string Text
    {
        get { lock (_text) return _text.ToString(); }
    }

    /// <summary>The highest tick number printed so far (0 before the first).</summary>
    public int LastTick => TickLine().Matches(Text).Select(m => int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)).DefaultIfEmpty(0).Max();

    public bool WaitForTick(int atLeast) => SpinWait.SpinUntil(() => LastTick >= atLeast, Timeout);

    /// <summary>
    /// Asserts that the tick counter stands still for a second (20 periods) once output already on
    /// its way when the vCPUs stopped has arrived; returns where it stands.
    /// </summary>
    public int AssertStandsStill()
    {
        Thread.Sleep(300);
        int atPause = LastTick;
        Thread.Sleep(1000);
        Xunit.Assert.Equal(atPause, LastTick);
        return atPause;
    }

    public bool WaitFor(string text) => SpinWait.SpinUntil(() => Text.Contains(text, StringComparison.Ordinal), Timeout);

    public bool Closed(TimeSpan within) => _reader.Wait(within);

    [GeneratedRegex(@"guestkit: tick (\d+)\n")]
    private static partial Regex TickLine();

    public void Dispose()
    {
        _socket.Dispose();
        _reader.Wait(TimeSpan.FromSeconds(5));
    }
}
