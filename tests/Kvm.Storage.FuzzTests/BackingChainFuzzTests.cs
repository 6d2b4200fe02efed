using System.Text;
using Kvm.Storage.Qcow2;
using Xunit.Abstractions;

namespace Kvm.Storage.FuzzTests;

/// <summary>
/// Backing chains that loop (an image backed by itself, two images backing each other, longer
/// cycles, through a symlink), backing names that climb out of the folder with "..", absolute
/// names elsewhere, names of folders, over-long names and chains deeper than allowed. Every open
/// is with AllowBackingOutsideFolder = false; each case runs read-only and read-write under the
/// same pass criteria as the mutation fuzzer, and must end as expected: refused or accepted.
/// </summary>
public sealed class BackingChainFuzzTests(ITestOutputHelper output)
{
    private enum Expect { Refused, Accepted, Either }

    /// <summary>One image of a case: its file name, and the backing name (raw bytes) and format its header holds.</summary>
    private sealed record Layer(string File, byte[]? BackingName, string? Format = null);

    private sealed record ChainCase(string Title, Expect Expect, Layer[] Layers, string? Open = null, Action<string>? Prepare = null)
    {
        public string OpenFile => Open ?? Layers[0].File;
    }

    private static byte[] N(string s) => Encoding.UTF8.GetBytes(s);

