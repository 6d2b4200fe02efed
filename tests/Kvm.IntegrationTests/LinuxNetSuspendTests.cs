using System.Diagnostics;
using System.Text.Json;
using Kvm.Control;
using Kvm.Tests.Shared;

namespace Kvm.IntegrationTests;

/// <summary>
/// A TCP connection from a peer into a Linux guest survives 'vmctl control suspend' and 'resume'
/// (the VM handed to a new kvm-vmm, which makes its tap queues anew on the same bridge): no reset,
/// and every byte sent before, during and after the suspension arrives, checked by SHA-256 on both
/// sides.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class LinuxNetSuspendTests : BlkTestBase
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(300);
    private const string Peer = "10.77.2.1", Guest = "10.77.2.2";
    private const int Port = 7000;
    private const long Bytes = 4 << 20;

    // Sends the first half, says "half", waits for a line on stdin, sends the rest, closes its
    // side and waits for the guest to close; prints "done N SHA256". A reset ends it with a traceback.
    private const string Client = """
        import hashlib, os, socket, sys
        n = int(sys.argv[2]); data = os.urandom(n)
        s = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=600)
        s.sendall(data[:n // 2]); print("half", flush=True)
        sys.stdin.readline()
        s.sendall(data[n // 2:]); s.shutdown(socket.SHUT_WR)
        while s.recv(65536): pass
        print("done", n, hashlib.sha256(data).hexdigest(), flush=True)
        """;

    [SkippableFact]
    public void ATcpConnectionIntoTheGuestSurvivesSuspendAndResume()
    {
        var (kernel, initrd) = LinuxNetGuest.Files();
        if (!File.Exists(TestEnvironment.KvmVmm) || !File.Exists(TestEnvironment.Vmctl))
            TestEnvironment.SkipIf($"{TestEnvironment.KvmVmm} or {TestEnvironment.Vmctl} is missing (run 'make' first)");
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");

        var spec = new Dictionary<string, object>
        {
            ["kernel"] = kernel, ["initrd"] = initrd, ["debugExit"] = true, ["cpus"] = 1, ["memoryBytes"] = 256 << 20,
            ["cmdline"] = $"console=ttyS0 quiet panic=-1 ip={Guest}::{Peer}:255.255.255.0::eth0:off kvmtest=tcpserve:{Port}:{Bytes}",
            ["nics"] = new[] { new Dictionary<string, object> { ["uplinks"] = new[] { new Dictionary<string, object> { ["tap"] = net.Prefix + "t0", ["bridge"] = bridge } } } },
        };
        File.WriteAllText(P("vm.json"), JsonSerializer.Serialize(spec));
        using var vm = LiveProcess.Start(TestEnvironment.KvmVmm,
            ["--spec", P("vm.json"), "--control", P("vm.control"), "--console", P("vm.console"), "--exit-file", P("vm.exit")]);
        Assert.True(SpinWait.SpinUntil(() => File.Exists(P("vm.control")) && File.Exists(P("vm.console")) || vm.Process.HasExited, Wait),
            "kvm-vmm did not create its sockets");
        int newPid = 0;
        var text = new System.Text.StringBuilder();
        try
        {
            using (var console = new ConsoleClient(P("vm.console")))
            {
                Assert.True(SpinWait.SpinUntil(() => console.Text.Contains($"tcpserve listening {Port}", StringComparison.Ordinal) || vm.Process.HasExited, Wait),
                    "the guest did not listen; console:\n" + console.Text);

                using var client = Process.Start(new ProcessStartInfo("ip", ["netns", "exec", peer.Namespace, net.Python, "-c", Client, Guest, Bytes.ToString(System.Globalization.CultureInfo.InvariantCulture), Port.ToString(System.Globalization.CultureInfo.InvariantCulture)])
                {
                    RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
                })!;
                var stderr = client.StandardError.ReadToEndAsync();
                Assert.Equal("half", client.StandardOutput.ReadLine());

                var suspend = Vmctl("control", "suspend", P("vm.control"));
                Assert.True(suspend.ExitCode == 0, suspend.Stdout + suspend.Stderr);
                Thread.Sleep(2000);
                var resume = Vmctl("control", "resume", P("vm.control"), "--json");
                Assert.True(resume.ExitCode == 0, resume.Stdout + resume.Stderr);
                newPid = JsonSerializer.Deserialize(resume.Stdout, VmControlJson.Default.HandoverResult)!.Pid;
                Assert.True(console.Closed(Wait));
                text.Append(console.Text);

                client.StandardInput.WriteLine("go");
                client.StandardInput.Close();
                string? done = client.StandardOutput.ReadLine();
                Assert.True(client.WaitForExit(Wait), "the peer's client did not end");
                Assert.True(client.ExitCode == 0 && done is not null, $"the peer's connection failed (exit {client.ExitCode}): {stderr.Result}");
                var parts = done!.Split(' ');
                Assert.Equal(["done", Bytes.ToString(System.Globalization.CultureInfo.InvariantCulture)], parts[..2]);

                using var after = new ConsoleClient(P("vm.console"));
                VmExitRecord? record = null;
                Assert.True(SpinWait.SpinUntil(() => (record = VmHost.ReadExitRecord(P("vm.exit"))) is not null, Wait), "no exit record: the VM did not end");
                Assert.True(after.Closed(Wait));
                text.Append(after.Text);
                string console2 = text.ToString().Replace("\r", "");
                Assert.True(record!.Status == 0 && !record.Failed, $"verdict {record.Status}; console:\n{console2}");
                Assert.Contains($"kvm-guest: tcpserve got {Bytes} {parts[2]}\n", console2);
            }
            Assert.True(vm.Process.WaitForExit(Wait), "the old kvm-vmm did not exit after the hand-over");
        }
        finally
        {
            if (newPid != 0)
            {
                try
                {
                    using var p = Process.GetProcessById(newPid);
                    p.Kill();
                }
                catch (ArgumentException)
                {
                }
            }
        }
    }

    private static ProcessResult Vmctl(params string[] args) => TestEnvironment.RunProcess(TestEnvironment.Vmctl, args, Wait);
}
