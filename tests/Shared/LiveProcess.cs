using System.Diagnostics;
using System.Text;

namespace Kvm.Tests.Shared;

/// <summary>
/// A program whose output a test watches while it runs (a VM's console): stdout is collected as
/// it arrives, stderr in the background, stdin stays open for typing. Disposing kills it if it
/// still runs.
/// </summary>
public sealed class LiveProcess : IDisposable
{
    private readonly StringBuilder _output = new();
    private readonly Task _reader;

    private LiveProcess(Process process)
    {
        Process = process;
        Stderr = process.StandardError.ReadToEndAsync();
        _reader = Task.Run(() =>
        {
            var buf = new char[4096];
            int n;
            while ((n = process.StandardOutput.Read(buf, 0, buf.Length)) > 0)
                lock (_output)
                    _output.Append(buf, 0, n);
        });
    }

    public Process Process { get; }

    /// <summary>All of stderr, once the process has closed it.</summary>
    public Task<string> Stderr { get; }

    /// <summary>What stdout has printed so far, without carriage returns.</summary>
    public string Output
    {
        get { lock (_output) return _output.ToString().Replace("\r", ""); }
    }

    public static LiveProcess Start(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string?>? environment = null) =>
        new(TestEnvironment.StartRedirected(file, args, environment));

    /// <summary>Writes <paramref name="keys"/> to stdin.</summary>
    public void Type(string keys)
    {
        Process.StandardInput.Write(keys);
        Process.StandardInput.Flush();
    }

    /// <summary>Waits until the output contains <paramref name="text"/>; false on timeout or when the process ended without it.</summary>
    public bool WaitFor(string text, TimeSpan timeout) =>
        SpinWait.SpinUntil(() => Output.Contains(text, StringComparison.Ordinal) || (Process.HasExited && _reader.IsCompleted), timeout)
        && Output.Contains(text, StringComparison.Ordinal);

    /// <summary>Waits for the process to end and its output to be read; false on timeout.</summary>
    public bool WaitForExit(TimeSpan timeout) => Process.WaitForExit(timeout) && _reader.Wait(TimeSpan.FromSeconds(10));

    /// <summary>The last <paramref name="lines"/> lines of the output.</summary>
    public string Tail(int lines = 15) => string.Join('\n', Output.Split('\n').TakeLast(lines));

    public void Dispose()
    {
        try
        {
            if (!Process.HasExited)
            {
                Process.Kill(entireProcessTree: true);
                Process.WaitForExit();
            }
        }
        catch (InvalidOperationException)
        {
        }
        Process.Dispose();
    }
}
