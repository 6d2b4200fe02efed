using System.Globalization;
using System.Net.Sockets;
using System.Text;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Kvm.Cluster.Systemd;

/// <summary>
/// The sd_notify protocol (systemd's <c>sd_notify(3)</c>): newline-separated <c>KEY=VALUE</c>
/// assignments sent as one datagram to the unix socket named by <c>NOTIFY_SOCKET</c> (a path, or an
/// abstract name written with a leading <c>@</c>). kvmd.service is <c>Type=notify</c> with a
/// watchdog: kvmd says <see cref="Ready"/> once it serves its socket, pings <see cref="Watchdog"/>
/// (or runs <see cref="RunWatchdogAsync(Func{bool}, CancellationToken)"/>) and says
/// <see cref="Stopping"/> on the way out.
/// </summary>
/// <remarks>
/// Without <c>NOTIFY_SOCKET</c> (kvmd started by hand, or by anything but systemd) every method is a
/// no-op returning false. Sending never throws: a failed send is logged and returns false, since a
/// daemon must not stop because its supervisor is not listening (systemd then notices by itself).
/// Hand-written rather than Microsoft.Extensions.Hosting.Systemd, which would bring the generic host
/// into a NativeAOT program that does not use it, for one datagram.
/// </remarks>
public sealed partial class SystemdNotifier
{
    private readonly string? _socket;
    private readonly ILogger _logger;

    /// <summary>
    /// A notifier for the given environment values: <paramref name="notifySocket"/> as in
    /// NOTIFY_SOCKET, <paramref name="watchdogUsec"/> as in WATCHDOG_USEC (microseconds), and
    /// <paramref name="watchdogPid"/> as in WATCHDOG_PID (the process the watchdog is meant for; unset
    /// means this one). Use <see cref="FromEnvironment"/> in a program.
    /// </summary>
    public SystemdNotifier(string? notifySocket, string? watchdogUsec = null, string? watchdogPid = null, ILogger? logger = null)
    {
        _logger = logger ?? NullLogger.Instance;
        _socket = SocketAddress(notifySocket, _logger);
        WatchdogInterval = _socket is null ? null : ParseWatchdog(watchdogUsec, watchdogPid);
    }

