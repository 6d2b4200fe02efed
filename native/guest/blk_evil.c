/*
 * guestkit: blk-evil hands a virtio-blk device malformed requests, one case
 * at a time, and checks after each that the device refused it and still
 * serves a correct request (write, read back, compare 8 sectors at LBA 0).
 *
 * "Refused" means a used entry whose status byte is IOERR or UNSUPP (only
 * for cases whose chain has a status byte), or DEVICE_NEEDS_RESET in
 * device_status; the kit then resets and re-initialises the device.  A used
 * entry is the only thing that lets the kit read the status byte.
 *
 * What QEMU 7.2 does (virtqueue_split_pop and virtio_blk_handle_request):
 *   loop                 "Looped descriptor": needs-reset
 *   next-out-of-range    "Desc next is N": needs-reset
 *   head-out-of-range    "Guest says index N is available": needs-reset
 *   addr-out-of-ram      needs-reset ("bogus descriptor or out of
 *                        resources"): QEMU maps a buffer outside RAM through
 *                        its single one-page bounce buffer, so a one-page
 *                        buffer there would "succeed"; the kit's buffers
 *                        span two pages and the second one fails
 *   len-overflow         needs-reset, the same way
 *   too-long-chain       needs-reset ("too many write descriptors in indirect
 *                        table"): QEMU does not compare an indirect table with
 *                        the queue size but stops at 1024 (VIRTQUEUE_MAX_SIZE)
 *                        descriptors, so the table has max(queue size, 1024)
 *                        + 1 entries
 *   nested-indirect      needs-reset: QEMU treats the nested table's descriptor
 *                        as a plain buffer, so the chain has no device-
 *                        writable byte ("virtio-blk missing headers")
 *   indirect-bad-len     "Invalid size for indirect buffer table": needs-reset
 *   no-status            "virtio-blk missing headers": needs-reset
 *   short-header         "virtio-blk request outhdr too short": needs-reset.
 *                        Only 8 device-readable bytes in all: a header split
 *                        over several descriptors is legal (2.6.4)
 *   wrong-direction      "Incorrect order for descriptors": needs-reset.  An
 *                        IN request whose data is a device-writable then a
 *                        device-readable buffer; QEMU completes an IN request
 *                        with only readable data as a 0-byte read (OK)
 *   sector-out-of-range  ioerr (at capacity, straddling it, and at 2^55 where
 *                        lba * 512 wraps)
 *   avail-idx-jump       needs-reset, "Virtqueue size exceeded": QEMU does not
 *                        check the jump itself; it pops the stale ring entries
 *                        (all naming the last correct request, a valid read)
 *                        one by one and stops when more than queue-size
 *                        requests are in flight
 */
#include "blk_pattern.h"
#include "virtio_blk.h"

#define CHECK_SECTORS           8
#define CHECK_BYTES             (CHECK_SECTORS * SECTOR_SIZE)
#define BAD_BUFFER_LEN          8192            /* two pages: see addr-out-of-ram above */
#define QEMU_MAX_CHAIN          1024            /* VIRTQUEUE_MAX_SIZE */

enum outcome { OUTCOME_IOERR, OUTCOME_UNSUPP, OUTCOME_NEEDS_RESET, OUTCOME_SKIPPED };
static const char *const outcome_names[] = { "ioerr", "unsupp", "needs-reset", "skipped" };

struct evil {
    struct blk_dev *b;
    struct virtq *vq;
    struct virtio_blk_req_hdr *hdr;
    volatile uint8_t *status;
    uint8_t *data;                      /* two 512-byte buffers */
    struct virtq_desc *t1, *t2;         /* small indirect tables */
    struct virtq_desc *big;             /* the too-long table */
    uint16_t big_entries;
    const char *name;                   /* current case */
    const char *when;                   /* "before the cases" or "afterwards" */
    bool has_status;                    /* the chain has a status byte for the device */
    bool ioerr_only;                    /* a well-formed request: IOERR is the only answer */
    unsigned int checks;                /* correct requests done, for their seeds */
};

struct evil_case {
    const char *name;
    bool needs_indirect;
    int variants;
    void (*build)(struct evil *e, int variant);
};

