using System.Diagnostics;
using Kvm.Tests.Shared;

// Benchmarks against QEMU, measured in the same run. The first argument picks one:
//   boot (the default): `vmctl run` of the guest kit's `hello` against QEMU (microvm) booting the
//         same ELF, alternating the two so both see the same machine load. Prints each side and the ratio.
//   disk: `vmctl disk bench` against `qemu-img bench` on the same kinds of image (DiskBenchmark.cs).
//   blk: the guest kit's blk-bench on a virtio-blk disk, vmctl run against QEMU q35 (BlkBenchmark.cs).
//   linux: Debian's kernel from process start to the first line of the initramfs's init, vmctl run
//         against QEMU: the PVH vmlinux against microvm, the bzImage against q35
//         (LinuxBootBenchmark.cs; needs 'make linux').
//   kvmd: kvmd's RPC round trip against QEMU's QMP, vmctl list and vm.list with 100 VMs in the
//         inventory, VM creation to the guest's first line through kvmd against vmctl run and QEMU,
//         and a lease takeover after the owner freezes against the lease duration (KvmdBenchmark.cs).
//   snapshot: save, restore to first instruction and the working set after a restore, for 256 MiB and
//         1 GiB guests, kvm-vmm (eager, lazy, and lazy with the working set recorded at the save
//         loaded first) against QEMU's migration to and from a file; and the guest's pause for an
//         upgrade in place and a suspend/resume against QEMU's local live migration
//         (SnapshotBenchmark.cs, SnapshotBenchmark.Pause.cs).
//   net: virtio-net, TCP throughput each way (iperf3) and request/response latency between a Linux
//         guest and a peer namespace over a bridge, vmctl run --net against QEMU q35 virtio-net-pci
//         on a tap, without and with vhost-net; and the failover gap of a TCP stream when the active
//         uplink's link goes down, vmctl run's NIC team against QEMU on a Linux bond (active-backup,
//         miimon 100) over the same two paths (NetBenchmark.cs, NetBenchmark.Failover.cs; needs root and 'make linux').
// boot, blk, linux, kvmd (all but its 'list' part), snapshot, checkpoint and net need /dev/kvm; where the machine has none,
// `make bench` runs them inside one nested KVM host (tests/kvm-host/kvm-host). Each prints where it
// measured.
// Usage: make bench [BENCH_ARGS="--runs 30"] [DISK_BENCH_ARGS="--runs 7"] [BLK_BENCH_ARGS="--runs 5"]
//                   [LINUX_BENCH_ARGS="--runs 3 --limit 300"] [KVMD_BENCH_ARGS="--calls 1000"]
//                   [SNAPSHOT_BENCH_ARGS="--runs 3 --sizes 256M"] [CHECKPOINT_BENCH_ARGS="--parts fork --runs 3"]
//                   [NET_BENCH_ARGS="--runs 3 --time 10"]

if (args.Length > 0 && args[0] == "disk")
    return DiskBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "blk")
    return BlkBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "linux")
    return LinuxBootBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "kvmd")
    return KvmdBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "snapshot")
    return SnapshotBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "net")
    return NetBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "checkpoint")
    return CheckpointBenchmark.Run(args[1..]);
if (args.Length > 0 && args[0] == "boot")
    args = args[1..];

int runs = 20;
for (int i = 0; i < args.Length; i++)
{
    if (args[i] == "--runs" && i + 1 < args.Length && int.TryParse(args[i + 1], out int n) && n > 0)
        runs = n;
    else if (args[i] is "--help" or "-h")
    {
        Console.WriteLine("Usage: Kvm.Benchmarks [boot] [--runs N]   (default 20)\n       Kvm.Benchmarks disk|blk|linux|kvmd|snapshot|net --help");
        return 0;
    }
}

string guest = TestEnvironment.GuestKit, vmctl = TestEnvironment.Vmctl;
if (!Prerequisites.Check([Prerequisites.GuestKit, Prerequisites.Vmctl], [Prerequisites.Qemu]) || !Place.CheckKvm())
    return 1;
string qemu = TestEnvironment.FindOnPath("qemu-system-x86_64")!;

string[] ours = ["run", "--kernel", guest, "--cmdline", "hello", "--debug-exit", "--memory", "256M"];
string[] theirs =
[
    "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-m", "256M", "-kernel", guest, "-append", "hello",
];

var a = new List<double>();
var b = new List<double>();
DateTime started = DateTime.UtcNow;
try
{
    // One untimed run of each warms the page cache.
    Time(vmctl, ours, 0);
    Time(qemu, theirs, 1);
    for (int i = 0; i < runs; i++)
    {
        a.Add(Time(vmctl, ours, 0));
        b.Add(Time(qemu, theirs, 1));
        Console.Error.WriteLine($"run {i + 1}/{runs}: vmctl {a[^1]:0} ms, qemu {b[^1]:0} ms");
    }
}
catch (InvalidOperationException e)
{
    Console.Error.WriteLine($"benchmark: boot: {e.Message}");
    return 1;
}

Console.WriteLine($"boot-to-exit of guestkit 'hello', {runs} runs each, alternating ({started:yyyy-MM-dd HH:mm} UTC, {Place.ForVm})");
Console.WriteLine($"{"",-22}{"median ms",12}{"mean ms",12}{"min ms",12}");
Row("vmctl run", a);
Row("qemu-system-x86_64", b);
Console.WriteLine($"ratio vmctl/qemu (median): {Median(a) / Median(b):0.00}   (below 1 means vmctl is faster)");
return 0;

static double Time(string file, string[] args, int expectedStatus)
{
    // stdin is an empty pipe for both VMMs (no terminal, nothing to type), the same in every place.
    var psi = new ProcessStartInfo(file)
    {
        RedirectStandardOutput = true,
        RedirectStandardError = true,
        RedirectStandardInput = true,
        UseShellExecute = false,
    };
    foreach (var x in args)
        psi.ArgumentList.Add(x);
    var sw = Stopwatch.StartNew();
    using var p = Process.Start(psi)!;
    p.StandardInput.Close();
    var error = p.StandardError.ReadToEndAsync();
    var output = p.StandardOutput.ReadToEndAsync();
    // 'hello' takes milliseconds on a host with KVM and seconds in the nested host; a run past a
    // minute is stuck, and is stopped and reported rather than waited for.
    if (!p.WaitForExit(TimeSpan.FromSeconds(60)))
    {
        try
        {
            p.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // It ended just now.
        }
        p.WaitForExit();
        throw new InvalidOperationException($"{file} {string.Join(' ', args)} did not end within 60 s and was stopped; " +
                                            $"its output: '{output.Result.Trim()}', stderr: '{error.Result.Trim()}'");
    }
    p.WaitForExit();
    sw.Stop();
    if (p.ExitCode != expectedStatus || !output.Result.Contains("guestkit: hello"))
        throw new InvalidOperationException($"{file} {string.Join(' ', args)} exited with status {p.ExitCode} " +
                                            $"(expected {expectedStatus} and 'guestkit: hello'); its output: '{output.Result.Trim()}', " +
                                            $"stderr: '{error.Result.Trim()}'");
    return sw.Elapsed.TotalMilliseconds;
}

static double Median(List<double> v)
{
    var s = v.Order().ToArray();
    return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
}

static void Row(string name, List<double> v) =>
    Console.WriteLine($"{name,-22}{Median(v),12:0.0}{v.Average(),12:0.0}{v.Min(),12:0.0}");
