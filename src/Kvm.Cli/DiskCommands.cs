using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Serialization;
using Kvm.Storage;
using Kvm.Storage.Qcow2;
using Kvm.Storage.Raw;
using Kvm.Vmm.Machine;

namespace Kvm.Cli;

/// <summary>vmctl disk: create and inspect disk images.</summary>
public static class DiskCommands
{
    private const int ExitFailure = 1;

    public static Command Build()
    {
        var disk = new Command("disk", "Create and inspect disk images (qcow2 version 3, and raw).");
        disk.Subcommands.Add(Create());
        disk.Subcommands.Add(Info());
        disk.Subcommands.Add(Map());
        disk.Subcommands.Add(Check());
        disk.Subcommands.Add(Snapshot());
        disk.Subcommands.Add(Commit());
        disk.Subcommands.Add(Rebase());
        disk.Subcommands.Add(Convert());
        disk.Subcommands.Add(Resize());
        disk.Subcommands.Add(BitmapCommands.Build());
        disk.Subcommands.Add(DiskBenchCommand.Build());
        return disk;
    }

    private static Argument<string> FileArgument(string description) => new("FILE") { Description = description };

    private static Option<bool> JsonOption() => new("--json") { Description = "print JSON instead of text" };

    /// <summary>Runs a disk action, turning bad input into one line on stderr and status 1.</summary>
    internal static int Guard(Func<int> action)
    {
        try
        {
            return action();
        }
        catch (Exception e) when (e is ImageFormatException or ArgumentException or IOException or UnauthorizedAccessException
                                      or FormatException or InvalidOperationException)
        {
            // Messages may quote names read from an image: never let one reach the terminal raw.
            Console.Error.WriteLine($"{VmctlCommands.Program}: {ImageText.EscapeLines(ForegroundRun.Describe(e))}");
            return ExitFailure;
        }
    }

    private static Command Create()
    {
        var file = FileArgument("the image file to create (it must not exist)");
        var size = new Option<string>("--size", "-s") { Description = "virtual size, with K, M, G or T suffix (default: the backing image's size)" };
        var format = new Option<string>("--format", "-f") { Description = "qcow2 or raw", DefaultValueFactory = _ => "qcow2" };
        format.AcceptOnlyFromAmong("qcow2", "raw");
        var clusterSize = new Option<string>("--cluster-size") { Description = "qcow2 cluster size, a power of two from 512 to 2M", DefaultValueFactory = _ => "64K" };
        var refcountBits = new Option<int>("--refcount-bits") { Description = "qcow2 refcount width: 1, 2, 4, 8, 16, 32 or 64", DefaultValueFactory = _ => 16 };
        var backing = new Option<string>("--backing", "-b") { Description = "backing image (a relative name is stored as given and resolved against FILE's folder)" };
        var backingFormat = new Option<string>("--backing-format", "-F") { Description = "format of the backing image (default: probed)" };
        var cmd = new Command("create", "Create a new image, optionally as a copy-on-write child of a backing image.")
        {
            file, size, format, clusterSize, refcountBits, backing, backingFormat,
        };
        cmd.SetAction(p => Guard(() =>
        {
            string path = p.GetRequiredValue(file);
            string? backingName = p.GetValue(backing);
            string? backingFmt = p.GetValue(backingFormat);
            ulong? virtualSize = p.GetValue(size) is { } s ? VmSpec.ParseSize(s) : null;
            if (backingName is not null)
            {
                string resolved = DiskImage.ResolveBacking(path, backingName, new ImageOpenOptions());
                backingFmt ??= DiskImage.ProbeFormat(resolved);
                using var b = DiskImage.Open(resolved, new ImageOpenOptions { ReadOnly = true }, backingFmt);
                virtualSize ??= b.Size;
            }
            if (virtualSize is null)
                throw new ArgumentException("--size is required without --backing");
            if (p.GetValue(format) == "raw")
            {
                if (backingName is not null)
                    throw new ArgumentException("a raw image cannot have a backing image");
                using var r = RawImage.Create(path, virtualSize.Value);
            }
            else
            {
                using var q = Qcow2Image.Create(path, new Qcow2CreateOptions
                {
                    Size = virtualSize.Value,
                    ClusterSize = checked((int)VmSpec.ParseSize(p.GetRequiredValue(clusterSize))),
                    RefcountBits = p.GetValue(refcountBits),
                    BackingFile = backingName,
                    BackingFormat = backingFmt,
                });
            }
            Console.WriteLine($"created {path}: {p.GetValue(format)}, {virtualSize.Value} bytes" + (backingName is null ? "" : $", backing {backingName}"));
            return 0;
        }));
        return cmd;
    }

