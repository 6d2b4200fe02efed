// kvmshim: a thin, typed C layer between the C# code and the KVM ioctls.
//
// Rules:
//   - one exported function per ioctl, with fixed-width argument types;
//   - every function returns a non-negative value on success and -errno on failure;
//   - every kernel struct that C# mirrors is checked here with static_assert, and its size and
//     field offsets are reported by kvmshim_layout() so a C# test can compare them.
//
// Variable-length kernel structs (kvm_cpuid2, kvm_msrs, kvm_msr_list, kvm_irq_routing) are
// assembled here from a count and an array of fixed-size entries, so C# only mirrors the entries.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

// ---- struct layout checks (x86-64 ABI, the kernel's UAPI) ----
static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs");
static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment");
static_assert(sizeof(struct kvm_dtable) == 16, "kvm_dtable");
static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs");
static_assert(sizeof(struct kvm_fpu) == 416, "kvm_fpu");
static_assert(sizeof(struct kvm_xsave) == 4096, "kvm_xsave");
static_assert(sizeof(struct kvm_xcrs) == 392, "kvm_xcrs");
static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry");
static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2");
static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state");
static_assert(sizeof(struct kvm_mp_state) == 4, "kvm_mp_state");
static_assert(sizeof(struct kvm_vcpu_events) == 64, "kvm_vcpu_events");
static_assert(sizeof(struct kvm_userspace_memory_region) == 32, "kvm_userspace_memory_region");
static_assert(sizeof(struct kvm_irq_routing_entry) == 48, "kvm_irq_routing_entry");
static_assert(sizeof(struct kvm_clock_data) == 48, "kvm_clock_data");
static_assert(sizeof(struct kvm_pit_config) == 64, "kvm_pit_config");
static_assert(sizeof(struct kvm_pic_state) == 16, "kvm_pic_state");
static_assert(sizeof(struct kvm_ioapic_state) == 216, "kvm_ioapic_state");
static_assert(sizeof(struct kvm_irqchip) == 520, "kvm_irqchip");
static_assert(sizeof(struct kvm_pit_channel_state) == 24, "kvm_pit_channel_state");
static_assert(sizeof(struct kvm_pit_state2) == 112, "kvm_pit_state2");
static_assert(sizeof(struct kvm_debugregs) == 128, "kvm_debugregs");
static_assert(offsetof(struct kvm_run, exit_reason) == 8, "kvm_run.exit_reason");
static_assert(offsetof(struct kvm_run, io) == 32, "kvm_run union");

// ---- layout report ----
struct layout_entry {
    const char *name;
    int32_t value;
};

#define SZ(t) {#t, (int32_t)sizeof(struct t)}
#define OF(t, f) {#t "." #f, (int32_t)offsetof(struct t, f)}

static const struct layout_entry layout_table[] = {
    SZ(kvm_regs), OF(kvm_regs, rax), OF(kvm_regs, rbx), OF(kvm_regs, rsp), OF(kvm_regs, r8),
    OF(kvm_regs, r15), OF(kvm_regs, rip), OF(kvm_regs, rflags),
    SZ(kvm_segment), OF(kvm_segment, base), OF(kvm_segment, limit), OF(kvm_segment, selector),
    OF(kvm_segment, type), OF(kvm_segment, present), OF(kvm_segment, dpl), OF(kvm_segment, db),
    OF(kvm_segment, s), OF(kvm_segment, l), OF(kvm_segment, g), OF(kvm_segment, avl),
    OF(kvm_segment, unusable),
    SZ(kvm_dtable), OF(kvm_dtable, base), OF(kvm_dtable, limit),
    SZ(kvm_sregs), OF(kvm_sregs, cs), OF(kvm_sregs, ds), OF(kvm_sregs, es), OF(kvm_sregs, fs),
    OF(kvm_sregs, gs), OF(kvm_sregs, ss), OF(kvm_sregs, tr), OF(kvm_sregs, ldt),
    OF(kvm_sregs, gdt), OF(kvm_sregs, idt), OF(kvm_sregs, cr0), OF(kvm_sregs, cr2),
    OF(kvm_sregs, cr3), OF(kvm_sregs, cr4), OF(kvm_sregs, cr8), OF(kvm_sregs, efer),
    OF(kvm_sregs, apic_base), OF(kvm_sregs, interrupt_bitmap),
    SZ(kvm_fpu), OF(kvm_fpu, fpr), OF(kvm_fpu, fcw), OF(kvm_fpu, fsw), OF(kvm_fpu, ftwx),
    OF(kvm_fpu, last_opcode), OF(kvm_fpu, last_ip), OF(kvm_fpu, last_dp), OF(kvm_fpu, xmm),
    OF(kvm_fpu, mxcsr),
    SZ(kvm_xsave), OF(kvm_xsave, region),
    SZ(kvm_xcr), OF(kvm_xcr, xcr), OF(kvm_xcr, value),
    SZ(kvm_xcrs), OF(kvm_xcrs, nr_xcrs), OF(kvm_xcrs, flags), OF(kvm_xcrs, xcrs),
    SZ(kvm_msr_entry), OF(kvm_msr_entry, index), OF(kvm_msr_entry, data),
    SZ(kvm_cpuid_entry2), OF(kvm_cpuid_entry2, function), OF(kvm_cpuid_entry2, index),
    OF(kvm_cpuid_entry2, flags), OF(kvm_cpuid_entry2, eax), OF(kvm_cpuid_entry2, ebx),
    OF(kvm_cpuid_entry2, ecx), OF(kvm_cpuid_entry2, edx),
    SZ(kvm_lapic_state), OF(kvm_lapic_state, regs),
    SZ(kvm_mp_state), OF(kvm_mp_state, mp_state),
    SZ(kvm_vcpu_events), OF(kvm_vcpu_events, exception), OF(kvm_vcpu_events, interrupt),
    OF(kvm_vcpu_events, nmi), OF(kvm_vcpu_events, sipi_vector), OF(kvm_vcpu_events, flags),
    OF(kvm_vcpu_events, smi), OF(kvm_vcpu_events, triple_fault),
    SZ(kvm_userspace_memory_region), OF(kvm_userspace_memory_region, slot),
    OF(kvm_userspace_memory_region, flags), OF(kvm_userspace_memory_region, guest_phys_addr),
    OF(kvm_userspace_memory_region, memory_size), OF(kvm_userspace_memory_region, userspace_addr),
    SZ(kvm_irq_routing_entry), OF(kvm_irq_routing_entry, gsi), OF(kvm_irq_routing_entry, type),
    OF(kvm_irq_routing_entry, flags), OF(kvm_irq_routing_entry, u),
    SZ(kvm_irq_routing_irqchip), OF(kvm_irq_routing_irqchip, irqchip),
    OF(kvm_irq_routing_irqchip, pin),
    SZ(kvm_irq_routing_msi), OF(kvm_irq_routing_msi, address_lo),
    OF(kvm_irq_routing_msi, address_hi), OF(kvm_irq_routing_msi, data),
    OF(kvm_irq_routing_msi, devid),
    SZ(kvm_clock_data), OF(kvm_clock_data, clock), OF(kvm_clock_data, flags),
    OF(kvm_clock_data, realtime), OF(kvm_clock_data, host_tsc),
    SZ(kvm_pic_state), OF(kvm_pic_state, last_irr), OF(kvm_pic_state, irr), OF(kvm_pic_state, imr),
    OF(kvm_pic_state, isr), OF(kvm_pic_state, priority_add), OF(kvm_pic_state, irq_base),
    OF(kvm_pic_state, read_reg_select), OF(kvm_pic_state, poll), OF(kvm_pic_state, special_mask),
    OF(kvm_pic_state, init_state), OF(kvm_pic_state, auto_eoi), OF(kvm_pic_state, rotate_on_auto_eoi),
    OF(kvm_pic_state, special_fully_nested_mode), OF(kvm_pic_state, init4), OF(kvm_pic_state, elcr),
    OF(kvm_pic_state, elcr_mask),
    SZ(kvm_ioapic_state), OF(kvm_ioapic_state, base_address), OF(kvm_ioapic_state, ioregsel),
    OF(kvm_ioapic_state, id), OF(kvm_ioapic_state, irr), OF(kvm_ioapic_state, redirtbl),
    SZ(kvm_irqchip), OF(kvm_irqchip, chip_id), OF(kvm_irqchip, chip),
    SZ(kvm_pit_channel_state), OF(kvm_pit_channel_state, count), OF(kvm_pit_channel_state, latched_count),
    OF(kvm_pit_channel_state, count_latched), OF(kvm_pit_channel_state, status_latched),
    OF(kvm_pit_channel_state, status), OF(kvm_pit_channel_state, read_state),
    OF(kvm_pit_channel_state, write_state), OF(kvm_pit_channel_state, write_latch),
    OF(kvm_pit_channel_state, rw_mode), OF(kvm_pit_channel_state, mode), OF(kvm_pit_channel_state, bcd),
    OF(kvm_pit_channel_state, gate), OF(kvm_pit_channel_state, count_load_time),
    SZ(kvm_pit_state2), OF(kvm_pit_state2, channels), OF(kvm_pit_state2, flags),
    SZ(kvm_debugregs), OF(kvm_debugregs, db), OF(kvm_debugregs, dr6), OF(kvm_debugregs, dr7),
    OF(kvm_debugregs, flags),
    SZ(kvm_run), OF(kvm_run, request_interrupt_window), OF(kvm_run, immediate_exit),
    OF(kvm_run, exit_reason), OF(kvm_run, ready_for_interrupt_injection),
    OF(kvm_run, if_flag), OF(kvm_run, flags), OF(kvm_run, cr8), OF(kvm_run, apic_base),
    OF(kvm_run, hw), OF(kvm_run, fail_entry), OF(kvm_run, ex), OF(kvm_run, io),
    OF(kvm_run, mmio), OF(kvm_run, internal), OF(kvm_run, system_event),
    OF(kvm_run, kvm_valid_regs), OF(kvm_run, kvm_dirty_regs), OF(kvm_run, s),
};

