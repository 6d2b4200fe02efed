/* guestkit workloads.  They run at CPL3 at native speed, even under PVM. */
#include "guest.h"
#include "virtio.h"

static bool no_args(const char *workload, int argc, char **argv)
{
    return parse_params(workload, argc, argv, NULL, 0);
}

int wl_hello(int argc, char **argv)
{
    if (!no_args("hello", argc, argv))
        return EXIT_USAGE;
    gk_printf("guestkit: hello\n");
    return EXIT_OK;
}

int wl_exit(int argc, char **argv)
{
    uint64_t code = 0;
    const struct param params[] = {
        { .key = "code", .required = true, .max = 255, .value = &code },
    };

    if (!parse_params("exit", argc, argv, params, 1))
        return EXIT_USAGE;
    gk_printf("guestkit: exit code=%lu\n", code);
    return (int)code;
}

/* floor(n * k / 10) without overflow */
static uint64_t milestone(uint64_t n, uint64_t k)
{
    return (n / 10) * k + (n % 10) * k / 10;
}

int wl_count(int argc, char **argv)
{
    uint64_t n = 0;
    const struct param params[] = {
        { .key = "n", .required = true, .max = INT64_MAX, .value = &n },
    };

    if (!parse_params("count", argc, argv, params, 1))
        return EXIT_USAGE;

    /* report at n/10, 2n/10, ..., n; at every step when n < 10 */
    uint64_t k = 1;
    uint64_t next = n < 10 ? 1 : milestone(n, 1);
    for (uint64_t i = 1; i <= n; i++) {
        __asm__ volatile("" : "+r"(i));     /* the compiler may not fold the loop */
        if (__builtin_expect(i == next, 0)) {
            gk_printf("guestkit: count %lu/%lu\n", i, n);
            k++;
            next = n < 10 ? i + 1 : milestone(n, k);
        }
    }
    gk_printf("guestkit: count done n=%lu\n", n);
    return EXIT_OK;
}

/* one word per 8 bytes, derived from its address and the seed: a moved or lost page shows */
uint64_t pattern_value(uint64_t addr, uint64_t seed)
{
    uint64_t x = addr * 0x9e3779b97f4a7c15ull ^ seed;
    x ^= x >> 29;
    return x * 0xbf58476d1ce4e5b9ull;
}

int wl_pattern(int argc, char **argv)
{
    uint64_t size = 0, rounds = 1, seed = 1;
    const struct param params[] = {
        { .key = "size", .size = true, .required = true, .max = FOUR_GIB, .value = &size },
        { .key = "rounds", .required = false, .max = 1000000, .value = &rounds },
        { .key = "seed", .required = false, .max = UINT64_MAX, .value = &seed },
    };

    if (!parse_params("pattern", argc, argv, params, 3))
        return EXIT_USAGE;
    uint64_t base = ram_area_base();
    if (!ram_area_fits(base, size)) {
        gk_printf("guestkit: error: pattern region of %lu bytes at 0x%lx does not fit in guest RAM\n",
                  size, base);
        return EXIT_USAGE;
    }
    uint64_t words = size / 8;
    for (uint64_t i = 0; i < words; i++) {
        uint64_t addr = base + i * 8;
        *(volatile uint64_t *)(uintptr_t)addr = pattern_value(addr, seed);
    }
    gk_printf("guestkit: pattern written size=%lu base=0x%lx\n", size, base);
    for (uint64_t round = 1; round <= rounds; round++) {
        for (uint64_t i = 0; i < words; i++) {
            uint64_t addr = base + i * 8;
            uint64_t v = *(volatile uint64_t *)(uintptr_t)addr;
            if (v != pattern_value(addr, seed)) {
                gk_printf("guestkit: error: pattern: round %lu: 0x%lx holds 0x%lx, not 0x%lx\n",
                          round, addr, v, pattern_value(addr, seed));
                return EXIT_FAILED;
            }
        }
        gk_printf("guestkit: pattern round %lu\n", round);
    }
    gk_printf("guestkit: pattern done rounds=%lu\n", rounds);
    return EXIT_OK;
}

