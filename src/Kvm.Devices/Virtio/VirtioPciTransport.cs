using System.Buffers.Binary;
using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Devices.Pci;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Kvm.Devices.Virtio;

/// <summary>
/// The virtio 1.2 PCI transport, modern interface only (section 4.1). BAR 0 holds the common,
/// ISR, device and notify structures; BAR 1 holds the MSI-X table and pending bits. Each queue's
/// notify address is bound to its own eventfd (through <see cref="IIoEventRegistrar"/> when the
/// VMM has KVM ioeventfds), and a worker thread per enabled queue waits on that eventfd and runs
/// the device's request handling, so the vCPU threads never do device I/O. Interrupts go out as
/// MSI-X vectors, or through the INTx line and the ISR register when MSI-X is off.
/// <para>
/// The workers' lives follow the device's: they start when the driver sets DRIVER_OK (or when a
/// paused device resumes) and stop at reset, at <see cref="Pause"/> (after the request each is
/// serving completes: nothing is in flight afterwards) and at disposal. A paused transport keeps
/// taking the driver's register accesses; only the queues wait. Its state (configuration space,
/// MSI-X table, negotiation, queue positions and the device's own record) can then be saved and
/// restored into a fresh transport, which carries on when resumed.
/// </para>
/// </summary>
public sealed class VirtioPciTransport : PciFunction, IStatefulDevice, IDisposable
{
    public const ushort VirtioVendorId = 0x1af4;
    public const ushort ModernDeviceIdBase = 0x1040;

    public const int CommonOffset = 0x0000, IsrOffset = 0x1000, DeviceConfigOffset = 0x2000, NotifyOffset = 0x3000;
    public const ulong Bar0Size = 0x4000;
    public const uint NotifyMultiplier = 4;
    public const int MsixBar = 1;
    public const ulong MsixPbaOffset = 0x1000;
    public const ulong MsixBarSize = 0x2000;
    public const int MaxQueues = 255;

    private const byte CapVendor = 0x09, CapMsix = 0x11;
    private const byte CfgCommon = 1, CfgNotify = 2, CfgIsr = 3, CfgDevice = 4, CfgPci = 5;
    private const int CommonLength = 0x38;

    private readonly IVirtioDevice _device;
    private readonly GuestMemory _memory;
    private readonly ILogger _log;
    private readonly MsixTable _msix;
    private readonly IInterruptLine? _intx;
    private readonly IIoEventRegistrar? _ioevents;
    private readonly Virtqueue[] _queues;
    private readonly EventFd[] _notifiers;
    private readonly Thread?[] _workers;
    private readonly bool[] _broken;        // a queue whose worker met a protocol error, until reset
    private readonly int _msixCap;
    private readonly int _pciCfgCap;
    private readonly object _lock = new();
    private readonly object _intxLock = new();

    private uint _deviceFeatureSelect, _driverFeatureSelect;
    private ulong _driverFeatures;
    private volatile ushort _configVector = Virtqueue.NoVector;
    private int _status;
    private ushort _queueSelect;
    private int _isr;
    private int _configGeneration;
    private long _notifyExits;
    private bool _intxAsserted;     // under _intxLock
    private ulong? _notifyBase;
    private volatile bool _stopping;
    private bool _active;       // DRIVER_OK was accepted (workers run unless paused), until reset
    private bool _paused;       // workers stopped by Pause, until Resume
    private bool _disposed;

