/*
 * guestkit: virtio-blk driver.  Each queue has opt.qd request slots; slot i
 * owns descriptors [i * descs_per_slot, (i + 1) * descs_per_slot) of its
 * queue (or just the first of them, pointing to its own indirect table), so
 * a used entry's id names the slot directly.
 */
#include "virtio_blk.h"

/* struct virtio_blk_config offsets */
#define CFG_CAPACITY                    0
#define CFG_SIZE_MAX                    8
#define CFG_SEG_MAX                     12
#define CFG_BLK_SIZE                    20
#define CFG_PHYSICAL_BLOCK_EXP          24
#define CFG_ALIGNMENT_OFFSET            25
#define CFG_MIN_IO_SIZE                 26
#define CFG_OPT_IO_SIZE                 28
#define CFG_NUM_QUEUES                  34
#define CFG_MAX_DISCARD_SECTORS         36
#define CFG_MAX_DISCARD_SEG             40
#define CFG_DISCARD_SECTOR_ALIGNMENT    44
#define CFG_MAX_WRITE_ZEROES_SECTORS    48
#define CFG_MAX_WRITE_ZEROES_SEG        52
#define CFG_WRITE_ZEROES_MAY_UNMAP      56

#define BLK_WANTED_FEATURES \
    ((1ull << VIRTIO_BLK_F_SIZE_MAX) | (1ull << VIRTIO_BLK_F_SEG_MAX) | \
     (1ull << VIRTIO_BLK_F_RO) | (1ull << VIRTIO_BLK_F_BLK_SIZE) | \
     (1ull << VIRTIO_BLK_F_FLUSH) | (1ull << VIRTIO_BLK_F_TOPOLOGY) | \
     (1ull << VIRTIO_BLK_F_MQ) | (1ull << VIRTIO_BLK_F_DISCARD) | \
     (1ull << VIRTIO_BLK_F_WRITE_ZEROES))

const char *const blk_irq_words[] = { "0", "1", "intx", NULL };

