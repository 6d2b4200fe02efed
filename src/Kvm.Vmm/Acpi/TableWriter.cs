using System.Buffers.Binary;
using System.Text;

namespace Kvm.Vmm.Acpi;

/// <summary>
/// A growable little-endian byte buffer for building ACPI tables and AML. Every multi-byte field of
/// ACPI is little-endian; <see cref="PatchU32"/> and friends fill fields whose value is known later
/// (a length, a pointer).
/// </summary>
internal sealed class TableWriter
{
    private byte[] _buffer = new byte[256];

    public int Length { get; private set; }

    public void U8(byte value) => Span(1)[0] = value;

    public void U16(ushort value) => BinaryPrimitives.WriteUInt16LittleEndian(Span(2), value);

    public void U32(uint value) => BinaryPrimitives.WriteUInt32LittleEndian(Span(4), value);

    public void U64(ulong value) => BinaryPrimitives.WriteUInt64LittleEndian(Span(8), value);

    public void Bytes(ReadOnlySpan<byte> bytes) => bytes.CopyTo(Span(bytes.Length));

    public void Zeros(int count) => Span(count).Clear();

    /// <summary>Writes <paramref name="text"/> as ASCII, exactly <paramref name="width"/> bytes: it must fit, and is padded with spaces.</summary>
    public void Ascii(string text, int width)
    {
        if (text.Length > width || !Ascii7(text))
            throw new ArgumentException($"'{text}' is not printable ASCII of at most {width} characters", nameof(text));
        Span<byte> field = Span(width);
        field.Fill((byte)' ');
        Encoding.ASCII.GetBytes(text, field);
    }

    /// <summary>Pads with zero bytes until <see cref="Length"/> is a multiple of <paramref name="alignment"/>.</summary>
    public void Align(int alignment)
    {
        int pad = (alignment - Length % alignment) % alignment;
        Zeros(pad);
    }

    public void PatchU8(int offset, byte value) => _buffer[offset] = value;

    public void PatchU32(int offset, uint value) => BinaryPrimitives.WriteUInt32LittleEndian(_buffer.AsSpan(offset, 4), value);

    public void PatchU64(int offset, ulong value) => BinaryPrimitives.WriteUInt64LittleEndian(_buffer.AsSpan(offset, 8), value);

    public Span<byte> Written(int offset, int length) => _buffer.AsSpan(offset, length);

    public byte[] ToArray() => _buffer.AsSpan(0, Length).ToArray();

    /// <summary>The byte that makes <paramref name="bytes"/> sum to zero modulo 256 when it replaces a zero byte among them.</summary>
    public static byte Checksum(ReadOnlySpan<byte> bytes)
    {
        byte sum = 0;
        foreach (byte b in bytes)
            sum += b;
        return (byte)(0 - sum);
    }

    private static bool Ascii7(string text)
    {
        foreach (char c in text)
            if (c < 0x20 || c > 0x7e)
                return false;
        return true;
    }

    private Span<byte> Span(int count)
    {
        if (Length + count > _buffer.Length)
            Array.Resize(ref _buffer, Math.Max(_buffer.Length * 2, Length + count));
        Span<byte> span = _buffer.AsSpan(Length, count);
        Length += count;
        return span;
    }
}
