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
// "prepare" (SCM_RIGHTS):
//
//   taker: hello {pid}                    the taker is up
//   giver: prepare {spec, layout, huge}   memfd attached; the guest still runs
//   taker: prepared | failed {error}      the machine is built (VM, vCPUs, RAM slots, devices, and
//                                         its sockets under hidden names), disks not opened
//   giver: offer {state}                  the guest is paused, its state saved, its disks closed
//   taker: ready {steps} | failed {error} disks opened, state restored, or why not
//   giver: go                             the giver lets its socket paths go
//   taker: starting                       the taker holds the paths; its vCPUs start now
//   taker: running {steps}                they run
//
// Everything up to "prepared" happens before the guest pauses. The taker's steps say how long
// each of its steps in the pause took. Until "starting" the giver can carry on (suspended, its
// state intact); after it the guest runs (or ran) in the taker, and the giver's state is stale:
// the giver exits.

/// <summary>One message of the hand-over protocol.</summary>
public sealed record HandoverMessage(
    string Kind,
    int Pid = 0,
    string? Error = null,
    string? SpecJson = null,
    IReadOnlyList<HandoverRange>? Layout = null,
    HugePageMode? HugePages = null,
    string? State = null,
    IReadOnlyList<PauseStep>? Steps = null);

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
/// What stopped the giving process's VM when the new process started the guest and then failed:
/// the guest's newer state died with it, and this process's is stale.
/// </summary>
public sealed record HandoverLostStop(int Pid, string Program, string Error) : VmStopReason
{
    public override string Describe() => $"VM lost in the hand-over: {Program} (pid {Pid}) started the guest, then failed: {Error}";
    public override bool IsError => true;
}

/// <summary>
/// The taking side: a VM that comes from another kvm-vmm (<c>kvm-vmm --take-over SOCKET</c>).
/// <see cref="Create"/> connects, says hello, and builds the machine the giver describes, while
/// the guest still runs there (or tells the giver why not); <see cref="Take"/> restores the
/// suspended VM into it and waits for the giver to let its socket paths go; <see cref="Starting"/>
/// and <see cref="Running"/> report the vCPUs starting and started.
/// </summary>
public sealed record TakeOverLaunch(string Socket) : VmLaunch
{
    /// <summary>How long the taker waits for the giver at each step.</summary>
    public static readonly TimeSpan StepTimeout = TimeSpan.FromSeconds(120);

