using Kvm.Hypervisor.State;

namespace Kvm.Devices.Manager;

/// <summary>
/// Owns every device of a machine under a stable id ("serial0", "rtc", "virtio-blk0"...): the
/// order they were added in, pausing and resuming them together, saving their records and
/// restoring records by id into a freshly built machine, and disposing of them. Which devices a
/// machine has, and where they sit on its buses, is decided by the code that builds the machine
/// from its spec; the manager knows nothing about specs or buses.
/// </summary>
public sealed class DeviceManager : IDisposable
{
    private readonly List<(string Id, IStatefulDevice Device)> _devices = new();
    private readonly object _lock = new();
    private bool _disposed;

    /// <summary>The devices in the order they were added.</summary>
    public IReadOnlyList<(string Id, IStatefulDevice Device)> Devices
    {
        get { lock (_lock) return _devices.ToArray(); }
    }

    /// <summary>Ids are lowercase letters, digits and '-', 1 to 64 characters.</summary>
    public static bool IsValidId(string id) =>
        id.Length is >= 1 and <= 64 && id.All(c => c is (>= 'a' and <= 'z') or (>= '0' and <= '9') or '-');

    /// <summary>Adds <paramref name="device"/> under <paramref name="id"/>, which must be new and valid.</summary>
    public T Add<T>(string id, T device) where T : IStatefulDevice
    {
        if (!IsValidId(id))
            throw new ArgumentException($"device id '{id}' is not 1 to 64 lowercase letters, digits or '-'");
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_devices.Any(d => d.Id == id))
                throw new ArgumentException($"a device with id '{id}' is already there");
            _devices.Add((id, device));
        }
        return device;
    }

    /// <summary>The device with <paramref name="id"/>, or null.</summary>
    public IStatefulDevice? Find(string id)
    {
        lock (_lock)
            return _devices.FirstOrDefault(d => d.Id == id).Device;
    }

    /// <summary>Pauses every device, the last added first (devices added later may use earlier ones).</summary>
    public void PauseAll()
    {
        foreach (var (_, device) in Devices.Reverse())
            device.Pause();
        Paused = true;
    }

    /// <summary>Whether the devices are paused (<see cref="PauseAll"/> was the last of the two called).</summary>
    public bool Paused { get; private set; }

    /// <summary>Resumes every device, in the order they were added.</summary>
    public void ResumeAll()
    {
        Paused = false;
        foreach (var (_, device) in Devices)
            device.Resume();
    }

    /// <summary>The record of every device, in order. The devices must be paused.</summary>
    public IReadOnlyList<StateRecord> SaveAll()
    {
        var records = new List<StateRecord>();
        foreach (var (id, device) in Devices)
        {
            var w = new StateWriter();
            device.SaveState(w);
            records.Add(new StateRecord(id, device.StateKind, w.ToArray()));
        }
        return records;
    }

    /// <summary>
    /// Restores <paramref name="records"/> into the devices with the same ids. Every device must
    /// have exactly one record of its kind (but those in <paramref name="newDevices"/>, which must
    /// have none and stay as reset), and every record a device: otherwise nothing is restored and
    /// the error names the id. A record whose bytes do not fit stops the restore
    /// with a <see cref="StateFormatException"/>; the machine is then not usable.
    /// </summary>
    public void RestoreAll(IReadOnlyList<StateRecord> records, IReadOnlySet<string>? newDevices = null)
    {
        var devices = Devices;
        var byId = new Dictionary<string, StateRecord>(StringComparer.Ordinal);
        foreach (var r in records)
            if (!byId.TryAdd(r.Id, r))
                throw new DeviceStateException($"device '{r.Id}' has two records");
        foreach (var (id, device) in devices)
        {
            if (!byId.TryGetValue(id, out var r))
            {
                if (newDevices?.Contains(id) == true)
                    continue;
                throw new DeviceStateException($"device '{id}' ({device.StateKind}) has no saved state: the saved machine did not have it");
            }
            if (newDevices?.Contains(id) == true)
                throw new DeviceStateException($"device '{id}' is said to be new, but the saved machine had it");
            if (r.Kind != device.StateKind)
                throw new DeviceStateException($"device '{id}' is a {device.StateKind}, but its saved state is of a {r.Kind}");
        }
        foreach (var r in records)
            if (!devices.Any(d => d.Id == r.Id))
                throw new DeviceStateException($"the saved machine had device '{r.Id}' ({r.Kind}), which this machine does not have");
        foreach (var (id, device) in devices)
        {
            if (!byId.ContainsKey(id))
                continue;       // a new device: as reset
            var reader = new StateReader(byId[id].Payload, id);
            device.RestoreState(ref reader);
            reader.End();
        }
    }

    /// <summary>Disposes of the devices that are disposable, the last added first.</summary>
    public void Dispose()
    {
        (string Id, IStatefulDevice Device)[] devices;
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            devices = _devices.ToArray();
        }
        foreach (var (_, device) in devices.Reverse())
            (device as IDisposable)?.Dispose();
    }
}
