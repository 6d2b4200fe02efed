/*
 * guestkit: virtio 1.x modern PCI transport (virtio 1.2, 4.1) and split
 * virtqueues (2.7), as a driver.  All accesses to the common configuration
 * have the width of the field; 64-bit fields are written as two 32-bit
 * halves, low first (4.1.3.1).
 */
#include "virtio.h"

/* virtio_pci_cap.cfg_type */
#define VIRTIO_PCI_CAP_COMMON_CFG       1
#define VIRTIO_PCI_CAP_NOTIFY_CFG       2
#define VIRTIO_PCI_CAP_ISR_CFG          3
#define VIRTIO_PCI_CAP_DEVICE_CFG       4

/* struct virtio_pci_common_cfg */
#define COMMON_DEVICE_FEATURE_SELECT    0x00
#define COMMON_DEVICE_FEATURE           0x04
#define COMMON_DRIVER_FEATURE_SELECT    0x08
#define COMMON_DRIVER_FEATURE           0x0c
#define COMMON_CONFIG_MSIX_VECTOR       0x10
#define COMMON_NUM_QUEUES               0x12
#define COMMON_DEVICE_STATUS            0x14
#define COMMON_CONFIG_GENERATION        0x15
#define COMMON_QUEUE_SELECT             0x16
#define COMMON_QUEUE_SIZE               0x18
#define COMMON_QUEUE_MSIX_VECTOR        0x1a
#define COMMON_QUEUE_ENABLE             0x1c
#define COMMON_QUEUE_NOTIFY_OFF         0x1e
#define COMMON_QUEUE_DESC               0x20
#define COMMON_QUEUE_DRIVER             0x28
#define COMMON_QUEUE_DEVICE             0x30
#define COMMON_CFG_MIN_LEN              0x38

/* MSI-X capability and table */
#define MSIX_CTRL                       2
#define MSIX_TABLE                      4
#define MSIX_CTRL_ENABLE                0x8000
#define MSIX_CTRL_MASKALL               0x4000
#define MSIX_ENTRY_SIZE                 16
#define MSIX_ENTRY_VECTOR_CTRL          12
#define MSI_ADDRESS_BASE                0xfee00000u

static void pci_tag(const struct pci_dev *d)
{
    gk_printf("PCI %02x:%02x.%x", d->bus, d->dev, d->fn);
}

static bool probe_fail(const struct pci_dev *d, const char *what)
{
    gk_printf("guestkit: error: virtio ");
    pci_tag(d);
    gk_printf(": %s\n", what);
    return false;
}

/* Address of [offset, offset+length) in a memory BAR; 0 if it does not fit. */
static uintptr_t bar_range(const struct pci_dev *d, uint8_t bar, uint32_t offset, uint32_t length)
{
    if (bar >= d->nbars)
        return 0;
    const struct pci_bar *b = &d->bar[bar];
    if (b->io || !b->addr || (uint64_t)offset + length > b->size)
        return 0;
    if (b->addr + b->size > FOUR_GIB)
        return 0;
    return (uintptr_t)(b->addr + offset);
}

bool virtio_probe(struct virtio_dev *vd, struct pci_dev *pci)
{
    memset(vd, 0, sizeof(*vd));
    vd->pci = pci;
    if (!pci_enable_memory(pci))
        return false;

    bool have[5] = { false };
    for (uint8_t pos = pci_find_cap(pci, PCI_CAP_ID_VNDR, 0); pos;
         pos = pci_find_cap(pci, PCI_CAP_ID_VNDR, pos)) {
        uint8_t cap_len = pci_read8(pci, (uint16_t)(pos + 2));
        uint8_t type = pci_read8(pci, (uint16_t)(pos + 3));
        uint8_t bar = pci_read8(pci, (uint16_t)(pos + 4));
        uint32_t offset = pci_read32(pci, (uint16_t)(pos + 8));
        uint32_t length = pci_read32(pci, (uint16_t)(pos + 12));
        if (type < VIRTIO_PCI_CAP_COMMON_CFG || type > VIRTIO_PCI_CAP_DEVICE_CFG || have[type])
            continue;           /* other types, or not the first of its type (4.1.4.1) */
        if (cap_len < 16)
            continue;
        uintptr_t addr = bar_range(pci, bar, offset, length);
        if (!addr)
            continue;           /* unusable location: "MUST ignore" */
        switch (type) {
        case VIRTIO_PCI_CAP_COMMON_CFG:
            if (length < COMMON_CFG_MIN_LEN)
                continue;
            vd->common = addr;
            break;
        case VIRTIO_PCI_CAP_NOTIFY_CFG:
            if (cap_len < 20)
                continue;
            vd->notify_base = addr;
            vd->notify_mult = pci_read32(pci, (uint16_t)(pos + 16));
            vd->notify_len = length;
            break;
        case VIRTIO_PCI_CAP_ISR_CFG:
            vd->isr = addr;
            break;
        case VIRTIO_PCI_CAP_DEVICE_CFG:
            vd->devcfg = addr;
            vd->devcfg_len = length;
            break;
        }
        have[type] = true;
    }
    if (!vd->common)
        return probe_fail(pci, "no usable common configuration capability");
    if (!vd->notify_base)
        return probe_fail(pci, "no usable notification capability");
    if (!vd->devcfg)
        return probe_fail(pci, "no usable device configuration capability");

    vd->msix_cap = pci_find_cap(pci, PCI_CAP_ID_MSIX, 0);
    if (vd->msix_cap) {
        uint16_t ctrl = pci_read16(pci, (uint16_t)(vd->msix_cap + MSIX_CTRL));
        uint32_t table = pci_read32(pci, (uint16_t)(vd->msix_cap + MSIX_TABLE));
        vd->msix_entries = (uint16_t)((ctrl & 0x7ff) + 1);
        vd->msix_table = bar_range(pci, (uint8_t)(table & 7), table & ~7u,
                                   (uint32_t)vd->msix_entries * MSIX_ENTRY_SIZE);
        if (!vd->msix_table)
            vd->msix_cap = 0;
    }
    return true;
}