// Size of a struct ("kvm_regs") or offset of a field ("kvm_regs.rip"); -ENOENT if unknown.
// kvm_run.io.* and similar nested fields are reported through their own names below.
EXPORT int32_t kvmshim_layout(const char *name)
{
    static const struct layout_entry nested[] = {
        {"kvm_run.io.direction", (int32_t)offsetof(struct kvm_run, io.direction)},
        {"kvm_run.io.size", (int32_t)offsetof(struct kvm_run, io.size)},
        {"kvm_run.io.port", (int32_t)offsetof(struct kvm_run, io.port)},
        {"kvm_run.io.count", (int32_t)offsetof(struct kvm_run, io.count)},
        {"kvm_run.io.data_offset", (int32_t)offsetof(struct kvm_run, io.data_offset)},
        {"kvm_run.mmio.phys_addr", (int32_t)offsetof(struct kvm_run, mmio.phys_addr)},
        {"kvm_run.mmio.data", (int32_t)offsetof(struct kvm_run, mmio.data)},
        {"kvm_run.mmio.len", (int32_t)offsetof(struct kvm_run, mmio.len)},
        {"kvm_run.mmio.is_write", (int32_t)offsetof(struct kvm_run, mmio.is_write)},
        {"kvm_run.fail_entry.hardware_entry_failure_reason",
         (int32_t)offsetof(struct kvm_run, fail_entry.hardware_entry_failure_reason)},
        {"kvm_run.fail_entry.cpu", (int32_t)offsetof(struct kvm_run, fail_entry.cpu)},
        {"kvm_run.ex.exception", (int32_t)offsetof(struct kvm_run, ex.exception)},
        {"kvm_run.ex.error_code", (int32_t)offsetof(struct kvm_run, ex.error_code)},
        {"kvm_run.internal.suberror", (int32_t)offsetof(struct kvm_run, internal.suberror)},
        {"kvm_run.internal.ndata", (int32_t)offsetof(struct kvm_run, internal.ndata)},
        {"kvm_run.internal.data", (int32_t)offsetof(struct kvm_run, internal.data)},
        {"kvm_run.system_event.type", (int32_t)offsetof(struct kvm_run, system_event.type)},
        {"kvm_run.system_event.ndata", (int32_t)offsetof(struct kvm_run, system_event.ndata)},
        {"kvm_run.system_event.data", (int32_t)offsetof(struct kvm_run, system_event.data)},
    };
    if (name == NULL)
        return -EINVAL;
    for (size_t i = 0; i < sizeof(layout_table) / sizeof(layout_table[0]); i++)
        if (strcmp(layout_table[i].name, name) == 0)
            return layout_table[i].value;
    for (size_t i = 0; i < sizeof(nested) / sizeof(nested[0]); i++)
        if (strcmp(nested[i].name, name) == 0)
            return nested[i].value;
    return -ENOENT;
}

static int32_t result(long rc)
{
    return rc < 0 ? -errno : (int32_t)rc;
}

// ---- system fd (/dev/kvm) ----

EXPORT int32_t kvmshim_open(const char *path)
{
    return result(open(path, O_RDWR | O_CLOEXEC));
}

EXPORT int32_t kvm_get_api_version(int32_t sysfd)
{
    return result(ioctl(sysfd, KVM_GET_API_VERSION, 0));
}

// Works on the system fd and on a VM fd (VM-specific answers).
EXPORT int32_t kvm_check_extension(int32_t fd, int32_t extension)
{
    return result(ioctl(fd, KVM_CHECK_EXTENSION, (long)extension));
}

EXPORT int32_t kvm_get_vcpu_mmap_size(int32_t sysfd)
{
    return result(ioctl(sysfd, KVM_GET_VCPU_MMAP_SIZE, 0));
}

// Fills up to max_entries entries; *nent receives the number filled (or needed, on -E2BIG).
EXPORT int32_t kvm_get_supported_cpuid(int32_t sysfd, uint32_t max_entries,
                                       struct kvm_cpuid_entry2 *entries, uint32_t *nent)
{
    size_t bytes = sizeof(struct kvm_cpuid2) + (size_t)max_entries * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, bytes);
    if (c == NULL)
        return -ENOMEM;
    c->nent = max_entries;
    int rc = ioctl(sysfd, KVM_GET_SUPPORTED_CPUID, c);
    int err = errno;
    *nent = c->nent;
    if (rc == 0)
        memcpy(entries, c->entries, (size_t)c->nent * sizeof(struct kvm_cpuid_entry2));
    free(c);
    return rc < 0 ? -err : 0;
}

EXPORT int32_t kvm_get_msr_index_list(int32_t sysfd, uint32_t max_indices, uint32_t *indices,
                                      uint32_t *count)
{
    size_t bytes = sizeof(struct kvm_msr_list) + (size_t)max_indices * sizeof(uint32_t);
    struct kvm_msr_list *l = calloc(1, bytes);
    if (l == NULL)
        return -ENOMEM;
    l->nmsrs = max_indices;
    int rc = ioctl(sysfd, KVM_GET_MSR_INDEX_LIST, l);
    int err = errno;
    *count = l->nmsrs;
    if (rc == 0)
        memcpy(indices, l->indices, (size_t)l->nmsrs * sizeof(uint32_t));
    free(l);
    return rc < 0 ? -err : 0;
}

// ---- VM fd ----

EXPORT int32_t kvm_create_vm(int32_t sysfd, uint32_t type)
{
    int fd;

    /* The kernel may give up with EINTR when a signal arrives while it builds the VM (it starts
     * worker threads and waits for them): try again, as other VMMs do. */
    do
        fd = ioctl(sysfd, KVM_CREATE_VM, (unsigned long)type);
    while (fd < 0 && errno == EINTR);
    return result(fd);
}

EXPORT int32_t kvm_set_user_memory_region(int32_t vmfd, uint32_t slot, uint32_t flags,
                                          uint64_t guest_phys_addr, uint64_t memory_size,
                                          uint64_t userspace_addr)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot,
        .flags = flags,
        .guest_phys_addr = guest_phys_addr,
        .memory_size = memory_size,
        .userspace_addr = userspace_addr,
    };
    return result(ioctl(vmfd, KVM_SET_USER_MEMORY_REGION, &r));
}

EXPORT int32_t kvm_set_tss_addr(int32_t vmfd, uint64_t addr)
{
    return result(ioctl(vmfd, KVM_SET_TSS_ADDR, (unsigned long)addr));
}

EXPORT int32_t kvm_set_identity_map_addr(int32_t vmfd, uint64_t addr)
{
    return result(ioctl(vmfd, KVM_SET_IDENTITY_MAP_ADDR, &addr));
}

EXPORT int32_t kvm_create_irqchip(int32_t vmfd)
{
    return result(ioctl(vmfd, KVM_CREATE_IRQCHIP, 0));
}

EXPORT int32_t kvm_create_pit2(int32_t vmfd, uint32_t flags)
{
    struct kvm_pit_config c;
    memset(&c, 0, sizeof c);
    c.flags = flags;
    return result(ioctl(vmfd, KVM_CREATE_PIT2, &c));
}

EXPORT int32_t kvm_irq_line(int32_t vmfd, uint32_t irq, uint32_t level)
{
    struct kvm_irq_level l = {.irq = irq, .level = level};
    return result(ioctl(vmfd, KVM_IRQ_LINE, &l));
}

EXPORT int32_t kvm_irqfd(int32_t vmfd, int32_t fd, uint32_t gsi, uint32_t flags, int32_t resamplefd)
{
    struct kvm_irqfd i;
    memset(&i, 0, sizeof i);
    i.fd = (uint32_t)fd;
    i.gsi = gsi;
    i.flags = flags;
    i.resamplefd = (uint32_t)resamplefd;
    return result(ioctl(vmfd, KVM_IRQFD, &i));
}

EXPORT int32_t kvm_ioeventfd(int32_t vmfd, uint64_t addr, uint32_t len, int32_t fd, uint32_t flags,
                             uint64_t datamatch)
{
    struct kvm_ioeventfd e;
    memset(&e, 0, sizeof e);
    e.datamatch = datamatch;
    e.addr = addr;
    e.len = len;
    e.fd = fd;
    e.flags = flags;
    return result(ioctl(vmfd, KVM_IOEVENTFD, &e));
}

EXPORT int32_t kvm_set_gsi_routing(int32_t vmfd, uint32_t count,
                                   const struct kvm_irq_routing_entry *entries)
{
    size_t bytes = sizeof(struct kvm_irq_routing) + (size_t)count * sizeof(struct kvm_irq_routing_entry);
    struct kvm_irq_routing *r = calloc(1, bytes);
    if (r == NULL)
        return -ENOMEM;
    r->nr = count;
    memcpy(r->entries, entries, (size_t)count * sizeof(struct kvm_irq_routing_entry));
    int rc = ioctl(vmfd, KVM_SET_GSI_ROUTING, r);
    int err = errno;
    free(r);
    return rc < 0 ? -err : 0;
}

// bitmap: one bit per page of the slot, rounded up to 64 bits.
EXPORT int32_t kvm_get_dirty_log(int32_t vmfd, uint32_t slot, uint64_t *bitmap)
{
    struct kvm_dirty_log d;
    memset(&d, 0, sizeof d);
    d.slot = slot;
    d.dirty_bitmap = bitmap;
    return result(ioctl(vmfd, KVM_GET_DIRTY_LOG, &d));
}

// first_page and num_pages must be multiples of 64 (num_pages may end at the slot's end).
EXPORT int32_t kvm_clear_dirty_log(int32_t vmfd, uint32_t slot, uint64_t first_page,
                                   uint32_t num_pages, uint64_t *bitmap)
{
    struct kvm_clear_dirty_log c;
    memset(&c, 0, sizeof c);
    c.slot = slot;
    c.first_page = first_page;
    c.num_pages = num_pages;
    c.dirty_bitmap = bitmap;
    return result(ioctl(vmfd, KVM_CLEAR_DIRTY_LOG, &c));
}

EXPORT int32_t kvm_enable_cap(int32_t fd, uint32_t cap, uint32_t flags, const uint64_t *args4)
{
    struct kvm_enable_cap c;
    memset(&c, 0, sizeof c);
    c.cap = cap;
    c.flags = flags;
    if (args4 != NULL)
        memcpy(c.args, args4, sizeof c.args);
    return result(ioctl(fd, KVM_ENABLE_CAP, &c));
}

EXPORT int32_t kvm_get_clock(int32_t vmfd, struct kvm_clock_data *clock)
{
    return result(ioctl(vmfd, KVM_GET_CLOCK, clock));
}

EXPORT int32_t kvm_set_clock(int32_t vmfd, const struct kvm_clock_data *clock)
{
    return result(ioctl(vmfd, KVM_SET_CLOCK, clock));
}

// The in-kernel PIC (chip_id 0 master, 1 slave) and IOAPIC (2): KVM_CREATE_IRQCHIP must have run.
EXPORT int32_t kvm_get_irqchip(int32_t vmfd, struct kvm_irqchip *chip)
{
    return result(ioctl(vmfd, KVM_GET_IRQCHIP, chip));
}

EXPORT int32_t kvm_set_irqchip(int32_t vmfd, const struct kvm_irqchip *chip)
{
    return result(ioctl(vmfd, KVM_SET_IRQCHIP, chip));
}

// The in-kernel PIT (KVM_CREATE_PIT2 must have run).
EXPORT int32_t kvm_get_pit2(int32_t vmfd, struct kvm_pit_state2 *pit)
{
    return result(ioctl(vmfd, KVM_GET_PIT2, pit));
}

EXPORT int32_t kvm_set_pit2(int32_t vmfd, const struct kvm_pit_state2 *pit)
{
    return result(ioctl(vmfd, KVM_SET_PIT2, pit));
}

// ---- vCPU fd ----

EXPORT int32_t kvm_create_vcpu(int32_t vmfd, uint32_t id)
{
    return result(ioctl(vmfd, KVM_CREATE_VCPU, (unsigned long)id));
}

// Returns 0 when the vCPU exited to user space (see kvm_run.exit_reason), -EINTR when a
// signal or immediate_exit stopped it, another -errno on failure.
EXPORT int32_t kvm_run(int32_t vcpufd)
{
    return result(ioctl(vcpufd, KVM_RUN, 0));
}

EXPORT int32_t kvm_get_regs(int32_t vcpufd, struct kvm_regs *regs)
{
    return result(ioctl(vcpufd, KVM_GET_REGS, regs));
}

