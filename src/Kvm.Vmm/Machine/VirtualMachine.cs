using Kvm.Devices.Bus;
using Kvm.Devices.Legacy.AcpiPm;
using Kvm.Devices.Legacy.DebugExit;
using Kvm.Devices.Legacy.I8042;
using Kvm.Devices.Legacy.Rtc;
using Kvm.Devices.Legacy.Serial;
using Kvm.Devices.Pci;
using Kvm.Devices.Virtio;
using Kvm.Devices.Virtio.Block;
using Kvm.Hypervisor;
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
    private readonly List<IBlockImage> _images = new();
    private readonly List<VirtioPciTransport> _pciDevices = new();
    private readonly TaskCompletionSource<VmStopReason> _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _started;
    private bool _disposed;
    // Exits to this process by KVM exit reason (indexes past the array count as "other").
    private readonly long[] _exitCounts = new long[32];
    private long _startedTimestamp;

    private VirtualMachine(VmSpec spec, KvmSystem kvm, bool ownsKvm, ILogger log)
    {
        Spec = spec;
        _kvm = kvm;
        _ownsKvm = ownsKvm;
        _log = log;
    }

    public VmSpec Spec { get; }
    public GuestMemory Memory { get; private set; } = null!;
    public KvmVm Vm { get; private set; } = null!;
    public IoBus PortIo { get; } = new("port I/O");
    public IoBus Mmio { get; } = new("MMIO");
    public Serial16550 Serial { get; private set; } = null!;
    /// <summary>The kernel when it is an ELF booted through its PVH entry; null for a bzImage.</summary>
    public ElfImage? Kernel { get; private set; }

    /// <summary>The kernel when it is a bzImage booted through the 64-bit boot protocol; null for an ELF.</summary>
    public BzImage? BzKernel { get; private set; }
    public IReadOnlyList<VcpuThread> Vcpus => _threads;
    public IReadOnlyList<MemorySlot> MemorySlots => _slots;
    public PciBus Pci { get; private set; } = null!;

    /// <summary>The ACPI PM1 registers (power button, S5 power-off).</summary>
    public AcpiPmDevice Pm { get; private set; } = null!;
    public AcpiTableSet Acpi { get; private set; } = null!;
    public GsiRouting GsiRouting { get; private set; } = null!;

    /// <summary>The virtio-blk devices, in the order of <see cref="VmSpec.Disks"/>.</summary>
    public IReadOnlyList<VirtioPciTransport> Disks => _pciDevices;

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
        var vm = new VirtualMachine(spec, kvm, ownsKvm, logger ?? NullLogger.Instance) { Kernel = image, BzKernel = bz };
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

    /// <summary>Opens every disk image first, so a bad one fails before anything else is made.</summary>
    private void OpenDisks()
    {
        foreach (var disk in Spec.Disks)
        {
            try
            {
                // Locked: a second VM (or a second --disk) on the same writable image is refused.
                _images.Add(DiskImage.Open(disk.Path, new ImageOpenOptions { ReadOnly = disk.ReadOnly, Exclusive = true }));
            }
            catch (Exception e) when (e is IOException or ImageFormatException or UnauthorizedAccessException or ArgumentException)
            {
                throw new ArgumentException($"disk '{disk.Path}': {e.Message}", e);
            }
        }
    }

    private void Build(byte[] kernelBytes, byte[] initrd, Action<ReadOnlySpan<byte>> serialOutput)
    {
        int maxVcpus = Math.Max(_kvm.CheckExtension(KvmCap.MaxVcpus), _kvm.CheckExtension(KvmCap.NrVcpus));
        if (maxVcpus > 0 && Spec.Cpus > maxVcpus)
            throw new ArgumentException($"cpus {Spec.Cpus} is more than this host's KVM allows ({maxVcpus})");

        Memory = GuestMemory.Create(X86Layout.RamRanges(Spec.MemoryBytes), Spec.HugePages);
        Vm = _kvm.CreateVm();

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

        Vm.CreateIrqchip();
        if (_kvm.CheckExtension(KvmCap.Pit2) > 0)
            Vm.CreatePit2();
        else
            VmmLog.CapabilityMissing(_log, "KVM_CAP_PIT2");

        Serial = new Serial16550(serialOutput, new KvmIrqLine(Vm, Serial16550.Com1Irq));
        PortIo.Register(Serial16550.Com1Port, Serial16550.RegisterCount, Serial);
        PortIo.Register(CmosRtc.Port, CmosRtc.PortCount, new CmosRtc());
        var i8042 = new I8042Controller(vcpu => RequestStop(new GuestResetStop((uint)vcpu)));
        PortIo.Register(I8042Controller.DataPortAddress, 1, i8042.DataPort);
        PortIo.Register(I8042Controller.CommandPortAddress, 1, i8042.CommandPort);
        // ACPI PM1a registers where the FADT says (AcpiConfig.PmIoBase); S5 powers the VM off.
        var acpiConfig = new AcpiConfig(Spec.Cpus, X86Layout.PciMmioStart, X86Layout.PciMmioSize);
        Pm = new AcpiPmDevice(vcpu => RequestStop(new GuestPowerOffStop((uint)vcpu)), new KvmIrqLine(Vm, AcpiConfig.SciIrq));
        PortIo.Register(acpiConfig.PmIoBase!.Value, AcpiPmDevice.Length, Pm);
        if (Spec.DebugExit)
            PortIo.Register(DebugExitDevice.DefaultPort, DebugExitDevice.Length, new DebugExitDevice(status => RequestStop(new DebugExitStop(status))));

        BuildPci();

        // ACPI tables in the BIOS area (reserved in the memory map), where the legacy RSDP scan
        // looks too; hvm_start_info or the zero page points at the RSDP.
        Acpi = AcpiTables.Build(acpiConfig, X86Layout.AcpiTablesStart);
        Memory.Write(Acpi.BaseAddress, Acpi.Bytes);
        BzBootInfo? bzBoot = null;
        if (BzKernel is not null)
        {
            bzBoot = BzBoot.Load(Memory, BzKernel, kernelBytes, Spec.Cmdline, initrd, PvhBoot.MemoryMap(Memory),
                Acpi.RsdpAddress, initrdName: Spec.Initrd ?? "initrd");
        }
        else
        {
            PvhBoot.LoadSegments(Kernel!, kernelBytes, Memory);
            PvhModule? module = initrd.Length > 0 ? PvhBoot.LoadInitrd(Memory, Kernel!, initrd, Spec.Initrd!) : null;
            PvhBoot.WriteBootData(Memory, Spec.Cmdline, Acpi.RsdpAddress, module);
        }

        var cpuid = _kvm.GetSupportedCpuid();
        var cpuidOptions = new CpuidOptions(Spec.Cpus, Spec.AllHiddenCpuFeatures(), TscDeadline: _kvm.CheckExtension(KvmCap.TscDeadlineTimer) > 0);
        var msrs = new HashSet<uint>(_kvm.GetMsrIndexList());
        for (uint id = 0; id < Spec.Cpus; id++)
        {
            var vcpu = Vm.CreateVcpu(id);
            _vcpus.Add(vcpu);
            VcpuSetup.Configure(vcpu, cpuid, cpuidOptions, msrs, hasIrqchip: true);
            if (id == 0 && bzBoot is not null)
            {
                vcpu.SetSregs(BzBoot.EntrySregs(vcpu.GetSregs(), bzBoot));
                vcpu.SetRegs(BzBoot.EntryRegs(bzBoot));
            }
            else if (id == 0)
            {
                vcpu.SetSregs(PvhBoot.EntrySregs(vcpu.GetSregs()));
                vcpu.SetRegs(PvhBoot.EntryRegs(Kernel!.PvhEntry));
            }
            _threads.Add(new VcpuThread(vcpu, OnExit));
        }
        VmmLog.VmCreated(_log, GuestMemory.FormatSize(Spec.MemoryBytes), Spec.Cpus, Spec.Kernel);
    }

    /// <summary>The PCI bus behind ports 0xCF8-0xCFF and one virtio-blk device per disk, slots 1 onwards.</summary>
    private void BuildPci()
    {
        Pci = new PciBus(Mmio, X86Layout.PciMmioStart, X86Layout.PciMmioSize);
        PortIo.Register(PciBus.ConfigAddressPort, PciBus.PortCount, Pci);
        GsiRouting = new GsiRouting(Vm);
        var msi = new KvmMsiController(Vm, GsiRouting);
        var ioevents = new KvmIoEventRegistrar(Vm);
        var intxLines = new Dictionary<byte, SharedInterruptLine>();

        for (int i = 0; i < Spec.Disks.Count; i++)
        {
            int slot = i + 1;
            byte gsi = X86Layout.PciIntxGsi(slot);
            if (!intxLines.TryGetValue(gsi, out var line))
                intxLines[gsi] = line = new SharedInterruptLine(new KvmIrqLine(Vm, gsi));
            var image = _images[i];
            _images[i] = null!;     // the device owns it from here on
            var block = new VirtioBlock($"virtio-blk{i}", image, Spec.Disks[i].ToOptions(), _log);
            VirtioPciTransport transport;
            try
            {
                transport = new VirtioPciTransport(block, Memory, msi, line.CreateSource(), ioevents, _log);
            }
            catch
            {
                block.Dispose();
                throw;
            }
            _pciDevices.Add(transport);
            Pci.Add(transport, gsi);
        }
    }

    /// <summary>Starts every vCPU thread.</summary>
    public void Start()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_started)
            throw new InvalidOperationException("the VM was already started");
        _started = true;
        _startedTimestamp = System.Diagnostics.Stopwatch.GetTimestamp();
        foreach (var t in _threads)
            t.StateChanged += OnVcpuStateChanged;
        foreach (var t in _threads)
            t.Start();
        VmmLog.VmRunning(_log);
    }

    /// <summary>Starts the VM and waits until it stops or <paramref name="cancel"/> fires.</summary>
    public VmStopReason Run(CancellationToken cancel = default)
    {
        Start();
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

    /// <summary>Pauses every vCPU and waits until all are paused.</summary>
    public void Pause()
    {
        foreach (var t in _threads)
            t.Pause(TimeSpan.FromSeconds(10));
    }

    public void Resume()
    {
        foreach (var t in _threads)
            t.Resume();
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
        foreach (var d in _pciDevices)
            d.Dispose();
        foreach (var image in _images)
            image?.Dispose();
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