    private static IEnumerable<ChainCase> Cases(string folder)
    {
        string folderName = Path.GetFileName(folder);
        string self = Path.Combine(folder, "a.qcow2");
        yield return new("backed by itself", Expect.Refused, [new("a.qcow2", N("a.qcow2"))]);
        yield return new("backed by itself via ./", Expect.Refused, [new("a.qcow2", N("./a.qcow2"))]);
        yield return new("backed by itself, absolute name", Expect.Refused, [new("a.qcow2", N(self))]);
        yield return new("backed by itself as raw", Expect.Refused, [new("a.qcow2", N("a.qcow2"), "raw")]);
        yield return new("backed by itself as qcow2", Expect.Refused, [new("a.qcow2", N("a.qcow2"), "qcow2")]);
        yield return new("backed by itself via sub/..", Expect.Refused, [new("a.qcow2", N("sub/../a.qcow2"))]);
        yield return new("backed by itself via ../<folder>/", Expect.Refused, [new("a.qcow2", N($"../{folderName}/a.qcow2"))]);
        yield return new("backed by itself via a doubled slash", Expect.Refused, [new("a.qcow2", N(".//a.qcow2"))]);
        yield return new("two images back each other (open a)", Expect.Refused, [new("a.qcow2", N("b.qcow2")), new("b.qcow2", N("a.qcow2"))]);
        yield return new("two images back each other (open b)", Expect.Refused, [new("a.qcow2", N("b.qcow2")), new("b.qcow2", N("a.qcow2"))], "b.qcow2");
        yield return new("two images back each other, formats named", Expect.Refused, [new("a.qcow2", N("b.qcow2"), "qcow2"), new("b.qcow2", N("a.qcow2"), "qcow2")]);
        yield return new("three-image cycle", Expect.Refused, [new("a.qcow2", N("b.qcow2")), new("b.qcow2", N("c.qcow2")), new("c.qcow2", N("a.qcow2"))]);
        yield return new("loop below a good top", Expect.Refused, [new("top.qcow2", N("a.qcow2")), new("a.qcow2", N("b.qcow2")), new("b.qcow2", N("a.qcow2"))], "top.qcow2");
        yield return new("loop through a symlink", Expect.Refused, [new("a.qcow2", N("link.qcow2"))],
            Prepare: f => File.CreateSymbolicLink(Path.Combine(f, "link.qcow2"), "a.qcow2"));
        yield return new("symlink loop (link to itself)", Expect.Refused, [new("a.qcow2", N("selflink"))],
            Prepare: f => File.CreateSymbolicLink(Path.Combine(f, "selflink"), "selflink"));

        // Escapes.
        yield return new("../ to an existing image outside", Expect.Refused, [new("a.qcow2", N("../outside.qcow2"))]);
        yield return new("../ as qcow2", Expect.Refused, [new("a.qcow2", N("../outside.qcow2"), "qcow2")]);
        yield return new("../ as raw", Expect.Refused, [new("a.qcow2", N("../outside.qcow2"), "raw")]);
        yield return new("sub/../../ to outside", Expect.Refused, [new("a.qcow2", N("sub/../../outside.qcow2"))]);
        yield return new("many ../ to /etc/passwd", Expect.Refused, [new("a.qcow2", N("../../../../../../../../../../etc/passwd"), "raw")]);
        yield return new("absolute /etc/passwd", Expect.Refused, [new("a.qcow2", N("/etc/passwd"), "raw")]);
        yield return new("absolute outside image", Expect.Refused, [new("a.qcow2", N(Path.Combine(Path.GetDirectoryName(folder)!, "outside.qcow2")))]);
        yield return new("a prefix sibling folder (<folder>-evil/)", Expect.Refused, [new("a.qcow2", N($"../{folderName}-evil/base.qcow2"))]);
        yield return new("escape in the second layer", Expect.Refused, [new("a.qcow2", N("b.qcow2")), new("b.qcow2", N("../outside.qcow2"))]);
        yield return new("..", Expect.Refused, [new("a.qcow2", N(".."))]);
        yield return new("../", Expect.Refused, [new("a.qcow2", N("../"))]);
        yield return new("/", Expect.Refused, [new("a.qcow2", N("/"))]);

        // Names that stay inside the folder.
        yield return new("base.qcow2", Expect.Accepted, [new("a.qcow2", N("base.qcow2"))]);
        yield return new("./base.qcow2", Expect.Accepted, [new("a.qcow2", N("./base.qcow2"))]);
        yield return new("sub/../base.qcow2", Expect.Accepted, [new("a.qcow2", N("sub/../base.qcow2"))]);
        yield return new("../<folder>/base.qcow2 (climbs out and back in)", Expect.Accepted, [new("a.qcow2", N($"../{folderName}/base.qcow2"))]);
        yield return new("absolute name inside the folder", Expect.Accepted, [new("a.qcow2", N(Path.Combine(folder, "base.qcow2")))]);
        yield return new("sub/inner.qcow2", Expect.Accepted, [new("a.qcow2", N("sub/inner.qcow2"))]);
        yield return new("base.qcow2 read as raw", Expect.Accepted, [new("a.qcow2", N("base.qcow2"), "raw")]);
        yield return new("base.raw as raw", Expect.Accepted, [new("a.qcow2", N("base.raw"), "raw")]);
        yield return new("base.raw probed", Expect.Accepted, [new("a.qcow2", N("base.raw"))]);
        yield return new("chain of 10", Expect.Accepted, Chain(10));

        // Names that name nothing usable.
        yield return new(".", Expect.Refused, [new("a.qcow2", N("."))]);
        yield return new("./ (the folder itself)", Expect.Refused, [new("a.qcow2", N("./"))]);
        yield return new("./ as qcow2", Expect.Refused, [new("a.qcow2", N("./"), "qcow2")]);
        yield return new("./ as raw", Expect.Refused, [new("a.qcow2", N("./"), "raw")]);
        yield return new("sub (a folder)", Expect.Refused, [new("a.qcow2", N("sub"))]);
        yield return new("sub/ (a folder)", Expect.Refused, [new("a.qcow2", N("sub/"))]);
        yield return new("missing file", Expect.Refused, [new("a.qcow2", N("missing.qcow2"))]);
        yield return new("missing file as raw", Expect.Refused, [new("a.qcow2", N("missing.raw"), "raw")]);
        yield return new("through a regular file (plain.txt/x)", Expect.Refused, [new("a.qcow2", N("plain.txt/x"))]);
        yield return new("300-byte file name", Expect.Refused, [new("a.qcow2", N(new string('n', 300)))]);
        yield return new("1023-byte name of folders", Expect.Refused, [new("a.qcow2", N(string.Concat(Enumerable.Repeat("d/", 511)) + "x"))]);
        yield return new("invalid UTF-8", Expect.Refused, [new("a.qcow2", [0xff, 0xfe, (byte)'.', 0xc3])]);
        yield return new("unreadable file", Expect.Either, [new("a.qcow2", N("noaccess.qcow2"))],
            Prepare: f =>
            {
                var p = Path.Combine(f, "noaccess.qcow2");
                File.Copy(Path.Combine(f, "base.qcow2"), p);
                File.SetUnixFileMode(p, UnixFileMode.None); // root still reads it; others get EACCES
            });
        yield return new("unknown backing format", Expect.Refused, [new("a.qcow2", N("base.qcow2"), "vmdk")]);
        yield return new("empty backing format", Expect.Accepted, [new("a.qcow2", N("base.qcow2"), "")]);
        yield return new("chain deeper than MaxChainDepth (70)", Expect.Refused, Chain(70));
        yield return new("symlink inside the folder to an image outside", Expect.Either, [new("a.qcow2", N("escape.qcow2"))],
            Prepare: f => File.CreateSymbolicLink(Path.Combine(f, "escape.qcow2"), "../outside.qcow2"));
    }

