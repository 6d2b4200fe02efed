using Kvm.Devices.Legacy.Serial;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Vmm.Machine;

/// <summary>
/// Attaches a VM's serial port to this process's terminal: guest output to stdout, keystrokes
/// from stdin to the guest. On a terminal, input is read a character at a time without echo;
/// Ctrl-C still raises SIGINT, which the caller turns into a clean stop. The terminal is restored
/// on dispose.
/// </summary>
public sealed class ForegroundConsole : IDisposable
{
    // write(2) on fd 1, byte for byte (see StdioStream for why not .NET's console streams).
    private readonly Stream _stdout = new StdioStream(StdioHandle.Output, FileAccess.Write);
    private readonly bool _terminal;
    private readonly object _writeLock = new();
    private Thread? _inputThread;
    private volatile bool _disposed;

    private ForegroundConsole(bool terminal) => _terminal = terminal;

    /// <summary>
    /// Points Console.Out and Console.Error at plain writers on fds 1 and 2. .NET's own console
    /// layer switches a terminal's keypad mode when first used, which would leave escape codes
    /// in front of the guest's console; programs call this first thing.
    /// </summary>
    public static void UsePlainStandardStreams()
    {
        Console.SetOut(PlainWriter(1));
        Console.SetError(PlainWriter(2));
    }

    private static TextWriter PlainWriter(int fd) =>
        TextWriter.Synchronized(new StreamWriter(
            new StdioStream(fd == 1 ? StdioHandle.Output : StdioHandle.Error, FileAccess.Write, discardOnBrokenPipe: true),
            new System.Text.UTF8Encoding(encoderShouldEmitUTF8Identifier: false)) { AutoFlush = true });

    public static ForegroundConsole Attach()
    {
        bool tty = Libc.IsATty(0) == 1;
        var c = new ForegroundConsole(tty);
        if (tty)
            KvmShim.TermCbreak(0);
        return c;
    }

    /// <summary>Writes guest output to stdout as it arrives.</summary>
    public void Write(ReadOnlySpan<byte> bytes)
    {
        lock (_writeLock)
        {
            _stdout.Write(bytes);
            _stdout.Flush();
        }
    }

    /// <summary>Feeds stdin to the UART's receive FIFO from a background thread, waiting while it is full.</summary>
    public void PumpInput(Serial16550 serial)
    {
        _inputThread = new Thread(() =>
        {
            // Plain reads of fd 0: Console.OpenStandardInput on a terminal would run .NET's own
            // line editor, which echoes what is typed.
            var stdin = new StdioStream(StdioHandle.Input, FileAccess.Read);
            var buf = new byte[256];
            try
            {
                while (!_disposed)
                {
                    int n = stdin.Read(buf, 0, buf.Length);
                    if (n <= 0)
                        return;
                    int done = 0;
                    while (done < n && !_disposed)
                    {
                        done += serial.EnqueueInput(buf.AsSpan(done, n - done));
                        if (done < n)
                            Thread.Sleep(1);
                    }
                }
            }
            catch (IOException)
            {
            }
            catch (ObjectDisposedException)
            {
            }
        })
        { IsBackground = true, Name = "console-input" };
        _inputThread.Start();
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        if (_terminal)
            KvmShim.TermRestore();
        lock (_writeLock)
            _stdout.Flush();
    }
}
