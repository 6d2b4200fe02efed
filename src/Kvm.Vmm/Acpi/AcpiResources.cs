using System.Buffers.Binary;

namespace Kvm.Vmm.Acpi;

/// <summary>
/// Resource data descriptors (ACPI 6.x, 6.4 "Resource Data Types for ACPI") as used in _CRS and _PRS
/// buffers, and <see cref="Template"/>, the equivalent of ASL's <c>ResourceTemplate()</c>.
/// </summary>
internal static class AcpiResources
{
    // General flags of address space descriptors (6.4.3.5.1, table "Address Space Descriptor General Flags"):
    // bit 0 0 = producer and consumer (a bridge's window), bit 1 0 = positive decode, bit 2 MIF, bit 3 MAF.
    private const byte ProducerMinMaxFixed = 0b1100;

    /// <summary>A Buffer holding the descriptors followed by an End Tag (checksum byte 0: "treated as correct").</summary>
    public static byte[] Template(params byte[][] descriptors) =>
        Aml.Buffer([.. Aml.Concat(descriptors), 0x79, 0x00]);

    /// <summary>Small I/O Port descriptor with 16-bit decode: <c>IO (Decode16, min, max, alignment, length)</c>.</summary>
    public static byte[] Io(ushort min, ushort max, byte alignment, byte length) =>
        [0x47, 0x01, (byte)min, (byte)(min >> 8), (byte)max, (byte)(max >> 8), alignment, length];

    /// <summary>Small IRQ descriptor without flags (edge-triggered, active high, exclusive): <c>IRQNoFlags () {irq}</c>.</summary>
    public static byte[] IrqNoFlags(int irq)
    {
        if (irq is < 0 or > 15)
            throw new ArgumentOutOfRangeException(nameof(irq), irq, "an IRQ descriptor names ISA IRQ 0-15");
        ushort mask = (ushort)(1 << irq);
        return [0x22, (byte)mask, (byte)(mask >> 8)];
    }

    /// <summary>
    /// Word Address Space descriptor for a bridge's bus number range:
    /// <c>WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, max - min + 1)</c>.
    /// </summary>
    public static byte[] WordBusNumber(ushort min, ushort max) => WordAddress(resourceType: 2, typeFlags: 0, min, max);

    /// <summary>
    /// Word Address Space descriptor for a bridge's I/O window:
    /// <c>WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, max - min + 1)</c>.
    /// </summary>
    public static byte[] WordIo(ushort min, ushort max) => WordAddress(resourceType: 1, typeFlags: 0b11, min, max);

    /// <summary>
    /// DWord Address Space descriptor for a bridge's memory window:
    /// <c>DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0, start, start + length - 1, 0, length)</c>.
    /// </summary>
    public static byte[] DWordMemory(uint start, uint length)
    {
        if (length == 0 || (ulong)start + length > 1UL << 32)
            throw new ArgumentOutOfRangeException(nameof(length), $"a DWord memory window must be non-empty and below 4 GiB (start 0x{start:X}, length 0x{length:X})");
        var d = new byte[3 + 23];
        d[0] = 0x87;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), 23);
        d[3] = 0; // resource type: memory range
        d[4] = ProducerMinMaxFixed;
        d[5] = 0x01; // type-specific: bit 0 read/write, bits 1-2 = 0 non-cacheable, bits 3-4 = 0 AddressRangeMemory
        var span = d.AsSpan(6);
        BinaryPrimitives.WriteUInt32LittleEndian(span[0..], 0);                      // granularity
        BinaryPrimitives.WriteUInt32LittleEndian(span[4..], start);                  // minimum
        BinaryPrimitives.WriteUInt32LittleEndian(span[8..], start + (length - 1));   // maximum
        BinaryPrimitives.WriteUInt32LittleEndian(span[12..], 0);                     // translation offset
        BinaryPrimitives.WriteUInt32LittleEndian(span[16..], length);                // length
        return d;
    }

    /// <summary>32-bit Fixed Memory Range descriptor: <c>Memory32Fixed (ReadWrite, base, length)</c>.</summary>
    public static byte[] Memory32Fixed(uint address, uint length)
    {
        var d = new byte[12];
        d[0] = 0x86;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), 9);
        d[3] = 0x01; // read/write
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(4), address);
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), length);
        return d;
    }

    /// <summary>
    /// Extended Interrupt descriptor for one GSI, as a consumer:
    /// <c>Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Shared|Exclusive) {gsi}</c>.
    /// </summary>
    public static byte[] ExtendedInterrupt(uint gsi, bool level, bool activeHigh, bool shared)
    {
        // Flags: bit 0 consumer, bit 1 edge (0 = level), bit 2 active low, bit 3 shared.
        byte flags = (byte)(0x01 | (level ? 0 : 0x02) | (activeHigh ? 0 : 0x04) | (shared ? 0x08 : 0));
        var d = new byte[3 + 6];
        d[0] = 0x89;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), 6);
        d[3] = flags;
        d[4] = 1; // interrupt table length
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(5), gsi);
        return d;
    }

    private static byte[] WordAddress(byte resourceType, byte typeFlags, ushort min, ushort max)
    {
        if (max < min)
            throw new ArgumentOutOfRangeException(nameof(max), $"range 0x{min:X}-0x{max:X} is empty");
        var d = new byte[3 + 13];
        d[0] = 0x88;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), 13);
        d[3] = resourceType;
        d[4] = ProducerMinMaxFixed;
        d[5] = typeFlags;
        var span = d.AsSpan(6);
        BinaryPrimitives.WriteUInt16LittleEndian(span[0..], 0);                         // granularity
        BinaryPrimitives.WriteUInt16LittleEndian(span[2..], min);
        BinaryPrimitives.WriteUInt16LittleEndian(span[4..], max);
        BinaryPrimitives.WriteUInt16LittleEndian(span[6..], 0);                         // translation offset
        BinaryPrimitives.WriteUInt16LittleEndian(span[8..], (ushort)(max - min + 1));   // length (0 would mean 0x10000; not used here)
        return d;
    }
}
