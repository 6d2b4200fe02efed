using Kvm.Cluster;
using Kvm.Rpc;
using Kvm.Tests.Shared;
using Npgsql;

namespace Kvm.IntegrationTests;

/// <summary>
/// Two kvmd hosts on one PostgreSQL cluster, with no VM running (no KVM needed): what one host
/// changes reaches the other through LISTEN/NOTIFY, which keeps the other's cached view current;
/// a host whose notification connection is cut answers from the database or not at all, never
/// from a view that may have changed unseen, and re-reads it once connected again.
/// </summary>
public sealed class KvmdNotificationTests : IDisposable
{
    private static readonly TimeSpan Soon = TimeSpan.FromSeconds(15);
    private readonly KvmdHarness _kvmd = new();

    private static VmList List(string socket)
    {
        using var c = RpcClient.Connect(socket, "kvmd");
        return c.CallAsync("vm.list", KvmdJson.Default.VmList).WaitAsync(TimeSpan.FromSeconds(30)).GetAwaiter().GetResult();
    }

    private static void Create(string socket, string name)
    {
        using var c = RpcClient.Connect(socket, "kvmd");
        using var spec = System.Text.Json.JsonDocument.Parse($$"""{"kernel": "{{TestEnvironment.GuestKit}}", "cmdline": "hello"}""");
        c.CallAsync("vm.create", new CreateVmRequest(name, spec.RootElement.Clone()), KvmdJson.Default.CreateVmRequest, KvmdJson.Default.VmInfo)
            .WaitAsync(TimeSpan.FromSeconds(30)).GetAwaiter().GetResult();
    }

    private async Task SqlAsync(string sql)
    {
        await using var conn = new NpgsqlConnection(_kvmd.SharedDatabase());
        await conn.OpenAsync();
        await using var cmd = new NpgsqlCommand(sql, conn);
        await cmd.ExecuteNonQueryAsync();
    }

    [SkippableFact]
    public async Task AChangeOnOneHostReachesTheOtherAndALostNotificationConnectionIsReadAgain()
    {
        TestEnvironment.RequireGuestKit();
        KvmdHarness.RequireKvmd();
        _kvmd.Start();
        // Host B logs in as its own role, so that it alone can be cut off from the database.
        await SqlAsync("create role kvm_b login superuser");
        string b = _kvmd.StartHost("host-b", user: "kvm_b");

        // B's view follows A's change: no list of B's is asked for until it shows.
        var before = KvmdHarness.Status(b).View;
        Assert.True(before.Trusted, $"B's view is not trusted at start: {before}");
        Create(_kvmd.Socket, "made-on-a");
        Assert.True(SpinWait.SpinUntil(() => KvmdHarness.Status(b).View.LastEventId > before.LastEventId, Soon), "A's change was not notified to B");
        Assert.Contains(List(b).Vms, v => v.Name == "made-on-a");
        // Nothing changed since: B answers from its view, without reading the database.
        var cached = KvmdHarness.Status(b).View;
        for (int i = 0; i < 5; i++)
            Assert.Contains(List(b).Vms, v => v.Name == "made-on-a");
        var after = KvmdHarness.Status(b).View;
        Assert.Equal(cached.DatabaseReads, after.DatabaseReads);
        Assert.True(after.CacheHits >= cached.CacheHits + 5, $"B's lists did not come from its view: {cached} then {after}");

        // B cut off: its role may no longer log in, and its connections are ended.
        await SqlAsync("alter role kvm_b nologin");
        await SqlAsync("select pg_terminate_backend(pid) from pg_stat_activity where usename = 'kvm_b'");
        Assert.True(SpinWait.SpinUntil(() => !KvmdHarness.Status(b).View.Trusted, Soon), "B still trusts its view with its notification connection gone");
        Create(_kvmd.Socket, "made-while-b-was-away");
        // B does not answer from a view that missed this: it fails, naming the database.
        var refused = Assert.ThrowsAny<RpcException>(() => List(b));
        Assert.DoesNotContain("   at ", refused.Message);

        // B let back in: it reconnects, re-reads, and sees what it missed.
        await SqlAsync("alter role kvm_b login");
        Assert.True(SpinWait.SpinUntil(() => KvmdHarness.Status(b).View is { Trusted: true, Resyncs: >= 1 }, Soon),
            $"B did not reconnect and re-read: {KvmdHarness.Status(b).View}");
        var again = KvmdHarness.Status(b).View;
        Assert.Equal(again.Reconnects, again.Resyncs);
        Assert.Contains(List(b).Vms, v => v.Name == "made-while-b-was-away");
        Assert.Equal(["made-on-a", "made-while-b-was-away"], List(b).Vms.Select(v => v.Name));
    }

    /// <summary><c>vmctl events --follow</c> on one host shows what another host did as it happens.</summary>
    [SkippableFact]
    public void EventsOnOneHostShowAnotherHostsChangeAsItHappens()
    {
        TestEnvironment.RequireGuestKit();
        KvmdHarness.RequireKvmd();
        _kvmd.Start();
        string b = _kvmd.StartHost("host-b");
        using var follow = LiveProcess.Start(TestEnvironment.Vmctl, ["--connect", b, "events", "--follow"]);
        Thread.Sleep(2000); // vmctl is waiting on B
        Create(_kvmd.Socket, "seen-from-b");
        Assert.True(follow.WaitFor("vm/seen-from-b", Soon), $"B's events did not show A's change: {follow.Output}");
        Assert.Contains("vm.created", follow.Output, StringComparison.Ordinal);
    }

    public void Dispose() => _kvmd.Dispose();
}
