using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Kvm.Rpc;
using static Kvm.Tests.Shared.JsonRpcOracle;

namespace Kvm.Rpc.Tests;

/// <summary>
/// Seeded fuzzing of a live server: mutated and random lines over several connections. Every
/// line is followed by a sentinel request; the sentinel's answer must come (the server neither
/// crashed nor hung), and what came before it must be what the line deserves: nothing for a blank
/// line, -32700 for text that is not JSON, -32600 for JSON that is not an object, one answer with
/// the same id for a request with a valid id, at most one otherwise, -32003 and a closed
/// connection for a line over the limit. Afterwards a normal call works and memory is bounded.
/// </summary>
[Collection(nameof(RunsAlone))]
public sealed class FuzzTests
{
    private const int Limit = 16 << 10;
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(16);
    private const int MaxLinesPerConnection = 10000;
    private static readonly TimeSpan AnswerTimeout = TimeSpan.FromSeconds(10);

    private static readonly string[] Corpus =
    [
        """{"jsonrpc":"2.0","id":1,"method":"add","params":{"a":1,"b":2}}""",
        """{"jsonrpc":"2.0","id":"x-2","method":"echo","params":{"text":"h\u00e9llo \u2603","repeat":2}}""",
        """{"jsonrpc":"2.0","method":"note","params":{"text":"fuzz"}}""",
        """{"jsonrpc":"2.0","id":null,"method":"notes"}""",
        """{"jsonrpc":"2.0","id":3.5,"method":"peer","params":{}}""",
        """{"jsonrpc":"2.0","id":4,"method":"fail.rpc"}""",
        """{"jsonrpc":"2.0","id":5,"method":"fail.io","params":null}""",
        """{"jsonrpc":"2.0","id":6,"method":"fail.bug"}""",
        """{"jsonrpc":"2.0","id":7,"method":"vm.unknown","params":[1,2,3]}""",
        """[{"jsonrpc":"2.0","id":8,"method":"notes"}]""",
    ];

    [Fact]
    public async Task Thousands_of_mutated_lines_neither_crash_nor_hang_the_server_and_memory_stays_bounded()
    {
        await using var server = new TestServer(o => o with { MaxMessageBytes = Limit, MaxConnections = 16 });
        using (var warm = server.Client())
            await warm.CallAsync("notes", TestJson.Default.NotesResult);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long before = GC.GetTotalMemory(forceFullCollection: true);

        var deadline = Stopwatch.StartNew();
        int[] seeds = [1, 2, 3, 4];
        var results = await Task.WhenAll(seeds.Select(seed => Task.Run(() => FuzzConnection(server, seed, deadline))));
        int lines = results.Sum(r => r.Lines), answers = results.Sum(r => r.Answers), closes = results.Sum(r => r.Closed);
        Assert.True(lines >= 4000, $"only {lines} lines in {deadline.Elapsed}: the server is too slow to fuzz meaningfully");

        using (var client = server.Client())
        {
            var sum = await client.CallAsync("add", new AddParams { A = 40, B = 2 }, TestJson.Default.AddParams, TestJson.Default.SumResult);
            Assert.Equal(42, sum.Sum);
        }
        Assert.True(SpinWait.SpinUntil(() => server.Server.OpenConnections == 0, TimeSpan.FromSeconds(10)),
            $"{server.Server.OpenConnections} connections still open after every client left");

        GC.Collect();
        GC.WaitForPendingFinalizers();
        long after = GC.GetTotalMemory(forceFullCollection: true);
        // The captured log keeps an entry per logged failure; everything else must be gone.
        Assert.True(after - before < 48L << 20, $"memory grew by {(after - before) >> 20} MiB over {lines} lines ({answers} answers, {closes} closed connections)");
    }

    private sealed record Outcome(int Lines, int Answers, int Closed);