EXPORT int32_t kvm_set_regs(int32_t vcpufd, const struct kvm_regs *regs)
{
    return result(ioctl(vcpufd, KVM_SET_REGS, regs));
}

EXPORT int32_t kvm_get_sregs(int32_t vcpufd, struct kvm_sregs *sregs)
{
    return result(ioctl(vcpufd, KVM_GET_SREGS, sregs));
}

EXPORT int32_t kvm_set_sregs(int32_t vcpufd, const struct kvm_sregs *sregs)
{
    return result(ioctl(vcpufd, KVM_SET_SREGS, sregs));
}

EXPORT int32_t kvm_get_fpu(int32_t vcpufd, struct kvm_fpu *fpu)
{
    return result(ioctl(vcpufd, KVM_GET_FPU, fpu));
}

EXPORT int32_t kvm_set_fpu(int32_t vcpufd, const struct kvm_fpu *fpu)
{
    return result(ioctl(vcpufd, KVM_SET_FPU, fpu));
}

EXPORT int32_t kvm_get_xsave(int32_t vcpufd, struct kvm_xsave *xsave)
{
    return result(ioctl(vcpufd, KVM_GET_XSAVE, xsave));
}

EXPORT int32_t kvm_set_xsave(int32_t vcpufd, const struct kvm_xsave *xsave)
{
    return result(ioctl(vcpufd, KVM_SET_XSAVE, xsave));
}

EXPORT int32_t kvm_get_xcrs(int32_t vcpufd, struct kvm_xcrs *xcrs)
{
    return result(ioctl(vcpufd, KVM_GET_XCRS, xcrs));
}

EXPORT int32_t kvm_set_xcrs(int32_t vcpufd, const struct kvm_xcrs *xcrs)
{
    return result(ioctl(vcpufd, KVM_SET_XCRS, xcrs));
}

// Returns the number of MSRs read (may be fewer than count: the first failing index stops it).
EXPORT int32_t kvm_get_msrs(int32_t vcpufd, uint32_t count, struct kvm_msr_entry *entries)
{
    size_t bytes = sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry);
    struct kvm_msrs *m = calloc(1, bytes);
    if (m == NULL)
        return -ENOMEM;
    m->nmsrs = count;
    memcpy(m->entries, entries, (size_t)count * sizeof(struct kvm_msr_entry));
    int rc = ioctl(vcpufd, KVM_GET_MSRS, m);
    int err = errno;
    if (rc > 0)
        memcpy(entries, m->entries, (size_t)rc * sizeof(struct kvm_msr_entry));
    free(m);
    return rc < 0 ? -err : rc;
}

// Returns the number of MSRs written.
EXPORT int32_t kvm_set_msrs(int32_t vcpufd, uint32_t count, const struct kvm_msr_entry *entries)
{
    size_t bytes = sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry);
    struct kvm_msrs *m = calloc(1, bytes);
    if (m == NULL)
        return -ENOMEM;
    m->nmsrs = count;
    memcpy(m->entries, entries, (size_t)count * sizeof(struct kvm_msr_entry));
    int rc = ioctl(vcpufd, KVM_SET_MSRS, m);
    int err = errno;
    free(m);
    return rc < 0 ? -err : rc;
}

EXPORT int32_t kvm_set_cpuid2(int32_t vcpufd, uint32_t count, const struct kvm_cpuid_entry2 *entries)
{
    size_t bytes = sizeof(struct kvm_cpuid2) + (size_t)count * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, bytes);
    if (c == NULL)
        return -ENOMEM;
    c->nent = count;
    memcpy(c->entries, entries, (size_t)count * sizeof(struct kvm_cpuid_entry2));
    int rc = ioctl(vcpufd, KVM_SET_CPUID2, c);
    int err = errno;
    free(c);
    return rc < 0 ? -err : 0;
}

EXPORT int32_t kvm_get_lapic(int32_t vcpufd, struct kvm_lapic_state *lapic)
{
    return result(ioctl(vcpufd, KVM_GET_LAPIC, lapic));
}

EXPORT int32_t kvm_set_lapic(int32_t vcpufd, const struct kvm_lapic_state *lapic)
{
    return result(ioctl(vcpufd, KVM_SET_LAPIC, lapic));
}

EXPORT int32_t kvm_get_debugregs(int32_t vcpufd, struct kvm_debugregs *regs)
{
    return result(ioctl(vcpufd, KVM_GET_DEBUGREGS, regs));
}

EXPORT int32_t kvm_set_debugregs(int32_t vcpufd, const struct kvm_debugregs *regs)
{
    return result(ioctl(vcpufd, KVM_SET_DEBUGREGS, regs));
}

// The vCPU's TSC frequency in kHz (KVM_CAP_GET_TSC_KHZ), or -errno.
EXPORT int32_t kvm_get_tsc_khz(int32_t vcpufd)
{
    return result(ioctl(vcpufd, KVM_GET_TSC_KHZ, 0));
}

// Sets the vCPU's TSC frequency (KVM_CAP_TSC_CONTROL): a restored guest keeps the rate it saw.
EXPORT int32_t kvm_set_tsc_khz(int32_t vcpufd, uint32_t khz)
{
    return result(ioctl(vcpufd, KVM_SET_TSC_KHZ, (unsigned long)khz));
}

EXPORT int32_t kvm_get_mp_state(int32_t vcpufd, struct kvm_mp_state *state)
{
    return result(ioctl(vcpufd, KVM_GET_MP_STATE, state));
}

EXPORT int32_t kvm_set_mp_state(int32_t vcpufd, const struct kvm_mp_state *state)
{
    return result(ioctl(vcpufd, KVM_SET_MP_STATE, state));
}

EXPORT int32_t kvm_get_vcpu_events(int32_t vcpufd, struct kvm_vcpu_events *events)
{
    return result(ioctl(vcpufd, KVM_GET_VCPU_EVENTS, events));
}

EXPORT int32_t kvm_set_vcpu_events(int32_t vcpufd, const struct kvm_vcpu_events *events)
{
    return result(ioctl(vcpufd, KVM_SET_VCPU_EVENTS, events));
}

// ---- vCPU kick: a signal with an empty handler, installed without SA_RESTART, so that a
// vCPU thread blocked in KVM_RUN returns with -EINTR when another thread signals it. ----

static void kick_handler(int signo)
{
    (void)signo;
}

// Installs the handler once and returns the signal number used for kicks.
EXPORT int32_t kvmshim_kick_init(void)
{
    int signo = SIGRTMIN + 6;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    if (sigaction(signo, &sa, NULL) < 0)
        return -errno;
    return signo;
}

// The calling thread's pthread id, for kvmshim_kick().
EXPORT uint64_t kvmshim_thread_self(void)
{
    return (uint64_t)pthread_self();
}

EXPORT int32_t kvmshim_kick(uint64_t thread, int32_t signo)
{
    int rc = pthread_kill((pthread_t)thread, signo);
    return rc == 0 ? 0 : -rc;
}

// ---- terminal: character-at-a-time input without echo, keeping ISIG so Ctrl-C still signals ----

static struct termios saved_termios;
static int saved_termios_fd = -1;

EXPORT int32_t kvmshim_term_cbreak(int32_t fd)
{
    struct termios t;
    if (tcgetattr(fd, &t) < 0)
        return -errno;
    if (saved_termios_fd < 0) {
        saved_termios = t;
        saved_termios_fd = fd;
    }
    t.c_lflag &= ~(tcflag_t)(ICANON | ECHO | IEXTEN);
    t.c_iflag &= ~(tcflag_t)(IXON | ICRNL);
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (tcsetattr(fd, TCSANOW, &t) < 0)
        return -errno;
    return 0;
}

EXPORT int32_t kvmshim_term_restore(void)
{
    if (saved_termios_fd < 0)
        return 0;
    if (tcsetattr(saved_termios_fd, TCSANOW, &saved_termios) < 0)
        return -errno;
    saved_termios_fd = -1;
    return 0;
}

// ---- userfaultfd: guest RAM filled on first touch (lazy restore), touches traced (working set) ----
//
// The fault messages (struct uffd_msg) are decoded here into an address and flags, so C# mirrors
// no userfaultfd struct; each ioctl reports how many bytes it handled, also when it stops early.

static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg");

// A userfaultfd (non-blocking, close-on-exec) that may handle faults taken in the kernel, as KVM's
// are: the userfaultfd(2) system call (root or CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1),
// else /dev/userfaultfd (Linux 6.1+, for whoever may open it).
EXPORT int32_t kvmshim_uffd_create(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int err = errno;
#ifdef USERFAULTFD_IOC_NEW
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        int err2 = errno;
        close(dev);
        if (fd >= 0)
            return fd;
        err = err2;
    }
#endif
    return -err;
}

// UFFDIO_API: asks for *features; on return *features holds what the kernel offers.
EXPORT int32_t kvmshim_uffd_api(int32_t fd, uint64_t *features, uint64_t *ioctls)
{
    struct uffdio_api api = { .api = UFFD_API, .features = *features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features = api.features;
    *ioctls = api.ioctls;
    return 0;
}

EXPORT int32_t kvmshim_uffd_register(int32_t fd, uint64_t start, uint64_t length, uint64_t mode, uint64_t *ioctls)
{
    struct uffdio_register r = { .range = { .start = start, .len = length }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &r) < 0)
        return -errno;
    *ioctls = r.ioctls;
    return 0;
}

EXPORT int32_t kvmshim_uffd_unregister(int32_t fd, uint64_t start, uint64_t length)
{
    struct uffdio_range r = { .start = start, .len = length };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

// UFFDIO_COPY: fills [dst, dst+length) from src and wakes the waiters (unless mode says not to).
// *done: bytes copied, also when it stopped early (-EEXIST: a page there was filled already).
EXPORT int32_t kvmshim_uffd_copy(int32_t fd, uint64_t dst, uint64_t src, uint64_t length, uint64_t mode, int64_t *done)
{
    struct uffdio_copy c = { .dst = dst, .src = src, .len = length, .mode = mode, .copy = 0 };
    int rc = ioctl(fd, UFFDIO_COPY, &c);
    int err = errno;
    *done = c.copy;
    return rc < 0 ? -err : 0;
}

EXPORT int32_t kvmshim_uffd_zeropage(int32_t fd, uint64_t start, uint64_t length, uint64_t mode, int64_t *done)
{
    struct uffdio_zeropage z = { .range = { .start = start, .len = length }, .mode = mode, .zeropage = 0 };
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
    int err = errno;
    *done = z.zeropage;
    return rc < 0 ? -err : 0;
}

// UFFDIO_CONTINUE (minor faults): maps the page cache pages already there.
EXPORT int32_t kvmshim_uffd_continue(int32_t fd, uint64_t start, uint64_t length, uint64_t mode, int64_t *done)
{
#ifdef UFFDIO_CONTINUE
    struct uffdio_continue c = { .range = { .start = start, .len = length }, .mode = mode, .mapped = 0 };
    int rc = ioctl(fd, UFFDIO_CONTINUE, &c);
    int err = errno;
    *done = c.mapped;
    return rc < 0 ? -err : 0;
#else
    (void)fd; (void)start; (void)length; (void)mode;
    *done = 0;
    return -ENOTTY;
#endif
}

EXPORT int32_t kvmshim_uffd_wake(int32_t fd, uint64_t start, uint64_t length)
{
    struct uffdio_range r = { .start = start, .len = length };
    return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

// Reads up to max page-fault messages: their addresses and flags (UFFD_PAGEFAULT_FLAG_WRITE,
// _WP, _MINOR). Other events are skipped. Returns how many were read; 0 when none is waiting.
EXPORT int32_t kvmshim_uffd_read_faults(int32_t fd, uint64_t *addresses, uint64_t *flags, int32_t max)
{
    struct uffd_msg msgs[64];
    if (max > 64)
        max = 64;
    if (max <= 0)
        return 0;
    ssize_t n = read(fd, msgs, sizeof(struct uffd_msg) * (size_t)max);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    int32_t count = 0;
    for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg); i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        addresses[count] = msgs[i].arg.pagefault.address;
        flags[count] = msgs[i].arg.pagefault.flags;
        count++;
    }
    return count;
}

