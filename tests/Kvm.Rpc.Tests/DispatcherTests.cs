using System.Text;
using System.Text.Json;
using Kvm.Rpc;
using Microsoft.Extensions.Logging;

namespace Kvm.Rpc.Tests;

/// <summary>
/// The dispatcher through a live RpcServer on a real socket: typed calls through RpcClient, and
/// every kind of bad request as raw lines from a plain socket, each followed by a good call on
/// the same connection.
/// </summary>
public sealed class DispatcherTests : IAsyncLifetime
{
    private TestServer _server = null!;

    public Task InitializeAsync()
    {
        _server = new TestServer();
        return Task.CompletedTask;
    }

    public async Task DisposeAsync() => await _server.DisposeAsync();

    [Fact]
    public async Task Typed_params_and_results_round_trip_through_the_client()
    {
        using var client = _server.Client();
        var sum = await client.CallAsync("add", new AddParams { A = 2_000_000_000, B = 2_000_000_000 }, TestJson.Default.AddParams, TestJson.Default.SumResult);
        Assert.Equal(4_000_000_000L, sum.Sum);
        var echo = await client.CallAsync("echo", new EchoParams { Text = "h\u00e9 \"\u2603\"\n", Repeat = 3 }, TestJson.Default.EchoParams, TestJson.Default.EchoResult);
        Assert.Equal(string.Concat(Enumerable.Repeat("h\u00e9 \"\u2603\"\n", 3)), echo.Text);
        await client.CallAsync("note", new NoteParams { Text = "n" }, TestJson.Default.NoteParams, RpcJsonContext.Default.Done);
        var notes = await client.CallAsync("notes", TestJson.Default.NotesResult);
        Assert.Equal(["n"], notes.Notes);
    }

    [Fact]
    public async Task A_method_without_params_accepts_absent_null_and_empty_params_but_not_members()
    {
        using var peer = _server.Raw();
        foreach (var (request, id) in new[]
                 {
                     ("""{"jsonrpc":"2.0","id":1,"method":"notes"}""", "1"),
                     ("""{"jsonrpc":"2.0","id":2,"method":"notes","params":null}""", "2"),
                     ("""{"jsonrpc":"2.0","id":3,"method":"notes","params":{}}""", "3"),
                 })
        {
            await peer.SendAsync(request);
            Assert.Equal(JsonValueKind.Array, Response.AssertResult(await peer.ReceiveAsync(), id).GetProperty("notes").ValueKind);
        }
        await peer.SendAsync("""{"jsonrpc":"2.0","id":4,"method":"notes","params":{"verbose":true}}""");
        Response.AssertError(await peer.ReceiveAsync(), RpcErrorCode.InvalidParams, "4");
        await Response.AssertStillWorksAsync(peer);
    }

