using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Machine;

/// <summary>
/// A logger for the foreground programs: warnings and errors from the VM engine and its devices
/// (a driver that broke the virtio protocol, an image I/O error) as one line each on stderr,
/// "PROGRAM: warning: MESSAGE", the way QEMU reports them. Lower levels are dropped.
/// </summary>
public sealed class StderrLogger(string program, LogLevel minimum = LogLevel.Warning) : ILogger
{
    private static readonly object Lock = new();

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => logLevel >= minimum && logLevel != LogLevel.None;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (!IsEnabled(logLevel))
            return;
        string level = logLevel switch { >= LogLevel.Error => "error", LogLevel.Warning => "warning", _ => "info" };
        string text = formatter(state, exception);
        if (exception is not null)
            text += $": {exception.Message}";
        lock (Lock)
            Console.Error.WriteLine($"{program}: {level}: {text}");
    }
}
