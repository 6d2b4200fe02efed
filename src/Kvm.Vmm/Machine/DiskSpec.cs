using System.Globalization;
using Kvm.Devices.Virtio.Block;

namespace Kvm.Vmm.Machine;

/// <summary>A virtio-blk disk of a VM: the image file and how the guest sees it.</summary>
public sealed record DiskSpec
{
    /// <summary>A raw or qcow2 image; the format is probed from the file.</summary>
    public required string Path { get; init; }

    /// <summary>The guest sees VIRTIO_BLK_F_RO and its writes fail with IOERR; the image is opened read-only.</summary>
    public bool ReadOnly { get; init; }

    /// <summary>What GET_ID returns (at most 20 printable ASCII characters).</summary>
    public string Serial { get; init; } = "";

    /// <summary>Request queues, each served by its own thread.</summary>
    public int Queues { get; init; } = 1;

    public VirtioBlockOptions ToOptions() => new() { Serial = Serial, Queues = Queues };

    /// <summary>Throws <see cref="ArgumentException"/> naming the disk and what is wrong with it.</summary>
    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Path))
            throw new ArgumentException("disk: no image path given");
        try
        {
            ToOptions().Validate();
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"disk '{Path}': {e.Message}");
        }
    }

    /// <summary>
    /// Parses the command-line form <c>PATH[,readonly][,serial=ID][,queues=N]</c>. The path may not
    /// contain a comma.
    /// </summary>
    public static DiskSpec Parse(string text)
    {
        var parts = text.Split(',');
        if (parts[0].Length == 0)
            throw new ArgumentException($"--disk '{text}': no image path before the options");
        var spec = new DiskSpec { Path = parts[0] };
        foreach (var part in parts.Skip(1))
        {
            int eq = part.IndexOf('=');
            string key = eq < 0 ? part : part[..eq];
            string? value = eq < 0 ? null : part[(eq + 1)..];
            switch (key)
            {
                case "readonly" or "ro" when value is null or "on" or "true" or "1":
                    spec = spec with { ReadOnly = true };
                    break;
                case "readonly" or "ro" when value is "off" or "false" or "0":
                    spec = spec with { ReadOnly = false };
                    break;
                case "serial" when value is not null:
                    spec = spec with { Serial = value };
                    break;
                case "queues" when value is not null:
                    if (!int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out int q))
                        throw new ArgumentException($"--disk '{text}': queues '{value}' is not a whole number");
                    spec = spec with { Queues = q };
                    break;
                default:
                    throw new ArgumentException(
                        $"--disk '{text}': unknown option '{part}' (expected readonly, serial=ID or queues=N)");
            }
        }
        spec.Validate();
        return spec;
    }
}