static noreturn void case_fail(const struct evil *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static noreturn void case_fail(const struct evil *e, const char *fmt, ...)
{
    va_list ap;

    gk_printf("guestkit: error: blk-evil case=%s disk=%u: ", e->name, e->b->disk);
    va_start(ap, fmt);
    gk_vprintf(fmt, ap);
    va_end(ap);
    gk_printf("\n");
    gk_exit(EXIT_FAILED);
}

static void set_desc(struct virtq_desc *t, uint16_t i, uint64_t addr, uint32_t len,
                     uint16_t flags, uint16_t next)
{
    t[i] = (struct virtq_desc){ addr, len, flags, next };
}

static uint64_t pa(const volatile void *p)
{
    return (uint64_t)(uintptr_t)p;
}

static void header(struct evil *e, uint32_t type, uint64_t lba)
{
    e->hdr->type = type;
    e->hdr->reserved = 0;
    e->hdr->sector = lba;
    *e->status = 0xff;
    e->has_status = true;
    e->ioerr_only = false;
}

#define F_NEXT          VIRTQ_DESC_F_NEXT
#define F_WRITE         VIRTQ_DESC_F_WRITE
#define F_INDIRECT      VIRTQ_DESC_F_INDIRECT

/* ---- the cases: each builds its chain and puts it in the avail ring ---- */

static void build_loop(struct evil *e, int v)
{
    (void)v;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), 512, F_WRITE | F_NEXT, 2);
    set_desc(d, 2, pa(e->status), 1, F_WRITE | F_NEXT, 1);     /* back to 1 */
    virtq_push(e->vq, 0);
}

static void build_next_out_of_range(struct evil *e, int v)
{
    (void)v;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, 0);
    e->has_status = false;
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), 512, F_WRITE | F_NEXT, e->vq->size);
    virtq_push(e->vq, 0);
}

static void build_head_out_of_range(struct evil *e, int v)
{
    (void)v;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, 0);
    e->has_status = false;
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), 512, F_WRITE | F_NEXT, 2);
    set_desc(d, 2, pa(e->status), 1, F_WRITE, 0);
    virtq_push(e->vq, e->vq->size);
}

static void build_addr_out_of_ram(struct evil *e, int v)
{
    /* far beyond RAM; and the last 8 KiB below 4 GiB, in the MMIO hole */
    uint64_t addr = v == 0 ? 0x7f0000000000ull : FOUR_GIB - BAD_BUFFER_LEN;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, addr, BAD_BUFFER_LEN, F_WRITE | F_NEXT, 2);
    set_desc(d, 2, pa(e->status), 1, F_WRITE, 0);
    virtq_push(e->vq, 0);
}

static void build_len_overflow(struct evil *e, int v)
{
    (void)v;
    /* a write: the device would only read the bytes at 2^64 - 8 KiB and, wrapped, at 0 */
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_OUT, 0);
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, 0 - (uint64_t)BAD_BUFFER_LEN, 2 * BAD_BUFFER_LEN, F_NEXT, 2);
    set_desc(d, 2, pa(e->status), 1, F_WRITE, 0);
    virtq_push(e->vq, 0);
}

static void build_too_long_chain(struct evil *e, int v)
{
    (void)v;
    uint16_t n = e->big_entries;
    header(e, VIRTIO_BLK_T_IN, 0);
    set_desc(e->big, 0, pa(e->hdr), 16, F_NEXT, 1);
    for (uint16_t i = 1; i + 1 < n; i++)
        set_desc(e->big, i, pa(e->data), 512, F_WRITE | F_NEXT, (uint16_t)(i + 1));
    set_desc(e->big, (uint16_t)(n - 1), pa(e->status), 1, F_WRITE, 0);
    set_desc(e->vq->desc, 0, pa(e->big), (uint32_t)n * 16, F_INDIRECT, 0);
    virtq_push(e->vq, 0);
}