    private static Command Info()
    {
        var file = FileArgument("the image");
        var json = JsonOption();
        var cmd = new Command("info", "Show an image's format, sizes and settings, and its whole backing chain.") { file, json };
        cmd.SetAction(p => Guard(() =>
        {
            using var image = DiskImage.Open(p.GetRequiredValue(file), new ImageOpenOptions { ReadOnly = true });
            var info = ImageInfo.Of(image);
            if (p.GetValue(json))
            {
                Console.WriteLine(JsonSerializer.Serialize(info, DiskJson.Default.ImageInfo));
                return 0;
            }
            int depth = 0;
            foreach (var layer in info.Chain())
            {
                string indent = new(' ', depth * 2);
                Console.WriteLine($"{indent}image: {ImageText.Escape(layer.Path)}");
                Console.WriteLine($"{indent}format: {layer.Format}");
                Console.WriteLine($"{indent}virtual size: {Human(layer.VirtualSize)} ({layer.VirtualSize} bytes)");
                Console.WriteLine($"{indent}file size: {Human(layer.FileSize)} ({layer.FileSize} bytes)");
                if (layer.ClusterSize is { } cs)
                    Console.WriteLine($"{indent}cluster size: {cs}");
                if (layer.Version is { } v)
                    Console.WriteLine($"{indent}qcow2 version: {v}, refcount bits: {layer.RefcountBits}, snapshots: {layer.Snapshots}");
                foreach (var b in layer.Bitmaps ?? [])
                    Console.WriteLine($"{indent}bitmap: {b.Name}, granularity {b.Granularity}, {(b.Enabled ? "enabled" : "disabled")}{(b.InUse ? ", in use (stale)" : "")}");
                if (layer.BackingFile is not null)
                    Console.WriteLine($"{indent}backing file: {ImageText.Escape(layer.BackingFile)}" + (layer.BackingFormat is null ? "" : $" (format {ImageText.Escape(layer.BackingFormat)})"));
                depth++;
            }
            return 0;
        }));
        return cmd;
    }

    private static Command Map()
    {
        var file = FileArgument("the image");
        var json = JsonOption();
        var cmd = new Command("map", "Show which ranges hold data, read as zeros, or come from which layer of the backing chain.") { file, json };
        cmd.SetAction(p => Guard(() =>
        {
            using var image = DiskImage.Open(p.GetRequiredValue(file), new ImageOpenOptions { ReadOnly = true });
            var layers = new List<string>();
            for (IBlockImage? i = image; i is not null; i = i.Backing)
                layers.Add(i.Path);
            var extents = image.GetAllocation(0, image.Size);
            if (p.GetValue(json))
            {
                var rows = extents.Select(e => new MapEntry(e.Offset, e.Length, e.Kind.ToString().ToLowerInvariant(), e.Depth,
                    e.Depth < layers.Count ? layers[e.Depth] : null)).ToList();
                Console.WriteLine(JsonSerializer.Serialize(rows, DiskJson.Default.ListMapEntry));
                return 0;
            }
            Console.WriteLine($"{"offset",-20}{"length",-20}{"kind",-13}{"depth",-7}file");
            foreach (var e in extents)
                Console.WriteLine($"0x{e.Offset:x16}  0x{e.Length:x16}  {e.Kind.ToString().ToLowerInvariant(),-12} {e.Depth,-6} {(e.Depth < layers.Count ? ImageText.Escape(layers[e.Depth]) : "")}");
            return 0;
        }));
        return cmd;
    }

