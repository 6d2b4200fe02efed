using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;
using Kvm.Control;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
using Kvm.Rpc;
using Kvm.Storage.Qcow2;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.IntegrationTests;

/// <summary>
/// Forks of a saved VM (VmFork; 'vmctl fork DIR --into OUT'): each carries on from the snapshot's
/// instant on RAM mapped copy-on-write from its memory file and on a disk of its own (a qcow2
/// child of the snapshot's), isolated from the others and from the snapshot. Needs /dev/kvm (the
/// nested host).
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed partial class ForkTests : BlkTestBase
{
    /// <summary>A guest kit template: the pattern written over 32 MiB of 64 and read once, saved part way through its reads, with a blank 8 MiB qcow2 disk.</summary>
    private (string Dir, string Disk) Template() => Template(out _);

    private (string Dir, string Disk) Template(out Guid generationId)
    {
        string disk = P("template-disk.qcow2");
        Qcow2Image.Create(disk, new Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        var spec = GuestKitRunner.Spec("pattern size=32M rounds=3") with { MemoryBytes = 64UL << 20, Cpus = 1, Disks = [new DiskSpec { Path = disk }] };
        var serial = new SerialCapture();
        string dir = P("template");
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            generationId = vm.GenerationId ?? Guid.Empty;
            vm.Start();
            Assert.True(serial.WaitFor("guestkit: pattern round 1\n", Timeout), serial.Text);
            vm.Pause();
            VmSnapshot.Save(vm, dir);
        }
        Assert.DoesNotContain("pattern done", serial.Text);
        return (dir, disk);
    }

    /// <summary>
    /// Sixteen forks of one template at once: each finishes the template's pattern check (its RAM is
    /// the template's at the fork), a mark the host writes into one fork's RAM and disk is seen by no
    /// other fork nor in the template's files, which never change; each fork's disk is a child of
    /// the template's, which became read-only. Nothing was copied up front, and the forks together
    /// hold about one copy of what they read (each mapping's proportional share, Pss, sums to about
    /// the pages read once) plus little of their own.
    /// </summary>
    [SkippableFact]
    public void SixteenForksSeeTheTemplatesMemoryAndKeepTheirWritesToThemselves()
    {
        GuestKitRunner.Require();
        const int Forks = 16;
        var (template, disk) = Template(out Guid templateId);
        Assert.NotEqual(Guid.Empty, templateId);
        string memoryFile = Path.Combine(template, SnapshotFormat.MemoryFileName);
        string memorySha = Smaps.Sha256(memoryFile), diskSha = Smaps.Sha256(disk);
        var serials = new SerialCapture[Forks];
        var forks = new List<ForkedVm>();
        try
        {
            for (int i = 0; i < Forks; i++)
            {
                serials[i] = new SerialCapture();
                forks.Add(VmFork.Restore(template, P($"fork-{i}"), serials[i].Write));
            }
            Assert.Equal(0, (int)(File.GetUnixFileMode(disk) & UnixFileMode.UserWrite));
            // Each fork has a generation id of its own, announced through GPE 0 (its status raised).
            var ids = forks.Select(f => f.Vm.GenerationId ?? Guid.Empty).Append(templateId).ToArray();
            Assert.Equal(Forks + 1, ids.Distinct().Count());
            Assert.All(forks, f => Assert.True((f.Vm.Gpe.Registers.Status & 1) != 0, "GPE 0 is not raised in a fork"));
            var region = forks[0].Vm.Memory.Regions[0];
            ulong top = region.GuestAddress + region.Size - GuestMemory.PageSize;   // above the pattern, untouched by the guest
            long rssBefore = forks.Sum(f => Smaps.Of(null, f.Vm.Memory.Regions[0].Host)["Rss"]);
            Assert.True(rssBefore < Forks * (4L << 10), $"the forks hold {rssBefore} kB of RAM before they ran: was RAM copied?");

            // Each fork's mark: its number in RAM (top page) and on its disk (sector 1).
            for (int i = 0; i < Forks; i++)
            {
                var f = forks[i];
                Assert.Equal(Path.Combine(P($"fork-{i}"), VmFork.DiskFileName(0)), f.Disks[0]);
                Assert.Equal(memoryFile, f.Vm.Memory.PrivateCopyOf);
                f.Vm.Memory.WriteU64(top, 0xF0F0_0000UL + (ulong)i);
                var sector = new byte[512];
                BitConverter.TryWriteBytes(sector, 0xD15C_0000UL + (ulong)i);
                ((VirtioBlock)f.Vm.Disks[0].Device).Image.Write(512, sector);
            }
            foreach (var f in forks)
                f.Vm.Start();
            for (int i = 0; i < Forks; i++)
            {
                var vm = forks[i].Vm;
                if (!vm.Stopped.WaitAsync(Timeout * 2).ContinueWith(t => t.IsCompletedSuccessfully).GetAwaiter().GetResult())
                    Assert.Fail($"fork {i} did not finish; console:\n{serials[i].Text}\n--- the VM now ---\n{vm.DescribeState()}");
                Assert.True(vm.Stopped.Result is DebugExitStop { Status: 0 }, $"fork {i}: {vm.Stopped.Result.Describe()}; console:\n{serials[i].Text}");
                Assert.Contains("guestkit: pattern done rounds=3", serials[i].Text);
                Assert.DoesNotContain("pattern written", serials[i].Text);
            }
            long pss = 0;
            for (int i = 0; i < Forks; i++)
            {
                var f = forks[i];
                Assert.Equal(0xF0F0_0000UL + (ulong)i, f.Vm.Memory.ReadU64(top));
                var sector = new byte[512];
                ((VirtioBlock)f.Vm.Disks[0].Device).Image.Read(512, sector);
                Assert.Equal(0xD15C_0000UL + (ulong)i, BitConverter.ToUInt64(sector));
                var smaps = Smaps.Of(null, f.Vm.Memory.Regions[0].Host);
                Assert.True(smaps["Rss"] >= 32 << 10, $"fork {i} read the 32 MiB pattern but maps {smaps["Rss"]} kB");
                Assert.True(smaps["Private_Dirty"] < 8 << 10, $"fork {i} holds {smaps["Private_Dirty"]} kB of its own RAM, though it only read: {string.Join(", ", smaps)}");
                pss += smaps["Pss"];
            }
            long ownMax = forks.Max(f => Smaps.Of(null, f.Vm.Memory.Regions[0].Host)["Private_Dirty"]);
            Assert.True(pss < (40L << 10) + Forks * ownMax,
                $"the forks' RAM mappings hold {pss} kB in proportional shares: more than one copy of the 32 MiB they read plus {ownMax} kB each of their own");
        }
        finally
        {
            foreach (var f in forks)
                f.Vm.Dispose();
        }
        Assert.Equal(memorySha, Smaps.Sha256(memoryFile));
        Assert.Equal(diskSha, Smaps.Sha256(disk));
        for (int i = 0; i < Forks; i++)
        {
            var r = QemuImg("info", "--output=json", Path.Combine(P($"fork-{i}"), VmFork.DiskFileName(0)));
            Assert.True(r.ExitCode == 0, r.Stderr);
            Assert.Equal(disk, JsonDocument.Parse(r.Stdout).RootElement.GetProperty("backing-filename").GetString());
        }
    }

    private static VmStatus Status(string socket)
    {
        using var client = RpcClient.Connect(socket, "a fork");
        return client.CallAsync("status", VmControlJson.Default.VmStatus).WaitAsync(Timeout).GetAwaiter().GetResult();
    }

    /// <summary>A fork as 'vmctl fork --json' prints it.</summary>
    private sealed record ForkInfo(int Index, string Directory, int Pid, string ControlSocket, string ConsoleSocket, string[] Disks, Guid? GenerationId);

    private static ForkInfo[] Fork(string template, string into, int count)
    {
        var r = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["fork", template, "--into", into, "--count", count.ToString(CultureInfo.InvariantCulture), "--json"], Timeout);
        Assert.True(r.ExitCode == 0, $"vmctl fork: status {r.ExitCode}: {r.Stdout}{r.Stderr}");
        return r.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l =>
        {
            var e = JsonDocument.Parse(l).RootElement;
            return new ForkInfo(e.GetProperty("index").GetInt32(), e.GetProperty("directory").GetString()!, e.GetProperty("pid").GetInt32(),
                e.GetProperty("controlSocket").GetString()!, e.GetProperty("consoleSocket").GetString()!,
                e.GetProperty("disks").EnumerateArray().Select(d => d.GetString()!).ToArray(),
                e.TryGetProperty("generationId", out var g) && g.ValueKind == JsonValueKind.String ? g.GetGuid() : null);
        }).ToArray();
    }

    /// <summary>
    /// 'vmctl fork DIR --into OUT --count 3' on a ticking guest: three kvm-vmm processes run at
    /// once, each counting on from the snapshot's tick (no new boot) on a disk of its own, its RAM
    /// a mapping of the memory file of which it copied little (the guest had filled 16 MiB). A fork saved and
    /// forked again counts on from its own save point. A bad snapshot is refused with one error.
    /// </summary>
    [SkippableFact]
    public void ForksThroughTheCliRunAsProcessesAndAForkForksAgain()
    {
        GuestKitRunner.Require();
        if (!File.Exists(TestEnvironment.KvmVmm) || !File.Exists(TestEnvironment.Vmctl))
            throw new SkipException($"{TestEnvironment.KvmVmm} or {TestEnvironment.Vmctl} is missing (run 'make' first)");
        string disk = P("tick.qcow2");
        Qcow2Image.Create(disk, new Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        var spec = GuestKitRunner.Spec("tick period=50 fill=16M") with { MemoryBytes = 64UL << 20, Cpus = 2, Disks = [new DiskSpec { Path = disk }] };
        var serial = new SerialCapture();
        string template = P("template");
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            vm.Start();
            Assert.True(serial.WaitFor("guestkit: tick 20\n", Timeout), serial.Text);
            vm.Pause();
            VmSnapshot.Save(vm, template);
        }
        int saved = TickNumbers(serial.Text).Max();

        var bad = TestEnvironment.RunProcess(TestEnvironment.Vmctl, ["fork", P("nothing"), "--into", P("out0")], Timeout);
        Assert.Equal(1, bad.ExitCode);
        Assert.Contains(P("nothing"), bad.Stderr, StringComparison.Ordinal);

        var forks = Fork(template, P("out"), 3);
        try
        {
            Assert.Equal(3, forks.Select(f => f.Pid).Distinct().Count());
            // Each fork reports a generation id of its own (vmctl fork --json, and its status).
            Assert.All(forks, f => Assert.NotNull(f.GenerationId));
            Assert.Equal(3, forks.Select(f => f.GenerationId).Distinct().Count());
            Assert.All(forks, f => Assert.Equal(f.GenerationId, Status(f.ControlSocket).GenerationId));
            string memoryFile = Path.Combine(template, SnapshotFormat.MemoryFileName);
            foreach (var f in forks)
            {
                Assert.Equal("running", Status(f.ControlSocket).State);
                Assert.Equal(Path.Combine(f.Directory, VmFork.DiskFileName(0)), Assert.Single(f.Disks));
                using var console = new ConsoleClient(f.ConsoleSocket);
                Assert.True(console.WaitForTick(saved + 20), $"fork {f.Index} did not count on: {console.Text}");
                var ticks = TickNumbers(console.Text);
                Assert.True(ticks.Min() > saved - 5, $"fork {f.Index} counted from {ticks.Min()}, the snapshot was at {saved}: a new boot?\n{console.Text}");
                // RAM maps the memory file; the 16 MiB the guest filled before the save was not copied.
                var smaps = Smaps.Of(f.Pid, file: memoryFile);
                Assert.True(smaps["Size"] == 64 << 10 && smaps["Private_Dirty"] + smaps["Private_Clean"] < 8 << 10,
                    $"fork {f.Index}'s RAM mapping of {memoryFile}: {string.Join(", ", smaps)}");
            }

            // A fork of a fork: fork 1 saved with stop (its disk must not change under its forks), then forked.
            int saved2;
            using (var console = new ConsoleClient(forks[0].ConsoleSocket))
            {
                Assert.True(console.WaitForTick(1), console.Text);
                using (var control = RpcClient.Connect(forks[0].ControlSocket, "fork 1"))
                    control.CallAsync("save", new SaveRequest(P("template2"), Stop: true), VmControlJson.Default.SaveRequest, VmControlJson.Default.SaveResult)
                        .WaitAsync(Timeout).GetAwaiter().GetResult();
                Assert.True(console.Closed(Timeout), "fork 1 did not stop after its save");
                saved2 = TickNumbers(console.Text).Max();
            }
            var grandchild = Assert.Single(Fork(P("template2"), P("out2"), 1));
            try
            {
                using var console = new ConsoleClient(grandchild.ConsoleSocket);
                Assert.True(console.WaitForTick(saved2 + 10), console.Text);
                Assert.True(TickNumbers(console.Text).Min() > saved, $"the fork of a fork counted from {TickNumbers(console.Text).Min()}:\n{console.Text}");
            }
            finally
            {
                Stop(grandchild);
            }
        }
        finally
        {
            foreach (var f in forks)
                Stop(f);
        }
    }

    private static void Stop(ForkInfo fork)
    {
        try
        {
            using var client = RpcClient.Connect(fork.ControlSocket, "a fork");
            client.CallAsync("stop", new StopRequest(Force: true), VmControlJson.Default.StopRequest, VmControlJson.Default.StopResult)
                .WaitAsync(Timeout).GetAwaiter().GetResult();
        }
        catch (RpcException)
        {
        }
        SpinWait.SpinUntil(() => Gone(fork.Pid), Timeout);
    }

    /// <summary>Whether process <paramref name="pid"/> has ended (gone, or a zombie nobody reaps: a fork is no child of this process).</summary>
    private static bool Gone(int pid)
    {
        try
        {
            return File.ReadAllText($"/proc/{pid}/stat").Contains(") Z ", StringComparison.Ordinal);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return true;
        }
    }

    private static int[] TickNumbers(string console) => TickLine().Matches(console)
        .Select(m => int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)).ToArray();

    [GeneratedRegex(@"^guestkit: tick (\d+)\r?$", RegexOptions.Multiline)]
    private static partial Regex TickLine();
}
