/*
 * guestkit: virtio-blk workloads blk-verify and blk-bench (blk-evil is in
 * blk_evil.c).  See README.md for their arguments and output lines.
 */
#include "blk_pattern.h"
#include "virtio_blk.h"

#define MAX_IO          (16u * 1024 * 1024)

static const char *const type_names[] = { "read", "write", "randread", "randwrite", NULL };

/* false (message printed) unless value is a multiple of 512, and not 0 when nonzero is set */
static bool sectors_ok(const char *who, const char *key, uint64_t value, bool nonzero)
{
    if (value % SECTOR_SIZE == 0 && (value || !nonzero))
        return true;
    gk_printf("guestkit: error: %s: %s=%lu must be a %smultiple of 512\n", who, key, value,
              nonzero ? "nonzero " : "");
    return false;
}

/* false (message printed) if value is 0 */
static bool at_least_1(const char *who, const char *key, uint64_t value)
{
    if (value)
        return true;
    gk_printf("guestkit: error: %s: %s must be at least 1\n", who, key);
    return false;
}

/* ---- blk-verify ---- */

struct verify_state {
    struct blk_dev *b;
    uint64_t seed;
    uint64_t start, size, count, stride, io;
    /* the request generator: range r, byte offset off inside it */
    uint64_t r, off, issued;
    /* lowest mismatch seen while reading */
    bool bad;
    uint64_t bad_lba, bad_word, bad_expected, bad_got;
    uint64_t bytes;
};

static void request_failed(const char *who, const struct blk_dev *b, const struct blk_slot *s)
{
    gk_printf("guestkit: error: %s request failed disk=%u type=%u lba=%lu status=%u\n",
              who, b->disk, s->type, s->lba, *s->status);
    gk_exit(EXIT_FAILED);
}

static void check_read(struct verify_state *v, const struct blk_slot *s)
{
    uint64_t lba, word, expected, got;

    if (!pattern_check(s->data, s->lba, s->len / SECTOR_SIZE, v->seed,
                       &lba, &word, &expected, &got))
        return;
    if (!v->bad || lba < v->bad_lba || (lba == v->bad_lba && word < v->bad_word)) {
        v->bad = true;
        v->bad_lba = lba;
        v->bad_word = word;
        v->bad_expected = expected;
        v->bad_got = got;
    }
}

/* Issues every range as requests of `io` bytes of one type, round-robin over the queues. */
static void verify_pass(struct verify_state *v, uint32_t type)
{
    struct blk_dev *b = v->b;
    uint16_t nq = b->opt.queues;

    v->r = v->off = v->issued = 0;
    for (;;) {
        uint16_t kick = 0;      /* bit per queue with new requests */
        while (v->r < v->count) {
            uint16_t qi = (uint16_t)(v->issued % nq);
            struct blk_slot *s = blk_free_slot(b, qi);
            if (!s)
                break;
            uint64_t pos = v->start + v->r * v->stride + v->off;
            uint64_t len = v->size - v->off < v->io ? v->size - v->off : v->io;
            uint64_t lba = pos / SECTOR_SIZE;
            if (type == VIRTIO_BLK_T_OUT)
                pattern_fill(s->data, lba, len / SECTOR_SIZE, v->seed);
            blk_submit(b, s, type, lba, (uint32_t)len);
            kick |= (uint16_t)(1u << qi);
            v->issued++;
            v->off += len;
            if (v->off == v->size) {
                v->off = 0;
                v->r++;
            }
        }
        for (uint16_t qi = 0; qi < nq; qi++)
            if (kick & (1u << qi))
                blk_kick(b, qi);
        if (!blk_inflight(b))
            break;
        struct blk_slot *s = blk_wait(b);
        if (*s->status != VIRTIO_BLK_S_OK)
            request_failed(b->who, b, s);
        if (type == VIRTIO_BLK_T_IN) {
            check_read(v, s);
            v->bytes += s->len;
        }
    }
}

