using System.Globalization;
using Kvm.Network;
using Kvm.Tests.Shared;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;
using Kvm.Vmm.Snapshot;

namespace Kvm.IntegrationTests;

/// <summary>
/// Forks of a Linux guest (Debian's cloud kernel): each comes up with a VM generation id of its
/// own (the ACPI VMGENID device; the guest sees GPE 0 fire and reads the new id), a MAC of its own
/// (the guest's virtio_net reads it when the device is probed again), and reaches a peer on the
/// network with that MAC through a tap of its own on the template's bridge. Needs /dev/kvm (the
/// nested host), root (taps, bridges, namespaces) and build/linux.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public sealed class LinuxForkTests : IDisposable
{
    private static readonly TimeSpan BootTimeout = TimeSpan.FromSeconds(400);
    private static readonly TimeSpan ForkTimeout = TimeSpan.FromSeconds(300);
    private const string Peer = "10.77.6.1", Guest = "10.77.6.2";
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-linux-fork-").FullName;

    public void Dispose()
    {
        try
        {
            foreach (var file in Directory.EnumerateFiles(_dir, "*", SearchOption.AllDirectories))
                File.SetUnixFileMode(file, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    /// <summary>The id as init's genid check prints it: two 64-bit little-endian words in hex.</summary>
    private static string Hex(Guid id)
    {
        byte[] b = id.ToByteArray();
        return BitConverter.ToUInt64(b, 0).ToString("x16", CultureInfo.InvariantCulture) + BitConverter.ToUInt64(b, 8).ToString("x16", CultureInfo.InvariantCulture);
    }

    /// <summary>
    /// A Linux guest waits for its generation id to change and is saved while it waits; two forks
    /// run one after the other (they keep the template's address). In each, GPE 0 fired and the id
    /// the guest reads is the fork's own (not the template's, not the other fork's); after the NIC
    /// is probed again the guest's eth0 has the fork's MAC, it answers pings from the peer's side
    /// and the peer's neighbour table holds that MAC for the guest's address.
    /// </summary>
    [SkippableFact]
    public void ForksComeUpWithGenerationIdsAndMacsOfTheirOwnAndEachReachesThePeer()
    {
        LinuxNetGuest.Files();
        using var net = NetTopology.Create();
        string bridge = net.AddBridge();
        var peer = net.AddPeer(bridge, Peer + "/24");
        var nic = new NicSpec { Mac = MacAddress.Random(), Uplinks = [new UplinkSpec { Tap = net.Prefix + "t0", Bridge = bridge }] };
        string checks = $"genid:0x{X86Layout.VmGenIdAddress:x}:900,renet,ping:{Peer}";
        var spec = LinuxNetGuest.Spec(Guest, Peer, checks, nic);
        string template = Path.Combine(_dir, "template");

        var serial = new SerialCapture();
        Guid parentId;
        using (var vm = VirtualMachine.Create(spec, serial.Write))
        {
            parentId = vm.GenerationId ?? throw new InvalidOperationException("a booted VM has no generation id");
            vm.Start();
            bool waiting = serial.WaitFor(" waiting", BootTimeout);
            Assert.True(waiting, $"the guest did not reach its genid wait; console:\n{serial.Text}");
            vm.Pause();
            VmSnapshot.Save(vm, template);
        }
        string[] parentLines = LinuxNetGuest.GuestLines(serial.Text);
        Assert.Contains($"genid {Hex(parentId)} gpe 0 waiting", parentLines);
        Assert.Contains("genid device \\_SB_.VGEN", parentLines);

        var ids = new List<Guid> { parentId };
        var macs = new List<MacAddress> { nic.Mac };
        for (int i = 0; i < 2; i++)
        {
            var console = new SerialCapture();
            var fork = VmFork.Restore(template, Path.Combine(_dir, $"fork-{i}"), console.Write);
            Guid id;
            using (var vm = fork.Vm)
            {
                id = vm.GenerationId ?? throw new InvalidOperationException("a fork has no generation id");
                Assert.True((vm.Gpe.Registers.Status & 1) != 0, "GPE 0 is not raised in the fork");
                using var cancel = new CancellationTokenSource(ForkTimeout);
                var reason = vm.Run(cancel.Token);
                Assert.True(reason == new DebugExitStop(0),
                    $"fork {i}: {reason.Describe()} (0 = every check passed; N = check N of '{checks}' failed); console:\n{console.Text}");
            }
            string[] lines = LinuxNetGuest.GuestLines(console.Text);
            Assert.Contains(lines, l => l.StartsWith($"genid changed {Hex(id)} gpe ", StringComparison.Ordinal));
            Assert.Contains($"net eth0 {Guest}/24 mac {fork.Macs[0]}", lines);
            Assert.Contains($"PASS ping:{Peer}", lines);
            var neigh = peer.Run("ip", "neigh", "show", Guest);
            Assert.True(neigh.Stdout.Contains(fork.Macs[0].ToString(), StringComparison.OrdinalIgnoreCase),
                $"the peer's neighbour entry for {Guest} is '{neigh.Stdout.Trim()}', not fork {i}'s MAC {fork.Macs[0]}");
            ids.Add(id);
            macs.Add(fork.Macs[0]);
        }
        Assert.Equal(ids.Count, ids.Distinct().Count());
        Assert.Equal(macs.Count, macs.Distinct().Count());
    }
}
