using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Kvm.Interop.Native;
using Kvm.Interop.Structs;

namespace Kvm.Interop.Tests;

/// <summary>
/// Every kernel struct mirrored in C# must match the kernel's layout. The shim reports sizeof and
/// offsetof as its compiler sees them with the kernel's UAPI headers; these tests compare.
/// </summary>
public class StructLayoutTests
{
    public static TheoryData<string, int> Sizes() => new()
    {
        { "kvm_regs", Unsafe.SizeOf<KvmRegs>() },
        { "kvm_segment", Unsafe.SizeOf<KvmSegment>() },
        { "kvm_dtable", Unsafe.SizeOf<KvmDtable>() },
        { "kvm_sregs", Unsafe.SizeOf<KvmSregs>() },
        { "kvm_fpu", Unsafe.SizeOf<KvmFpu>() },
        { "kvm_xsave", Unsafe.SizeOf<KvmXsave>() },
        { "kvm_xcr", Unsafe.SizeOf<KvmXcr>() },
        { "kvm_xcrs", Unsafe.SizeOf<KvmXcrs>() },
        { "kvm_msr_entry", Unsafe.SizeOf<KvmMsrEntry>() },
        { "kvm_cpuid_entry2", Unsafe.SizeOf<KvmCpuidEntry2>() },
        { "kvm_lapic_state", Unsafe.SizeOf<KvmLapicState>() },
        { "kvm_mp_state", Unsafe.SizeOf<KvmMpState>() },
        { "kvm_vcpu_events", Unsafe.SizeOf<KvmVcpuEvents>() },
        { "kvm_userspace_memory_region", Unsafe.SizeOf<KvmUserspaceMemoryRegion>() },
        { "kvm_irq_routing_entry", Unsafe.SizeOf<KvmIrqRoutingEntry>() },
        { "kvm_clock_data", Unsafe.SizeOf<KvmClockData>() },
        { "kvm_pic_state", Unsafe.SizeOf<KvmPicState>() },
        { "kvm_ioapic_state", Unsafe.SizeOf<KvmIoapicState>() },
        { "kvm_irqchip", Unsafe.SizeOf<KvmIrqchip>() },
        { "kvm_pit_channel_state", Unsafe.SizeOf<KvmPitChannelState>() },
        { "kvm_pit_state2", Unsafe.SizeOf<KvmPitState2>() },
        { "kvm_debugregs", Unsafe.SizeOf<KvmDebugregs>() },
        { "kvm_run", KvmRunLayout.Size },
    };

    [Theory]
    [MemberData(nameof(Sizes))]
    public void StructSizeMatchesKernel(string name, int csharpSize)
    {
        Assert.Equal(KvmShim.Layout(name), csharpSize);
    }

