namespace Kvm.Cluster;

/// <summary>kvmd's configuration: where it listens, keeps state, finds kvm-vmm, and its inventory.</summary>
public sealed record KvmdOptions
{
    /// <summary>The RPC socket vmctl talks to.</summary>
    public string Socket { get; init; } = "/run/kvm/kvmd.sock";

    /// <summary>Persistent state: the private PostgreSQL cluster, VM logs.</summary>
    public string StateDirectory { get; init; } = "/var/lib/kvm";

    /// <summary>Runtime files: each VM's control and console sockets, its spec as started, its exit status.</summary>
    public string RunDirectory { get; init; } = "/run/kvm";

    /// <summary>A shared PostgreSQL cluster (several hosts); null runs kvmd's private one under <see cref="StateDirectory"/>.</summary>
    public string? Database { get; init; }

    /// <summary>This host's name in the inventory (default: the machine's host name).</summary>
    public string HostName { get; init; } = Environment.MachineName;

    /// <summary>The group whose members may use kvmd's and the VMs' sockets (besides root).</summary>
    public string? Group { get; init; } = "kvm";

    /// <summary>The kvm-vmm executable (default: beside kvmd's own executable).</summary>
    public string? Vmm { get; init; }

    /// <summary>
    /// How long a VM lease lasts unless renewed. Another host may take over a VM this long after
    /// this host last renewed (plus its takeover poll and the VM's start); see README for choosing.
    /// </summary>
    public TimeSpan LeaseDuration { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>How often the leases are renewed (several times per duration, so one slow round costs nothing).</summary>
    public TimeSpan LeaseRenewInterval { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// How long before its lease could expire a VM fences itself when no renewal succeeded: its
    /// kvm-vmm stops it (or pauses it) on its own clock, so it is off before any other host may
    /// take the lease, whatever happened to kvmd.
    /// </summary>
    public TimeSpan FenceMargin { get; init; } = TimeSpan.FromSeconds(3);

    /// <summary>What a VM's kvm-vmm does when fenced: "stop" or "pause".</summary>
    public string FenceAction { get; init; } = "stop";

    /// <summary>Whether this host takes over VMs that should run but whose host stopped renewing their lease.</summary>
    public bool Takeover { get; init; } = true;

    /// <summary>How often this host looks for VMs to take over.</summary>
    public TimeSpan TakeoverInterval { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>Throws ArgumentException naming the setting that is out of range.</summary>
    public void Validate()
    {
        if (!Kvm.Inventory.InventoryNames.IsValid(HostName))
        {
            // Linux says "(none)" when no host name was ever set (an early boot, a bare container).
            string source = HostName == Environment.MachineName ? " (this machine's host name, the default)" : "";
            throw new ArgumentException(
                $"the host name {Kvm.Inventory.InventoryNames.Quote(HostName)}{source} cannot name this host in the inventory: " +
                $"{Kvm.Inventory.InventoryNames.Rule}; give one with --host-name NAME");
        }
        if (LeaseDuration < TimeSpan.FromSeconds(2))
            throw new ArgumentException($"the lease duration {LeaseDuration.TotalSeconds} s is below 2 s");
        if (FenceMargin <= TimeSpan.Zero || FenceMargin >= LeaseDuration)
            throw new ArgumentException($"the fence margin {FenceMargin.TotalSeconds} s must be above 0 and below the lease duration ({LeaseDuration.TotalSeconds} s)");
        if (LeaseRenewInterval <= TimeSpan.Zero || LeaseRenewInterval * 2 > LeaseDuration - FenceMargin)
            throw new ArgumentException($"the renew interval {LeaseRenewInterval.TotalSeconds} s must leave room for two renewals before the fence (lease duration less fence margin: {(LeaseDuration - FenceMargin).TotalSeconds} s)");
        if (FenceAction is not ("stop" or "pause"))
            throw new ArgumentException($"the fence action '{FenceAction}' is not one of stop, pause");
        if (TakeoverInterval <= TimeSpan.Zero)
            throw new ArgumentException("the takeover interval must be positive");
    }
}