static void build_nested_indirect(struct evil *e, int v)
{
    (void)v;
    header(e, VIRTIO_BLK_T_OUT, 0);
    set_desc(e->t2, 0, pa(e->data), 512, F_NEXT, 1);
    set_desc(e->t2, 1, pa(e->status), 1, F_WRITE, 0);
    set_desc(e->t1, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(e->t1, 1, pa(e->t2), 32, F_INDIRECT, 0);
    set_desc(e->vq->desc, 0, pa(e->t1), 32, F_INDIRECT, 0);
    virtq_push(e->vq, 0);
}

static void build_indirect_bad_len(struct evil *e, int v)
{
    header(e, VIRTIO_BLK_T_IN, 0);
    e->has_status = false;     /* the status entry lies beyond the table's length */
    set_desc(e->t1, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(e->t1, 1, pa(e->data), 512, F_WRITE | F_NEXT, 2);
    set_desc(e->t1, 2, pa(e->status), 1, F_WRITE, 0);
    set_desc(e->vq->desc, 0, pa(e->t1), v == 0 ? 24 : 0, F_INDIRECT, 0);
    virtq_push(e->vq, 0);
}

static void build_no_status(struct evil *e, int v)
{
    (void)v;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_OUT, 0);
    e->has_status = false;
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), 512, 0, 0);
    virtq_push(e->vq, 0);
}

static void build_short_header(struct evil *e, int v)
{
    (void)v;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, pa(e->hdr), 8, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), 512, F_WRITE | F_NEXT, 2);
    set_desc(d, 2, pa(e->status), 1, F_WRITE, 0);
    virtq_push(e->vq, 0);
}

static void build_wrong_direction(struct evil *e, int v)
{
    (void)v;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), 512, F_WRITE | F_NEXT, 2);
    set_desc(d, 2, pa(e->data + 512), 512, F_NEXT, 3);         /* readable, after a writable one */
    set_desc(d, 3, pa(e->status), 1, F_WRITE, 0);
    virtq_push(e->vq, 0);
}

static void build_sector_out_of_range(struct evil *e, int v)
{
    uint64_t cap = e->b->capacity;
    /* at the capacity; straddling it; where lba * 512 wraps to 0 */
    uint64_t lba = v == 0 ? cap : v == 1 ? cap - 1 : 1ull << 55;
    uint32_t len = v == 1 ? 1024 : 512;
    struct virtq_desc *d = e->vq->desc;
    header(e, VIRTIO_BLK_T_IN, lba);
    e->ioerr_only = true;
    set_desc(d, 0, pa(e->hdr), 16, F_NEXT, 1);
    set_desc(d, 1, pa(e->data), len, F_WRITE | F_NEXT, 2);
    set_desc(d, 2, pa(e->status), 1, F_WRITE, 0);
    virtq_push(e->vq, 0);
}

static void build_avail_idx_jump(struct evil *e, int v)
{
    (void)v;
    header(e, VIRTIO_BLK_T_IN, 0);
    e->has_status = false;
    e->vq->avail_idx = (uint16_t)(e->vq->avail_idx + e->vq->size + 1);
}

static const struct evil_case cases[] = {
    { "loop", false, 1, build_loop },
    { "next-out-of-range", false, 1, build_next_out_of_range },
    { "head-out-of-range", false, 1, build_head_out_of_range },
    { "addr-out-of-ram", false, 2, build_addr_out_of_ram },
    { "len-overflow", false, 1, build_len_overflow },
    { "too-long-chain", true, 1, build_too_long_chain },
    { "nested-indirect", true, 1, build_nested_indirect },
    { "indirect-bad-len", true, 2, build_indirect_bad_len },
    { "no-status", false, 1, build_no_status },
    { "short-header", false, 1, build_short_header },
    { "wrong-direction", false, 1, build_wrong_direction },
    { "sector-out-of-range", false, 3, build_sector_out_of_range },
    { "avail-idx-jump", false, 1, build_avail_idx_jump },
};

/* ---- running a case ---- */

/* Kicks the malformed chain and waits for the device's answer. */
static enum outcome await_refusal(struct evil *e)
{
    struct virtq *vq = e->vq;
    uint64_t deadline = deadline_after_s(gk_timeout_s);
    uint64_t status_every = tsc_hz / 1000;
    uint64_t next_status = 0;