    public VirtioPciTransport(IVirtioDevice device, GuestMemory memory, IMsiController? msi, IInterruptLine? intx,
        IIoEventRegistrar? ioevents, ILogger? logger = null)
        : base(VirtioVendorId, (ushort)(ModernDeviceIdBase + device.DeviceType), ClassCodeFor(device.DeviceType),
            revision: 1, subsystemVendorId: VirtioVendorId, subsystemId: 0x1100, interruptPin: 1)
    {
        if (device.QueueCount < 1 || device.QueueCount > MaxQueues)
            throw new ArgumentException($"{device.Name}: {device.QueueCount} queues is outside 1 to {MaxQueues}");
        if (device.ConfigSize > 0x1000)
            throw new ArgumentException($"{device.Name}: configuration space of {device.ConfigSize} bytes does not fit");
        _device = device;
        _memory = memory;
        _intx = intx;
        _ioevents = ioevents;
        _log = logger ?? NullLogger.Instance;
        _queues = new Virtqueue[device.QueueCount];
        _notifiers = new EventFd[device.QueueCount];
        _workers = new Thread?[device.QueueCount];
        _broken = new bool[device.QueueCount];
        for (int i = 0; i < _queues.Length; i++)
        {
            _queues[i] = new Virtqueue(i, device.MaxQueueSize);
            _notifiers[i] = new EventFd();
        }
        _msix = new MsixTable(device.QueueCount + 1, msi);

        AddBar(0, Bar0Size, PciBarKind.Memory32);
        AddBar(MsixBar, MsixBarSize, PciBarKind.Memory32);

        _msixCap = AddCapability(CapMsix, 12);
        SetU16(_msixCap + 2, (ushort)(_msix.VectorCount - 1));
        SetU32(_msixCap + 4, 0u | MsixBar);                        // table at offset 0 of BAR 1
        SetU32(_msixCap + 8, (uint)MsixPbaOffset | MsixBar);
        SetWriteMask(_msixCap + 3, [0xc0]);                         // enable, function mask

        AddVirtioCapability(CfgCommon, CommonOffset, 0x1000);
        int notify = AddVirtioCapability(CfgNotify, NotifyOffset, 0x1000, extra: 4);
        SetU32(notify + 16, NotifyMultiplier);
        AddVirtioCapability(CfgIsr, IsrOffset, 0x1000);
        AddVirtioCapability(CfgDevice, DeviceConfigOffset, 0x1000);
        _pciCfgCap = AddVirtioCapability(CfgPci, 0, 0, extra: 4, bar: 0);
        device.BindConfigChange(ConfigChanged);
        device.BindQueueKick(i => _notifiers[i].Signal());
        SetWriteMask(_pciCfgCap + 4, [0xff]);                       // bar
        SetWriteMask(_pciCfgCap + 8, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]); // offset, length, data
    }

    public override string Name => _device.Name;

    public IVirtioDevice Device => _device;

    public MsixTable Msix => _msix;

    public IReadOnlyList<Virtqueue> Queues => _queues;

    /// <summary>The device status byte as the driver last set it (plus NEEDS_RESET if the device raised it).</summary>
    public byte Status => (byte)Volatile.Read(ref _status);

    /// <summary>
    /// Queue notifications that reached the device through an MMIO exit on a vCPU thread rather
    /// than an ioeventfd (zero when every notification went through KVM_IOEVENTFD).
    /// </summary>
    public long NotificationsByExit => Interlocked.Read(ref _notifyExits);

    public ulong OfferedFeatures =>
        _device.Features | VirtioFeature.Bit(VirtioFeature.Version1) |
        VirtioFeature.Bit(VirtioFeature.RingIndirectDesc) | VirtioFeature.Bit(VirtioFeature.RingEventIdx);

    /// <summary>The features the driver accepted (valid once FEATURES_OK is set).</summary>
    public ulong NegotiatedFeatures
    {
        get { lock (_lock) return _driverFeatures; }
    }

    private static uint ClassCodeFor(ushort type) => type switch
    {
        1 => 0x02_00_00,    // network controller, Ethernet
        2 => 0x01_80_00,    // mass storage controller, other
        _ => 0xff_00_00,
    };

    private int AddVirtioCapability(byte cfgType, uint offset, uint length, int extra = 0, byte bar = 0)
    {
        int at = AddCapability(CapVendor, 16 + extra);
        var c = ConfigBytes(at, 16);
        c[2] = (byte)(16 + extra);
        c[3] = cfgType;
        c[4] = bar;
        BinaryPrimitives.WriteUInt32LittleEndian(c[8..], offset);
        BinaryPrimitives.WriteUInt32LittleEndian(c[12..], length);
        return at;
    }

    // ---------------------------------------------------------------- configuration space hooks

    protected override void ConfigWritten(int offset, int size, uint value)
    {
        bool msixControl = offset < _msixCap + 4 && offset + size > _msixCap + 2;
        if (msixControl)
        {
            ushort control = GetU16(_msixCap + 2);
            _msix.SetControl((control & 0x8000) != 0, (control & 0x4000) != 0);
        }
        if (msixControl || (offset <= CommandRegister + 1 && offset + size > CommandRegister))
        {
            // Interrupt Disable or MSI-X Enable changed: the INTx line follows at once.
            lock (_intxLock)
                UpdateIntxLocked();
        }
        int data = _pciCfgCap + 16;
        if (offset < data + 4 && offset + size > data && PciCfgWindow(out int bar, out uint at, out int length))
            WriteBar(bar, at, ConfigBytes(data, length));
    }

    protected override uint? ReadConfigOverride(int offset, int size)
    {
        int data = _pciCfgCap + 16;
        if (offset < data + 4 && offset + size > data && PciCfgWindow(out int bar, out uint at, out int length))
            ReadBar(bar, at, ConfigBytes(data, length));
        return null;
    }

    /// <summary>Status bit 3 (Interrupt Status) shows a pending INTx interrupt, masked or not.</summary>
    protected override ushort DynamicStatus => Volatile.Read(ref _isr) != 0 ? StatusInterrupt : (ushort)0;

    /// <summary>The BAR access the VIRTIO_PCI_CAP_PCI_CFG window describes, if it is a valid one.</summary>
    private bool PciCfgWindow(out int bar, out uint offset, out int length)
    {
        bar = ConfigBytes(_pciCfgCap + 4, 1)[0];
        offset = GetU32(_pciCfgCap + 8);
        uint len = GetU32(_pciCfgCap + 12);
        length = (int)Math.Min(len, 4u);
        return (bar == 0 || bar == MsixBar) && len is 1 or 2 or 4 && offset % len == 0;
    }

    protected override void OnBarMapped(int index, ulong? address)
    {
        if (index != 0 || _ioevents is null)
            return;
        if (_notifyBase is { } oldBase)
            for (int q = 0; q < _queues.Length; q++)
                _ioevents.RemoveMmio(_notifiers[q], NotifyAddress(oldBase, q), 2);
        _notifyBase = null;
        if (address is not { } bar0)
            return;
        _notifyBase = bar0;
        for (int q = 0; q < _queues.Length; q++)
        {
            try
            {
                _ioevents.AddMmio(_notifiers[q], NotifyAddress(bar0, q), 2);
            }
            catch (Exception e)
            {
                // Notifications still arrive, through MMIO exits (WriteBar signals the eventfd).
                DeviceLog.IoEventFailed(_log, Name, q, NotifyAddress(bar0, q), e.Message);
            }
        }
    }

    private static ulong NotifyAddress(ulong bar0, int queue) => bar0 + NotifyOffset + (ulong)queue * NotifyMultiplier;

    // ---------------------------------------------------------------- BAR accesses

    public override void ReadBar(int index, ulong offset, Span<byte> data)
    {
        data.Clear();
        if (index == MsixBar)
        {
            if (offset < MsixPbaOffset)
                _msix.ReadTable(offset, data);
            else
                _msix.ReadPba(offset - MsixPbaOffset, data);
            return;
        }
        if (index != 0)
            return;
        if (offset < IsrOffset)
            ReadCommon((int)offset, data);
        else if (offset < DeviceConfigOffset)
        {
            if (offset == IsrOffset)
                data[0] = ReadIsr();
        }
        else if (offset < NotifyOffset)
        {
            int at = (int)(offset - DeviceConfigOffset);
            if (at < _device.ConfigSize)
                _device.ReadConfig(at, data[..Math.Min(data.Length, _device.ConfigSize - at)]);
        }
    }

    public override void WriteBar(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        if (index == MsixBar)
        {
            if (offset < MsixPbaOffset)
                _msix.WriteTable(offset, data);
            return;
        }
        if (index != 0)
            return;
        if (offset < IsrOffset)
            WriteCommon((int)offset, data);
        else if (offset >= DeviceConfigOffset && offset < NotifyOffset)
        {
            int at = (int)(offset - DeviceConfigOffset);
            if (at < _device.ConfigSize)
                _device.WriteConfig(at, data[..Math.Min(data.Length, _device.ConfigSize - at)]);
        }
        else if (offset >= NotifyOffset)
        {
            // A notification that did not go through an ioeventfd (none bound, or another width).
            ulong queue = (offset - NotifyOffset) / NotifyMultiplier;
            if (queue < (ulong)_queues.Length)
            {
                Interlocked.Increment(ref _notifyExits);
                _notifiers[queue].Signal();
            }
        }
    }

    private byte ReadIsr()
    {
        lock (_intxLock)
        {
            byte isr = (byte)Interlocked.Exchange(ref _isr, 0);
            UpdateIntxLocked();
            return isr;
        }
    }

    private void ReadCommon(int offset, Span<byte> data)
    {
        if (offset + data.Length > CommonLength)
            return;
        Span<byte> c = stackalloc byte[CommonLength];
        lock (_lock)
        {
            ulong offered = OfferedFeatures;
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x00..], _deviceFeatureSelect);
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x04..], _deviceFeatureSelect switch
            {
                0 => (uint)offered,
                1 => (uint)(offered >> 32),
                _ => 0,
            });
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x08..], _driverFeatureSelect);
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x0c..], _driverFeatureSelect switch
            {
                0 => (uint)_driverFeatures,
                1 => (uint)(_driverFeatures >> 32),
                _ => 0,
            });
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x10..], _configVector);
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x12..], (ushort)_queues.Length);
            c[0x14] = Status;
            c[0x15] = (byte)Volatile.Read(ref _configGeneration);   // config_generation: bumped by each change the device reports
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x16..], _queueSelect);
            if (_queueSelect < _queues.Length)
            {
                var q = _queues[_queueSelect];
                BinaryPrimitives.WriteUInt16LittleEndian(c[0x18..], q.Size);
                BinaryPrimitives.WriteUInt16LittleEndian(c[0x1a..], q.MsixVector);
                BinaryPrimitives.WriteUInt16LittleEndian(c[0x1c..], q.Enabled ? (ushort)1 : (ushort)0);
                BinaryPrimitives.WriteUInt16LittleEndian(c[0x1e..], _queueSelect);
                BinaryPrimitives.WriteUInt64LittleEndian(c[0x20..], q.DescTable);
                BinaryPrimitives.WriteUInt64LittleEndian(c[0x28..], q.AvailRing);
                BinaryPrimitives.WriteUInt64LittleEndian(c[0x30..], q.UsedRing);
            }
            else
                BinaryPrimitives.WriteUInt16LittleEndian(c[0x1a..], Virtqueue.NoVector);
        }
        c.Slice(offset, data.Length).CopyTo(data);
    }

    private void WriteCommon(int offset, ReadOnlySpan<byte> data)
    {
        ulong value = 0;
        for (int i = data.Length - 1; i >= 0; i--)
            value = value << 8 | data[i];
        int size = data.Length;
        lock (_lock)
        {
            // Once the device is live its queue setup is fixed until reset, whatever the driver
            // does to the status byte: workers use it without a lock.
            bool live = _active;
            var q = _queueSelect < _queues.Length ? _queues[_queueSelect] : null;
            switch (offset, size)
            {
                case (0x00, 4): _deviceFeatureSelect = (uint)value; break;
                case (0x08, 4): _driverFeatureSelect = (uint)value; break;
                case (0x0c, 4):
                    if ((Status & VirtioStatus.FeaturesOk) == 0 && _driverFeatureSelect < 2)
                    {
                        int shift = 32 * (int)_driverFeatureSelect;
                        _driverFeatures = (_driverFeatures & ~(0xffff_ffffUL << shift)) | (value << shift);
                    }
                    break;
                case (0x10, 2): _configVector = CheckVector((ushort)value); break;
                case (0x14, 1): WriteStatus((byte)value); break;
                case (0x16, 2): _queueSelect = (ushort)value; break;
                case (0x18, 2): if (q is not null && !live) q.Size = (ushort)value; break;
                case (0x1a, 2): if (q is not null) q.MsixVector = CheckVector((ushort)value); break;
                case (0x1c, 2): if (q is not null && !live && value == 1) q.Enabled = true; break;
                case (0x20, 8) or (0x20, 4) or (0x24, 4): if (q is not null && !live) q.DescTable = Merge(q.DescTable, offset - 0x20, size, value); break;
                case (0x28, 8) or (0x28, 4) or (0x2c, 4): if (q is not null && !live) q.AvailRing = Merge(q.AvailRing, offset - 0x28, size, value); break;
                case (0x30, 8) or (0x30, 4) or (0x34, 4): if (q is not null && !live) q.UsedRing = Merge(q.UsedRing, offset - 0x30, size, value); break;
                default: break;     // read-only fields, odd widths: ignored
            }
        }
    }

    private static ulong Merge(ulong old, int at, int size, ulong value) => size == 8
        ? value
        : at == 0 ? (old & 0xffff_ffff_0000_0000UL) | (uint)value : (old & 0xffff_ffffUL) | value << 32;

    /// <summary>A vector the table does not have reads back as NO_VECTOR: the driver sees the mapping failed.</summary>
    private ushort CheckVector(ushort vector) => vector < _msix.VectorCount ? vector : Virtqueue.NoVector;

    // ---------------------------------------------------------------- status, activation, reset

    private void WriteStatus(byte value)
    {
        if (value == 0)
        {
            ResetLocked();
            return;
        }
        byte old = Status;
        if ((value & VirtioStatus.FeaturesOk) != 0 && (old & VirtioStatus.FeaturesOk) == 0 && !FeaturesAcceptable())
            value &= unchecked((byte)~VirtioStatus.FeaturesOk);
        value |= (byte)(old & VirtioStatus.DeviceNeedsReset);
        if ((value & VirtioStatus.DriverOk) != 0 && !_active)
        {
            Volatile.Write(ref _status, value);
            if (!ActivateLocked())
                RaiseNeedsReset();
        }
        else
            Volatile.Write(ref _status, value);
        DeviceLog.StatusChanged(_log, Name, Status);
    }

    private bool FeaturesAcceptable() =>
        (_driverFeatures & ~OfferedFeatures) == 0 && (_driverFeatures & VirtioFeature.Bit(VirtioFeature.Version1)) != 0;

    private bool ActivateLocked()
    {
        if ((Status & VirtioStatus.FeaturesOk) == 0)
        {
            LogProtocolError("DRIVER_OK set without FEATURES_OK");
            return false;
        }
        bool eventIdx = (_driverFeatures & VirtioFeature.Bit(VirtioFeature.RingEventIdx)) != 0;
        bool indirect = (_driverFeatures & VirtioFeature.Bit(VirtioFeature.RingIndirectDesc)) != 0;
        try
        {
            foreach (var q in _queues)
                if (q.Enabled)
                    q.Activate(_memory, eventIdx, indirect);
            _device.Activate(_driverFeatures, _memory);
        }
        catch (VirtqueueException e)
        {
            foreach (var q in _queues)
                q.Deactivate();
            LogProtocolError(e.Message);
            return false;
        }
        _stopping = false;
        _active = true;
        if (!_paused)
            StartWorkers(kick: false);
        return true;
    }

    /// <summary>
    /// A worker for every active queue that has none and is not broken. With <paramref name="kick"/>
    /// each looks at its ring at once: chains may have arrived while no worker ran (paused, or
    /// restored from a snapshot). A device the driver just activated waits for its notification.
    /// </summary>
    private void StartWorkers(bool kick)
    {
        for (int i = 0; i < _queues.Length; i++)
        {
            if (!_queues[i].IsActive || _broken[i] || _workers[i] is not null)
                continue;
            int index = i;
            var t = new Thread(() => WorkerLoop(index)) { IsBackground = true, Name = $"{Name} q{i}" };
            _workers[i] = t;
            t.Start();
            if (kick)
                _notifiers[i].Signal();
        }
    }

    /// <summary>Device reset: stop the workers, then forget everything the driver set up.</summary>
    private void ResetLocked()
    {
        StopWorkers();
        _active = false;
        Array.Clear(_broken);
        foreach (var q in _queues)
            q.Reset();
        _device.Reset();
        _deviceFeatureSelect = _driverFeatureSelect = 0;
        _driverFeatures = 0;
        _configVector = Virtqueue.NoVector;
        _queueSelect = 0;
        Volatile.Write(ref _status, 0);
        lock (_intxLock)
        {
            Interlocked.Exchange(ref _isr, 0);
            UpdateIntxLocked();
        }
    }

    private void StopWorkers()
    {
        _stopping = true;
        for (int i = 0; i < _workers.Length; i++)
        {
            if (_workers[i] is null)
                continue;
            _notifiers[i].Signal();
            _workers[i]!.Join();
            _workers[i] = null;
        }
        _stopping = false;
    }

    /// <summary>
    /// How long a queue worker keeps polling its ring after it ran dry before it sleeps on the
    /// eventfd (zero: sleep at once). While it polls, the driver is told not to notify, so a steady
    /// stream of requests costs no notification exits; that is worth a few microseconds of a host
    /// CPU, as QEMU's poll-max-ns and SPDK judge too.
    /// </summary>
    public TimeSpan PollTime { get; init; } = TimeSpan.FromMicroseconds(50);

    private void WorkerLoop(int index)
    {
        var queue = _queues[index];
        var notifier = _notifiers[index];
        long pollTicks = (long)(PollTime.TotalSeconds * System.Diagnostics.Stopwatch.Frequency);
        var wake = _device.QueueWakeHandle(index);
        try
        {
            if (wake is not null)
            {
                // BackendLoop returns only when the worker is told to stop: not a broken queue.
                BackendLoop(queue, notifier, wake);
                return;
            }
            while (true)
            {
                notifier.Read();
                if (_stopping)
                    return;
                queue.DisableNotifications();
                while (!_stopping)
                {
                    _device.ProcessQueue(queue);
                    if (queue.ShouldInterrupt())
                        SignalQueue(queue);
                    if (pollTicks > 0 && PollForWork(queue, pollTicks))
                        continue;
                    if (queue.EnableNotifications())
                        break;
                    queue.DisableNotifications();
                }
            }
        }
        catch (Exception e) when (e is VirtqueueException or GuestMemoryException)
        {
            LogProtocolError(e.Message);
        }
        catch (Exception e)
        {
            DeviceLog.WorkerFailed(_log, Name, index, e);
        }
        // The queue is broken: wait for the reset that stops this worker.
        Volatile.Write(ref _broken[index], true);
        RaiseNeedsReset();
        while (!_stopping)
            notifier.Read();
    }

    /// <summary>
    /// The loop of a queue fed by a backend as well as by the driver (a network receive queue): it
    /// sleeps on the notification and, while the ring has chains, on the backend's fd too; a ring
    /// without chains waits for the driver alone (the backend holds its frames meanwhile).
    /// </summary>
    private void BackendLoop(Virtqueue queue, EventFd notifier, System.Runtime.InteropServices.SafeHandle wake)
    {
        bool waitBackend = true;
        while (true)
        {
            int ready = Kvm.Interop.Native.KvmShim.PollRead(notifier.Handle, waitBackend ? wake : null, -1);
            if ((ready & 1) != 0)
                notifier.Read();
            if (_stopping)
                return;
            while (!_stopping)
            {
                queue.DisableNotifications();
                var state = _device.ProcessBackendQueue(queue);
                if (queue.ShouldInterrupt())
                    SignalQueue(queue);
                if (state == BackendQueueState.Batch)
                    continue;
                if (state != BackendQueueState.RingEmpty)
                {
                    waitBackend = state == BackendQueueState.BackendEmpty;
                    break;
                }
                if (queue.EnableNotifications())
                {
                    waitBackend = false;
                    break;
                }
            }
        }
    }

    /// <summary>Protocol errors logged per device before the rest are counted only (a guest may repeat them forever).</summary>
    public const int LoggedProtocolErrors = 10;

    private int _protocolErrors;

    /// <summary>How many times the driver broke the protocol (each one put the device in NEEDS_RESET).</summary>
    public int ProtocolErrors => Volatile.Read(ref _protocolErrors);

    private void LogProtocolError(string problem)
    {
        int n = Interlocked.Increment(ref _protocolErrors);
        if (n <= LoggedProtocolErrors)
            DeviceLog.NeedsReset(_log, Name, n == LoggedProtocolErrors ? problem + " (further protocol errors of this device are not logged)" : problem);
    }

    /// <summary>Spins until the queue has chains (true) or the poll time is over (false).</summary>
    private bool PollForWork(Virtqueue queue, long ticks)
    {
        long deadline = System.Diagnostics.Stopwatch.GetTimestamp() + ticks;
        do
        {
            if (queue.Pending > 0)
                return true;
            Thread.SpinWait(10);
        }
        while (!_stopping && System.Diagnostics.Stopwatch.GetTimestamp() < deadline);
        return false;
    }

    /// <summary>Sets DEVICE_NEEDS_RESET and tells the driver through a configuration-change interrupt.</summary>
    private void RaiseNeedsReset()
    {
        int old, next;
        do
        {
            old = Volatile.Read(ref _status);
            if (old == 0)
                return;             // reset meanwhile
            next = old | VirtioStatus.DeviceNeedsReset;
        }
        while (Interlocked.CompareExchange(ref _status, next, old) != old);
        if ((old & VirtioStatus.DeviceNeedsReset) == 0)
            Interrupt(_configVector, isrBit: 2);
    }

    private void SignalQueue(Virtqueue queue) => Interrupt(queue.MsixVector, isrBit: 1);

    /// <summary>The device changed its configuration space: a new generation, and a configuration-change interrupt once the driver is running.</summary>
    private void ConfigChanged()
    {
        Interlocked.Increment(ref _configGeneration);
        if ((Status & VirtioStatus.DriverOk) != 0)
            Interrupt(_configVector, isrBit: 2);
    }

    private void Interrupt(ushort vector, int isrBit)
    {
        if (_msix.Enabled)
        {
            if (vector != Virtqueue.NoVector)
                _msix.Signal(vector);
            return;
        }
        lock (_intxLock)
        {
            Interlocked.Or(ref _isr, isrBit);
            UpdateIntxLocked();
        }
    }

    /// <summary>
    /// Drives the INTx line to what it must be (PCI 3.0, 6.2.2-6.2.3): asserted exactly while the
    /// ISR holds an interrupt, Interrupt Disable is clear and MSI-X is off.
    /// </summary>
    private void UpdateIntxLocked()
    {
        bool level = Volatile.Read(ref _isr) != 0 && !InterruptDisabled && !_msix.Enabled;
        if (level == _intxAsserted)
            return;
        _intxAsserted = level;
        _intx?.SetLevel(level);
    }

    // ---------------------------------------------------------------- pause, resume, state

    public string StateKind => "virtio-pci/" + _device.StateKind;

    /// <summary>Whether the workers are held by <see cref="Pause"/>.</summary>
    public bool Paused
    {
        get { lock (_lock) return _paused; }
    }

    /// <summary>
    /// Stops every worker after the request it is serving, then lets the device finish what it
    /// holds back (a disk flushes its image). Queue notifications that arrive meanwhile stay in
    /// their eventfds and the rings; <see cref="Resume"/> serves them.
    /// </summary>
    public void Pause()
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_paused)
                return;
            _paused = true;
            StopWorkers();
        }
        _device.Pause();
    }

    /// <summary>Starts the workers of an active device again; each looks at its ring at once.</summary>
    public void Resume()
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!_paused)
                return;
            _device.Resume();
            _paused = false;
            if (_active)
                StartWorkers(kick: true);
        }
    }

    /// <summary>The transport's state: configuration space, MSI-X, negotiation, queues, then the device's record.</summary>
    public void SaveState(StateWriter writer)
    {
        lock (_lock)
        {
            if (!_paused)
                throw new InvalidOperationException($"{Name}: the device must be paused before its state is saved");
            writer.Bytes(SaveConfig());
            _msix.Save().Write(writer);
            writer.U32(_deviceFeatureSelect).U32(_driverFeatureSelect).U64(_driverFeatures).U16(_configVector)
                .U8(Status).U16(_queueSelect).U8((byte)Volatile.Read(ref _isr)).Bool(_active)
                .U32((uint)_queues.Length);
            for (int i = 0; i < _queues.Length; i++)
            {
                _queues[i].Save().Write(writer);
                writer.Bool(Volatile.Read(ref _broken[i]));
            }
            _device.SaveState(writer);
        }
    }

    /// <summary>
    /// Restores a saved transport into this fresh, paused one: BARs go where the guest had put
    /// them (queue notifications bound there), MSI-X messages are routed again, an active device
    /// is activated on the saved queues. Its workers start at <see cref="Resume"/>.
    /// </summary>
    public void RestoreState(ref StateReader reader)
    {
        if (!Paused)
            throw new InvalidOperationException($"{Name}: the device must be paused before a state is restored into it");
        byte[] config = reader.Bytes("pci_config", ConfigSpaceSize, exact: true);
        var msix = MsixState.Read(ref reader);
        uint deviceSelect = reader.U32("device_feature_select"), driverSelect = reader.U32("driver_feature_select");
        ulong features = reader.U64("driver_features");
        ushort configVector = reader.U16("config_vector");
        byte status = reader.U8("status");
        ushort queueSelect = reader.U16("queue_select");
        byte isr = reader.U8("isr");
        bool active = reader.Bool("active");
        uint queueCount = reader.U32("queue_count");
        if (queueCount != (uint)_queues.Length)
            throw new DeviceStateException($"{Name}: the saved device had {queueCount} queues, this one {_queues.Length}");
        var queues = new (VirtqueueState State, bool Broken)[_queues.Length];
        for (int i = 0; i < queues.Length; i++)
            queues[i] = (VirtqueueState.Read(ref reader), reader.Bool("queue_broken"));
        if ((features & ~OfferedFeatures) != 0)
            throw new DeviceStateException(
                $"{Name}: the driver negotiated features 0x{features & ~OfferedFeatures:x} that this device does not offer (offered: 0x{OfferedFeatures:x})");
        _device.RestoreState(ref reader);

        RestoreConfig(config);
        lock (_lock)
        {
            _msix.Restore(msix);
            _deviceFeatureSelect = deviceSelect;
            _driverFeatureSelect = driverSelect;
            _driverFeatures = features;
            _configVector = CheckVector(configVector);
            _queueSelect = queueSelect;
            bool eventIdx = (features & VirtioFeature.Bit(VirtioFeature.RingEventIdx)) != 0;
            bool indirect = (features & VirtioFeature.Bit(VirtioFeature.RingIndirectDesc)) != 0;
            for (int i = 0; i < _queues.Length; i++)
            {
                try
                {
                    _queues[i].Restore(queues[i].State, _memory, eventIdx, indirect);
                }
                catch (VirtqueueException e)
                {
                    throw new DeviceStateException($"{Name}: saved {e.Message}");
                }
                _broken[i] = queues[i].Broken;
            }
            if (active)
                _device.Activate(features, _memory);
            _active = active;
            Volatile.Write(ref _status, status);
            lock (_intxLock)
            {
                Volatile.Write(ref _isr, isr & 3);
                _intxAsserted = false;
                UpdateIntxLocked();
            }
        }
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        lock (_lock)
        {
            StopWorkers();
            foreach (var q in _queues)
                q.Deactivate();
        }
        lock (ConfigLock)
        {
            if (_notifyBase is { } bar0 && _ioevents is not null)
                for (int q = 0; q < _queues.Length; q++)
                {
                    try { _ioevents.RemoveMmio(_notifiers[q], NotifyAddress(bar0, q), 2); }
                    catch (Exception) { /* the VM is going away */ }
                }
            _notifyBase = null;
        }
        foreach (var n in _notifiers)
            n.Dispose();
        _msix.Dispose();
        _device.Dispose();
    }
}
