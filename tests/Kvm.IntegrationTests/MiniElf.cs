using System.Buffers.Binary;

namespace Kvm.IntegrationTests;

/// <summary>Writes a minimal ELF64 with one PT_LOAD of <c>code</c> at 1 MiB and a PVH entry note pointing at it.</summary>
public static class MiniElf
{
    public const uint LoadAddress = 0x100000;

    public static byte[] Pvh(byte[] code)
    {
        const int ehdr = 64, phdr = 56, phnum = 2;
        int noteOffset = ehdr + phnum * phdr;
        const int noteSize = 12 + 4 + 4; // header, "Xen\0", 4-byte entry
        int codeOffset = noteOffset + noteSize;
        var f = new byte[codeOffset + code.Length];
        var s = f.AsSpan();
        s[0] = 0x7f; s[1] = (byte)'E'; s[2] = (byte)'L'; s[3] = (byte)'F';
        s[4] = 2; s[5] = 1; s[6] = 1;
        BinaryPrimitives.WriteUInt16LittleEndian(s[16..], 2);   // ET_EXEC
        BinaryPrimitives.WriteUInt16LittleEndian(s[18..], 62);  // EM_X86_64
        BinaryPrimitives.WriteUInt32LittleEndian(s[20..], 1);
        BinaryPrimitives.WriteUInt64LittleEndian(s[24..], LoadAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(s[32..], ehdr);
        BinaryPrimitives.WriteUInt16LittleEndian(s[52..], ehdr);
        BinaryPrimitives.WriteUInt16LittleEndian(s[54..], phdr);
        BinaryPrimitives.WriteUInt16LittleEndian(s[56..], phnum);

        var load = s[ehdr..];
        BinaryPrimitives.WriteUInt32LittleEndian(load, 1);      // PT_LOAD
        BinaryPrimitives.WriteUInt32LittleEndian(load[4..], 7);
        BinaryPrimitives.WriteUInt64LittleEndian(load[8..], (ulong)codeOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(load[16..], LoadAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(load[24..], LoadAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(load[32..], (ulong)code.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(load[40..], (ulong)code.Length);

        var note = s[(ehdr + phdr)..];
        BinaryPrimitives.WriteUInt32LittleEndian(note, 4);      // PT_NOTE
        BinaryPrimitives.WriteUInt64LittleEndian(note[8..], (ulong)noteOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(note[32..], noteSize);
        BinaryPrimitives.WriteUInt64LittleEndian(note[40..], noteSize);

        var n = s[noteOffset..];
        BinaryPrimitives.WriteUInt32LittleEndian(n, 4);
        BinaryPrimitives.WriteUInt32LittleEndian(n[4..], 4);
        BinaryPrimitives.WriteUInt32LittleEndian(n[8..], 18);   // XEN_ELFNOTE_PHYS32_ENTRY
        "Xen\0"u8.CopyTo(n[12..]);
        BinaryPrimitives.WriteUInt32LittleEndian(n[16..], LoadAddress);

        code.CopyTo(s[codeOffset..]);
        return f;
    }

    public static string WriteTemp(byte[] elf)
    {
        string path = Path.Combine(Path.GetTempPath(), $"kvm-test-{Guid.NewGuid():N}.elf");
        File.WriteAllBytes(path, elf);
        return path;
    }
}
