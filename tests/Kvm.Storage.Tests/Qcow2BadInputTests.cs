using System.Buffers.Binary;
using Kvm.Storage.Qcow2;
using static Kvm.Storage.Tests.Qcow2TestKit;

namespace Kvm.Storage.Tests;

/// <summary>
/// Malformed images end in an <see cref="ImageFormatException"/> that names the field and its value,
/// without crashing, hanging or allocating without bound, and without touching the file.
/// </summary>
public sealed class Qcow2BadInputTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>A small valid image with data, for the cases to damage.</summary>
    private string GoodImage(string name = "good.qcow2")
    {
        var path = _dir.File(name);
        QemuImg.Create(path, "qcow2", 4 * MiB);
        QemuImg.Io(path, "qcow2", "write -P 0x21 0 128k", "write -P 0x22 3M 64k");
        return path;
    }

    /// <summary>Opens the image every way (writable, read-only, through DiskImage unless told not to) and expects refusal each time.</summary>
    private static ImageFormatException AssertRefused(string path, ImageOpenOptions? options = null, bool viaDiskImage = true, params string[] otherFiles)
    {
        var files = otherFiles.Prepend(path).ToArray();
        var hashes = files.Select(Hash).ToArray();
        var before = GC.GetAllocatedBytesForCurrentThread();
        var baseOptions = options ?? new ImageOpenOptions();
        ImageFormatException? first = null;
        foreach (var opts in new[] { baseOptions with { ReadOnly = false }, baseOptions with { ReadOnly = true } })
        {
            var e = Assert.Throws<ImageFormatException>(() => Qcow2Image.Open(path, opts).Dispose());
            first ??= e;
            if (viaDiskImage)
                Assert.Throws<ImageFormatException>(() => DiskImage.Open(path, opts).Dispose());
        }
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.True(allocated < 64L << 20, $"refusing a bad image allocated {allocated} bytes");
        for (var i = 0; i < files.Length; i++)
            Assert.True(hashes[i] == Hash(files[i]), $"{files[i]} was modified by a failed open");
        return first!;
    }

    [SkippableFact]
    public void TruncatedHeader()
    {
        QemuImg.Require();
        var path = GoodImage();
        using (var f = new FileStream(path, FileMode.Open))
            f.SetLength(60);
        var e = AssertRefused(path, viaDiskImage: true);
        AssertNames(e, ["header", "truncated"], 60);
    }

    [SkippableFact]
    public void TruncatedVersion3Header()
    {
        QemuImg.Require();
        var path = GoodImage();
        using (var f = new FileStream(path, FileMode.Open))
            f.SetLength(80);
        AssertNames(AssertRefused(path), ["header", "truncated"], 80);
    }

    [SkippableFact]
    public void BadMagic()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.Magic, 0x12345678, 4);
        // DiskImage would take it for a raw image, which is right: only Qcow2Image.Open insists.
        AssertNames(AssertRefused(path, viaDiskImage: false), ["magic"], 0x12345678);
    }

    [SkippableFact]
    public void UnsupportedVersion()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.Version, 4, 4);
        AssertNames(AssertRefused(path), ["version"], 4);
    }

    [SkippableFact]
    public void UnknownIncompatibleFeatureBit()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.IncompatibleFeatures, 1UL << 40, 8);
        var e = AssertRefused(path);
        AssertNames(e, ["incompatible"], 1UL << 40, 40);
    }

    [SkippableFact]
    public void CorruptBit_RefusesWritableOpen()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.IncompatibleFeatures, 2, 8); // bit 1: corrupt
        var hash = Hash(path);
        var e = Assert.Throws<ImageFormatException>(() => Qcow2Image.Open(path).Dispose());
        AssertNames(e, ["corrupt"]);
        Assert.Throws<ImageFormatException>(() => DiskImage.Open(path).Dispose());
        Assert.Equal(hash, Hash(path));
    }

    [SkippableFact]
    public void ClusterBitsOutOfRange()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.ClusterBits, 31, 4);
        AssertNames(AssertRefused(path), ["cluster_bits", "cluster bits", "cluster size"], 31, 1UL << 31);
    }

    [SkippableFact]
    public void RefcountOrderOutOfRange()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.RefcountOrder, 7, 4);
        AssertNames(AssertRefused(path), ["refcount_order", "refcount order", "refcount bits", "refcount width"], 7, 128);
    }

    [SkippableFact]
    public void L1TableOffsetPastTheEndOfTheFile()
    {
        QemuImg.Require();
        var path = GoodImage();
        var bogus = (ulong)new FileInfo(path).Length + 100 * 65536;
        Poke(path, Field.L1TableOffset, bogus, 8);
        AssertNames(AssertRefused(path), ["l1_table_offset", "l1 table offset", "l1 table"], bogus);
    }

    [SkippableFact]
    public void L1TableOffsetUnaligned()
    {
        QemuImg.Require();
        var path = GoodImage();
        var at = ReadField(path, Field.L1TableOffset, 8) + 8;
        Poke(path, Field.L1TableOffset, at, 8);
        AssertNames(AssertRefused(path), ["l1_table_offset", "l1 table offset", "l1 table"], at);
    }

    [SkippableTheory]
    [InlineData(0x1000_0000UL)] // 2 GiB of L1 table
    [InlineData(0xFFFF_FFFFUL)]
    public void HugeL1Size(ulong l1Size)
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.L1Size, l1Size, 4);
        AssertNames(AssertRefused(path), ["l1_size", "l1 size", "l1 table size", "l1 entries"], l1Size, unchecked((ulong)(int)l1Size));
    }

    [SkippableFact]
    public void L1SizeTooSmallForTheVirtualSize()
    {
        QemuImg.Require();
        var path = GoodImage();
        // 4 MiB with 64 KiB clusters needs 1 L1 entry; claim 1 TiB of guest size instead.
        Poke(path, Field.Size, 1UL << 40, 8);
        AssertNames(AssertRefused(path), ["l1_size", "l1 size", "size"], 1UL << 40, 1);
    }

    [SkippableTheory]
    [InlineData(0UL)]      // on top of the header
    [InlineData(512UL)]    // inside the header cluster, unaligned
    public void RefcountTableOverlappingTheHeader(ulong offset)
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.RefcountTableOffset, offset, 8);
        AssertNames(AssertRefused(path), ["refcount_table_offset", "refcount table offset", "refcount table"], offset);
    }

    [SkippableFact]
    public void RefcountTablePastTheEndOfTheFile()
    {
        QemuImg.Require();
        var path = GoodImage();
        var bogus = 1UL << 40;
        Poke(path, Field.RefcountTableOffset, bogus, 8);
        AssertNames(AssertRefused(path), ["refcount_table_offset", "refcount table offset", "refcount table"], bogus);
    }

    [SkippableFact]
    public void HugeRefcountTableClusters()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.RefcountTableClusters, 0x4000_0000, 4);
        AssertNames(AssertRefused(path), ["refcount_table_clusters", "refcount table clusters", "refcount table"], 0x4000_0000);
    }

    [SkippableFact]
    public void SnapshotTablePastTheEndOfTheFile()
    {
        QemuImg.Require();
        var path = GoodImage();
        Poke(path, Field.NbSnapshots, 3, 4);
        Poke(path, Field.SnapshotsOffset, 1UL << 40, 8);
        AssertNames(AssertRefused(path), ["snapshots_offset", "snapshots offset", "snapshot table", "snapshot"], 1UL << 40);
    }

    [SkippableFact]
    public void BackingFileNameOutsideTheHeaderCluster()
    {
        QemuImg.Require();
        GoodImage("base.qcow2");
        var path = _dir.File("child.qcow2");
        QemuImg.Create(path, "qcow2", 4 * MiB, backing: "base.qcow2", backingFormat: "qcow2");
        Poke(path, Field.BackingFileSize, 1_000_000, 4);
        AssertNames(AssertRefused(path), ["backing_file_size", "backing file size", "backing file name", "backing"], 1_000_000);
    }

    [SkippableFact]
    public void L2EntryPastTheEndOfTheFile_IsRefusedWhenRead()
    {
        QemuImg.Require();
        var path = GoodImage();
        // The first L2 table maps guest cluster 0 (written above); point it far past the end of the file.
        var l1 = ReadField(path, Field.L1TableOffset, 8);
        var l2 = ReadField(path, (int)l1, 8) & 0x00ff_ffff_ffff_fe00UL;
        var bogus = 1UL << 40;
        Poke(path, (long)l2, bogus | (1UL << 63), 8);
        var hash = Hash(path);
        foreach (var readOnly in new[] { true, false })
        {
            var e = Assert.Throws<ImageFormatException>(() =>
            {
                using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = readOnly });
                img.Read(0, new byte[4096]);
            });
            AssertNames(e, ["l2", "host offset", "offset"], bogus);
        }
        Assert.Equal(hash, Hash(path));
    }

    [SkippableFact]
    public void L2TableOffsetPastTheEndOfTheFile_IsRefusedWhenRead()
    {
        QemuImg.Require();
        var path = GoodImage();
        var l1 = ReadField(path, Field.L1TableOffset, 8);
        var bogus = 1UL << 40;
        Poke(path, (long)l1, bogus | (1UL << 63), 8);
        var hash = Hash(path);
        foreach (var readOnly in new[] { true, false })
        {
            var e = Assert.Throws<ImageFormatException>(() =>
            {
                using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = readOnly });
                img.Read(0, new byte[4096]);
            });
            AssertNames(e, ["l1", "l2", "offset"], bogus);
        }
        Assert.Equal(hash, Hash(path));
    }

    [SkippableFact]
    public void BackingChainThatLoops()
    {
        QemuImg.Require();
        var a = _dir.File("a.qcow2");
        var b = _dir.File("b.qcow2");
        QemuImg.Create(a, "qcow2", 4 * MiB);
        QemuImg.Create(b, "qcow2", 4 * MiB, backing: "a.qcow2", backingFormat: "qcow2");
        QemuImg.Run("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a); // a -> b -> a
        var e = AssertRefused(b, otherFiles: [a]);
        AssertNames(e, ["backing", "loop"]);
        Assert.True(e.Message.Contains("a.qcow2") || e.Message.Contains("b.qcow2"), e.Message);
    }

    [SkippableFact]
    public void BackingChainThatLoopsOntoItself()
    {
        QemuImg.Require();
        var a = _dir.File("self.qcow2");
        QemuImg.Create(a, "qcow2", 4 * MiB);
        QemuImg.Run("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", a);
        var e = AssertRefused(a);
        AssertNames(e, ["backing", "loop"]);
        Assert.Contains("self.qcow2", e.Message);
    }

    [SkippableFact]
    public void MissingBackingFile()
    {
        QemuImg.Require();
        GoodImage("base.qcow2");
        var child = _dir.File("child.qcow2");
        QemuImg.Create(child, "qcow2", 4 * MiB, backing: "base.qcow2", backingFormat: "qcow2");
        File.Delete(_dir.File("base.qcow2"));
        AssertNames(AssertRefused(child), ["backing", "no such file", "not found"]);
    }

    [SkippableTheory]
    [InlineData("../base.qcow2")]
    [InlineData("sub/../../base.qcow2")]
    [InlineData("ABSOLUTE")]
    public void BackingNameOutsideTheFolder_WhenDisallowed(string backingName)
    {
        QemuImg.Require();
        var basePath = GoodImage("base.qcow2");
        var child = _dir.File("vm/child.qcow2");
        if (backingName == "ABSOLUTE")
            backingName = basePath;
        Directory.CreateDirectory(_dir.File("vm/sub"));
        QemuImg.Create(child, "qcow2", 4 * MiB, backing: backingName, backingFormat: "qcow2");

        var e = AssertRefused(child, new ImageOpenOptions { AllowBackingOutsideFolder = false }, otherFiles: [basePath]);
        AssertNames(e, ["backing"]);
        Assert.Contains(backingName, e.Message);

        // The same chain opens when allowed, so the refusal above is the option's doing.
        using var img = Qcow2Image.Open(child, new ImageOpenOptions { ReadOnly = true });
        var b = new byte[1];
        img.Read(0, b);
        Assert.Equal(0x21, b[0]);
    }

    [SkippableFact]
    public void BackingNameInsideTheFolder_IsAllowedWhenEscapesAreNot()
    {
        QemuImg.Require();
        var basePath = _dir.File("vm/base/base.qcow2");
        QemuImg.Create(basePath, "qcow2", 4 * MiB);
        QemuImg.Io(basePath, "qcow2", "write -P 0x33 0 4k");
        var child = _dir.File("vm/child.qcow2");
        QemuImg.Create(child, "qcow2", 4 * MiB, backing: "base/base.qcow2", backingFormat: "qcow2");
        using var img = Qcow2Image.Open(child, new ImageOpenOptions { ReadOnly = true, AllowBackingOutsideFolder = false });
        var b = new byte[1];
        img.Read(0, b);
        Assert.Equal(0x33, b[0]);
    }

    /// <summary>
    /// Random damage to the header, L1, refcount and L2 tables: every open either works or throws
    /// ImageFormatException, within seconds and bounded memory, and a read-only open never changes the file.
    /// </summary>
    [SkippableFact]
    public void Fuzz_HeaderAndTables()
    {
        QemuImg.Require();
        var good = GoodImage();
        QemuImg.Io(good, "qcow2", "write -z 1M 128k");
        var pristine = File.ReadAllBytes(good);
        var l1 = (int)BinaryPrimitives.ReadUInt64BigEndian(pristine.AsSpan(Field.L1TableOffset));
        var rt = (int)BinaryPrimitives.ReadUInt64BigEndian(pristine.AsSpan(Field.RefcountTableOffset));
        var rb = (int)(BinaryPrimitives.ReadUInt64BigEndian(pristine.AsSpan(rt)) & ~0x1FFUL);
        var l2 = (int)(BinaryPrimitives.ReadUInt64BigEndian(pristine.AsSpan(l1)) & 0x00ff_ffff_ffff_fe00UL);
        var regions = new (string Name, int Start, int Length)[]
        {
            ("header", 0, 112), ("header extensions", 112, 400), ("L1", l1, 16), ("refcount table", rt, 16),
            ("refcount block", rb, 32), ("L2", l2, 64),
        };
        var rng = new Random(12345);
        var path = _dir.File("fuzz.qcow2");
        var failures = new List<string>();
        for (var iter = 0; iter < 400 && failures.Count < 5; iter++)
        {
            var bytes = (byte[])pristine.Clone();
            var what = new List<string>();
            var mutations = 1 + rng.Next(4);
            for (var m = 0; m < mutations; m++)
            {
                var (name, start, length) = regions[rng.Next(regions.Length)];
                var at = start + rng.Next(length);
                var value = rng.Next(4) switch
                {
                    0 => (byte)rng.Next(256),
                    1 => (byte)0xFF,
                    2 => (byte)0,
                    _ => (byte)(bytes[at] ^ (1 << rng.Next(8))),
                };
                what.Add($"{name} byte {at}: 0x{bytes[at]:x2} -> 0x{value:x2}");
                bytes[at] = value;
            }
            if (rng.Next(10) == 0)
            {
                var len = rng.Next(bytes.Length);
                Array.Resize(ref bytes, len);
                what.Add($"truncated to {len}");
            }
            File.WriteAllBytes(path, bytes);
            var hash = Hash(path);
            var outcome = RunBounded(() =>
            {
                try
                {
                    using var img = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = true });
                    var buf = new byte[img.Size > 64 * MiB ? 64 * 1024 : (int)img.Size];
                    img.Read(0, buf);
                    img.GetAllocation(0, img.Size);
                    return "opened";
                }
                catch (ImageFormatException)
                {
                    return "refused";
                }
            });
            if (outcome is not ("opened" or "refused"))
                failures.Add($"iteration {iter} ({string.Join("; ", what)}): {outcome}");
            else if (Hash(path) != hash)
                failures.Add($"iteration {iter} ({string.Join("; ", what)}): a read-only open changed the file");
            else
            {
                var writable = RunBounded(() =>
                {
                    try
                    {
                        Qcow2Image.Open(path).Dispose();
                        return "opened";
                    }
                    catch (ImageFormatException)
                    {
                        return Hash(path) == hash ? "refused" : "refused, but the file was modified";
                    }
                });
                if (writable is not ("opened" or "refused"))
                    failures.Add($"iteration {iter} ({string.Join("; ", what)}), writable: {writable}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    /// <summary>Runs <paramref name="body"/> with a time limit and an allocation limit; returns its result or what went wrong.</summary>
    private static string RunBounded(Func<string> body)
    {
        var task = Task.Factory.StartNew(() =>
        {
            var before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                var r = body();
                var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
                return allocated > 256L << 20 ? $"{r}, but allocated {allocated} bytes" : r;
            }
            catch (Exception e)
            {
                return $"threw {e.GetType().Name}: {e.Message}";
            }
        }, TaskCreationOptions.LongRunning);
        return task.Wait(TimeSpan.FromSeconds(20)) ? task.Result : "did not finish within 20 s (hang?)";
    }
}
