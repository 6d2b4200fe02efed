using System.Diagnostics;

namespace Kvm.Vmm.Snapshot;

/// <summary>One step of an operation that keeps the guest paused, and how long it took.</summary>
/// <param name="Process">Which process did it: "old" (the kvm-vmm handing the VM over) or "new" (the one taking it).</param>
public sealed record PauseStep(string Process, string Name, double Milliseconds);

/// <summary>
/// Times consecutive steps: each <see cref="Mark"/> records the time since the previous mark (or
/// since the clock was made), so a report shows where a pause went.
/// </summary>
public sealed class StepClock(string process)
{
    private readonly List<PauseStep> _steps = [];
    private long _last = Stopwatch.GetTimestamp();

    public IReadOnlyList<PauseStep> Steps => _steps;

    /// <summary>A clock whose first step counts from this process's start (the runtime's start-up, parsing the arguments).</summary>
    public static StepClock SinceProcessStart(string process)
    {
        var clock = new StepClock(process);
        TimeSpan sinceStart;
        using (var self = Process.GetCurrentProcess())
            sinceStart = DateTime.Now - self.StartTime;
        clock._last -= (long)(sinceStart.TotalSeconds * Stopwatch.Frequency);
        return clock;
    }

    /// <summary>The steps as one line: "name 1.2 ms, name 3.4 ms".</summary>
    public string Describe() => string.Join(", ", _steps.Select(s => $"{s.Name} {s.Milliseconds.ToString("0.#", System.Globalization.CultureInfo.InvariantCulture)} ms"));

    /// <summary>The steps' total in milliseconds.</summary>
    public double TotalMilliseconds => _steps.Sum(s => s.Milliseconds);

    /// <summary>Starts the next step now (the time since the last mark is not counted).</summary>
    public void Restart() => _last = Stopwatch.GetTimestamp();

    /// <summary>Records the step that ends now.</summary>
    public void Mark(string name)
    {
        long now = Stopwatch.GetTimestamp();
        _steps.Add(new PauseStep(process, name, Math.Round(Stopwatch.GetElapsedTime(_last, now).TotalMilliseconds, 2)));
        _last = now;
    }

    /// <summary>Records a step timed elsewhere (such as the other process's).</summary>
    public void Add(IEnumerable<PauseStep> steps)
    {
        _steps.AddRange(steps);
        _last = Stopwatch.GetTimestamp();
    }
}
