using Kvm.Devices.Bus;
using Kvm.Devices.Legacy.AcpiPm;
using Kvm.Devices.Legacy.Serial;
using Kvm.Devices.Manager;
using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;
using Kvm.Hypervisor;
using Kvm.Hypervisor.State;
using Kvm.Interop.Structs;
using Kvm.Storage;
using Kvm.Vmm.Acpi;
using Kvm.Vmm.Boot;
using Kvm.Vmm.Cpu;
using Kvm.Vmm.Exits;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Kvm.Vmm.Machine;

/// <summary>
/// One running VM assembled from a <see cref="VmSpec"/>: guest RAM, the KVM VM with its irqchip and
/// PIT, the port-I/O and MMIO buses with their devices, and one thread per vCPU.
/// </summary>
public sealed class VirtualMachine : IDisposable
{
    private readonly ILogger _log;
    private readonly KvmSystem _kvm;
    private readonly bool _ownsKvm;
    private readonly List<KvmVcpu> _vcpus = new();
    private readonly List<VcpuThread> _threads = new();
    private readonly List<MemorySlot> _slots = new();
    private readonly List<IBlockImage?> _images = new();
    private MachineDevices _devices = null!;
    private readonly bool _restoring;
    private uint[]? _msrs;
    private readonly List<KvmCpuidEntry2[]> _cpuids = new();     // what each vCPU was given
    private readonly List<IDisposable> _owned = new();
    private readonly TaskCompletionSource<VmStopReason> _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _started;
    private bool _disposed;
    private bool _disksClosed;
    private GuestMemory? _attachedMemory;      // guest RAM handed over by another process (CreateForRestore)
    private Snapshot.StepClock? _clock;        // times the build's steps (CreateForRestore for a restore)
    // Exits to this process by KVM exit reason (indexes past the array count as "other").
    private readonly long[] _exitCounts = new long[32];
    private long _startedTimestamp;

    private VirtualMachine(VmSpec spec, KvmSystem kvm, bool ownsKvm, ILogger log, bool restoring)
    {
        Spec = spec;
        _kvm = kvm;
        _ownsKvm = ownsKvm;
        _log = log;
        _restoring = restoring;
    }

    /// <summary>The machine's spec; its disks' paths change when <see cref="SwitchDisks"/> moves them onto new top images.</summary>
    public VmSpec Spec { get; private set; }
    public GuestMemory Memory { get; private set; } = null!;
    public KvmVm Vm { get; private set; } = null!;
    public IoBus PortIo { get; } = new("port I/O");
    public IoBus Mmio { get; } = new("MMIO");
    public Serial16550 Serial => _devices.Serial;

    /// <summary>Every device under its stable id (see <see cref="MachineDevices"/>).</summary>
    public DeviceManager Devices { get; } = new();

    /// <summary>
    /// Makes <paramref name="resource"/> (such as a lazy restore's memory loader) live as long as the
    /// machine: disposed after the vCPUs and devices have stopped, before guest RAM goes.
    /// </summary>
    public void Own(IDisposable resource) => _owned.Add(resource);

    /// <summary>A lazy restore's loader, while this machine's RAM comes in from a snapshot; null otherwise.</summary>
    public Snapshot.LazyMemoryLoader? MemoryLoader { get; set; }

    /// <summary>Where this machine logs.</summary>
    internal ILogger Log => _log;

    /// <summary>Where the guest finds the device with <paramref name="id"/> ("port 0x3f8-0x3ff", "pci 00:01.0"), or null.</summary>
    public string? DeviceLocation(string id) => _devices.Locations.GetValueOrDefault(id);
    /// <summary>The kernel when it is an ELF booted through its PVH entry; null for a bzImage.</summary>
    public ElfImage? Kernel { get; private set; }

    /// <summary>The kernel when it is a bzImage booted through the 64-bit boot protocol; null for an ELF.</summary>
    public BzImage? BzKernel { get; private set; }
    public IReadOnlyList<VcpuThread> Vcpus => _threads;
    public IReadOnlyList<MemorySlot> MemorySlots => _slots;
    public PciBus Pci => _devices.Pci;

    /// <summary>The ACPI PM1 registers (power button, S5 power-off).</summary>
    public AcpiPmDevice Pm => _devices.Pm;

    /// <summary>The ACPI GPE0 block (GPE 0 announces a new VM generation id).</summary>
    public AcpiGpeDevice Gpe => _devices.Gpe;

    /// <summary>
    /// The VM generation id as the guest reads it (the ACPI VMGENID device's 16 bytes in guest
    /// RAM); null while a lazy restore has not loaded all of RAM yet (reading it could wait for the
    /// loader).
    /// </summary>
    public Guid? GenerationId
    {
        get
        {
            if (_disposed || MemoryLoader is { } loader && !loader.Stats.Done)
                return null;
            Span<byte> id = stackalloc byte[16];
            Memory.Read(X86Layout.VmGenIdAddress, id);
            return new Guid(id);
        }
    }