    public static TheoryData<string, Type, string> Fields()
    {
        var d = new TheoryData<string, Type, string>();
        void Add<T>(string c, string cs) => d.Add(c, typeof(T), cs);

        Add<KvmRegs>("kvm_regs.rax", nameof(KvmRegs.Rax));
        Add<KvmRegs>("kvm_regs.rbx", nameof(KvmRegs.Rbx));
        Add<KvmRegs>("kvm_regs.rsp", nameof(KvmRegs.Rsp));
        Add<KvmRegs>("kvm_regs.r8", nameof(KvmRegs.R8));
        Add<KvmRegs>("kvm_regs.r15", nameof(KvmRegs.R15));
        Add<KvmRegs>("kvm_regs.rip", nameof(KvmRegs.Rip));
        Add<KvmRegs>("kvm_regs.rflags", nameof(KvmRegs.Rflags));
        foreach (var (c, cs) in new[] { ("base", "Base"), ("limit", "Limit"), ("selector", "Selector"), ("type", "Type"),
                     ("present", "Present"), ("dpl", "Dpl"), ("db", "Db"), ("s", "S"), ("l", "L"), ("g", "G"), ("avl", "Avl"), ("unusable", "Unusable") })
            Add<KvmSegment>("kvm_segment." + c, cs);
        Add<KvmDtable>("kvm_dtable.base", nameof(KvmDtable.Base));
        Add<KvmDtable>("kvm_dtable.limit", nameof(KvmDtable.Limit));
        foreach (var (c, cs) in new[] { ("cs", "Cs"), ("ds", "Ds"), ("es", "Es"), ("fs", "Fs"), ("gs", "Gs"), ("ss", "Ss"), ("tr", "Tr"),
                     ("ldt", "Ldt"), ("gdt", "Gdt"), ("idt", "Idt"), ("cr0", "Cr0"), ("cr2", "Cr2"), ("cr3", "Cr3"), ("cr4", "Cr4"),
                     ("cr8", "Cr8"), ("efer", "Efer"), ("apic_base", "ApicBase"), ("interrupt_bitmap", "InterruptBitmap") })
            Add<KvmSregs>("kvm_sregs." + c, cs);
        foreach (var (c, cs) in new[] { ("fpr", "Fpr"), ("fcw", "Fcw"), ("fsw", "Fsw"), ("ftwx", "Ftwx"), ("last_opcode", "LastOpcode"),
                     ("last_ip", "LastIp"), ("last_dp", "LastDp"), ("xmm", "Xmm"), ("mxcsr", "Mxcsr") })
            Add<KvmFpu>("kvm_fpu." + c, cs);
        Add<KvmXsave>("kvm_xsave.region", nameof(KvmXsave.Region));
        Add<KvmXcr>("kvm_xcr.xcr", nameof(KvmXcr.Xcr));
        Add<KvmXcr>("kvm_xcr.value", nameof(KvmXcr.Value));
        Add<KvmXcrs>("kvm_xcrs.nr_xcrs", nameof(KvmXcrs.NrXcrs));
        Add<KvmXcrs>("kvm_xcrs.flags", nameof(KvmXcrs.Flags));
        Add<KvmXcrs>("kvm_xcrs.xcrs", nameof(KvmXcrs.XcrWords));
        Add<KvmMsrEntry>("kvm_msr_entry.index", nameof(KvmMsrEntry.Index));
        Add<KvmMsrEntry>("kvm_msr_entry.data", nameof(KvmMsrEntry.Data));
        foreach (var (c, cs) in new[] { ("function", "Function"), ("index", "Index"), ("flags", "Flags"), ("eax", "Eax"), ("ebx", "Ebx"),
                     ("ecx", "Ecx"), ("edx", "Edx") })
            Add<KvmCpuidEntry2>("kvm_cpuid_entry2." + c, cs);
        Add<KvmLapicState>("kvm_lapic_state.regs", nameof(KvmLapicState.Regs));
        Add<KvmMpState>("kvm_mp_state.mp_state", nameof(KvmMpState.MpState));
        foreach (var (c, cs) in new[] { ("exception", "ExceptionInjected"), ("interrupt", "InterruptInjected"), ("nmi", "NmiInjected"),
                     ("sipi_vector", "SipiVector"), ("flags", "Flags"), ("smi", "SmiSmm"), ("triple_fault", "TripleFaultPending") })
            Add<KvmVcpuEvents>("kvm_vcpu_events." + c, cs);
        foreach (var (c, cs) in new[] { ("slot", "Slot"), ("flags", "Flags"), ("guest_phys_addr", "GuestPhysAddr"),
                     ("memory_size", "MemorySize"), ("userspace_addr", "UserspaceAddr") })
            Add<KvmUserspaceMemoryRegion>("kvm_userspace_memory_region." + c, cs);
        foreach (var (c, cs) in new[] { ("gsi", "Gsi"), ("type", "Type"), ("flags", "Flags"), ("u", "U") })
            Add<KvmIrqRoutingEntry>("kvm_irq_routing_entry." + c, cs);
        foreach (var (c, cs) in new[] { ("clock", "Clock"), ("flags", "Flags"), ("realtime", "Realtime"), ("host_tsc", "HostTsc") })
            Add<KvmClockData>("kvm_clock_data." + c, cs);
        foreach (var (c, cs) in new[] { ("last_irr", "LastIrr"), ("irr", "Irr"), ("imr", "Imr"), ("isr", "Isr"), ("priority_add", "PriorityAdd"),
                     ("irq_base", "IrqBase"), ("read_reg_select", "ReadRegSelect"), ("poll", "Poll"), ("special_mask", "SpecialMask"),
                     ("init_state", "InitState"), ("auto_eoi", "AutoEoi"), ("rotate_on_auto_eoi", "RotateOnAutoEoi"),
                     ("special_fully_nested_mode", "SpecialFullyNestedMode"), ("init4", "Init4"), ("elcr", "Elcr"), ("elcr_mask", "ElcrMask") })
            Add<KvmPicState>("kvm_pic_state." + c, cs);
        foreach (var (c, cs) in new[] { ("base_address", "BaseAddress"), ("ioregsel", "IoRegSel"), ("id", "Id"), ("irr", "Irr"), ("redirtbl", "RedirTbl") })
            Add<KvmIoapicState>("kvm_ioapic_state." + c, cs);
        Add<KvmIrqchip>("kvm_irqchip.chip_id", nameof(KvmIrqchip.ChipId));
        Add<KvmIrqchip>("kvm_irqchip.chip", nameof(KvmIrqchip.Chip));
        foreach (var (c, cs) in new[] { ("count", "Count"), ("latched_count", "LatchedCount"), ("count_latched", "CountLatched"),
                     ("status_latched", "StatusLatched"), ("status", "Status"), ("read_state", "ReadState"), ("write_state", "WriteState"),
                     ("write_latch", "WriteLatch"), ("rw_mode", "RwMode"), ("mode", "Mode"), ("bcd", "Bcd"), ("gate", "Gate"),
                     ("count_load_time", "CountLoadTime") })
            Add<KvmPitChannelState>("kvm_pit_channel_state." + c, cs);
        Add<KvmPitState2>("kvm_pit_state2.channels", nameof(KvmPitState2.Channel0));
        Add<KvmPitState2>("kvm_pit_state2.flags", nameof(KvmPitState2.Flags));
        foreach (var (c, cs) in new[] { ("db", "Db"), ("dr6", "Dr6"), ("dr7", "Dr7"), ("flags", "Flags") })
            Add<KvmDebugregs>("kvm_debugregs." + c, cs);
        return d;
    }