/* A byte arrived on COM1 (LSR data ready): read it and return true. */
static bool serial_byte_arrived(void)
{
    if (!(inb(SERIAL_LSR) & SERIAL_LSR_DR))
        return false;
    (void)inb(SERIAL_PORT);
    return true;
}

/* Reads the first word of every page of [start, end) and checks it against the pattern. */
static void touch_check(uint64_t start, uint64_t end, uint64_t seed)
{
    for (uint64_t addr = start; addr < end; addr += PAGE_SIZE) {
        uint64_t v = *(volatile uint64_t *)(uintptr_t)addr;
        if (v != pattern_value(addr, seed))
            gk_fail("restore-touch: 0x%lx holds 0x%lx, not 0x%lx", addr, v, pattern_value(addr, seed));
    }
}

/*
 * For save/restore benchmarks: fill RAM with the pattern, then wait for a byte on the serial
 * port (a VMM is saved while it waits, and the restored one is sent the byte); print a line at
 * once, read the working set (the last `touch` bytes of the filled region) a page at a time,
 * timing it with the TSC, report, and wait for one more byte before exiting.
 */
int wl_restore_touch(int argc, char **argv)
{
    uint64_t fill = 0, touch = 64ull << 20, busy = 0, seed = 1;
    const struct param params[] = {
        { .key = "fill", .size = true, .required = true, .max = FOUR_GIB, .value = &fill },
        { .key = "touch", .size = true, .required = false, .max = FOUR_GIB, .value = &touch },
        { .key = "busy", .required = false, .max = 1, .value = &busy },
        { .key = "seed", .required = false, .max = UINT64_MAX, .value = &seed },
    };

    if (!parse_params("restore-touch", argc, argv, params, 4))
        return EXIT_USAGE;
    uint64_t base = ram_area_base();
    fill &= ~(PAGE_SIZE - 1);
    touch &= ~(PAGE_SIZE - 1);
    if (!ram_area_fits(base, fill)) {
        gk_printf("guestkit: error: restore-touch: fill=%lu at 0x%lx does not fit in guest RAM\n", fill, base);
        return EXIT_USAGE;
    }
    if (touch == 0 || touch > fill) {
        gk_printf("guestkit: error: restore-touch: touch=%lu must be from 4K up to fill=%lu\n", touch, fill);
        return EXIT_USAGE;
    }
    time_init();
    for (uint64_t addr = base; addr < base + fill; addr += 8)
        *(volatile uint64_t *)(uintptr_t)addr = pattern_value(addr, seed);
    uint64_t ws = base + fill - touch, ws_end = base + fill;
    gk_printf("guestkit: restore-touch ready fill=%lu touch=%lu base=0x%lx ws=0x%lx\n", fill, touch, base, ws);

    /*
     * Wait. busy=0 looks at the port every ~20 us and does nothing else; busy=1 reads the
     * working set round and round, looking at the port after every 64 KiB.
     */
    uint64_t at = ws, pause = tsc_hz / 50000;
    for (;;) {
        if (serial_byte_arrived())
            break;
        if (busy) {
            touch_check(at, at + (64u << 10) < ws_end ? at + (64u << 10) : ws_end, seed);
            at = at + (64u << 10) < ws_end ? at + (64u << 10) : ws;
        } else {
            uint64_t until = rdtsc() + pause;
            while (rdtsc() < until)
                cpu_relax();
        }
    }
    gk_printf("guestkit: restore-touch resumed\n");
    uint64_t t0 = rdtsc();
    touch_check(ws, ws_end, seed);
    uint64_t ns = tsc_to_ns(rdtsc() - t0);
    gk_printf("guestkit: restore-touch touched bytes=%lu pages=%lu ns=%lu\n", touch, touch / 4096, ns);
    while (!serial_byte_arrived())
        cpu_relax();
    gk_printf("guestkit: restore-touch done\n");
    return EXIT_OK;
}

