using System.Runtime.InteropServices;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;

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

    /// <summary>
    /// An fd that wakes <paramref name="queue"/>'s worker besides the driver's notification (a
    /// network backend with frames for a receive queue), or null. A queue with one is served by
    /// <see cref="ProcessBackendQueue"/>, and only while the device is active.
    /// </summary>
    SafeHandle? QueueWakeHandle(int queue) => null;

    /// <summary>
    /// Serves a queue that has a <see cref="QueueWakeHandle"/>: moves what the backend has into the
    /// chains the driver made available, and says what the worker waits for next.
    /// </summary>
    BackendQueueState ProcessBackendQueue(Virtqueue queue)
    {
        ProcessQueue(queue);
        return BackendQueueState.RingEmpty;
    }

    /// <summary>
    /// Called once by the transport with what tells the driver the configuration space changed
    /// (a new configuration generation and a configuration-change interrupt).
    /// </summary>
    void BindConfigChange(Action notify) { }

    /// <summary>
    /// Called once by the transport with what wakes a queue's worker as a notification would (a
    /// receive queue the driver just turned on, whose worker sleeps without watching its backend).
    /// </summary>
    void BindQueueKick(Action<int> kick) { }

    /// <summary>Device reset: every worker has stopped; forget negotiated state.</summary>
    void Reset();

    /// <summary>What the device's part of a snapshot record holds, such as "virtio-blk".</summary>
    string StateKind { get; }

    /// <summary>Every worker has stopped: finish what the device holds back (such as image metadata not yet written).</summary>
    void Pause() { }

    /// <summary>The workers are about to start again.</summary>
    void Resume() { }

    /// <summary>Writes the device's own state (its transport writes the queues and the negotiation).</summary>
    void SaveState(StateWriter writer) { }

    /// <summary>
    /// Reads what <see cref="SaveState"/> wrote, into a fresh device that has not been activated;
    /// <see cref="Activate"/> follows if the saved device was active. Refuses a saved device the
    /// guest would find different (<see cref="Manager.DeviceStateException"/>).
    /// </summary>
    void RestoreState(ref StateReader reader) { }
}

/// <summary>Why <see cref="IVirtioDevice.ProcessBackendQueue"/> stopped: what the queue's worker waits for.</summary>
public enum BackendQueueState
{
    /// <summary>The backend has nothing more: wait for it (or a notification).</summary>
    BackendEmpty,

    /// <summary>The ring has no chains for what the backend holds: wait for the driver's notification (the backend keeps its data).</summary>
    RingEmpty,

    /// <summary>The queue is not in use (a receive queue the driver turned off): wait for a notification or a kick, not for the backend.</summary>
    Idle,

    /// <summary>
    /// A batch went into the ring and more may follow: tell the driver now (so it takes the
    /// buffers and gives fresh ones while the backend keeps sending), then call again.
    /// </summary>
    Batch,
}
