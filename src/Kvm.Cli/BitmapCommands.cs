using System.CommandLine;
using System.Numerics;
using System.Text.Json;
using Kvm.Storage;
using Kvm.Storage.Qcow2;
using Kvm.Vmm.Machine;

namespace Kvm.Cli;

/// <summary>The ranges one bitmap records as written, as <c>vmctl disk bitmap export --json</c> prints them.</summary>
public sealed record BitmapExport(string Image, string Bitmap, ulong Granularity, ulong DiskSize, ulong DirtyBytes, IReadOnlyList<BitmapExtent> Extents);

public sealed record BitmapExtent(ulong Offset, ulong Length);

/// <summary>vmctl disk bitmap: the persistent dirty bitmaps of a qcow2 image, compatible with qemu's.</summary>
public static class BitmapCommands
{
    public static Command Build()
    {
        var bitmap = new Command("bitmap",
            "Manage persistent dirty bitmaps of a qcow2 image (the qcow2 bitmaps extension, as qemu keeps them).\n" +
            "An enabled bitmap records every range written to the disk, by a VM or by vmctl; an incremental\n" +
            "backup copies the ranges it exports, then clears it. A bitmap marked in use was not saved by the\n" +
            "program that last wrote the image (it stopped without closing it): it may miss writes, and can only\n" +
            "be removed. Changes need the image not to be in use by a VM.");
        bitmap.Subcommands.Add(List());
        bitmap.Subcommands.Add(Add());
        bitmap.Subcommands.Add(Simple("remove", "Remove a bitmap and free its clusters (in-use bitmaps too).", (i, n) => i.RemoveBitmap(n), "removed"));
        bitmap.Subcommands.Add(Simple("enable", "Record writes in a bitmap from now on.", (i, n) => i.SetBitmapEnabled(n, true), "enabled"));
        bitmap.Subcommands.Add(Simple("disable", "Stop recording writes in a bitmap (its bits are kept).", (i, n) => i.SetBitmapEnabled(n, false), "disabled"));
        bitmap.Subcommands.Add(Simple("clear", "Clear every bit of a bitmap.", (i, n) => i.ClearBitmap(n), "cleared"));
        bitmap.Subcommands.Add(Merge());
        bitmap.Subcommands.Add(Export());
        return bitmap;
    }

    private static Argument<string> FileArgument() => new("FILE") { Description = "the qcow2 image" };

    private static Argument<string> NameArgument(string what = "the bitmap's name") => new("NAME") { Description = what };

    private static Qcow2Image OpenImage(string path, bool write)
    {
        if (DiskImage.ProbeFormat(path) != "qcow2")
            throw new ArgumentException($"{path}: only qcow2 images have persistent bitmaps");
        // A writable open takes the exclusive lock: a running VM's disk is refused, not changed under it.
        return Qcow2Image.Open(path, new ImageOpenOptions { ReadOnly = !write, Exclusive = write });
    }

    private static Command List()
    {
        var file = FileArgument();
        var json = new Option<bool>("--json") { Description = "print JSON instead of text" };
        var cmd = new Command("list", "List the bitmaps: name, granularity, enabled or not, in use, bytes recorded as written.") { file, json };
        cmd.SetAction(p => DiskCommands.Guard(() =>
        {
            using var image = OpenImage(p.GetRequiredValue(file), write: false);
            var list = image.ListBitmaps();
            if (p.GetValue(json))
            {
                Console.WriteLine(JsonSerializer.Serialize(list.ToList(), DiskJson.Default.ListBitmapInfo));
                return 0;
            }
            if (list.Count == 0)
            {
                Console.WriteLine($"{ImageText.Escape(image.Path)}: no bitmaps");
                return 0;
            }
            Console.WriteLine($"{"name",-24} {"granularity",11} {"state",-9} dirty bytes");
            foreach (var b in list)
                Console.WriteLine($"{b.Name,-24} {b.Granularity,11} {(b.InUse ? "in-use" : b.Enabled ? "enabled" : "disabled"),-9} {(b.DirtyBytes is { } d ? d.ToString() : "unknown (in use: stale)")}");
            return 0;
        }));
        return cmd;
    }

