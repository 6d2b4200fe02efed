using Kvm.Interop.Handles;
using Kvm.Interop.Native;
using Kvm.Interop.Structs;

namespace Kvm.Hypervisor;

/// <summary>A KVM virtual machine: memory slots, the in-kernel irqchip and PIT, irq lines and eventfds.</summary>
public sealed class KvmVm : IDisposable
{
    /// <summary>KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.</summary>
    private const ulong ManualProtectEnable = 1;

    private readonly KvmVmHandle _handle;
    private readonly Dictionary<uint, MemorySlot> _slots = new();
    private readonly object _lock = new();

    internal KvmVm(KvmSystem system, KvmVmHandle handle)
    {
        System = system;
        _handle = handle;
    }

    public KvmSystem System { get; }
    internal KvmVmHandle Handle => _handle;

    /// <summary>True once KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: reading the dirty log no longer clears it.</summary>
    public bool ManualDirtyLogProtect { get; private set; }

    public IReadOnlyCollection<MemorySlot> Slots
    {
        get { lock (_lock) return _slots.Values.ToArray(); }
    }

    public int CheckExtension(KvmCap cap) => Math.Max(0, KvmShim.CheckExtension(_handle, (int)cap));

    /// <summary>Places a guest RAM region at its guest address as memory slot <paramref name="slot"/>.</summary>
    public MemorySlot MapMemory(uint slot, GuestMemoryRegion region, bool logDirty = false, bool readOnly = false)
    {
        uint flags = (logDirty ? KvmUserspaceMemoryRegion.LogDirtyPages : 0) | (readOnly ? KvmUserspaceMemoryRegion.ReadOnly : 0);
        int rc = KvmShim.SetUserMemoryRegion(_handle, slot, flags, region.GuestAddress, region.Size, (ulong)region.Host);
        if (rc < 0)
            throw new HypervisorException(
                $"cannot map guest RAM 0x{region.GuestAddress:x}+0x{region.Size:x} as slot {slot}",
                new KvmIoctlException("KVM_SET_USER_MEMORY_REGION", -rc));
        var s = new MemorySlot(slot, region.GuestAddress, region.Size, flags);
        lock (_lock)
            _slots[slot] = s;
        return s;
    }

    /// <summary>Turns dirty-page logging on or off for a slot.</summary>
    public void SetDirtyLogging(MemorySlot slot, bool on, GuestMemoryRegion region)
    {
        uint flags = on ? slot.Flags | KvmUserspaceMemoryRegion.LogDirtyPages : slot.Flags & ~KvmUserspaceMemoryRegion.LogDirtyPages;
        Errno.Check(KvmShim.SetUserMemoryRegion(_handle, slot.Id, flags, region.GuestAddress, region.Size, (ulong)region.Host),
            "KVM_SET_USER_MEMORY_REGION");
        lock (_lock)
            _slots[slot.Id] = new MemorySlot(slot.Id, slot.GuestAddress, slot.Size, flags);
    }

