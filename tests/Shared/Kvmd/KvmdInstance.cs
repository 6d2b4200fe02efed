using Kvm.Cluster;
using Kvm.Rpc;
using Libc = Kvm.Interop.Native.Libc;

namespace Kvm.Tests.Shared;

/// <summary>
/// One kvmd started from build/bin for a test or a benchmark, with all of its files under one
/// folder: FOLDER/kvmd.sock, FOLDER/state (its private PostgreSQL cluster, VM logs), FOLDER/run
/// (each VM's sockets and exit record). Several on one machine are several hosts: give each its
/// own folder and host name, and the others <see cref="SharedDatabase"/> of the first (kvmd's
/// private cluster serves as the shared one). Its group is one that does not exist, so its sockets
/// are the owner's only. Disposing stops it cleanly (SIGTERM: a kvmd stops its private cluster);
/// the VMs it started go on, as they would after any stop of kvmd: <see cref="KillLeftovers"/>
/// ends them. Kept out of tests/Shared/*.cs: it needs the kvmd projects (Kvm.Cluster).
/// </summary>
public sealed class KvmdInstance : IDisposable
{
    /// <summary>kvmd's first start makes its PostgreSQL cluster (initdb): minutes in the nested KVM host.</summary>
    public static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(400);

    private KvmdInstance(string folder, string hostName, LiveProcess process)
    {
        Folder = folder;
        HostName = hostName;
        Process = process;
    }

    public string Folder { get; }

    public string HostName { get; }

    public LiveProcess Process { get; }

    public string Socket => SocketIn(Folder);

    public string StateDir => Path.Combine(Folder, "state");

    public string RunDir => Path.Combine(Folder, "run");

    /// <summary>The RPC socket of a kvmd whose folder is <paramref name="folder"/>.</summary>
    public static string SocketIn(string folder) => Path.Combine(folder, "kvmd.sock");

    /// <summary>
    /// The connection string to this kvmd's private cluster, for other hosts' <c>--database</c> (a
    /// shared inventory) or for reading the inventory directly.
    /// </summary>
    public string SharedDatabase => DatabaseIn(Folder);

    /// <summary>The connection string to the private cluster of a kvmd whose folder is <paramref name="folder"/>.</summary>
    public static string DatabaseIn(string folder) => new Npgsql.NpgsqlConnectionStringBuilder
    {
        Host = Path.Combine(folder, "state", "postgres", "run"),
        Username = Kvm.Inventory.Embedded.EmbeddedPostgres.SuperUser,
        Database = "kvm",
    }.ConnectionString;

    /// <summary>
    /// Starts kvmd with its files in <paramref name="folder"/> (made if missing, and opened to the
    /// 'postgres' account that runs the private cluster) as host <paramref name="hostName"/>, with
    /// <paramref name="more"/> options, and returns once it answers daemon.status. Throws with its
    /// stderr when it ends first or does not answer within <see cref="StartTimeout"/>.
    /// </summary>
    public static KvmdInstance Start(string folder, string hostName, IEnumerable<string>? more = null)
    {
        Directory.CreateDirectory(folder);
        File.SetUnixFileMode(folder, (UnixFileMode)0b111_101_101);
        string socket = SocketIn(folder);
        var process = LiveProcess.Start(TestEnvironment.Kvmd,
        [
            "--socket", socket, "--state-dir", Path.Combine(folder, "state"), "--run-dir", Path.Combine(folder, "run"),
            "--host-name", hostName, "--group", "nonexistent-group", .. more ?? [],
        ]);
        var kvmd = new KvmdInstance(folder, hostName, process);
        bool up = SpinWait.SpinUntil(() =>
        {
            if (process.Process.HasExited || kvmd.Answers())
                return true;
            Thread.Sleep(100);
            return false;
        }, StartTimeout);
        if (process.Process.HasExited || !up)
        {
            string stderr = process.Process.HasExited ? process.Stderr.Result.Trim() : "(still running)";
            kvmd.Dispose();
            throw new InvalidOperationException(
                $"kvmd ({hostName}, {folder}) did not come up within {StartTimeout.TotalSeconds} s (exited: {process.Process.HasExited}): {stderr}");
        }
        return kvmd;
    }

    /// <summary>Whether kvmd answers daemon.status now (waiting at most 10 s for the answer).</summary>
    public bool Answers()
    {
        try
        {
            using var c = RpcClient.Connect(Socket, "kvmd");
            c.CallAsync("daemon.status", KvmdJson.Default.DaemonStatus).WaitAsync(TimeSpan.FromSeconds(10)).GetAwaiter().GetResult();
            return true;
        }
        catch (Exception e) when (e is RpcException or TimeoutException)
        {
            return false;
        }
    }

    /// <summary>Sends kvmd a signal (SIGSTOP 19 freezes it, SIGCONT 18 continues it); false when it could not be sent.</summary>
    public bool Signal(int signal) => Libc.Kill(Process.Process.Id, signal) == 0;

    /// <summary>Stops kvmd cleanly (SIGTERM) and waits for it; true when it ended in time.</summary>
    public bool Stop(TimeSpan timeout)
    {
        if (Process.Process.HasExited)
            return true;
        Signal(18); // a frozen kvmd must run to stop
        Signal(15);
        return Process.WaitForExit(timeout);
    }

    public void Dispose()
    {
        Stop(TimeSpan.FromSeconds(30));
        Process.Dispose();
    }

    /// <summary>
    /// Ends what kvmd processes with their files under <paramref name="folder"/> left behind (VMs
    /// outlive kvmd by design; a killed kvmd leaves its cluster): every kvm-vmm whose command line
    /// names the folder (SIGKILL), and each private cluster's postmaster found there (SIGQUIT: an
    /// immediate shutdown).
    /// </summary>
    public static void KillLeftovers(string folder)
    {
        foreach (var proc in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(proc), out int pid))
                continue;
            try
            {
                string cmdline = File.ReadAllText(Path.Combine(proc, "cmdline"));
                if (cmdline.Contains("kvm-vmm", StringComparison.Ordinal) && cmdline.Contains(folder, StringComparison.Ordinal))
                    Libc.Kill(pid, 9);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
        }
        if (!Directory.Exists(folder))
            return;
        // kvmd folders: this one and those one level below (the other hosts').
        foreach (var kvmd in Directory.EnumerateDirectories(folder).Prepend(folder))
            EndServer(Path.Combine(kvmd, "state", "postgres", "data"));
    }

    /// <summary>Ends the PostgreSQL server of data directory <paramref name="dataDir"/> if its postmaster.pid names one (SIGQUIT: an immediate shutdown).</summary>
    public static void EndServer(string dataDir)
    {
        string pidFile = Path.Combine(dataDir, "postmaster.pid");
        try
        {
            if (File.Exists(pidFile) && int.TryParse(File.ReadLines(pidFile).FirstOrDefault(), out int postmaster))
                Libc.Kill(postmaster, 3);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }
}
