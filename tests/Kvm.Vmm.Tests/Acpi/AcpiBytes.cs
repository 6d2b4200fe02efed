using System.Buffers.Binary;
using System.Text;

namespace Kvm.Vmm.Tests.Acpi;

/// <summary>Little-endian readers over table bytes, for tests.</summary>
internal static class AcpiBytes
{
    public static byte U8(this ReadOnlySpan<byte> s, int offset) => s[offset];

    public static ushort U16(this ReadOnlySpan<byte> s, int offset) => BinaryPrimitives.ReadUInt16LittleEndian(s[offset..]);

    public static uint U32(this ReadOnlySpan<byte> s, int offset) => BinaryPrimitives.ReadUInt32LittleEndian(s[offset..]);

    public static ulong U64(this ReadOnlySpan<byte> s, int offset) => BinaryPrimitives.ReadUInt64LittleEndian(s[offset..]);

    public static string Ascii(this ReadOnlySpan<byte> s, int offset, int length) => Encoding.ASCII.GetString(s.Slice(offset, length));

    public static int Sum(this ReadOnlySpan<byte> s)
    {
        int sum = 0;
        foreach (byte b in s)
            sum += b;
        return sum & 0xFF;
    }
}