// ---- descriptors passed over a unix socket (SCM_RIGHTS): a VM handed to another kvm-vmm ----

#include <sys/socket.h>

#define KVMSHIM_MAX_PASSED_FDS 16

// Sends len bytes of buf on the stream socket sock with nfds descriptors attached (SCM_RIGHTS) to
// its first byte. Returns the bytes sent (the caller sends the rest, if any, without descriptors),
// or -errno.
EXPORT int64_t kvmshim_send_fds(int32_t sock, const void *buf, uint64_t len, const int32_t *fds, int32_t nfds)
{
    if (nfds < 0 || nfds > KVMSHIM_MAX_PASSED_FDS || len == 0)
        return -EINVAL;
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * KVMSHIM_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

// Receives up to len bytes from the stream socket sock, and the descriptors attached to them
// (close-on-exec), up to maxfds of them into fds, their count into *nfds. Returns the bytes
// received (0 at end of stream) or -errno; -EMSGSIZE when more descriptors came than maxfds (then
// every one received is closed, none is reported).
EXPORT int64_t kvmshim_recv_fds(int32_t sock, void *buf, uint64_t len, int32_t *fds, int32_t maxfds, int32_t *nfds)
{
    *nfds = 0;
    if (maxfds < 0 || maxfds > KVMSHIM_MAX_PASSED_FDS || len == 0)
        return -EINVAL;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * KVMSHIM_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf };
    ssize_t n;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    int32_t count = 0;
    int too_many = (msg.msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *got = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < k; i++) {
            if (count < maxfds)
                fds[count++] = got[i];
            else {
                close(got[i]);
                too_many = 1;
            }
        }
    }
    if (too_many) {
        for (int32_t i = 0; i < count; i++)
            close(fds[i]);
        return -EMSGSIZE;
    }
    *nfds = count;
    return n;
}

// ---- userfaultfd touch tracing: a native fault thread ----
//
// The thread that resolves faults must never wait for the .NET runtime: a managed thread that
// touches a traced page blocks in the fault without reaching a GC safe point, so a garbage
// collection started meanwhile would wait for it, and a managed fault thread would wait for the
// collection: a deadlock. So the thread here is a plain pthread. It records the page of each
// fault (granule-aligned host addresses, in order, repeats possible only across the end),
// resolves it (UFFDIO_CONTINUE for a minor fault; zeros for a missing one, or for a minor fault
// whose page left the page cache) and wakes the waiters. On an error it unregisters the ranges
// (whoever waits then faults again, untraced) and ends, keeping the errno.

#include <poll.h>
#include <sys/eventfd.h>

struct uffd_trace {
    int uffd, stop_fd, hugetlb;
    uint64_t granule;
    uint64_t *starts, *lengths;
    int32_t nranges;
    uint8_t *zeros;
    pthread_t thread;
    uint64_t *pages;
    size_t count, cap;
    int64_t minor, missing;
    int32_t error;
    int unregistered;
};

static void trace_unregister(struct uffd_trace *t)
{
    if (t->unregistered)
        return;
    t->unregistered = 1;
    for (int32_t i = 0; i < t->nranges; i++) {
        struct uffdio_range r = { .start = t->starts[i], .len = t->lengths[i] };
        ioctl(t->uffd, UFFDIO_UNREGISTER, &r);
    }
}

static int trace_record(struct uffd_trace *t, uint64_t page)
{
    if (t->count == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 4096;
        uint64_t *p = realloc(t->pages, cap * sizeof *p);
        if (!p)
            return -ENOMEM;
        t->pages = p;
        t->cap = cap;
    }
    t->pages[t->count++] = page;
    return 0;
}

static int trace_zero(struct uffd_trace *t, uint64_t page)
{
    int rc;
    if (t->hugetlb) {
        struct uffdio_copy c = { .dst = page, .src = (uint64_t)(uintptr_t)t->zeros, .len = t->granule, .mode = 0 };
        rc = ioctl(t->uffd, UFFDIO_COPY, &c);
    } else {
        struct uffdio_zeropage z = { .range = { .start = page, .len = t->granule }, .mode = 0 };
        rc = ioctl(t->uffd, UFFDIO_ZEROPAGE, &z);
    }
    return rc < 0 && errno != EEXIST && errno != EAGAIN ? -errno : 0;
}

