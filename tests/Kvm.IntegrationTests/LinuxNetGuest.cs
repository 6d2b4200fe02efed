using System.Diagnostics;
using System.Globalization;
using Kvm.Tests.Shared;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>
/// What the Linux network tests share: Debian's kernel and the test initramfs (build/linux), a VM
/// spec that gives the guest an address on a peer's subnet and the checks to run, and a TCP
/// receiver in a peer's namespace that measures the stream it gets.
/// </summary>
internal static class LinuxNetGuest
{
    /// <summary>The kernel and initramfs; skips the test (fails it under CI) without KVM or without them.</summary>
    public static (string Kernel, string Initrd) Files()
    {
        TestEnvironment.RequireKvm();
        string kernel = Path.Combine(TestEnvironment.BuildDir, "linux", "bzImage");
        string initrd = Path.Combine(TestEnvironment.BuildDir, "linux", "initramfs.cpio.gz");
        if (!File.Exists(kernel) || !File.Exists(initrd))
            TestEnvironment.SkipIf($"{kernel} or {initrd} is missing (run 'make linux', which fetches Debian's kernel)");
        return (kernel, initrd);
    }

    /// <summary>A guest at <paramref name="address"/>/24 (gateway <paramref name="peer"/>) running init's <paramref name="checks"/> with <paramref name="nic"/>.</summary>
    public static VmSpec Spec(string address, string peer, string checks, NicSpec nic, int cpus = 1)
    {
        var (kernel, initrd) = Files();
        return new VmSpec
        {
            Kernel = kernel, Initrd = initrd, Cpus = cpus, MemoryBytes = 256UL << 20, DebugExit = true,
            Cmdline = $"console=ttyS0 quiet panic=-1 ip={address}::{peer}:255.255.255.0::eth0:off kvmtest={checks}",
            Nics = [nic],
        };
    }

    // Receives one client until it closes; prints "got N" every MiB and "done N SHA256 GAP_MS RATE"
    // (the longest time between two reads, the outage a failover caused; the rate in bit/s from
    // the first MiB to the end, past TCP's slow start).
    private const string Receiver = """
        import hashlib, socket, sys, time
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(sys.argv[1]))); s.listen(1); print("listening", flush=True)
        c, _ = s.accept(); h = hashlib.sha256(); n = 0; mark = 1 << 20; last = time.monotonic(); gap = 0.0; t1 = None; n1 = 0
        while True:
            d = c.recv(65536)
            now = time.monotonic()
            if not d: break
            if n > 0: gap = max(gap, now - last)
            last = now; h.update(d); n += len(d)
            if t1 is None and n >= 1 << 20: t1 = now; n1 = n
            if n >= mark:
                print("got", n, flush=True); mark += 1 << 20
        rate = int((n - n1) * 8 / (last - t1)) if t1 is not None and last > t1 else 0
        print("done", n, h.hexdigest(), int(gap * 1000), rate, flush=True)
        """;

    /// <summary>Starts the receiver on <paramref name="port"/> in <paramref name="peer"/>'s namespace; returns once it listens.</summary>
    public static Process StartReceiver(NetTopology net, NetPeer peer, int port)
    {
        var receiver = TestEnvironment.StartRedirected("ip",
            ["netns", "exec", peer.Namespace, net.Python, "-c", Receiver, port.ToString(CultureInfo.InvariantCulture)]);
        receiver.StandardInput.Close();
        net.Track(receiver);
        Assert.Equal("listening", receiver.StandardOutput.ReadLine());
        return receiver;
    }

    /// <summary>Reads the receiver's lines up to its "done" line, split: done, N, SHA256, GAP_MS, RATE.</summary>
    public static string[] Done(Process receiver)
    {
        string? line;
        while ((line = receiver.StandardOutput.ReadLine()) is not null && !line.StartsWith("done", StringComparison.Ordinal)) { }
        Assert.NotNull(line);
        return line!.Split(' ');
    }

    /// <summary>What the guest's init printed, without the "kvm-guest: " prefix.</summary>
    public static string[] GuestLines(string console) =>
        console.Replace("\r", "").Split('\n').Where(l => l.StartsWith("kvm-guest: ", StringComparison.Ordinal)).Select(l => l["kvm-guest: ".Length..]).ToArray();
}