    private HandoverChannel? _channel;
    private VmSpec? _spec;
    private readonly StepClock _clock = new("new");

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
        _giver = $"kvm-vmm pid {giver.Pid}";
        _channel = new HandoverChannel(socket, $"the giving kvm-vmm (pid {giver.Pid})");
        _channel.Send(new HandoverMessage("hello", Pid: Environment.ProcessId));
        var fds = new List<ReceivedFdHandle>();
        try
        {
            var prepare = _channel.Expect("prepare", StepTimeout, fds);
            if (fds.Count != 1 || prepare.Layout is null || prepare.SpecJson is null || prepare.HugePages is null)
                throw new IOException($"the giving kvm-vmm (pid {giver.Pid}) asked to prepare without {(fds.Count != 1 ? "its guest RAM descriptor" : "its layout or spec")}");
            _spec = VmSpecJsonContext.Parse(prepare.SpecJson, $"sent by the giving kvm-vmm (pid {giver.Pid})");
            var layout = prepare.Layout.Select(r => new GuestMemoryRange(r.GuestAddress, r.Size, r.FileOffset)).ToArray();
            _vm = VmHandover.Prepare(_spec, fds[0], layout, prepare.HugePages.Value, serialOutput, logger);
            return _vm;
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

    private VirtualMachine? _vm;
    private string _giver = "the giving kvm-vmm";

    /// <summary>
    /// Tells the giver the machine is built, restores the suspended VM it then sends, tells it the
    /// VM is ready, and waits until it has let its socket paths go. On an error the caller tells
    /// the giver (<see cref="Fail"/>).
    /// </summary>
    public void Take()
    {
        var channel = _channel ?? throw new InvalidOperationException("Create first");
        var vm = _vm ?? throw new InvalidOperationException("Create first");
        channel.Send(new HandoverMessage("prepared", Pid: Environment.ProcessId));
        var offer = channel.Expect("offer", StepTimeout);
        _clock.Restart();
        if (offer.State is null)
            throw new IOException($"the giving {_giver} sent an offer without the VM's state");
        byte[] state;
        try
        {
            state = Convert.FromBase64String(offer.State);
        }
        catch (FormatException e)
        {
            throw new IOException($"the giving {_giver} sent a state that is not base64", e);
        }
        VmHandover.Resume(vm, state, $"the state handed over by {_giver}", _clock);
        channel.Send(new HandoverMessage("ready", Pid: Environment.ProcessId, Steps: _clock.Steps));
        _readySteps = _clock.Steps.Count;
        channel.Expect("go", StepTimeout);
        _clock.Restart();
    }

    private int _readySteps;

    /// <summary>Marks a step of this process after "go" (reported with "running").</summary>
    public void Mark(string step) => _clock.Mark(step);

    /// <summary>
    /// Tells the giver the vCPUs start now: from here on the guest is this process's, and the
    /// giver's copy of its state no longer counts.
    /// </summary>
    public void Starting()
    {
        var channel = _channel ?? throw new InvalidOperationException("Create first");
        try
        {
            channel.Send(new HandoverMessage("starting", Pid: Environment.ProcessId));
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            // The giver went away after "go": the state it sent is whole, the VM runs here.
        }
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
            _clock.Mark("start vCPUs");
            channel.Send(new HandoverMessage("running", Pid: Environment.ProcessId, Steps: _clock.Steps.Skip(_readySteps).ToArray()));
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
/// process serves, and talks it through the hand-over (<see cref="VmControl.Handover"/>):
/// <see cref="Start"/>, <see cref="Prepare"/> (the guest still runs), then, the guest suspended,
/// <see cref="Offer"/> and <see cref="Go"/>.
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

    /// <summary>
    /// Has the new process build the machine of <paramref name="spec"/> on the guest RAM in
    /// <paramref name="memoryFd"/> (laid out as <paramref name="layout"/>) while the guest still
    /// runs here; returns once it is built (or throws the new process's reason).
    /// </summary>
    public void Prepare(VmSpec spec, IReadOnlyList<GuestMemoryRange> layout, HugePageMode hugePages, SafeHandle memoryFd)
    {
        _channel.Send(new HandoverMessage("prepare",
            Pid: Environment.ProcessId,
            SpecJson: VmSpecJsonContext.Format(spec),
            Layout: layout.Select(r => new HandoverRange(r.GuestAddress, r.Size, r.FileOffset)).ToArray(),
            HugePages: hugePages), memoryFd);
        _channel.Expect("prepared", StepTimeout);
    }

    /// <summary>
    /// Sends the suspended VM's state; returns once the new process has restored it (or throws
    /// its reason). Its steps go on <paramref name="clock"/>, and the rest of the wait as messaging.
    /// </summary>
    public void Offer(SuspendedVm suspended, StepClock clock)
    {
        clock.Restart();
        long sent = Stopwatch.GetTimestamp();
        _channel.Send(new HandoverMessage("offer", Pid: Environment.ProcessId, State: Convert.ToBase64String(suspended.State)));
        var ready = _channel.Expect("ready", StepTimeout);
        AddSteps(clock, sent, ready.Steps, "offer and ready (messages)");
    }

    private static void AddSteps(StepClock clock, long since, IReadOnlyList<PauseStep>? theirs, string messaging)
    {
        double total = Stopwatch.GetElapsedTime(since).TotalMilliseconds;
        var steps = (theirs ?? []).Take(64).ToArray();
        clock.Add(steps);
        clock.Add([new PauseStep("old", messaging, Math.Round(Math.Max(0, total - steps.Sum(x => x.Milliseconds)), 2))]);
    }

    /// <summary>Lets the new process take the socket paths and start; returns once its vCPUs run.</summary>
    public void Go(StepClock clock)
    {
        clock.Restart();
        long sent = Stopwatch.GetTimestamp();
        _channel.Send(new HandoverMessage("go", Pid: Environment.ProcessId));
        _channel.Expect("starting", StepTimeout);
        GuestStarted = true;
        var running = _channel.Expect("running", StepTimeout);
        AddSteps(clock, sent, running.Steps, "go and running (messages)");
    }

    /// <summary>
    /// Whether the new process said its vCPUs start: the guest may have run there since, so the
    /// state this process holds is stale, whatever happens to the new process.
    /// </summary>
    public bool GuestStarted { get; private set; }

    /// <summary>Whether the new process still runs after <paramref name="timeout"/> (false: it ended meanwhile).</summary>
    public bool WaitAlive(TimeSpan timeout)
    {
        try
        {
            return !_process.WaitForExit(timeout);
        }
        catch (InvalidOperationException)
        {
            return false;
        }
    }

    /// <summary>Whether the new process has ended.</summary>
    public bool HasExited
    {
        get
        {
            try
            {
                return _process.HasExited;
            }
            catch (InvalidOperationException)
            {
                return true;
            }
        }
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