static int trace_resolve(struct uffd_trace *t, uint64_t page, int minor)
{
    int rc = 0;
#ifdef UFFDIO_CONTINUE
    if (minor) {
        struct uffdio_continue c = { .range = { .start = page, .len = t->granule }, .mode = 0 };
        if (ioctl(t->uffd, UFFDIO_CONTINUE, &c) < 0) {
            if (errno == EFAULT || errno == ENOENT)
                rc = trace_zero(t, page);
            else if (errno != EEXIST && errno != EAGAIN)
                rc = -errno;
        }
    } else
        rc = trace_zero(t, page);
#else
    (void)minor;
    rc = trace_zero(t, page);
#endif
    if (rc < 0)
        return rc;
    // A page filled by another path meanwhile (EEXIST) woke nobody.
    struct uffdio_range r = { .start = page, .len = t->granule };
    return ioctl(t->uffd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

// Reads every fault waiting; records each and, with resolve, resolves it. 0, or -errno.
static int trace_drain(struct uffd_trace *t, int resolve)
{
    struct uffd_msg msgs[64];
    for (;;) {
        ssize_t n = read(t->uffd, msgs, sizeof msgs);
        if (n < 0)
            return errno == EAGAIN ? 0 : errno == EINTR ? 0 : -errno;
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t page = msgs[i].arg.pagefault.address & ~(t->granule - 1);
            int minor = (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
            __atomic_add_fetch(minor ? &t->minor : &t->missing, 1, __ATOMIC_RELAXED);
            int rc = trace_record(t, page);
            if (rc == 0 && resolve)
                rc = trace_resolve(t, page, minor);
            if (rc < 0)
                return rc;
        }
    }
}

// The shim's own threads take no signals: the runtime's (GC suspension, Ctrl-C) are for its threads.
static void block_signals(void)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
}

static void *trace_thread(void *arg)
{
    struct uffd_trace *t = arg;
    block_signals();
    for (;;) {
        struct pollfd p[2] = { { .fd = t->uffd, .events = POLLIN }, { .fd = t->stop_fd, .events = POLLIN } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            t->error = errno;
            break;
        }
        int rc = trace_drain(t, 1);
        if (rc < 0) {
            t->error = -rc;
            break;
        }
        if (p[1].revents & POLLIN)
            break;
    }
    if (t->error)
        trace_unregister(t);
    return NULL;
}

// Starts tracing the faults of uffd (already registered for [starts[i], starts[i]+lengths[i]),
// minor and missing modes) on a native thread. granule: the page size (4096, or 2 MiB for
// hugetlb). *out receives the trace, for kvmshim_uffd_trace_stop. The uffd stays the caller's.
EXPORT int32_t kvmshim_uffd_trace_start(int32_t uffd, uint64_t granule, int32_t hugetlb,
                                        const uint64_t *starts, const uint64_t *lengths, int32_t nranges, void **out)
{
    if (nranges < 0 || granule == 0 || (granule & (granule - 1)))
        return -EINVAL;
    struct uffd_trace *t = calloc(1, sizeof *t);
    if (!t)
        return -ENOMEM;
    t->uffd = uffd;
    t->granule = granule;
    t->hugetlb = hugetlb;
    t->nranges = nranges;
    t->starts = calloc((size_t)nranges + 1, sizeof(uint64_t));
    t->lengths = calloc((size_t)nranges + 1, sizeof(uint64_t));
    if (hugetlb)
        t->zeros = aligned_alloc(4096, granule);
    if (!t->starts || !t->lengths || (hugetlb && !t->zeros)) {
        free(t->starts); free(t->lengths); free(t->zeros); free(t);
        return -ENOMEM;
    }
    if (hugetlb)
        memset(t->zeros, 0, granule);
    memcpy(t->starts, starts, (size_t)nranges * sizeof(uint64_t));
    memcpy(t->lengths, lengths, (size_t)nranges * sizeof(uint64_t));
    t->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (t->stop_fd < 0) {
        int err = errno;
        free(t->starts); free(t->lengths); free(t->zeros); free(t);
        return -err;
    }
    int rc = pthread_create(&t->thread, NULL, trace_thread, t);
    if (rc != 0) {
        close(t->stop_fd);
        free(t->starts); free(t->lengths); free(t->zeros); free(t);
        return -rc;
    }
    *out = t;
    return 0;
}

// First touches so far.
EXPORT int64_t kvmshim_uffd_trace_faults(void *trace)
{
    struct uffd_trace *t = trace;
    return __atomic_load_n(&t->minor, __ATOMIC_RELAXED) + __atomic_load_n(&t->missing, __ATOMIC_RELAXED);
}

// Ends the trace: the thread resolves what waits and ends, the ranges are unregistered (waking
// anyone still waiting), faults read after that are recorded too. Hands out the pages recorded
// (host addresses, granule-aligned, in the order seen; free them with kvmshim_uffd_trace_free),
// the minor and missing fault counts and the errno that ended the trace early (0: none).
// Frees the trace.
EXPORT int32_t kvmshim_uffd_trace_stop(void *trace, uint64_t **pages, uint64_t *count, int64_t *minor, int64_t *missing, int32_t *error)
{
    struct uffd_trace *t = trace;
    uint64_t one = 1;
    if (write(t->stop_fd, &one, sizeof one) < 0) {
        // An eventfd write fails only on overflow; the thread sees the counter all the same.
    }
    pthread_join(t->thread, NULL);
    trace_unregister(t);
    int rc = trace_drain(t, 0);
    if (rc < 0 && !t->error)
        t->error = -rc;
    close(t->stop_fd);
    *pages = t->pages;
    *count = t->count;
    *minor = t->minor;
    *missing = t->missing;
    *error = t->error;
    free(t->starts); free(t->lengths); free(t->zeros); free(t);
    return 0;
}

EXPORT void kvmshim_uffd_trace_free(uint64_t *pages)
{
    free(pages);
}

// ---- userfaultfd lazy restore: guest RAM filled from a snapshot's memory file on first touch ----
//
// Native threads for the same reason as the touch trace above: a thread of the VMM's own that
// touches a page not yet loaded blocks in the fault, where the .NET runtime cannot stop it for a
// garbage collection; if the thread that resolves faults were managed, it could wait for that
// collection, which waits for the blocked thread. So the fault thread and the background loader
// are plain pthreads and never call into the runtime; the runtime asks for counters and waits on a
// condition variable (in a P/Invoke, where a collection does not wait for it).
//
// RAM is split into chunks (the chunk size, a multiple of 4 KiB); each chunk is loaded once, by
// whoever gets to it first (the fault thread for a touch, the background loader in address order,
// or the caller before the vCPUs start): read from the file at its offset, then UFFDIO_ZEROPAGE
// when it is all zeros, else UFFDIO_COPY, which wakes whoever waits in it. Once every chunk is in,
// the ranges are unregistered and RAM is ordinary memory. On an error the first errno is kept, the
// ranges are unregistered (so no thread waits forever: a page not loaded then reads as zeros) and
// the loading ends; the caller learns it from kvmshim_lazy_wait.

#include <sys/resource.h>
#include <time.h>

enum { LAZY_NOT_LOADED = 0, LAZY_LOADING = 1, LAZY_LOADED = 2 };

struct lazy_region {
    uint64_t host, size, file_offset;
    uint8_t *state;             // per chunk: LAZY_*
    uint64_t chunks;
};

struct lazy_loader {
    int uffd, file_fd, stop_fd;
    uint64_t chunk;
    int32_t nregions;
    struct lazy_region *regions;
    uint64_t total_chunks, loaded_chunks;
    int64_t faults, bytes_touch, bytes_first, bytes_background;
    int64_t started_ns, finished_ns;
    int32_t error, stopping, unregistered, done;
    int64_t rate;               // background bytes per second; < 0: unlimited; 0: no background loader
    pthread_t fault_thread, background_thread;
    int background_started;
    pthread_mutex_t lock;       // guards done and error changes, with changed
    pthread_cond_t changed;
};

static int64_t lazy_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void lazy_unregister(struct lazy_loader *l)
{
    if (__atomic_exchange_n(&l->unregistered, 1, __ATOMIC_ACQ_REL))
        return;
    for (int32_t i = 0; i < l->nregions; i++) {
        struct uffdio_range r = { .start = l->regions[i].host, .len = l->regions[i].size };
        ioctl(l->uffd, UFFDIO_UNREGISTER, &r);
    }
}

// The first error ends the loading: every range unregistered, waiters told.
static void lazy_fail(struct lazy_loader *l, int err)
{
    pthread_mutex_lock(&l->lock);
    if (!l->error)
        l->error = err;
    pthread_cond_broadcast(&l->changed);
    pthread_mutex_unlock(&l->lock);
    lazy_unregister(l);
}

static void lazy_finish(struct lazy_loader *l)
{
    __atomic_store_n(&l->finished_ns, lazy_now_ns(), __ATOMIC_RELEASE);
    lazy_unregister(l);
    pthread_mutex_lock(&l->lock);
    l->done = 1;
    pthread_cond_broadcast(&l->changed);
    pthread_mutex_unlock(&l->lock);
}

static int lazy_all_zero(const uint8_t *p, size_t n)
{
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

// Reads len bytes at offset of fd into buf: 0, or -errno (-ENODATA: the file ends before).
static int pread_all(int fd, uint8_t *buf, uint64_t len, uint64_t offset)
{
    uint64_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, buf + got, len - got, (off_t)(offset + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -ENODATA;
        got += (uint64_t)n;
    }
    return 0;
}

// Keeps a background thread at its rate: sleeps until `done` bytes are due, `started` being when
// it began (rate <= 0: no limit).
static void pace(int64_t started, int64_t done, int64_t rate)
{
    if (rate <= 0)
        return;
    int64_t due = started + (int64_t)((double)done / (double)rate * 1e9);
    int64_t ahead = due - lazy_now_ns();
    if (ahead > 1000000) {
        struct timespec ts = { .tv_sec = ahead / 1000000000, .tv_nsec = ahead % 1000000000 };
        nanosleep(&ts, NULL);
    }
}

// Waits on changed (lock held by neither) until *done (1), *error (2) or *stopping (3) is set, or
// timeout_ms passed (0; < 0: no limit): the outcome of a lazy loader's or a checkpoint writer's work.
static int32_t wait_outcome(pthread_mutex_t *lock, pthread_cond_t *changed, const int32_t *done, const int32_t *error,
                            const int32_t *stopping, int64_t timeout_ms)
{
    struct timespec until;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (timeout_ms % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
    }
    int32_t result = 0;
    pthread_mutex_lock(lock);
    for (;;) {
        if (*done) { result = 1; break; }
        if (*error) { result = 2; break; }
        if (*stopping) { result = 3; break; }
        int rc = timeout_ms < 0 ? pthread_cond_wait(changed, lock) : pthread_cond_timedwait(changed, lock, &until);
        if (rc == ETIMEDOUT) {
            result = *done ? 1 : *error ? 2 : *stopping ? 3 : 0;
            break;
        }
    }
    pthread_mutex_unlock(lock);
    return result;
}

// Fills [dst, dst+len) of a registered range from buf (NULL: zeros). 0, or -errno.
static int lazy_fill(struct lazy_loader *l, uint64_t dst, const uint8_t *buf, uint64_t len)
{
    uint64_t at = 0;
    while (at < len) {
        int64_t done;
        int rc;
        if (buf) {
            struct uffdio_copy c = { .dst = dst + at, .src = (uint64_t)(uintptr_t)(buf + at), .len = len - at, .mode = 0 };
            rc = ioctl(l->uffd, UFFDIO_COPY, &c);
            done = c.copy;
        } else {
            struct uffdio_zeropage z = { .range = { .start = dst + at, .len = len - at }, .mode = 0 };
            rc = ioctl(l->uffd, UFFDIO_ZEROPAGE, &z);
            done = z.zeropage;
        }
        if (rc == 0) {
            at = len;
            break;
        }
        int err = errno;
        if (done > 0)
            at += (uint64_t)done;
        if (err == EEXIST)
            at += 4096;             // the page there is in already (it was filled another way)
        else if (err != EAGAIN)
            return -err;
    }
    return 0;
}

// Loads chunk c of region r unless someone else loads or loaded it, adding its bytes to *counter
// before the fill wakes anyone (so whoever is woken sees them counted). Returns the bytes this call
// loaded (0: not this call's), or -errno.
static int64_t lazy_load(struct lazy_loader *l, int32_t r, uint64_t c, uint8_t *buf, int64_t *counter)
{
    struct lazy_region *reg = &l->regions[r];
    uint8_t expected = LAZY_NOT_LOADED;
    if (!__atomic_compare_exchange_n(&reg->state[c], &expected, LAZY_LOADING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    uint64_t offset = c * l->chunk;
    uint64_t len = reg->size - offset < l->chunk ? reg->size - offset : l->chunk;
    int got = pread_all(l->file_fd, buf, len, reg->file_offset + offset);
    if (got < 0)
        return got;                 // -ENODATA: the file was cut short after it was checked
    __atomic_add_fetch(counter, (int64_t)len, __ATOMIC_RELEASE);
    int rc = lazy_fill(l, reg->host + offset, lazy_all_zero(buf, len) ? NULL : buf, len);
    if (rc < 0)
        return rc;
    __atomic_store_n(&reg->state[c], LAZY_LOADED, __ATOMIC_RELEASE);
    if (__atomic_add_fetch(&l->loaded_chunks, 1, __ATOMIC_ACQ_REL) == l->total_chunks)
        lazy_finish(l);
    return (int64_t)len;
}

static int lazy_locate(struct lazy_loader *l, uint64_t host, int32_t *r, uint64_t *c)
{
    for (int32_t i = 0; i < l->nregions; i++)
        if (host >= l->regions[i].host && host - l->regions[i].host < l->regions[i].size) {
            *r = i;
            *c = (host - l->regions[i].host) / l->chunk;
            return 1;
        }
    return 0;
}

static void *lazy_fault_thread(void *arg)
{
    struct lazy_loader *l = arg;
    block_signals();
    uint8_t *buf = malloc(l->chunk);
    if (!buf) {
        lazy_fail(l, ENOMEM);
        return NULL;
    }
    struct uffd_msg msgs[64];
    while (!__atomic_load_n(&l->stopping, __ATOMIC_ACQUIRE)) {
        struct pollfd p[2] = { { .fd = l->uffd, .events = POLLIN }, { .fd = l->stop_fd, .events = POLLIN } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            lazy_fail(l, errno);
            break;
        }
        if (p[1].revents & POLLIN)
            break;
        ssize_t n = read(l->uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            lazy_fail(l, errno);
            break;
        }
        int failed = 0;
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg) && !failed; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            __atomic_add_fetch(&l->faults, 1, __ATOMIC_RELAXED);
            uint64_t page = msgs[i].arg.pagefault.address & ~(uint64_t)4095;
            int32_t r;
            uint64_t c;
            if (lazy_locate(l, page, &r, &c)) {
                int64_t loaded = lazy_load(l, r, c, buf, &l->bytes_touch);
                if (loaded < 0) {
                    lazy_fail(l, (int)-loaded);
                    failed = 1;
                    break;
                }
                if (loaded > 0)
                    continue;       // UFFDIO_COPY/ZEROPAGE woke the waiters
                // Another thread loads it; its fill wakes the waiter. Once it is in, wake anyway.
                while (__atomic_load_n(&l->regions[r].state[c], __ATOMIC_ACQUIRE) != LAZY_LOADED
                       && !__atomic_load_n(&l->stopping, __ATOMIC_ACQUIRE) && !__atomic_load_n(&l->unregistered, __ATOMIC_ACQUIRE))
                    sched_yield();
            }
            struct uffdio_range w = { .start = page, .len = 4096 };
            ioctl(l->uffd, UFFDIO_WAKE, &w);
        }
        if (failed)
            break;
    }
    free(buf);
    return NULL;
}

static void *lazy_background_thread(void *arg)
{
    struct lazy_loader *l = arg;
    block_signals();
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10);   // behind the guest and the fault thread
    uint8_t *buf = malloc(l->chunk);
    if (!buf) {
        lazy_fail(l, ENOMEM);
        return NULL;
    }
    int64_t started = lazy_now_ns(), loaded = 0;
    for (int32_t r = 0; r < l->nregions; r++)
        for (uint64_t c = 0; c < l->regions[r].chunks; c++) {
            if (__atomic_load_n(&l->stopping, __ATOMIC_ACQUIRE) || __atomic_load_n(&l->unregistered, __ATOMIC_ACQUIRE))
                goto out;
            int64_t n = lazy_load(l, r, c, buf, &l->bytes_background);
            if (n < 0) {
                lazy_fail(l, (int)-n);
                goto out;
            }
            loaded += n;
            if (n > 0)
                pace(started, loaded, l->rate);
        }
out:
    free(buf);
    return NULL;
}

static void lazy_free(struct lazy_loader *l)
{
    if (l->regions)
        for (int32_t i = 0; i < l->nregions; i++)
            free(l->regions[i].state);
    free(l->regions);
    if (l->stop_fd >= 0)
        close(l->stop_fd);
    pthread_mutex_destroy(&l->lock);
    pthread_cond_destroy(&l->changed);
    free(l);
}

// Starts loading guest RAM lazily: uffd has [hosts[i], hosts[i]+sizes[i]) registered in missing
// mode, file_fd holds region i's bytes at file_offsets[i]; chunk: the bytes a touch brings in (a
// multiple of 4096). The fault thread starts at once; the background loader with
// kvmshim_lazy_background. *out receives the loader. uffd and file_fd stay the caller's, open
// until kvmshim_lazy_stop.
EXPORT int32_t kvmshim_lazy_start(int32_t uffd, int32_t file_fd, uint64_t chunk, const uint64_t *hosts, const uint64_t *sizes,
                                  const uint64_t *file_offsets, int32_t nregions, void **out)
{
    if (nregions <= 0 || chunk == 0 || chunk % 4096 != 0)
        return -EINVAL;
    for (int32_t i = 0; i < nregions; i++)
        if (sizes[i] == 0 || sizes[i] % 4096 != 0 || hosts[i] % 4096 != 0)
            return -EINVAL;
    struct lazy_loader *l = calloc(1, sizeof *l);
    if (!l)
        return -ENOMEM;
    pthread_mutex_init(&l->lock, NULL);
    pthread_cond_init(&l->changed, NULL);
    l->uffd = uffd;
    l->file_fd = file_fd;
    l->chunk = chunk;
    l->stop_fd = -1;
    l->nregions = nregions;
    l->started_ns = lazy_now_ns();
    l->regions = calloc((size_t)nregions, sizeof *l->regions);
    if (!l->regions) {
        lazy_free(l);
        return -ENOMEM;
    }
    for (int32_t i = 0; i < nregions; i++) {
        struct lazy_region *reg = &l->regions[i];
        reg->host = hosts[i];
        reg->size = sizes[i];
        reg->file_offset = file_offsets[i];
        reg->chunks = (sizes[i] + chunk - 1) / chunk;
        reg->state = calloc(reg->chunks, 1);
        if (!reg->state) {
            lazy_free(l);
            return -ENOMEM;
        }
        l->total_chunks += reg->chunks;
    }
    l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->stop_fd < 0) {
        int err = errno;
        lazy_free(l);
        return -err;
    }
    int rc = pthread_create(&l->fault_thread, NULL, lazy_fault_thread, l);
    if (rc != 0) {
        lazy_free(l);
        return -rc;
    }
    *out = l;
    return 0;
}