    /// <summary>Enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when the host has it; returns whether it is on.</summary>
    public unsafe bool EnableManualDirtyLogProtect()
    {
        if (CheckExtension(KvmCap.ManualDirtyLogProtect2) == 0)
            return false;
        ulong* args = stackalloc ulong[4] { ManualProtectEnable, 0, 0, 0 };
        Errno.Check(KvmShim.EnableCap(_handle, (uint)KvmCap.ManualDirtyLogProtect2, 0, args), "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
        ManualDirtyLogProtect = true;
        return true;
    }

    /// <summary>
    /// Reads the dirty bitmap of a slot. Without manual protection this also clears it; with it,
    /// call <see cref="ClearDirtyLog"/> for the pages you have dealt with.
    /// </summary>
    public unsafe DirtyBitmap GetDirtyLog(MemorySlot slot)
    {
        if ((slot.Flags & KvmUserspaceMemoryRegion.LogDirtyPages) == 0)
            throw new HypervisorException($"memory slot {slot.Id} does not log dirty pages");
        var bitmap = new DirtyBitmap(slot.GuestAddress, slot.Pages);
        fixed (ulong* p = bitmap.Words)
            Errno.Check(KvmShim.GetDirtyLog(_handle, slot.Id, p), $"KVM_GET_DIRTY_LOG(slot {slot.Id})");
        return bitmap;
    }

    /// <summary>Clears (and write-protects again) the pages set in <paramref name="bitmap"/>; needs manual protection.</summary>
    public unsafe void ClearDirtyLog(MemorySlot slot, DirtyBitmap bitmap)
    {
        if (!ManualDirtyLogProtect)
            throw new HypervisorException("KVM_CLEAR_DIRTY_LOG needs manual dirty-log protection, which is off");
        fixed (ulong* p = bitmap.Words)
            Errno.Check(KvmShim.ClearDirtyLog(_handle, slot.Id, 0, (uint)bitmap.Pages, p), $"KVM_CLEAR_DIRTY_LOG(slot {slot.Id})");
    }

    public void SetTssAddress(ulong addr) => Errno.Check(KvmShim.SetTssAddr(_handle, addr), "KVM_SET_TSS_ADDR");
    public void SetIdentityMapAddress(ulong addr) => Errno.Check(KvmShim.SetIdentityMapAddr(_handle, addr), "KVM_SET_IDENTITY_MAP_ADDR");
    public void CreateIrqchip()
    {
        Errno.Check(KvmShim.CreateIrqchip(_handle), "KVM_CREATE_IRQCHIP");
        HasIrqchip = true;
    }

    public void CreatePit2()
    {
        Errno.Check(KvmShim.CreatePit2(_handle, 0), "KVM_CREATE_PIT2");
        HasPit = true;
    }

    /// <summary>Whether the in-kernel PIC and IOAPIC were created (KVM_CREATE_IRQCHIP).</summary>
    public bool HasIrqchip { get; private set; }

    /// <summary>Whether the in-kernel PIT was created (KVM_CREATE_PIT2).</summary>
    public bool HasPit { get; private set; }

    /// <summary>The GSI routing table last set (KVM has no call that reads it back); empty before the first.</summary>
    public IReadOnlyList<KvmIrqRoutingEntry> GsiRoutes { get; private set; } = [];

    /// <summary>Drives an interrupt line of the in-kernel PIC/IOAPIC.</summary>
    public void SetIrqLine(uint irq, bool level) => Errno.Check(KvmShim.IrqLine(_handle, irq, level ? 1u : 0u), "KVM_IRQ_LINE");

    /// <summary>Signals GSI <paramref name="gsi"/> whenever <paramref name="fd"/> is written.</summary>
    public void AddIrqfd(EventFd fd, uint gsi) => Errno.Check(KvmShim.Irqfd(_handle, fd.Handle, gsi, 0, -1), "KVM_IRQFD");

    public void RemoveIrqfd(EventFd fd, uint gsi) => Errno.Check(KvmShim.Irqfd(_handle, fd.Handle, gsi, 1, -1), "KVM_IRQFD(deassign)");

    /// <summary>Signals <paramref name="fd"/> when the guest writes <paramref name="length"/> bytes at <paramref name="address"/>.</summary>
    public void AddIoeventfd(EventFd fd, ulong address, uint length, bool pio, ulong? datamatch = null)
    {
        uint flags = (pio ? 2u : 0u) | (datamatch.HasValue ? 1u : 0u);
        Errno.Check(KvmShim.Ioeventfd(_handle, address, length, fd.Handle, flags, datamatch ?? 0), "KVM_IOEVENTFD");
    }

    public void RemoveIoeventfd(EventFd fd, ulong address, uint length, bool pio, ulong? datamatch = null)
    {
        uint flags = 4u | (pio ? 2u : 0u) | (datamatch.HasValue ? 1u : 0u);
        Errno.Check(KvmShim.Ioeventfd(_handle, address, length, fd.Handle, flags, datamatch ?? 0), "KVM_IOEVENTFD(deassign)");
    }

    public unsafe void SetGsiRouting(ReadOnlySpan<KvmIrqRoutingEntry> entries)
    {
        fixed (KvmIrqRoutingEntry* p = entries)
            Errno.Check(KvmShim.SetGsiRouting(_handle, (uint)entries.Length, p), "KVM_SET_GSI_ROUTING");
        GsiRoutes = entries.ToArray();
    }

    public KvmClockData GetClock()
    {
        Errno.Check(KvmShim.GetClock(_handle, out var c), "KVM_GET_CLOCK");
        return c;
    }

    public void SetClock(in KvmClockData clock) => Errno.Check(KvmShim.SetClock(_handle, clock), "KVM_SET_CLOCK");

    /// <summary>One chip of the in-kernel irqchip (<see cref="KvmIrqchip.PicMaster"/>, <see cref="KvmIrqchip.PicSlave"/>, <see cref="KvmIrqchip.Ioapic"/>).</summary>
    public KvmIrqchip GetIrqchip(uint chipId)
    {
        var chip = new KvmIrqchip { ChipId = chipId };
        Errno.Check(KvmShim.GetIrqchip(_handle, ref chip), "KVM_GET_IRQCHIP");
        return chip;
    }

    public void SetIrqchip(in KvmIrqchip chip) => Errno.Check(KvmShim.SetIrqchip(_handle, chip), "KVM_SET_IRQCHIP");

    public KvmPitState2 GetPit2()
    {
        Errno.Check(KvmShim.GetPit2(_handle, out var pit), "KVM_GET_PIT2");
        return pit;
    }

    public void SetPit2(in KvmPitState2 pit) => Errno.Check(KvmShim.SetPit2(_handle, pit), "KVM_SET_PIT2");

    public KvmVcpu CreateVcpu(uint id)
    {
        int fd = KvmShim.CreateVcpu(_handle, id);
        if (fd < 0)
        {
            var why = new KvmIoctlException("KVM_CREATE_VCPU", -fd);
            throw new HypervisorException($"cannot create vCPU {id}: {why.Message}", why);
        }
        return new KvmVcpu(id, new KvmVcpuHandle(fd), System.VcpuMmapSize);
    }

    public void Dispose() => _handle.Dispose();
}

/// <summary>A KVM memory slot: a guest-physical range backed by a host mapping.</summary>
public sealed record MemorySlot(uint Id, ulong GuestAddress, ulong Size, uint Flags)
{
    public ulong Pages => Size / GuestMemory.PageSize;
    public bool LogsDirtyPages => (Flags & KvmUserspaceMemoryRegion.LogDirtyPages) != 0;
}

/// <summary>One bit per 4 KiB page of a memory slot, as KVM_GET_DIRTY_LOG fills it.</summary>
public sealed class DirtyBitmap(ulong guestAddress, ulong pages)
{
    public ulong GuestAddress { get; } = guestAddress;
    public ulong Pages { get; } = pages;
    public ulong[] Words { get; } = new ulong[(pages + 63) / 64];

    public bool IsDirty(ulong page) => (Words[page / 64] & (1UL << (int)(page % 64))) != 0;

    public long CountDirty()
    {
        long n = 0;
        foreach (var w in Words)
            n += (long)ulong.PopCount(w);
        return n;
    }

    /// <summary>Guest addresses of the dirty pages, in order.</summary>
    public IEnumerable<ulong> DirtyAddresses()
    {
        for (int i = 0; i < Words.Length; i++)
        {
            ulong w = Words[i];
            while (w != 0)
            {
                int bit = System.Numerics.BitOperations.TrailingZeroCount(w);
                w &= w - 1;
                yield return GuestAddress + ((ulong)i * 64 + (ulong)bit) * GuestMemory.PageSize;
            }
        }
    }
}