/* Checks every word of [base, base+size) against the pattern; prints the first that differs. */
static bool touch_region_check(const char *what, uint64_t base, uint64_t size, uint64_t seed)
{
    for (uint64_t addr = base; addr < base + size; addr += 8) {
        uint64_t v = *(volatile uint64_t *)(uintptr_t)addr;
        if (v != pattern_value(addr, seed)) {
            gk_printf("guestkit: error: touch: %s region: 0x%lx holds 0x%lx, not 0x%lx\n",
                      what, addr, v, pattern_value(addr, seed));
            return false;
        }
    }
    return true;
}

/*
 * touch: a known working set.  Writes the pattern over an "old" region (touched before the
 * `ready` line, then not again until the final check) and a "hot" region, then touches every
 * page of the hot region (reads its first word, checks it, writes it back) once per round, with
 * a pause between rounds; at the end checks both regions whole.
 */
int wl_touch(int argc, char **argv)
{
    uint64_t size = 0, before = 0, rounds = 100, period = 10, seed = 1;
    const struct param params[] = {
        { .key = "size", .size = true, .required = true, .max = FOUR_GIB, .value = &size },
        { .key = "before", .size = true, .required = false, .max = FOUR_GIB, .value = &before },
        { .key = "rounds", .required = false, .max = 100000000, .value = &rounds },
        { .key = "period", .required = false, .max = 3600000, .value = &period },
        { .key = "seed", .required = false, .max = UINT64_MAX, .value = &seed },
    };

    if (!parse_params("touch", argc, argv, params, 5))
        return EXIT_USAGE;
    if (size == 0 || size % PAGE_SIZE != 0 || before % PAGE_SIZE != 0) {
        gk_printf("guestkit: error: touch: size=%lu and before=%lu must be multiples of 4096 (size not 0)\n",
                  size, before);
        return EXIT_USAGE;
    }
    uint64_t old = ram_area_base();
    uint64_t hot = old + ((before + HUGE_PAGE_SIZE - 1) & ~(HUGE_PAGE_SIZE - 1));
    if (!ram_area_fits(old, hot - old + size)) {
        gk_printf("guestkit: error: touch regions of %lu and %lu bytes at 0x%lx do not fit in guest RAM\n",
                  before, size, old);
        return EXIT_USAGE;
    }
    time_init();
    for (uint64_t addr = old; addr < old + before; addr += 8)
        *(volatile uint64_t *)(uintptr_t)addr = pattern_value(addr, seed);
    for (uint64_t addr = hot; addr < hot + size; addr += 8)
        *(volatile uint64_t *)(uintptr_t)addr = pattern_value(addr, seed);
    gk_printf("guestkit: touch old=0x%lx+%lu hot=0x%lx+%lu ready\n", old, before, hot, size);

    uint64_t period_tsc = period * (tsc_hz / 1000);
    uint64_t k = 1, next = rounds < 10 ? 1 : milestone(rounds, 1);
    for (uint64_t round = 1; round <= rounds; round++) {
        for (uint64_t addr = hot; addr < hot + size; addr += PAGE_SIZE) {
            volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)addr;
            uint64_t v = *p;
            if (v != pattern_value(addr, seed)) {
                gk_printf("guestkit: error: touch: round %lu: 0x%lx holds 0x%lx, not 0x%lx\n",
                          round, addr, v, pattern_value(addr, seed));
                return EXIT_FAILED;
            }
            *p = v;
        }
        if (round == next) {
            gk_printf("guestkit: touch round %lu/%lu\n", round, rounds);
            k++;
            next = rounds < 10 ? round + 1 : milestone(rounds, k);
        }
        uint64_t until = rdtsc() + period_tsc;      /* from now: a pause of the VM is not made up */
        while (!deadline_passed(until))
            __asm__ volatile("pause");
    }
    if (!touch_region_check("old", old, before, seed) || !touch_region_check("hot", hot, size, seed))
        return EXIT_FAILED;
    gk_printf("guestkit: touch done rounds=%lu\n", rounds);
    return EXIT_OK;
}

static uint64_t dirty_value(uint64_t addr, uint64_t pass)
{
    return addr ^ ((pass + 1) * 0x9e3779b97f4a7c15ull);
}

