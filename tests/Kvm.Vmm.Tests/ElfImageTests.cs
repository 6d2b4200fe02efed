using Kvm.Tests.Shared;
using Kvm.Vmm.Boot;

namespace Kvm.Vmm.Tests;

public class ElfImageTests
{
    private const string Name = "kernel-under-test.elf";

    private static BootException Fails(byte[] file)
    {
        var e = Assert.Throws<BootException>(() => ElfImage.Parse(file, Name));
        Assert.Contains(Name, e.Message);
        return e;
    }

    [Theory]
    [InlineData(true, false)]
    [InlineData(true, true)]
    [InlineData(false, false)]
    [InlineData(false, true)]
    public void ValidElfWithPvhNoteIsParsed(bool is64, bool eightByteDesc)
    {
        var b = ElfBuilder.WithPvh(is64, entry: 0x1000c0, eightByteDesc: eightByteDesc);
        var file = b.Build();

        var image = ElfImage.Parse(file, Name);

        Assert.Equal(is64, image.Is64);
        Assert.Equal(0x1000c0u, image.PvhEntry);
        Assert.Equal(0x100000UL, image.ElfEntry);
        Assert.Equal(Name, image.Name);
        Assert.Equal(2, image.Segments.Count);

        var s0 = image.Segments[0];
        Assert.Equal(0x100000UL, s0.PhysicalAddress);
        Assert.Equal(0x300UL, s0.FileSize);
        Assert.Equal(0x1000UL, s0.MemorySize);
        Assert.Equal((ulong)b.DataOffsets[0], s0.FileOffset);
        Assert.Equal(ElfBuilder.Pattern(0x300, 1), file.AsSpan((int)s0.FileOffset, (int)s0.FileSize).ToArray());

        var s1 = image.Segments[1];
        Assert.Equal(0x200000UL, s1.PhysicalAddress);
        Assert.Equal(0x80UL, s1.FileSize);
        Assert.Equal(0x2000UL, s1.MemorySize);
        Assert.Equal(ElfBuilder.Pattern(0x80, 2), file.AsSpan((int)s1.FileOffset, (int)s1.FileSize).ToArray());

        Assert.Equal((0x100000UL, 0x202000UL), image.Extent);
    }