    private static Command Check()
    {
        var file = FileArgument("the image");
        var repair = new Option<bool>("--repair", "-r")
        {
            Description = "give leaked clusters back (the image is opened read-write); refused, changing nothing, when the check could not follow every structure",
        };
        var json = JsonOption();
        var cmd = new Command("check",
            "Recount every cluster reference (header, refcount table and blocks, active L1/L2 tables and data,\n" +
            "the snapshot table and each internal snapshot's tables and data, the bitmap directory, bitmap tables\n" +
            "and bitmap data) and compare with the stored refcounts; check COPIED flags and reserved bits.\n" +
            "Exit status: 0 clean, 2 corruptions found, 3 leaked clusters only (as qemu-img check); 1 when the\n" +
            "image cannot be opened (its header or tables are invalid: the error names the field).") { file, repair, json };
        cmd.SetAction(p => Guard(() =>
        {
            string path = p.GetRequiredValue(file);
            if (DiskImage.ProbeFormat(path) != "qcow2")
            {
                Console.WriteLine($"{path}: raw images have no metadata to check");
                return 0;
            }
            bool fix = p.GetValue(repair);
            using var image = Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = !fix });
            var result = image.Check(repairLeaks: fix);
            if (p.GetValue(json))
            {
                Console.WriteLine(JsonSerializer.Serialize(result, DiskJson.Default.CheckResult));
                return result.ExitStatus;
            }
            foreach (var problem in result.Problems)
                Console.WriteLine(ImageText.Escape(problem));
            if (result.RepairRefused is { } refused)
                Console.WriteLine($"Repair refused: {ImageText.Escape(refused)}");
            if (result.LeaksFixed > 0)
                Console.WriteLine($"{result.LeaksFixed} leaked clusters were given back.");
            Console.WriteLine(result.IsClean
                ? "No errors were found on the image."
                : $"{result.Corruptions} errors were found on the image; {result.Leaks} leaked clusters.");
            Console.WriteLine($"{result.AllocatedClusters} host clusters in use, {result.GuestClusters} guest clusters; image end offset: {result.ImageEndOffset}");
            return result.ExitStatus;
        }));
        return cmd;
    }

    private static Command Snapshot()
    {
        var file = FileArgument("the image to snapshot; it becomes read-only");
        var child = new Argument<string>("CHILD") { Description = "the new copy-on-write image that takes the writes from now on" };
        var cmd = new Command("snapshot", "Make an external snapshot: a new qcow2 child backed by FILE, which becomes read-only.") { file, child };
        cmd.SetAction(p => Guard(() =>
        {
            ImageOperations.Snapshot(p.GetRequiredValue(file), p.GetRequiredValue(child));
            Console.WriteLine($"snapshot: {p.GetRequiredValue(child)} now backs onto {p.GetRequiredValue(file)} (read-only)");
            return 0;
        }));
        return cmd;
    }

    private static Command Commit()
    {
        var file = FileArgument("the qcow2 child to fold into its backing image; it is deleted afterwards");
        var cmd = new Command("commit", "Write everything a child image holds into its backing image, then delete the child.") { file };
        cmd.SetAction(p => Guard(() =>
        {
            using var progress = ProgressBar.ForTerminal("commit");
            ImageOperations.Commit(p.GetRequiredValue(file), progress);
            return 0;
        }));
        return cmd;
    }

    private static Command Rebase()
    {
        var file = FileArgument("the qcow2 image to rebase");
        var backing = new Option<string>("--backing", "-b") { Description = "the new backing image (omit to make the image stand alone)" };
        var backingFormat = new Option<string>("--backing-format", "-F") { Description = "format of the new backing image (default: probed)" };
        var unsafeMode = new Option<bool>("--unsafe", "-u") { Description = "only rewrite the backing name; do not copy differing data" };
        var cmd = new Command("rebase",
            "Change an image's backing file. By default the guest-visible content stays the same: ranges the\n" +
            "image does not hold and where old and new backing differ are copied into it first.") { file, backing, backingFormat, unsafeMode };
        cmd.SetAction(p => Guard(() =>
        {
            using var progress = ProgressBar.ForTerminal("rebase");
            ImageOperations.Rebase(p.GetRequiredValue(file), p.GetValue(backing), p.GetValue(backingFormat), p.GetValue(unsafeMode), progress);
            return 0;
        }));
        return cmd;
    }

    private static Command Convert()
    {
        var file = FileArgument("the source image (its whole backing chain is read)");
        var output = new Argument<string>("OUTPUT") { Description = "the new image" };
        var format = new Option<string>("--format", "-O") { Description = "output format: qcow2 or raw", DefaultValueFactory = _ => "qcow2" };
        format.AcceptOnlyFromAmong("qcow2", "raw");
        var clusterSize = new Option<string>("--cluster-size") { Description = "qcow2 cluster size of the output", DefaultValueFactory = _ => "64K" };
        var cmd = new Command("convert", "Copy an image's guest-visible content into a new image, skipping zeros.") { file, output, format, clusterSize };
        cmd.SetAction(p => Guard(() =>
        {
            using var source = DiskImage.Open(p.GetRequiredValue(file), new ImageOpenOptions { ReadOnly = true });
            using var progress = ProgressBar.ForTerminal("convert");
            ImageOperations.Convert(source, p.GetRequiredValue(output), p.GetRequiredValue(format),
                checked((int)VmSpec.ParseSize(p.GetRequiredValue(clusterSize))), progress);
            return 0;
        }));
        return cmd;
    }

    private static Command Resize()
    {
        var file = FileArgument("the image to grow");
        var size = new Argument<string>("SIZE") { Description = "the new size (K, M, G, T suffixes), or +SIZE to add" };
        var cmd = new Command("resize", "Grow an image (shrinking is refused).") { file, size };
        cmd.SetAction(p => Guard(() =>
        {
            using var image = DiskImage.Open(p.GetRequiredValue(file));
            string text = p.GetRequiredValue(size);
            ulong newSize = text.StartsWith('+') ? image.Size + VmSpec.ParseSize(text[1..]) : VmSpec.ParseSize(text);
            ImageOperations.Resize(image, newSize);
            image.Flush();
            Console.WriteLine($"{image.Path}: resized to {newSize} bytes");
            return 0;
        }));
        return cmd;
    }

    private static string Human(ulong bytes) => bytes switch
    {
        >= 1UL << 30 => $"{bytes / (double)(1UL << 30):0.##} GiB",
        >= 1UL << 20 => $"{bytes / (double)(1UL << 20):0.##} MiB",
        >= 1UL << 10 => $"{bytes / 1024.0:0.##} KiB",
        _ => $"{bytes} B",
    };
}

public sealed record MapEntry(ulong Start, ulong Length, string Kind, int Depth, string? File);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(ImageInfo))]
[JsonSerializable(typeof(CheckResult))]
[JsonSerializable(typeof(List<MapEntry>))]
[JsonSerializable(typeof(List<BitmapInfo>))]
[JsonSerializable(typeof(BitmapExport))]
internal sealed partial class DiskJson : JsonSerializerContext;
