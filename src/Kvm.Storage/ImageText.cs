using System.Globalization;
using System.Text;

namespace Kvm.Storage;

/// <summary>
/// Makes text that came out of an image (a backing file name, a snapshot or bitmap name) safe to
/// print: an image must not be able to write escape sequences to the user's terminal.
/// </summary>
public static class ImageText
{
    /// <summary>
    /// The bytes as UTF-8 text, with every byte that is not part of a printable character (control
    /// characters, invalid UTF-8, format and separator characters) written as <c>\xNN</c>.
    /// </summary>
    public static string Escape(ReadOnlySpan<byte> bytes)
    {
        var sb = new StringBuilder(bytes.Length);
        while (!bytes.IsEmpty)
        {
            var status = Rune.DecodeFromUtf8(bytes, out var rune, out int used);
            if (status == System.Buffers.OperationStatus.Done && Printable(rune))
                sb.Append(rune.ToString());
            else
            {
                if (status != System.Buffers.OperationStatus.Done)
                    used = Math.Max(1, used);
                foreach (byte b in bytes[..used])
                    sb.Append(CultureInfo.InvariantCulture, $"\\x{b:x2}");
            }
            bytes = bytes[used..];
        }
        return sb.ToString();
    }

    /// <summary>The same for text already decoded (e.g. a path made from a name read from an image).</summary>
    public static string Escape(string? text)
    {
        if (text is null)
            return "";
        foreach (var r in text.EnumerateRunes())
        {
            if (!Printable(r))
                return Escape(Encoding.UTF8.GetBytes(text));
        }
        return text;
    }

    /// <summary>Escapes each line of a message, keeping its line breaks.</summary>
    public static string EscapeLines(string text) =>
        string.Join('\n', text.Split('\n').Select(Escape));

    private static bool Printable(Rune r) => Rune.GetUnicodeCategory(r) switch
    {
        UnicodeCategory.Control or UnicodeCategory.Format or UnicodeCategory.LineSeparator or UnicodeCategory.ParagraphSeparator
            or UnicodeCategory.Surrogate or UnicodeCategory.PrivateUse or UnicodeCategory.OtherNotAssigned => false,
        _ => r.Value != 0xfffd, // a replacement character stands for bytes that were not UTF-8
    };
}