    private static async Task<Outcome> FuzzConnection(TestServer server, int seed, Stopwatch deadline)
    {
        var random = new Random(seed);
        var peer = server.Raw();
        int lines = 0, answers = 0, closed = 0;
        try
        {
            for (; lines < MaxLinesPerConnection && deadline.Elapsed < Budget; lines++)
            {
                byte[] line = Mutate(random);
                string sentinelId = $"\"s{seed}-{lines}\"";
                byte[] sentinel = Encoding.ASCII.GetBytes($$$"""{"jsonrpc":"2.0","id":{{{sentinelId}}},"method":"add","params":{"a":{{{lines}}},"b":1}}""" + "\n");
                byte[] both = [.. line, (byte)'\n', .. sentinel];
                string where = $"seed {seed}, line {lines}: {Show(line)}";

                if (line.Length > Limit)
                {
                    var send = peer.SendBytesAsync(both);
                    var error = await Receive(peer, where);
                    Response.AssertError(error, RpcErrorCode.MessageTooLarge, "null");
                    Assert.True((await peer.ExpectClosedAsync()).Count == 0, $"{where}: lines after -32003");
                    try
                    {
                        await send;
                    }
                    catch (IOException)
                    {
                    }
                    peer.Dispose();
                    peer = server.Raw();
                    closed++;
                    continue;
                }

                await peer.SendBytesAsync(both);
                var got = new List<JsonElement>();
                while (true)
                {
                    var response = await Receive(peer, where);
                    AssertWellFormed(response, where);
                    if (response.GetProperty("id").GetRawText() == sentinelId)
                    {
                        Assert.True(response.TryGetProperty("result", out var result), $"{where}: the sentinel failed: {response}");
                        Assert.Equal(lines + 1, result.GetProperty("sum").GetInt64());
                        break;
                    }
                    got.Add(response);
                    Assert.True(got.Count <= 1, $"{where}: {got.Count} answers to one line");
                }
                answers += got.Count;
                AssertDeserved(line, terminated: true, got, where);
            }
        }
        finally
        {
            peer.Dispose();
        }
        return new Outcome(lines, answers, closed);
    }

    private static async Task<JsonElement> Receive(RawPeer peer, string where)
    {
        string? text;
        try
        {
            text = await peer.ReadLineAsync(AnswerTimeout);
        }
        catch (TimeoutException)
        {
            throw new Xunit.Sdk.XunitException($"{where}: no answer within {AnswerTimeout} (the server hangs)");
        }
        Assert.True(text is not null, $"{where}: the server closed the connection");
        try
        {
            using var doc = JsonDocument.Parse(text);
            return doc.RootElement.Clone();
        }
        catch (JsonException e)
        {
            throw new Xunit.Sdk.XunitException($"{where}: the server sent a line that is not JSON ({e.Message}): {text}");
        }
    }

    private static void AssertWellFormed(JsonElement r, string where)
    {
        Assert.True(r.ValueKind == JsonValueKind.Object, $"{where}: {r}");
        Assert.True(r.TryGetProperty("jsonrpc", out var v) && v.GetString() == "2.0", $"{where}: {r}");
        Assert.True(r.TryGetProperty("id", out var id) && id.ValueKind is JsonValueKind.Number or JsonValueKind.String or JsonValueKind.Null, $"{where}: {r}");
        bool hasResult = r.TryGetProperty("result", out _), hasError = r.TryGetProperty("error", out var e);
        Assert.True(hasResult != hasError, $"{where}: {r}");
        if (hasError)
        {
            Assert.True(e.TryGetProperty("code", out var c) && c.TryGetInt32(out _), $"{where}: {r}");
            Assert.True(e.TryGetProperty("message", out var m) && m.ValueKind == JsonValueKind.String, $"{where}: {r}");
            string text = r.GetRawText();
            Assert.DoesNotContain("   at ", text, StringComparison.Ordinal);
            Assert.DoesNotContain(TestServer.SecretBugDetail, text, StringComparison.Ordinal);
        }
    }

    private static readonly byte[][] BadUtf8 =
    [
        [0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0x80], [0xe2, 0x82], [0xf4, 0x90, 0x80, 0x80],
    ];