    [Fact]
    public void PvhNoteIsFoundAmongOtherNotes()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3, 4]);
        b.NoteSegment(
            ElfBuilder.Note("GNU", 3, [0xaa, 0xbb, 0xcc, 0xdd, 0xee]), // desc padded to 8
            ElfBuilder.Note("Xen", 17, ElfBuilder.U32(0xdead)),         // another Xen note type
            ElfBuilder.Note("Linux", 18, ElfBuilder.U32(0xbad)),         // type 18 but not from Xen
            ElfBuilder.PvhNote(0x123456));

        Assert.Equal(0x123456u, ElfImage.Parse(b.Build(), Name).PvhEntry);
    }

    [Fact]
    public void FirstOfSeveralNoteSegmentsWithoutPvhIsSkipped()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3, 4]);
        b.NoteSegment(ElfBuilder.Note("GNU", 1, [0, 0, 0, 0]));
        b.NoteSegment(ElfBuilder.PvhNote(0x100010));

        Assert.Equal(0x100010u, ElfImage.Parse(b.Build(), Name).PvhEntry);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void PvhNoteIsFoundInANoteSectionWhenNoPtNoteHasIt(bool is64)
    {
        var b = new ElfBuilder { Is64 = is64, Machine = is64 ? (ushort)62 : (ushort)3 };
        b.Load(0x100000, ElfBuilder.Pattern(64, 3));
        b.NoteSegment(ElfBuilder.Note("GNU", 3, [1, 2, 3, 4]));
        b.NoteSections.Add(ElfBuilder.Note("GNU", 1, [0, 0, 0, 0]));
        b.NoteSections.Add(ElfBuilder.PvhNote(0x100abc));

        var image = ElfImage.Parse(b.Build(), Name);
        Assert.Equal(0x100abcu, image.PvhEntry);
        Assert.Single(image.Segments);
    }

    [Fact]
    public void PvhNoteIsFoundInANoteSectionWithNoPtNoteAtAll()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, ElfBuilder.Pattern(64, 3));
        b.NoteSections.Add(ElfBuilder.PvhNote(0x100def));

        Assert.Equal(0x100defu, ElfImage.Parse(b.Build(), Name).PvhEntry);
    }

    [Fact]
    public void ZeroSizedLoadSegmentsAreNotReported()
    {
        var b = ElfBuilder.WithPvh();
        b.Load(0x300000, [], 0);
        var image = ElfImage.Parse(b.Build(), Name);
        Assert.Equal(2, image.Segments.Count);
        Assert.DoesNotContain(image.Segments, s => s.PhysicalAddress == 0x300000);
    }

    [Fact]
    public void EmptyFileIsRefused()
    {
        var e = Fails([]);
        Assert.Contains("empty", e.Message);
    }

    [Fact]
    public void NonElfFileIsRefusedShowingItsFirstBytes()
    {
        var e = Fails([0x4d, 0x5a, 0x90, 0x00, 0x03, 0x00, 0x00, 0x00, 0x04, 0x00]);
        Assert.Contains("not an ELF", e.Message);
        Assert.Contains("4d5a9000", e.Message);
    }

    [Fact]
    public void ShortNonElfFileIsRefusedShowingItsBytes()
    {
        var e = Fails([0x23, 0x21]);
        Assert.Contains("2321", e.Message);
    }

    [Theory]
    [InlineData(true, 4)]
    [InlineData(true, 20)]
    [InlineData(true, 51)]
    [InlineData(true, 60)]   // longer than an ELF32 header, shorter than an ELF64 one
    [InlineData(false, 51)]
    public void TruncatedHeaderIsRefused(bool is64, int length)
    {
        var file = ElfBuilder.WithPvh(is64).Build()[..length];
        var e = Fails(file);
        Assert.Contains("truncated", e.Message);
        Assert.Contains(length.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(3)]
    [InlineData(0xff)]
    public void BadClassIsRefused(byte cls)
    {
        var file = ElfBuilder.WithPvh().Build();
        file[4] = cls;
        var e = Fails(file);
        Assert.Contains($"class {cls}", e.Message);
    }

    [Fact]
    public void BigEndianIsRefused()
    {
        var file = ElfBuilder.WithPvh().Build();
        file[5] = 2;
        var e = Fails(file);
        Assert.Contains("little-endian", e.Message);
    }

    [Theory]
    [InlineData(40)]  // ARM
    [InlineData(183)] // AArch64
    [InlineData(0)]
    public void WrongMachineIsRefused(ushort machine)
    {
        var b = new ElfBuilder { Machine = machine };
        b.Load(0x100000, [1]).NoteSegment(ElfBuilder.PvhNote(0x100000));
        var e = Fails(b.Build());
        Assert.Contains($"machine {machine}", e.Message);
    }

    [Theory]
    [InlineData(0)] // ET_NONE
    [InlineData(1)] // ET_REL
    [InlineData(4)] // ET_CORE
    public void NonExecutableTypeIsRefused(ushort type)
    {
        var b = new ElfBuilder { Type = type };
        b.Load(0x100000, [1]).NoteSegment(ElfBuilder.PvhNote(0x100000));
        var e = Fails(b.Build());
        Assert.Contains($"type {type}", e.Message);
        Assert.Contains("not an executable", e.Message);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void NoProgramHeadersIsRefused(bool is64)
    {
        var b = ElfBuilder.WithPvh(is64);
        var file = b.Build();
        ElfBuilder.W16(file, b.PhNumField, 0);
        var e = Fails(file);
        Assert.Contains("e_phnum", e.Message);
    }

    [Theory]
    [InlineData(true, 32)]
    [InlineData(true, 64)]
    [InlineData(false, 56)]
    [InlineData(false, 0)]
    public void WrongProgramHeaderEntrySizeIsRefused(bool is64, ushort size)
    {
        var b = ElfBuilder.WithPvh(is64);
        var file = b.Build();
        ElfBuilder.W16(file, b.PhEntSizeField, size);
        var e = Fails(file);
        Assert.Contains($"e_phentsize is {size}", e.Message);
    }

    [Theory]
    [InlineData(true, 0)]
    [InlineData(true, 1)]
    [InlineData(true, 2)]
    [InlineData(false, 0)]
    public void ProgramHeaderTablePastEndOfFileIsRefused(bool is64, int variant)
    {
        var b = ElfBuilder.WithPvh(is64);
        var file = b.Build();
        switch (variant)
        {
            case 0: // the table starts near the end
                b.WriteWord(file, b.PhOffField, (ulong)(file.Length - 10));
                break;
            case 1: // offset beyond any file, no overflow allowed to hide it
                ElfBuilder.W64(file, b.PhOffField, 0xffff_ffff_ffff_fff0);
                break;
            case 2: // too many entries
                ElfBuilder.W16(file, b.PhNumField, 0xffff);
                break;
        }
        var e = Fails(file);
        Assert.Contains("program header table", e.Message);
        Assert.Contains("past the end", e.Message);
    }

    [Theory]
    [InlineData(true, false)]
    [InlineData(true, true)]
    [InlineData(false, false)]
    [InlineData(false, true)]
    public void SegmentFileRangePastEndOfFileIsRefused(bool is64, bool hugeOffset)
    {
        var b = ElfBuilder.WithPvh(is64);
        var file = b.Build();
        if (hugeOffset)
            b.WriteWord(file, b.Ph(1) + b.POffset, is64 ? ulong.MaxValue : uint.MaxValue);
        else
            b.WriteWord(file, b.Ph(1) + b.PFilesz, (ulong)file.Length); // offset + filesz > length
        b.WriteWord(file, b.Ph(1) + b.PMemsz, is64 ? ulong.MaxValue / 2 : uint.MaxValue);
        var e = Fails(file);
        Assert.Contains("segment 1", e.Message);
        Assert.Contains("past the end", e.Message);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void FileSizeLargerThanMemorySizeIsRefused(bool is64)
    {
        var b = ElfBuilder.WithPvh(is64);
        var file = b.Build();
        b.WriteWord(file, b.Ph(0) + b.PMemsz, 0x100);
        var e = Fails(file);
        Assert.Contains("segment 0", e.Message);
        Assert.Contains("p_filesz 0x300", e.Message);
        Assert.Contains("p_memsz 0x100", e.Message);
    }

    [Fact]
    public void SegmentWrappingAroundTheAddressSpaceIsRefused()
    {
        var b = ElfBuilder.WithPvh();
        var file = b.Build();
        b.WriteWord(file, b.Ph(1) + b.PPaddr, 0xffff_ffff_ffff_f000);
        b.WriteWord(file, b.Ph(1) + b.PMemsz, 0x2000);
        var e = Fails(file);
        Assert.Contains("segment 1", e.Message);
        Assert.Contains("wraps around", e.Message);
    }

    [Fact]
    public void NoLoadSegmentIsRefused()
    {
        var b = new ElfBuilder();
        b.NoteSegment(ElfBuilder.PvhNote(0x100000));
        var e = Fails(b.Build());
        Assert.Contains("PT_LOAD", e.Message);
    }

    [Fact]
    public void OnlyEmptyLoadSegmentsIsRefused()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [], 0).NoteSegment(ElfBuilder.PvhNote(0x100000));
        var e = Fails(b.Build());
        Assert.Contains("PT_LOAD", e.Message);
    }

    [Fact]
    public void NoPvhNoteIsRefused()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        b.NoteSegment(ElfBuilder.Note("GNU", 3, [1, 2, 3, 4]), ElfBuilder.Note("Xen", 17, ElfBuilder.U32(1)));
        var e = Fails(b.Build());
        Assert.Contains("PVH", e.Message);
    }

    [Fact]
    public void ElfWithoutAnyNotesIsRefusedForMissingPvhNote()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        var e = Fails(b.Build());
        Assert.Contains("PVH", e.Message);
    }

    [Theory]
    [InlineData(4, 0x1000)]      // descsz too large
    [InlineData(0x1000, 4)]      // namesz too large
    [InlineData(0xffff_fffd, 4)] // namesz that wraps a 32-bit sum when aligned
    [InlineData(4, 0xffff_ffff)]
    public void NoteRunningPastItsAreaIsRefused(uint namesz, uint descsz)
    {
        var note = ElfBuilder.PvhNote(0x100000);
        ElfBuilder.W32(note, 0, namesz);
        ElfBuilder.W32(note, 4, descsz);
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        b.NoteSegment(note);
        var e = Fails(b.Build());
        Assert.Contains("runs past the end", e.Message);
        Assert.Contains($"namesz {namesz}", e.Message);
    }

    [Fact]
    public void NoteInASectionRunningPastItsAreaIsRefused()
    {
        var note = ElfBuilder.PvhNote(0x100000);
        ElfBuilder.W32(note, 4, 0x7fff_0000);
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        b.NoteSections.Add(note);
        var e = Fails(b.Build());
        Assert.Contains("note section", e.Message);
        Assert.Contains("runs past the end", e.Message);
    }

    [Theory]
    [InlineData(2)]
    [InlineData(1)]
    [InlineData(0)]
    [InlineData(12)]
    public void PvhNoteWithWrongDescSizeIsRefused(int size)
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        b.NoteSegment(ElfBuilder.Note("Xen", 18, new byte[size]));
        var e = Fails(b.Build());
        Assert.Contains($"{size}-byte", e.Message);
    }

    [Theory]
    [InlineData(0x1_0000_0000UL)]
    [InlineData(ulong.MaxValue)]
    public void PvhEntryAbove4GiBIsRefused(ulong entry)
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        b.NoteSegment(ElfBuilder.PvhNote64(entry));
        var e = Fails(b.Build());
        Assert.Contains("above 4 GiB", e.Message);
    }

    [Fact]
    public void PvhEntryJustBelow4GiBIsAccepted()
    {
        var b = new ElfBuilder();
        b.Load(0x100000, [1, 2, 3]);
        b.NoteSegment(ElfBuilder.PvhNote64(0xffff_ffff));
        Assert.Equal(0xffff_ffffu, ElfImage.Parse(b.Build(), Name).PvhEntry);
    }

    [Fact]
    public void ProgramHeadersBeyondTheParserLimitAreNotSilentlyIgnored()
    {
        var b = new ElfBuilder();
        b.NoteSegment(ElfBuilder.PvhNote(0x100000));
        for (int i = 0; i < 4200; i++)
            b.Load(0x100000 + (ulong)i * 0x1000, [1], 0x1000);
        var file = b.Build();

        // Either every segment is loaded or the file is refused; never a partial kernel.
        try
        {
            Assert.Equal(4200, ElfImage.Parse(file, Name).Segments.Count);
        }
        catch (BootException e)
        {
            Assert.Contains(Name, e.Message);
        }
    }

    [Fact]
    public void ReadOfAMissingFileNamesIt()
    {
        string path = Path.Combine(Path.GetTempPath(), $"no-such-kernel-{Guid.NewGuid():N}.elf");
        var e = Assert.Throws<BootException>(() => ElfImage.Read(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("no such file", e.Message);
    }

    [Fact]
    public void ReadParsesAFileFromDisk()
    {
        string path = Path.Combine(Path.GetTempPath(), $"kernel-{Guid.NewGuid():N}.elf");
        try
        {
            File.WriteAllBytes(path, ElfBuilder.WithPvh(entry: 0x100100).Build());
            var image = ElfImage.Read(path);
            Assert.Equal(0x100100u, image.PvhEntry);
            Assert.Equal(path, image.Name);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [SkippableFact]
    public void GuestKitParses()
    {
        string? why = TestEnvironment.GuestKitUnavailable();
        Skip.If(why is not null, why);
        var image = ElfImage.Read(TestEnvironment.GuestKit);
        Assert.True(image.Is64);
        Assert.NotEmpty(image.Segments);
        // The entry point lies inside a loaded segment, above the VMM's boot data.
        Assert.Contains(image.Segments, s => image.PvhEntry >= s.PhysicalAddress && image.PvhEntry < s.PhysicalAddress + s.MemorySize);
        Assert.All(image.Segments, s => Assert.True(s.PhysicalAddress >= X86Layout.BootDataEnd));
    }
}