uint8_t virtio_status(const struct virtio_dev *vd)
{
    return mmio_read8(vd->common + COMMON_DEVICE_STATUS);
}

void virtio_set_status(struct virtio_dev *vd, uint8_t status)
{
    mmio_write8(vd->common + COMMON_DEVICE_STATUS, (uint8_t)(virtio_status(vd) | status));
}

bool virtio_reset(struct virtio_dev *vd)
{
    mmio_write8(vd->common + COMMON_DEVICE_STATUS, 0);
    uint64_t deadline = deadline_after_s(gk_timeout_s);
    while (virtio_status(vd) != 0) {
        if (deadline_passed(deadline)) {
            gk_printf("guestkit: error: virtio ");
            pci_tag(vd->pci);
            gk_printf(": device_status still 0x%x %lu s after writing 0 (reset)\n",
                      virtio_status(vd), gk_timeout_s);
            return false;
        }
        cpu_relax();
    }
    return true;
}

static uint64_t read_features(const struct virtio_dev *vd)
{
    mmio_write32(vd->common + COMMON_DEVICE_FEATURE_SELECT, 0);
    uint64_t lo = mmio_read32(vd->common + COMMON_DEVICE_FEATURE);
    mmio_write32(vd->common + COMMON_DEVICE_FEATURE_SELECT, 1);
    uint64_t hi = mmio_read32(vd->common + COMMON_DEVICE_FEATURE);
    return lo | hi << 32;
}

bool virtio_negotiate(struct virtio_dev *vd, uint64_t wanted)
{
    virtio_set_status(vd, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_set_status(vd, VIRTIO_STATUS_DRIVER);
    vd->device_features = read_features(vd);
    if (!(vd->device_features & (1ull << VIRTIO_F_VERSION_1))) {
        virtio_set_status(vd, VIRTIO_STATUS_FAILED);
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": device does not offer VIRTIO_F_VERSION_1 (features 0x%lx)\n",
                  vd->device_features);
        return false;
    }
    vd->features = vd->device_features & (wanted | (1ull << VIRTIO_F_VERSION_1));
    mmio_write32(vd->common + COMMON_DRIVER_FEATURE_SELECT, 0);
    mmio_write32(vd->common + COMMON_DRIVER_FEATURE, (uint32_t)vd->features);
    mmio_write32(vd->common + COMMON_DRIVER_FEATURE_SELECT, 1);
    mmio_write32(vd->common + COMMON_DRIVER_FEATURE, (uint32_t)(vd->features >> 32));
    virtio_set_status(vd, VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_status(vd) & VIRTIO_STATUS_FEATURES_OK)) {
        virtio_set_status(vd, VIRTIO_STATUS_FAILED);
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": FEATURES_OK did not stick (features 0x%lx)\n", vd->features);
        return false;
    }
    return true;
}

