using System.Text;

namespace Kvm.Vmm.Acpi;

/// <summary>
/// An encoder for the small subset of AML (ACPI specification, chapter 20, "ACPI Machine Language
/// Specification") that a VMM's DSDT needs: scopes, devices, named objects, methods that return a
/// constant or notify, packages, buffers, strings and integers. Every function returns the encoded term; terms compose
/// by nesting.
/// </summary>
internal static class Aml
{
    // Opcodes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values").
    private const byte ZeroOp = 0x00, OneOp = 0x01, NameOp = 0x08, BytePrefix = 0x0A, WordPrefix = 0x0B,
        DWordPrefix = 0x0C, StringPrefix = 0x0D, QWordPrefix = 0x0E, ScopeOp = 0x10, BufferOp = 0x11,
        PackageOp = 0x12, MethodOp = 0x14, DualNamePrefix = 0x2E, MultiNamePrefix = 0x2F, RootChar = 0x5C,
        ParentPrefixChar = 0x5E, ExtOpPrefix = 0x5B, DeviceOp = 0x82, NotifyOp = 0x86, ReturnOp = 0xA4, OnesOp = 0xFF;

    /// <summary>DefScope: <c>Scope (path) { terms }</c>.</summary>
    public static byte[] Scope(string path, params byte[][] terms) =>
        [ScopeOp, .. WithPkgLength([.. NameString(path), .. Concat(terms)])];

    /// <summary>DefDevice: <c>Device (name) { terms }</c>.</summary>
    public static byte[] Device(string name, params byte[][] terms) =>
        [ExtOpPrefix, DeviceOp, .. WithPkgLength([.. NameString(name), .. Concat(terms)])];

    /// <summary>DefName: <c>Name (name, value)</c>.</summary>
    public static byte[] Name(string name, byte[] value) => [NameOp, .. NameString(name), .. value];

    /// <summary>DefMethod: <c>Method (name, args, NotSerialized) { terms }</c>.</summary>
    public static byte[] Method(string name, int argCount, params byte[][] terms)
    {
        if (argCount is < 0 or > 7)
            throw new ArgumentOutOfRangeException(nameof(argCount), argCount, "a method takes 0 to 7 arguments");
        // MethodFlags: bits 0-2 ArgCount, bit 3 SerializeFlag (0 = NotSerialized), bits 4-7 SyncLevel.
        return [MethodOp, .. WithPkgLength([.. NameString(name), (byte)argCount, .. Concat(terms)])];
    }

    /// <summary>DefNotify: <c>Notify (path, value)</c>, e.g. 0x80 for a device-specific event.</summary>
    public static byte[] Notify(string path, ulong value) => [NotifyOp, .. NameString(path), .. Integer(value)];

    /// <summary>DefReturn: <c>Return (value)</c>.</summary>
    public static byte[] Return(byte[] value) => [ReturnOp, .. value];

    /// <summary>The shortest ComputationalData encoding of an integer (ZeroOp, OneOp, OnesOp or a prefixed constant).</summary>
    public static byte[] Integer(ulong value) => value switch
    {
        0 => [ZeroOp],
        1 => [OneOp],
        ulong.MaxValue => [OnesOp],
        <= byte.MaxValue => [BytePrefix, (byte)value],
        <= ushort.MaxValue => [WordPrefix, (byte)value, (byte)(value >> 8)],
        <= uint.MaxValue => [DWordPrefix, .. BitConverter.GetBytes((uint)value)],
        _ => [QWordPrefix, .. BitConverter.GetBytes(value)],
    };

    /// <summary>A String constant: ASCII characters 0x01-0x7F and a terminating NUL.</summary>
    public static byte[] String(string text)
    {
        foreach (char c in text)
            if (c is < (char)1 or > (char)0x7F)
                throw new ArgumentException($"AML strings are ASCII without NUL: '{text}'", nameof(text));
        return [StringPrefix, .. Encoding.ASCII.GetBytes(text), 0];
    }

