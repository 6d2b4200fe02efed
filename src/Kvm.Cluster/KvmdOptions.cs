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
}
