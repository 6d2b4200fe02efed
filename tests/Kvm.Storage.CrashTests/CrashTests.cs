using System.Diagnostics;
using System.Globalization;
using System.Security.Cryptography;
using Kvm.Storage.CrashWriter;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using Xunit.Abstractions;

namespace Kvm.Storage.CrashTests;

/// <summary>
/// Crash safety of the qcow2 engine: a writer process (tests/Kvm.Storage.CrashWriter) is killed
/// with SIGKILL at random moments, many times over. Each time qemu-img check must find no
/// corruption (leaks are allowed, and <c>check -r leaks</c> must remove them), every write that
/// completed before the last flush the writer reported must read back (through this engine and
/// through qemu), the image must still take writes, and the backing file must be untouched.
/// </summary>
/// <remarks>
/// Rounds and seed can be changed with KVM_CRASH_ROUNDS and KVM_CRASH_SEED. The kill moments are
/// real time, so a failing round is described in full (and its folder kept) rather than replayed.
/// </remarks>
public sealed class CrashTests(ITestOutputHelper output)
{
    private const ulong DefaultSeed = 0x5eed_c0de_2024;
    private const int DefaultRounds = 40;
    private static readonly int[] ClusterSizes = [512, 4096, 65536];
    private static readonly int[] RefcountWidths = [16, 16, 16, 1, 2, 4, 8, 32, 64, 64];

    /// <param name="Kills">One writer run per entry, all with the same seed on the same image; the
    /// image is checked after each, and repaired only after the last (the runs before it leave the
    /// next writer a crashed, unrepaired image, as a restarted VM would find it).</param>
    private sealed record Round(
        int Number, ulong Seed, int ClusterSize, int RefcountBits, int Slots, int SlotSize, ulong ImageSize,
        bool WithBacking, int BackingClusterSize, ulong BackingSize, long PrefillMargin, KillAt[] Kills)
    {
        public override string ToString() =>
            FormattableString.Invariant($"round {Number}: seed {Seed}, cluster {ClusterSize}, refcount bits {RefcountBits}, {Slots} slots x {SlotSize} bytes, size {ImageSize}, ")
            + (WithBacking ? FormattableString.Invariant($"backing (cluster {BackingClusterSize}, size {BackingSize}), ") : "no backing, ")
            + (PrefillMargin >= 0 ? FormattableString.Invariant($"prefilled to {PrefillMargin}..{PrefillMargin + 4 * ClusterSize} bytes short of the refcount table's reach, ") : "")
            + "kill " + string.Join(", then ", Kills.Select(k => k.ToString()));
    }

    /// <summary>One writer run of a round and what the image looked like after it.</summary>
    private sealed record RunOutcome(WriterRun Run, int Durable, long Leaks, int Landed);

    private sealed record Outcome(IReadOnlyList<RunOutcome> Runs, bool RefcountTableMoved, TimeSpan Elapsed, IReadOnlyDictionary<string, TimeSpan> Timings);

    [SkippableFact]
    public void KilledWriterLeavesConsistentImageWithFlushedDataIntact()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
        string writer = Tools.FindWriter();
        ulong master = EnvULong("KVM_CRASH_SEED") ?? DefaultSeed;
        int rounds = (int)(EnvULong("KVM_CRASH_ROUNDS") ?? DefaultRounds);
        output.WriteLine($"writer {writer}, master seed {master}, {rounds} rounds, images under {WorkRoot.Value}");

        var total = Stopwatch.StartNew();

