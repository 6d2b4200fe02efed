using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Kvm.Hypervisor.State;

/// <summary>
/// One piece of a machine's state as a snapshot carries it: the stable id of its owner ("vm",
/// "vcpu0", "serial0", "virtio-blk0"), what kind of record it is, and the bytes its owner wrote
/// with <see cref="StateWriter"/>.
/// </summary>
public sealed record StateRecord(string Id, string Kind, byte[] Payload);

/// <summary>
/// A state record's bytes could not be read: the record ends early, a length or a value is out of
/// range. The message names the record, the field and its offset in the record.
/// </summary>
public sealed class StateFormatException(string message) : Exception(message);

/// <summary>
/// Writes one state record's fields: little-endian integers, length-prefixed strings and byte
/// arrays, and the kernel's blittable structs as their raw bytes behind their size (x86-64 only, so
/// the host's layout is the file's). Each owner writes its fields in one fixed order and reads them
/// back in the same order with <see cref="StateReader"/>.
/// </summary>
public sealed class StateWriter
{
    private readonly ArrayBufferWriter<byte> _buffer = new(256);

    public int Length => _buffer.WrittenCount;

    public ReadOnlySpan<byte> WrittenSpan => _buffer.WrittenSpan;

    public byte[] ToArray() => _buffer.WrittenSpan.ToArray();

    public StateWriter U8(byte value)
    {
        _buffer.GetSpan(1)[0] = value;
        _buffer.Advance(1);
        return this;
    }

    public StateWriter Bool(bool value) => U8(value ? (byte)1 : (byte)0);

    public StateWriter U16(ushort value)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(_buffer.GetSpan(2), value);
        _buffer.Advance(2);
        return this;
    }

    public StateWriter U32(uint value)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(_buffer.GetSpan(4), value);
        _buffer.Advance(4);
        return this;
    }

    public StateWriter I32(int value) => U32((uint)value);

    public StateWriter U64(ulong value)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(_buffer.GetSpan(8), value);
        _buffer.Advance(8);
        return this;
    }

    public StateWriter I64(long value) => U64((ulong)value);

    /// <summary>A byte array behind its length (u32).</summary>
    public StateWriter Bytes(ReadOnlySpan<byte> value)
    {
        U32((uint)value.Length);
        value.CopyTo(_buffer.GetSpan(value.Length));
        _buffer.Advance(value.Length);
        return this;
    }

    /// <summary>A UTF-8 string behind its length in bytes (u32).</summary>
    public StateWriter String(string value) => Bytes(Encoding.UTF8.GetBytes(value));

    /// <summary>A kernel struct as its raw bytes behind its size (u32), which the reader checks.</summary>
    public StateWriter Struct<T>(in T value) where T : unmanaged =>
        Bytes(MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in value)));

    /// <summary>An array of kernel structs: the count (u32), the element size (u32), then the elements.</summary>
    public StateWriter Structs<T>(ReadOnlySpan<T> values) where T : unmanaged
    {
        U32((uint)values.Length);
        U32((uint)Unsafe.SizeOf<T>());
        var bytes = MemoryMarshal.AsBytes(values);
        bytes.CopyTo(_buffer.GetSpan(bytes.Length));
        _buffer.Advance(bytes.Length);
        return this;
    }
}