    [Theory]
    [MemberData(nameof(Fields))]
    public void FieldOffsetMatchesKernel(string cField, Type type, string csField)
    {
        int expected = KvmShim.Layout(cField);
        Assert.True(expected >= 0, $"the shim does not know {cField}");
        Assert.Equal(expected, (int)Marshal.OffsetOf(type, csField));
    }

    public static TheoryData<string, int> RunOffsets() => new()
    {
        { "kvm_run.request_interrupt_window", KvmRunLayout.RequestInterruptWindow },
        { "kvm_run.immediate_exit", KvmRunLayout.ImmediateExit },
        { "kvm_run.exit_reason", KvmRunLayout.ExitReason },
        { "kvm_run.ready_for_interrupt_injection", KvmRunLayout.ReadyForInterruptInjection },
        { "kvm_run.if_flag", KvmRunLayout.IfFlag },
        { "kvm_run.flags", KvmRunLayout.Flags },
        { "kvm_run.cr8", KvmRunLayout.Cr8 },
        { "kvm_run.apic_base", KvmRunLayout.ApicBase },
        { "kvm_run.hw", KvmRunLayout.Union },
        { "kvm_run.io.direction", KvmRunLayout.IoDirection },
        { "kvm_run.io.size", KvmRunLayout.IoSize },
        { "kvm_run.io.port", KvmRunLayout.IoPort },
        { "kvm_run.io.count", KvmRunLayout.IoCount },
        { "kvm_run.io.data_offset", KvmRunLayout.IoDataOffset },
        { "kvm_run.mmio.phys_addr", KvmRunLayout.MmioPhysAddr },
        { "kvm_run.mmio.data", KvmRunLayout.MmioData },
        { "kvm_run.mmio.len", KvmRunLayout.MmioLen },
        { "kvm_run.mmio.is_write", KvmRunLayout.MmioIsWrite },
        { "kvm_run.fail_entry.hardware_entry_failure_reason", KvmRunLayout.FailEntryReason },
        { "kvm_run.fail_entry.cpu", KvmRunLayout.FailEntryCpu },
        { "kvm_run.ex.exception", KvmRunLayout.ExException },
        { "kvm_run.ex.error_code", KvmRunLayout.ExErrorCode },
        { "kvm_run.internal.suberror", KvmRunLayout.InternalSuberror },
        { "kvm_run.internal.ndata", KvmRunLayout.InternalNdata },
        { "kvm_run.internal.data", KvmRunLayout.InternalData },
        { "kvm_run.system_event.type", KvmRunLayout.SystemEventType },
        { "kvm_run.system_event.ndata", KvmRunLayout.SystemEventNdata },
        { "kvm_run.system_event.data", KvmRunLayout.SystemEventData },
        { "kvm_run.kvm_valid_regs", KvmRunLayout.KvmValidRegs },
        { "kvm_run.kvm_dirty_regs", KvmRunLayout.KvmDirtyRegs },
        { "kvm_run.s", KvmRunLayout.SyncRegs },
    };

    [Theory]
    [MemberData(nameof(RunOffsets))]
    public void KvmRunOffsetMatchesKernel(string cField, int csharpOffset)
    {
        Assert.Equal(KvmShim.Layout(cField), csharpOffset);
    }

    [Fact]
    public void UnknownLayoutNameIsReportedAsMissing()
    {
        Assert.Equal(-Errno.ENOENT, KvmShim.Layout("kvm_regs.no_such_field"));
        Assert.Equal(-Errno.ENOENT, KvmShim.Layout("no_such_struct"));
    }

    [Fact]
    public void XcrsAccessorsRoundTrip()
    {
        var x = new KvmXcrs { NrXcrs = 1 };
        x.Set(0, new KvmXcr { Xcr = 0, Value = 0x7 });
        x.Set(15, new KvmXcr { Xcr = 15, Value = ulong.MaxValue });
        Assert.Equal(0x7UL, x.Get(0).Value);
        Assert.Equal(15u, x.Get(15).Xcr);
        Assert.Equal(ulong.MaxValue, x.Get(15).Value);
        Assert.Throws<ArgumentOutOfRangeException>(() => x.Get(16));
    }

    [Fact]
    public void LapicRegisterAccessorsUseByteOffsets()
    {
        var l = new KvmLapicState();
        l.SetRegister(0x350, 0x700);
        Assert.Equal(0x700u, l.GetRegister(0x350));
        Assert.Equal(0u, l.GetRegister(0x360));
        Assert.Throws<ArgumentOutOfRangeException>(() => l.GetRegister(1024));
    }
}