    /// <summary>
    /// The 32-bit compressed EISA id of a PNP id such as "PNP0A08" (what ASL's <c>EisaId()</c> produces):
    /// three letters of 5 bits each (letter - 0x40) in a big-endian 16-bit word, then four hex digits,
    /// stored as a DWord integer.
    /// </summary>
    public static uint EisaIdValue(string id)
    {
        if (id.Length != 7 || !id[..3].All(c => c is >= 'A' and <= 'Z') || !id[3..].All(Uri.IsHexDigit))
            throw new ArgumentException($"'{id}' is not an EISA id (three capital letters and four hex digits)", nameof(id));
        int letters = ((id[0] - 0x40) << 10) | ((id[1] - 0x40) << 5) | (id[2] - 0x40);
        int product = Convert.ToInt32(id[3..], 16);
        // Byte order in memory: letters high, letters low, product high, product low.
        return (uint)((letters >> 8) | ((letters & 0xFF) << 8) | ((product >> 8) << 16) | ((product & 0xFF) << 24));
    }

    public static byte[] EisaId(string id) => Integer(EisaIdValue(id));

    /// <summary>DefPackage with at most 255 elements.</summary>
    public static byte[] Package(params byte[][] elements)
    {
        if (elements.Length > byte.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(elements), elements.Length, "a Package holds at most 255 elements");
        return [PackageOp, .. WithPkgLength([(byte)elements.Length, .. Concat(elements)])];
    }

    /// <summary>DefBuffer holding exactly <paramref name="data"/>.</summary>
    public static byte[] Buffer(byte[] data) =>
        [BufferOp, .. WithPkgLength([.. Integer((ulong)data.Length), .. data])];

    /// <summary>
    /// A NameString: an optional root (<c>\</c>) or parent (<c>^</c>) prefix, then dot-separated name
    /// segments of up to four characters (padded with '_'), e.g. <c>\_SB.PCI0</c> or <c>_HID</c>.
    /// </summary>
    public static byte[] NameString(string path)
    {
        var bytes = new List<byte>();
        int i = 0;
        if (path.StartsWith('\\'))
        {
            bytes.Add(RootChar);
            i = 1;
        }
        else
        {
            while (i < path.Length && path[i] == '^')
            {
                bytes.Add(ParentPrefixChar);
                i++;
            }
        }
        string rest = path[i..];
        string[] segments = rest.Length == 0 ? [] : rest.Split('.');
        switch (segments.Length)
        {
            case 0:
                bytes.Add(0x00); // NullName
                break;
            case 1:
                break;
            case 2:
                bytes.Add(DualNamePrefix);
                break;
            default:
                if (segments.Length > byte.MaxValue)
                    throw new ArgumentException($"name path '{path}' has too many segments", nameof(path));
                bytes.Add(MultiNamePrefix);
                bytes.Add((byte)segments.Length);
                break;
        }
        foreach (string segment in segments)
            bytes.AddRange(NameSeg(segment, path));
        return [.. bytes];
    }

    /// <summary>
    /// Prefixes <paramref name="content"/> with its PkgLength: the encoded length counts the PkgLength
    /// bytes themselves. One byte holds up to 63; otherwise bits 7-6 of the lead byte give the number
    /// of following bytes (1-3), its bits 3-0 the low nibble, and each following byte 8 more bits.
    /// </summary>
    public static byte[] WithPkgLength(byte[] content)
    {
        int n = content.Length;
        byte[] prefix;
        if (n + 1 <= 0x3F)
        {
            prefix = [(byte)(n + 1)];
        }
        else
        {
            int extra = n + 2 <= 0xFFF ? 1 : n + 3 <= 0xFFFFF ? 2 : n + 4 <= 0xFFFFFFF ? 3
                : throw new ArgumentOutOfRangeException(nameof(content), n, "AML package too long");
            int total = n + 1 + extra;
            prefix = new byte[1 + extra];
            prefix[0] = (byte)((extra << 6) | (total & 0x0F));
            for (int k = 1; k <= extra; k++)
                prefix[k] = (byte)(total >> (4 + 8 * (k - 1)));
        }
        return [.. prefix, .. content];
    }

    public static byte[] Concat(IEnumerable<byte[]> parts) => parts.SelectMany(p => p).ToArray();

    private static byte[] NameSeg(string segment, string path)
    {
        if (segment.Length is 0 or > 4)
            throw new ArgumentException($"name segment '{segment}' of '{path}' must have 1 to 4 characters", nameof(path));
        for (int k = 0; k < segment.Length; k++)
        {
            char c = segment[k];
            bool ok = c is >= 'A' and <= 'Z' or '_' || (k > 0 && c is >= '0' and <= '9');
            if (!ok)
                throw new ArgumentException($"name segment '{segment}' of '{path}' has an invalid character '{c}'", nameof(path));
        }
        return Encoding.ASCII.GetBytes(segment.PadRight(4, '_'));
    }
}
