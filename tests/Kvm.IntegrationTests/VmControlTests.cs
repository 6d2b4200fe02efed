using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Kvm.Rpc;
using Kvm.Tests.Shared;
using Kvm.Control;

namespace Kvm.IntegrationTests;

/// <summary>
/// kvm-vmm with its control and console sockets, as kvmd will drive it: the guest kit's `tick`
/// workload prints a numbered line every 50 ms and powers off when the ACPI power button is
/// pressed, so the console shows whether the VM runs, pauses and resumes, and `stop` shows whether
/// the guest answered the power button or was forced.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed partial class VmControlTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-control-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string ControlPath => Path.Combine(_dir, "control.sock");
    private string ConsolePath => Path.Combine(_dir, "console.sock");

    private static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
        if (!File.Exists(TestEnvironment.KvmVmm) || !File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.KvmVmm} or {TestEnvironment.Vmctl} is missing (run 'make' first)");
    }

    /// <summary>Starts kvm-vmm on the tick workload with both sockets, a disk, and waits until it answers.</summary>
    private LiveProcess StartVm(string cmdline)
    {
        string disk = Path.Combine(_dir, "disk.raw");
        using (var f = File.Create(disk))
            f.SetLength(8 << 20);
        string spec = Path.Combine(_dir, "vm.json");
        File.WriteAllText(spec, JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["kernel"] = TestEnvironment.GuestKit,
            ["cmdline"] = cmdline,
            ["debugExit"] = true,
            ["cpus"] = 2,
            ["disks"] = new[] { new Dictionary<string, object> { ["path"] = disk, ["serial"] = "d0" } },
        }));
        var vm = LiveProcess.Start(TestEnvironment.KvmVmm, ["--spec", spec, "--control", ControlPath, "--console", ConsolePath]);
        Assert.True(SpinWait.SpinUntil(() => File.Exists(ControlPath) && File.Exists(ConsolePath) || vm.Process.HasExited, Timeout),
            "kvm-vmm did not create its sockets");
        if (vm.Process.HasExited)
            Assert.Fail($"kvm-vmm exited early with status {vm.Process.ExitCode}: {vm.Stderr.Result}");
        return vm;
    }

    private RpcClient Control() => RpcClient.Connect(ControlPath, "kvm-vmm");

    private static T Call<T>(RpcClient c, string method, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> info) =>
        c.CallAsync(method, info).WaitAsync(Timeout).GetAwaiter().GetResult();

    /// <summary>
    /// The fence kvmd arms after each lease renewal: re-armed in time, the VM runs on; left to
    /// expire, the VM stops by itself, every time. The durations have fractions of a millisecond
    /// on purpose: a timer counts whole milliseconds and may fire before the exact deadline, which
    /// must delay the stop, not lose the fence (it once did, and a frozen kvmd's VM ran on).
    /// </summary>
    [SkippableFact]
    public void AFenceReArmedInTimeHoldsAndOneLeftToExpireStopsTheVm()
    {
        Require();
        using var vm = StartVm("tick period=50");
        using var control = Control();
        FenceStatus Arm(double seconds) => control.CallAsync("fence", new FenceRequest(seconds),
            VmControlJson.Default.FenceRequest, VmControlJson.Default.FenceStatus).WaitAsync(Timeout).GetAwaiter().GetResult();

        // Re-armed every 200 ms for 4 s, twice the fence's time: it holds. (The margin is wide: a
        // nested host on a loaded machine stalls for half a second at times.)
        var armed = Arm(2.0007);
        Assert.True(armed.Armed);
        Assert.Equal("stop", armed.Action);
        for (int i = 0; i < 20; i++)
        {
            Thread.Sleep(200);
            Arm(2.0007);
        }
        Assert.Equal("running", Call(control, "status", VmControlJson.Default.VmStatus).State);

        Arm(0.2503);
        if (!vm.WaitForExit(Timeout))
            Assert.Fail("the VM did not stop when its fence expired");
        Assert.Equal(0, vm.Process.ExitCode);
        Assert.Contains("fenced", vm.Stderr.Result, StringComparison.Ordinal);
    }

    [SkippableFact]
    public void StatusPauseResumeStatsDevicesAndAStopTheGuestAnswers()
    {
        Require();
        using var vm = StartVm("tick period=50");
        using var control = Control();

        using (var first = new ConsoleClient(ConsolePath))
        {
            Assert.True(first.WaitFor("guestkit: tick pwrbtn armed"), first.Text);
            Assert.True(first.WaitForTick(3), first.Text);
        }

        var status = Call(control, "status", VmControlJson.Default.VmStatus);
        Assert.Equal("running", status.State);
        Assert.Equal(vm.Process.Id, status.Pid);
        Assert.Equal([0, 1], status.Vcpus.Select(v => v.Id));
        Assert.True(status.UptimeSeconds > 0);
        Assert.True(status.Exits.GetValueOrDefault("io") > 0, JsonSerializer.Serialize(status.Exits));
        Assert.Null(status.StopReason);

        // A second client attaches after the first detached: the history, then live output.
        using var console = new ConsoleClient(ConsolePath);
        Assert.True(console.WaitFor("guestkit: tick 1\n"), console.Text);
        int before = console.LastTick;
        Assert.True(console.WaitForTick(before + 3), console.Text);

        // Paused: no tick for a second (20 periods); resumed: they go on.
        Assert.Equal("paused", Call(control, "pause", VmControlJson.Default.StateChange).State);
        Assert.Equal("paused", Call(control, "status", VmControlJson.Default.VmStatus).State);
        int atPause = console.AssertStandsStill();
        Assert.Equal("running", Call(control, "resume", VmControlJson.Default.StateChange).State);
        Assert.True(console.WaitForTick(atPause + 3), console.Text);

        var stats = Call(control, "stats", VmControlJson.Default.VmStats);
        Assert.Equal(256UL << 20, stats.Memory.GuestBytes);
        Assert.True(stats.Memory.ResidentBytes > 0);
        var disk = Assert.Single(stats.Disks);
        Assert.Equal("virtio-blk0", disk.Id);
        Assert.EndsWith("disk.raw", disk.Image);
        Assert.Equal(0, disk.Failed);

        var devices = Call(control, "devices", VmControlJson.Default.VmDevices).Devices;
        Assert.Contains(devices, d => d.Id == "serial0" && d.Kind == "serial16550" && d.Location == "port 0x3f8-0x3ff");
        Assert.Contains(devices, d => d.Id == "pm" && d.Kind == "acpi-pm");
        Assert.Contains(devices, d => d.Id == "virtio-blk0" && d.Kind == "virtio-pci/virtio-blk" && d.Location == "pci 00:01.0");

        // The CLI shows the same VM.
        var cli = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["control", "status", ControlPath], Timeout);
        Assert.True(cli.ExitCode == 0, cli.Stderr);
        Assert.Contains("state: running", cli.Stdout, StringComparison.Ordinal);

        // Stop: the power button, which the guest answers by powering off.
        var stop = control.CallAsync("stop", new StopRequest(), VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult)
            .WaitAsync(Timeout).GetAwaiter().GetResult();
        Assert.Equal("guest", stop.Outcome);
        Assert.Contains("power", stop.Reason, StringComparison.OrdinalIgnoreCase);
        Assert.True(console.WaitFor("guestkit: tick pwrbtn pressed"), console.Text);
        Assert.True(vm.WaitForExit(Timeout));
        Assert.Equal(0, vm.Process.ExitCode);
        Assert.True(console.Closed(TimeSpan.FromSeconds(10)), "the console socket stayed open after the VM stopped");
        Assert.False(File.Exists(ControlPath), "the control socket file outlived the VM");
        Assert.False(File.Exists(ConsolePath), "the console socket file outlived the VM");
    }

    [SkippableFact]
    public void AGuestThatIgnoresThePowerButtonIsForcedAfterTheTimeoutAndAPausedOneOnlyByForce()
    {
        Require();
        using var vm = StartVm("tick period=50 pwrbtn=0");
        using var control = Control();
        using var console = new ConsoleClient(ConsolePath);
        Assert.True(console.WaitForTick(2), console.Text);

        // Paused, the guest cannot answer the power button: refused unless forced.
        Call(control, "pause", VmControlJson.Default.StateChange);
        var refused = Assert.Throws<RpcException>(() => control.CallAsync("stop", new StopRequest(), VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult)
            .WaitAsync(Timeout).GetAwaiter().GetResult());
        Assert.Equal(RpcErrorCode.InvalidState, refused.Code);
        Assert.Contains("paused", refused.Message, StringComparison.Ordinal);
        Call(control, "resume", VmControlJson.Default.StateChange);

        var sw = Stopwatch.StartNew();
        var stop = control.CallAsync("stop", new StopRequest(Force: false, TimeoutSeconds: 1), VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult)
            .WaitAsync(Timeout).GetAwaiter().GetResult();
        Assert.Equal("forced", stop.Outcome);
        Assert.Contains("did not power off within 1 s", stop.Reason, StringComparison.Ordinal);
        Assert.True(stop.Seconds >= 0.9, $"forced after {stop.Seconds} s"); // timers may fire a little early
        Assert.True(vm.WaitForExit(Timeout));
        Assert.Equal(0, vm.Process.ExitCode);
        Assert.DoesNotContain("pwrbtn pressed", console.Text, StringComparison.Ordinal);
    }

    /// <summary>
    /// Live checkpoints through vmctl and the control socket: each stops the guest briefly (the
    /// reply says how long and where it went), moves the VM's disk onto a new layer beside it (the
    /// devices list shows it) and leaves the VM running; the checkpoint's disk is a whole copy with
    /// --copy-disks, else a child of the layer left frozen; a directory already used is refused.
    /// Deleting the second checkpoint is refused while the VM writes to the layer it would fold
    /// into; the first (on the base disk: nothing to fold) goes.
    /// </summary>
    [SkippableFact]
    public void CheckpointsThroughTheCliLeaveTheVmRunningOnNewLayers()
    {
        Require();
        TestEnvironment.SkipIf(Kvm.Hypervisor.RamCheckpointWriter.Refusal());
        using var vm = StartVm("tick period=50");
        using var console = new ConsoleClient(ConsolePath);
        Assert.True(console.WaitForTick(2), console.Text);
        string disk = Path.Combine(_dir, "disk.raw");
        var dirs = new[] { Path.Combine(_dir, "ckpt1"), Path.Combine(_dir, "ckpt2") };
        var layers = new List<string>();
        foreach (var dir in dirs)
        {
            // The first copies the disk into the checkpoint; the second makes a child of the frozen layer.
            bool copy = dir == dirs[0];
            var r = TestEnvironment.RunProcess(TestEnvironment.Vmctl,
                ["control", "checkpoint", ControlPath, dir, "--rate", "64M", "--json", .. copy ? new[] { "--copy-disks" } : []], Timeout);
            Assert.True(r.ExitCode == 0, r.Stderr);
            var c = JsonSerializer.Deserialize(r.Stdout, VmControlJson.Default.CheckpointResult)!;
            Assert.Equal("running", c.State);
            Assert.True(c.StopSeconds > 0 && c.StopSteps.Select(x => x.Name).SequenceEqual(["pause", "save state", "protect RAM", "switch disks", "resume"]),
                r.Stdout);
            Assert.Equal(Path.Combine(dir, "disk0.qcow2"), c.Disks[0]);
            Assert.Equal(["prepare", "stop", copy ? "write RAM and copy disks" : "write RAM", "write state"], c.Phases.Select(x => x.Name));
            string layer = Assert.IsType<string>(c.Layers[0]);
            Assert.Matches(@"/disk\.ckpt-[0-9a-f]{8}\.qcow2$", layer);
            Assert.True(File.Exists(layer) && File.Exists(Path.Combine(dir, "state")) && File.Exists(Path.Combine(dir, "memory")), r.Stdout);
            layers.Add(layer);
            using (var saved = Kvm.Storage.DiskImage.Open(c.Disks[0], new Kvm.Storage.ImageOpenOptions { ReadOnly = true }))
            {
                var backing = (saved as Kvm.Storage.Qcow2.Qcow2Image)?.Backing?.Path;
                Assert.Equal(copy ? null : (layers.Count == 1 ? disk : layers[^2]), backing);
                Assert.Equal(8UL << 20, saved.Size);
            }
            var devices = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["control", "devices", ControlPath], Timeout);
            Assert.Contains(layer, devices.Stdout, StringComparison.Ordinal);
            int before = console.LastTick;
            Assert.True(console.WaitForTick(before + 3), "the VM did not run on after the checkpoint: " + console.Text);
        }

        var again = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["control", "checkpoint", ControlPath, dirs[0]], Timeout);
        Assert.Equal(1, again.ExitCode);
        Assert.Contains("is not empty", again.Stderr, StringComparison.Ordinal);

        var refused = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["delete-checkpoint", dirs[1]], Timeout);
        Assert.Equal(1, refused.ExitCode);
        Assert.Contains(layers[1], refused.Stderr, StringComparison.Ordinal);
        Assert.True(Directory.Exists(dirs[1]));
        var deleted = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["delete-checkpoint", dirs[0]], Timeout);
        Assert.True(deleted.ExitCode == 0, deleted.Stderr);
        Assert.False(Directory.Exists(dirs[0]));
        Assert.True(File.Exists(disk) && File.Exists(layers[0]), "the base disk and the first layer stay");
        int last = console.LastTick;
        Assert.True(console.WaitForTick(last + 2), "the VM stopped running: " + console.Text);
    }

    [SkippableFact]
    public void ForcedStopThroughTheCliAndBadRequestsGetErrorsWhileTheVmRuns()
    {
        Require();
        using var vm = StartVm("tick period=50");
        using var console = new ConsoleClient(ConsolePath);
        Assert.True(console.WaitForTick(2), console.Text);

        using (var raw = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            raw.Connect(new UnixDomainSocketEndPoint(ControlPath));
            using var stream = new NetworkStream(raw);
            using var reader = new StreamReader(stream);
            foreach (var (line, code) in new[]
                     {
                         ("{not json", RpcErrorCode.ParseError),
                         ("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"reboot\"}", RpcErrorCode.MethodNotFound),
                         ("{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"stop\",\"params\":{\"force\":\"yes\"}}", RpcErrorCode.InvalidParams),
                         ("{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"stop\",\"params\":{\"timeoutSeconds\":-1}}", RpcErrorCode.InvalidParams),
                     })
            {
                stream.Write(Encoding.UTF8.GetBytes(line + "\n"));
                string? reply = reader.ReadLine();
                Assert.NotNull(reply);
                using var doc = JsonDocument.Parse(reply);
                Assert.Equal(code, doc.RootElement.GetProperty("error").GetProperty("code").GetInt32());
            }
        }
        int before = console.LastTick;
        Assert.True(console.WaitForTick(before + 2), "the VM stopped running after bad requests: " + console.Text);

        var stop = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["control", "stop", "--force", ControlPath], Timeout);
        Assert.True(stop.ExitCode == 0, stop.Stderr);
        Assert.StartsWith("forced: ", stop.Stdout, StringComparison.Ordinal);
        Assert.True(vm.WaitForExit(Timeout));
        Assert.Equal(0, vm.Process.ExitCode);
        Assert.DoesNotContain("pwrbtn pressed", console.Text, StringComparison.Ordinal);

        // Nothing listens any more: the CLI says so in one line.
        var gone = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["control", "status", ControlPath], Timeout);
        Assert.Equal(1, gone.ExitCode);
        Assert.Contains("cannot connect", gone.Stderr, StringComparison.Ordinal);
    }

    private static readonly string[] FuzzCorpus =
    [
        """{"jsonrpc":"2.0","id":1,"method":"status"}""",
        """{"jsonrpc":"2.0","id":"s","method":"stats","params":{}}""",
        """{"jsonrpc":"2.0","id":2,"method":"devices","params":null}""",
        """{"jsonrpc":"2.0","id":3,"method":"pause"}""",
        """{"jsonrpc":"2.0","id":4,"method":"resume"}""",
        """{"jsonrpc":"2.0","method":"status"}""",
        """{"jsonrpc":"2.0","id":5,"method":"status","params":[1]}""",
    ];

    // A mutated or random line (never a newline inside, never a valid "stop").
    private static byte[] FuzzLine(Random r)
    {
        byte[] valid = Encoding.UTF8.GetBytes(FuzzCorpus[r.Next(FuzzCorpus.Length)]);
        byte[] line = r.Next(9) switch
        {
            0 => valid,
            1 or 2 => Flip(valid, r),
            3 => valid[..r.Next(valid.Length)],
            4 => Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("[", r.Next(60, 3000))) + string.Concat(Enumerable.Repeat("]", r.Next(0, 3000)))),
            5 => [.. valid[..(valid.Length / 2)], 0xff, 0xc0, 0x80, .. valid[(valid.Length / 2)..]],
            6 => Encoding.ASCII.GetBytes($$"""{"jsonrpc":"2.0","id":{{new string('9', r.Next(1, 5000))}},"method":"status"}"""),
            7 => Random(r),
            _ => Encoding.ASCII.GetBytes($$$"""{"jsonrpc":"2.0","id":6,"method":"stats","params":{"x":"{{{new string('z', r.Next(20) == 0 ? 1_200_000 : r.Next(1000, 40000))}}}"}}"""), // now and then over the 1 MiB limit
        };
        for (int i = 0; i < line.Length; i++)
            if (line[i] == (byte)'\n')
                line[i] = (byte)' ';
        return line;

        static byte[] Flip(byte[] b, Random r)
        {
            var c = (byte[])b.Clone();
            for (int n = r.Next(1, 4); n > 0; n--)
                c[r.Next(c.Length)] = (byte)r.Next(256);
            return c;
        }

        static byte[] Random(Random r)
        {
            var b = new byte[r.Next(1, 300)];
            r.NextBytes(b);
            return b;
        }
    }

    [SkippableFact]
    public void SeededFuzzOfTheControlSocketNeitherStopsNorHangsTheVmmAndItsMemoryStaysBounded()
    {
        Require();
        using var vm = StartVm("tick period=50");
        using var console = new ConsoleClient(ConsolePath);
        Assert.True(console.WaitForTick(2), console.Text);
        long rssBefore;
        using (var c = Control())
            rssBefore = Call(c, "stats", VmControlJson.Default.VmStats).Memory.ResidentBytes;

        var random = new Random(20261202);
        int lines = 0, answers = 0, reconnects = 0;
        var budget = Stopwatch.StartNew();
        Socket? sock = null;
        StreamReader? reader = null;
        try
        {
            // At least 500 lines however slow the machine (a shared or nested host), more while time allows.
            while ((budget.Elapsed < TimeSpan.FromSeconds(20) || lines < 500) && lines < 3000 && budget.Elapsed < TimeSpan.FromSeconds(240))
            {
                if (sock is null)
                {
                    sock = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                    sock.Connect(new UnixDomainSocketEndPoint(ControlPath));
                    sock.ReceiveTimeout = 10000;
                    reader = new StreamReader(new NetworkStream(sock), Encoding.UTF8);
                }
                // Every fuzzed line is followed by a status request that must be answered: the
                // server read the line, answered it (or not, for a notification), and goes on.
                byte[] line = FuzzLine(random);
                byte[] sentinel = Encoding.ASCII.GetBytes($$"""{"jsonrpc":"2.0","id":"sentinel-{{lines}}","method":"status"}""" + "\n");
                try
                {
                    sock.Send([.. line, (byte)'\n', .. sentinel]);
                    while (true)
                    {
                        string? reply = reader!.ReadLine();
                        Assert.True(reply is not null, $"the control socket closed after line {lines}: {Encoding.UTF8.GetString(line[..Math.Min(200, line.Length)])}");
                        using var doc = JsonDocument.Parse(reply);
                        Assert.Equal("2.0", doc.RootElement.GetProperty("jsonrpc").GetString());
                        answers++;
                        if (doc.RootElement.TryGetProperty("id", out var id) && id.ValueKind == JsonValueKind.String && id.GetString() == $"sentinel-{lines}")
                            break;
                        if (doc.RootElement.TryGetProperty("error", out var e) && e.GetProperty("code").GetInt32() == RpcErrorCode.MessageTooLarge)
                            throw new IOException("closed after an oversized line, as it should be");
                    }
                }
                catch (Exception e) when (e is IOException or SocketException && line.Length > 1 << 20)
                {
                    // Only an oversized line may cost the connection (the server answers -32003 and
                    // closes it, possibly while the rest of the line is still being sent).
                    Assert.True(line.Length > 1 << 20, $"the connection broke after a line of {line.Length} bytes: {e.Message}");
                    reader!.Dispose();
                    sock.Dispose();
                    sock = null;
                    reconnects++;
                }
                lines++;
            }
        }
        finally
        {
            reader?.Dispose();
            sock?.Dispose();
        }
        Assert.True(lines >= 500, $"only {lines} lines in {budget.Elapsed}");
        Assert.True(reconnects > 0, "no oversized line was sent: the limit went untested");

        using var control = Control();
        Call(control, "resume", VmControlJson.Default.StateChange); // a fuzzed "pause" may have been the last word
        Assert.Equal("running", Call(control, "status", VmControlJson.Default.VmStatus).State);
        int tick = console.LastTick;
        Assert.True(console.WaitForTick(tick + 2), "the guest stopped running after the fuzz: " + console.Text[^Math.Min(300, console.Text.Length)..]);
        long rssAfter = Call(control, "stats", VmControlJson.Default.VmStats).Memory.ResidentBytes;
        Assert.True(rssAfter - rssBefore < 64L << 20, $"kvm-vmm's resident memory grew from {rssBefore >> 20} to {rssAfter >> 20} MiB over {lines} lines ({answers} answers, {reconnects} reconnects)");
        Assert.False(vm.Process.HasExited);
    }
}
