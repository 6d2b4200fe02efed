using System.Text;
using System.Text.Json;
using Kvm.Rpc;
using Microsoft.Extensions.Logging.Abstractions;

namespace Kvm.Cluster.Tests;

/// <summary>
/// kvmd's request parameters as the dispatcher reads them: a member without a default is
/// required, so a request that leaves it out is an invalid-params error naming it and never reaches
/// a handler as null (the seeded fuzz in KvmdFuzzTests found vm.create, vm.start and others failing
/// with an internal error on a missing name).
/// </summary>
public sealed class KvmdRequestTests
{
    private static async Task<JsonElement> Call(string method, string parameters)
    {
        var dispatcher = new RpcDispatcher(NullLogger.Instance);
        var j = KvmdJson.Default;
        dispatcher.Add("vm.start", j.VmNameRequest, j.VmNameRequest, (r, _, _) => ValueTask.FromResult(r));
        dispatcher.Add("vm.create", j.CreateVmRequest, j.CreateVmRequest, (r, _, _) => ValueTask.FromResult(r));
        dispatcher.Add("vm.stop", j.StopVmRequest, j.StopVmRequest, (r, _, _) => ValueTask.FromResult(r));
        dispatcher.Add("vm.delete", j.DeleteVmRequest, j.DeleteVmRequest, (r, _, _) => ValueTask.FromResult(r));
        dispatcher.Add("vm.save", j.SaveVmRequest, j.SaveVmRequest, (r, _, _) => ValueTask.FromResult(r));
        dispatcher.Add("vm.upgrade", j.UpgradeVmRequest, j.UpgradeVmRequest, (r, _, _) => ValueTask.FromResult(r));
        dispatcher.Add("vm.start-from", j.StartVmRequest, j.StartVmRequest, (r, _, _) => ValueTask.FromResult(r));
        var line = Encoding.UTF8.GetBytes($$$"""{"jsonrpc":"2.0","id":1,"method":"{{{method}}}","params":{{{parameters}}}}""");
        var response = await dispatcher.HandleAsync(line, new PeerCredentials(1, 0, 0), CancellationToken.None);
        using var doc = JsonDocument.Parse(response!);
        return doc.RootElement.Clone();
    }

    [Theory]
    [InlineData("vm.start", "{}", "name")]
    [InlineData("vm.create", """{"spec":{"kernel":"/k"}}""", "name")]
    [InlineData("vm.create", """{"name":"a"}""", "spec")]
    [InlineData("vm.stop", """{"force":true}""", "name")]
    [InlineData("vm.delete", """{"force":true}""", "name")]
    [InlineData("vm.save", """{"directory":"/s"}""", "name")]
    [InlineData("vm.save", """{"name":"a","stop":true}""", "directory")]
    [InlineData("vm.upgrade", """{"vmm":"/v"}""", "name")]
    public async Task A_missing_required_member_is_invalid_params_naming_it(string method, string parameters, string member)
    {
        var response = await Call(method, parameters);
        Assert.True(response.TryGetProperty("error", out var error), response.ToString());
        Assert.Equal(RpcErrorCode.InvalidParams, error.GetProperty("code").GetInt32());
        Assert.Contains($"'{member}'", error.GetProperty("message").GetString(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task Members_with_defaults_stay_optional()
    {
        var stop = (await Call("vm.stop", """{"name":"a"}""")).GetProperty("result");
        Assert.Equal("a", stop.GetProperty("name").GetString());
        Assert.False(stop.GetProperty("force").GetBoolean());
        Assert.Equal(Kvm.Control.VmControl.DefaultStopTimeoutSeconds, stop.GetProperty("timeoutSeconds").GetDouble());
        var create = (await Call("vm.create", """{"name":"a","spec":{"kernel":"/k"}}""")).GetProperty("result");
        Assert.False(create.GetProperty("start").GetBoolean());
        Assert.False((await Call("vm.delete", """{"name":"a"}""")).GetProperty("result").GetProperty("force").GetBoolean());
    }

    [Fact]
    public async Task Save_upgrade_and_start_from_a_snapshot_keep_their_options_optional()
    {
        var save = (await Call("vm.save", """{"name":"a","directory":"/s"}""")).GetProperty("result");
        Assert.False(save.GetProperty("stop").GetBoolean());
        Assert.False(save.TryGetProperty("workingSetSeconds", out _));
        var upgrade = (await Call("vm.upgrade", """{"name":"a"}""")).GetProperty("result");
        Assert.False(upgrade.TryGetProperty("vmm", out _));
        var start = (await Call("vm.start-from", """{"name":"a","from":"/s","memory":"lazy"}""")).GetProperty("result");
        Assert.Equal("/s", start.GetProperty("from").GetString());
        Assert.Equal("lazy", start.GetProperty("memory").GetString());
        Assert.Equal(0, start.GetProperty("waitSeconds").GetDouble());
    }
}
