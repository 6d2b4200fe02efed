using Kvm.Vmm.Machine;

namespace Kvm.Vmm.Tests;

public class DiskSpecTests
{
    [Fact]
    public void APathAloneGetsDefaults()
    {
        var d = DiskSpec.Parse("/srv/disks/a.qcow2");
        Assert.Equal(new DiskSpec { Path = "/srv/disks/a.qcow2" }, d);
        Assert.False(d.ReadOnly);
        Assert.Equal("", d.Serial);
        Assert.Equal(1, d.Queues);
    }

    [Theory]
    [InlineData("a.raw,readonly", true, "", 1)]
    [InlineData("a.raw,ro", true, "", 1)]
    [InlineData("a.raw,readonly=on", true, "", 1)]
    [InlineData("a.raw,readonly=off", false, "", 1)]
    [InlineData("a.raw,serial=disk-7", false, "disk-7", 1)]
    [InlineData("a.raw,queues=4", false, "", 4)]
    [InlineData("a.raw,queues=4,readonly,serial=x y", true, "x y", 4)]
    [InlineData("a.raw,serial=", false, "", 1)]
    [InlineData("a.raw,serial=12345678901234567890", false, "12345678901234567890", 1)]
    public void OptionsAreRead(string text, bool readOnly, string serial, int queues)
    {
        var d = DiskSpec.Parse(text);
        Assert.Equal("a.raw", d.Path);
        Assert.Equal(readOnly, d.ReadOnly);
        Assert.Equal(serial, d.Serial);
        Assert.Equal(queues, d.Queues);
    }

    [Theory]
    [InlineData("", "no image path")]
    [InlineData(",readonly", "no image path")]
    [InlineData("a.raw,queues=0", "queues 0 is out of range")]
    [InlineData("a.raw,queues=65", "queues 65 is out of range")]
    [InlineData("a.raw,queues=-1", "queues '-1' is not a whole number")]
    [InlineData("a.raw,queues", "unknown option 'queues'")]
    [InlineData("a.raw,serial=123456789012345678901", "at most 20")]
    [InlineData("a.raw,serial=tab\there", "printable ASCII")]
    [InlineData("a.raw,readonly=maybe", "unknown option 'readonly=maybe'")]
    [InlineData("a.raw,format=qcow2", "unknown option 'format=qcow2'")]
    public void BadTextIsRefusedNamingTheProblem(string text, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => DiskSpec.Parse(text));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void VmSpecRefusesABadDiskNamingIt()
    {
        var spec = new VmSpec { Kernel = "k", Disks = [new DiskSpec { Path = "d.raw", Queues = 0 }] };
        var e = Assert.Throws<ArgumentException>(spec.Validate);
        Assert.Contains("disk 'd.raw'", e.Message);
    }

    [Fact]
    public void VmSpecRefusesMoreDisksThanSlots()
    {
        var disks = Enumerable.Range(0, VmSpec.MaxDisks + 1).Select(i => new DiskSpec { Path = $"d{i}" }).ToArray();
        var e = Assert.Throws<ArgumentException>(new VmSpec { Kernel = "k", Disks = disks }.Validate);
        Assert.Contains("32 disks", e.Message);
    }

    [Fact]
    public void JsonRoundTripKeepsEveryDisk()
    {
        var spec = new VmSpec
        {
            Kernel = "k",
            Disks =
            [
                new DiskSpec { Path = "/a.qcow2" },
                new DiskSpec { Path = "/b.raw", ReadOnly = true, Serial = "bee", Queues = 3 },
            ],
        };
        string json = VmSpecJsonContext.Format(spec);
        var back = VmSpecJsonContext.Parse(json, "disks.json");
        Assert.Equal(spec.Disks, back.Disks);
        Assert.Contains("\"readOnly\": true", json);
    }

    [Fact]
    public void JsonDiskWithoutAPathIsRefusedNamingIt()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            VmSpecJsonContext.Parse("""{ "kernel": "k", "disks": [ { "path": "a" }, { "serial": "x" } ] }""", "d.json"));
        Assert.Contains("d.json", e.Message);
        Assert.Contains("disks[1]", e.Message);
        Assert.Contains("'path'", e.Message);
    }

    [Fact]
    public void JsonDiskWithAnUnknownFieldIsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            VmSpecJsonContext.Parse("""{ "kernel": "k", "disks": [ { "path": "a", "readonly": true } ] }""", "d.json"));
        Assert.Contains("readonly", e.Message);
    }
}
