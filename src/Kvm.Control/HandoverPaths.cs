using System.Runtime.InteropServices;
using Kvm.Interop.Native;
using Kvm.Rpc;

namespace Kvm.Control;

/// <summary>
/// The control and console socket paths of a VM being handed over: let go to the new process
/// (which renames its own sockets over them), and taken back if the hand-over fails after that.
/// Before letting go, each path gets a second, hidden name (a hard link to the same socket), so
/// that renaming it back over the path makes clients reach this process again, whatever the new
/// process did to the path before it failed.
/// </summary>
public sealed class HandoverPaths
{
    private readonly RpcServer _control;
    private readonly ConsoleServer? _console;
    private readonly List<(string Path, string Kept)> _kept = [];

    public HandoverPaths(RpcServer control, ConsoleServer? console)
    {
        _control = control;
        _console = console;
    }

    /// <summary>Lets the paths go: each keeps a hidden second name, and the servers leave the files when they end.</summary>
    public void Release()
    {
        foreach (string path in Paths())
        {
            string kept = Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.giver-{Environment.ProcessId}");
            File.Delete(kept);
            if (Libc.Link(path, kept) != 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                Forget();
                throw new IOException($"cannot keep a second name {kept} for the socket {path} during the hand-over: {Errno.Describe(errno)}");
            }
            _kept.Add((path, kept));
        }
        SetLeave(true);
    }

    /// <summary>Takes the paths back after a hand-over that failed once they were let go; clients reach this process again.</summary>
    public void Reclaim()
    {
        foreach (var (path, kept) in _kept)
            File.Move(kept, path, overwrite: true);
        _kept.Clear();
        SetLeave(false);
    }

    /// <summary>Removes the hidden names once the new process holds the paths.</summary>
    public void Forget()
    {
        foreach (var (_, kept) in _kept)
        {
            try { File.Delete(kept); }
            catch (IOException) { /* left behind: harmless, removed by the next hand-over */ }
        }
        _kept.Clear();
    }

    private IEnumerable<string> Paths()
    {
        yield return _control.SocketPath;
        if (_console is not null)
            yield return _console.SocketPath;
    }

    private void SetLeave(bool leave)
    {
        _control.LeaveSocketFile = leave;
        if (_console is not null)
            _console.LeaveSocketFile = leave;
    }
}
