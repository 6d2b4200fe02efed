using System.Globalization;
using System.Text.RegularExpressions;

namespace Kvm.IntegrationTests;

/// <summary>What /proc/PID/smaps says of one mapping, and file hashes: the measures of memory shared copy-on-write and of files left unchanged.</summary>
public static partial class Smaps
{
    /// <summary>
    /// The kilobytes smaps gives, by field (Size, Rss, Pss, Private_Dirty...), for the mapping of
    /// process <paramref name="pid"/> (null: this one) that starts at <paramref name="start"/>, or
    /// that maps <paramref name="file"/> when given (the first such mapping).
    /// </summary>
    public static Dictionary<string, long> Of(int? pid, IntPtr start = 0, string? file = null)
    {
        string head = $"{(ulong)start:x}-";
        var fields = new Dictionary<string, long>(StringComparer.Ordinal);
        bool inside = false;
        foreach (var line in File.ReadLines(pid is { } p ? $"/proc/{p}/smaps" : "/proc/self/smaps"))
        {
            if (MappingLine().IsMatch(line))
            {
                if (inside)
                    break;
                inside = file is not null ? line.EndsWith(" " + file, StringComparison.Ordinal) : line.StartsWith(head, StringComparison.Ordinal);
                continue;
            }
            if (inside && line.EndsWith(" kB", StringComparison.Ordinal) && line.IndexOf(':') is > 0 and var colon)
                fields[line[..colon]] = long.Parse(line[(colon + 1)..^3].Trim(), CultureInfo.InvariantCulture);
        }
        Assert.True(fields.Count > 0, $"no mapping of {file ?? $"0x{(ulong)start:x}"} in smaps of {(pid is null ? "this process" : $"pid {pid}")}");
        return fields;
    }

    [GeneratedRegex(@"^[0-9a-f]+-[0-9a-f]+ [rwxsp-]{4} ")]
    private static partial Regex MappingLine();

    /// <summary>The SHA-256 of a file's bytes, in hex.</summary>
    public static string Sha256(string path) => Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(path)));
}
