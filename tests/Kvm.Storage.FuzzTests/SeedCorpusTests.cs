using Kvm.Storage.Qcow2;
using Xunit.Abstractions;

namespace Kvm.Storage.FuzzTests;

/// <summary>The seeds are what the fuzzer assumes: valid, clean, and holding the features they are meant to.</summary>
public sealed class SeedCorpusTests(ITestOutputHelper output)
{
    [Fact]
    public void EngineSeeds_AreValidAndCoverTheirFeatures()
    {
        var seeds = Corpus.Engine;
        foreach (var seed in seeds)
            AssertSeedValid(seed);
        var layouts = seeds.ToDictionary(s => s.Name, s => Qcow2Layout.Parse(s.Bytes()));
        Assert.Contains(layouts.Values, l => l.ClusterSize == 512);
        Assert.Contains(layouts.Values, l => l.ClusterSize == 4096);
        Assert.Contains(layouts.Values, l => l.ClusterSize == 65536);
        foreach (var order in new[] { 0, 4, 6 })
            Assert.Contains(layouts.Values, l => l.RefcountOrder == order);
        Assert.Contains(layouts.Values, l => l.BackingNameOffset != 0);
        Assert.All(layouts, kv => Assert.True(kv.Value.DataEntryPositions.Count > 0, $"{kv.Key} maps no data"));
        Assert.All(layouts, kv => Assert.True(kv.Value.ZeroEntryPositions.Count > 0, $"{kv.Key} has no zero cluster"));
        Assert.Contains(layouts.Values, l => l.L2Tables.Count > 4);
        Assert.Contains(layouts.Values, l => l.L1Size * 8 > 512); // an L1 table over more than one cluster
    }

    [SkippableFact]
    public void QemuSeeds_AreValidAndCoverTheirFeatures()
    {
        var seeds = Corpus.Qemu;
        foreach (var seed in seeds)
        {
            AssertSeedValid(seed);
            // The engine reads what qemu wrote.
            var raw = Path.Combine(Corpus.Dir("seed-compare"), seed.Name + ".raw");
            Qemu.Run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", seed.Main, raw]);
            var expected = File.ReadAllBytes(raw);
            using var img = DiskImage.Open(seed.Main, FuzzHarness.ReadOnlyOptions);
            var got = new byte[img.Size];
            img.Read(0, got);
            Assert.True(expected.AsSpan().SequenceEqual(got), $"{seed.Name}: the engine reads different content than qemu-img convert");
        }
        var layouts = seeds.ToDictionary(s => s.Name, s => Qcow2Layout.Parse(s.Bytes()));
        Assert.True(layouts["q-compressed"].CompressedEntryPositions.Count > 10, "no compressed clusters");
        Assert.True(layouts["q-compressed-64k"].CompressedEntryPositions.Count > 0, "no compressed clusters");
        Assert.Equal(2, layouts["q-snapshots"].Snapshots.Count);
        Assert.Equal(2u, layouts["q64k-v2"].Version);
        Assert.Equal(0, layouts["q4k-r1"].RefcountOrder);
        Assert.Equal(21, layouts["q2m"].ClusterBits);
        Assert.True(layouts["q64k"].ZeroEntryPositions.Count > 0, "no zero clusters");
        Assert.NotEqual(0UL, layouts["q-backing"].BackingNameOffset);
    }

    private void AssertSeedValid(Seed seed)
    {
        using (var img = DiskImage.Open(seed.Main, FuzzHarness.ReadOnlyOptions))
        {
            var q = Assert.IsType<Qcow2Image>(img);
            var check = q.Check();
            Assert.True(check.IsClean, $"{seed.Name}: engine check: {string.Join(" | ", check.Problems)}");
            var result = FuzzHarness.RunReadOnly(seed.Main, [new WatchedFile(seed.Main, fullHash: true)], new Random(1));
            Assert.True(result.Failure is null, $"{seed.Name}: {result.Failure}");
            Assert.Equal("accepted, check clean", result.Outcome);
            output.WriteLine($"{seed.Name}: {new FileInfo(seed.Main).Length} bytes, cluster {q.ClusterSize}, refcount bits {q.RefcountBits}, " +
                             $"version {q.Version}, size {q.Size}, backing {q.BackingFile ?? "-"}, {result.Elapsed.TotalMilliseconds:F1} ms");
        }
        if (Kvm.Tests.Shared.TestEnvironment.FindOnPath("qemu-img") is not null)
        {
            var r = Qemu.Check(seed.Main);
            Assert.True(r.ExitCode == 0, $"{seed.Name}: qemu-img check exit {r.ExitCode}: {r.Stdout}{r.Stderr}");
        }
    }
}

/// <summary>The mutator is deterministic and every mutation kind has a seed to work on.</summary>
public sealed class MutatorTests
{
    [Fact]
    public void SameSeedAndCase_SameBytes()
    {
        foreach (var seed in Corpus.Engine)
        {
            var m = new Qcow2Mutator(seed.Bytes());
            for (int i = 0; i < 50; i++)
            {
                var a = m.Mutate(FuzzHarness.CaseRandom("det", seed.Name, i));
                var b = m.Mutate(FuzzHarness.CaseRandom("det", seed.Name, i));
                Assert.Equal(a.Description, b.Description);
                Assert.True(a.Bytes.AsSpan().SequenceEqual(b.Bytes), $"{seed.Name}:{i} differs between runs");
            }
        }
    }

    [Fact]
    public void EveryKind_AppliesToSomeEngineSeed_ExceptQemuOnlyOnes()
    {
        var mutators = Corpus.Engine.Select(s => new Qcow2Mutator(s.Bytes())).ToList();
        var qemuOnly = new[] { Qcow2MutationKind.CompressedEntry, Qcow2MutationKind.SnapshotField, Qcow2MutationKind.SnapshotByteFlip };
        foreach (var kind in Enum.GetValues<Qcow2MutationKind>().Except(qemuOnly))
        {
            var m = mutators.FirstOrDefault(x => x.Applicable(kind));
            Assert.True(m is not null, $"no engine seed offers {kind}");
            var r = m!.Mutate(kind, new Random(3));
            Assert.False(string.IsNullOrEmpty(r.Description));
        }
    }
}
