using Kvm.Devices.Legacy.AcpiPm;
using Kvm.Devices.Legacy.DebugExit;
using Kvm.Devices.Legacy.I8042;
using Kvm.Devices.Legacy.Rtc;
using Kvm.Devices.Legacy.Serial;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Tests;

/// <summary>A device that writes one number as its state and logs what the manager asks of it.</summary>
public sealed class LoggingDevice(string name, List<string> log, string kind = "logging", uint value = 0) : IStatefulDevice, IDisposable
{
    public uint Value { get; set; } = value;
    public string StateKind => kind;

    public void Pause() => log.Add($"pause {name}");
    public void Resume() => log.Add($"resume {name}");
    public void SaveState(StateWriter writer)
    {
        log.Add($"save {name}");
        writer.U32(Value);
    }

    public void RestoreState(ref StateReader reader)
    {
        log.Add($"restore {name}");
        Value = reader.U32("value");
    }

    public void Dispose() => log.Add($"dispose {name}");
}

/// <summary>The device manager: ids, the order of pause, resume and disposal, and restoring records by id.</summary>
public sealed class DeviceManagerTests
{
    [Theory]
    [InlineData("")]
    [InlineData("Serial0")]
    [InlineData("serial 0")]
    [InlineData("serial_0")]
    [InlineData("virtio.blk0")]
    [InlineData("sérial")]
    [InlineData("serial0\n")]
    public void Add_RefusesAnInvalidId(string id)
    {
        using var m = new DeviceManager();
        Assert.False(DeviceManager.IsValidId(id));
        var e = Assert.Throws<ArgumentException>(() => m.Add(id, new DebugExitDevice(_ => { })));
        Assert.Contains($"'{id}'", e.Message);
        Assert.Empty(m.Devices);
    }

    [Fact]
    public void Add_AcceptsLowercaseDigitsAndDashes_UpTo64Characters()
    {
        using var m = new DeviceManager();
        foreach (var id in new[] { "a", "serial0", "virtio-blk12", "-", new string('z', 64) })
        {
            Assert.True(DeviceManager.IsValidId(id));
            m.Add(id, new DebugExitDevice(_ => { }));
        }
        Assert.False(DeviceManager.IsValidId(new string('z', 65)));
        Assert.Throws<ArgumentException>(() => m.Add(new string('z', 65), new DebugExitDevice(_ => { })));
        Assert.Equal(5, m.Devices.Count);
    }

    [Fact]
    public void Add_RefusesADuplicateId_AndFindFindsById()
    {
        using var m = new DeviceManager();
        var rtc = m.Add("rtc", new CmosRtc());
        var e = Assert.Throws<ArgumentException>(() => m.Add("rtc", new CmosRtc()));
        Assert.Contains("'rtc'", e.Message);
        Assert.Same(rtc, m.Find("rtc"));
        Assert.Null(m.Find("serial0"));
        Assert.Single(m.Devices);
    }

    [Fact]
    public void PauseAll_GoesInReverseOrder_ResumeAllAndSaveAllInOrder_DisposeInReverse()
    {
        var log = new List<string>();
        var m = new DeviceManager();
        foreach (var id in new[] { "a", "b", "c" })
            m.Add(id, new LoggingDevice(id, log));
        m.PauseAll();
        Assert.Equal(["pause c", "pause b", "pause a"], log);
        log.Clear();
        m.ResumeAll();
        Assert.Equal(["resume a", "resume b", "resume c"], log);
        log.Clear();
        var records = m.SaveAll();
        Assert.Equal(["save a", "save b", "save c"], log);
        Assert.Equal(["a", "b", "c"], records.Select(r => r.Id));
        log.Clear();
        m.Dispose();
        Assert.Equal(["dispose c", "dispose b", "dispose a"], log);
        m.Dispose();
        Assert.Equal(3, log.Count);
        Assert.Throws<ObjectDisposedException>(() => m.Add("d", new LoggingDevice("d", log)));
    }

    /// <summary>
    /// A device the caller names as new (a disk added while the VM was suspended) may lack a record
    /// and stays as it was built; one not named is still refused, and one named new that has a
    /// record is refused too (the caller's idea of the machine is wrong).
    /// </summary>
    [Fact]
    public void RestoreAll_ADeviceNamedNew_MayLackARecord_AndOnlyThatOne()
    {
        var log = new List<string>();
        var a = new DeviceManager();
        a.Add("a", new LoggingDevice("a", log, value: 7));
        var records = a.SaveAll();

        var b = new DeviceManager();
        var restored = b.Add("a", new LoggingDevice("a", log));
        var added = b.Add("added", new LoggingDevice("added", log, value: 3));
        log.Clear();
        b.RestoreAll(records, new HashSet<string> { "added" });
        Assert.Equal(["restore a"], log.Where(l => l.StartsWith("restore", StringComparison.Ordinal)));
        Assert.Equal(7u, restored.Value);
        Assert.Equal(3u, added.Value);

        var c = new DeviceManager();
        c.Add("a", new LoggingDevice("a", log));
        c.Add("added", new LoggingDevice("added", log));
        var missing = Assert.Throws<DeviceStateException>(() => c.RestoreAll(records));
        Assert.Contains("'added'", missing.Message);
        var wrong = Assert.Throws<DeviceStateException>(() => c.RestoreAll(records, new HashSet<string> { "a", "added" }));
        Assert.Contains("'a' is said to be new", wrong.Message);
    }

    [Fact]
    public void Paused_FollowsPauseAllAndResumeAll()
    {
        var m = new DeviceManager();
        m.Add("a", new LoggingDevice("a", []));
        Assert.False(m.Paused);
        m.PauseAll();
        Assert.True(m.Paused);
        m.ResumeAll();
        Assert.False(m.Paused);
    }

