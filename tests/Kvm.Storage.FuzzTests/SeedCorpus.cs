using System.Globalization;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;

namespace Kvm.Storage.FuzzTests;

/// <summary>
/// A valid image to damage: <see cref="Main"/> is mutated; <see cref="Others"/> (backing files)
/// sit in the same folder and are never changed.
/// </summary>
public sealed record Seed(string Name, string Folder, string Main, IReadOnlyList<string> Others)
{
    public byte[] Bytes() => File.ReadAllBytes(Main);

    public override string ToString() => Name;
}

/// <summary>Small valid images, made by the engine (<see cref="Qcow2Image.Create"/>) and by qemu-img/qemu-io.</summary>
public static class SeedCorpus
{
    public const ulong KiB = 1024, MiB = 1024 * 1024;

    /// <summary>A fixed pseudo-random pattern, so that seeds come out the same every run.</summary>
    public static byte[] Pattern(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>Engine-made seeds: cluster sizes 512, 4096 and 65536; refcount widths 1, 16 and 64; data, zero clusters, a backing file.</summary>
    public static IReadOnlyList<Seed> MakeEngineSeeds(string root)
    {
        var seeds = new List<Seed>
        {
            Engine(root, "e512-r16", 512, 16, 4 * MiB),
            Engine(root, "e512-r1", 512, 1, 1 * MiB),
            Engine(root, "e4k-r1", 4096, 1, 8 * MiB),
            Engine(root, "e4k-r64", 4096, 64, 4 * MiB),
            Engine(root, "e64k-r16", 65536, 16, 4 * MiB),
            Engine(root, "e64k-r64", 65536, 64, 2 * MiB),
            Engine(root, "e64k-r1", 65536, 1, 3 * MiB + 12345),
            EngineWithBacking(root, "e64k-backing", 65536, 16),
            EngineWithBacking(root, "e4k-backing-raw", 4096, 16, rawBase: true),
        };
        return seeds;
    }

    private static Seed Engine(string root, string name, int clusterSize, int refcountBits, ulong size)
    {
        var folder = Directory.CreateDirectory(Path.Combine(root, name)).FullName;
        var path = Path.Combine(folder, "image.qcow2");
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize, RefcountBits = refcountBits }))
            FillWorkload(img, StableHash(name));
        return new Seed(name, folder, path, []);
    }

    /// <summary>Writes spread across the image (several L2 tables), partial clusters, zero clusters and a discard.</summary>
    private static void FillWorkload(IBlockImage img, int seed)
    {
        var rng = new Random(seed);
        ulong cs = img is Qcow2Image q ? (ulong)q.ClusterSize : 4096;
        ulong size = img.Size;
        var writes = new List<(ulong Offset, int Length)>
        {
            (0, (int)Math.Min(3 * cs + 100, size)),
            (size / 2 - 700, 1500),
            (size - 4096, 4096),
        };
        for (int i = 0; i < 6; i++)
            writes.Add(((ulong)rng.NextInt64((long)(size - 8192)), rng.Next(1, 8192)));
        foreach (var (off, len) in writes)
            img.Write(off, Pattern(len, (int)off));
        // Zero clusters: over allocated data (the zero flag replaces the mapping) and over empty space.
        ulong z = (size / 2 - 700) & ~(cs - 1);
        img.WriteZeroes(z, cs);
        img.WriteZeroes(size / 4 & ~(cs - 1), 2 * cs);
        img.Discard(cs, cs);
        img.Flush();
    }

    private static Seed EngineWithBacking(string root, string name, int clusterSize, int refcountBits, bool rawBase = false)
    {
        var folder = Directory.CreateDirectory(Path.Combine(root, name)).FullName;
        ulong size = 2 * MiB;
        string baseName = rawBase ? "base.raw" : "base.qcow2";
        var basePath = Path.Combine(folder, baseName);
        if (rawBase)
        {
            var data = Pattern((int)(size - 8192), 77); // shorter than the overlay
            File.WriteAllBytes(basePath, data);
        }
        else
        {
            using var b = Qcow2Image.Create(basePath, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize, RefcountBits = refcountBits });
            b.Write(0, Pattern((int)size, 78));
        }
        var path = Path.Combine(folder, "image.qcow2");
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions
               {
                   Size = size + (ulong)clusterSize * 3, // larger than the base: the tail reads as zeros
                   ClusterSize = clusterSize,
                   RefcountBits = refcountBits,
                   BackingFile = baseName,
                   BackingFormat = rawBase ? "raw" : "qcow2",
               }))
        {
            img.Write(100, Pattern(300, 1)); // partial cluster: the rest is copied from the base
            img.Write((ulong)clusterSize * 5 + 17, Pattern(clusterSize, 2));
            img.WriteZeroes((ulong)clusterSize * 9, (ulong)clusterSize * 2); // zero clusters over base data
            img.Discard((ulong)clusterSize * 12, (ulong)clusterSize);
            img.Flush();
        }
        return new Seed(name, folder, path, [basePath]);
    }

    /// <summary>
    /// qemu-made seeds: qemu-img create with 512-byte, 64 KiB and 2 MiB clusters, qemu-io writes and
    /// zero writes, a version 2 image, compressed clusters (qemu-img convert -c), internal snapshots
    /// (qemu-img snapshot -c), and an overlay on a backing file.
    /// </summary>
    public static IReadOnlyList<Seed> MakeQemuSeeds(string root)
    {
        var seeds = new List<Seed>();

        Seed Plain(string name, int cs, ulong size, string[] io, string[]? extra = null)
        {
            var folder = Directory.CreateDirectory(Path.Combine(root, name)).FullName;
            var path = Path.Combine(folder, "image.qcow2");
            Qemu.Create(path, size, cs, extra);
            Qemu.Io(path, io);
            return new Seed(name, folder, path, []);
        }

        seeds.Add(Plain("q512", 512, 1 * MiB, ["write -P 0x11 0 5k", "write -P 0x12 300k 1k", "write -z 2k 1k", "write -P 0x13 1000k 24k", "write -z 1000k 1k"]));
        seeds.Add(Plain("q64k", 65536, 4 * MiB, ["write -P 0x21 0 128k", "write -P 0x22 1M 100k", "write -z 1M 64k", "write -P 0x23 3M 65k", "discard 3M 64k"]));
        seeds.Add(Plain("q2m", 2 << 20, 8 * MiB, ["write -P 0x31 0 64k", "write -P 0x32 4M 100k", "write -z 6M 2M"]));
        seeds.Add(Plain("q64k-v2", 65536, 2 * MiB, ["write -P 0x41 0 70k", "write -P 0x42 1M 4k"], ["compat=0.10"]));
        seeds.Add(Plain("q4k-r1", 4096, 2 * MiB, ["write -P 0x51 0 20k", "write -P 0x52 1M 8k", "write -z 4k 4k"], ["refcount_bits=1"]));

        // Compressed clusters.
        {
            var folder = Directory.CreateDirectory(Path.Combine(root, "q-compressed")).FullName;
            var raw = Path.Combine(root, "compress-source.raw");
            var content = new byte[2 * MiB];
            for (int i = 0; i < content.Length; i += 4096)
                Array.Fill(content, (byte)(i / 4096 % 7 == 0 ? 0 : i / 4096 + 1), i, 2048); // compressible, some zero clusters
            Pattern(8192, 5).CopyTo(content, 70000); // and some that do not compress
            File.WriteAllBytes(raw, content);
            var path = Path.Combine(folder, "image.qcow2");
            Qemu.Run("qemu-img", ["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, path]);
            seeds.Add(new Seed("q-compressed", folder, path, []));

            var folder64 = Directory.CreateDirectory(Path.Combine(root, "q-compressed-64k")).FullName;
            var path64 = Path.Combine(folder64, "image.qcow2");
            Qemu.Run("qemu-img", ["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, path64]);
            Qemu.Io(path64, ["write -P 0x61 128k 4k"]); // a plain cluster among compressed ones
            seeds.Add(new Seed("q-compressed-64k", folder64, path64, []));
        }

        // Internal snapshots.
        {
            var s = Plain("q-snapshots", 4096, 1 * MiB, ["write -P 0x71 0 16k", "write -P 0x72 512k 8k"]);
            Qemu.Run("qemu-img", ["snapshot", "-c", "first", s.Main]);
            Qemu.Io(s.Main, ["write -P 0x73 4k 8k", "write -z 512k 4k"]);
            Qemu.Run("qemu-img", ["snapshot", "-c", "second", s.Main]);
            Qemu.Io(s.Main, ["write -P 0x74 900k 4k", "discard 0 4k"]);
            seeds.Add(s);
        }

        // Backing chain.
        {
            var folder = Directory.CreateDirectory(Path.Combine(root, "q-backing")).FullName;
            var basePath = Path.Combine(folder, "base.qcow2");
            Qemu.Create(basePath, 2 * MiB, 65536);
            Qemu.Io(basePath, ["write -P 0x81 0 2M"]);
            var path = Path.Combine(folder, "image.qcow2");
            Qemu.Run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.qcow2", "-F", "qcow2", path, "3M"]);
            Qemu.Io(path, ["write -P 0x82 100 300", "write -z 512k 128k", "write -P 0x83 2M 64k"]);
            seeds.Add(new Seed("q-backing", folder, path, [basePath]));
        }
        return seeds;
    }

    /// <summary>A hash of a string that is the same in every process (string.GetHashCode is not).</summary>
    public static int StableHash(string s)
    {
        unchecked
        {
            uint h = 2166136261;
            foreach (char c in s)
                h = (h ^ c) * 16777619;
            return (int)(h & 0x7fffffff);
        }
    }
}

/// <summary>qemu-img and qemu-io, for making seeds.</summary>
public static class Qemu
{
    public static void Require()
    {
        TestEnvironment.RequireProgram("qemu-img", "qemu-utils");
        TestEnvironment.RequireProgram("qemu-io", "qemu-utils");
    }

    public static void Create(string path, ulong size, int clusterSize, string[]? extra = null)
    {
        var options = new List<string> { $"cluster_size={clusterSize}" };
        if (extra is not null)
            options.AddRange(extra);
        Run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", string.Join(',', options), path, size.ToString(CultureInfo.InvariantCulture)]);
    }

    public static void Io(string path, string[] commands)
    {
        var args = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
            args.AddRange(["-c", c]);
        args.Add(path);
        Run("qemu-io", args);
    }

    /// <summary>qemu-img check's exit code (0 clean, 2 corrupt, 3 leaks) and output.</summary>
    public static ProcessResult Check(string path) =>
        TestEnvironment.RunProcess("qemu-img", ["check", "-f", "qcow2", path], TimeSpan.FromMinutes(1));

    public static ProcessResult Run(string program, IEnumerable<string> args)
    {
        var list = args.ToList();
        var r = TestEnvironment.RunProcess(program, list, TimeSpan.FromMinutes(2));
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"{program} {string.Join(' ', list)} failed with exit code {r.ExitCode}: {r.Stderr}{r.Stdout}");
        return r;
    }
}