    private static Layer[] Chain(int depth) =>
        Enumerable.Range(0, depth).Select(i => new Layer($"c{i}.qcow2", i == depth - 1 ? N("base.qcow2") : N($"c{i + 1}.qcow2"))).ToArray();

    [Fact]
    public void LoopsEscapesAndOddNames()
    {
        var root = Corpus.Dir("backing-chains");
        var outer = Directory.CreateDirectory(Path.Combine(root, "outer")).FullName;
        // A template (64 KiB clusters: room in the header for long names) and images outside the folder.
        var template = Path.Combine(root, "template.qcow2");
        using (var t = Qcow2Image.Create(template, new Qcow2CreateOptions { Size = 1 << 20 }))
            t.Write(65536 + 100, SeedCorpus.Pattern(5000, 9));
        var templateBytes = File.ReadAllBytes(template);
        File.Copy(template, Path.Combine(outer, "outside.qcow2"));
        var evil = Directory.CreateDirectory(Path.Combine(outer, "chain-evil")).FullName;
        File.Copy(template, Path.Combine(evil, "base.qcow2"));

        var basePattern = Path.Combine(root, "base.qcow2");
        using (var b = Qcow2Image.Create(basePattern, new Qcow2CreateOptions { Size = 1 << 20, ClusterSize = 4096 }))
            b.Write(0, SeedCorpus.Pattern(1 << 20, 10));
        var baseBytes = File.ReadAllBytes(basePattern);
        var rawBytes = SeedCorpus.Pattern(1 << 20, 11);

        var campaign = new FuzzCampaign("chain", nameof(BackingChainFuzzTests) + "." + nameof(LoopsEscapesAndOddNames), output);
        int index = 0;
        foreach (var c in Cases(Path.Combine(outer, "chain")))
        {
            foreach (bool readWrite in new[] { false, true })
            {
                // A fresh folder per case: outer/chain with base.qcow2, base.raw, sub/inner.qcow2, plain.txt.
                var folder = Path.Combine(outer, "chain");
                if (Directory.Exists(folder))
                    Directory.Delete(folder, recursive: true);
                Directory.CreateDirectory(Path.Combine(folder, "sub"));
                string basePath = Path.Combine(folder, "base.qcow2");
                File.WriteAllBytes(basePath, baseBytes);
                File.WriteAllBytes(Path.Combine(folder, "base.raw"), rawBytes);
                File.Copy(basePath, Path.Combine(folder, "sub", "inner.qcow2"));
                File.WriteAllText(Path.Combine(folder, "plain.txt"), "not an image");
                foreach (var layer in c.Layers)
                {
                    var bytes = (byte[])templateBytes.Clone();
                    Qcow2Mutator.SetBacking(bytes, layer.BackingName, layer.Format);
                    File.WriteAllBytes(Path.Combine(folder, layer.File), bytes);
                }
                c.Prepare?.Invoke(folder);

                var target = Path.Combine(folder, c.OpenFile);
                var others = Directory.EnumerateFiles(outer, "*", SearchOption.AllDirectories)
                    .Where(p => p != target && !new FileInfo(p).Attributes.HasFlag(FileAttributes.ReparsePoint) && CanRead(p))
                    .Select(p => new WatchedFile(p, fullHash: true))
                    .ToList();
                var rng = new Random(index);
                var result = readWrite
                    ? FuzzHarness.RunReadWrite(target, others, rng)
                    : FuzzHarness.RunReadOnly(target, [new WatchedFile(target, fullHash: true), .. others], rng);
                string id = $"chain:{index}";
                string description = $"{(readWrite ? "read-write" : "read-only")}: {c.Title}: " +
                    string.Join(", ", (c.Layers.Length <= 4 ? c.Layers : [c.Layers[0], c.Layers[1], new Layer("…", null), c.Layers[^1]])
                        .Select(l => $"{l.File} -> '{(l.BackingName is null ? "" : Encoding.UTF8.GetString(l.BackingName))}'{(l.Format is null ? "" : " (" + l.Format + ")")}"));
                campaign.Record(id, readWrite ? "chain-rw" : "chain-ro", description, result);
                bool refused = result.Outcome.StartsWith("refused at open", StringComparison.Ordinal) || result.Outcome == "open refused";
                output.WriteLine($"{id} {description} => {result.Outcome}");
                if (result.Failure is null && c.Expect != Expect.Either && refused != (c.Expect == Expect.Refused))
                    campaign.AddFailure($"expected {c.Expect}", $"[{id}] {description}\n      => expected {c.Expect}, got '{result.Outcome}'");
            }
            index++;
        }
        campaign.Finish();
    }

    private static bool CanRead(string path)
    {
        try
        {
            using var f = File.OpenRead(path);
            return true;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }
}