int wl_blk_verify(int argc, char **argv)
{
    uint64_t disk = 0, start = 0, size = 1024 * 1024, count = 1, stride = UINT64_MAX, seed = 1;
    uint64_t io = 64 * 1024, queues = 1, qd = 4, irq = 0, write = 1, expect_ro = 0;
    uint64_t event_idx = 1, indirect = 1, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "disk", .max = 255, .value = &disk },
        { .key = "start", .size = true, .max = UINT64_MAX, .value = &start },
        { .key = "size", .size = true, .max = UINT64_MAX, .value = &size },
        { .key = "count", .max = UINT32_MAX, .value = &count },
        { .key = "stride", .size = true, .max = UINT64_MAX - 1, .value = &stride },
        { .key = "seed", .max = 0xffff, .value = &seed },
        { .key = "io", .size = true, .max = MAX_IO, .value = &io },
        { .key = "queues", .max = BLK_MAX_QUEUES, .value = &queues },
        { .key = "qd", .max = BLK_MAX_QD, .value = &qd },
        { .key = "irq", .words = blk_irq_words, .value = &irq },
        { .key = "write", .max = 1, .value = &write },
        { .key = "expect-ro", .max = 1, .value = &expect_ro },
        { .key = "event-idx", .max = 1, .value = &event_idx },
        { .key = "indirect", .max = 1, .value = &indirect },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("blk-verify", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    if (stride == UINT64_MAX)
        stride = size;
    const char *w = "blk-verify";
    if (!sectors_ok(w, "start", start, false) || !sectors_ok(w, "size", size, true) ||
        !sectors_ok(w, "stride", stride, false) || !sectors_ok(w, "io", io, true) ||
        !at_least_1(w, "count", count) || !at_least_1(w, "queues", queues) ||
        !at_least_1(w, "qd", qd) || !at_least_1(w, "timeout", timeout))
        return EXIT_USAGE;
    /* the end of the last range, without overflow */
    if (size > UINT64_MAX - start ||
        (stride && count - 1 > (UINT64_MAX - start - size) / stride)) {
        gk_printf("guestkit: error: blk-verify: ranges end beyond 2^64 bytes\n");
        return EXIT_USAGE;
    }
    uint64_t end = start + (count - 1) * stride + size;
    gk_timeout_s = timeout;

    static struct blk_dev dev;
    struct blk_dev *b = &dev;
    const struct blk_options opt = {
        .queues = (uint16_t)queues, .qd = (uint16_t)qd, .max_io = (uint32_t)io,
        .irq = (enum blk_irq_mode)irq, .event_idx = event_idx, .indirect = indirect,
    };
    blk_open(b, "blk-verify", (unsigned int)disk, &opt);

    char id[VIRTIO_BLK_ID_BYTES + 1];
    blk_get_id(b, id);
    gk_printf("guestkit: blk-verify disk=%lu id=%s capacity=%lu queues=%u features=0x%lx\n",
              disk, id, b->capacity, b->num_queues, b->vd.features);

    if (b->capacity > UINT64_MAX / SECTOR_SIZE || end > b->capacity * SECTOR_SIZE) {
        gk_printf("guestkit: error: blk-verify disk=%lu: ranges end at byte %lu, beyond the "
                  "capacity of %lu sectors\n", disk, end, b->capacity);
        return EXIT_USAGE;
    }

    struct verify_state v = {
        .b = b, .seed = seed, .start = start, .size = size, .count = count,
        .stride = stride, .io = io,
    };

    if (expect_ro) {
        if (!blk_has(b, VIRTIO_BLK_F_RO)) {
            gk_printf("guestkit: error: blk-verify disk=%lu: expect-ro=1 but the device does "
                      "not offer VIRTIO_BLK_F_RO\n", disk);
            return EXIT_FAILED;
        }
        /* the data is what the sector holds if the disk was written by blk-verify */
        struct blk_slot *s = blk_free_slot(b, 0);
        uint64_t len = io < size ? io : size;
        pattern_fill(s->data, start / SECTOR_SIZE, len / SECTOR_SIZE, seed);
        uint8_t st = blk_sync(b, 0, VIRTIO_BLK_T_OUT, start / SECTOR_SIZE, (uint32_t)len, NULL);
        if (st != VIRTIO_BLK_S_IOERR) {
            gk_printf("guestkit: error: blk-verify disk=%lu: a write to the read-only device "
                      "completed with status %u, not IOERR (1)\n", disk, st);
            return EXIT_FAILED;
        }
        write = 0;
    }
    if (write) {
        verify_pass(&v, VIRTIO_BLK_T_OUT);
        if (blk_has(b, VIRTIO_BLK_F_FLUSH)) {
            struct blk_slot *s;
            if (blk_sync(b, 0, VIRTIO_BLK_T_FLUSH, 0, 0, &s) != VIRTIO_BLK_S_OK)
                request_failed("blk-verify", b, s);
        }
    }
    verify_pass(&v, VIRTIO_BLK_T_IN);
    if (v.bad) {
        gk_printf("guestkit: error: blk-verify mismatch disk=%lu lba=%lu word=%lu "
                  "expected=0x%016lx got=0x%016lx\n",
                  disk, v.bad_lba, v.bad_word, v.bad_expected, v.bad_got);
        return EXIT_FAILED;
    }
    gk_printf("guestkit: blk-verify ok disk=%lu bytes=%lu\n", disk, v.bytes);
    return EXIT_OK;
}