    virtq_kick(vq, true);
    for (;;) {
        struct virtq_used_elem u;
        if (virtq_pop(vq, &u)) {
            uint8_t ds = virtio_status(&e->b->vd);
            if (ds & VIRTIO_STATUS_NEEDS_RESET && !e->ioerr_only)
                return OUTCOME_NEEDS_RESET;
            if (!e->has_status)
                case_fail(e, "not refused: the device returned the chain (used id=%u len=%u, "
                          "device_status 0x%x)", u.id, u.len, ds);
            uint8_t st = *e->status;    /* the used entry says the device is done with it */
            if (st == VIRTIO_BLK_S_IOERR)
                return OUTCOME_IOERR;
            if (st == VIRTIO_BLK_S_UNSUPP && !e->ioerr_only)
                return OUTCOME_UNSUPP;
            if (e->ioerr_only)
                case_fail(e, "completed with status %u, not IOERR (used id=%u len=%u)",
                          st, u.id, u.len);
            case_fail(e, "not refused: completed with status %u (used id=%u len=%u)",
                      st, u.id, u.len);
        }
        uint64_t now = rdtsc();
        if (now >= next_status) {
            next_status = now + status_every;
            uint8_t ds = virtio_status(&e->b->vd);
            if (ds & VIRTIO_STATUS_NEEDS_RESET) {
                if (e->ioerr_only)
                    case_fail(e, "a well-formed request set DEVICE_NEEDS_RESET (device_status "
                              "0x%x) instead of completing with IOERR", ds);
                return OUTCOME_NEEDS_RESET;
            }
            if (now >= deadline)
                case_fail(e, "not refused: no used entry and no DEVICE_NEEDS_RESET within %lu s "
                          "(device_status 0x%x, used idx %u)", gk_timeout_s, ds,
                          *(volatile uint16_t *)&vq->used->idx);
        }
        cpu_relax();
    }
}

/* One correct request; fails the case with a message if it does not complete with OK. */
static void correct_request(struct evil *e, uint32_t type, struct blk_slot **slot)
{
    struct blk_dev *b = e->b;
    struct blk_slot *s = blk_free_slot(b, 0), *done;

    if (!s)
        case_fail(e, "internal error: no free request slot");
    blk_submit(b, s, type, 0, CHECK_BYTES);
    blk_kick(b, 0);
    enum blk_wait_result r = blk_wait_until(b, deadline_after_s(gk_timeout_s), &done);
    if (r != BLK_WAIT_DONE) {
        gk_printf("guestkit: error: blk-evil case=%s disk=%u: the correct %s %s failed: ",
                  e->name, b->disk, type == VIRTIO_BLK_T_IN ? "read" : "write", e->when);
        blk_describe_wait(b, r);
        gk_printf("\n");
        gk_exit(EXIT_FAILED);
    }
    if (*done->status != VIRTIO_BLK_S_OK)
        case_fail(e, "the correct %s %s completed with status %u",
                  type == VIRTIO_BLK_T_IN ? "read" : "write", e->when, *done->status);
    *slot = done;
}

/* Write, read back and compare CHECK_SECTORS at LBA 0, with a new seed each time. */
static void check_device(struct evil *e)
{
    struct blk_slot *s = blk_free_slot(e->b, 0);
    uint64_t seed = (++e->checks) & 0xffff;
    uint64_t lba, word, expected, got;

    pattern_fill(s->data, 0, CHECK_SECTORS, seed);
    correct_request(e, VIRTIO_BLK_T_OUT, &s);
    memset(s->data, 0, CHECK_BYTES);
    correct_request(e, VIRTIO_BLK_T_IN, &s);
    if (pattern_check(s->data, 0, CHECK_SECTORS, seed, &lba, &word, &expected, &got))
        case_fail(e, "the correct read %s returned other data: lba=%lu word=%lu "
                  "expected=0x%016lx got=0x%016lx", e->when, lba, word, expected, got);
}