    /// <summary>
    /// Gives the VM a new random generation id and raises GPE 0, so that the guest's OSPM runs
    /// \_GPE._E00 and notifies the VMGENID device: Linux's vmgenid driver then reseeds the
    /// kernel's random state. For a machine that has become a copy of another (a fork).
    /// Returns the new id.
    /// </summary>
    public Guid NewGenerationId()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var id = Guid.NewGuid();
        Memory.Write(X86Layout.VmGenIdAddress, id.ToByteArray());
        _devices.Gpe.Raise(AcpiConfig.VmGenIdGpe);
        return id;
    }

    /// <summary>The ACPI tables written into guest memory (null for a machine built to be restored).</summary>
    public AcpiTableSet? Acpi { get; private set; }
    public GsiRouting GsiRouting => _devices.GsiRouting;

    /// <summary>The virtio-blk devices, in the order of <see cref="VmSpec.Disks"/>.</summary>
    public IReadOnlyList<VirtioPciTransport> Disks => _devices.Disks;
    public IReadOnlyList<VirtioPciTransport> Nics => _devices.Nics;

    /// <summary>
    /// Raised (on a NIC monitor's thread) when a denial-of-service rule of a NIC fires or clears:
    /// the NIC's id and the alarm. Whoever runs the VM pauses it when the rule's action says so
    /// (the device itself carries out <see cref="Kvm.Network.DosAction.Limit"/>).
    /// </summary>
    public event Action<string, Kvm.Network.DosAlarm>? TrafficAlarm;

    /// <summary>What the denial-of-service rules of NIC <paramref name="nic"/> ("virtio-net0") do, or null when it has none.</summary>
    public Kvm.Network.DosAction? NicDosAction(string nic)
    {
        int i = _devices.Nics.FindIndex(t => t.Name == nic);
        return i < 0 ? null : Spec.Nics[i].Dos?.Action;
    }

    /// <summary>Completes with the reason the VM stopped (the first one reported).</summary>
    public Task<VmStopReason> Stopped => _stopped.Task;

    /// <summary>
    /// Builds the VM: checks the spec and the kernel, maps RAM, creates the VM and vCPUs, loads the
    /// kernel. Nothing runs until <see cref="Start"/>.
    /// </summary>
    /// <param name="serialOutput">Receives what the guest writes to COM1.</param>
    public static VirtualMachine Create(VmSpec spec, Action<ReadOnlySpan<byte>> serialOutput, KvmSystem? kvm = null, ILogger? logger = null)
    {
        spec.Validate();
        byte[] kernelBytes = ElfImage.ReadFile(spec.Kernel);
        // The file says which boot protocol it speaks: a bzImage's setup header, or an ELF's PVH note.
        BzImage? bz = BzImage.IsBzImage(kernelBytes) ? BzImage.Parse(kernelBytes, spec.Kernel) : null;
        ElfImage? image = bz is null ? ElfImage.Parse(kernelBytes, spec.Kernel) : null;
        byte[] initrd = spec.Initrd is null ? [] : ElfImage.ReadFile(spec.Initrd, "initrd");
        if (spec.Initrd is not null && initrd.Length == 0)
            throw new BootException($"initrd {spec.Initrd}: the file is empty");

        bool ownsKvm = kvm is null;
        kvm ??= KvmSystem.Open();
        var vm = new VirtualMachine(spec, kvm, ownsKvm, logger ?? NullLogger.Instance, restoring: false) { Kernel = image, BzKernel = bz };
        try
        {
            vm.OpenDisks();
            vm.Build(kernelBytes, initrd, serialOutput);
            return vm;
        }
        catch
        {
            vm.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Builds the machine <paramref name="spec"/> describes for a saved state to be restored into:
    /// RAM, the VM, its vCPUs (CPUID and MSR set-up as for a boot) and every device, paused, but no
    /// kernel is read or loaded and nothing is written to RAM. Then fill RAM, call
    /// <see cref="RestoreState"/>, and <see cref="Start"/>.
    /// </summary>
    /// <param name="memory">
    /// Guest RAM that already holds the guest (attached from another process's memfd, for a VM
    /// handed over in place); the machine owns it from here on, also when this fails. Null: new,
    /// zeroed RAM.
    /// </param>
    /// <param name="clock">Marks each step of the build (a restore's report of where its time went); null: not timed.</param>
    /// <param name="disksLater">
    /// Build the disks' devices without opening their images (another process still holds them):
    /// <see cref="OpenPendingDisks"/> opens them before the state is restored.
    /// </param>
    public static VirtualMachine CreateForRestore(VmSpec spec, Action<ReadOnlySpan<byte>> serialOutput, KvmSystem? kvm = null,
        ILogger? logger = null, GuestMemory? memory = null, Snapshot.StepClock? clock = null, bool disksLater = false)
    {
        try
        {
            spec.Validate();
            if (memory is not null)
            {
                var want = X86Layout.RamRanges(spec.MemoryBytes).ToArray();
                var have = memory.Regions.Select(r => (r.GuestAddress, r.Size)).ToArray();
                if (!want.SequenceEqual(have))
                    throw new DeviceStateException(
                        $"the guest RAM handed over ({string.Join(", ", have.Select(r => $"0x{r.GuestAddress:x}+{GuestMemory.FormatSize(r.Size)}"))}) " +
                        $"is not laid out as a machine of {GuestMemory.FormatSize(spec.MemoryBytes)} needs");
            }
        }
        catch
        {
            memory?.Dispose();
            throw;
        }
        bool ownsKvm = kvm is null;
        KvmSystem system;
        try
        {
            system = kvm ?? KvmSystem.Open();
        }
        catch
        {
            memory?.Dispose();
            throw;
        }
        var vm = new VirtualMachine(spec, system, ownsKvm, logger ?? NullLogger.Instance, restoring: true) { _attachedMemory = memory, _clock = clock };
        try
        {
            clock?.Mark("open /dev/kvm");
            if (disksLater)
                vm._images.AddRange(spec.Disks.Select(d => new Kvm.Devices.Virtio.Block.PendingImage(d.Path, d.ReadOnly)));
            else
            {
                vm.OpenDisks();
                clock?.Mark("open disks");
            }
            vm.Build(null, [], serialOutput);
            vm.Devices.PauseAll();
            clock?.Mark("pause devices");
            return vm;
        }
        catch
        {
            vm.Dispose();
            throw;
        }
    }

    /// <summary>Opens every disk image first, so a bad one fails before anything else is made.</summary>
    private void OpenDisks()
    {
        foreach (var disk in Spec.Disks)
            _images.Add(OpenImage(disk));
    }

    /// <summary>A disk's image, locked (a second VM, or a second --disk, on the same writable image is refused); errors name the disk.</summary>
    private static IBlockImage OpenImage(DiskSpec disk)
    {
        try
        {
            return DiskImage.Open(disk.Path, new ImageOpenOptions { ReadOnly = disk.ReadOnly, Exclusive = true });
        }
        catch (Exception e) when (e is IOException or ImageFormatException or UnauthorizedAccessException or ArgumentException)
        {
            throw new ArgumentException($"disk '{disk.Path}': {e.Message}", e);
        }
    }

    /// <summary>
    /// Opens the images of a machine built with <c>disksLater</c> (<see cref="CreateForRestore"/>)
    /// and puts them under their devices, which are paused; before <see cref="RestoreState"/>.
    /// An image that cannot be opened is an <see cref="ArgumentException"/> naming it.
    /// </summary>
    public void OpenPendingDisks()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_started || !Devices.Paused)
            throw new InvalidOperationException("disk images are put under their devices only while the machine is paused, before it starts");
        for (int i = 0; i < _devices.Disks.Count; i++)
        {
            var block = (Kvm.Devices.Virtio.Block.VirtioBlock)_devices.Disks[i].Device;
            if (block.Image is not Kvm.Devices.Virtio.Block.PendingImage)
                continue;
            var image = OpenImage(Spec.Disks[i]);
            try
            {
                block.ReplaceImage(image).Dispose();
            }
            catch
            {
                image.Dispose();
                throw;
            }
        }
    }

    private void Build(byte[]? kernelBytes, byte[] initrd, Action<ReadOnlySpan<byte>> serialOutput)
    {
        int maxVcpus = Math.Max(_kvm.CheckExtension(KvmCap.MaxVcpus), _kvm.CheckExtension(KvmCap.NrVcpus));
        if (maxVcpus > 0 && Spec.Cpus > maxVcpus)
            throw new ArgumentException($"cpus {Spec.Cpus} is more than this host's KVM allows ({maxVcpus})");

        Memory = _attachedMemory ?? GuestMemory.Create(X86Layout.RamRanges(Spec.MemoryBytes), Spec.HugePages);
        Vm = _kvm.CreateVm();
        _clock?.Mark("create VM");

        if (_kvm.CheckExtension(KvmCap.SetTssAddr) > 0)
            Vm.SetTssAddress(X86Layout.TssAddress);
        if (_kvm.CheckExtension(KvmCap.SetIdentityMapAddr) > 0)
            Vm.SetIdentityMapAddress(X86Layout.IdentityMapAddress);
        if (Spec.TrackDirtyPages)
            Vm.EnableManualDirtyLogProtect();

        // RAM slots go in before the irqchip: once an irqchip exists, every slot change waits for
        // an SRCU grace period in the kernel (measured here: 5-10 ms per slot, against 0.2 ms).
        uint slot = 0;
        foreach (var region in Memory.Regions)
            _slots.Add(Vm.MapMemory(slot++, region, logDirty: Spec.TrackDirtyPages));
        _clock?.Mark("memory slots");

        Vm.CreateIrqchip();
        if (_kvm.CheckExtension(KvmCap.Pit2) > 0)
            Vm.CreatePit2();
        else
            VmmLog.CapabilityMissing(_log, "KVM_CAP_PIT2");
        _clock?.Mark("irqchip and PIT");

        // ACPI PM1a registers where the FADT says; the devices are made in one place, MachineDevices.
        var acpiConfig = new AcpiConfig(Spec.Cpus, X86Layout.PciMmioStart, X86Layout.PciMmioSize)
        {
            VmGenIdAddress = X86Layout.VmGenIdAddress,
        };
        _devices = MachineDevices.Build(new DeviceContext(Spec, Vm, Memory, PortIo, Mmio, acpiConfig, serialOutput, RequestStop, _log,
            (nic, alarm) => TrafficAlarm?.Invoke(nic, alarm)),
            Devices, _images);
        _clock?.Mark("devices");

        // ACPI tables in the BIOS area (reserved in the memory map), where the legacy RSDP scan
        // looks too; hvm_start_info or the zero page points at the RSDP.
        BzBootInfo? bzBoot = null;
        if (kernelBytes is null)
        {
            // Restoring: RAM, the registers and the devices come from the saved state.
        }
        else if (BzKernel is not null)
        {
            Acpi = AcpiTables.Build(acpiConfig, X86Layout.AcpiTablesStart);
            Memory.Write(Acpi.BaseAddress, Acpi.Bytes);
            bzBoot = BzBoot.Load(Memory, BzKernel, kernelBytes, Spec.Cmdline, initrd, PvhBoot.MemoryMap(Memory),
                Acpi.RsdpAddress, initrdName: Spec.Initrd ?? "initrd");
        }
        else
        {
            Acpi = AcpiTables.Build(acpiConfig, X86Layout.AcpiTablesStart);
            Memory.Write(Acpi.BaseAddress, Acpi.Bytes);
            PvhBoot.LoadSegments(Kernel!, kernelBytes, Memory);
            PvhModule? module = initrd.Length > 0 ? PvhBoot.LoadInitrd(Memory, Kernel!, initrd, Spec.Initrd!) : null;
            PvhBoot.WriteBootData(Memory, Spec.Cmdline, Acpi.RsdpAddress, module);
        }
        // A booted VM starts with a generation id of its own (a restored one has its saved id).
        if (kernelBytes is not null)
            Memory.Write(X86Layout.VmGenIdAddress, Guid.NewGuid().ToByteArray());

        var cpuid = _kvm.GetSupportedCpuid();
        var cpuidOptions = new CpuidOptions(Spec.Cpus, Spec.AllHiddenCpuFeatures(), TscDeadline: _kvm.CheckExtension(KvmCap.TscDeadlineTimer) > 0);
        var msrs = new HashSet<uint>(_kvm.GetMsrIndexList());
        for (uint id = 0; id < Spec.Cpus; id++)
        {
            var vcpu = Vm.CreateVcpu(id);
            _vcpus.Add(vcpu);
            VcpuSetup.Configure(vcpu, cpuid, cpuidOptions, msrs, hasIrqchip: true);
            _cpuids.Add(CpuidTable.For(cpuid, id, cpuidOptions));
            if (id == 0 && bzBoot is not null)
            {
                vcpu.SetSregs(BzBoot.EntrySregs(vcpu.GetSregs(), bzBoot));
                vcpu.SetRegs(BzBoot.EntryRegs(bzBoot));
            }
            else if (id == 0 && kernelBytes is not null)
            {
                vcpu.SetSregs(PvhBoot.EntrySregs(vcpu.GetSregs()));
                vcpu.SetRegs(PvhBoot.EntryRegs(Kernel!.PvhEntry));
            }
            _threads.Add(new VcpuThread(vcpu, OnExit));
        }
        _clock?.Mark("vCPUs");
        VmmLog.VmCreated(_log, GuestMemory.FormatSize(Spec.MemoryBytes), Spec.Cpus, Spec.Kernel);
    }

    /// <summary>Starts every vCPU thread.</summary>
    public void Start()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_started)
            throw new InvalidOperationException("the VM was already started");
        _started = true;
        if (_restoring)
            Devices.ResumeAll();
        _startedTimestamp = System.Diagnostics.Stopwatch.GetTimestamp();
        foreach (var t in _threads)
            t.StateChanged += OnVcpuStateChanged;
        foreach (var t in _threads)
            t.Start();
        VmmLog.VmRunning(_log);
    }

    /// <summary>Starts the VM and waits until it stops or <paramref name="cancel"/> fires.</summary>
    /// <param name="started">Called once the vCPUs run.</param>
    public VmStopReason Run(CancellationToken cancel = default, Action? started = null)
    {
        Start();
        started?.Invoke();
        using (cancel.Register(() => RequestStop(new HostStop("stop requested"))))
            Stopped.Wait(CancellationToken.None);
        StopVcpus();
        var reason = Stopped.Result;
        VmmLog.VmStopped(_log, reason.Describe());
        return reason;
    }

    /// <summary>Records why the VM stops (first reason wins) and asks every vCPU to stop.</summary>
    public void RequestStop(VmStopReason reason)
    {
        _stopped.TrySetResult(reason);
        foreach (var t in _threads)
            t.RequestStop();
    }

    /// <summary>How long the VM has run since <see cref="Start"/> (zero before).</summary>
    public TimeSpan Uptime => _startedTimestamp == 0 ? TimeSpan.Zero : System.Diagnostics.Stopwatch.GetElapsedTime(_startedTimestamp);

    /// <summary>Exits handled by this process so far, by KVM exit reason (only reasons seen at least once).</summary>
    public IReadOnlyDictionary<string, long> ExitCounts
    {
        get
        {
            var counts = new SortedDictionary<string, long>(StringComparer.Ordinal);
            for (int i = 0; i < _exitCounts.Length; i++)
            {
                long n = Interlocked.Read(ref _exitCounts[i]);
                if (n == 0)
                    continue;
                string name = i == _exitCounts.Length - 1 ? "other"
                    : Enum.IsDefined((Kvm.Interop.Structs.KvmExitReason)i) ? ((Kvm.Interop.Structs.KvmExitReason)i).ToString().ToLowerInvariant()
                    : $"reason{i}";
                counts[name] = n;
            }
            return counts;
        }
    }

    /// <summary>
    /// Where the VM stands, for a report on a guest that stopped making progress: each vCPU's run
    /// state, registers, MP state, pending events and local APIC in-service and requested vectors
    /// (read with that vCPU paused for the moment, if it ran), each virtio queue's positions, the
    /// exits so far. Devices are not paused: their queues are read as they move.
    /// </summary>
    public string DescribeState()
    {
        var b = new System.Text.StringBuilder();
        b.Append($"up {Uptime.TotalSeconds:F1} s; exits: {string.Join(", ", ExitCounts.Select(e => $"{e.Key} {e.Value}"))}\n");
        foreach (var t in _threads)
        {
            var state = t.State;
            b.Append($"vcpu {t.Vcpu.Id}: {state}{(t.Fault is { } f ? $" (fault: {f.Message})" : "")}\n");
            if (state is not (VcpuRunState.Running or VcpuRunState.Paused))
                continue;
            bool paused = false;
            try
            {
                if (state == VcpuRunState.Running)
                {
                    t.Pause(TimeSpan.FromSeconds(5));
                    paused = true;
                }
                var r = t.Vcpu.GetRegs();
                var sr = t.Vcpu.GetSregs();
                var mp = t.Vcpu.GetMpState();
                var ev = t.Vcpu.GetEvents();
                var lapic = t.Vcpu.GetLapic();
                b.Append($"  RIP {r.Rip:x} RSP {r.Rsp:x} RFLAGS {r.Rflags:x} CPL {sr.Cs.Dpl} CR2 {sr.Cr2:x} CR3 {sr.Cr3:x}; mp-state {mp.MpState}; " +
                         $"exception {(ev.ExceptionInjected != 0 || ev.ExceptionPending != 0 ? ev.ExceptionNr.ToString() : "-")} " +
                         $"interrupt {(ev.InterruptInjected != 0 ? ev.InterruptNr.ToString("x2") : "-")} shadow {ev.InterruptShadow} nmi {ev.NmiPending}/{ev.NmiMasked}\n");
                b.Append($"  lapic TPR {lapic.GetRegister(0x80):x} ISR {ApicVectors(lapic, 0x100)} IRR {ApicVectors(lapic, 0x200)} " +
                         $"timer LVT {lapic.GetRegister(0x320):x} initial {lapic.GetRegister(0x380)} current {lapic.GetRegister(0x390)}\n");
            }
            catch (Exception e)
            {
                b.Append($"  not read: {e.Message}\n");
            }
            finally
            {
                if (paused)
                    t.Resume();
            }
        }
        foreach (var (id, device) in Devices.Devices)
        {
            if (device is not VirtioPciTransport transport)
                continue;
            b.Append($"{id} ({transport.Name}): status 0x{transport.Status:x2}, notifications by exit {transport.NotificationsByExit}, protocol errors {transport.ProtocolErrors}\n");
            foreach (var q in transport.Queues)
                if (q.IsActive)
                    b.Append("  ").Append(q.Describe()).Append('\n');
        }
        if (MemoryLoader is { } loader)
            b.Append($"lazy memory loader: {loader.Stats}\n");
        return b.ToString();
    }

    private static string ApicVectors(in Kvm.Interop.Structs.KvmLapicState lapic, int offset)
    {
        var vectors = new List<int>();
        for (int word = 0; word < 8; word++)
        {
            uint bits = lapic.GetRegister(offset + word * 0x10);
            for (int bit = 0; bit < 32; bit++)
                if ((bits & (1u << bit)) != 0)
                    vectors.Add(word * 32 + bit);
        }
        return vectors.Count == 0 ? "-" : string.Join(',', vectors.Select(v => v.ToString("x2")));
    }

    /// <summary>
    /// Pauses every vCPU and waits until all are paused (each with its last exit completed), then
    /// pauses every device (no request in flight, no worker running, disk images flushed).
    /// </summary>
    public void Pause()
    {
        foreach (var t in _threads)
            t.Pause(TimeSpan.FromSeconds(10));
        Devices.PauseAll();
    }

    /// <summary>Resumes the devices, then the vCPUs.</summary>
    public void Resume()
    {
        if (_disksClosed)
            throw new InvalidOperationException("the VM's disk images are closed (it was suspended to be handed over): it cannot resume in this process");
        Devices.ResumeAll();
        foreach (var t in _threads)
            t.Resume();
    }

    /// <summary>Whether <see cref="CloseDisks"/> closed the disk images: the VM can no longer resume here.</summary>
    public bool DisksClosed => _disksClosed;

    /// <summary>
    /// Closes every disk image of the paused machine (written back and unlocked), so that another
    /// process may open them: the machine is being handed over. It cannot resume afterwards.
    /// </summary>
    public void CloseDisks()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_threads.Any(t => t.State == VcpuRunState.Running) || !Devices.Paused)
            throw new InvalidOperationException("the VM must be paused before its disks are closed");
        _disksClosed = true;
        // Each virtio-blk device owns its image (a second Dispose when the device goes is a no-op).
        foreach (var transport in _devices.Disks)
            ((Kvm.Devices.Virtio.Block.VirtioBlock)transport.Device).Image.Dispose();
        foreach (var image in _images)
            image?.Dispose();
    }

    /// <summary>
    /// Moves disks of the paused machine onto new top images: disk i onto
    /// <paramref name="tops"/>[i] (null: it stays), a qcow2 image made beforehand whose backing
    /// file is the disk's image now, with nothing in it (a checkpoint's copy-on-write child, made
    /// with Qcow2Image.CreateFile while the VM held the parent locked). Each old image, flushed when
    /// the devices paused, is closed and the child opened in its place (the parent comes back as
    /// its backing, read-only and shared, so others may read it); the spec then names the child.
    /// The guest sees the same disk. A child that cannot be opened (or does not fit the disk) puts
    /// that disk back on its old image and fails with <see cref="ArgumentException"/> naming it;
    /// disks already moved stay moved: every disk runs on a whole chain either way.
    /// </summary>
    public void SwitchDisks(IReadOnlyList<string?> tops)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (tops.Count != _devices.Disks.Count)
            throw new ArgumentException($"{tops.Count} new images for {_devices.Disks.Count} disks", nameof(tops));
        if (_disksClosed || _threads.Any(t => t.State == VcpuRunState.Running) || !Devices.Paused)
            throw new InvalidOperationException("the VM must be paused, with its disks open, before its disks move to new images");
        var disks = Spec.Disks.ToArray();
        try
        {
            for (int i = 0; i < tops.Count; i++)
            {
                if (tops[i] is not { } top)
                    continue;
                var block = (Kvm.Devices.Virtio.Block.VirtioBlock)_devices.Disks[i].Device;
                string oldPath = block.Image.Path;
                // Flushed when the device paused; closing it lets the parent's lock go, so the
                // child can open it (shared) as its backing file.
                block.Image.Dispose();
                try
                {
                    var image = OpenImage(disks[i] with { Path = top });
                    try
                    {
                        block.ReplaceImage(image).Dispose();
                    }
                    catch (DeviceStateException e)
                    {
                        image.Dispose();
                        throw new ArgumentException($"disk '{top}': {e.Message}", e);
                    }
                }
                catch (ArgumentException)
                {
                    block.ReplaceImage(OpenImage(disks[i] with { Path = oldPath })).Dispose();
                    throw;
                }
                disks[i] = disks[i] with { Path = top };
            }
        }
        finally
        {
            Spec = Spec with { Disks = disks };
        }
    }

    /// <summary>Record kinds of the VM, of each vCPU and of the vCPUs' CPUID (the devices' are theirs).</summary>
    public const string VmRecordKind = "kvm-vm", VcpuRecordKind = "kvm-vcpu", CpuidRecordKind = "kvm-cpuid";

    /// <summary>The most CPUID entries a vCPU's table may have in a record.</summary>
    private const int MaxCpuidEntries = 1024;

    /// <summary>
    /// The machine's state as records by id: "vm" (irqchip, PIT, clock, GSI routes), "vcpu0"...
    /// (registers and everything else KVM holds per vCPU), then every device's. The machine must be
    /// paused (<see cref="Pause"/>) or not started. Guest RAM is not in it.
    /// </summary>
    public IReadOnlyList<StateRecord> SaveState(Snapshot.StepClock? clock = null)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_threads.Any(t => t.State == VcpuRunState.Running))
            throw new InvalidOperationException("the VM must be paused before its state is saved");
        if (_msrs is null)
        {
            _msrs = VcpuState.ReadableMsrs(_vcpus[0], _kvm.GetMsrIndexList());
            clock?.Mark("find the readable MSRs");
        }
        var records = new List<StateRecord>();
        var w = new StateWriter();
        w.U32((uint)_cpuids.Count);
        foreach (var table in _cpuids)
            w.Structs<KvmCpuidEntry2>(table);
        records.Add(new StateRecord("cpuid", CpuidRecordKind, w.ToArray()));
        w = new StateWriter();
        VmState.Save(Vm).Write(w);
        records.Add(new StateRecord("vm", VmRecordKind, w.ToArray()));
        clock?.Mark("save the VM's chips and clock");
        foreach (var vcpu in _vcpus)
        {
            w = new StateWriter();
            VcpuState.Save(vcpu, _msrs).Write(w);
            records.Add(new StateRecord($"vcpu{vcpu.Id}", VcpuRecordKind, w.ToArray()));
        }
        clock?.Mark("save the vCPUs");
        records.AddRange(Devices.SaveAll());
        clock?.Mark("save the devices");
        return records;
    }

    /// <summary>
    /// Restores <paramref name="records"/> (from <see cref="SaveState"/> of a machine built from
    /// the same spec) into this machine from <see cref="CreateForRestore"/>, before it starts:
    /// the VM's chips and routes, each vCPU, then each device (which re-drives its interrupt
    /// lines and MSI routes). Guest RAM must hold the saved contents before <see cref="Start"/>.
    /// </summary>
    /// <param name="newDevices">
    /// Devices of this machine that the saved one did not have (a disk added while the VM was
    /// suspended): they start as if just reset, the guest has not met them yet. Any other device
    /// without a record is refused.
    /// </param>
    public void RestoreState(IReadOnlyList<StateRecord> records, IReadOnlySet<string>? newDevices = null)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!_restoring || _started)
            throw new InvalidOperationException("a state is restored only into a machine made by CreateForRestore, before it starts");
        var byId = new Dictionary<string, StateRecord>(StringComparer.Ordinal);
        foreach (var r in records)
            if (!byId.TryAdd(r.Id, r))
                throw new DeviceStateException($"the saved state has two records '{r.Id}'");
        StateRecord Take(string id, string kind)
        {
            if (!byId.Remove(id, out var r))
                throw new DeviceStateException($"the saved state has no record '{id}' ({kind}): it was saved from another machine");
            if (r.Kind != kind)
                throw new DeviceStateException($"record '{id}' is a {r.Kind}, not a {kind}");
            return r;
        }
        var cpuidRecord = Take("cpuid", CpuidRecordKind);
        var vmRecord = Take("vm", VmRecordKind);
        var vcpuRecords = _vcpus.Select(v => Take($"vcpu{v.Id}", VcpuRecordKind)).ToArray();
        foreach (var id in byId.Keys.Where(k => k.StartsWith("vcpu", StringComparison.Ordinal) && byId[k].Kind == VcpuRecordKind))
            throw new DeviceStateException($"the saved VM had {id}; this one has {_vcpus.Count} vCPUs");

        var reader = new StateReader(cpuidRecord.Payload, cpuidRecord.Id);
        uint tables = reader.U32("vcpus", (uint)_vcpus.Count, (uint)_vcpus.Count);
        var cpuids = new KvmCpuidEntry2[tables][];
        for (int i = 0; i < cpuids.Length; i++)
            cpuids[i] = reader.Structs<KvmCpuidEntry2>($"vcpu{i}", MaxCpuidEntries);
        reader.End();
        // The guest saw these CPUs: it may use any feature they had, so this host must have them all.
        // What this host gives a vCPU that hides nothing (KVM's supported CPUID plus what the VMM
        // adds from capabilities, such as the TSC deadline timer).
        var supported = _kvm.GetSupportedCpuid();
        var offered = CpuidTable.For(supported, 0,
            new CpuidOptions(Spec.Cpus, TscDeadline: _kvm.CheckExtension(KvmCap.TscDeadlineTimer) > 0));
        var missing = cpuids.SelectMany(t => CpuFeatures.Missing(t, offered)).Distinct().ToArray();
        if (missing.Length > 0)
            throw new DeviceStateException(
                $"this host's CPU (as KVM offers it) lacks {string.Join(", ", missing)}, which the saved VM's CPU had: " +
                "restore it on a host that has them, or give VMs that move a CPU model both hosts have (--cpu-model)");

        reader = new StateReader(vmRecord.Payload, vmRecord.Id);
        var vmState = VmState.Read(ref reader);
        reader.End();
        var vcpuStates = new VcpuState[vcpuRecords.Length];
        for (int i = 0; i < vcpuRecords.Length; i++)
        {
            reader = new StateReader(vcpuRecords[i].Payload, vcpuRecords[i].Id);
            vcpuStates[i] = VcpuState.Read(ref reader);
            reader.End();
            if (vcpuStates[i].Id != _vcpus[i].Id)
                throw reader.Error("id", $"the record holds vCPU {vcpuStates[i].Id}");
        }

        vmState.Restore(Vm);
        // On AMD hosts TR goes in as an available TSS, as the CPU had it (see VcpuState.Restore).
        bool availableTss = CpuidTable.IsAmd(supported);
        for (int i = 0; i < _vcpus.Count; i++)
        {
            // The CPU the guest saw, not the one this spec would give on this host.
            _vcpus[i].SetCpuid(cpuids[i]);
            _cpuids[i] = cpuids[i];
            vcpuStates[i].Restore(_vcpus[i], availableTss);
        }
        // A snapshot saved before the machine had its GPE0 block: the block starts as reset.
        if (!byId.ContainsKey(MachineDevices.GpeId))
            newDevices = new HashSet<string>(newDevices ?? new HashSet<string>(), StringComparer.Ordinal) { MachineDevices.GpeId };
        Devices.RestoreAll([.. byId.Values], newDevices);
    }

    /// <summary>Reads the dirty-page bitmap of every RAM slot (needs <see cref="VmSpec.TrackDirtyPages"/>).</summary>
    public IReadOnlyList<DirtyBitmap> ReadDirtyLog() => _slots.Select(Vm.GetDirtyLog).ToArray();

    /// <summary>Clears the pages set in <paramref name="bitmaps"/> from the dirty log.</summary>
    public void ClearDirtyLog(IReadOnlyList<DirtyBitmap> bitmaps)
    {
        for (int i = 0; i < _slots.Count; i++)
            Vm.ClearDirtyLog(_slots[i], bitmaps[i]);
    }

    private VcpuAction OnExit(KvmVcpu vcpu)
    {
        var exit = VcpuExit.Decode(vcpu.RunPage);
        Interlocked.Increment(ref _exitCounts[Math.Min((int)exit.Reason, _exitCounts.Length - 1)]);
        var outcome = ExitHandler.Handle(exit, PortIo, Mmio, vcpu.Id);
        if (!outcome.ShouldStop)
            return VcpuAction.Continue;
        var stop = outcome.Stop switch
        {
            InternalErrorStop e => e with { Registers = RegisterDump.TryCapture(vcpu) },
            FailEntryStop f => f with { Registers = RegisterDump.TryCapture(vcpu) },
            UnhandledExitStop u => u with { Registers = RegisterDump.TryCapture(vcpu) },
            var s => s!,
        };
        RequestStop(stop);
        return VcpuAction.Stop;
    }

    private void OnVcpuStateChanged(VcpuThread thread, VcpuRunState state)
    {
        if (state != VcpuRunState.Stopped)
            return;
        if (thread.Fault is { } fault)
            RequestStop(new VmmFaultStop(thread.Vcpu.Id, fault));
        else if (_threads.All(t => t == thread || t.State == VcpuRunState.Stopped))
            RequestStop(new HostStop("all vCPUs stopped"));
    }

    private void StopVcpus()
    {
        foreach (var t in _threads)
            t.RequestStop();
        foreach (var t in _threads)
        {
            if (!t.Join(TimeSpan.FromSeconds(5)))
                VmmLog.VcpuStuck(_log, t.Vcpu.Id, 5);
        }
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        if (_started)
            StopVcpus();
        bool allStopped = _threads.All(t => t.State is VcpuRunState.Stopped or VcpuRunState.Created);
        // Device workers stop before the VM, guest RAM and the images go away.
        Devices.Dispose();
        foreach (var image in _images)
            image?.Dispose();
        for (int i = _owned.Count - 1; i >= 0; i--)
            _owned[i].Dispose();
        foreach (var v in _vcpus)
            v.Dispose();
        Vm?.Dispose();
        // Guest RAM stays mapped if a vCPU thread could still touch it.
        if (allStopped)
            Memory?.Dispose();
        if (_ownsKvm)
            _kvm.Dispose();
    }
}