/// <summary>
/// Reads a record written by <see cref="StateWriter"/>. Every read names its field; a record that
/// ends early, a length past its end, a struct of another size or a value out of range raises
/// <see cref="StateFormatException"/> naming the record, the field and the offset.
/// </summary>
public ref struct StateReader
{
    private readonly ReadOnlySpan<byte> _data;
    private readonly string _record;
    private int _position;

    public StateReader(ReadOnlySpan<byte> data, string record)
    {
        _data = data;
        _record = record;
        _position = 0;
    }

    public readonly int Position => _position;
    public readonly int Remaining => _data.Length - _position;

    private ReadOnlySpan<byte> Take(int length, string field)
    {
        if (length < 0 || length > _data.Length - _position)
            throw Error(field, length < 0
                ? $"length {length} is negative"
                : $"needs {length} bytes but the record has {_data.Length - _position} left");
        var span = _data.Slice(_position, length);
        _position += length;
        return span;
    }

    /// <summary>An error about <paramref name="field"/> at the current position.</summary>
    public readonly StateFormatException Error(string field, string problem) =>
        new($"state record '{_record}', field '{field}' at offset {_position}: {problem}");

    public byte U8(string field) => Take(1, field)[0];

    public bool Bool(string field)
    {
        byte b = U8(field);
        if (b > 1)
        {
            _position--;
            throw Error(field, $"value {b} is not a boolean (0 or 1)");
        }
        return b == 1;
    }

    public ushort U16(string field) => BinaryPrimitives.ReadUInt16LittleEndian(Take(2, field));
    public uint U32(string field) => BinaryPrimitives.ReadUInt32LittleEndian(Take(4, field));
    public int I32(string field) => (int)U32(field);
    public ulong U64(string field) => BinaryPrimitives.ReadUInt64LittleEndian(Take(8, field));
    public long I64(string field) => (long)U64(field);

    /// <summary>A u32 that must lie in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public uint U32(string field, uint min, uint max)
    {
        uint v = U32(field);
        if (v < min || v > max)
        {
            _position -= 4;
            throw Error(field, $"value {v} is outside {min} to {max}");
        }
        return v;
    }

    public byte[] Bytes(string field, int maxLength = int.MaxValue)
    {
        uint n = U32(field);
        if (n > (uint)maxLength)
        {
            _position -= 4;
            throw Error(field, $"length {n} is more than the {maxLength} bytes allowed");
        }
        return Take((int)Math.Min(n, int.MaxValue), field).ToArray();
    }

    /// <summary>Bytes of exactly <paramref name="length"/> (checked against the stored length).</summary>
    public byte[] Bytes(string field, int length, bool exact)
    {
        uint n = U32(field);
        if (exact && n != (uint)length)
        {
            _position -= 4;
            throw Error(field, $"length {n} is not the {length} bytes expected");
        }
        return Take((int)Math.Min(n, int.MaxValue), field).ToArray();
    }

    public string String(string field, int maxLength = 4096)
    {
        int at = _position;
        var bytes = Bytes(field, maxLength);
        try
        {
            return new UTF8Encoding(false, true).GetString(bytes);
        }
        catch (DecoderFallbackException)
        {
            _position = at;
            throw Error(field, "the string is not valid UTF-8");
        }
    }

    public T Struct<T>(string field) where T : unmanaged
    {
        uint n = U32(field);
        int size = Unsafe.SizeOf<T>();
        if (n != (uint)size)
        {
            _position -= 4;
            throw Error(field, $"size {n} is not the {size} bytes of {typeof(T).Name} on this host");
        }
        return MemoryMarshal.Read<T>(Take(size, field));
    }

    public T[] Structs<T>(string field, int maxCount) where T : unmanaged
    {
        uint count = U32(field);
        if (count > (uint)maxCount)
        {
            _position -= 4;
            throw Error(field, $"count {count} is more than the {maxCount} allowed");
        }
        uint size = U32(field);
        if (size != (uint)Unsafe.SizeOf<T>())
        {
            _position -= 4;
            throw Error(field, $"element size {size} is not the {Unsafe.SizeOf<T>()} bytes of {typeof(T).Name} on this host");
        }
        var bytes = Take((int)Math.Min((long)count * size, int.MaxValue), field);
        return MemoryMarshal.Cast<byte, T>(bytes).ToArray();
    }

    /// <summary>Refuses bytes left over after the last field (a record of another layout).</summary>
    public readonly void End()
    {
        if (Remaining != 0)
            throw Error("(end)", $"{Remaining} bytes are left after the last field");
    }
}
