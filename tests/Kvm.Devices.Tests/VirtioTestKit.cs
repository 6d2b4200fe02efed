using System.Diagnostics;
using Kvm.Devices.Bus;
using Kvm.Devices.Pci;
using Microsoft.Extensions.Logging;

namespace Kvm.Devices.Tests;

/// <summary>
/// Stands in for the VMM's MSI delivery (which needs a KVM VM): hands out vectors that record the
/// messages the device programs and every time it sends one.
/// </summary>
public sealed class RecordingMsiController : IMsiController
{
    private readonly List<RecordingMsiVector> _vectors = [];

    /// <summary>Vectors in creation order; index i is what the device calls vector i.</summary>
    public IReadOnlyList<RecordingMsiVector> Vectors
    {
        get { lock (_vectors) return _vectors.ToArray(); }
    }

    public RecordingMsiVector this[int index]
    {
        get { lock (_vectors) return _vectors[index]; }
    }

    public IMsiVector CreateVector()
    {
        lock (_vectors)
        {
            var v = new RecordingMsiVector(_vectors.Count);
            _vectors.Add(v);
            return v;
        }
    }

    public int TotalTriggers => Vectors.Sum(v => v.Triggers);
}

/// <summary>One MSI vector: the messages set on it and, for each trigger, the message it carried.</summary>
public sealed class RecordingMsiVector(int index) : IMsiVector
{
    private readonly object _lock = new();
    private readonly List<(ulong Address, uint Data)> _set = [];
    private readonly List<(ulong Address, uint Data)?> _sent = [];
    private (ulong Address, uint Data)? _current;

    public int Index => index;

    public bool Disposed { get; private set; }

    /// <summary>Every SetMessage call, in order.</summary>
    public IReadOnlyList<(ulong Address, uint Data)> MessagesSet
    {
        get { lock (_lock) return _set.ToArray(); }
    }

    /// <summary>The message each trigger sent (null when none had been set yet).</summary>
    public IReadOnlyList<(ulong Address, uint Data)?> Sent
    {
        get { lock (_lock) return _sent.ToArray(); }
    }

    public int Triggers
    {
        get { lock (_lock) return _sent.Count; }
    }

    public void SetMessage(ulong address, uint data)
    {
        lock (_lock)
        {
            _current = (address, data);
            _set.Add((address, data));
        }
    }

    public void Trigger()
    {
        lock (_lock)
        {
            _sent.Add(_current);
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>Waits until the vector has been triggered at least <paramref name="count"/> times.</summary>
    public bool WaitForTriggers(int count, TimeSpan timeout)
    {
        var deadline = Stopwatch.StartNew();
        lock (_lock)
        {
            while (_sent.Count < count)
            {
                var left = timeout - deadline.Elapsed;
                if (left <= TimeSpan.Zero)
                    return false;
                Monitor.Wait(_lock, left);
            }
            return true;
        }
    }

    public void Dispose() => Disposed = true;
}

/// <summary>A thread-safe interrupt line that records every level the device drives.</summary>
public sealed class LevelRecorder : IInterruptLine
{
    private readonly object _lock = new();
    private readonly List<bool> _levels = [];

    public IReadOnlyList<bool> Levels
    {
        get { lock (_lock) return _levels.ToArray(); }
    }

    /// <summary>The current level (false before the first change).</summary>
    public bool Level
    {
        get { lock (_lock) return _levels.Count > 0 && _levels[^1]; }
    }

    public int Assertions
    {
        get { lock (_lock) return _levels.Count(l => l); }
    }

    public void SetLevel(bool asserted)
    {
        lock (_lock)
        {
            _levels.Add(asserted);
            Monitor.PulseAll(_lock);
        }
    }

    public bool WaitForLevel(bool level, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        lock (_lock)
        {
            while (!(_levels.Count > 0 && _levels[^1] == level))
            {
                var left = timeout - clock.Elapsed;
                if (left <= TimeSpan.Zero)
                    return false;
                Monitor.Wait(_lock, left);
            }
            return true;
        }
    }
}

/// <summary>A logger that keeps every entry, so a test can tell a handled protocol error from a crash.</summary>
public sealed class RecordingLogger : ILogger
{
    /// <summary>DeviceLog's event for an exception a queue worker did not expect.</summary>
    public const int WorkerFailedEvent = 2004;

    /// <summary>DeviceLog's event for a driver that broke the protocol.</summary>
    public const int NeedsResetEvent = 2000;

    private readonly List<(LogLevel Level, EventId Id, string Message, Exception? Exception)> _entries = [];

    public IReadOnlyList<(LogLevel Level, EventId Id, string Message, Exception? Exception)> Entries
    {
        get { lock (_entries) return _entries.ToArray(); }
    }

    /// <summary>Unexpected exceptions caught by the workers' last-resort handler, as text.</summary>
    public IReadOnlyList<string> WorkerFailures =>
        Entries.Where(e => e.Id.Id == WorkerFailedEvent).Select(e => $"{e.Message}: {e.Exception}").ToArray();

    public IReadOnlyList<string> NeedsResetMessages =>
        Entries.Where(e => e.Id.Id == NeedsResetEvent).Select(e => e.Message).ToArray();

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        lock (_entries)
            _entries.Add((logLevel, eventId, formatter(state, exception), exception));
    }
}

/// <summary>A private temporary folder, deleted with its contents on dispose.</summary>
public sealed class TempFolder : IDisposable
{
    public TempFolder() => Path = Directory.CreateTempSubdirectory("kvm-devices-test-").FullName;

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (DirectoryNotFoundException)
        {
        }
    }
}

public static class Wait
{
    /// <summary>Generous: the machines running the tests are shared and noisy.</summary>
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    /// <summary>Polls <paramref name="condition"/> until it holds or <paramref name="timeout"/> passes.</summary>
    public static bool Until(Func<bool> condition, TimeSpan? timeout = null)
    {
        var limit = timeout ?? Timeout;
        var clock = Stopwatch.StartNew();
        var spin = new SpinWait();
        while (!condition())
        {
            if (clock.Elapsed > limit)
                return condition();
            if (spin.Count < 100)
                spin.SpinOnce(sleep1Threshold: -1);
            else
                Thread.Sleep(1);
        }
        return true;
    }
}
