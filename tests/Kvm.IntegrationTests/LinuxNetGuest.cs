using System.Diagnostics;
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

    /// <summary>
    /// A guest at <paramref name="address"/>/24 (gateway <paramref name="peer"/>) running init's
    /// <paramref name="checks"/> with <paramref name="nic"/>; its network checks wait
    /// <paramref name="netWaitSeconds"/> for the peer to answer or accept (init's default: 30).
    /// </summary>
    public static VmSpec Spec(string address, string peer, string checks, NicSpec nic, int cpus = 1, int? netWaitSeconds = null)
    {
        var (kernel, initrd) = Files();
        return new VmSpec
        {
            Kernel = kernel, Initrd = initrd, Cpus = cpus, MemoryBytes = 256UL << 20, DebugExit = true,
            Cmdline = $"console=ttyS0 quiet panic=-1 ip={address}::{peer}:255.255.255.0::eth0:off kvmtest={checks}" +
                      (netWaitSeconds is { } wait ? $" kvmnetwait={wait}" : ""),
            Nics = [nic],
        };
    }

    /// <summary>
    /// Starts the <see cref="StreamReceiver"/> on <paramref name="port"/> in <paramref name="peer"/>'s
    /// namespace; returns once it listens. It prints "got N" every MiB and at the end
    /// "done N SHA256 GAP_MS RATE GAP_END" (the longest silence between two reads is the outage a
    /// failover caused).
    /// </summary>
    public static Process StartReceiver(NetTopology net, NetPeer peer, int port)
    {
        var receiver = TestEnvironment.StartRedirected("ip", StreamReceiver.IpArguments(peer.Namespace, net.Python, port));
        receiver.StandardInput.Close();
        net.Track(receiver);
        Assert.Equal("listening", receiver.StandardOutput.ReadLine());
        return receiver;
    }

    /// <summary>Reads the receiver's lines up to its "done" line, split: done, N, SHA256, GAP_MS, RATE, GAP_END.</summary>
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
