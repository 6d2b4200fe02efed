using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Hypervisor;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;
using Kvm.Rpc;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;
using Microsoft.Extensions.Logging;

namespace Kvm.Control;

// A VM handed from one kvm-vmm process (the giver) to a new one (the taker), guest RAM staying in
// its memfd. The giver listens on a private unix socket and starts the taker
// (kvm-vmm --take-over SOCKET ...); they speak in JSON lines, and the giver's memfd travels with
// the offer (SCM_RIGHTS):
//
//   taker: hello {pid}                 the taker is up (started before the guest pauses)
//   giver: offer {spec, layout, state} the guest is paused, its disks closed; memfd attached
//   taker: ready | failed {error}      the machine is built and its state restored, or why not
//   giver: go                          the giver lets its socket paths go
//   taker: running                     the taker holds the paths and its vCPUs run
//
// Until "go" the giver can carry on (suspended, its RAM intact); after "running" it exits.

/// <summary>One message of the hand-over protocol.</summary>
public sealed record HandoverMessage(
    string Kind,
    int Pid = 0,
    string? Error = null,
    string? SpecJson = null,
    IReadOnlyList<HandoverRange>? Layout = null,
    HugePageMode? HugePages = null,
    string? State = null);

/// <summary>A RAM region in the handed-over memfd.</summary>
public sealed record HandoverRange(ulong GuestAddress, ulong Size, ulong FileOffset);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, UseStringEnumConverter = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(HandoverMessage))]
internal sealed partial class HandoverJson : JsonSerializerContext;

/// <summary>
/// The hand-over socket: JSON messages, one per line, with descriptors attached to a message's
/// first byte. Synchronous, with a deadline for every receive.
/// </summary>
public sealed class HandoverChannel(Socket socket, string peer) : IDisposable
{
    /// <summary>The longest message accepted (the state of a VM with many devices is well below).</summary>
    public const int MaxMessageBytes = 64 << 20;

    private byte[] _buffer = new byte[64 << 10];
    private int _start, _end;

    public Socket Socket => socket;

    public void Send(HandoverMessage message, params ReadOnlySpan<SafeHandle> fds)
    {
        byte[] line = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(message, HandoverJson.Default.HandoverMessage) + "\n");
        if (fds.IsEmpty)
            socket.Send(line);
        else
            KvmShim.SendWithFds(socket, line, fds);
    }

    /// <summary>
    /// The next message and the descriptors that came with it (the caller owns them); an
    /// <see cref="IOException"/> naming <paramref name="waitingFor"/> when the peer closes, sends
    /// nonsense, or says nothing within <paramref name="timeout"/>.
    /// </summary>
    public HandoverMessage Receive(string waitingFor, TimeSpan timeout, List<ReceivedFdHandle>? fds = null)
    {
        var deadline = Stopwatch.StartNew();
        var got = new List<ReceivedFdHandle>();
        try
        {
            while (true)
            {
                int newline = Array.IndexOf(_buffer, (byte)'\n', _start, _end - _start);
                if (newline >= 0)
                {
                    var text = Encoding.UTF8.GetString(_buffer, _start, newline - _start);
                    _start = newline + 1;
                    HandoverMessage? message;
                    try
                    {
                        message = JsonSerializer.Deserialize(text, HandoverJson.Default.HandoverMessage);
                    }
                    catch (JsonException e)
                    {
                        throw new IOException($"{peer} sent a malformed message while this side waited for '{waitingFor}': {e.Message}", e);
                    }
                    if (message is null)
                        throw new IOException($"{peer} sent an empty message while this side waited for '{waitingFor}'");
                    if (fds is not null)
                    {
                        fds.AddRange(got);
                        got.Clear();
                    }
                    return message;
                }
                if (_start > 0)
                {
                    Array.Copy(_buffer, _start, _buffer, 0, _end - _start);
                    _end -= _start;
                    _start = 0;
                }
                if (_end == _buffer.Length)
                {
                    if (_buffer.Length >= MaxMessageBytes)
                        throw new IOException($"{peer} sent a message longer than {MaxMessageBytes} bytes");
                    Array.Resize(ref _buffer, _buffer.Length * 2);
                }
                var left = timeout - deadline.Elapsed;
                if (left <= TimeSpan.Zero || !socket.Poll((int)Math.Min(left.TotalMicroseconds, int.MaxValue), SelectMode.SelectRead))
                    throw new IOException($"{peer} did not send '{waitingFor}' within {timeout.TotalSeconds:0.#} s");
                int n = KvmShim.ReceiveWithFds(socket, _buffer.AsSpan(_end), got);
                if (n == 0)
                    throw new IOException($"{peer} closed the hand-over connection while this side waited for '{waitingFor}'");
                if (n > 0)
                    _end += n;
            }
        }
        finally
        {
            foreach (var fd in got)
                fd.Dispose();
        }
    }

    /// <summary>Receives a message and checks it is of <paramref name="kind"/>; a "failed" message becomes an error carrying the peer's words.</summary>
    public HandoverMessage Expect(string kind, TimeSpan timeout, List<ReceivedFdHandle>? fds = null)
    {
        var m = Receive(kind, timeout, fds);
        if (m.Kind == "failed")
            throw new HandoverException($"{peer}: {m.Error ?? "failed (no reason given)"}");
        if (m.Kind != kind)
            throw new IOException($"{peer} sent '{m.Kind}' where '{kind}' was due");
        return m;
    }

    public void Dispose() => socket.Dispose();
}

