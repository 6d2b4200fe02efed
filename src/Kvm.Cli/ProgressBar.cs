using Kvm.Interop.Native;

namespace Kvm.Cli;

/// <summary>
/// Progress of a long operation on stderr, redrawn in place, only when stderr is a terminal:
/// scripts and logs stay quiet.
/// </summary>
public sealed class ProgressBar : IProgress<double>, IDisposable
{
    private readonly string _label;
    private int _lastPercent = -1;

    private ProgressBar(string label) => _label = label;

    /// <summary>A bar when stderr is a terminal, else null (callers pass it on as IProgress).</summary>
    public static ProgressBar? ForTerminal(string label) => Libc.IsATty(2) == 1 ? new ProgressBar(label) : null;

    public void Report(double value)
    {
        int percent = (int)Math.Clamp(value * 100, 0, 100);
        if (percent == _lastPercent)
            return;
        _lastPercent = percent;
        int filled = percent * 30 / 100;
        Console.Error.Write($"\r{_label} [{new string('#', filled)}{new string('.', 30 - filled)}] {percent,3}%");
    }

    public void Dispose()
    {
        if (_lastPercent >= 0)
            Console.Error.WriteLine();
    }
}