int wl_blk_evil(int argc, char **argv)
{
    uint64_t disk = 0, timeout = DEFAULT_TIMEOUT_S, other = UINT64_MAX;
    const struct param params[] = {
        { .key = "disk", .max = 255, .value = &disk },
        { .key = "timeout", .max = 3600, .value = &timeout },
        { .key = "other", .max = 255, .value = &other },
    };

    if (!parse_params("blk-evil", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    if (timeout == 0) {
        gk_printf("guestkit: error: blk-evil: timeout must be at least 1\n");
        return EXIT_USAGE;
    }
    gk_timeout_s = timeout;

    static struct blk_dev dev;
    struct blk_dev *b = &dev;
    const struct blk_options opt = {
        .queues = 1, .qd = 1, .max_io = CHECK_BYTES, .irq = BLK_IRQ_POLL,
        .event_idx = true, .indirect = true,
    };
    blk_open(b, "blk-evil", (unsigned int)disk, &opt);
    if (b->capacity < CHECK_SECTORS) {
        gk_printf("guestkit: error: blk-evil disk=%lu: capacity of %lu sectors is below %u\n",
                  disk, b->capacity, CHECK_SECTORS);
        return EXIT_USAGE;
    }

    struct evil e = { .b = b, .vq = &b->q[0].vq, .name = "none", .when = "before the cases" };
    uint8_t *page = dma_alloc(PAGE_SIZE);
    e.hdr = (struct virtio_blk_req_hdr *)page;
    e.status = page + 64;
    e.data = dma_alloc(PAGE_SIZE);
    e.t1 = dma_alloc(PAGE_SIZE);
    e.t2 = dma_alloc(PAGE_SIZE);
    e.big_entries = (uint16_t)((e.vq->size > QEMU_MAX_CHAIN ? e.vq->size : QEMU_MAX_CHAIN) + 1);
    e.big = dma_alloc((uint64_t)e.big_entries * sizeof(struct virtq_desc));

    check_device(&e);
    e.when = "afterwards";
    unsigned int ran = 0;
    for (size_t c = 0; c < ARRAY_SIZE(cases); c++) {
        const struct evil_case *k = &cases[c];
        e.name = k->name;
        if (k->needs_indirect && !blk_has(b, VIRTIO_F_INDIRECT_DESC)) {
            gk_printf("guestkit: blk-evil case=%s outcome=%s\n", k->name,
                      outcome_names[OUTCOME_SKIPPED]);
            continue;
        }
        enum outcome out[4] = { OUTCOME_SKIPPED, OUTCOME_SKIPPED, OUTCOME_SKIPPED, OUTCOME_SKIPPED };
        for (int v = 0; v < k->variants; v++) {
            k->build(&e, v);
            out[v] = await_refusal(&e);
            if (out[v] == OUTCOME_NEEDS_RESET && !blk_reinit(b))
                case_fail(&e, "re-initialising the device after DEVICE_NEEDS_RESET failed");
            e.vq = &b->q[0].vq;
            check_device(&e);
        }
        /* one outcome, or the variants' outcomes joined by commas when they differ */
        gk_printf("guestkit: blk-evil case=%s outcome=%s", k->name, outcome_names[out[0]]);
        bool same = true;
        for (int v = 1; v < k->variants; v++)
            same = same && out[v] == out[0];
        for (int v = 1; v < k->variants && !same; v++)
            gk_printf(",%s", outcome_names[out[v]]);
        gk_printf("\n");
        ran++;
    }

    /* other=N: another disk of the same VM must still serve a correct request */
    if (other != UINT64_MAX) {
        if (other == disk) {
            gk_printf("guestkit: error: blk-evil: other=%lu is the disk under test\n", other);
            return EXIT_USAGE;
        }
        static struct blk_dev other_dev;
        blk_open(&other_dev, "blk-evil", (unsigned int)other, &opt);
        struct evil o = e;
        o.b = &other_dev;
        o.vq = &other_dev.q[0].vq;
        o.name = "other-disk";
        o.when = "after the cases on the other disk";
        check_device(&o);
        gk_printf("guestkit: blk-evil other disk=%lu ok\n", other);
    }
    gk_printf("guestkit: blk-evil ok cases=%u\n", ran);
    return EXIT_OK;
}