// Loads the chunks that hold [offset, offset+length) of region r now, on the calling thread
// (before the vCPUs start: a working set). Returns the bytes this call loaded, or -errno.
EXPORT int64_t kvmshim_lazy_load(void *loader, int32_t r, uint64_t offset, uint64_t length)
{
    struct lazy_loader *l = loader;
    if (r < 0 || r >= l->nregions || offset >= l->regions[r].size || length > l->regions[r].size - offset)
        return -EINVAL;
    if (length == 0)
        return 0;
    uint8_t *buf = malloc(l->chunk);
    if (!buf)
        return -ENOMEM;
    int64_t total = 0;
    for (uint64_t c = offset / l->chunk; c <= (offset + length - 1) / l->chunk; c++) {
        int64_t n = lazy_load(l, r, c, buf, &l->bytes_first);
        if (n < 0) {
            lazy_fail(l, (int)-n);
            free(buf);
            return n;
        }
        total += n;
    }
    free(buf);
    return total;
}

// Starts the background loader: at most rate bytes per second (< 0: as fast as it can).
EXPORT int32_t kvmshim_lazy_background(void *loader, int64_t rate)
{
    struct lazy_loader *l = loader;
    if (l->background_started || rate == 0)
        return -EINVAL;
    l->rate = rate;
    int rc = pthread_create(&l->background_thread, NULL, lazy_background_thread, l);
    if (rc != 0)
        return -rc;
    l->background_started = 1;
    return 0;
}

// Counters: [0] touches that waited, [1] bytes loaded for a touch, [2] bytes loaded first,
// [3] bytes loaded in the background, [4] chunks loaded, [5] chunks in all, [6] ns from the start
// to the last chunk (0: not yet), [7] the errno that ended the loading (0: none).
EXPORT void kvmshim_lazy_stats(void *loader, int64_t *out)
{
    struct lazy_loader *l = loader;
    out[0] = __atomic_load_n(&l->faults, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&l->bytes_touch, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&l->bytes_first, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&l->bytes_background, __ATOMIC_RELAXED);
    out[4] = (int64_t)__atomic_load_n(&l->loaded_chunks, __ATOMIC_RELAXED);
    out[5] = (int64_t)l->total_chunks;
    int64_t finished = __atomic_load_n(&l->finished_ns, __ATOMIC_ACQUIRE);
    out[6] = finished ? finished - l->started_ns : 0;
    pthread_mutex_lock(&l->lock);
    out[7] = l->error;
    pthread_mutex_unlock(&l->lock);
}

// Waits until every chunk is in (1), the loading failed (2, see the stats' errno) or was stopped
// (3), or timeout_ms passed (0; < 0: no limit).
EXPORT int32_t kvmshim_lazy_wait(void *loader, int64_t timeout_ms)
{
    struct lazy_loader *l = loader;
    return wait_outcome(&l->lock, &l->changed, &l->done, &l->error, &l->stopping, timeout_ms);
}

// Tells every thread to stop and waiters to return (3); the loader stays valid for stats and
// waits until kvmshim_lazy_free. Joins the loader's threads and unregisters the ranges (a page not
// loaded then reads as zeros).
EXPORT void kvmshim_lazy_stop(void *loader)
{
    struct lazy_loader *l = loader;
    pthread_mutex_lock(&l->lock);
    __atomic_store_n(&l->stopping, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&l->changed);
    pthread_mutex_unlock(&l->lock);
    uint64_t one = 1;
    if (write(l->stop_fd, &one, sizeof one) < 0) {
        // An eventfd write fails only on overflow; the thread sees the counter all the same.
    }
    if (l->background_started)
        pthread_join(l->background_thread, NULL);
    l->background_started = 0;
    if (l->fault_thread) {
        pthread_join(l->fault_thread, NULL);
        l->fault_thread = 0;
    }
    lazy_unregister(l);
}

// Frees a stopped loader.
EXPORT void kvmshim_lazy_free(void *loader)
{
    lazy_free(loader);
}

// ---- userfaultfd write-protect: guest RAM saved as it was at an instant while the guest runs ----
//
// A checkpoint stops the VM only to write-protect its RAM (UFFDIO_WRITEPROTECT over every region,
// registered in write-protect mode beforehand); then the guest runs on while the pages, as they
// were at the stop, go to the checkpoint's memory file. Every write to a page not yet saved, by a
// vCPU (KVM's fault goes through the same mapping), by KVM itself, by a device model or by the
// kernel on the VMM's behalf (a preadv into RAM), faults on the protection and waits; the fault
// thread saves the chunk holding the page, then lifts the protection from that chunk, which wakes
// the writer. A background thread saves the other chunks in address order at a set rate and lifts
// their protection as it goes. So the file gets each page's content at the stop, whoever wrote it
// afterwards. Pages are read with pread from the RAM's own file (memfd, tmpfs or hugetlbfs): a
// page never touched reads as zeros without being allocated, where a read through the mapping
// would allocate it. Chunks all zeros are not written (holes).
//
// Native threads, as for the lazy loader: a thread of the VMM's own may block in a write fault,
// where the .NET runtime cannot stop it for a garbage collection. On an error the first errno is
// kept and the protection is lifted everywhere and the ranges unregistered, so no writer waits
// forever; the checkpoint is then incomplete and the caller discards it.

enum { COW_NOT_SAVED = 0, COW_SAVING = 1, COW_SAVED = 2 };

struct cow_region {
    uint64_t host, size, ram_offset, file_offset;
    uint8_t *state;             // per chunk: COW_*
    uint64_t chunks;
};

struct cow_writer {
    int uffd, ram_fd, file_fd, stop_fd;
    uint64_t chunk;
    int32_t nregions;
    struct cow_region *regions;
    uint64_t total_chunks, saved_chunks;
    int64_t faults, bytes_fault, bytes_background, bytes_written;
    int64_t protected_ns, finished_ns;
    int32_t error, stopping, released, done, protect_done;
    int64_t rate;
    pthread_t fault_thread, background_thread;
    int background_started;
    pthread_mutex_t lock;
    pthread_cond_t changed;
};

// UFFDIO_WRITEPROTECT: mode UFFDIO_WRITEPROTECT_MODE_WP protects [start, start+length); mode 0
// lifts the protection and wakes the threads waiting there (unless _MODE_DONTWAKE).
EXPORT int32_t kvmshim_uffd_writeprotect(int32_t fd, uint64_t start, uint64_t length, uint64_t mode)
{
#ifdef UFFDIO_WRITEPROTECT
    struct uffdio_writeprotect wp = { .range = { .start = start, .len = length }, .mode = mode };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
#else
    (void)fd; (void)start; (void)length; (void)mode;
    return -ENOTTY;
#endif
}

static void cow_release(struct cow_writer *w)
{
    if (__atomic_exchange_n(&w->released, 1, __ATOMIC_ACQ_REL))
        return;
    for (int32_t i = 0; i < w->nregions; i++) {
        kvmshim_uffd_writeprotect(w->uffd, w->regions[i].host, w->regions[i].size, 0);
        struct uffdio_range r = { .start = w->regions[i].host, .len = w->regions[i].size };
        ioctl(w->uffd, UFFDIO_UNREGISTER, &r);
    }
}

static void cow_fail(struct cow_writer *w, int err)
{
    pthread_mutex_lock(&w->lock);
    if (!w->error)
        w->error = err;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    cow_release(w);
}

static void cow_finish(struct cow_writer *w)
{
    __atomic_store_n(&w->finished_ns, lazy_now_ns(), __ATOMIC_RELEASE);
    cow_release(w);
    pthread_mutex_lock(&w->lock);
    w->done = 1;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
}

static int cow_pwrite_all(int fd, const uint8_t *buf, uint64_t len, uint64_t offset)
{
    uint64_t put = 0;
    while (put < len) {
        ssize_t n = pwrite(fd, buf + put, len - put, (off_t)(offset + put));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;
        put += (uint64_t)n;
    }
    return 0;
}

