using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Kvm.Storage.CrashWriter;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using Xunit.Abstractions;

namespace Kvm.Storage.CrashTests;

/// <summary>
/// Crash safety of the persistent dirty bitmaps: a writer (tests/Kvm.Storage.CrashWriter) writes
/// an image that holds an enabled bitmap and is killed with SIGKILL at random moments: between
/// writes, right after flushes, and while it closes the image (where the bitmap is stored). After
/// each kill the bitmap is either marked in use (stale: qemu and the engine refuse to trust it), or
/// it is trusted, and then it must record every granule whose content changed, and nothing outside
/// the granules of the writes planned. Never wrong and trusted. A disabled bitmap beside it must
/// come through unchanged, qemu-img check must find no corruption, the data flushed must read back,
/// and the next session must carry on from what the file holds.
/// </summary>
/// <remarks>Rounds and seed: KVM_CRASH_BITMAP_ROUNDS, KVM_CRASH_SEED.</remarks>
public sealed class BitmapCrashTests(ITestOutputHelper output)
{
    private const ulong DefaultSeed = 0xb17_0a95_2025;
    private const int DefaultRounds = 36;
    private const string Tracked = "crash", Frozen = "frozen";
    private static readonly int[] ClusterSizes = [512, 4096, 65536];

    private sealed record Round(int Number, ulong Seed, int ClusterSize, int GranularityBits, int Slots, int SlotSize, ulong ImageSize, KillAt? Kill)
    {
        public override string ToString() => FormattableString.Invariant(
            $"round {Number}: seed {Seed}, cluster {ClusterSize}, granularity {1 << GranularityBits}, {Slots} slots x {SlotSize} bytes, size {ImageSize}, ")
            + (Kill is null ? "not killed" : "kill " + Kill);
    }

    private enum Verdict { InUse, Trusted }

    [SkippableFact]
    public void KilledWriterNeverLeavesABitmapThatIsWrongAndTrusted()
    {
        QemuDirtyBitmap.Require();
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
        string writer = Tools.FindWriter();
        ulong master = EnvULong("KVM_CRASH_SEED") ?? DefaultSeed;
        int rounds = (int)(EnvULong("KVM_CRASH_BITMAP_ROUNDS") ?? DefaultRounds);
        output.WriteLine($"writer {writer}, master seed {master}, {rounds} rounds, images under {CrashTests.WorkRoot.Value}");
        var clock = Stopwatch.StartNew();
        int inUse = 0, trusted = 0, trustedAfterKill = 0, killedInClose = 0;
        for (int r = 0; r < rounds; r++)
        {
            var round = MakeRound(master, r);
            var (verdict, run) = RunRound(writer, round);
            bool closing = run.Lines.Contains("closing");
            output.WriteLine($"{round}\n    -> {(run.KilledByUs ? "killed" : "finished")}{(closing ? " after 'closing'" : "")}{(run.Done ? " after 'done'" : "")}, "
                             + $"last flush after write {run.LastFlushed}/{round.Slots}: bitmap {(verdict == Verdict.InUse ? "in use (stale)" : "trusted")}");
            if (verdict == Verdict.InUse)
            {
                inUse++;
            }
            else
            {
                trusted++;
                if (run.KilledByUs && !run.Done)
                    trustedAfterKill++;
            }
            if (run.KilledByUs && closing && !run.Done)
                killedInClose++;
        }
        output.WriteLine($"{rounds} rounds in {clock.Elapsed.TotalSeconds:0.0} s: bitmap in use after {inUse}, trusted after {trusted} "
                         + $"({trustedAfterKill} of them killed before 'done'); {killedInClose} kills after 'closing' and before 'done'");
        // Not vacuous: both outcomes were seen and checked.
        Assert.True(inUse > 0, "no round left the bitmap in use");
        Assert.True(trusted > 0, "no round left a trusted bitmap");
    }