/* ---- blk-bench ---- */

static uint64_t prng_next(uint64_t *state)
{
    /* xorshift64* */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dull;
}

int wl_blk_bench(int argc, char **argv)
{
    uint64_t disk = 0, rw = 2, bs = 4096, qd = 1, queues = 1, seconds = 5, span = 0;
    uint64_t irq = 0, event_idx = 1, indirect = 1, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "disk", .max = 255, .value = &disk },
        { .key = "rw", .words = type_names, .value = &rw },
        { .key = "bs", .size = true, .max = MAX_IO, .value = &bs },
        { .key = "qd", .max = BLK_MAX_QD, .value = &qd },
        { .key = "queues", .max = BLK_MAX_QUEUES, .value = &queues },
        { .key = "time", .max = 3600, .value = &seconds },
        { .key = "span", .size = true, .max = UINT64_MAX, .value = &span },
        { .key = "irq", .words = blk_irq_words, .value = &irq },
        { .key = "event-idx", .max = 1, .value = &event_idx },
        { .key = "indirect", .max = 1, .value = &indirect },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("blk-bench", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    const char *w = "blk-bench";
    if (!sectors_ok(w, "bs", bs, true) || !sectors_ok(w, "span", span, false) ||
        !at_least_1(w, "qd", qd) || !at_least_1(w, "queues", queues) ||
        !at_least_1(w, "time", seconds) || !at_least_1(w, "timeout", timeout))
        return EXIT_USAGE;
    gk_timeout_s = timeout;
    bool is_write = rw == 1 || rw == 3, random = rw >= 2;

    static struct blk_dev dev;
    struct blk_dev *b = &dev;
    const struct blk_options opt = {
        .queues = (uint16_t)queues, .qd = (uint16_t)qd, .max_io = (uint32_t)bs,
        .irq = (enum blk_irq_mode)irq, .event_idx = event_idx, .indirect = indirect,
    };
    blk_open(b, "blk-bench", (unsigned int)disk, &opt);

    uint64_t disk_bytes = b->capacity > UINT64_MAX / SECTOR_SIZE ? UINT64_MAX & ~511ull
                                                                 : b->capacity * SECTOR_SIZE;
    if (span == 0 || span > disk_bytes)
        span = disk_bytes;
    uint64_t blocks = span / bs;
    if (blocks == 0) {
        gk_printf("guestkit: error: blk-bench disk=%lu: span of %lu bytes holds no block of "
                  "%lu bytes\n", disk, span, bs);
        return EXIT_USAGE;
    }
    if (is_write)               /* something other than zeros */
        for (uint16_t qi = 0; qi < queues; qi++)
            for (uint16_t i = 0; i < qd; i++)
                pattern_fill(b->q[qi].slots[i].data, i, bs / SECTOR_SIZE, 0);

    uint32_t type = is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    uint64_t prng = 0x9e3779b97f4a7c15ull, next_block = 0, ops = 0;
    uint64_t t0 = rdtsc(), end = t0 + seconds * tsc_hz, t_last = t0;
    bool running = true;

    for (;;) {
        uint16_t kick = 0;
        if (running)
            for (uint16_t qi = 0; qi < queues; qi++) {
                struct blk_slot *s;
                while ((s = blk_free_slot(b, qi))) {
                    uint64_t block;
                    if (random) {
                        block = prng_next(&prng) % blocks;
                    } else {
                        block = next_block;
                        next_block = next_block + 1 == blocks ? 0 : next_block + 1;
                    }
                    blk_submit(b, s, type, block * (bs / SECTOR_SIZE), (uint32_t)bs);
                    kick |= (uint16_t)(1u << qi);
                }
            }
        for (uint16_t qi = 0; qi < queues; qi++)
            if (kick & (1u << qi))
                blk_kick(b, qi);
        if (!blk_inflight(b))
            break;
        struct blk_slot *s = blk_wait(b);
        if (*s->status != VIRTIO_BLK_S_OK)
            request_failed("blk-bench", b, s);
        ops++;
        t_last = rdtsc();
        if (t_last >= end)
            running = false;
    }
    uint64_t ns = tsc_to_ns(t_last - t0);
    if (ns == 0)
        ns = 1;
    static const char *const names[] = { "read", "write", "randread", "randwrite" };
    gk_printf("guestkit: blk-bench rw=%s bs=%lu qd=%lu queues=%lu ops=%lu ns=%lu iops=%lu "
              "kibps=%lu\n", names[rw], bs, qd, queues, ops, ns,
              muldiv64(ops, 1000000000ull, ns), muldiv64(ops * bs, 1000000000ull, ns) / 1024);
    return EXIT_OK;
}

