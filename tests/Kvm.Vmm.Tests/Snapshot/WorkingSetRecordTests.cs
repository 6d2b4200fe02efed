using Kvm.Vmm.Snapshot;
using static Kvm.Vmm.Tests.Snapshot.SnapshotTestData;

namespace Kvm.Vmm.Tests.Snapshot;

/// <summary>A working set added to a written snapshot: the state file is rewritten whole, the memory file is not touched.</summary>
public class WorkingSetRecordTests
{
    private static readonly GuestPageRange[] Traced = [new(0, 2), new(0x100, 16), new(HighRam / 4096 + 7, 1)];

    [Fact]
    public void TheWorkingSetIsReadBackAndEverythingElseStaysAsItWas()
    {
        using var dir = new TempDir();
        var state = State(workingSet: false);
        var written = SnapshotWriter.Write(dir.Path, state, Memory());
        Assert.Equal(state.Id, written.SnapshotId);
        byte[] memoryBefore = File.ReadAllBytes(written.MemoryPath);
        var memoryTime = File.GetLastWriteTimeUtc(written.MemoryPath);
        Assert.Null(SnapshotReader.Read(dir.Path).WorkingSet);

        long length = VmSnapshot.RecordWorkingSet(dir.Path, written.SnapshotId, Traced);

        Assert.Equal(new FileInfo(written.StatePath).Length, length);
        Assert.Equal(written.StateBytes + Traced.Length * 16, length);
        var back = SnapshotReader.Read(dir.Path);     // the CRC and every rule checked, the memory file's id matched
        Assert.Equal(Traced, back.WorkingSet);
        Assert.Equal(state.Id, back.Id);
        Assert.Equal(state.Created, back.Created);
        Assert.Equal(state.SpecJson, back.SpecJson);
        Assert.Equal(state.Regions, back.Regions);
        Assert.Equal(state.Records.Select(r => (r.Id, r.Kind, Convert.ToHexString(r.Payload))), back.Records.Select(r => (r.Id, r.Kind, Convert.ToHexString(r.Payload))));
        Assert.Equal(memoryBefore, File.ReadAllBytes(written.MemoryPath));
        Assert.Equal(memoryTime, File.GetLastWriteTimeUtc(written.MemoryPath));
        // No temporary file is left behind.
        Assert.Equal(["memory", "state"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName).Order());

        // Recorded again, it replaces the first.
        VmSnapshot.RecordWorkingSet(dir.Path, written.SnapshotId, [new(3, 1)]);
        Assert.Equal([new GuestPageRange(3, 1)], SnapshotReader.Read(dir.Path).WorkingSet);
    }

    [Fact]
    public void TheRewrittenFileIsStillCheckedByItsCrc()
    {
        using var dir = new TempDir();
        var written = SnapshotWriter.Write(dir.Path, State(workingSet: false), Memory());
        VmSnapshot.RecordWorkingSet(dir.Path, written.SnapshotId, Traced);
        byte[] bytes = File.ReadAllBytes(written.StatePath);
        // Flip one bit of the last working-set range's page count: only the CRC can tell.
        int lastCount = Walk(bytes).Fields.Last(f => f.Name == "page count").Offset;
        bytes[lastCount] ^= 0x02;
        File.WriteAllBytes(written.StatePath, bytes);
        var e = Assert.Throws<SnapshotFormatException>(() => SnapshotReader.Read(dir.Path));
        Assert.Contains("CRC", e.Message, StringComparison.Ordinal);
        // And a working set cannot be added to a state file that does not pass.
        Assert.Throws<SnapshotFormatException>(() => VmSnapshot.RecordWorkingSet(dir.Path, written.SnapshotId, Traced));
    }

    [Fact]
    public void AnotherSnapshotInTheDirectoryIsNotGivenTheWorkingSet()
    {
        using var dir = new TempDir();
        var first = SnapshotWriter.Write(dir.Path, State(workingSet: false), Memory());
        var second = SnapshotWriter.Write(dir.Path, State(workingSet: false), Memory());
        var e = Assert.Throws<SnapshotFormatException>(() => VmSnapshot.RecordWorkingSet(dir.Path, first.SnapshotId, Traced));
        Assert.Contains($"the snapshot there is {second.SnapshotId}, not {first.SnapshotId}", e.Message, StringComparison.Ordinal);
        Assert.Null(SnapshotReader.Read(dir.Path).WorkingSet);
    }

    [Fact]
    public void AWorkingSetOutsideGuestRamIsRefusedAndTheOldFileKept()
    {
        using var dir = new TempDir();
        var written = SnapshotWriter.Write(dir.Path, State(workingSet: false), Memory());
        byte[] before = File.ReadAllBytes(written.StatePath);
        Assert.Throws<ArgumentException>(() => VmSnapshot.RecordWorkingSet(dir.Path, written.SnapshotId, [new((8UL << 20) / 4096, 1)]));
        Assert.Equal(before, File.ReadAllBytes(written.StatePath));
        Assert.Equal(["memory", "state"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName).Order());
    }
}