    private static byte[] Mutate(Random r)
    {
        byte[] valid = Encoding.UTF8.GetBytes(Corpus[r.Next(Corpus.Length)]);
        switch (r.Next(12))
        {
            case 0:
                return valid;
            case 1:
            case 2:
            {
                var b = (byte[])valid.Clone();
                for (int i = r.Next(1, 5); i > 0; i--)
                    b[r.Next(b.Length)] = NotNewline((byte)r.Next(256));
                return b;
            }
            case 3:
                return valid[..r.Next(valid.Length)];
            case 4:
            {
                int depth = r.Next(2) == 0 ? r.Next(RpcDispatcher.MaxDepth - 3, RpcDispatcher.MaxDepth + 3) : r.Next(65, 5000);
                string open = r.Next(2) == 0 ? "[" : "{\"k\":";
                string close = open == "[" ? "]" : "}";
                string nested = string.Concat(Enumerable.Repeat(open, depth)) + "1" + string.Concat(Enumerable.Repeat(close, depth));
                return Encoding.ASCII.GetBytes(r.Next(2) == 0 ? nested
                    : $$$"""{"jsonrpc":"2.0","id":9,"method":"echo","params":{"text":"t","x":{{{nested}}}}}""");
            }
            case 5:
            {
                string huge = r.Next(3) switch
                {
                    0 => "1" + new string('7', r.Next(20, 6000)),
                    1 => "-1e" + r.Next(300, 99999999),
                    _ => "0." + new string('0', r.Next(10, 3000)) + "1e-99999",
                };
                return Encoding.ASCII.GetBytes(r.Next(2) == 0
                    ? $$$"""{"jsonrpc":"2.0","id":{{{huge}}},"method":"add","params":{"a":1,"b":2}}"""
                    : $$$"""{"jsonrpc":"2.0","id":10,"method":"add","params":{"a":{{{huge}}},"b":2}}""");
            }
            case 6:
            {
                var bad = BadUtf8[r.Next(BadUtf8.Length)];
                int at = r.Next(valid.Length);
                return [.. valid[..at], .. bad, .. valid[at..]];
            }
            case 7:
            {
                // A control character (not a newline) inside a string: inside the method name, the text, or the id.
                byte c = NotNewline((byte)r.Next(0x20));
                int quote = Array.IndexOf(valid, (byte)'"', r.Next(valid.Length));
                if (quote < 0)
                    quote = 1;
                return [.. valid[..(quote + 1)], c, .. valid[(quote + 1)..]];
            }
            case 8:
            {
                // Near the limit: from a few bytes under to a few over.
                string envelope = """{"jsonrpc":"2.0","id":11,"method":"echo","params":{"text":""}}""";
                int length = Limit + r.Next(-4, 3) - envelope.Length;
                return Encoding.ASCII.GetBytes(envelope.Replace("\"\"}", $"\"{new string('z', length)}\"}}", StringComparison.Ordinal));
            }
            case 9:
            {
                var b = new byte[r.Next(0, 200)];
                r.NextBytes(b);
                for (int i = 0; i < b.Length; i++)
                    b[i] = NotNewline(b[i]);
                return b;
            }
            case 10:
            {
                string[] tokens = ["{", "}", "[", "]", ",", ":", "\"jsonrpc\"", "\"2.0\"", "\"id\"", "\"method\"", "\"params\"", "\"add\"", "null", "true", "1", "-0", "\"\\ud800\"", "\"\\u0000\"", " ", "\r", "\t"];
                var s = new StringBuilder();
                for (int i = r.Next(1, 40); i > 0; i--)
                    s.Append(tokens[r.Next(tokens.Length)]);
                return Encoding.UTF8.GetBytes(s.ToString());
            }
            default:
            {
                // A structurally valid request with odd members.
                string[] ids = ["0", "-7", "\"\"", "null", "true", "{}", "[]", "\"\\u0000\"", "1e400", "\"\\ud83d\""];
                string[] methods = ["\"add\"", "\"\"", "\"\\u0000\"", "1", "null", "\"notes\"", "\"" + new string('m', 500) + "\"", "\"\\udc00x\""];
                string[] parameters = ["{}", "[]", "null", "{\"a\":1,\"b\":2}", "{\"a\":1,\"b\":2,\"a\":3}", "{\"text\":\"\\ud800\"}", "\"s\"", "{\"a\":true,\"b\":[]}"];
                string[] versions = ["\"2.0\"", "\"2.00\"", "2", "null", "\"2.0\\u0000\""];
                var members = new List<string>
                {
                    $"\"jsonrpc\":{versions[r.Next(versions.Length)]}",
                    $"\"method\":{methods[r.Next(methods.Length)]}",
                    $"\"params\":{parameters[r.Next(parameters.Length)]}",
                };
                if (r.Next(4) != 0)
                    members.Add($"\"id\":{ids[r.Next(ids.Length)]}");
                return Encoding.UTF8.GetBytes("{" + string.Join(',', members.OrderBy(_ => r.Next())) + "}");
            }
        }
    }

    private static byte NotNewline(byte b) => b == (byte)'\n' ? (byte)'N' : b;
}