    /// <summary>
    /// A notifier for this process's NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID. With
    /// <paramref name="unsetEnvironment"/> (the default) it removes them from the environment, so
    /// that child processes do not inherit them: the PostgreSQL server that kvmd starts is built with
    /// systemd support and would send its own READY=1, which NotifyAccess=main refuses with a
    /// warning in the journal, and kvm-vmm processes outlive kvmd anyway.
    /// </summary>
    public static SystemdNotifier FromEnvironment(bool unsetEnvironment = true, ILogger? logger = null)
    {
        string[] names = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];
        var values = names.Select(Environment.GetEnvironmentVariable).ToArray();
        if (unsetEnvironment)
        {
            foreach (var name in names)
                Environment.SetEnvironmentVariable(name, null);
        }
        return new SystemdNotifier(values[0], values[1], values[2], logger);
    }

    /// <summary>True when NOTIFY_SOCKET named a socket: the service manager listens.</summary>
    public bool IsEnabled => _socket is not null;

    /// <summary>
    /// How often the service manager expects <see cref="Watchdog"/> at the latest (WatchdogSec=), or
    /// null when it does not (no watchdog, no NOTIFY_SOCKET, or WATCHDOG_PID names another process).
    /// Ping at half this interval, as sd_watchdog_enabled(3) recommends.
    /// </summary>
    public TimeSpan? WatchdogInterval { get; }

    /// <summary>READY=1: start-up is finished (kvmd serves its socket). Optionally with a status line.</summary>
    public bool Ready(string? status = null) => Notify(status is null ? "READY=1" : $"READY=1\nSTATUS={OneLine(status)}");

    /// <summary>STOPPING=1: the service is shutting down (VMs keep running; only kvmd ends).</summary>
    public bool Stopping(string? status = null) => Notify(status is null ? "STOPPING=1" : $"STOPPING=1\nSTATUS={OneLine(status)}");

    /// <summary>
    /// RELOADING=1 with the current CLOCK_MONOTONIC time (MONOTONIC_USEC, which systemd 253 and
    /// later require for Type=notify-reload): the service is reloading its configuration; send
    /// <see cref="Ready"/> when done.
    /// </summary>
    public bool Reloading() => Notify($"RELOADING=1\nMONOTONIC_USEC={MonotonicMicroseconds().ToString(CultureInfo.InvariantCulture)}");

    /// <summary>STATUS=...: a one-line status that <c>systemctl status kvmd</c> shows.</summary>
    public bool Status(string status) => Notify($"STATUS={OneLine(status)}");

    /// <summary>WATCHDOG=1: the keep-alive ping. A no-op when the watchdog is not enabled for this process.</summary>
    public bool Watchdog() => WatchdogInterval is not null && Notify("WATCHDOG=1");

    /// <summary>
    /// EXTEND_TIMEOUT_USEC=...: start-up (or stopping) needs longer than TimeoutStartSec= allows, for
    /// example while a private PostgreSQL cluster is first initialized. Send again before it runs out.
    /// </summary>
    public bool ExtendTimeout(TimeSpan by) =>
        Notify($"EXTEND_TIMEOUT_USEC={((long)by.TotalMicroseconds).ToString(CultureInfo.InvariantCulture)}");

    /// <summary>Sends <paramref name="state"/> (newline-separated KEY=VALUE lines) as it is.</summary>
    public bool Notify(string state)
    {
        if (_socket is null)
            return false;
        try
        {
            using var s = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
            s.SendTo(Encoding.UTF8.GetBytes(state), SocketFlags.None, new UnixDomainSocketEndPoint(_socket));
            return true;
        }
        catch (SocketException e)
        {
            LogSendFailed(_logger, Printable(_socket), FirstLine(state), e.Message);
            return false;
        }
    }

    /// <summary>
    /// Pings the watchdog at half <see cref="WatchdogInterval"/> for as long as <paramref name="healthy"/>
    /// says so, until <paramref name="cancel"/> fires. A round where it says unhealthy (or throws) sends
    /// no ping and sets the status: if that lasts a whole interval, systemd kills kvmd (SIGABRT, then
    /// restarts it under Restart=on-failure; the VMs survive that, KillMode=process). Returns at once
    /// when there is no watchdog.
    /// </summary>
    public Task RunWatchdogAsync(Func<bool> healthy, CancellationToken cancel) =>
        RunWatchdogAsync(_ => ValueTask.FromResult(healthy()), cancel);

    /// <summary>As <see cref="RunWatchdogAsync(Func{bool}, CancellationToken)"/>, with an asynchronous health check.</summary>
    public async Task RunWatchdogAsync(Func<CancellationToken, ValueTask<bool>> healthy, CancellationToken cancel)
    {
        if (WatchdogInterval is not { } interval)
            return;
        using var timer = new PeriodicTimer(interval / 2);
        var wasHealthy = true;
        do
        {
            bool ok;
            string? why = null;
            try
            {
                ok = await healthy(cancel).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (cancel.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e)
            {
                ok = false;
                why = e.Message;
            }
            if (ok)
            {
                Watchdog();
                if (!wasHealthy)
                {
                    LogHealthy(_logger);
                    Status("healthy again");
                }
            }
            else if (wasHealthy)
            {
                LogUnhealthy(_logger, why ?? "the health check said so", interval.TotalSeconds);
                Status($"unhealthy: {why ?? "the health check failed"}; watchdog pings withheld");
            }
            wasHealthy = ok;
        }
        while (await WaitAsync(timer, cancel).ConfigureAwait(false));
    }

    private static async ValueTask<bool> WaitAsync(PeriodicTimer timer, CancellationToken cancel)
    {
        try
        {
            return await timer.WaitForNextTickAsync(cancel).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    /// <summary>The endpoint's path: as given, or with the abstract name's '@' turned into the NUL that marks it.</summary>
    private static string? SocketAddress(string? notifySocket, ILogger logger)
    {
        if (string.IsNullOrEmpty(notifySocket))
            return null;
        if (notifySocket[0] == '/')
            return notifySocket;
        if (notifySocket[0] == '@' && notifySocket.Length > 1)
            return "\0" + notifySocket[1..];
        // systemd 254 and later may also name an AF_VSOCK address ("vsock:CID:PORT"), for a VM's
        // whole system: not a case for kvmd, which runs on the host.
        LogUnsupportedSocket(logger, notifySocket);
        return null;
    }

    private static TimeSpan? ParseWatchdog(string? usec, string? pid)
    {
        if (!ulong.TryParse(usec, NumberStyles.None, CultureInfo.InvariantCulture, out var microseconds) || microseconds == 0)
            return null;
        if (!string.IsNullOrEmpty(pid)
            && (!int.TryParse(pid, NumberStyles.None, CultureInfo.InvariantCulture, out var p) || p != Environment.ProcessId))
            return null;
        return TimeSpan.FromMicroseconds(microseconds);
    }

    /// <summary>CLOCK_MONOTONIC in microseconds: .NET's Stopwatch on Linux reads that clock in nanoseconds.</summary>
    private static long MonotonicMicroseconds() =>
        (long)(System.Diagnostics.Stopwatch.GetTimestamp() * (1_000_000.0 / System.Diagnostics.Stopwatch.Frequency));

    /// <summary>A status is one assignment: a newline would start another.</summary>
    private static string OneLine(string s) => s.ReplaceLineEndings(" ");

    private static string FirstLine(string s) => s.Split('\n', 2)[0];

    private static string Printable(string socket) => socket[0] == '\0' ? "@" + socket[1..] : socket;

    [LoggerMessage(EventId = 2900, Level = LogLevel.Warning, Message = "systemd notification {State} to {Socket} failed: {Problem}")]
    private static partial void LogSendFailed(ILogger logger, string socket, string state, string problem);

    [LoggerMessage(EventId = 2901, Level = LogLevel.Warning, Message = "NOTIFY_SOCKET={Socket} is not a unix socket path or abstract name: no systemd notifications")]
    private static partial void LogUnsupportedSocket(ILogger logger, string socket);

    [LoggerMessage(EventId = 2902, Level = LogLevel.Warning, Message = "unhealthy ({Reason}): withholding watchdog pings; systemd restarts kvmd if this lasts {Seconds} s")]
    private static partial void LogUnhealthy(ILogger logger, string reason, double seconds);

    [LoggerMessage(EventId = 2903, Level = LogLevel.Information, Message = "healthy again: watchdog pings resumed")]
    private static partial void LogHealthy(ILogger logger);
}
