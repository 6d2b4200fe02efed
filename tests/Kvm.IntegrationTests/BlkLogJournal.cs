namespace Kvm.IntegrationTests;

/// <summary>The guest kit's blk-log journal (native/guest/README.md, blk-log), read back from a disk.</summary>
public static class BlkLogJournal
{
    /// <summary>
    /// Reads the guest kit's blk-log journal from a raw disk image and returns its runs in order (a run:
    /// the records one boot wrote). Fails the test if two runs interleave: a record whose tag
    /// differs from the one before must start a new run (a tag never seen before) that continued
    /// from the record before it (its prev_tag is that record's tag), and the records are numbered
    /// 1..head with no gap.
    /// </summary>
    public static List<(ulong Tag, int Records)> Runs(string disk)
    {
        const ulong HeadMagic = 0x44484f4c4b47, RecordMagic = 0x43524f4c4b47;
        var bytes = File.ReadAllBytes(disk);
        ulong Word(long sector, int i) => BitConverter.ToUInt64(bytes, (int)(sector * 512 + i * 8));
        Assert.Equal(HeadMagic, Word(0, 0));
        long last = (long)Word(0, 1);
        var runs = new List<(ulong Tag, int Records)>();
        ulong previous = 0;
        for (long seq = 1; seq <= last; seq++)
        {
            Assert.True(Word(seq, 0) == RecordMagic && Word(seq, 1) == (ulong)seq, $"record {seq} of {last} is missing or misnumbered");
            ulong tag = Word(seq, 2), prevTag = Word(seq, 3);
            if (runs.Count > 0 && tag == previous)
            {
                runs[^1] = (tag, runs[^1].Records + 1);
                continue;
            }
            Assert.True(runs.All(r => r.Tag != tag), $"record {seq}: run {tag} wrote again after run {previous}: two runs wrote at once");
            Assert.True(prevTag == previous, $"record {seq}: run {tag} continued from run {prevTag}, but the record before is run {previous}'s");
            runs.Add((tag, 1));
            previous = tag;
        }
        return runs;
    }
}
