using System.Diagnostics;
using System.Text.Json;

namespace Kvm.Tests.Shared;

/// <summary>
/// Reads a persistent dirty bitmap the way qemu sees it: <c>qemu-nbd -B NAME</c> exports the image
/// with the bitmap as a block-status context, and <c>qemu-img map</c> with <c>x-dirty-bitmap</c>
/// reports it (a range the bitmap marks dirty shows as "data": false). qemu checks the bitmap's
/// directory entry, table and data when it opens it, so a bitmap qemu does not accept fails here.
/// </summary>
public static class QemuDirtyBitmap
{
    private static readonly TimeSpan Timeout = TimeSpan.FromMinutes(2);

    /// <summary>Skips the calling test unless qemu-nbd and qemu-img are installed.</summary>
    public static void Require()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("qemu-nbd", "qemu-utils");
    }

    /// <summary>The dirty ranges of bitmap <paramref name="bitmap"/> in a qcow2 image, merged, in bytes.</summary>
    public static IReadOnlyList<(ulong Offset, ulong Length)> DirtyRanges(string image, string bitmap)
    {
        string dir = Directory.CreateTempSubdirectory("qemu-nbd-").FullName;
        string socket = Path.Combine(dir, "nbd.sock");
        try
        {
            // Without --persistent, qemu-nbd serves one client and exits.
            using var nbd = TestEnvironment.StartRedirected("qemu-nbd",
                ["--read-only", "--format=qcow2", "--socket", socket, "--bitmap", bitmap, image]);
            var stderr = nbd.StandardError.ReadToEndAsync();
            var sw = Stopwatch.StartNew();
            while (!File.Exists(socket))
            {
                if (nbd.HasExited)
                    throw new InvalidOperationException($"qemu-nbd --bitmap {bitmap} {image} exited with {nbd.ExitCode}: {stderr.Result.Trim()}");
                if (sw.Elapsed > Timeout)
                    throw new TimeoutException($"qemu-nbd did not create {socket} within {Timeout}");
                Thread.Sleep(20);
            }
            // The socket file exists from bind(2) on; a connection before listen(2) is refused: retry.
            ProcessResult r;
            int attempt = 0;
            do
            {
                if (attempt++ > 0)
                    Thread.Sleep(100);
                r = TestEnvironment.RunProcess("qemu-img",
                    ["map", "--output=json", "--image-opts",
                     $"driver=nbd,server.type=unix,server.path={socket},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"], Timeout);
            }
            while (r.ExitCode != 0 && r.Stderr.Contains("refused", StringComparison.OrdinalIgnoreCase) && attempt < 20);
            if (r.ExitCode != 0)
                throw new InvalidOperationException($"qemu-img map of bitmap {bitmap} in {image} exited with {r.ExitCode}: {r.Stderr.Trim()}");
            if (!nbd.WaitForExit(Timeout))
                nbd.Kill();
            var list = new List<(ulong Offset, ulong Length)>();
            using var doc = JsonDocument.Parse(r.Stdout);
            foreach (var e in doc.RootElement.EnumerateArray())
            {
                if (e.GetProperty("data").GetBoolean())
                    continue;
                ulong start = e.GetProperty("start").GetUInt64(), length = e.GetProperty("length").GetUInt64();
                if (list.Count > 0 && list[^1].Offset + list[^1].Length == start)
                    list[^1] = (list[^1].Offset, list[^1].Length + length);
                else
                    list.Add((start, length));
            }
            return list;
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>The ranges a set of writes dirties at a granularity: every granule a write touches, merged, clipped to the disk size.</summary>
    public static IReadOnlyList<(ulong Offset, ulong Length)> Expected(IEnumerable<(ulong Offset, ulong Length)> writes, ulong granularity, ulong diskSize)
    {
        var granules = new SortedSet<ulong>();
        foreach (var (offset, length) in writes)
        {
            if (length == 0)
                continue;
            for (ulong g = offset / granularity; g <= (offset + length - 1) / granularity; g++)
                granules.Add(g);
        }
        var list = new List<(ulong Offset, ulong Length)>();
        foreach (ulong g in granules)
        {
            ulong start = g * granularity, end = Math.Min(diskSize, start + granularity);
            if (list.Count > 0 && list[^1].Offset + list[^1].Length == start)
                list[^1] = (list[^1].Offset, end - list[^1].Offset);
            else
                list.Add((start, end - start));
        }
        return list;
    }
}