/// <summary>A hand-over that did not happen, with the reason the other process gave.</summary>
public sealed class HandoverException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>What stopped the giving process's VM: it runs on in another process.</summary>
public sealed record HandedOverStop(int Pid, string Program) : VmStopReason
{
    public override string Describe() => $"VM handed over to {Program} (pid {Pid}), where it runs on";
    public override bool IsError => false;
}

/// <summary>
/// The taking side: a VM that comes from another kvm-vmm (<c>kvm-vmm --take-over SOCKET</c>).
/// <see cref="Create"/> connects, says hello, receives the offer and builds the machine from it
/// (or tells the giver why not); <see cref="Ready"/> then waits for the giver to let its socket
/// paths go, and <see cref="Running"/> reports the vCPUs started.
/// </summary>
public sealed record TakeOverLaunch(string Socket) : VmLaunch
{
    /// <summary>How long the taker waits for the giver at each step.</summary>
    public static readonly TimeSpan StepTimeout = TimeSpan.FromSeconds(120);

    private HandoverChannel? _channel;
    private VmSpec? _spec;

    public override VmSpec Spec => _spec ?? throw new InvalidOperationException("the VM has not been taken over yet");

    public override VirtualMachine Create(Action<ReadOnlySpan<byte>> serialOutput, ILogger? logger)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(Socket));
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new IOException($"--take-over {Socket}: cannot connect to the giving kvm-vmm: {e.Message}", e);
        }
        var giver = PeerCredentials.Of(socket);
        _channel = new HandoverChannel(socket, $"the giving kvm-vmm (pid {giver.Pid})");
        _channel.Send(new HandoverMessage("hello", Pid: Environment.ProcessId));
        var fds = new List<ReceivedFdHandle>();
        try
        {
            var offer = _channel.Expect("offer", StepTimeout, fds);
            if (fds.Count != 1 || offer.State is null || offer.Layout is null || offer.SpecJson is null || offer.HugePages is null)
                throw new IOException($"the giving kvm-vmm (pid {giver.Pid}) sent an offer without {(fds.Count != 1 ? "its guest RAM descriptor" : "its state, layout or spec")}");
            byte[] state;
            try
            {
                state = Convert.FromBase64String(offer.State);
            }
            catch (FormatException e)
            {
                throw new IOException($"the giving kvm-vmm (pid {giver.Pid}) sent a state that is not base64", e);
            }
            _spec = VmSpecJsonContext.Parse(offer.SpecJson, $"offered by the giving kvm-vmm (pid {giver.Pid})");
            var layout = offer.Layout.Select(r => new GuestMemoryRange(r.GuestAddress, r.Size, r.FileOffset)).ToArray();
            return VmHandover.Resume(state, $"the state handed over by kvm-vmm pid {giver.Pid}", fds[0], layout, offer.HugePages.Value,
                _spec, serialOutput, logger);
        }
        catch (Exception e)
        {
            Fail(e);
            throw;
        }
        finally
        {
            foreach (var fd in fds)
                fd.Dispose();
        }
    }

    /// <summary>Tells the giver the machine is ready and waits until it has let its socket paths go.</summary>
    public void Ready()
    {
        var channel = _channel ?? throw new InvalidOperationException("Create first");
        channel.Send(new HandoverMessage("ready", Pid: Environment.ProcessId));
        channel.Expect("go", StepTimeout);
    }

    /// <summary>Whether the VM runs in this process now (the giver was told so).</summary>
    public bool TookOver { get; private set; }

    /// <summary>Tells the giver the VM runs here: it exits.</summary>
    public void Running()
    {
        TookOver = true;
        if (_channel is not { } channel)
            return;
        try
        {
            channel.Send(new HandoverMessage("running", Pid: Environment.ProcessId));
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            // The giver went away early: the VM runs here all the same.
        }
        channel.Dispose();
        _channel = null;
    }

    /// <summary>Tells the giver why this process cannot take the VM (it carries on, suspended).</summary>
    public void Fail(Exception e)
    {
        if (_channel is not { } channel)
            return;
        try
        {
            channel.Send(new HandoverMessage("failed", Pid: Environment.ProcessId, Error: ForegroundRun.Describe(e)));
        }
        catch (Exception x) when (x is SocketException or IOException)
        {
        }
        channel.Dispose();
        _channel = null;
    }
}

/// <summary>
/// The giving side: starts a new kvm-vmm with <c>--take-over</c> and the sockets and options this
/// process serves, and talks it through the hand-over (<see cref="VmControl.Handover"/>).
/// </summary>
public sealed class Successor : IDisposable
{
    /// <summary>How long the new process has to start and say hello.</summary>
    public static readonly TimeSpan HelloTimeout = TimeSpan.FromSeconds(60);