    private static Round MakeRound(ulong master, int number)
    {
        var rng = new SplitMix64(CrashPlan.Mix(master, 0xb1700 + (ulong)number));
        ulong seed = rng.Next() >> 1;
        int cs = ClusterSizes[number % ClusterSizes.Length];
        int gbits = number / ClusterSizes.Length % 2 == 0 ? 12 : 16;
        // Enough writes that a writer runs for some milliseconds between its first write and its close.
        int slots = 1500;
        int slotSize = (int)rng.Between(1000, 8000);
        ulong size = ((ulong)slots * (ulong)slotSize + 511) / 512 * 512 + (ulong)rng.Between(0, 3) * 512;
        var plan = CrashPlan.Make(seed, slots, slotSize);
        var flushPoints = plan.Where(w => w.FlushAfter).Select(w => w.Number).ToArray();
        double fraction = (rng.Next() >> 11) / (double)(1UL << 53);
        KillAt? kill = rng.Below(100) switch
        {
            < 35 => new KillAt(flushPoints[rng.Below((ulong)flushPoints.Length)], TimeSpan.FromMilliseconds(2 * fraction)), // between writes
            < 45 => new KillAt(0, TimeSpan.FromMilliseconds(5 * fraction)), // among the first writes
            < 55 => new KillAt(-1, TimeSpan.Zero), // as soon as it starts closing
            < 90 => new KillAt(-1, TimeSpan.FromMilliseconds(0.05 + 20 * fraction)), // while it closes (or just after)
            _ => null,
        };
        return new Round(number, seed, cs, gbits, slots, slotSize, size, kill);
    }

