using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using Kvm.Storage.Qcow2;

namespace Kvm.Storage.FuzzTests;

/// <summary>An invariant the harness itself checks (as opposed to an exception from the engine).</summary>
public sealed class HarnessCheckException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A file that must not change. The image under test is compared by SHA-256; files that every case
/// shares (backing files) by length and modification time, which any write moves, and by SHA-256 when <see cref="Changed(bool)"/> is asked for it.
/// </summary>
public sealed class WatchedFile
{
    private readonly string _hash;
    private readonly (long Length, DateTime Mtime) _stat;

    public WatchedFile(string path, bool fullHash, string? knownHash = null)
    {
        Path = path;
        FullHash = fullHash;
        _hash = knownHash ?? FuzzHarness.Hash(path);
        _stat = Stat(path);
    }

    public string Path { get; }
    public bool FullHash { get; }

    private static (long, DateTime) Stat(string path)
    {
        var info = new FileInfo(path);
        return info.Exists ? (info.Length, info.LastWriteTimeUtc) : (-1, default);
    }

    /// <summary>Null when unchanged, else what changed.</summary>
    public string? Changed(bool forceHash = false)
    {
        if (!File.Exists(Path))
            return "deleted";
        if (FullHash || forceHash)
        {
            var now = FuzzHarness.Hash(Path);
            return now == _hash ? null : $"SHA-256 {_hash[..16]}… -> {now[..16]}…";
        }
        var stat = Stat(Path);
        return stat == _stat ? null : $"length/mtime {_stat.Length}/{_stat.Mtime:O} -> {stat.Item1}/{stat.Item2:O}";
    }
}

/// <summary>How one case went: null <see cref="Failure"/> means it passed.</summary>
public sealed record CaseResult(string? Failure, string Outcome, TimeSpan Elapsed, long Allocated, string Signature = "");

/// <summary>
/// Runs one damaged image through the engine under the pass criteria of the fuzz harness: only
/// <see cref="ImageFormatException"/> may escape, each case finishes within
/// <see cref="CaseTimeLimit"/>, allocates less than <see cref="AllocationLimit"/> bytes, and leaves
/// every file as it was (read-only cases, and read-write cases whose open failed).
/// </summary>
public static class FuzzHarness
{
    public const int ChunkSize = 64 * 1024;
    /// <summary>Guests up to this size are read whole; larger ones (a damaged size field) are sampled.</summary>
    public const ulong FullReadLimit = 64UL << 20;
    public const long AllocationLimit = 64L << 20;
    public static readonly TimeSpan CaseTimeLimit = TimeSpan.FromSeconds(2);
    /// <summary>How long to wait for a case before giving it up as hung (its thread is abandoned).</summary>
    public static readonly TimeSpan HangLimit = TimeSpan.FromSeconds(15);

    public static readonly ImageOpenOptions ReadOnlyOptions = new() { ReadOnly = true, AllowBackingOutsideFolder = false };
    public static readonly ImageOpenOptions ReadWriteOptions = new() { ReadOnly = false, AllowBackingOutsideFolder = false };

    /// <summary>Case count multiplier from KVM_FUZZ_SCALE (default 1).</summary>
    public static double Scale =>
        double.TryParse(Environment.GetEnvironmentVariable("KVM_FUZZ_SCALE"), NumberStyles.Float, CultureInfo.InvariantCulture, out var s) && s > 0 ? s : 1;

    /// <summary>KVM_FUZZ_ONLY="seed:case" runs that one case (of every test that has the seed).</summary>
    public static bool Selected(string seed, int caseIndex)
    {
        var only = Environment.GetEnvironmentVariable("KVM_FUZZ_ONLY");
        return string.IsNullOrEmpty(only) || only == $"{seed}:{caseIndex.ToString(CultureInfo.InvariantCulture)}";
    }

    /// <summary>The random source of one case: a function of (stream, seed name, case number) only.</summary>
    public static Random CaseRandom(string stream, string seed, int caseIndex) =>
        new(unchecked(SeedCorpus.StableHash(stream + "/" + seed) * 31 + caseIndex * 7919));