/* ---- blk-log ---- */

#define LOG_HEAD_MAGIC  0x44484f4c4b47ull       /* "GKLOHD" little-endian */
#define LOG_REC_MAGIC   0x43524f4c4b47ull       /* "GKLORC" */

struct log_sector {
    uint64_t magic;
    uint64_t seq;       /* head: the last record written; record: its number (its sector) */
    uint64_t tag;       /* the run that wrote it: a number drawn at the run's start */
    uint64_t prev_tag;  /* record: the tag of the head it continued from */
};

/* blk-log: a journal of which run wrote when, to tell whether two runs of one VM (on two hosts)
 * ever wrote its disk at the same time.  Sector 0 is the head (the last record's number and the
 * tag of the run that wrote it); record N is sector N.  A run draws a tag, reads the head, and
 * every `period` ms writes record seq+1 and then the head, each flushed.  Two runs at once would
 * interleave their tags in the records; one run after another leaves each tag in one block,
 * each run's first record continuing the head the run before left.  Prints
 * `guestkit: blk-log tag=T from=SEQ` once and `guestkit: blk-log seq N` per record; n=COUNT
 * ends after COUNT records. */
int wl_blk_log(int argc, char **argv)
{
    uint64_t disk = 0, period = 50, n = 0, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "disk", .max = 255, .value = &disk },
        { .key = "period", .max = 3600000, .value = &period },
        { .key = "n", .max = INT64_MAX, .value = &n },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("blk-log", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    if (!at_least_1("blk-log", "period", period) || !at_least_1("blk-log", "timeout", timeout))
        return EXIT_USAGE;
    gk_timeout_s = timeout;
    time_init();

    static struct blk_dev dev;
    struct blk_dev *b = &dev;
    const struct blk_options opt = { .queues = 1, .qd = 1, .max_io = 4096 };
    blk_open(b, "blk-log", (unsigned int)disk, &opt);
    bool flush = blk_has(b, VIRTIO_BLK_F_FLUSH);

    struct blk_slot *s;
    if (blk_sync(b, 0, VIRTIO_BLK_T_IN, 0, SECTOR_SIZE, &s) != VIRTIO_BLK_S_OK)
        request_failed("blk-log", b, s);
    struct log_sector head;
    memcpy(&head, s->data, sizeof head);
    if (head.magic != LOG_HEAD_MAGIC) {
        head.seq = 0;
        head.tag = 0;
    }
    /* distinct for each run: the TSC's low bits at this instant, mixed */
    uint64_t tag = rdtsc() * 0x9e3779b97f4a7c15ull;
    tag ^= tag >> 29;
    if (!tag)
        tag = 1;
    gk_printf("guestkit: blk-log tag=%lu from=%lu\n", tag, head.seq);

    uint64_t period_tsc = muldiv64(period, tsc_hz, 1000);
    uint64_t next = rdtsc();
    for (uint64_t written = 0; !n || written < n; written++) {
        while (rdtsc() < next)
            cpu_relax();
        next += period_tsc;
        uint64_t seq = head.seq + 1;
        if (seq >= b->capacity) {
            gk_printf("guestkit: error: blk-log: the disk is full after %lu records\n", head.seq);
            return EXIT_FAILED;
        }
        const struct log_sector rec = { LOG_REC_MAGIC, seq, tag, head.tag };
        const struct log_sector next_head = { LOG_HEAD_MAGIC, seq, tag, 0 };
        const struct { uint64_t lba; const struct log_sector *what; } steps[] = { { seq, &rec }, { 0, &next_head } };
        for (unsigned int i = 0; i < ARRAY_SIZE(steps); i++) {
            s = blk_free_slot(b, 0);
            memset(s->data, 0, SECTOR_SIZE);
            memcpy(s->data, steps[i].what, sizeof *steps[i].what);
            if (blk_sync(b, 0, VIRTIO_BLK_T_OUT, steps[i].lba, SECTOR_SIZE, &s) != VIRTIO_BLK_S_OK)
                request_failed("blk-log", b, s);
            if (flush && blk_sync(b, 0, VIRTIO_BLK_T_FLUSH, 0, 0, &s) != VIRTIO_BLK_S_OK)
                request_failed("blk-log", b, s);
        }
        head = next_head;
        gk_printf("guestkit: blk-log seq %lu\n", seq);
    }
    gk_printf("guestkit: blk-log done n=%lu\n", n);
    return EXIT_OK;
}

