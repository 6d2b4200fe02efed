using System.Globalization;
using System.Net.Sockets;
using Kvm.Interop.Native;
using Kvm.Rpc;
using Kvm.Tests.Shared;
using Microsoft.Extensions.Logging;

namespace Kvm.Rpc.Tests;

/// <summary>SO_PEERCRED: what the server sees of its peers, and whom it refuses (real processes running as nobody).</summary>
public sealed class PeerCredentialTests
{
    private const uint Nobody = 65534;
    private static readonly TimeSpan ProcessTimeout = TimeSpan.FromSeconds(60);

    // This process's effective ids as /proc reports them ("Uid:\treal\teffective\tsaved\tfs").
    private static (uint Uid, uint Gid) OwnIds()
    {
        var lines = File.ReadAllLines("/proc/self/status");
        uint Effective(string key) => uint.Parse(lines.Single(l => l.StartsWith(key, StringComparison.Ordinal))
            .Split('\t', StringSplitOptions.RemoveEmptyEntries)[2], CultureInfo.InvariantCulture);
        return (Effective("Uid:"), Effective("Gid:"));
    }

    [Fact]
    public void PeerCredentials_of_either_end_of_a_connection_within_this_process_are_its_own()
    {
        using var pair = new SocketPair();
        var (uid, gid) = OwnIds();
        foreach (var socket in new[] { pair.Reader, pair.Writer })
        {
            var peer = PeerCredentials.Of(socket);
            Assert.Equal(Environment.ProcessId, peer.Pid);
            Assert.Equal(uid, peer.Uid);
            Assert.Equal(gid, peer.Gid);
        }
    }