    public static string Hash(string path)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1 << 16);
        return Convert.ToHexString(SHA256.HashData(f));
    }

    public static string Hash(byte[] bytes) => Convert.ToHexString(SHA256.HashData(bytes));

    /// <summary>Saves a failing case's damaged image (as it was before the case ran) where KVM_FUZZ_KEEP points, if it does.</summary>
    public static string Keep(byte[] bytes, string name)
    {
        var keep = Environment.GetEnvironmentVariable("KVM_FUZZ_KEEP");
        if (string.IsNullOrEmpty(keep))
            return "";
        Directory.CreateDirectory(keep);
        var dest = Path.Combine(keep, name);
        File.WriteAllBytes(dest, bytes);
        return $" (kept as {dest})";
    }

    // ------------------------------------------------------------------ running a case body with limits

    private sealed class Meter
    {
        public long Allocated;
        public string Phase = "start";
        public long MostInOneCall;
        public string MostInOneCallPhase = "";
        public TimeSpan SlowestCall;
        public string SlowestCallPhase = "";

        /// <summary>Runs an engine call, counting what it allocates (the harness's own bookkeeping is not counted).</summary>
        public T Engine<T>(string phase, Func<T> call)
        {
            Phase = phase;
            long before = GC.GetAllocatedBytesForCurrentThread();
            long start = Stopwatch.GetTimestamp();
            try
            {
                return call();
            }
            finally
            {
                long used = GC.GetAllocatedBytesForCurrentThread() - before;
                Allocated += used;
                var took = Stopwatch.GetElapsedTime(start);
                if (took > SlowestCall)
                {
                    SlowestCall = took;
                    SlowestCallPhase = phase;
                }
                if (used > MostInOneCall)
                {
                    MostInOneCall = used;
                    MostInOneCallPhase = phase;
                }
            }
        }

        public void Engine(string phase, Action call) => Engine(phase, () => { call(); return 0; });
    }

    private sealed record Bounded(Exception? Error, string Phase, TimeSpan Elapsed, long Allocated, bool Finished, string HungryPhase = "", string SlowPhase = "");

    /// <summary>
    /// Runs case bodies one at a time on a long-lived thread (starting a thread per case costs more
    /// than most cases). A body that does not finish within <see cref="HangLimit"/> is given up on:
    /// its thread is abandoned (it is a background thread) and the next case gets a new one.
    /// </summary>
    private sealed class Worker
    {
        private readonly BlockingCollection<Action> _queue = new();

        public Worker()
        {
            var thread = new Thread(() =>
            {
                foreach (var job in _queue.GetConsumingEnumerable())
                    job();
            }, 16 << 20)
            {
                IsBackground = true,
                Name = "fuzz case",
            };
            thread.Start();
        }

        public void Post(Action job) => _queue.Add(job);

        public void Abandon() => _queue.CompleteAdding();
    }

    [ThreadStatic]
    private static Worker? _worker;

    private static Bounded RunBounded(Action<Meter> body)
    {
        var meter = new Meter();
        Exception? error = null;
        TimeSpan elapsed = default;
        using var done = new ManualResetEventSlim();
        var worker = _worker ??= new Worker();
        worker.Post(() =>
        {
            var sw = Stopwatch.StartNew();
            try
            {
                body(meter);
            }
            catch (Exception e)
            {
                error = e;
            }
            elapsed = sw.Elapsed;
            done.Set();
        });
        if (!done.Wait(HangLimit))
        {
            worker.Abandon();
            _worker = null;
            return new Bounded(null, meter.Phase, HangLimit, meter.Allocated, false, meter.MostInOneCallPhase, meter.SlowestCallPhase);
        }
        return new Bounded(error, meter.Phase, elapsed, meter.Allocated, true, meter.MostInOneCallPhase, $"{meter.SlowestCallPhase} ({meter.SlowestCall.TotalMilliseconds:F0} ms)");
    }

    /// <summary>The exception type, message and the first frames that say where it came from.</summary>
    public static string Describe(Exception e)
    {
        var sb = new StringBuilder();
        sb.Append(e.GetType().Name).Append(": ").Append(e.Message.ReplaceLineEndings(" "));
        // The frame that threw, then where the engine was (the runtime's own frames in between say little).
        var all = (e.StackTrace ?? "").Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var frames = all.Take(1).Concat(all.Skip(1).Where(l => l.Contains("Kvm.Storage.", StringComparison.Ordinal)
                                                            && !l.Contains("Kvm.Storage.FuzzTests", StringComparison.Ordinal)).Take(4));
        foreach (var f in frames)
            sb.Append("\n        ").Append(f);
        if (e.InnerException is { } inner && e is HarnessCheckException)
            sb.Append("\n      caused by ").Append(Describe(inner));
        return sb.ToString();
    }

    private static List<string> LimitProblems(Bounded r)
    {
        var problems = new List<string>();
        if (!r.Finished)
            problems.Add($"did not finish within {HangLimit.TotalSeconds} s (hung in phase '{r.Phase}')");
        else if (r.Elapsed > CaseTimeLimit)
            problems.Add($"took {r.Elapsed.TotalMilliseconds:F0} ms (limit {CaseTimeLimit.TotalMilliseconds} ms), slowest call '{r.SlowPhase}'");
        if (r.Allocated > AllocationLimit)
            problems.Add($"the engine allocated {r.Allocated >> 20} MiB (limit {AllocationLimit >> 20} MiB), most of it in phase '{r.HungryPhase}'");
        return problems;
    }

    /// <summary>A short key that groups failures with the same cause.</summary>
    private static string SignatureOf(Bounded r, List<string> problems)
    {
        if (r.Error is { } e && e is not ImageFormatException)
        {
            var root = e is HarnessCheckException { InnerException: { } inner } ? inner : e;
            var frames = (root.StackTrace ?? "").Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            string frame = frames.FirstOrDefault(f => f.Contains("Kvm.Storage.", StringComparison.Ordinal) && !f.Contains("FuzzTests", StringComparison.Ordinal))
                           ?? frames.FirstOrDefault() ?? "";
            int paren = frame.IndexOf('(', StringComparison.Ordinal);
            if (paren > 0)
                frame = frame[..paren];
            string general = System.Text.RegularExpressions.Regex.Replace(e.Message, @"\b(0x[0-9a-f]+|\d+)\b", "#");
            return e is HarnessCheckException
                ? $"harness check: {general[..Math.Min(80, general.Length)]}"
                : $"{root.GetType().Name} {frame}";
        }
        if (problems.Count == 0)
            return "";
        string p = problems[0];
        return p.StartsWith("did not finish", StringComparison.Ordinal) ? $"hang in {PhaseGroup(r.Phase)}"
            : p.StartsWith("took", StringComparison.Ordinal) ? $"time limit in {PhaseGroup(r.SlowPhase)}"
            : p.StartsWith("the engine allocated", StringComparison.Ordinal) ? $"allocation limit in {PhaseGroup(r.HungryPhase)}"
            : p.Contains("modified", StringComparison.Ordinal) ? "file modified"
            : p;
    }

    private static void CheckFilesUnchanged(IReadOnlyList<WatchedFile> files, List<string> problems, string when)
    {
        foreach (var f in files)
        {
            if (f.Changed() is { } what)
                problems.Add($"{Path.GetFileName(f.Path)} was modified {when} ({what})");
        }
    }

    // ------------------------------------------------------------------ read-only case

    /// <summary>
    /// Opens <paramref name="path"/> read-only (backing files may not leave the folder), reads the
    /// whole guest range in 64 KiB chunks, asks for the allocation map of the whole range, and runs
    /// the engine's Check on qcow2 images. <paramref name="watched"/> must be unchanged afterwards.
    /// </summary>
    public static CaseResult RunReadOnly(string path, IReadOnlyList<WatchedFile> watched, Random rng)
    {
        var buffer = new byte[ChunkSize];
        string outcome = "accepted";
        var r = RunBounded(m =>
        {
            using var img = m.Engine("open", () => DiskImage.Open(path, ReadOnlyOptions));
            ulong size = img.Size;
            foreach (var (off, len) in ReadPlan(size, rng))
                m.Engine($"read 0x{off:x}+{len}", () => img.Read(off, buffer.AsSpan(0, len)));
            var extents = m.Engine("allocation map", () => img.GetAllocation(0, size));
            CheckExtents(extents, 0, size);
            if (img is Qcow2Image q)
            {
                var check = m.Engine("check", () => q.Check());
                outcome = check.Corruptions > 0 ? "accepted, check finds corruption" : check.Leaks > 0 ? "accepted, check finds leaks" : "accepted, check clean";
            }
            else
            {
                outcome = $"accepted as {img.GetType().Name}";
            }
        });
        var problems = LimitProblems(r);
        if (!r.Finished)
            outcome = $"hung at {PhaseGroup(r.Phase)}";
        else if (r.Error is ImageFormatException)
            outcome = $"refused at {PhaseGroup(r.Phase)}";
        else if (r.Error is not null)
        {
            outcome = $"{(r.Error is HarnessCheckException ? "harness check failed" : "crashed")} at {PhaseGroup(r.Phase)}";
            problems.Add($"{(r.Error is HarnessCheckException ? "harness check" : "unexpected exception")} in phase '{r.Phase}': {Describe(r.Error)}");
        }
        if (r.Finished)
            CheckFilesUnchanged(watched, problems, "by a read-only open");
        return new CaseResult(problems.Count == 0 ? null : string.Join("\n      ", problems), outcome, r.Elapsed, r.Allocated, SignatureOf(r, problems));
    }

    /// <summary>A phase without its offsets ("read 0x10000+65536" is "read").</summary>
    public static string PhaseGroup(string phase)
    {
        foreach (var cut in new[] { " 0x", " (" })
        {
            int at = phase.IndexOf(cut, StringComparison.Ordinal);
            if (at >= 0)
                phase = phase[..at];
        }
        return phase;
    }

    /// <summary>64 KiB chunks over the whole guest; above <see cref="FullReadLimit"/>, the first 16 MiB, the last chunk and 256 random chunks.</summary>
    public static IEnumerable<(ulong Offset, int Length)> ReadPlan(ulong size, Random rng)
    {
        if (size <= FullReadLimit)
        {
            for (ulong off = 0; off < size; off += ChunkSize)
                yield return (off, (int)Math.Min(ChunkSize, size - off));
            yield break;
        }
        for (ulong off = 0; off < 16UL << 20; off += ChunkSize)
            yield return (off, ChunkSize);
        for (int i = 0; i < 256; i++)
        {
            ulong off = (ulong)rng.NextInt64((long)Math.Min(size / ChunkSize, long.MaxValue)) * ChunkSize;
            yield return (off, (int)Math.Min(ChunkSize, size - off));
        }
        ulong last = (size - 1) / ChunkSize * ChunkSize;
        yield return (last, (int)(size - last));
    }

    /// <summary>The allocation map must cover the range exactly, in order, without empty or overlapping extents.</summary>
    public static void CheckExtents(IReadOnlyList<Extent> extents, ulong offset, ulong length)
    {
        ulong at = offset;
        foreach (var e in extents)
        {
            if (e.Offset != at || e.Length == 0 || e.Length > offset + length - at)
                throw new HarnessCheckException($"GetAllocation({offset}, {length}) returned a bad extent {e} at position 0x{at:x} ({extents.Count} extents)");
            at += e.Length;
        }
        if (at != offset + length)
            throw new HarnessCheckException($"GetAllocation({offset}, {length}) covers only up to 0x{at:x}");
    }

    // ------------------------------------------------------------------ read-write case

    private enum OpKind { Write, Zero, Discard }

    private sealed record Op(OpKind Kind, ulong Offset, ulong Length, byte[]? Data);

    /// <summary>
    /// Opens <paramref name="path"/> read-write. If the open fails it must be with
    /// <see cref="ImageFormatException"/> and nothing may have changed. If it opens, the engine's
    /// Check runs and the guest is read; a few writes, zero writes, a discard and a flush follow. On
    /// an image that checked free of corruption and read without error they must all work, read
    /// back, and leave Check free of corruption;
    /// on a damaged one they may also fail with <see cref="ImageFormatException"/>.
    /// <paramref name="backing"/> (the other files of the folder) must never change.
    /// </summary>
    public static CaseResult RunReadWrite(string path, IReadOnlyList<WatchedFile> backing, Random rng)
    {
        string hashBefore = Hash(path);
        string outcome = "opened";
        bool openRefused = false;
        int patternSeed = rng.Next();
        var r = RunBounded(m =>
        {
            IBlockImage img;
            try
            {
                img = m.Engine("open read-write", () => DiskImage.Open(path, ReadWriteOptions));
            }
            catch (ImageFormatException)
            {
                openRefused = true;
                outcome = "open refused";
                return;
            }
            using (img)
            {
                // Sound = the engine's own check finds no corruption and the whole guest reads. (Check
                // looks at metadata only; a compressed cluster that does not inflate is found by reading.)
                bool clean = true;
                try
                {
                    if (img is Qcow2Image q)
                        clean = m.Engine("check before writing", () => q.Check()).Corruptions == 0;
                    var buffer = new byte[ChunkSize];
                    foreach (var (off, len) in ReadPlan(img.Size, new Random(patternSeed)))
                        m.Engine($"read before writing 0x{off:x}+{len}", () => img.Read(off, buffer.AsSpan(0, len)));
                }
                catch (ImageFormatException)
                {
                    clean = false;
                }
                outcome = clean ? "opened clean" : "opened corrupt";
                var ops = PlanOps(img, patternSeed);
                var done = new List<Op>();
                foreach (var op in ops)
                {
                    try
                    {
                        switch (op.Kind)
                        {
                            case OpKind.Write: m.Engine($"write 0x{op.Offset:x}+{op.Length}", () => img.Write(op.Offset, op.Data)); break;
                            case OpKind.Zero: m.Engine($"write zeroes 0x{op.Offset:x}+{op.Length}", () => img.WriteZeroes(op.Offset, op.Length)); break;
                            default: m.Engine($"discard 0x{op.Offset:x}+{op.Length}", () => img.Discard(op.Offset, op.Length)); break;
                        }
                        done.Add(op);
                    }
                    catch (ImageFormatException e) when (clean)
                    {
                        throw new HarnessCheckException($"{m.Phase} failed on an image whose check found no corruption and whose guest read without error", e);
                    }
                    catch (ImageFormatException)
                    {
                        outcome = "opened corrupt, a write was refused";
                        return;
                    }
                }
                m.Engine("flush", img.Flush);
                // Read-back is only owed by an image that was sound: writes to a damaged one may land on
                // its own tables (the engine has no metadata-overlap guard), which is garbage in, garbage out.
                if (clean)
                    VerifyOps(m, img, done);
                if (img is Qcow2Image q2 && clean)
                {
                    var after = m.Engine("check after writing", () => q2.Check());
                    if (after.Corruptions > 0)
                        throw new HarnessCheckException(
                            $"writes to an image whose check found no corruption left {after.Corruptions} corruptions: {string.Join(" | ", after.Problems.Take(6))}");
                }
                if (!clean)
                    outcome = "opened corrupt, writes done";
            }
        });
        var problems = LimitProblems(r);
        if (!r.Finished)
            outcome = $"hung at {PhaseGroup(r.Phase)}";
        if (r.Error is not null)
        {
            outcome = $"{(r.Error is HarnessCheckException ? "harness check failed" : "crashed")} at {PhaseGroup(r.Phase)}";
            problems.Add($"{(r.Error is HarnessCheckException ? "harness check" : "unexpected exception")} in phase '{r.Phase}': {Describe(r.Error)}");
        }
        if (r.Finished)
        {
            if (openRefused && Hash(path) != hashBefore)
                problems.Add("the image was modified although the read-write open failed");
            CheckFilesUnchanged(backing, problems, "through a read-write open of the image above it");
        }
        return new CaseResult(problems.Count == 0 ? null : string.Join("\n      ", problems), outcome, r.Elapsed, r.Allocated, SignatureOf(r, problems));
    }

    private static List<Op> PlanOps(IBlockImage img, int seed)
    {
        ulong size = img.Size;
        var ops = new List<Op>();
        if (size == 0)
            return ops;
        ulong cs = img is Qcow2Image q ? (ulong)q.ClusterSize : 4096;
        var rng = new Random(seed);
        byte[] Data(ulong len)
        {
            var b = new byte[len];
            rng.NextBytes(b);
            return b;
        }
        void Write(ulong off, ulong len)
        {
            off = Math.Min(off, size - 1);
            len = Math.Min(len, size - off);
            if (len > 0)
                ops.Add(new Op(OpKind.Write, off, len, Data(len)));
        }
        void Whole(OpKind kind, ulong off, ulong count)
        {
            off &= ~(cs - 1);
            if (off >= size)
                return;
            ops.Add(new Op(kind, off, Math.Min(count * cs, size - off), null));
        }
        Write(0, 4096 + 13);                                  // the start, over cluster boundaries for small clusters
        Write(size / 2 / cs * cs - 100, 300);                 // across a cluster boundary in the middle
        Whole(OpKind.Zero, size / 4 * 3, 1);                  // a zero cluster
        Whole(OpKind.Discard, size / 8 * 7, 1);               // a discarded cluster
        Write(size - Math.Min(size, 777), 777);               // the tail
        Write((ulong)rng.NextInt64((long)size), 1000);        // somewhere
        return ops;
    }

    private static void VerifyOps(Meter m, IBlockImage img, List<Op> ops)
    {
        for (int i = 0; i < ops.Count; i++)
        {
            var op = ops[i];
            if (op.Kind == OpKind.Discard)
                continue;
            ulong len = Math.Min(op.Length, 8192);
            var got = new byte[len];
            m.Engine($"read back 0x{op.Offset:x}+{len}", () => img.Read(op.Offset, got));
            for (ulong j = 0; j < len; j++)
            {
                ulong at = op.Offset + j;
                // The last operation that covers this byte decides what it should read as.
                Op? last = null;
                for (int k = ops.Count - 1; k >= i && last is null; k--)
                    if (at >= ops[k].Offset && at - ops[k].Offset < ops[k].Length)
                        last = ops[k];
                if (last is null || last.Kind == OpKind.Discard)
                    continue;
                byte want = last.Kind == OpKind.Zero ? (byte)0 : last.Data![at - last.Offset];
                if (got[j] != want)
                    throw new HarnessCheckException(
                        $"after {last.Kind} 0x{last.Offset:x}+{last.Length}, guest byte 0x{at:x} reads 0x{got[j]:x2}, expected 0x{want:x2}");
            }
        }
    }
}