static noreturn void blk_fail(const struct blk_dev *b, unsigned int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static noreturn void blk_fail(const struct blk_dev *b, unsigned int code, const char *fmt, ...)
{
    va_list ap;

    gk_printf("guestkit: error: %s disk=%u: ", b->who, b->disk);
    va_start(ap, fmt);
    gk_vprintf(fmt, ap);
    va_end(ap);
    gk_printf("\n");
    gk_exit(code);
}

/* A transitional device counts only if it has the modern capabilities. */
static bool has_common_cfg(const struct pci_dev *d)
{
    for (uint8_t pos = pci_find_cap(d, PCI_CAP_ID_VNDR, 0); pos;
         pos = pci_find_cap(d, PCI_CAP_ID_VNDR, pos))
        if (pci_read8(d, (uint16_t)(pos + 3)) == 1)
            return true;
    return false;
}

static struct pci_dev *find_disk(unsigned int disk, unsigned int *found)
{
    struct pci_dev *list;
    int n = pci_devices(&list);

    *found = 0;
    for (int i = 0; i < n; i++) {
        struct pci_dev *d = &list[i];
        if (d->vendor != VIRTIO_PCI_VENDOR)
            continue;
        if (d->device != VIRTIO_BLK_PCI_MODERN &&
            !(d->device == VIRTIO_BLK_PCI_TRANSITIONAL && has_common_cfg(d)))
            continue;
        if ((*found)++ == disk)
            return d;
    }
    return NULL;
}

static void read_config(struct blk_dev *b)
{
    const struct virtio_dev *vd = &b->vd;

    b->capacity = virtio_cfg_read64(vd, CFG_CAPACITY);
    b->size_max = blk_has(b, VIRTIO_BLK_F_SIZE_MAX) ? virtio_cfg_read32(vd, CFG_SIZE_MAX) : 0;
    b->seg_max = blk_has(b, VIRTIO_BLK_F_SEG_MAX) ? virtio_cfg_read32(vd, CFG_SEG_MAX) : 0;
    b->blk_size = blk_has(b, VIRTIO_BLK_F_BLK_SIZE) ? virtio_cfg_read32(vd, CFG_BLK_SIZE) : 0;
    b->num_queues = blk_has(b, VIRTIO_BLK_F_MQ) ? virtio_cfg_read16(vd, CFG_NUM_QUEUES) : 1;
    if (blk_has(b, VIRTIO_BLK_F_TOPOLOGY)) {
        b->physical_block_exp = virtio_cfg_read8(vd, CFG_PHYSICAL_BLOCK_EXP);
        b->alignment_offset = virtio_cfg_read8(vd, CFG_ALIGNMENT_OFFSET);
        b->min_io_size = virtio_cfg_read16(vd, CFG_MIN_IO_SIZE);
        b->opt_io_size = virtio_cfg_read32(vd, CFG_OPT_IO_SIZE);
    }
    if (blk_has(b, VIRTIO_BLK_F_DISCARD)) {
        b->max_discard_sectors = virtio_cfg_read32(vd, CFG_MAX_DISCARD_SECTORS);
        b->max_discard_seg = virtio_cfg_read32(vd, CFG_MAX_DISCARD_SEG);
        b->discard_sector_alignment = virtio_cfg_read32(vd, CFG_DISCARD_SECTOR_ALIGNMENT);
    }
    if (blk_has(b, VIRTIO_BLK_F_WRITE_ZEROES)) {
        b->max_write_zeroes_sectors = virtio_cfg_read32(vd, CFG_MAX_WRITE_ZEROES_SECTORS);
        b->max_write_zeroes_seg = virtio_cfg_read32(vd, CFG_MAX_WRITE_ZEROES_SEG);
        b->write_zeroes_may_unmap = virtio_cfg_read8(vd, CFG_WRITE_ZEROES_MAY_UNMAP);
    }
}

/* How data is split into descriptors: at most seg_max segments of at most size_max bytes. */
static void plan_segments(struct blk_dev *b)
{
    uint32_t max_io = b->opt.max_io;
    uint32_t seg = BLK_SEGMENT_DEFAULT;

    if (b->size_max && b->size_max < seg)
        seg = b->size_max >= SECTOR_SIZE ? b->size_max & ~(SECTOR_SIZE - 1) : b->size_max;
    uint32_t nseg = (max_io + seg - 1) / seg;
    if (b->seg_max && nseg > b->seg_max) {
        /* fewer, longer segments */
        seg = (max_io + b->seg_max - 1) / b->seg_max;
        seg = (seg + SECTOR_SIZE - 1) & ~(SECTOR_SIZE - 1);
        if (b->size_max && seg > b->size_max)
            blk_fail(b, EXIT_USAGE, "requests of %u bytes do not fit in seg_max=%u segments of "
                     "size_max=%u bytes", max_io, b->seg_max, b->size_max);
        nseg = (max_io + seg - 1) / seg;
    }
    b->seg_len = seg;
    b->descs_per_slot = (uint16_t)(nseg + 2);
}

static void alloc_slots(struct blk_dev *b)
{
    uint16_t qd = b->opt.qd;
    uint64_t data_stride = ((uint64_t)b->opt.max_io + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    bool indirect = blk_has(b, VIRTIO_F_INDIRECT_DESC);

    for (uint16_t qi = 0; qi < b->opt.queues; qi++) {
        struct blk_queue *q = &b->q[qi];
        q->slots = dma_alloc((uint64_t)qd * sizeof(struct blk_slot));
        uint8_t *hdrs = dma_alloc((uint64_t)qd * (sizeof(struct virtio_blk_req_hdr) + 16));
        uint8_t *tables = indirect ? dma_alloc((uint64_t)qd * b->descs_per_slot * 16) : NULL;
        uint8_t *data = dma_alloc((uint64_t)qd * data_stride);
        for (uint16_t i = 0; i < qd; i++) {
            struct blk_slot *s = &q->slots[i];
            s->hdr = (struct virtio_blk_req_hdr *)(hdrs + (uint64_t)i * 16);
            s->status = hdrs + (uint64_t)qd * 16 + (uint64_t)i * 16;
            s->data = data + (uint64_t)i * data_stride;
            s->indirect = tables ? (struct virtq_desc *)(tables + (uint64_t)i * b->descs_per_slot * 16)
                                 : NULL;
            s->queue = qi;
        }
    }
}

/*
 * Legacy INTx: the line must be wired straight to an IOAPIC pin, which the
 * Interrupt Line register names (this project's VMM: GSI 16 + slot % 8).
 * Firmware that routes INTx through chipset PIRQ links (QEMU q35 with
 * SeaBIOS) puts an 8259 IRQ there instead; that is not supported.  The
 * handler's ISR address is set before the pin is unmasked: level-triggered,
 * active-high, to this CPU's APIC.
 */
static bool blk_intx_setup(struct blk_dev *b)
{
    struct virtio_dev *vd = &b->vd;
    uint8_t pin = pci_read8(vd->pci, PCI_INTERRUPT_PIN);
    uint8_t line = pci_read8(vd->pci, PCI_INTERRUPT_LINE);

    if (pin == 0)
        blk_fail(b, EXIT_USAGE, "irq=intx: the device has no INTx pin (Interrupt Pin reads 0)");
    if (line < 16 || line > 23)
        blk_fail(b, EXIT_USAGE, "irq=intx: Interrupt Line reads %u, not an IOAPIC pin (GSI) in "
                 "16..23; INTx routed through chipset PIRQ links is not supported", line);
    if (!virtio_intx_enable(vd))
        return false;
    if (!b->intx_gsi)           /* once, not again after a reset */
        gk_printf("guestkit: %s disk=%u intx gsi=%u vector=0x%x\n", b->who, b->disk, line,
                  IRQ_INTX_VECTOR);
    b->intx_gsi = line;
    gk_intx_isr = vd->isr;
    if (!ioapic_route_level(line, IRQ_INTX_VECTOR, lapic_id()))
        blk_fail(b, EXIT_USAGE, "irq=intx: Interrupt Line reads %u, but the IOAPIC has %u pins",
                 line, ioapic_pins());
    return true;
}

/* Everything from reset to DRIVER_OK. */
static bool blk_init(struct blk_dev *b)
{
    struct virtio_dev *vd = &b->vd;
    uint64_t wanted = BLK_WANTED_FEATURES;

    if (b->opt.event_idx)
        wanted |= 1ull << VIRTIO_F_EVENT_IDX;
    if (b->opt.indirect)
        wanted |= 1ull << VIRTIO_F_INDIRECT_DESC;
    if (!virtio_reset(vd) || !virtio_negotiate(vd, wanted))
        return false;
    read_config(b);

    if (!b->ready) {
        if (b->opt.queues > b->num_queues)
            blk_fail(b, EXIT_USAGE, "queues=%u but the device has %u", b->opt.queues,
                     b->num_queues);
        plan_segments(b);
    }
    if (b->opt.irq == BLK_IRQ_MSIX && !virtio_msix_enable(vd, b->opt.queues))
        return false;
    for (uint16_t qi = 0; qi < b->opt.queues; qi++) {
        struct blk_queue *q = &b->q[qi];
        uint16_t msix = b->opt.irq == BLK_IRQ_MSIX ? qi : VIRTIO_MSI_NO_VECTOR;
        /* INTx: all queues share the one line and its counter */
        int slot = b->opt.irq == BLK_IRQ_MSIX ? qi :
                   b->opt.irq == BLK_IRQ_INTX ? IRQ_INTX_SLOT : -1;
        if (!virtio_queue_setup(vd, &q->vq, qi, VIRTQ_MAX_SIZE, msix, slot))
            return false;
        q->inflight = 0;
        q->harvesting = false;
        b->bad_used = false;
        if (b->opt.irq)
            virtq_arm(&q->vq);
        uint16_t size = q->vq.size;
        bool indirect = blk_has(b, VIRTIO_F_INDIRECT_DESC);
        if (b->descs_per_slot > size)
            blk_fail(b, EXIT_USAGE, "requests of %u bytes need chains of %u descriptors, "
                     "longer than queue %u (%u entries)", b->opt.max_io, b->descs_per_slot, qi, size);
        uint32_t per_slot = indirect ? 1 : b->descs_per_slot;
        if ((uint32_t)b->opt.qd * per_slot > size)
            blk_fail(b, EXIT_USAGE, "qd=%u requests of %u descriptors each do not fit in queue %u "
                     "(%u entries)", b->opt.qd, per_slot, qi, size);
    }
    if (!b->ready) {
        alloc_slots(b);
        b->ready = true;
    }
    uint32_t per_slot = blk_has(b, VIRTIO_F_INDIRECT_DESC) ? 1 : b->descs_per_slot;
    for (uint16_t qi = 0; qi < b->opt.queues; qi++)
        for (uint16_t i = 0; i < b->opt.qd; i++) {
            b->q[qi].slots[i].head = (uint16_t)(i * per_slot);
            b->q[qi].slots[i].busy = false;
        }
    if (b->opt.irq != BLK_IRQ_POLL) {
        lapic_enable();
        if (b->opt.irq == BLK_IRQ_INTX && !blk_intx_setup(b))
            return false;
        gk_irq_enable();
    }
    virtio_driver_ok(vd);
    if (virtio_status(vd) & VIRTIO_STATUS_NEEDS_RESET) {
        gk_printf("guestkit: error: %s disk=%u: DEVICE_NEEDS_RESET right after DRIVER_OK "
                  "(device_status 0x%x)\n", b->who, b->disk, virtio_status(vd));
        return false;
    }
    return true;
}

void blk_open(struct blk_dev *b, const char *who, unsigned int disk, const struct blk_options *opt)
{
    memset(b, 0, sizeof(*b));
    b->who = who;
    b->disk = disk;
    b->opt = *opt;
    time_init();

    unsigned int found;
    struct pci_dev *pci = find_disk(disk, &found);
    if (!pci)
        blk_fail(b, EXIT_USAGE, "no such virtio-blk device (found %u on PCI bus 0)", found);
    if (!virtio_probe(&b->vd, pci) || !blk_init(b))
        gk_exit(EXIT_FAILED);
}

bool blk_reinit(struct blk_dev *b)
{
    return blk_init(b);
}

struct blk_slot *blk_free_slot(struct blk_dev *b, uint16_t q)
{
    struct blk_queue *bq = &b->q[q];

    if (bq->inflight >= b->opt.qd)
        return NULL;
    for (uint16_t i = 0; i < b->opt.qd; i++)
        if (!bq->slots[i].busy)
            return &bq->slots[i];
    return NULL;
}

static bool device_writes_data(uint32_t type)
{
    return type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
}

void blk_submit(struct blk_dev *b, struct blk_slot *s, uint32_t type, uint64_t lba, uint32_t len)
{
    struct blk_queue *q = &b->q[s->queue];
    struct virtq *vq = &q->vq;
    bool indirect = s->indirect != NULL;
    struct virtq_desc *d = indirect ? s->indirect : &vq->desc[s->head];
    uint16_t base = indirect ? 0 : s->head;
    uint16_t n = 0;
    uint16_t data_flags = device_writes_data(type) ? VIRTQ_DESC_F_WRITE : 0;

    s->type = type;
    s->lba = lba;
    s->len = len;
    s->used_len = 0;
    s->hdr->type = type;
    s->hdr->reserved = 0;
    s->hdr->sector = lba;
    *s->status = 0xff;          /* not a valid status: shows a device that did not write it */

    d[n] = (struct virtq_desc){ (uintptr_t)s->hdr, sizeof(*s->hdr), VIRTQ_DESC_F_NEXT,
                                (uint16_t)(base + n + 1) };
    n++;
    for (uint32_t off = 0; off < len; off += b->seg_len) {
        uint32_t l = len - off < b->seg_len ? len - off : b->seg_len;
        d[n] = (struct virtq_desc){ (uintptr_t)(s->data + off), l,
                                    (uint16_t)(data_flags | VIRTQ_DESC_F_NEXT),
                                    (uint16_t)(base + n + 1) };
        n++;
    }
    d[n] = (struct virtq_desc){ (uintptr_t)s->status, 1, VIRTQ_DESC_F_WRITE, 0 };
    n++;
    if (indirect)
        vq->desc[s->head] = (struct virtq_desc){ (uintptr_t)s->indirect,
                                                 (uint32_t)n * sizeof(struct virtq_desc),
                                                 VIRTQ_DESC_F_INDIRECT, 0 };
    s->busy = true;
    q->inflight++;
    virtq_push(vq, s->head);
}

void blk_kick(struct blk_dev *b, uint16_t q)
{
    virtq_kick(&b->q[q].vq, false);
}

unsigned int blk_inflight(const struct blk_dev *b)
{
    unsigned int n = 0;

    for (uint16_t qi = 0; qi < b->opt.queues; qi++)
        n += b->q[qi].inflight;
    return n;
}

/* The next used entry of q as a slot; NULL if none; bad_used set if it names no request. */
static struct blk_slot *take_used(struct blk_dev *b, struct blk_queue *q)
{
    struct virtq_used_elem e;

    if (b->bad_used || !virtq_pop(&q->vq, &e))
        return NULL;
    uint32_t per_slot = blk_has(b, VIRTIO_F_INDIRECT_DESC) ? 1 : b->descs_per_slot;
    uint32_t i = e.id / per_slot;
    if (e.id % per_slot || i >= b->opt.qd || !q->slots[i].busy) {
        b->bad_used = true;
        b->bad_used_queue = q->vq.index;
        b->bad_used_id = e.id;
        return NULL;
    }
    struct blk_slot *s = &q->slots[i];
    s->busy = false;
    s->used_len = e.len;
    q->inflight--;
    return s;
}

/* One completed request of queue q, or NULL. */
static struct blk_slot *blk_poll(struct blk_dev *b, struct blk_queue *q)
{
    struct blk_slot *s;

    if (b->opt.irq == BLK_IRQ_POLL)
        return take_used(b, q);
    /* interrupt mode: consume used entries only after an interrupt */
    if (!q->harvesting) {
        if (!virtq_irq_taken(&q->vq))
            return NULL;
        q->harvesting = true;
    }
    if ((s = take_used(b, q)))
        return s;
    virtq_arm(&q->vq);
    if ((s = take_used(b, q)))  /* arrived before used_event was seen: no interrupt for it */
        return s;
    q->harvesting = false;
    return NULL;
}

enum blk_wait_result blk_wait_until(struct blk_dev *b, uint64_t deadline, struct blk_slot **done)
{
    uint64_t status_every = tsc_hz / 1000;      /* look at device_status once a millisecond */
    uint64_t next_status = rdtsc() + status_every;
    uint16_t nq = b->opt.queues;

    *done = NULL;
    for (;;) {
        for (uint16_t qi = 0; qi < nq; qi++) {
            struct blk_queue *q = &b->q[qi];
            if (q->inflight || q->harvesting) {
                struct blk_slot *s = blk_poll(b, q);
                if (s) {
                    *done = s;
                    return BLK_WAIT_DONE;
                }
                if (b->bad_used)
                    return BLK_WAIT_BAD_USED;
            }
        }
        uint64_t now = rdtsc();
        if (now >= next_status) {
            next_status = now + status_every;
            if (virtio_status(&b->vd) & VIRTIO_STATUS_NEEDS_RESET)
                return BLK_WAIT_NEEDS_RESET;
            if (now >= deadline)
                return BLK_WAIT_TIMEOUT;
        }
        cpu_relax();
    }
}

void blk_describe_wait(struct blk_dev *b, enum blk_wait_result r)
{
    switch (r) {
    case BLK_WAIT_DONE:
        gk_printf("request completed");
        return;
    case BLK_WAIT_NEEDS_RESET:
        gk_printf("device set DEVICE_NEEDS_RESET (device_status 0x%x)", virtio_status(&b->vd));
        return;
    case BLK_WAIT_BAD_USED:
        gk_printf("queue %u: used entry names descriptor %u, which heads no request in flight",
                  b->bad_used_queue, b->bad_used_id);
        return;
    case BLK_WAIT_TIMEOUT:
        break;
    }
    for (uint16_t qi = 0; qi < b->opt.queues; qi++) {
        struct blk_queue *q = &b->q[qi];
        uint16_t used_idx = *(volatile uint16_t *)&q->vq.used->idx;
        if (b->opt.irq && q->inflight && used_idx != q->vq.last_used) {
            gk_printf("interrupt lost: queue %u has %u used entries not consumed, but vector "
                      "0x%x did not fire within %lu s (count %lu", qi,
                      (uint16_t)(used_idx - q->vq.last_used), IRQ_VECTOR_BASE + q->vq.irq_slot,
                      gk_timeout_s, gk_irq_count[q->vq.irq_slot]);
            if (b->opt.irq == BLK_IRQ_INTX)
                gk_printf("; INTx on GSI %u", b->intx_gsi);
            gk_printf(")");
            return;
        }
    }
    gk_printf("timeout: no request completed within %lu s (", gk_timeout_s);
    for (uint16_t qi = 0; qi < b->opt.queues; qi++) {
        struct blk_queue *q = &b->q[qi];
        gk_printf("%squeue %u: %u in flight, avail idx %u, used idx %u, notifications %lu",
                  qi ? "; " : "", qi, q->inflight, q->vq.avail_idx,
                  *(volatile uint16_t *)&q->vq.used->idx, q->vq.kicks);
    }
    gk_printf("; device_status 0x%x)", virtio_status(&b->vd));
}

struct blk_slot *blk_wait(struct blk_dev *b)
{
    struct blk_slot *s;

    if (!blk_inflight(b))
        blk_fail(b, EXIT_FAILED, "internal error: waiting with no request in flight");
    enum blk_wait_result r = blk_wait_until(b, deadline_after_s(gk_timeout_s), &s);
    if (r == BLK_WAIT_DONE)
        return s;
    gk_printf("guestkit: error: %s disk=%u: ", b->who, b->disk);
    blk_describe_wait(b, r);
    gk_printf("\n");
    gk_exit(EXIT_FAILED);
}

uint8_t blk_sync(struct blk_dev *b, uint16_t q, uint32_t type, uint64_t lba, uint32_t len,
                 struct blk_slot **slot)
{
    struct blk_slot *s = blk_free_slot(b, q);

    if (!s || blk_inflight(b))
        blk_fail(b, EXIT_FAILED, "internal error: synchronous request with others in flight");
    blk_submit(b, s, type, lba, len);
    blk_kick(b, q);
    struct blk_slot *done = blk_wait(b);
    if (done != s)
        blk_fail(b, EXIT_FAILED, "internal error: another request completed");
    if (slot)
        *slot = s;
    return *s->status;
}

void blk_get_id(struct blk_dev *b, char id[VIRTIO_BLK_ID_BYTES + 1])
{
    struct blk_slot *s;

    id[0] = '\0';
    if (b->opt.max_io < VIRTIO_BLK_ID_BYTES)
        return;
    uint8_t st = blk_sync(b, 0, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, &s);
    if (st != VIRTIO_BLK_S_OK)
        return;
    int n = 0;
    for (; n < VIRTIO_BLK_ID_BYTES && s->data[n]; n++)
        id[n] = s->data[n] > 0x20 && s->data[n] < 0x7f ? (char)s->data[n] : '?';
    id[n] = '\0';
}