    public static TheoryData<string, string, int, string> BadRequests => new()
    {
        // name, line, code, the id the error must carry (raw JSON)
        { "truncated JSON", """{"jsonrpc":"2.0","id":1,"method":"add","par""", RpcErrorCode.ParseError, "null" },
        { "not JSON", "hello", RpcErrorCode.ParseError, "null" },
        { "trailing garbage", """{"jsonrpc":"2.0","id":1,"method":"notes"} x""", RpcErrorCode.ParseError, "null" },
        { "single quotes", "{'jsonrpc':'2.0','id':1,'method':'notes'}", RpcErrorCode.ParseError, "null" },
        { "nesting beyond MaxDepth", """{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":""" + new string('[', 70) + new string(']', 70) + "}}", RpcErrorCode.ParseError, "null" },
        { "a batch", """[{"jsonrpc":"2.0","id":1,"method":"notes"}]""", RpcErrorCode.InvalidRequest, "null" },
        { "an empty array", "[]", RpcErrorCode.InvalidRequest, "null" },
        { "a number", "42", RpcErrorCode.InvalidRequest, "null" },
        { "a string", "\"notes\"", RpcErrorCode.InvalidRequest, "null" },
        { "null", "null", RpcErrorCode.InvalidRequest, "null" },
        { "missing jsonrpc", """{"id":5,"method":"notes"}""", RpcErrorCode.InvalidRequest, "5" },
        { "jsonrpc 1.0", """{"jsonrpc":"1.0","id":5,"method":"notes"}""", RpcErrorCode.InvalidRequest, "5" },
        { "jsonrpc as a number", """{"jsonrpc":2.0,"id":"five","method":"notes"}""", RpcErrorCode.InvalidRequest, "\"five\"" },
        { "missing jsonrpc in a notification", """{"method":"notes"}""", RpcErrorCode.InvalidRequest, "null" },
        { "id an object", """{"jsonrpc":"2.0","id":{"n":1},"method":"notes"}""", RpcErrorCode.InvalidRequest, "null" },
        { "id an array", """{"jsonrpc":"2.0","id":[1],"method":"notes"}""", RpcErrorCode.InvalidRequest, "null" },
        { "id a boolean", """{"jsonrpc":"2.0","id":true,"method":"notes"}""", RpcErrorCode.InvalidRequest, "null" },
        { "method a number", """{"jsonrpc":"2.0","id":6,"method":6}""", RpcErrorCode.InvalidRequest, "6" },
        { "method missing", """{"jsonrpc":"2.0","id":6}""", RpcErrorCode.InvalidRequest, "6" },
        { "method null", """{"jsonrpc":"2.0","id":6,"method":null}""", RpcErrorCode.InvalidRequest, "6" },
        { "unknown method", """{"jsonrpc":"2.0","id":7,"method":"vm.explode"}""", RpcErrorCode.MethodNotFound, "7" },
        { "method name case", """{"jsonrpc":"2.0","id":7,"method":"ADD","params":{"a":1,"b":2}}""", RpcErrorCode.MethodNotFound, "7" },
        { "params by position", """{"jsonrpc":"2.0","id":8,"method":"add","params":[1,2]}""", RpcErrorCode.InvalidParams, "8" },
        { "params a string", """{"jsonrpc":"2.0","id":8,"method":"add","params":"1,2"}""", RpcErrorCode.InvalidParams, "8" },
        { "params missing", """{"jsonrpc":"2.0","id":8,"method":"add"}""", RpcErrorCode.InvalidParams, "8" },
        { "params null", """{"jsonrpc":"2.0","id":8,"method":"add","params":null}""", RpcErrorCode.InvalidParams, "8" },
        { "a param of the wrong type", """{"jsonrpc":"2.0","id":8,"method":"add","params":{"a":"1","b":2}}""", RpcErrorCode.InvalidParams, "8" },
        { "a param out of range", """{"jsonrpc":"2.0","id":8,"method":"add","params":{"a":1e30,"b":2}}""", RpcErrorCode.InvalidParams, "8" },
        { "a fractional int", """{"jsonrpc":"2.0","id":8,"method":"add","params":{"a":1.5,"b":2}}""", RpcErrorCode.InvalidParams, "8" },
        { "an unknown member", """{"jsonrpc":"2.0","id":8,"method":"add","params":{"a":1,"b":2,"c":3}}""", RpcErrorCode.InvalidParams, "8" },
        { "a missing required member", """{"jsonrpc":"2.0","id":8,"method":"add","params":{"a":1}}""", RpcErrorCode.InvalidParams, "8" },
        { "a null string member", """{"jsonrpc":"2.0","id":8,"method":"echo","params":{"text":null}}""", RpcErrorCode.InvalidParams, "8" },
    };

    [Theory]
    [MemberData(nameof(BadRequests))]
    public async Task A_bad_request_gets_its_error_and_the_connection_keeps_working(string name, string line, int code, string rawId)
    {
        using var peer = _server.Raw();
        await peer.SendAsync(line);
        var error = Response.AssertError(await peer.ReceiveAsync(), code, rawId);
        // The message says what was wrong, in the project's convention: the chain of observations.
        Assert.NotEmpty(Response.Observations(error));
        Assert.Equal(error.GetProperty("message").GetString(), Response.Observations(error)[0]);
        await Response.AssertStillWorksAsync(peer);
        Assert.NotNull(name);
    }

    public static TheoryData<string, string, int[]> BadText => new()
    {
        // name, line with \xNN for raw bytes, the codes that say what is wrong
        { "invalid UTF-8 in the method", "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"a\\xffb\"}", [RpcErrorCode.ParseError, RpcErrorCode.InvalidRequest] },
        { "an overlong encoding in a param", "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"echo\",\"params\":{\"text\":\"\\xc0\\x80\"}}", [RpcErrorCode.ParseError, RpcErrorCode.InvalidParams] },
        { "a lone continuation byte in jsonrpc", "{\"jsonrpc\":\"2.0\\x80\",\"id\":9,\"method\":\"notes\"}", [RpcErrorCode.ParseError, RpcErrorCode.InvalidRequest] },
        { "a lone surrogate escape in the method", "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"\\ud800\"}", [RpcErrorCode.ParseError, RpcErrorCode.InvalidRequest, RpcErrorCode.MethodNotFound] },
        { "a lone surrogate escape in a param", "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"echo\",\"params\":{\"text\":\"\\udc00\"}}", [RpcErrorCode.ParseError, RpcErrorCode.InvalidParams] },
        { "invalid UTF-8 in a string id", "{\"jsonrpc\":\"2.0\",\"id\":\"x\\xc0\\x80\",\"method\":\"notes\"}", [RpcErrorCode.ParseError, RpcErrorCode.InvalidRequest] },
        { "a NUL byte in a string", "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"no\\x00tes\"}", [RpcErrorCode.ParseError] },
        { "a truncated UTF-8 sequence at the end", "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"notes\"}\\xe2\\x82", [RpcErrorCode.ParseError] },
    };