    [Fact]
    public void PeerCredentials_of_an_unconnected_socket_are_an_error_or_nobody()
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        // Linux reports no peer as pid 0 and the overflow ids; what matters is that it is never us.
        try
        {
            var peer = PeerCredentials.Of(socket);
            Assert.NotEqual(Environment.ProcessId, peer.Pid);
        }
        catch (Exception e) when (e is IOException or SocketException)
        {
        }
    }

    [Fact]
    public async Task A_handler_sees_the_callers_credentials()
    {
        await using var server = new TestServer();
        using var client = server.Client();
        var seen = await client.CallAsync("peer", TestJson.Default.PeerResult);
        var (uid, gid) = OwnIds();
        Assert.Equal(new PeerResult(Environment.ProcessId, uid, gid), seen);
    }

    [Fact]
    public void ForGroup_of_a_missing_group_is_an_argument_exception_naming_it()
    {
        string name = "kvmrpc-missing-" + Guid.NewGuid().ToString("N")[..8];
        var e = Assert.Throws<ArgumentException>(() => RpcAccessPolicy.ForGroup(name));
        Assert.Contains($"'{name}'", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ForGroup_of_an_existing_group_has_its_id()
    {
        // root exists everywhere and is gid 0 (/etc/group is the oracle).
        var policy = RpcAccessPolicy.ForGroup("root");
        Assert.Equal(0u, policy.GroupId);
        Assert.Equal("root", policy.GroupName);
    }

    private static void RequireRootAndSetpriv()
    {
        TestEnvironment.SkipIf(Libc.GetEuid() == 0 ? null : "needs root: runs a client as nobody with setpriv --reuid, which needs CAP_SETUID");
        TestEnvironment.RequireProgram("setpriv", "util-linux");
    }

    /// <summary>Runs RpcTestPeer as nobody (uid 65534) with the given primary and supplementary groups; returns its one line of output and its pid.</summary>
    private static (string Output, int Pid) CallAsNobody(TempDir dir, string socket, string method, uint gid, IEnumerable<uint> groups)
    {
        var (dll, home) = TestPeer.CopyForEveryone(dir);
        var g = groups.ToList();
        var args = new List<string> { $"--reuid={Nobody}", $"--regid={gid}" };
        args.Add(g.Count == 0 ? "--clear-groups" : $"--groups={string.Join(',', g)}");
        args.AddRange(["--", TestPeer.DotnetHost(), dll, "call", socket, method, "{}"]);
        var env = new Dictionary<string, string?> { ["HOME"] = home, ["DOTNET_CLI_HOME"] = home, ["DOTNET_NOLOGO"] = "1" };
        using var p = TestEnvironment.StartRedirected("setpriv", args, env);
        p.StandardInput.Close();
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(ProcessTimeout))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"setpriv {string.Join(' ', args)} did not finish within {ProcessTimeout}");
        }
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"setpriv {string.Join(' ', args)} exited {p.ExitCode}: {stdout.Result} {stderr.Result}");
        return (stdout.Result.Trim(), p.Id);
    }

    private static UnixFileMode Mode(string octal) => (UnixFileMode)Convert.ToInt32(octal, 8);

    [SkippableFact]
    public async Task A_process_of_another_user_is_refused_by_its_credentials_and_the_refusal_is_logged()
    {
        RequireRootAndSetpriv();
        // 0666: the kernel lets nobody connect, so the refusal can only come from SO_PEERCRED.
        await using var server = new TestServer(o => o with { SocketMode = Mode("666") });
        var (output, pid) = CallAsNobody(server.Dir, server.SocketPath, "notes", Nobody, []);
        Assert.StartsWith($"error {RpcErrorCode.PermissionDenied} ", output, StringComparison.Ordinal);
        Assert.Contains($"uid {Nobody}", output, StringComparison.Ordinal);
        var logged = server.Logger.WaitFor(e => e.EventId.Id == 5001, TimeSpan.FromSeconds(5));
        Assert.NotNull(logged);
        Assert.Equal(LogLevel.Warning, logged.Level);
        Assert.Contains($"pid {pid} ", logged.Message, StringComparison.Ordinal);
        Assert.Contains($"uid {Nobody}", logged.Message, StringComparison.Ordinal);
        Assert.Contains(server.SocketPath, logged.Message, StringComparison.Ordinal);
        // The method never ran for it, and the server still serves its owner.
        using var owner = server.Client();
        Assert.Equal(RpcErrorCode.NotFound, (await Assert.ThrowsAsync<RpcException>(() => owner.CallAsync("fail.rpc", RpcJsonContext.Default.Done))).Code);
    }

    [SkippableFact]
    public async Task Members_of_the_allowed_group_are_served_and_others_refused_naming_the_group()
    {
        RequireRootAndSetpriv();
        TestEnvironment.RequireProgram("groupadd", "passwd");
        string group = "kvmrpct" + Guid.NewGuid().ToString("N")[..8];
        var add = TestEnvironment.RunProcess("groupadd", ["--system", group], ProcessTimeout);
        Assert.True(add.ExitCode == 0, $"groupadd --system {group}: {add.Stderr}");
        try
        {
            var policy = RpcAccessPolicy.ForGroup(group);
            uint gid = policy.GroupId!.Value;
            Assert.NotEqual(Nobody, gid);

            // With the default mode (0660) the socket file belongs to the group, so the kernel
            // lets members connect; the server must then accept them by their credentials.
            await using (var server = new TestServer(o => o with { Access = policy }))
            {
                var stat = TestEnvironment.RunProcess("stat", ["-c", "%a %g", server.SocketPath], ProcessTimeout);
                Assert.Equal($"660 {gid}", stat.Stdout.Trim());
                // A supplementary member (the groups /proc lists for the peer) ...
                var (output, pid) = CallAsNobody(server.Dir, server.SocketPath, "peer", Nobody, [gid]);
                Assert.True($$"""ok {"pid":{{pid}},"uid":{{Nobody}},"gid":{{Nobody}}}""" == output, output);
                // ... and a member by its primary group.
                (output, pid) = CallAsNobody(server.Dir, server.SocketPath, "peer", gid, []);
                Assert.Equal($$"""ok {"pid":{{pid}},"uid":{{Nobody}},"gid":{{gid}}}""", output);
            }

            // 0666, so that a non-member gets past the kernel: the credentials check refuses it.
            await using (var server = new TestServer(o => o with { Access = policy, SocketMode = Mode("666") }))
            {
                var (output, _) = CallAsNobody(server.Dir, server.SocketPath, "peer", Nobody, [Nobody]);
                Assert.StartsWith($"error {RpcErrorCode.PermissionDenied} ", output, StringComparison.Ordinal);
                Assert.Contains($"uid {Nobody}", output, StringComparison.Ordinal);
                Assert.Contains($"'{group}' ({gid})", output, StringComparison.Ordinal);
                Assert.NotNull(server.Logger.WaitFor(e => e.EventId.Id == 5001 && e.Message.Contains(group, StringComparison.Ordinal), TimeSpan.FromSeconds(5)));
            }
        }
        finally
        {
            TestEnvironment.RunProcess("groupdel", [group], ProcessTimeout);
        }
    }
}