/* ---- blk-seq ---- */

#define SEQ_MAGIC       0x5145534b47ull         /* "GKSEQ" little-endian */

/* What a checkpoint test reads from guest RAM at the address blk-seq prints. */
struct seq_state {
    uint64_t magic;             /* SEQ_MAGIC once the loop runs */
    volatile uint64_t n;        /* the number being written to the disk (0 before the first) */
    volatile uint64_t done;     /* the last number whose write completed */
};

/* blk-seq: writes 1, 2, 3... without pause, each into sector 0 of the disk (magic, number,
 * its complement), waiting for each write before the next, and keeps in RAM (struct seq_state,
 * at the address printed as `guestkit: blk-seq state=0xADDR`) the number it is writing (n) and
 * the last one written (done).  At any instant the disk holds n or n-1, and n once done == n:
 * RAM and disk saved at one instant must agree so (a restored guest goes on from where it was).
 * It starts from a disk that holds no number (else exit 3).  Prints `guestkit: blk-seq N` at
 * 1000, 2000...; n=COUNT ends after COUNT. */
int wl_blk_seq(int argc, char **argv)
{
    uint64_t disk = 0, n = 0, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "disk", .max = 255, .value = &disk },
        { .key = "n", .max = INT64_MAX, .value = &n },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("blk-seq", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    if (!at_least_1("blk-seq", "timeout", timeout))
        return EXIT_USAGE;
    gk_timeout_s = timeout;

    static struct blk_dev dev;
    static struct seq_state state;
    struct blk_dev *b = &dev;
    const struct blk_options opt = { .queues = 1, .qd = 1, .max_io = 4096 };
    blk_open(b, "blk-seq", (unsigned int)disk, &opt);

    struct blk_slot *s;
    if (blk_sync(b, 0, VIRTIO_BLK_T_IN, 0, SECTOR_SIZE, &s) != VIRTIO_BLK_S_OK)
        request_failed("blk-seq", b, s);
    uint64_t found[3];
    memcpy(found, s->data, sizeof found);
    if (found[0] == SEQ_MAGIC) {
        gk_printf("guestkit: error: blk-seq: the disk already holds number %lu from an earlier run\n", found[1]);
        return EXIT_FAILED;
    }
    state.magic = SEQ_MAGIC;
    gk_printf("guestkit: blk-seq state=0x%lx\n", (uint64_t)(uintptr_t)&state);

    for (uint64_t seq = 1; !n || seq <= n; seq++) {
        state.n = seq;
        s = blk_free_slot(b, 0);
        memset(s->data, 0, SECTOR_SIZE);
        const uint64_t rec[3] = { SEQ_MAGIC, seq, ~seq };
        memcpy(s->data, rec, sizeof rec);
        if (blk_sync(b, 0, VIRTIO_BLK_T_OUT, 0, SECTOR_SIZE, &s) != VIRTIO_BLK_S_OK)
            request_failed("blk-seq", b, s);
        state.done = seq;
        if (seq % 1000 == 0)
            gk_printf("guestkit: blk-seq %lu\n", seq);
    }
    gk_printf("guestkit: blk-seq done n=%lu\n", n);
    return EXIT_OK;
}