    /// <summary>A machine's legacy devices and a logging device, as the VMM adds them.</summary>
    private sealed class Machine
    {
        public readonly List<string> Log = [];
        public readonly DeviceManager Manager = new();
        public readonly LoggingDevice First;
        public readonly Serial16550 Serial;
        public readonly CmosRtc Rtc;
        public readonly I8042Controller I8042;
        public readonly AcpiPmDevice Pm;
        public readonly LoggingDevice Last;

        public Machine()
        {
            First = Manager.Add("first", new LoggingDevice("first", Log));
            Serial = Manager.Add("serial0", new Serial16550(_ => { }, new RecordingInterruptLine()));
            Rtc = Manager.Add("rtc", new CmosRtc());
            I8042 = Manager.Add("i8042", new I8042Controller(_ => { }));
            Pm = Manager.Add("pm", new AcpiPmDevice(_ => { }, new RecordingInterruptLine()));
            Manager.Add("debug-exit", new DebugExitDevice(_ => { }));
            Last = Manager.Add("last", new LoggingDevice("last", Log, kind: "other-kind"));
        }

        /// <summary>Puts every device in a state of its own.</summary>
        public void Drive()
        {
            First.Value = 0x1234;
            Last.Value = 0xabcd;
            Serial.Write(Serial16550.Scr, [0x77], 0);
            Serial.Write(Serial16550.Lcr, [0x1b], 0);
            Rtc.Write(0, [0x40], 0);
            Rtc.Write(1, [0x99], 0);
            I8042.CommandPort.Write(0, [0x60], 0);
            Pm.Write(2, [0x20, 0x01], 0);
            Pm.PressPowerButton();
        }

        /// <summary>Every device's record bytes, by id.</summary>
        public Dictionary<string, byte[]> Payloads() =>
            Manager.Devices.ToDictionary(d => d.Id, d => StateBytes.Save(d.Device));
    }

    [Fact]
    public void SaveAll_ThenRestoreAll_IntoAFreshMachine_RestoresEveryDeviceById()
    {
        var a = new Machine();
        a.Drive();
        a.Manager.PauseAll();
        var records = a.Manager.SaveAll();
        Assert.Equal(["first", "serial0", "rtc", "i8042", "pm", "debug-exit", "last"], records.Select(r => r.Id));
        Assert.Equal(["logging", "serial16550", "cmos-rtc", "i8042", "acpi-pm", "debug-exit", "other-kind"], records.Select(r => r.Kind));

        var b = new Machine();
        var before = b.Payloads();
        // Records may come in any order: they are matched by id.
        b.Manager.RestoreAll(records.Reverse().ToList());
        Assert.Equal(0x1234u, b.First.Value);
        Assert.Equal(0xabcdu, b.Last.Value);
        var after = b.Payloads();
        foreach (var (id, payload) in a.Payloads())
        {
            Assert.Equal(payload, after[id]);
            if (id != "debug-exit")
                Assert.NotEqual(before[id], after[id]);   // the record changed the device
        }
    }

    public static TheoryData<string, string> Mismatches => new()
    {
        { "missing", "rtc" },
        { "extra", "serial1" },
        { "kind", "i8042" },
        { "duplicate", "pm" },
    };

    [Theory]
    [MemberData(nameof(Mismatches))]
    public void RestoreAll_RecordsThatDoNotMatchTheDevices_AreRefusedNamingTheId_AndNothingIsRestored(string mismatch, string id)
    {
        var a = new Machine();
        a.Drive();
        var records = a.Manager.SaveAll().ToList();
        switch (mismatch)
        {
            case "missing":
                records.RemoveAll(r => r.Id == id);
                break;
            case "extra":
                records.Add(new StateRecord(id, "serial16550", records.Single(r => r.Id == "serial0").Payload));
                break;
            case "kind":
                int at = records.FindIndex(r => r.Id == id);
                records[at] = records[at] with { Kind = "serial16550" };
                break;
            case "duplicate":
                records.Add(records.Single(r => r.Id == id));
                break;
        }

        var b = new Machine();
        var before = b.Payloads();
        b.Log.Clear();
        var e = Assert.Throws<DeviceStateException>(() => b.Manager.RestoreAll(records));
        Assert.Contains($"'{id}'", e.Message);
        Assert.DoesNotContain(b.Log, l => l.StartsWith("restore"));
        var after = b.Payloads();
        foreach (var (deviceId, payload) in before)
            Assert.Equal(payload, after[deviceId]);
    }

    [Theory]
    [InlineData("serial0")]
    [InlineData("debug-exit")]
    [InlineData("first")]
    public void RestoreAll_APayloadWithBytesLeftOver_IsRefusedNamingTheRecord(string id)
    {
        var a = new Machine();
        a.Drive();
        var records = a.Manager.SaveAll().Select(r => r.Id == id ? r with { Payload = [.. r.Payload, 0] } : r).ToList();
        var b = new Machine();
        var e = Assert.Throws<StateFormatException>(() => b.Manager.RestoreAll(records));
        Assert.Contains($"'{id}'", e.Message);
        Assert.Contains("left", e.Message);
    }

    [Fact]
    public void RestoreAll_ATruncatedPayload_IsRefusedNamingTheRecordAndTheField()
    {
        var a = new Machine();
        a.Drive();
        var records = a.Manager.SaveAll().Select(r => r.Id == "rtc" ? r with { Payload = r.Payload[..^1] } : r).ToList();
        var e = Assert.Throws<StateFormatException>(() => new Machine().Manager.RestoreAll(records));
        Assert.Contains("'rtc'", e.Message);
        Assert.Contains("'cmos'", e.Message);
    }
}