        var timings = new Dictionary<string, TimeSpan>();
        int runs = 0, midRun = 0, midRunAfterFlush = 0, withLeaks = 0, finished = 0, tableMoved = 0;
        for (int r = 0; r < rounds; r++)
        {
            var round = MakeRound(master, r);
            var o = RunRound(writer, round);
            output.WriteLine(round.ToString());
            foreach (var k in o.Runs)
            {
                string how = k.Run.KilledMidRun ? "killed" : k.Run.Done ? "finished" : "ended";
                output.WriteLine(FormattableString.Invariant(
                    $"    -> {how} after writing for {k.Run.WriteTime.TotalMilliseconds:0} ms; last flush after write {k.Run.LastFlushed}/{round.Slots} (durable: {k.Durable}); {k.Landed} later writes had landed whole; {k.Leaks} leaked clusters"));
                runs++;
                if (k.Run.KilledMidRun)
                {
                    midRun++;
                    if (k.Run.LastFlushed > 0)
                        midRunAfterFlush++;
                }
                if (k.Run.Done)
                    finished++;
                if (k.Leaks > 0)
                    withLeaks++;
            }
            if (o.RefcountTableMoved)
                tableMoved++;
            foreach (var (name, time) in o.Timings)
                timings[name] = timings.GetValueOrDefault(name) + time;
            output.WriteLine(FormattableString.Invariant($"    {(o.RefcountTableMoved ? "refcount table grew; " : "")}round took {o.Elapsed.TotalMilliseconds:0} ms"));
        }
        output.WriteLine($"{rounds} rounds, {runs} writer runs in {total.Elapsed.TotalSeconds:0.0} s: {midRun} killed mid-run ({midRunAfterFlush} of them after at least one flush), "
                         + $"{finished} ran to the end, {withLeaks} left leaked clusters; the refcount table grew in {tableMoved} rounds");
        output.WriteLine("time per step: " + string.Join(", ", timings.OrderByDescending(t => t.Value).Select(t => $"{t.Key} {t.Value.TotalSeconds:0.0} s")));