    private (Verdict, WriterRun) RunRound(string writer, Round round)
    {
        string dir = CrashTests.MakeWorkDir("kvm-bitmap-crash-");
        string step = "setup";
        bool ok = false;
        WriterRun? run = null;
        try
        {
            string image = Path.Combine(dir, "image.qcow2");
            ulong granularity = 1UL << round.GranularityBits;

            // The image: some content first (recorded by "frozen", which is then disabled), then the tracked bitmap.
            step = "creating the image";
            var rng = new SplitMix64(CrashPlan.Mix(round.Seed, 0xf00));
            var prefill = new List<(ulong Offset, ulong Length)>();
            using (var img = Qcow2Image.Create(image, new Qcow2CreateOptions { Size = round.ImageSize, ClusterSize = round.ClusterSize }))
            {
                img.AddBitmap(Frozen, 9);
                for (int i = 0; i < 6; i++)
                {
                    ulong length = (ulong)rng.Between(1, 200_000);
                    ulong offset = rng.Below(round.ImageSize - length + 1);
                    var data = new byte[length];
                    new Random((int)(round.Seed % int.MaxValue) + i).NextBytes(data);
                    img.Write(offset, data);
                    prefill.Add((offset, length));
                }
                img.SetBitmapEnabled(Frozen, false);
                img.AddBitmap(Tracked, round.GranularityBits);
            }
            var frozenExpected = QemuDirtyBitmap.Expected(prefill, 512, round.ImageSize);
            string raw = Path.Combine(dir, "image.raw");
            Tools.ConvertToRaw(image, raw);
            byte[] initial = File.ReadAllBytes(raw);

            step = "running the writer";
            run = Writer.Run(writer, image, round.Seed, round.Slots, round.SlotSize, round.Kill);
            const int SigKillExit = 128 + 9;
            if (!run.Opened || !(run.Done ? run.ExitCode is 0 or SigKillExit : run.KilledByUs && run.ExitCode == SigKillExit))
                Fail(round, dir, step, $"writer exited with {run.ExitCode} (killed by the test: {run.KilledByUs}); stdout [{string.Join(", ", run.Lines.TakeLast(5))}]; stderr: {run.Stderr.Trim()}");

            step = "qemu-img check of the crashed image";
            var check = Tools.Check(image);
            if (!check.NoCorruption)
                Fail(round, dir, step, check.ToString());

            step = "qemu-img info";
            var flags = QemuFlags(image);
            if (!flags.ContainsKey(Tracked) || !flags.ContainsKey(Frozen))
                Fail(round, dir, step, $"bitmaps {string.Join(", ", flags.Keys)}: one is missing");
            string[] trackedFlags = flags[Tracked], frozenFlags = flags[Frozen];
            if (frozenFlags.Contains("in-use") || frozenFlags.Contains("auto"))
                Fail(round, dir, step, $"the disabled bitmap's flags changed: {string.Join(",", frozenFlags)}");
            bool stale = trackedFlags.Contains("in-use");
            if (!trackedFlags.Contains("auto"))
                Fail(round, dir, step, $"the tracked bitmap lost its auto flag: {string.Join(",", trackedFlags)}");
            if (stale && run.Done)
                Fail(round, dir, step, "the writer closed the image ('done'), yet the bitmap is still in use");

            step = "the disabled bitmap as qemu reads it";
            var frozenNow = QemuDirtyBitmap.DirtyRanges(image, Frozen);
            if (!frozenNow.SequenceEqual(frozenExpected))
                Fail(round, dir, step, $"the disabled bitmap changed: {Show(frozenNow)}, expected {Show(frozenExpected)}");

            step = "the image content (qemu-img convert -O raw)";
            File.Delete(raw);
            Tools.ConvertToRaw(image, raw);
            byte[] now = File.ReadAllBytes(raw);
            Array.Resize(ref now, (int)round.ImageSize);
            var expect = new Expectation(round.Seed, round.Slots, round.SlotSize, round.ImageSize, initial);
            if (expect.Verify((off, buf, n) => now.AsSpan((int)off, n).CopyTo(buf), run.LastFlushed, out _) is { } bad)
                Fail(round, dir, step, bad);

            var planned = QemuDirtyBitmap.Expected(expect.Plan.Select(w => (w.Offset, (ulong)w.Length)), granularity, round.ImageSize);
            IReadOnlyList<(ulong Offset, ulong Length)> dirty = [];
            if (stale)
            {
                step = "the engine's view of the stale bitmap";
                using var img = Qcow2Image.Open(image, new ImageOpenOptions { ReadOnly = true });
                var info = img.ListBitmaps().Single(b => b.Name == Tracked);
                if (!info.InUse || info.DirtyBytes is not null)
                    Fail(round, dir, step, $"qemu says in use, the engine lists {info}");
                try
                {
                    img.GetBitmapExtents(Tracked);
                    Fail(round, dir, step, "the engine exported a bitmap marked in use");
                }
                catch (InvalidOperationException)
                {
                }
            }
            else
            {
                step = "the trusted bitmap as qemu reads it";
                dirty = QemuDirtyBitmap.DirtyRanges(image, Tracked);
                if (!Within(dirty, planned))
                    Fail(round, dir, step, $"it records ranges no planned write touches: {Show(dirty)}; planned {Show(planned)}");
                for (ulong g = 0; g * granularity < round.ImageSize; g++)
                {
                    ulong start = g * granularity;
                    int n = (int)Math.Min(granularity, round.ImageSize - start);
                    if (!now.AsSpan((int)start, n).SequenceEqual(initial.AsSpan((int)start, n)) && !Covers(dirty, start, (ulong)n))
                        Fail(round, dir, step, $"granule {g} (0x{start:x}) changed but the trusted bitmap does not record it: {Show(dirty)}");
                }
                if (run.Done && !dirty.SequenceEqual(planned))
                    Fail(round, dir, step, $"the writer finished, yet the bitmap is {Show(dirty)}, not {Show(planned)}");
                using var img = Qcow2Image.Open(image, new ImageOpenOptions { ReadOnly = true });
                var mine = img.GetBitmapExtents(Tracked).Select(e => (e.Offset, e.Length)).ToList();
                if (!mine.SequenceEqual(dirty))
                    Fail(round, dir, step, $"the engine reads {Show(mine)}, qemu {Show(dirty)}");
            }

            // The next session starts from what the file holds: a stale bitmap is removed, a trusted one carries on.
            step = "qemu-img check -r leaks";
            var repaired = Tools.Check(image, repair: "leaks");
            if (!repaired.NoCorruption)
                Fail(round, dir, step, repaired.ToString());
            step = "the next session";
            ulong extraLength = (ulong)rng.Between(1, 3 * (long)granularity);
            ulong extraOffset = rng.Below(round.ImageSize - extraLength + 1);
            using (var img = Qcow2Image.Open(image))
            {
                if (stale)
                    img.RemoveBitmap(Tracked);
                img.Write(extraOffset, new byte[extraLength]);
            }
            var final = Tools.Check(image);
            if (!final.Clean)
                Fail(round, dir, step, "qemu-img check after the next session: " + final);
            var after = QemuFlags(image);
            if (after.Values.Any(f => f.Contains("in-use")))
                Fail(round, dir, step, "a bitmap is still in use after a clean close");
            if (!stale)
            {
                var want = QemuDirtyBitmap.Expected(dirty.Append((extraOffset, extraLength)), granularity, round.ImageSize);
                var got = QemuDirtyBitmap.DirtyRanges(image, Tracked);
                if (!got.SequenceEqual(want))
                    Fail(round, dir, step, $"after one more write the bitmap is {Show(got)}, expected {Show(want)}");
            }
            else if (after.ContainsKey(Tracked))
            {
                Fail(round, dir, step, "the stale bitmap was not removed");
            }
            ok = true;
            return (stale ? Verdict.InUse : Verdict.Trusted, run);
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

    /// <summary>Each bitmap's flags as <c>qemu-img info</c> shows them.</summary>
    private static Dictionary<string, string[]> QemuFlags(string image)
    {
        var r = TestEnvironment.RunProcess("qemu-img", ["info", "--output=json", "-f", "qcow2", image], TimeSpan.FromMinutes(2));
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"qemu-img info {image} exited with {r.ExitCode}: {r.Stderr.Trim()}");
        using var doc = JsonDocument.Parse(r.Stdout);
        var flags = new Dictionary<string, string[]>();
        if (doc.RootElement.GetProperty("format-specific").GetProperty("data").TryGetProperty("bitmaps", out var list))
        {
            foreach (var b in list.EnumerateArray())
                flags[b.GetProperty("name").GetString()!] = b.GetProperty("flags").EnumerateArray().Select(f => f.GetString()!).ToArray();
        }
        return flags;
    }

    private static bool Covers(IReadOnlyList<(ulong Offset, ulong Length)> ranges, ulong offset, ulong length) =>
        ranges.Any(r => r.Offset <= offset && offset + length <= r.Offset + r.Length);

    private static bool Within(IReadOnlyList<(ulong Offset, ulong Length)> inner, IReadOnlyList<(ulong Offset, ulong Length)> outer) =>
        inner.All(r => Covers(outer, r.Offset, r.Length));

    private static string Show(IEnumerable<(ulong Offset, ulong Length)> ranges)
    {
        var list = ranges.ToList();
        string text = string.Join(" ", list.Take(8).Select(r => string.Create(CultureInfo.InvariantCulture, $"[0x{r.Offset:x}+0x{r.Length:x}]")));
        return list.Count > 8 ? $"{text} ... ({list.Count} ranges)" : list.Count == 0 ? "(empty)" : text;
    }

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void Fail(Round round, string dir, string step, string what)
    {
        string text = $"{round}\nstep: {step}\n{what}\nthe round's files are kept in {dir}";
        output.WriteLine("FAILED " + text);
        Assert.Fail(text);
    }

    private static ulong? EnvULong(string name) =>
        ulong.TryParse(Environment.GetEnvironmentVariable(name), NumberStyles.None, CultureInfo.InvariantCulture, out ulong v) ? v : null;
}