bool virtio_msix_enable(struct virtio_dev *vd, uint16_t n)
{
    if (!vd->msix_cap || n > vd->msix_entries || n > IRQ_VECTORS) {
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": %u MSI-X vectors needed, the device has %u\n", n,
                  vd->msix_cap ? vd->msix_entries : 0);
        return false;
    }
    uint32_t addr = MSI_ADDRESS_BASE | (uint32_t)lapic_id() << 12;
    for (uint16_t i = 0; i < vd->msix_entries; i++) {
        uintptr_t e = vd->msix_table + (uintptr_t)i * MSIX_ENTRY_SIZE;
        if (i < n) {
            mmio_write32(e + 0, addr);
            mmio_write32(e + 4, 0);
            mmio_write32(e + 8, IRQ_VECTOR_BASE + i);
            mmio_write32(e + MSIX_ENTRY_VECTOR_CTRL, 0);
        } else {
            mmio_write32(e + MSIX_ENTRY_VECTOR_CTRL, 1);    /* masked */
        }
    }
    uint16_t off = (uint16_t)(vd->msix_cap + MSIX_CTRL);
    uint16_t ctrl = pci_read16(vd->pci, off);
    pci_write16(vd->pci, off, (uint16_t)((ctrl & ~MSIX_CTRL_MASKALL) | MSIX_CTRL_ENABLE));
    mmio_write16(vd->common + COMMON_CONFIG_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    return true;
}

bool virtio_intx_enable(struct virtio_dev *vd)
{
    if (!vd->isr) {
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": INTx needs the ISR status capability, the device has no usable one\n");
        return false;
    }
    if (vd->msix_cap) {
        uint16_t off = (uint16_t)(vd->msix_cap + MSIX_CTRL);
        uint16_t ctrl = pci_read16(vd->pci, off);
        if (ctrl & MSIX_CTRL_ENABLE)
            pci_write16(vd->pci, off, (uint16_t)(ctrl & ~MSIX_CTRL_ENABLE));
    }
    mmio_write16(vd->common + COMMON_CONFIG_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    uint16_t cmd = pci_read16(vd->pci, PCI_COMMAND);
    pci_write16(vd->pci, PCI_COMMAND, (uint16_t)(cmd & ~PCI_COMMAND_INTX_DISABLE));
    return true;
}

bool virtio_queue_setup(struct virtio_dev *vd, struct virtq *vq, uint16_t index,
                        uint16_t max_size, uint16_t msix_entry, int irq_slot)
{
    uintptr_t c = vd->common;

    mmio_write16(c + COMMON_QUEUE_SELECT, index);
    uint16_t dev_size = mmio_read16(c + COMMON_QUEUE_SIZE);
    if (dev_size == 0) {
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": queue %u does not exist (queue_size 0)\n", index);
        return false;
    }
    uint16_t size = dev_size < max_size ? dev_size : max_size;
    if (size > VIRTQ_MAX_SIZE)
        size = VIRTQ_MAX_SIZE;
    while (size & (size - 1))           /* split queue sizes are powers of 2 */
        size &= (uint16_t)(size - 1);

    if (!vq->desc || size > vq->alloc_size) {
        vq->desc = dma_alloc((uint64_t)size * sizeof(struct virtq_desc));
        vq->avail = dma_alloc(6 + 2ull * size);
        vq->used = dma_alloc(6 + 8ull * size);
        vq->alloc_size = size;
    } else {
        memset(vq->desc, 0, (uint64_t)vq->alloc_size * sizeof(struct virtq_desc));
        memset(vq->avail, 0, 6 + 2ull * vq->alloc_size);
        memset(vq->used, 0, 6 + 8ull * vq->alloc_size);
    }
    vq->index = index;
    vq->size = size;
    vq->used_event = &vq->avail->ring[size];
    vq->avail_event = (volatile uint16_t *)&vq->used->ring[size];
    vq->event_idx = vd->features & (1ull << VIRTIO_F_EVENT_IDX);
    vq->avail_idx = vq->kicked_idx = vq->last_used = 0;
    vq->msix_entry = msix_entry;
    vq->irq_slot = irq_slot < 0 ? 0 : (uint16_t)irq_slot;
    vq->irq_seen = irq_slot < 0 ? 0 : gk_irq_count[vq->irq_slot];
    vq->kicks = 0;
    /* polled queues ask for no interrupts (without event idx; with it, used_event is never reached) */
    if (irq_slot < 0 && !vq->event_idx)
        vq->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

    mmio_write16(c + COMMON_QUEUE_SIZE, size);
    mmio_write32(c + COMMON_QUEUE_DESC, (uint32_t)(uintptr_t)vq->desc);
    mmio_write32(c + COMMON_QUEUE_DESC + 4, 0);
    mmio_write32(c + COMMON_QUEUE_DRIVER, (uint32_t)(uintptr_t)vq->avail);
    mmio_write32(c + COMMON_QUEUE_DRIVER + 4, 0);
    mmio_write32(c + COMMON_QUEUE_DEVICE, (uint32_t)(uintptr_t)vq->used);
    mmio_write32(c + COMMON_QUEUE_DEVICE + 4, 0);
    mmio_write16(c + COMMON_QUEUE_MSIX_VECTOR, msix_entry);
    uint16_t got = mmio_read16(c + COMMON_QUEUE_MSIX_VECTOR);
    if (got != msix_entry) {
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": queue %u: queue_msix_vector reads 0x%x after writing 0x%x%s\n", index, got,
                  msix_entry, got == VIRTIO_MSI_NO_VECTOR ? " (device refused the vector)" : "");
        return false;
    }
    uint16_t notify_off = mmio_read16(c + COMMON_QUEUE_NOTIFY_OFF);
    uint64_t noff = (uint64_t)notify_off * vd->notify_mult;
    if (noff + 2 > vd->notify_len) {
        gk_printf("guestkit: error: virtio ");
        pci_tag(vd->pci);
        gk_printf(": queue %u: notify offset %lu is outside the notification area (%u bytes)\n",
                  index, noff, vd->notify_len);
        return false;
    }
    vq->notify = vd->notify_base + (uintptr_t)noff;
    mmio_write16(c + COMMON_QUEUE_ENABLE, 1);
    return true;
}

