using System.Globalization;
using Kvm.Storage;
using Kvm.Storage.CrashWriter;
using Kvm.Storage.Qcow2;

// CrashWriter IMAGE SEED SLOTS SLOT_SIZE
//
// Opens an existing qcow2 image read-write and performs the seeded write sequence of
// CrashPlan.Make(SEED, SLOTS, SLOT_SIZE). Prints "opened" once the image is open, "flushed N"
// after each Flush() that followed write N, "closing" just before it closes the image (where the
// persistent bitmaps are stored), and "done" once it is closed. Kvm.Storage.CrashTests kills it
// with SIGKILL at random moments and checks the image it leaves.

if (args.Length != 4
    || !ulong.TryParse(args[1], NumberStyles.None, CultureInfo.InvariantCulture, out ulong seed)
    || !int.TryParse(args[2], NumberStyles.None, CultureInfo.InvariantCulture, out int slots) || slots < 1
    || !int.TryParse(args[3], NumberStyles.None, CultureInfo.InvariantCulture, out int slotSize) || slotSize < 1)
{
    Console.Error.WriteLine("usage: CrashWriter IMAGE SEED SLOTS SLOT_SIZE  (SEED >= 0, SLOTS >= 1, SLOT_SIZE >= 1)");
    return 2;
}

string path = args[0];
var plan = CrashPlan.Make(seed, slots, slotSize);
var stdout = Console.Out;
try
{
    using var image = Qcow2Image.Open(path);
    if ((ulong)slots * (ulong)slotSize > image.Size)
    {
        Console.Error.WriteLine($"CrashWriter: {slots} slots of {slotSize} bytes need {(ulong)slots * (ulong)slotSize} bytes; {path} has {image.Size}");
        return 2;
    }
    stdout.WriteLine("opened");
    stdout.Flush();

    var buffer = new byte[slotSize];
    foreach (var w in plan)
    {
        var data = buffer.AsSpan(0, w.Length);
        CrashPlan.FillContent(seed, w.Slot, data);
        image.Write(w.Offset, data);
        if (w.FlushAfter)
        {
            image.Flush();
            stdout.WriteLine(string.Create(CultureInfo.InvariantCulture, $"flushed {w.Number}"));
            stdout.Flush();
        }
    }
    stdout.WriteLine("closing");
    stdout.Flush();
}
catch (Exception e) when (e is ImageFormatException or IOException or UnauthorizedAccessException)
{
    Console.Error.WriteLine($"CrashWriter: {e.Message}");
    return 1;
}
stdout.WriteLine("done");
stdout.Flush();
return 0;