// Saves chunk c of region r unless someone else saves or saved it: reads it from the RAM's file,
// writes its pages that are not all zeros to the checkpoint's file, lifts the protection (waking
// whoever waits to write there). Returns the bytes this call saved (0: not this call's), or -errno.
static int64_t cow_save(struct cow_writer *w, int32_t r, uint64_t c, uint8_t *buf, int64_t *counter)
{
    struct cow_region *reg = &w->regions[r];
    uint8_t expected = COW_NOT_SAVED;
    if (!__atomic_compare_exchange_n(&reg->state[c], &expected, COW_SAVING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    uint64_t offset = c * w->chunk;
    uint64_t len = reg->size - offset < w->chunk ? reg->size - offset : w->chunk;
    int rc = pread_all(w->ram_fd, buf, len, reg->ram_offset + offset);
    if (rc < 0)
        return rc;
    for (uint64_t page = 0; page < len; ) {
        uint64_t run = page;
        while (run < len && !lazy_all_zero(buf + run, 4096))
            run += 4096;
        if (run > page) {
            rc = cow_pwrite_all(w->file_fd, buf + page, run - page, reg->file_offset + offset + page);
            if (rc < 0)
                return rc;
            __atomic_add_fetch(&w->bytes_written, (int64_t)(run - page), __ATOMIC_RELAXED);
            page = run;
        } else
            page += 4096;
    }
    __atomic_add_fetch(counter, (int64_t)len, __ATOMIC_RELAXED);
    rc = kvmshim_uffd_writeprotect(w->uffd, reg->host + offset, len, 0);
    if (rc < 0 && !__atomic_load_n(&w->released, __ATOMIC_ACQUIRE))
        return rc;          // (once released, the ranges are unregistered and nothing is protected)
    __atomic_store_n(&reg->state[c], COW_SAVED, __ATOMIC_RELEASE);
    if (__atomic_add_fetch(&w->saved_chunks, 1, __ATOMIC_ACQ_REL) == w->total_chunks)
        cow_finish(w);
    return (int64_t)len;
}

static int cow_locate(struct cow_writer *w, uint64_t host, int32_t *r, uint64_t *c)
{
    for (int32_t i = 0; i < w->nregions; i++)
        if (host >= w->regions[i].host && host - w->regions[i].host < w->regions[i].size) {
            *r = i;
            *c = (host - w->regions[i].host) / w->chunk;
            return 1;
        }
    return 0;
}

static void *cow_fault_thread(void *arg)
{
    struct cow_writer *w = arg;
    block_signals();
    uint8_t *buf = malloc(w->chunk);
    if (!buf) {
        cow_fail(w, ENOMEM);
        return NULL;
    }
    struct uffd_msg msgs[64];
    while (!__atomic_load_n(&w->stopping, __ATOMIC_ACQUIRE)) {
        struct pollfd p[2] = { { .fd = w->uffd, .events = POLLIN }, { .fd = w->stop_fd, .events = POLLIN } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            cow_fail(w, errno);
            break;
        }
        if (p[1].revents & POLLIN)
            break;
        ssize_t n = read(w->uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            cow_fail(w, errno);
            break;
        }
        int failed = 0;
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            __atomic_add_fetch(&w->faults, 1, __ATOMIC_RELAXED);
            uint64_t page = msgs[i].arg.pagefault.address & ~(uint64_t)4095;
            int32_t r;
            uint64_t c;
            if (!failed && cow_locate(w, page, &r, &c)) {
                int64_t saved = cow_save(w, r, c, buf, &w->bytes_fault);
                if (saved < 0) {
                    cow_fail(w, (int)-saved);
                    failed = 1;
                } else if (saved > 0)
                    continue;       // lifting the protection woke the writer
                else
                    // Another thread saves it; lifting its protection wakes the writer. Once saved, wake anyway.
                    while (__atomic_load_n(&w->regions[r].state[c], __ATOMIC_ACQUIRE) != COW_SAVED
                           && !__atomic_load_n(&w->stopping, __ATOMIC_ACQUIRE) && !__atomic_load_n(&w->released, __ATOMIC_ACQUIRE))
                        sched_yield();
            }
            struct uffdio_range wake = { .start = page, .len = 4096 };
            ioctl(w->uffd, UFFDIO_WAKE, &wake);
        }
        if (failed)
            break;
    }
    free(buf);
    return NULL;
}

static void *cow_background_thread(void *arg)
{
    struct cow_writer *w = arg;
    block_signals();
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10);   // behind the guest and the fault thread
    uint8_t *buf = malloc(w->chunk);
    if (!buf) {
        cow_fail(w, ENOMEM);
        return NULL;
    }
    int64_t started = lazy_now_ns(), saved = 0;
    for (int32_t r = 0; r < w->nregions; r++)
        for (uint64_t c = 0; c < w->regions[r].chunks; c++) {
            if (__atomic_load_n(&w->stopping, __ATOMIC_ACQUIRE) || __atomic_load_n(&w->released, __ATOMIC_ACQUIRE))
                goto out;
            int64_t n = cow_save(w, r, c, buf, &w->bytes_background);
            if (n < 0) {
                cow_fail(w, (int)-n);
                goto out;
            }
            saved += n;
            if (n > 0)
                pace(started, saved, w->rate);
        }
out:
    free(buf);
    return NULL;
}

static void cow_free(struct cow_writer *w)
{
    if (w->regions)
        for (int32_t i = 0; i < w->nregions; i++)
            free(w->regions[i].state);
    free(w->regions);
    if (w->stop_fd >= 0)
        close(w->stop_fd);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->changed);
    free(w);
}

// Prepares a checkpoint writer: uffd has [hosts[i], hosts[i]+sizes[i]) registered in write-protect
// mode; region i's RAM is at ram_offsets[i] in ram_fd and goes to file_offsets[i] in file_fd;
// chunk: the bytes saved at a time (a multiple of 4096, of the huge page size on hugetlbfs). The
// fault thread starts at once; nothing is protected until kvmshim_cow_protect. The descriptors
// stay the caller's, open until kvmshim_cow_stop.
EXPORT int32_t kvmshim_cow_start(int32_t uffd, int32_t ram_fd, int32_t file_fd, uint64_t chunk, const uint64_t *hosts,
                                 const uint64_t *sizes, const uint64_t *ram_offsets, const uint64_t *file_offsets,
                                 int32_t nregions, void **out)
{
    if (nregions <= 0 || chunk == 0 || chunk % 4096 != 0)
        return -EINVAL;
    for (int32_t i = 0; i < nregions; i++)
        if (sizes[i] == 0 || sizes[i] % 4096 != 0 || hosts[i] % 4096 != 0)
            return -EINVAL;
    struct cow_writer *w = calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->changed, NULL);
    w->uffd = uffd;
    w->ram_fd = ram_fd;
    w->file_fd = file_fd;
    w->chunk = chunk;
    w->stop_fd = -1;
    w->nregions = nregions;
    w->regions = calloc((size_t)nregions, sizeof *w->regions);
    if (!w->regions) {
        cow_free(w);
        return -ENOMEM;
    }
    for (int32_t i = 0; i < nregions; i++) {
        struct cow_region *reg = &w->regions[i];
        reg->host = hosts[i];
        reg->size = sizes[i];
        reg->ram_offset = ram_offsets[i];
        reg->file_offset = file_offsets[i];
        reg->chunks = (sizes[i] + chunk - 1) / chunk;
        reg->state = calloc(reg->chunks, 1);
        if (!reg->state) {
            cow_free(w);
            return -ENOMEM;
        }
        w->total_chunks += reg->chunks;
    }
    w->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->stop_fd < 0) {
        int err = errno;
        cow_free(w);
        return -err;
    }
    int rc = pthread_create(&w->fault_thread, NULL, cow_fault_thread, w);
    if (rc != 0) {
        cow_free(w);
        return -rc;
    }
    *out = w;
    return 0;
}

// Write-protects every region: from here on the file gets RAM as it is now. Called with the
// guest stopped. On a failure the protection is lifted again everywhere; returns -errno.
EXPORT int32_t kvmshim_cow_protect(void *writer)
{
    struct cow_writer *w = writer;
    if (w->protect_done)
        return -EALREADY;
    for (int32_t i = 0; i < w->nregions; i++) {
        int rc = kvmshim_uffd_writeprotect(w->uffd, w->regions[i].host, w->regions[i].size, UFFDIO_WRITEPROTECT_MODE_WP);
        if (rc < 0) {
            cow_fail(w, -rc);
            return rc;
        }
    }
    w->protect_done = 1;
    w->protected_ns = lazy_now_ns();
    return 0;
}

// Starts the background writer: at most rate bytes per second (< 0: as fast as it can).
EXPORT int32_t kvmshim_cow_background(void *writer, int64_t rate)
{
    struct cow_writer *w = writer;
    if (w->background_started || rate == 0 || !w->protect_done)
        return -EINVAL;
    w->rate = rate;
    int rc = pthread_create(&w->background_thread, NULL, cow_background_thread, w);
    if (rc != 0)
        return -rc;
    w->background_started = 1;
    return 0;
}

// Counters: [0] writes that waited for their page, [1] bytes saved for a write, [2] bytes saved in
// the background, [3] bytes written to the file (not all zeros), [4] chunks saved, [5] chunks in
// all, [6] ns from the protection to the last chunk (0: not yet), [7] the errno that ended it (0: none).
EXPORT void kvmshim_cow_stats(void *writer, int64_t *out)
{
    struct cow_writer *w = writer;
    out[0] = __atomic_load_n(&w->faults, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&w->bytes_fault, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&w->bytes_background, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&w->bytes_written, __ATOMIC_RELAXED);
    out[4] = (int64_t)__atomic_load_n(&w->saved_chunks, __ATOMIC_RELAXED);
    out[5] = (int64_t)w->total_chunks;
    int64_t finished = __atomic_load_n(&w->finished_ns, __ATOMIC_ACQUIRE);
    out[6] = finished && w->protected_ns ? finished - w->protected_ns : 0;
    pthread_mutex_lock(&w->lock);
    out[7] = w->error;
    pthread_mutex_unlock(&w->lock);
}

// Waits until every chunk is saved (1), the writing failed (2) or was stopped (3), or timeout_ms
// passed (0; < 0: no limit).
EXPORT int32_t kvmshim_cow_wait(void *writer, int64_t timeout_ms)
{
    struct cow_writer *w = writer;
    return wait_outcome(&w->lock, &w->changed, &w->done, &w->error, &w->stopping, timeout_ms);
}

// Stops the threads, lifts the protection everywhere and unregisters the ranges (a checkpoint not
// finished is then incomplete); the writer stays valid for stats until kvmshim_cow_free.
EXPORT void kvmshim_cow_stop(void *writer)
{
    struct cow_writer *w = writer;
    pthread_mutex_lock(&w->lock);
    __atomic_store_n(&w->stopping, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    // Lift the protection first: a writer blocked in a fault must not wait for the joins.
    cow_release(w);
    uint64_t one = 1;
    if (write(w->stop_fd, &one, sizeof one) < 0) {
        // An eventfd write fails only on overflow; the thread sees the counter all the same.
    }
    if (w->background_started)
        pthread_join(w->background_thread, NULL);
    w->background_started = 0;
    if (w->fault_thread) {
        pthread_join(w->fault_thread, NULL);
        w->fault_thread = 0;
    }
}

EXPORT void kvmshim_cow_free(void *writer)
{
    cow_free(writer);
}

// ---- tap devices and host interfaces (Kvm.Network) ----

// Clears *ifr and names the interface in it; -ENAMETOOLONG when the name does not fit.
static int32_t ifreq_named(struct ifreq *ifr, const char *name)
{
    memset(ifr, 0, sizeof *ifr);
    if (strlen(name) >= IFNAMSIZ)
        return -ENAMETOOLONG;
    strcpy(ifr->ifr_name, name);
    return 0;
}

// Opens /dev/net/tun (non-blocking, close-on-exec) and attaches it to the tap device `name`
// (created if it does not exist; an empty name lets the kernel choose), with a 12-byte virtio-net
// header on every frame read and written (IFF_VNET_HDR, TUNSETVNETHDRSZ) and, with multi_queue,
// as one queue of a multi-queue tap (IFF_MULTI_QUEUE). The device's name goes to out_name
// (IFNAMSIZ bytes). Returns the fd.
EXPORT int32_t kvmshim_tap_open(const char *name, int32_t multi_queue, char *out_name)
{
    struct ifreq ifr;
    if (ifreq_named(&ifr, name) < 0)
        return -ENAMETOOLONG;
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multi_queue ? IFF_MULTI_QUEUE : 0);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    int hdr = 12;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    memcpy(out_name, ifr.ifr_name, IFNAMSIZ);
    out_name[IFNAMSIZ - 1] = 0;
    return fd;
}

