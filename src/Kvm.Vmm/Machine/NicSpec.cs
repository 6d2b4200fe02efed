using System.Globalization;
using Kvm.Devices.Virtio.Net;
using Kvm.Network;

namespace Kvm.Vmm.Machine;

/// <summary>Where a VM's NIC reaches the host's network: a tap device, optionally put on a bridge.</summary>
public sealed record UplinkSpec
{
    /// <summary>The tap device: used if it exists, made (and gone with the VM) if not; empty: the kernel names one.</summary>
    public string Tap { get; init; } = "";

    /// <summary>A bridge the tap is added to when the VM starts.</summary>
    public string? Bridge { get; init; }

    public override string ToString() => "tap " + (Tap.Length == 0 ? "(any)" : Tap) + (Bridge is null ? "" : " on bridge " + Bridge);
}

/// <summary>A virtio-net NIC of a VM: its address, queues, offloads and uplinks.</summary>
public sealed record NicSpec
{
    /// <summary>The guest's MAC address; a random locally administered one unless given (kept in the spec, so a restored VM has the same).</summary>
    public MacAddress Mac { get; init; } = MacAddress.Random();

    /// <summary>Receive/transmit queue pairs, each served by its own threads (Linux uses one per vCPU up to this).</summary>
    public int Queues { get; init; } = 1;

    /// <summary>Checksum and segmentation offloads between guest and host (off: the guest does both itself).</summary>
    public bool Offloads { get; init; } = true;

    /// <summary>Lets the guest send frames with another source MAC and change its address (off: such frames are dropped).</summary>
    public bool AllowSpoofing { get; init; }

    public int Mtu { get; init; } = 1500;

    public IReadOnlyList<UplinkSpec> Uplinks { get; init; } = [];

    public VirtioNetOptions ToOptions() => new()
    {
        Mac = Mac, QueuePairs = Queues, Offloads = Offloads, AllowSpoofing = AllowSpoofing, Mtu = Mtu,
    };

    /// <summary>Throws <see cref="ArgumentException"/> naming the NIC and what is wrong with it.</summary>
    public void Validate()
    {
        try
        {
            ToOptions().Validate();
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"nic {Mac}: {e.Message}");
        }
        if (Uplinks.Count == 0)
            throw new ArgumentException($"nic {Mac}: no uplink (tap=NAME)");
        if (Uplinks.Count > 1)
            throw new ArgumentException($"nic {Mac}: {Uplinks.Count} uplinks; a NIC has one uplink for now (teams are coming)");
        foreach (var u in Uplinks)
        {
            if (System.Text.Encoding.UTF8.GetByteCount(u.Tap) > 15 || u.Tap.Contains('/') || u.Tap.Any(char.IsWhiteSpace))
                throw new ArgumentException($"nic {Mac}: tap name '{u.Tap}' is not an interface name (at most 15 bytes, no '/' or spaces)");
            if (u.Bridge is not null && (u.Bridge.Length is 0 or > 15 || u.Bridge.Contains('/') || u.Bridge.Any(char.IsWhiteSpace)))
                throw new ArgumentException($"nic {Mac}: bridge name '{u.Bridge}' is not an interface name (at most 15 bytes, no '/' or spaces)");
        }
    }

    /// <summary>The command-line form's help text.</summary>
    public const string Syntax = "tap=NAME[@BRIDGE][,mac=MAC][,queues=N][,offload=on|off][,spoof=drop|allow][,mtu=N]";

    /// <summary>Parses the command-line form (<see cref="Syntax"/>).</summary>
    public static NicSpec Parse(string text)
    {
        var spec = new NicSpec();
        var uplinks = new List<UplinkSpec>();
        foreach (var part in text.Split(','))
        {
            int eq = part.IndexOf('=');
            string key = eq < 0 ? part : part[..eq];
            string? value = eq < 0 ? null : part[(eq + 1)..];
            ArgumentException Fail(string what) => new($"--net '{text}': {what}");
            switch (key)
            {
                case "tap":
                    string name = value ?? "";
                    int at = name.IndexOf('@');
                    uplinks.Add(at < 0 ? new UplinkSpec { Tap = name } : new UplinkSpec { Tap = name[..at], Bridge = name[(at + 1)..] });
                    break;
                case "mac" when value is not null:
                    try
                    {
                        spec = spec with { Mac = MacAddress.Parse(value) };
                    }
                    catch (FormatException e)
                    {
                        throw Fail(e.Message);
                    }
                    break;
                case "queues" when value is not null:
                    spec = spec with { Queues = Number(value) ?? throw Fail($"queues '{value}' is not a whole number") };
                    break;
                case "mtu" when value is not null:
                    spec = spec with { Mtu = Number(value) ?? throw Fail($"mtu '{value}' is not a whole number") };
                    break;
                case "offload" or "offloads":
                    spec = spec with { Offloads = value switch { null or "on" or "true" or "1" => true, "off" or "false" or "0" => false, _ => throw Fail($"offload '{value}' is not on or off") } };
                    break;
                case "spoof" when value is "allow" or "drop":
                    spec = spec with { AllowSpoofing = value == "allow" };
                    break;
                default:
                    throw Fail($"unknown option '{part}' (expected {Syntax})");
            }
        }
        spec = spec with { Uplinks = uplinks };
        spec.Validate();
        return spec;
    }

    private static int? Number(string s) => int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : null;
}
