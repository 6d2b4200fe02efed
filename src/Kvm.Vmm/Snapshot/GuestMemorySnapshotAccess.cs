using Kvm.Hypervisor;

namespace Kvm.Vmm.Snapshot;

/// <summary>A VM's <see cref="GuestMemory"/> as the snapshot writer's source and an eager restore's target.</summary>
public sealed class GuestMemorySnapshotAccess(GuestMemory memory) : ISnapshotMemorySource, ISnapshotMemoryTarget
{
    /// <summary>The guest address and size of each RAM region, for <see cref="SnapshotState.Create"/>.</summary>
    public IEnumerable<(ulong GuestAddress, ulong Size)> Ram => memory.Regions.Select(r => (r.GuestAddress, r.Size));

    /// <inheritdoc/>
    public void Read(ulong guestAddress, Span<byte> destination) => memory.Read(guestAddress, destination);

    /// <inheritdoc/>
    public void Write(ulong guestAddress, ReadOnlySpan<byte> data) => memory.Write(guestAddress, data);
}