int wl_dirty(int argc, char **argv)
{
    uint64_t size = 0, passes = 1;
    const struct param params[] = {
        { .key = "size", .size = true, .required = true, .max = FOUR_GIB, .value = &size },
        { .key = "passes", .required = false, .max = 1000000, .value = &passes },
    };

    if (!parse_params("dirty", argc, argv, params, 2))
        return EXIT_USAGE;

    /* first 2 MiB boundary at or above the end of the image */
    uint64_t base = ram_area_base();
    bool fits = ram_area_fits(base, size);
    if (!fits) {
        gk_printf("guestkit: error: dirty region of %lu bytes at 0x%lx does not fit in guest RAM\n",
                  size, base);
        return EXIT_USAGE;
    }

    uint64_t npages = (size + PAGE_SIZE - 1) / PAGE_SIZE;
    for (uint64_t pass = 0; pass < passes; pass++)
        for (uint64_t pg = 0; pg < npages; pg++) {
            uint64_t addr = base + pg * PAGE_SIZE;
            *(volatile uint64_t *)(uintptr_t)addr = dirty_value(addr, pass);
        }

    /* count the pages that hold the last pass's value */
    uint64_t pages = 0;
    if (passes > 0)
        for (uint64_t pg = 0; pg < npages; pg++) {
            uint64_t addr = base + pg * PAGE_SIZE;
            if (*(volatile uint64_t *)(uintptr_t)addr == dirty_value(addr, passes - 1))
                pages++;
        }
    if (passes > 0 && pages != npages) {
        gk_printf("guestkit: error: dirty: only %lu of %lu pages hold the value written\n",
                  pages, npages);
        return EXIT_FAILED;
    }

    gk_printf("guestkit: dirty size=%lu passes=%lu pages=%lu base=0x%lx\n",
              size, passes, pages, base);
    return EXIT_OK;
}

int wl_fault(int argc, char **argv)
{
    if (!no_args("fault", argc, argv))
        return EXIT_USAGE;
    gk_printf("guestkit: fault: causing a triple fault\n");
    gk_triple_fault();
}

/* Not a test contract: prints what the VMM handed over, for debugging. */
int wl_info(int argc, char **argv)
{
    if (!no_args("info", argc, argv))
        return EXIT_USAGE;

    const struct hvm_start_info *si = start_info;
    gk_printf("guestkit: info image=0x%lx-0x%lx\n",
              (uint64_t)(uintptr_t)__image_start, (uint64_t)(uintptr_t)__image_end);
    if (!si) {
        gk_printf("guestkit: info no start_info\n");
        return EXIT_OK;
    }
    gk_printf("guestkit: info start_info=%p version=%u flags=0x%x nr_modules=%u rsdp=0x%lx\n",
              (const void *)si, si->version, si->flags, si->nr_modules, si->rsdp_paddr);
    gk_printf("guestkit: info cmdline=0x%lx\n", si->cmdline_paddr);
    if (si->version >= 1 && si->memmap_paddr && si->memmap_paddr < FOUR_GIB) {
        const struct hvm_memmap_table_entry *map = (const void *)(uintptr_t)si->memmap_paddr;
        for (uint32_t i = 0; i < si->memmap_entries; i++)
            gk_printf("guestkit: info memmap %u: 0x%lx-0x%lx type %u\n",
                      i, map[i].addr, map[i].addr + map[i].size, map[i].type);
    }
    return EXIT_OK;
}

/*
 * Not a test contract: lists PCI bus 0 with the memory BARs (address+size).  With
 * unassign=1 it first clears the memory BARs of every virtio function,
 * lets pci_enable_memory() place them again and resets each such device
 * through its new BARs: a check of the kit's own BAR placement.
 */
