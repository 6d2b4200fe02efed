using System.Text;
using System.Text.Json;
using Kvm.Rpc;
using Xunit;

namespace Kvm.Tests.Shared;

/// <summary>
/// What a JSON-RPC server of this project owes a line, judged from the line alone (not from the
/// server's code), for the fuzz tests of the RPC layer and of kvmd: the framing (a line ended by a
/// newline loses a trailing CR; a blank line gets no answer), JSON with the dispatcher's depth
/// limit, and the request's id. Included only by the test projects that reference Kvm.Rpc.
/// </summary>
public static class JsonRpcOracle
{
    /// <summary>
    /// Asserts that <paramref name="got"/> is what <paramref name="raw"/> deserves: nothing for a
    /// blank line; a parse error for text that is not JSON; an invalid request (id null) for JSON
    /// that is not an object or whose id is not UTF-8; one answer carrying the request's id for a
    /// request with an id. <paramref name="terminated"/>: the line ended with a newline (rather than
    /// with the end of the stream).
    /// </summary>
    public static void AssertDeserved(byte[] raw, bool terminated, IReadOnlyList<JsonElement> got, string at)
    {
        ReadOnlySpan<byte> line = raw;
        if (terminated && line.Length > 0 && line[^1] == (byte)'\r')
            line = line[..^1];
        if (line.IndexOfAnyExcept(" \t"u8) < 0)
        {
            Assert.True(got.Count == 0, $"{at}: a blank line was answered: {string.Join(" | ", got)}");
            return;
        }
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(line.ToArray(), new JsonDocumentOptions { MaxDepth = RpcDispatcher.MaxDepth });
        }
        catch (JsonException)
        {
            Assert.True(got.Count == 1, $"{at}: text that is not JSON was not answered");
            AssertError(got[0], RpcErrorCode.ParseError, "null", at);
            return;
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                Assert.True(got.Count == 1, $"{at}: JSON that is not an object was not answered");
                AssertError(got[0], RpcErrorCode.InvalidRequest, "null", at);
            }
            else if (root.TryGetProperty("id", out var id) && id.ValueKind is JsonValueKind.Number or JsonValueKind.String or JsonValueKind.Null)
            {
                string rawId;
                try
                {
                    rawId = id.GetRawText();
                }
                catch (InvalidOperationException)
                {
                    // An id that is not valid UTF-8 cannot be echoed: an invalid request, id null.
                    Assert.True(got.Count == 1, $"{at}: a request whose id is not UTF-8 was not answered");
                    AssertError(got[0], RpcErrorCode.InvalidRequest, "null", at);
                    return;
                }
                Assert.True(got.Count == 1, $"{at}: a request with id {rawId} was not answered");
                Assert.True(rawId == got[0].GetProperty("id").GetRawText(), $"{at}: the answer to id {rawId}: {Clip(got[0])}");
            }
        }
    }

    /// <summary>Asserts a JSON-RPC 2.0 error answer with <paramref name="code"/>, the id <paramref name="rawId"/> (raw JSON) and no result.</summary>
    public static void AssertError(JsonElement r, int code, string rawId, string at)
    {
        bool ok = r.ValueKind == JsonValueKind.Object
            && r.TryGetProperty("jsonrpc", out var v) && v.ValueKind == JsonValueKind.String && v.GetString() == "2.0"
            && !r.TryGetProperty("result", out _)
            && r.TryGetProperty("error", out var e) && e.TryGetProperty("code", out var c) && c.TryGetInt32(out int got) && got == code
            && r.TryGetProperty("id", out var id) && id.GetRawText() == rawId;
        Assert.True(ok, $"{at}: expected error {code} with id {rawId}, got {Clip(r)}");
    }

    /// <summary>An answer's text, cut at 600 characters.</summary>
    public static string Clip(JsonElement e)
    {
        string s = e.GetRawText();
        return s.Length > 600 ? s[..600] + $"... ({s.Length} characters)" : s;
    }

    /// <summary>A line as printable ASCII (other bytes as \xNN), cut at 300 bytes.</summary>
    public static string Show(byte[] line)
    {
        var b = new StringBuilder();
        foreach (byte x in line.Length > 300 ? line[..300] : line)
            b.Append(x is >= 0x20 and < 0x7f ? ((char)x).ToString() : $"\\x{x:x2}");
        return line.Length > 300 ? $"{b}... ({line.Length} bytes)" : b.ToString();
    }
}