    /// <summary>How long it has to build the machine, and to start it once told to.</summary>
    public static readonly TimeSpan StepTimeout = TimeSpan.FromSeconds(120);

    private readonly Process _process;
    private readonly HandoverChannel _channel;

    private Successor(Process process, HandoverChannel channel, string program)
    {
        _process = process;
        _channel = channel;
        Program = program;
    }

    public string Program { get; }
    public int Pid => _process.Id;
    public HandoverChannel Channel => _channel;

    /// <summary>
    /// Starts <paramref name="program"/> (a kvm-vmm) to take the VM over, with the same control and
    /// console sockets, group and exit file as <paramref name="host"/>, in a session of its own,
    /// its output going where this process's goes; waits for its hello.
    /// </summary>
    public static Successor Start(string program, VmHostOptions host)
    {
        if (host.ControlSocket is null || host.ConsoleSocket is null)
            throw new HandoverException("a VM is handed over only from a kvm-vmm that serves its control and console on sockets (--control, --console)");
        if (!File.Exists(program))
            throw new HandoverException($"the kvm-vmm to hand the VM to, {program}, does not exist");
        string dir = Path.GetDirectoryName(Path.GetFullPath(host.ControlSocket))!;
        string path = Path.Combine(dir, $".h{Guid.NewGuid():N}"[..10]);
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        Process? process = null;
        try
        {
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            listener.Listen(1);
            var start = new ProcessStartInfo(program) { UseShellExecute = false };
            start.ArgumentList.Add("--take-over");
            start.ArgumentList.Add(path);
            start.ArgumentList.Add("--control");
            start.ArgumentList.Add(host.ControlSocket);
            start.ArgumentList.Add("--console");
            start.ArgumentList.Add(host.ConsoleSocket);
            if (host.Access.GroupName is { } group)
            {
                start.ArgumentList.Add("--group");
                start.ArgumentList.Add(group);
            }
            if (host.ExitFile is { } exitFile)
            {
                start.ArgumentList.Add("--exit-file");
                start.ArgumentList.Add(exitFile);
            }
            // The VM outlives this process: nothing sent to this one's terminal or group reaches it.
            start.ArgumentList.Add("--new-session");
            try
            {
                process = Process.Start(start) ?? throw new HandoverException($"cannot start {program}");
            }
            catch (System.ComponentModel.Win32Exception e)
            {
                throw new HandoverException($"cannot start {program}: {e.Message}", e);
            }
            var waited = Stopwatch.StartNew();
            while (!listener.Poll(100_000, SelectMode.SelectRead))
            {
                if (process.HasExited)
                    throw new HandoverException($"{program} (pid {process.Id}) exited with status {process.ExitCode} before it connected (its output went to this process's log)");
                if (waited.Elapsed > HelloTimeout)
                    throw new HandoverException($"{program} (pid {process.Id}) did not connect within {HelloTimeout.TotalSeconds} s");
            }
            var socket = listener.Accept();
            var peer = PeerCredentials.Of(socket);
            if (peer.Pid != process.Id)
            {
                socket.Dispose();
                throw new HandoverException($"pid {peer.Pid}, not the new kvm-vmm (pid {process.Id}), connected to the hand-over socket");
            }
            var channel = new HandoverChannel(socket, $"the new kvm-vmm (pid {process.Id})");
            try
            {
                channel.Expect("hello", HelloTimeout);
            }
            catch
            {
                channel.Dispose();
                throw;
            }
            return new Successor(process, channel, program);
        }
        catch
        {
            if (process is { HasExited: false })
                process.Kill();
            process?.Dispose();
            throw;
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>Sends the suspended VM; returns once the new process has built and restored it (or throws its reason).</summary>
    public void Offer(VmSpec spec, SuspendedVm suspended, SafeHandle memoryFd)
    {
        _channel.Send(new HandoverMessage("offer",
            Pid: Environment.ProcessId,
            SpecJson: VmSpecJsonContext.Format(spec),
            Layout: suspended.Layout.Select(r => new HandoverRange(r.GuestAddress, r.Size, r.FileOffset)).ToArray(),
            HugePages: suspended.HugePages,
            State: Convert.ToBase64String(suspended.State)), memoryFd);
        _channel.Expect("ready", StepTimeout);
    }

    /// <summary>Lets the new process take the socket paths and start; returns once its vCPUs run.</summary>
    public void Go()
    {
        _channel.Send(new HandoverMessage("go", Pid: Environment.ProcessId));
        _channel.Expect("running", StepTimeout);
    }

    /// <summary>Ends the hand-over connection; a new process that has not taken over ends itself.</summary>
    public void Dispose()
    {
        _channel.Dispose();
        _process.Dispose();
    }

    /// <summary>Waits a little for a new process that failed to end, so that it leaves no zombie behind.</summary>
    public void Reap(TimeSpan timeout)
    {
        try
        {
            if (!_process.WaitForExit(timeout))
                _process.Kill();
        }
        catch (InvalidOperationException)
        {
        }
    }
}