// TUNSETOFFLOAD: which offloads (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN) frames read
// from the tap may carry; the kernel finishes the rest before handing a frame over.
EXPORT int32_t kvmshim_tap_set_offload(int32_t fd, uint32_t flags)
{
    return result(ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags));
}

// TUNSETQUEUE: attaches (1) or detaches (0) this queue of a multi-queue tap.
EXPORT int32_t kvmshim_tap_set_queue(int32_t fd, int32_t attach)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = attach ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE;
    return result(ioctl(fd, TUNSETQUEUE, &ifr));
}

// Runs one interface ioctl on a throw-away AF_INET datagram socket.
static int32_t if_ioctl(unsigned long request, struct ifreq *ifr)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    int rc = ioctl(s, request, ifr);
    int e = errno;
    close(s);
    return rc < 0 ? -e : rc;
}

// The interface's index (SIOCGIFINDEX).
EXPORT int32_t kvmshim_if_index(const char *name)
{
    struct ifreq ifr;
    if (ifreq_named(&ifr, name) < 0)
        return -ENAMETOOLONG;
    int32_t rc = if_ioctl(SIOCGIFINDEX, &ifr);
    return rc < 0 ? rc : ifr.ifr_ifindex;
}

// The interface's flags (SIOCGIFFLAGS): IFF_UP, IFF_RUNNING (carrier), ...
EXPORT int32_t kvmshim_if_flags(const char *name)
{
    struct ifreq ifr;
    if (ifreq_named(&ifr, name) < 0)
        return -ENAMETOOLONG;
    int32_t rc = if_ioctl(SIOCGIFFLAGS, &ifr);
    return rc < 0 ? rc : (ifr.ifr_flags & 0xffff);
}

// Sets the interface administratively up or down (SIOCSIFFLAGS).
EXPORT int32_t kvmshim_if_set_up(const char *name, int32_t up)
{
    struct ifreq ifr;
    if (ifreq_named(&ifr, name) < 0)
        return -ENAMETOOLONG;
    int32_t rc = if_ioctl(SIOCGIFFLAGS, &ifr);
    if (rc < 0)
        return rc;
    if (up)
        ifr.ifr_flags |= IFF_UP;
    else
        ifr.ifr_flags &= ~IFF_UP;
    return if_ioctl(SIOCSIFFLAGS, &ifr);
}

// Enslaves interface `name` to the bridge `bridge` (SIOCBRADDIF).
EXPORT int32_t kvmshim_bridge_add(const char *bridge, const char *name)
{
    int32_t index = kvmshim_if_index(name);
    if (index < 0)
        return index;
    struct ifreq ifr;
    if (ifreq_named(&ifr, bridge) < 0)
        return -ENAMETOOLONG;
    ifr.ifr_ifindex = index;
    return if_ioctl(SIOCBRADDIF, &ifr);
}

// A packet socket (AF_PACKET, raw, non-blocking, close-on-exec) on interface `ifindex` that gets a
// copy of every ARP frame addressed to `mac` crossing it, in either direction: on a tap, the frames
// the kernel hands to the tap's reader (the VMM) count as outgoing, and only ETH_P_ALL sees those.
// A classic BPF filter keeps everything else out before it is queued; it is attached before the
// bind, so nothing unfiltered arrives first. Needs CAP_NET_RAW. Returns the fd.
EXPORT int32_t kvmshim_arp_socket(int32_t ifindex, const uint8_t *mac)
{
    uint32_t mac_high = (uint32_t)mac[0] << 24 | (uint32_t)mac[1] << 16 | (uint32_t)mac[2] << 8 | mac[3];
    uint32_t mac_low = (uint32_t)mac[4] << 8 | mac[5];
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 12),                 // EtherType
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_ARP, 0, 5),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),                  // destination, first 4 bytes
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, mac_high, 0, 3),
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 4),                  // destination, last 2 bytes
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, mac_low, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0xffff),
        BPF_STMT(BPF_RET | BPF_K, 0),
    };
    struct sock_fprog prog = { .len = sizeof code / sizeof code[0], .filter = code };
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_ll addr = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = ifindex };
    // The interface is told to accept the probe's MAC too: a NIC (a host interface uplink)
    // filters unicast frames to addresses it was not given.
    struct packet_mreq unicast = { .mr_ifindex = ifindex, .mr_type = PACKET_MR_UNICAST, .mr_alen = 6 };
    memcpy(unicast.mr_address, mac, 6);
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &unicast, sizeof unicast) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

// A packet socket that makes host interface ifindex a VM's uplink: non-blocking, close-on-exec,
// with a 10-byte virtio-net header before every frame both ways (PACKET_VNET_HDR: the guest's
// checksum and segmentation offloads go out as they are, and received frames say theirs). A
// classic BPF filter keeps only what the VM may get: frames the kernel did not send itself
// (PACKET_OUTGOING: the VM's own frames and the host's) addressed to mac, or to a group address.
// The interface is told to accept mac (PACKET_MR_UNICAST: its unicast filter, no promiscuous
// mode) and all multicast. With *fanout >= 0 the socket joins a fanout group that spreads flows
// over the VM's queue pairs by hash: *fanout 0 asks the kernel for a new group and returns its id
// there (+1, so that 0 stays "new"); a later socket passes that value to join. *fanout < 0: none.
// Needs CAP_NET_RAW. Returns the fd, or -errno.
EXPORT int32_t kvmshim_packet_socket(int32_t ifindex, const uint8_t *mac, int32_t *fanout)
{
    uint32_t mac_high = (uint32_t)mac[0] << 24 | (uint32_t)mac[1] << 16 | (uint32_t)mac[2] << 8 | mac[3];
    uint32_t mac_low = (uint32_t)mac[4] << 8 | mac[5];
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE),   // how the frame came
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, 6, 0),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),                  // destination, first byte
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 1, 5, 0),          // a group address
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),                  // destination, first 4 bytes
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, mac_high, 0, 2),
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 4),                  // destination, last 2 bytes
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, mac_low, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, 0),                           // outgoing, or not for the VM
        BPF_STMT(BPF_RET | BPF_K, 0x40000),                     // all of it (a GSO frame too)
    };
    struct sock_fprog prog = { .len = sizeof code / sizeof code[0], .filter = code };
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1, rcvbuf = 4 << 20;
    struct sockaddr_ll addr = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = ifindex };
    struct packet_mreq unicast = { .mr_ifindex = ifindex, .mr_type = PACKET_MR_UNICAST, .mr_alen = 6 };
    struct packet_mreq allmulti = { .mr_ifindex = ifindex, .mr_type = PACKET_MR_ALLMULTI };
    memcpy(unicast.mr_address, mac, 6);
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &unicast, sizeof unicast) < 0 ||
        setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &allmulti, sizeof allmulti) < 0)
        goto fail;
    if (*fanout >= 0) {
        int arg = *fanout == 0 ? (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_UNIQUEID) << 16
                               : (*fanout - 1) | PACKET_FANOUT_HASH << 16;
        if (setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof arg) < 0)
            goto fail;
        if (*fanout == 0) {
            socklen_t len = sizeof arg;
            if (getsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg, &len) < 0)
                goto fail;
            *fanout = (arg & 0xffff) + 1;
        }
    }
    return fd;
fail:;
    int e = errno;
    close(fd);
    return -e;
}

// Receives one datagram into buf; returns its whole length even when that is more than len
// (MSG_TRUNC: the caller sees the datagram was cut), or -errno.
EXPORT int64_t kvmshim_recv_whole(int32_t fd, void *buf, uint64_t len)
{
    ssize_t n = recv(fd, buf, len, MSG_TRUNC);
    return n < 0 ? -errno : n;
}

// Writes a and then b as one datagram or record (writev): a frame whose header and body lie apart.
// Returns the bytes written, or -errno.
EXPORT int64_t kvmshim_write2(int32_t fd, const void *a, uint64_t alen, const void *b, uint64_t blen)
{
    struct iovec v[2] = { { (void *)a, alen }, { (void *)b, blen } };
    ssize_t n = writev(fd, v, 2);
    return n < 0 ? -errno : n;
}

// poll(2) on up to two fds for reading (fd2 < 0: only fd1). Returns a bit mask: 1 when fd1 is
// readable (or in error), 2 when fd2 is; 0 on timeout. timeout_ms < 0 waits without end.
EXPORT int32_t kvmshim_poll2(int32_t fd1, int32_t fd2, int32_t timeout_ms)
{
    struct pollfd p[2] = { { .fd = fd1, .events = POLLIN }, { .fd = fd2, .events = POLLIN } };
    int rc;
    do
        rc = poll(p, fd2 < 0 ? 1 : 2, timeout_ms);
    while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
    return (p[0].revents ? 1 : 0) | (fd2 >= 0 && p[1].revents ? 2 : 0);
}

// An epoll instance (close-on-exec) that is readable while any fd added to it is: one fd that
// stands for several (a NIC team's uplinks, for a receive queue's worker).
EXPORT int32_t kvmshim_epoll_create(void)
{
    return result(epoll_create1(EPOLL_CLOEXEC));
}

// Adds fd to the epoll instance for reading (level-triggered).
EXPORT int32_t kvmshim_epoll_add(int32_t epfd, int32_t fd)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
    return result(epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev));
}

// Removes fd from the epoll instance.
EXPORT int32_t kvmshim_epoll_remove(int32_t epfd, int32_t fd)
{
    return result(epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL));
}

// A netlink route socket (non-blocking, close-on-exec) in the link group (RTMGRP_LINK): it turns
// readable whenever an interface of the host goes up or down, gains or loses its carrier, appears
// or goes away. The messages only wake the reader (a NIC team's monitor), which then reads the
// state of the links it watches itself.
EXPORT int32_t kvmshim_link_events_open(void)
{
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_ROUTE);
    if (fd < 0)
        return -errno;
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK, .nl_groups = RTMGRP_LINK };
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
    {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

// Reads what waits on a link-event socket (at most 64 datagrams a call, so a flood of changes
// cannot hold the caller). Returns how many link messages (RTM_NEWLINK, RTM_DELLINK) it read, plus
// one when the socket overflowed (ENOBUFS: some changes were lost, the caller must read its links
// again anyway), or -errno.
EXPORT int32_t kvmshim_link_events_drain(int32_t fd)
{
    static_assert(NLMSG_ALIGNTO == 4, "netlink messages are 4-byte aligned");
    uint32_t words[2048];
    int32_t count = 0;
    for (int i = 0; i < 64; i++)
    {
        ssize_t n = recv(fd, words, sizeof words, MSG_DONTWAIT);
        if (n < 0)
        {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return count;
            if (errno == ENOBUFS)
            {
                count++;
                continue;
            }
            return -errno;
        }
        int len = (int)n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)words; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len))
            if (h->nlmsg_type == RTM_NEWLINK || h->nlmsg_type == RTM_DELLINK)
                count++;
    }
    return count;
}