    private static Command Add()
    {
        var file = FileArgument();
        var name = NameArgument("the new bitmap's name (unique in the image, at most 1023 bytes)");
        var granularity = new Option<string>("--granularity", "-g")
        {
            Description = "bytes of disk per bit: a power of two from 512 to 2G, with K, M, G suffixes (default: the cluster size, within 4K to 64K, as qemu)",
        };
        var disabled = new Option<bool>("--disabled") { Description = "create it disabled (it records nothing until enabled)" };
        var cmd = new Command("add", "Add an empty bitmap; it records writes from now on unless --disabled.") { file, name, granularity, disabled };
        cmd.SetAction(p => DiskCommands.Guard(() =>
        {
            int? bits = null;
            if (p.GetValue(granularity) is { } text)
            {
                ulong g = VmSpec.ParseSize(text);
                if (g == 0 || !BitOperations.IsPow2(g))
                    throw new ArgumentException($"--granularity {text}: not a power of two");
                bits = BitOperations.Log2(g);
            }
            using var image = OpenImage(p.GetRequiredValue(file), write: true);
            string n = p.GetRequiredValue(name);
            image.AddBitmap(n, bits, enabled: !p.GetValue(disabled));
            Console.WriteLine($"{ImageText.Escape(image.Path)}: bitmap '{ImageText.Escape(n)}' added, granularity {image.GetBitmapGranularity(n)}, {(p.GetValue(disabled) ? "disabled" : "enabled")}");
            return 0;
        }));
        return cmd;
    }

    private static Command Simple(string verb, string description, Action<Qcow2Image, string> action, string done)
    {
        var file = FileArgument();
        var name = NameArgument();
        var cmd = new Command(verb, description) { file, name };
        cmd.SetAction(p => DiskCommands.Guard(() =>
        {
            using var image = OpenImage(p.GetRequiredValue(file), write: true);
            string n = p.GetRequiredValue(name);
            action(image, n);
            Console.WriteLine($"{ImageText.Escape(image.Path)}: bitmap '{ImageText.Escape(n)}' {done}");
            return 0;
        }));
        return cmd;
    }

    private static Command Merge()
    {
        var file = FileArgument();
        var source = new Argument<string>("SOURCE") { Description = "the bitmap whose ranges are added" };
        var target = new Argument<string>("TARGET") { Description = "the bitmap that receives them" };
        var cmd = new Command("merge", "Set in TARGET every range SOURCE records as written (SOURCE is unchanged).") { file, source, target };
        cmd.SetAction(p => DiskCommands.Guard(() =>
        {
            using var image = OpenImage(p.GetRequiredValue(file), write: true);
            image.MergeBitmap(p.GetRequiredValue(source), p.GetRequiredValue(target));
            Console.WriteLine($"{ImageText.Escape(image.Path)}: bitmap '{ImageText.Escape(p.GetRequiredValue(source))}' merged into '{ImageText.Escape(p.GetRequiredValue(target))}'");
            return 0;
        }));
        return cmd;
    }

    private static Command Export()
    {
        var file = FileArgument();
        var name = NameArgument();
        var json = new Option<bool>("--json") { Description = "print JSON: the bitmap, its granularity, and the changed extents (offset, length)" };
        var cmd = new Command("export",
            "Print the ranges a bitmap records as written (changed extents, merged, in bytes). An in-use bitmap is\n" +
            "refused: it may miss writes.") { file, name, json };
        cmd.SetAction(p => DiskCommands.Guard(() =>
        {
            using var image = OpenImage(p.GetRequiredValue(file), write: false);
            string n = p.GetRequiredValue(name);
            var extents = image.GetBitmapExtents(n);
            ulong total = extents.Aggregate(0UL, (s, e) => s + e.Length);
            if (p.GetValue(json))
            {
                var export = new BitmapExport(image.Path, n, image.GetBitmapGranularity(n), image.Size, total,
                    extents.Select(e => new BitmapExtent(e.Offset, e.Length)).ToList());
                Console.WriteLine(JsonSerializer.Serialize(export, DiskJson.Default.BitmapExport));
                return 0;
            }
            Console.WriteLine($"{"offset",-20}length");
            foreach (var e in extents)
                Console.WriteLine($"0x{e.Offset:x16}  0x{e.Length:x16}");
            Console.WriteLine($"{extents.Count} extents, {total} bytes");
            return 0;
        }));
        return cmd;
    }
}
