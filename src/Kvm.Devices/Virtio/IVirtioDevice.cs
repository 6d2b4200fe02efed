using Kvm.Hypervisor;

namespace Kvm.Devices.Virtio;

/// <summary>
/// A virtio device as its transport sees it: identity, queues, features, configuration space, and
/// the request handling that runs on each queue's worker thread.
/// </summary>
public interface IVirtioDevice : IDisposable
{
    /// <summary>For messages and thread names, such as "virtio-blk0".</summary>
    string Name { get; }

    /// <summary>Virtio device ID (2 = block, 1 = network).</summary>
    ushort DeviceType { get; }

    int QueueCount { get; }

    ushort MaxQueueSize { get; }

    /// <summary>Device-type feature bits offered; the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX.</summary>
    ulong Features { get; }

    /// <summary>Bytes of device configuration space.</summary>
    int ConfigSize { get; }

    void ReadConfig(int offset, Span<byte> data);

    void WriteConfig(int offset, ReadOnlySpan<byte> data);

    /// <summary>The driver set DRIVER_OK with <paramref name="features"/> negotiated; queues are active from now on.</summary>
    void Activate(ulong features, GuestMemory memory);

    /// <summary>
    /// Serves every chain available on <paramref name="queue"/> and pushes each to the used ring.
    /// Runs on the queue's worker thread; one call at a time per queue, queues in parallel.
    /// Throws <see cref="VirtqueueException"/> when the driver broke the protocol.
    /// </summary>
    void ProcessQueue(Virtqueue queue);

    /// <summary>Device reset: every worker has stopped; forget negotiated state.</summary>
    void Reset();
}
