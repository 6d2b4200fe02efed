using System.Globalization;

namespace Kvm.Network;

/// <summary>An Ethernet address, held in the low 48 bits (first byte of the address highest).</summary>
public readonly record struct MacAddress(ulong Value)
{
    public static readonly MacAddress Broadcast = new(0xffff_ffff_ffff);

    public static MacAddress FromBytes(ReadOnlySpan<byte> b) =>
        new(((ulong)b[0] << 40) | ((ulong)b[1] << 32) | ((ulong)b[2] << 24) | ((ulong)b[3] << 16) | ((ulong)b[4] << 8) | b[5]);

    public void CopyTo(Span<byte> b)
    {
        for (int i = 0; i < 6; i++)
            b[i] = (byte)(Value >> (40 - 8 * i));
    }

    public byte[] ToBytes()
    {
        var b = new byte[6];
        CopyTo(b);
        return b;
    }

    /// <summary>The group bit: multicast or broadcast.</summary>
    public bool IsMulticast => (Value >> 40 & 1) != 0;

    public bool IsBroadcast => Value == Broadcast.Value;

    /// <summary>A random, locally administered, unicast address.</summary>
    public static MacAddress Random()
    {
        Span<byte> b = stackalloc byte[6];
        System.Random.Shared.NextBytes(b);
        b[0] = (byte)((b[0] & 0xfe) | 0x02);
        return FromBytes(b);
    }

    /// <summary>Parses "52:54:00:12:34:56" (or with dashes); throws <see cref="FormatException"/> naming the text.</summary>
    public static MacAddress Parse(string text)
    {
        var parts = text.Split(text.Contains('-') ? '-' : ':');
        ulong v = 0;
        if (parts.Length != 6)
            throw new FormatException($"'{text}' is not a MAC address (six hex bytes: 52:54:00:12:34:56)");
        foreach (var p in parts)
        {
            if (p.Length is < 1 or > 2 || !byte.TryParse(p, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out byte x))
                throw new FormatException($"'{text}' is not a MAC address (six hex bytes: 52:54:00:12:34:56)");
            v = v << 8 | x;
        }
        return new MacAddress(v);
    }

    public override string ToString() => string.Join(':', ToBytes().Select(x => x.ToString("x2", CultureInfo.InvariantCulture)));
}