    /// <summary>Bytes that are not valid UTF-8 text (or escapes of lone surrogates) get an error response, never a dropped connection.</summary>
    [Theory]
    [MemberData(nameof(BadText))]
    public async Task Invalid_text_gets_an_error_and_the_connection_keeps_working(string name, string line, int[] codes)
    {
        var bytes = new List<byte>();
        for (int i = 0; i < line.Length; i++)
        {
            if (line[i] == '\\' && i + 3 < line.Length && line[i + 1] == 'x')
            {
                bytes.Add(Convert.ToByte(line.Substring(i + 2, 2), 16));
                i += 3;
            }
            else
                bytes.Add((byte)line[i]);
        }
        bytes.Add((byte)'\n');
        using var peer = _server.Raw();
        await peer.SendBytesAsync([.. bytes]);
        var response = await peer.ReceiveAsync();
        var error = response.GetProperty("error");
        Assert.Contains(error.GetProperty("code").GetInt32(), codes);
        await Response.AssertStillWorksAsync(peer);
        Assert.NotNull(name);
    }

    [Fact]
    public async Task An_unknown_method_and_an_invalid_params_error_name_what_was_wrong()
    {
        using var peer = _server.Raw();
        await peer.SendAsync("""{"jsonrpc":"2.0","id":1,"method":"vm.\u0007explode"}""");
        string message = Response.AssertError(await peer.ReceiveAsync(), RpcErrorCode.MethodNotFound, "1").GetProperty("message").GetString()!;
        Assert.Contains("vm.\\x07explode", message, StringComparison.Ordinal);
        await peer.SendAsync("""{"jsonrpc":"2.0","id":2,"method":"add","params":{"a":1,"b":2,"colour":3}}""");
        message = Response.AssertError(await peer.ReceiveAsync(), RpcErrorCode.InvalidParams, "2").GetProperty("message").GetString()!;
        Assert.Contains("colour", message, StringComparison.Ordinal);
        await peer.SendAsync("""{"jsonrpc":"2.0","id":3,"method":"add","params":[1,2]}""");
        message = Response.AssertError(await peer.ReceiveAsync(), RpcErrorCode.InvalidParams, "3").GetProperty("message").GetString()!;
        Assert.Contains("array", message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_handler_rpc_exception_reaches_the_client_with_its_code_and_observations()
    {
        using var client = _server.Client();
        var e = await Assert.ThrowsAsync<RpcException>(() => client.CallAsync("fail.rpc", RpcJsonContext.Default.Done));
        Assert.Equal(RpcErrorCode.NotFound, e.Code);
        Assert.Equal(TestServer.RpcFailureMessage, e.Message);
        Assert.Equal(TestServer.RpcFailureObservations, e.Observations);
        // The same connection still works.
        Assert.Equal(3, (await client.CallAsync("add", new AddParams { A = 1, B = 2 }, TestJson.Default.AddParams, TestJson.Default.SumResult)).Sum);
    }

    [Fact]
    public async Task A_wrapped_io_exception_is_an_operation_failure_with_the_observation_chain_outermost_first()
    {
        using (var peer = _server.Raw())
        {
            await peer.SendAsync("""{"jsonrpc":"2.0","id":"s1","method":"fail.io"}""");
            var error = Response.AssertError(await peer.ReceiveAsync(), RpcErrorCode.OperationFailed, "\"s1\"");
            var observations = Response.Observations(error);
            Assert.Equal(3, observations.Count);
            Assert.Contains("fail.io", observations[0], StringComparison.Ordinal);
            Assert.Equal(TestServer.WrappedOuterMessage, observations[1]);
            Assert.Equal(TestServer.WrappedInnerMessage, observations[2]);
            await Response.AssertStillWorksAsync(peer);
        }
        using var client = _server.Client();
        var e = await Assert.ThrowsAsync<RpcException>(() => client.CallAsync("fail.io", RpcJsonContext.Default.Done));
        Assert.Equal(RpcErrorCode.OperationFailed, e.Code);
        Assert.Equal([TestServer.WrappedOuterMessage, TestServer.WrappedInnerMessage], e.Observations.Skip(1));
        Assert.Contains(TestServer.WrappedInnerMessage, e.Describe(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_programming_error_is_an_internal_error_that_sends_no_details_and_is_logged()
    {
        using var peer = _server.Raw();
        await peer.SendAsync("""{"jsonrpc":"2.0","id":11,"method":"fail.bug"}""");
        string? line = await peer.ReadLineAsync();
        Assert.NotNull(line);
        using (var doc = JsonDocument.Parse(line))
            Response.AssertError(doc.RootElement, RpcErrorCode.InternalError, "11");
        foreach (var leak in new[] { TestServer.SecretBugDetail, "NullReference", "Exception", " at ", ".cs", "Kvm.Rpc.Tests" })
            Assert.DoesNotContain(leak, line, StringComparison.Ordinal);
        var logged = _server.Logger.WaitFor(e => e.Exception is NullReferenceException, TimeSpan.FromSeconds(5));
        Assert.NotNull(logged);
        Assert.Equal(LogLevel.Error, logged.Level);
        Assert.Contains("fail.bug", logged.Message, StringComparison.Ordinal);
        await Response.AssertStillWorksAsync(peer);
    }

    [Fact]
    public async Task Notifications_get_no_response_even_when_they_fail_but_are_executed()
    {
        using var peer = _server.Raw();
        // Each line in its own write: a notification of a good method, of an unknown method, with
        // bad params, of a failing handler; then one request.
        foreach (var n in new[]
                 {
                     """{"jsonrpc":"2.0","method":"note","params":{"text":"first"}}""",
                     """{"jsonrpc":"2.0","method":"no.such.method"}""",
                     """{"jsonrpc":"2.0","method":"note","params":{"txt":"bad"}}""",
                     """{"jsonrpc":"2.0","method":"fail.io"}""",
                     """{"jsonrpc":"2.0","method":"fail.bug"}""",
                     """{"jsonrpc":"2.0","method":"note","params":{"text":"second"}}""",
                 })
            await peer.SendAsync(n);
        await peer.SendAsync("""{"jsonrpc":"2.0","id":"after","method":"notes"}""");
        // The first line to come back answers the request: nothing was sent for the notifications.
        var notes = Response.AssertResult(await peer.ReceiveAsync(), "\"after\"").GetProperty("notes");
        Assert.Equal(["first", "second"], notes.EnumerateArray().Select(e => e.GetString()));
        await Task.Delay(100);
        peer.Socket.Shutdown(System.Net.Sockets.SocketShutdown.Send);
        Assert.Empty(await peer.ExpectClosedAsync());
    }

    [Theory]
    [InlineData("0")]
    [InlineData("-1")]
    [InlineData("123456789012345678901234567890")]
    [InlineData("18446744073709551616")]
    [InlineData("1.5e300")]
    [InlineData("-0.0")]
    [InlineData("\"\"")]
    [InlineData("\"vm-7\"")]
    [InlineData("\"caf\\u00e9 \\\"q\\\" \\n\"")]
    [InlineData("\"caf\u00e9 \u2603\"")]
    [InlineData("null")]
    public async Task The_id_is_echoed_exactly(string rawId)
    {
        using var peer = _server.Raw();
        await peer.SendAsync($$$"""{"jsonrpc":"2.0","id":{{{rawId}}},"method":"add","params":{"a":1,"b":1}}""");
        Assert.Equal(2, Response.AssertResult(await peer.ReceiveAsync(), rawId).GetProperty("sum").GetInt64());
        await peer.SendAsync($$"""{"jsonrpc":"2.0","id":{{rawId}},"method":"fail.rpc"}""");
        Response.AssertError(await peer.ReceiveAsync(), RpcErrorCode.NotFound, rawId);
    }

    [Fact]
    public async Task Requests_on_one_connection_are_answered_in_order()
    {
        using var peer = _server.Raw();
        var batch = new StringBuilder();
        for (int i = 0; i < 200; i++)
            batch.Append($$$"""{"jsonrpc":"2.0","id":{{{i}}},"method":"add","params":{"a":{{{i}}},"b":{{{i}}}}}""").Append('\n');
        await peer.SendBytesAsync(Encoding.UTF8.GetBytes(batch.ToString()));
        for (int i = 0; i < 200; i++)
        {
            var result = Response.AssertResult(await peer.ReceiveAsync(), i.ToString(System.Globalization.CultureInfo.InvariantCulture));
            Assert.Equal(2 * i, result.GetProperty("sum").GetInt64());
        }
    }
}