        // Not vacuous: most writers died mid-run (typically more than nine in ten), and most of
        // those had flushed data to check.
        Assert.True(midRun * 4 >= runs * 3, $"only {midRun} of {runs} writers were killed mid-run");
        Assert.True(midRunAfterFlush * 2 >= runs, $"only {midRunAfterFlush} of {runs} writers were killed after a flush");
    }

    /// <summary>The control: a writer left alone finishes, and everything it wrote reads back in a clean image.</summary>
    [SkippableFact]
    public void UnkilledWriterFinishesWithAllDataAndCleanImage()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        string writer = Tools.FindWriter();
        foreach (int cs in ClusterSizes)
        {
            string dir = MakeWorkDir("kvm-crash-control-");
            try
            {
                int slotSize = cs * 5 / 2 + 17, slots = 40;
                ulong size = RoundUp((ulong)slots * (ulong)slotSize, 512);
                string image = Path.Combine(dir, "image.qcow2");
                Qcow2Image.Create(image, new Qcow2CreateOptions { Size = size, ClusterSize = cs }).Dispose();
                var run = Writer.Run(writer, image, 7, slots, slotSize, kill: null);
                Assert.True(run.Done && run.ExitCode == 0 && !run.KilledByUs,
                    $"writer did not finish: exit {run.ExitCode}, output [{string.Join(", ", run.Lines)}], stderr {run.Stderr}");
                Assert.Equal(slots, run.LastFlushed);
                var check = Tools.Check(image);
                Assert.True(check.Clean, $"qemu-img check after a complete run: {check}");

                var expect = new Expectation(7, slots, slotSize, size, null);
                using (var img = Qcow2Image.Open(image, new ImageOpenOptions { ReadOnly = true }))
                    Assert.Null(expect.Verify((off, buf, n) => img.Read(off, buf.AsSpan(0, n)), run.LastFlushed, out _));

                // The verifier notices a damaged write (so the crash rounds cannot pass by checking nothing).
                var w = expect.Plan[slots / 2];
                using (var img = Qcow2Image.Open(image))
                {
                    var one = new byte[1];
                    img.Read(w.Offset + (ulong)w.Length / 2, one);
                    one[0] ^= 0x55;
                    img.Write(w.Offset + (ulong)w.Length / 2, one);
                    Assert.NotNull(expect.Verify((off, buf, n) => img.Read(off, buf.AsSpan(0, n)), run.LastFlushed, out _));
                }
            }
            finally
            {
                Directory.Delete(dir, recursive: true);
            }
        }
    }

    private static Round MakeRound(ulong master, int number)
    {
        var rng = new SplitMix64(CrashPlan.Mix(master, (ulong)number + 1));
        ulong seed = rng.Next() >> 1;
        int cs = ClusterSizes[number % ClusterSizes.Length];
        bool withBacking = number / ClusterSizes.Length % 2 == 1;
        int rbits = RefcountWidths[rng.Below((ulong)RefcountWidths.Length)];
        // With 512-byte clusters and 64-bit (32-bit) refcounts the first refcount table reaches
        // only 2 (4) MiB of file. Half of those rounds fill the image to just short of that first,
        // so the table grows (moves) early in the writer's run, where kills land.
        long prefillMargin = -1;
        if (cs == 512 && rng.Below(2) == 0)
        {
            rbits = rng.Below(3) == 0 ? 32 : 64;
            prefillMargin = (long)rng.Below(192 << 10);
        }
        (int baseSlot, int slots) = SlotsFor(cs);
        int slotSize = (int)rng.Between(baseSlot * 3 / 4, baseSlot * 5 / 4);
        ulong size = RoundUp((ulong)slots * (ulong)slotSize, 512) + (ulong)rng.Between(0, 3) * 512;
        int backingCs = ClusterSizes[rng.Below((ulong)ClusterSizes.Length)];
        ulong backingSize = rng.Below(3) == 0 ? size : RoundUp(size / 2 + rng.Below(size / 2), 512);

        var plan = CrashPlan.Make(seed, slots, slotSize);
        // Flush points to kill at or after: the writer's own progress marks, so the kills land
        // inside the run however fast this machine is. The last ones are left out (after them
        // the writer may finish before the kill).
        var flushPoints = plan.Where(w => w.FlushAfter).Select(w => w.Number).ToArray();
        flushPoints = flushPoints[..Math.Max(0, flushPoints.Length * 85 / 100)];
        // A third of the rounds kill twice: the second writer starts on the crashed image.
        var kills = new KillAt[rng.Below(3) == 0 ? 2 : 1];
        for (int i = 0; i < kills.Length; i++)
        {
            ulong how = rng.Below(100);
            int point = flushPoints.Length == 0 ? 0 : flushPoints[rng.Below((ulong)flushPoints.Length)];
            double fraction = (rng.Next() >> 11) / (double)(1UL << 53);
            kills[i] = how switch
            {
                < 15 => new KillAt(0, TimeSpan.FromMilliseconds(1 + 9 * fraction)),  // among the first allocations
                < 30 => new KillAt(0, TimeSpan.FromMilliseconds(10 + 240 * fraction)), // anywhere (may be after the end)
                < 55 => new KillAt(point, TimeSpan.Zero),                              // right after a flush
                _ => new KillAt(point, TimeSpan.FromMilliseconds(0.1 + 15 * fraction)), // between flushes
            };
        }
        return new Round(number, seed, cs, rbits, slots, slotSize, size, withBacking, backingCs, backingSize,
            prefillMargin, kills);
    }

    /// <summary>
    /// Slots a few clusters wide (so writes cross cluster boundaries), and enough of them that a
    /// writer runs for a few hundred milliseconds.
    /// </summary>
    private static (int SlotSize, int Slots) SlotsFor(int clusterSize) => clusterSize switch
    {
        512 => (2500, 4000),
        4096 => (12000, 3000),
        _ => (100000, 500),
    };

    private Outcome RunRound(string writer, Round round)
    {
        var clock = Stopwatch.StartNew();
        string dir = MakeWorkDir("kvm-crash-");
        bool ok = false;
        string step = "setup";
        // Time per step (summed over a round's runs), for the summary.
        var timings = new Dictionary<string, TimeSpan>();
        string stepKey = step;
        var stepClock = Stopwatch.StartNew();
        void Step(string name, string which = "")
        {
            timings[stepKey] = timings.GetValueOrDefault(stepKey) + stepClock.Elapsed;
            stepClock.Restart();
            stepKey = name;
            step = name + which;
        }
        WriterRun? run = null;
        try
        {
            string image = Path.Combine(dir, "image.qcow2");
            string backing = Path.Combine(dir, "backing.qcow2");
            byte[]? baseContent = null;
            byte[]? backingHash = null;
            if (round.WithBacking)
            {
                Step("creating the backing image");
                baseContent = MakeBacking(backing, round);
                backingHash = Hash(backing);
            }
            Step("creating the image");
            using (var created = Qcow2Image.Create(image, new Qcow2CreateOptions
            {
                Size = round.ImageSize,
                ClusterSize = round.ClusterSize,
                RefcountBits = round.RefcountBits,
                BackingFile = round.WithBacking ? "backing.qcow2" : null,
                BackingFormat = round.WithBacking ? "qcow2" : null,
            }))
            {
                if (round.PrefillMargin >= 0)
                {
                    Step("prefilling the image");
                    baseContent = Prefill(created, image, round, baseContent);
                    var prefilled = Tools.Check(image);
                    if (!prefilled.Clean)
                        Fail(round, dir, step, prefilled.ToString());
                }
            }

            var expect = new Expectation(round.Seed, round.Slots, round.SlotSize, round.ImageSize, baseContent);
            var runs = new List<RunOutcome>();
            int durable = 0;
            for (int i = 0; i < round.Kills.Length; i++)
            {
                var kill = round.Kills[i];
                string which = round.Kills.Length > 1 ? $" (run {i + 1} of {round.Kills.Length})" : "";
                Step("running the writer", which);
                run = Writer.Run(writer, image, round.Seed, round.Slots, round.SlotSize, kill);
                const int SigKillExit = 128 + 9;
                if (!run.Opened || !(run.Done ? run.ExitCode is 0 or SigKillExit : run.KilledByUs && run.ExitCode == SigKillExit))
                    Fail(round, dir, step, $"writer exited with {run.ExitCode} (killed by the test: {run.KilledByUs}); stdout [{string.Join(", ", run.Lines.TakeLast(10))}]; stderr: {run.Stderr.Trim()}");
                if (run.KilledMidRun && run.LastFlushed < kill.AfterFlush)
                    Fail(round, dir, step, $"killed on 'flushed {kill.AfterFlush}' but the last flush seen is {run.LastFlushed}");
                // Every run writes the same bytes to the same places, so whatever any run flushed is durable.
                durable = Math.Max(durable, run.LastFlushed);

                Step("qemu-img check of the crashed image", which);
                var crashed = Tools.Check(image);
                if (!crashed.NoCorruption)
                    Fail(round, dir, step, crashed.ToString());

                Step("reading the crashed image with this engine (read-only)", which);
                int landed;
                using (var img = Qcow2Image.Open(image, new ImageOpenOptions { ReadOnly = true }))
                {
                    if (img.Size != round.ImageSize)
                        Fail(round, dir, step, $"size reads {img.Size}, not {round.ImageSize}");
                    if (expect.Verify((off, buf, n) => img.Read(off, buf.AsSpan(0, n)), durable, out landed) is { } bad)
                        Fail(round, dir, step, bad);
                }

                Step("reading the crashed image with qemu (qemu-img convert -O raw)", which);
                string raw = Path.Combine(dir, "image.raw");
                Tools.ConvertToRaw(image, raw);
                using (var rawFile = File.OpenHandle(raw))
                {
                    string? bad = expect.Verify((off, buf, n) =>
                    {
                        int got = RandomAccess.Read(rawFile, buf.AsSpan(0, n), (long)off);
                        buf.AsSpan(got, n - got).Clear();
                    }, durable, out _);
                    if (bad is not null)
                        Fail(round, dir, step, bad);
                }
                File.Delete(raw);
                runs.Add(new RunOutcome(run, durable, crashed.Leaks, landed));
            }

            Step("qemu-img check -r leaks");
            var repaired = Tools.Check(image, repair: "leaks");
            if (!repaired.NoCorruption)
                Fail(round, dir, step, repaired.ToString());
            Step("qemu-img check after the repair");
            var after = Tools.Check(image);
            if (!after.Clean)
                Fail(round, dir, step, after.ToString());

            Step("reopening read-write with this engine, reading and writing");
            var rng = new SplitMix64(CrashPlan.Mix(round.Seed, 0xaf7e5));
            ulong newLength = (ulong)rng.Between(1, 3L * round.ClusterSize);
            ulong newOffset = rng.Below(round.ImageSize - newLength + 1);
            byte pattern = (byte)(0x11 + rng.Below(0xee));
            bool tableMoved;
            using (var img = Qcow2Image.Open(image))
            {
                tableMoved = img.Header.RefcountTableOffset != (ulong)round.ClusterSize; // Create puts it in cluster 1
                if (expect.Verify((off, buf, n) => img.Read(off, buf.AsSpan(0, n)), durable, out _) is { } bad)
                    Fail(round, dir, step, "after qemu-img check -r leaks: " + bad);
                var data = new byte[newLength];
                data.AsSpan().Fill(pattern);
                img.Write(newOffset, data);
                img.Flush();
                var back = new byte[newLength];
                img.Read(newOffset, back);
                if (!back.AsSpan().SequenceEqual(data))
                    Fail(round, dir, step, $"a new write of {newLength} bytes at 0x{newOffset:x} does not read back");
            }
            Step("qemu-io reading the new write");
            if (Tools.QemuIoVerifyPattern(image, newOffset, newLength, pattern) is { } ioBad)
                Fail(round, dir, step, ioBad);
            Step("qemu-img check after the new write");
            var final = Tools.Check(image);
            if (!final.Clean)
                Fail(round, dir, step, final.ToString());

            if (backingHash is not null)
            {
                Step("comparing the backing file");
                if (!Hash(backing).AsSpan().SequenceEqual(backingHash))
                    Fail(round, dir, step, "the backing file changed");
            }
            Step("done");
            ok = true;
            return new Outcome(runs, tableMoved, clock.Elapsed, timings);
        }
        catch (Exception e) when (e is not Xunit.Sdk.XunitException)
        {
            Fail(round, dir, step, $"{e.GetType().Name}: {e.Message}\n{e.StackTrace}"
                + (run is null ? "" : $"\nwriter: exit {run.ExitCode}, last flush {run.LastFlushed}, stderr: {run.Stderr.Trim()}"));
            throw; // not reached
        }
        finally
        {
            if (ok)
                Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// Writes random data at random places until the file is <see cref="Round.PrefillMargin"/>
    /// (plus at most four clusters) short of what the image's first refcount table can count.
    /// Returns the image's guest content afterwards (the writer's starting point).
    /// </summary>
    private static byte[] Prefill(Qcow2Image img, string path, Round round, byte[]? baseContent)
    {
        var content = new byte[round.ImageSize];
        baseContent?.CopyTo(content, 0);
        ulong cs = (ulong)round.ClusterSize;
        ulong reach = img.Header.RefcountTableClusters * cs / 8 * (cs * 8 / (ulong)round.RefcountBits) * cs;
        long target = (long)reach - round.PrefillMargin;
        var rng = new SplitMix64(CrashPlan.Mix(round.Seed, 0x9f11));
        var data = new byte[16384];
        long cluster = round.ClusterSize;
        long remaining;
        // A write of n bytes adds at most n bytes plus four clusters (partial clusters at both
        // ends, an L2 table, a refcount block); writes shrink as the target nears, so the file
        // never passes it.
        while ((remaining = target - new FileInfo(path).Length) > 4 * cluster)
        {
            int length = (int)rng.Between(1, Math.Clamp(remaining / 2 - 4 * cluster, 1, data.Length));
            ulong offset = rng.Below(round.ImageSize - (ulong)length + 1);
            var fill = new SplitMix64(rng.Next());
            for (int j = 0; j < length; j++)
                data[j] = (byte)(fill.Next() | 1);
            img.Write(offset, data.AsSpan(0, length));
            data.AsSpan(0, length).CopyTo(content.AsSpan((int)offset));
        }
        img.Flush();
        if (img.Header.RefcountTableOffset != cs)
            throw new InvalidOperationException($"the refcount table moved during the prefill (file {new FileInfo(path).Length} bytes, reach {reach})");
        return content;
    }

    /// <summary>A backing image made by this engine: a few writes (some across clusters) and a zeroed range. Returns its guest content.</summary>
    private static byte[] MakeBacking(string path, Round round)
    {
        var content = new byte[round.BackingSize];
        var rng = new SplitMix64(CrashPlan.Mix(round.Seed, 0xbac));
        using (var b = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = round.BackingSize, ClusterSize = round.BackingClusterSize }))
        {
            int writes = (int)rng.Between(4, 12);
            for (int i = 0; i < writes; i++)
            {
                ulong length = (ulong)rng.Between(1, Math.Min(3L * round.SlotSize, (long)round.BackingSize));
                ulong offset = rng.Below(round.BackingSize - length + 1);
                var data = new byte[length];
                var fill = new SplitMix64(rng.Next());
                for (int j = 0; j < data.Length; j++)
                    data[j] = (byte)(fill.Next() | 1); // never zero, so the zeroed range below shows
                b.Write(offset, data);
                data.CopyTo(content, (long)offset);
            }
            ulong zeroLength = (ulong)rng.Between(1, Math.Min(4L * round.BackingClusterSize, (long)round.BackingSize));
            ulong zeroOffset = rng.Below(round.BackingSize - zeroLength + 1);
            b.WriteZeroes(zeroOffset, zeroLength);
            content.AsSpan((int)zeroOffset, (int)zeroLength).Clear();
            b.Flush();
        }
        return content;
    }

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void Fail(Round round, string dir, string step, string what)
    {
        string text = $"{round}\nstep: {step}\n{what}\nthe round's files are kept in {dir}";
        output.WriteLine("FAILED " + text);
        Assert.Fail(text);
    }

    /// <summary>
    /// Where the images go: KVM_CRASH_DIR, else /dev/shm when it has room, else the temp folder. A
    /// SIGKILL leaves the page cache intact on any file system, so memory-backed files test the
    /// same thing; without a disk's fsync cost the writer spends more of its time inside Write(),
    /// where the kills are most telling, and the rounds run faster.
    /// </summary>
    internal static readonly Lazy<string> WorkRoot = new(() =>
    {
        if (Environment.GetEnvironmentVariable("KVM_CRASH_DIR") is { Length: > 0 } chosen)
            return chosen;
        try
        {
            if (Directory.Exists("/dev/shm") && new DriveInfo("/dev/shm").AvailableFreeSpace > (2L << 30))
            {
                string probe = Path.Combine("/dev/shm", $"kvm-crash-probe-{Environment.ProcessId}");
                Directory.CreateDirectory(probe);
                Directory.Delete(probe);
                return "/dev/shm";
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
        return Path.GetTempPath();
    });

    internal static string MakeWorkDir(string prefix)
    {
        string dir = Path.Combine(WorkRoot.Value, prefix + Path.GetRandomFileName().Replace(".", "", StringComparison.Ordinal));
        Directory.CreateDirectory(dir);
        return dir;
    }

    private static byte[] Hash(string path)
    {
        using var f = File.OpenRead(path);
        return SHA256.HashData(f);
    }

    private static ulong RoundUp(ulong value, ulong unit) => (value + unit - 1) / unit * unit;

    private static ulong? EnvULong(string name) =>
        ulong.TryParse(Environment.GetEnvironmentVariable(name), NumberStyles.None, CultureInfo.InvariantCulture, out ulong v) ? v : null;
}