void virtio_driver_ok(struct virtio_dev *vd)
{
    virtio_set_status(vd, VIRTIO_STATUS_DRIVER_OK);
}

uint8_t virtio_cfg_read8(const struct virtio_dev *vd, uint32_t off)
{
    return off + 1 <= vd->devcfg_len ? mmio_read8(vd->devcfg + off) : 0;
}

uint16_t virtio_cfg_read16(const struct virtio_dev *vd, uint32_t off)
{
    return off + 2 <= vd->devcfg_len ? mmio_read16(vd->devcfg + off) : 0;
}

uint32_t virtio_cfg_read32(const struct virtio_dev *vd, uint32_t off)
{
    return off + 4 <= vd->devcfg_len ? mmio_read32(vd->devcfg + off) : 0;
}

uint64_t virtio_cfg_read64(const struct virtio_dev *vd, uint32_t off)
{
    if (off + 8 > vd->devcfg_len)
        return 0;
    uint64_t v = 0;
    for (int tries = 0; tries < 100; tries++) {
        uint8_t gen = mmio_read8(vd->common + COMMON_CONFIG_GENERATION);
        v = mmio_read32(vd->devcfg + off) | (uint64_t)mmio_read32(vd->devcfg + off + 4) << 32;
        if (mmio_read8(vd->common + COMMON_CONFIG_GENERATION) == gen)
            break;
    }
    return v;
}

void virtq_push(struct virtq *vq, uint16_t head)
{
    ((volatile uint16_t *)vq->avail->ring)[vq->avail_idx & (vq->size - 1)] = head;
    vq->avail_idx++;
}

void virtq_kick(struct virtq *vq, bool force)
{
    uint16_t old = vq->kicked_idx, new = vq->avail_idx;

    barrier();                  /* descriptors and ring entries before idx (x86: stores in order) */
    *(volatile uint16_t *)&vq->avail->idx = new;
    vq->kicked_idx = new;
    mb();                       /* idx store before the loads of avail_event/flags */
    bool need;
    if (force)
        need = true;
    else if (new == old)
        need = false;
    else if (vq->event_idx)
        need = (uint16_t)(new - *vq->avail_event - 1) < (uint16_t)(new - old);
    else
        need = !(*(volatile uint16_t *)&vq->used->flags & VIRTQ_USED_F_NO_NOTIFY);
    if (need) {
        mmio_write16(vq->notify, vq->index);
        vq->kicks++;
    }
}

bool virtq_pop(struct virtq *vq, struct virtq_used_elem *elem)
{
    if (!virtq_has_used(vq))
        return false;
    barrier();                  /* idx before the entry (x86: loads in order) */
    volatile struct virtq_used_elem *e = &vq->used->ring[vq->last_used & (vq->size - 1)];
    elem->id = e->id;
    elem->len = e->len;
    vq->last_used++;
    return true;
}

void virtq_arm(struct virtq *vq)
{
    if (vq->event_idx) {
        *vq->used_event = vq->last_used;
        mb();                   /* used_event store before the next load of used->idx */
    }
}

bool virtq_irq_taken(struct virtq *vq)
{
    uint64_t c = gk_irq_count[vq->irq_slot];

    if (c == vq->irq_seen)
        return false;
    vq->irq_seen = c;
    return true;
}