int wl_pci(int argc, char **argv)
{
    uint64_t unassign = 0, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "unassign", .max = 1, .value = &unassign },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("pci", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    gk_timeout_s = timeout;
    time_init();

    struct pci_dev *list;
    int n = pci_devices(&list);
    for (int i = 0; i < n; i++) {
        struct pci_dev *d = &list[i];
        if (!unassign || d->vendor != VIRTIO_PCI_VENDOR)
            continue;
        pci_write16(d, PCI_COMMAND, (uint16_t)(pci_read16(d, PCI_COMMAND) & ~PCI_COMMAND_MEMORY));
        for (int b = 0; b < d->nbars; b++)
            if (!d->bar[b].io)
                pci_write32(d, (uint16_t)(PCI_BAR0 + 4 * b), 0);
        /* features read through the new BAR must include VERSION_1 */
        struct virtio_dev vd;
        if (!virtio_probe(&vd, d) || !virtio_reset(&vd) || !virtio_negotiate(&vd, 0) ||
            !virtio_reset(&vd))
            return EXIT_FAILED;
    }
    for (int i = 0; i < n; i++) {
        struct pci_dev *d = &list[i];
        pci_size_bars(d);
        gk_printf("guestkit: pci %02x:%02x.%x id=%04x:%04x class=%06x cmd=0x%x", d->bus, d->dev,
                  d->fn, d->vendor, d->device, d->class_rev >> 8, pci_read16(d, PCI_COMMAND));
        for (int b = 0; b < d->nbars; b++) {
            const struct pci_bar *bar = &d->bar[b];
            if (bar->io)
                gk_printf(" bar%d=io", b);
            else if (bar->size)
                gk_printf(" bar%d=0x%lx+0x%lx%s", b, bar->addr, bar->size, bar->is64 ? "/64" : "");
            if (bar->is64)
                b++;
        }
        gk_printf("\n");
    }
    return EXIT_OK;
}

/* reset: asks the i8042 keyboard controller to pulse the reset line (command 0xFE on port 0x64),
 * as Linux's reboot=k does.  The VMM should end (or reset) the VM; if the vCPU is still running a
 * second later, that is an error. */
int wl_reset(int argc, char **argv)
{
    if (!no_args("reset", argc, argv))
        return EXIT_USAGE;
    time_init();
    gk_printf("guestkit: reset: pulsing the i8042 reset line\n");
    outb(0x64, 0xfe);
    uint64_t deadline = deadline_after_s(1);
    while (!deadline_passed(deadline))
        __asm__ volatile("pause");
    gk_printf("guestkit: error: reset: still running 1 s after the i8042 reset command\n");
    return EXIT_FAILED;
}

static uint8_t cmos_read(uint8_t reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static unsigned int from_bcd(uint8_t v, bool binary)
{
    return binary ? v : (unsigned int)(v >> 4) * 10 + (v & 0x0f);
}

/* rtc: reads the CMOS real-time clock (waiting out an update in progress, reading twice until
 * two reads agree) and prints it as `guestkit: rtc YYYY-MM-DD HH:MM:SS`. */
int wl_rtc(int argc, char **argv)
{
    if (!no_args("rtc", argc, argv))
        return EXIT_USAGE;
    uint8_t a[7], b[7];
    static const uint8_t regs[7] = { 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32 };
    time_init();
    uint64_t deadline = deadline_after_s(2);    /* an update takes at most ~2 ms */
    for (int tries = 0;; tries++) {
        while (cmos_read(0x0a) & 0x80)
            if (deadline_passed(deadline)) {
                gk_printf("guestkit: error: rtc: the clock stays in an update (status A bit 7; "
                          "no RTC at port 0x70?)\n");
                return EXIT_FAILED;
            }
        for (int i = 0; i < 7; i++)
            a[i] = cmos_read(regs[i]);
        for (int i = 0; i < 7; i++)
            b[i] = cmos_read(regs[i]);
        if (!memcmp(a, b, sizeof(a)))
            break;
        if (tries == 100) {
            gk_printf("guestkit: error: rtc: the clock never read the same twice\n");
            return EXIT_FAILED;
        }
    }
    uint8_t status_b = cmos_read(0x0b);
    bool binary = status_b & 0x04, h24 = status_b & 0x02;
    unsigned int hour = from_bcd(a[2] & 0x7f, binary);
    if (!h24 && (a[2] & 0x80))
        hour = hour % 12 + 12;
    gk_printf("guestkit: rtc %02u%02u-%02u-%02u %02u:%02u:%02u\n",
              from_bcd(a[6], binary), from_bcd(a[5], binary), from_bcd(a[4], binary),
              from_bcd(a[3], binary), hour, from_bcd(a[1], binary), from_bcd(a[0], binary));
    return EXIT_OK;
}
