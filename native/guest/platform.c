/*
 * guestkit platform workloads: what the VMM tells the guest about its CPU (cpuid), the ACPI
 * power-off path an OS takes (poweroff) and the ACPI power button (tick).  All run at CPL3: CPUID
 * is unprivileged, the ACPI tables sit in identity-mapped RAM below 4 GiB, and the PM1 registers
 * are I/O ports (IOPL=3).
 */
#include "guest.h"

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void print_leaf(uint32_t leaf, uint32_t sub)
{
    uint32_t r[4];
    cpuid(leaf, sub, r);
    gk_printf("guestkit: cpuid %08x.%u eax=%08x ebx=%08x ecx=%08x edx=%08x\n", leaf, sub, r[0], r[1], r[2], r[3]);
}

/* cpuid: prints the leaves that carry topology, features and the hypervisor's identity, one
 * line each as `guestkit: cpuid LLLLLLLL.S eax=.. ebx=.. ecx=.. edx=..`. */
int wl_cpuid(int argc, char **argv)
{
    if (!parse_params("cpuid", argc, argv, NULL, 0))
        return EXIT_USAGE;
    uint32_t r[4];
    cpuid(0, 0, r);
    uint32_t max_basic = r[0];
    static const uint32_t basic[][2] = {
        { 0, 0 }, { 1, 0 }, { 4, 0 }, { 4, 1 }, { 4, 2 }, { 4, 3 }, { 6, 0 }, { 7, 0 }, { 0xa, 0 },
        { 0xb, 0 }, { 0xb, 1 }, { 0xb, 2 }, { 0xd, 0 }, { 0xd, 1 }, { 0x1f, 0 }, { 0x1f, 1 }, { 0x1f, 2 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(basic); i++)
        if (basic[i][0] <= max_basic)
            print_leaf(basic[i][0], basic[i][1]);
    cpuid(0x40000000, 0, r);
    if (r[0] >= 0x40000000 && r[0] < 0x40010000)
        for (uint32_t leaf = 0x40000000; leaf <= r[0] && leaf <= 0x40000001; leaf++)
            print_leaf(leaf, 0);
    cpuid(0x80000000, 0, r);
    uint32_t max_ext = r[0];
    static const uint32_t ext[] = { 0x80000000, 0x80000001, 0x80000008, 0x8000001e };
    for (size_t i = 0; i < ARRAY_SIZE(ext); i++)
        if (ext[i] <= max_ext)
            print_leaf(ext[i], 0);
    gk_printf("guestkit: cpuid done\n");
    return EXIT_OK;
}

struct sdt_header {
    char signature[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem[6];
    char oem_table[8];
    uint32_t oem_revision;
    uint32_t creator;
    uint32_t creator_revision;
} __attribute__((packed));

static bool sum_ok(const void *p, uint32_t len)
{
    uint8_t s = 0;
    for (uint32_t i = 0; i < len; i++)
        s = (uint8_t)(s + ((const uint8_t *)p)[i]);
    return s == 0;
}

/* A table at a physical address, checked: below 4 GiB, sane length, checksum.  Errors name the
 * workload `who`. */
static const struct sdt_header *table_at(const char *who, uint64_t addr, const char *what)
{
    if (!addr || addr >= FOUR_GIB - sizeof(struct sdt_header)) {
        gk_printf("guestkit: error: %s: %s at 0x%lx is not in low memory\n", who, what, addr);
        return NULL;
    }
    const struct sdt_header *h = (const void *)(uintptr_t)addr;
    if (h->length < sizeof(*h) || h->length > (1u << 20) || !sum_ok(h, h->length)) {
        gk_printf("guestkit: error: %s: %s at 0x%lx: bad length %u or checksum\n", who, what, addr, h->length);
        return NULL;
    }
    return h;
}

/* The SLP_TYP of \_S5 from the DSDT's AML: NameOp "_S5_" PackageOp PkgLength NumElements, then
 * the first element as a BytePrefix constant, Zero or One. */
static int s5_sleep_type(const struct sdt_header *dsdt)
{
    const uint8_t *p = (const uint8_t *)dsdt, *end = p + dsdt->length;
    for (const uint8_t *q = p + sizeof(*dsdt); q + 4 <= end; q++) {
        if (q[0] != '_' || q[1] != 'S' || q[2] != '5' || q[3] != '_')
            continue;
        const uint8_t *x = q + 4;
        if (x >= end || *x != 0x12)             /* PackageOp */
            continue;
        x++;
        if (x >= end)
            break;
        x += 1 + (*x >> 6);                     /* PkgLength: 1 + the count in bits 6-7 */
        x++;                                    /* NumElements */
        if (x >= end)
            break;
        if (*x == 0x0a && x + 1 < end)          /* BytePrefix */
            return x[1];
        if (*x == 0x00 || *x == 0x01)           /* ZeroOp, OneOp */
            return *x;
        return -1;
    }
    return -1;
}

/* What the kit takes from the FADT and the DSDT to power off, and to watch the power button. */
struct acpi_pm {
    uint32_t pm1a_cnt;          /* PM1a_CNT_BLK (I/O port) */
    uint32_t pm1a_evt;          /* PM1a_EVT_BLK (I/O port; 0 if none) */
    uint8_t pm1_evt_len;        /* PM1_EVT_LEN: PM1_STS, then PM1_EN at + len/2 */
    int slp_typ;                /* \_S5's first SLP_TYP value */
};

/* FADT offsets (ACPI 6.x, 5.2.9) */
#define FADT_DSDT               40
#define FADT_PM1A_EVT_BLK       56
#define FADT_PM1A_CNT_BLK       64
#define FADT_PM1_EVT_LEN        88
#define FADT_X_DSDT             140
#define FADT_V1_LENGTH          116     /* ACPI 1.0: up to the flags */

/* The ACPI tables an OS reads to power off: RSDP (from hvm_start_info) -> XSDT (or RSDT) -> FADT
 * (PM1a_CNT_BLK, PM1a_EVT_BLK, PM1_EVT_LEN, X_DSDT) -> the DSDT's \_S5; an ACPI 1.0 RSDP leads to
 * the RSDT instead of the XSDT.  Errors are printed with `who` as the prefix.  Returns EXIT_OK;
 * EXIT_USAGE when the FADT has no PM1a control block (hardware-reduced ACPI) or, with need_evt,
 * no usable PM1a event block; EXIT_FAILED for missing or broken tables. */
static int acpi_pm_find(const char *who, bool need_evt, struct acpi_pm *pm)
{
    if (!start_info || !start_info->rsdp_paddr) {
        gk_printf("guestkit: error: %s: no RSDP in hvm_start_info\n", who);
        return EXIT_FAILED;
    }
    /* ACPI 2.0+ (revision >= 2): the XSDT with 64-bit entries; ACPI 1.0 (QEMU's pc and q35 give
     * one): the RSDT with 32-bit entries */
    const uint8_t *rsdp = (const void *)(uintptr_t)start_info->rsdp_paddr;
    bool v2 = rsdp[15] >= 2;
    if (rsdp[0] != 'R' || rsdp[1] != 'S' || rsdp[2] != 'D' || rsdp[3] != ' ' || !sum_ok(rsdp, 20) ||
        (v2 && !sum_ok(rsdp, *(const uint32_t *)(rsdp + 20)))) {
        gk_printf("guestkit: error: %s: no valid ACPI RSDP at 0x%lx\n", who, start_info->rsdp_paddr);
        return EXIT_FAILED;
    }
    const char *sdt_name = v2 ? "XSDT" : "RSDT";
    uint32_t entry_size = v2 ? 8 : 4;
    const struct sdt_header *sdt =
        table_at(who, v2 ? *(const uint64_t *)(rsdp + 24) : *(const uint32_t *)(rsdp + 16), sdt_name);
    if (!sdt)
        return EXIT_FAILED;
    const struct sdt_header *fadt = NULL;
    const uint8_t *entries = (const uint8_t *)sdt + sizeof(*sdt);
    for (uint32_t i = 0; i + entry_size <= sdt->length - sizeof(*sdt); i += entry_size) {
        uint64_t addr = v2 ? *(const uint64_t *)(entries + i) : *(const uint32_t *)(entries + i);
        const struct sdt_header *t = table_at(who, addr, v2 ? "XSDT entry" : "RSDT entry");
        if (!t)
            return EXIT_FAILED;
        if (t->signature[0] == 'F' && t->signature[1] == 'A' && t->signature[2] == 'C' && t->signature[3] == 'P')
            fadt = t;
    }
    if (!fadt || fadt->length < FADT_V1_LENGTH) {
        gk_printf("guestkit: error: %s: no FADT in the %s\n", who, sdt_name);
        return EXIT_FAILED;
    }
    const uint8_t *f = (const uint8_t *)fadt;
    pm->pm1a_cnt = *(const uint32_t *)(f + FADT_PM1A_CNT_BLK);
    pm->pm1a_evt = *(const uint32_t *)(f + FADT_PM1A_EVT_BLK);
    pm->pm1_evt_len = f[FADT_PM1_EVT_LEN];
    uint64_t dsdt_addr = fadt->length >= FADT_X_DSDT + 8 ? *(const uint64_t *)(f + FADT_X_DSDT) : 0;
    if (!dsdt_addr)
        dsdt_addr = *(const uint32_t *)(f + FADT_DSDT);
    if (need_evt && !pm->pm1a_evt) {
        gk_printf("guestkit: error: %s: the FADT has no PM1a event block (hardware-reduced ACPI)\n", who);
        return EXIT_USAGE;
    }
    if (need_evt && (pm->pm1_evt_len < 4 || (pm->pm1_evt_len & 1) || pm->pm1a_evt + pm->pm1_evt_len > 0x10000)) {
        gk_printf("guestkit: error: %s: the FADT's PM1a event block (PM1a_EVT_BLK=0x%x PM1_EVT_LEN=%u) "
                  "is not a usable I/O port range\n", who, pm->pm1a_evt, pm->pm1_evt_len);
        return EXIT_USAGE;
    }
    if (!pm->pm1a_cnt || pm->pm1a_cnt > 0xfffe) {
        gk_printf("guestkit: error: %s: the FADT has no PM1a control block (hardware-reduced ACPI)\n", who);
        return EXIT_USAGE;
    }
    const struct sdt_header *dsdt = table_at(who, dsdt_addr, "DSDT");
    if (!dsdt)
        return EXIT_FAILED;
    pm->slp_typ = s5_sleep_type(dsdt);
    if (pm->slp_typ < 0 || pm->slp_typ > 7) {
        gk_printf("guestkit: error: %s: the DSDT has no \\_S5 package\n", who);
        return EXIT_FAILED;
    }
    return EXIT_OK;
}

/* Enters S5: prints `guestkit: poweroff: PM1a_CNT=0xPORT SLP_TYP=N`, writes SLP_TYP and then
 * SLP_TYP | SLP_EN to PM1a_CNT.  The VMM should end the VM; returns EXIT_FAILED (after printing
 * the error) if the vCPU still runs a second later.  Needs time_init(). */
static int acpi_enter_s5(const struct acpi_pm *pm)
{
    gk_printf("guestkit: poweroff: PM1a_CNT=0x%x SLP_TYP=%d\n", pm->pm1a_cnt, pm->slp_typ);
    uint16_t cnt = inw((uint16_t)pm->pm1a_cnt);
    if (!(cnt & 1))
        gk_printf("guestkit: poweroff: warning: SCI_EN is clear (the platform is not in ACPI mode)\n");
    cnt = (uint16_t)((cnt & ~(7u << 10)) | ((unsigned)pm->slp_typ << 10));
    outw((uint16_t)pm->pm1a_cnt, cnt);
    outw((uint16_t)pm->pm1a_cnt, (uint16_t)(cnt | (1u << 13)));
    uint64_t deadline = deadline_after_s(1);
    while (!deadline_passed(deadline))
        __asm__ volatile("pause");
    gk_printf("guestkit: error: poweroff: still running 1 s after SLP_EN\n");
    return EXIT_FAILED;
}

/* poweroff: powers the VM off the way an ACPI OS does: RSDP (from hvm_start_info) -> XSDT (or
 * RSDT) -> FADT -> PM1a_CNT_BLK and the DSDT's \_S5, then writes SLP_TYP | SLP_EN to PM1a_CNT.  The VMM
 * should end the VM; if the vCPU still runs a second later, that is an error. */
int wl_poweroff(int argc, char **argv)
{
    if (!parse_params("poweroff", argc, argv, NULL, 0))
        return EXIT_USAGE;
    time_init();
    struct acpi_pm pm;
    int status = acpi_pm_find("poweroff", false, &pm);
    if (status != EXIT_OK)
        return status;
    return acpi_enter_s5(&pm);
}

#define PM1_PWRBTN              (1u << 8)       /* PWRBTN_STS in PM1_STS, PWRBTN_EN in PM1_EN */
#define TICK_POLL_MS            1

/* tick: prints `guestkit: tick N` every `period` ms of TSC time.  With pwrbtn=1 it arms the ACPI
 * fixed power button (PWRBTN_EN in PM1a_EN) and polls PWRBTN_STS between ticks; a press powers
 * the VM off as `poweroff` does.  n=COUNT ends after COUNT ticks, timeout=S fails after S s. */
int wl_tick(int argc, char **argv)
{
    uint64_t period = 100, n = 0, pwrbtn = 1, timeout = 0, fill = 0;
    const struct param params[] = {
        { .key = "period", .max = 3600000, .value = &period },
        { .key = "n", .max = INT64_MAX, .value = &n },
        { .key = "pwrbtn", .max = 1, .value = &pwrbtn },
        { .key = "timeout", .max = 86400, .value = &timeout },
        { .key = "fill", .size = true, .max = FOUR_GIB, .value = &fill },
    };

    if (!parse_params("tick", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    if (!period) {
        gk_printf("guestkit: error: bad argument 'period=0' for tick\n");
        return EXIT_USAGE;
    }
    /* fill: RAM that is not zero pages, for a VMM that moves or hands over guest memory */
    if (fill) {
        uint64_t base = ram_area_base();
        fill &= ~(PAGE_SIZE - 1);
        if (!ram_area_fits(base, fill)) {
            gk_printf("guestkit: error: tick: fill=%lu at 0x%lx does not fit in guest RAM\n", fill, base);
            return EXIT_USAGE;
        }
        for (uint64_t addr = base; addr < base + fill; addr += 8)
            *(volatile uint64_t *)(uintptr_t)addr = pattern_value(addr, 1);
        gk_printf("guestkit: tick filled %lu bytes at 0x%lx\n", fill, base);
    }
    time_init();

    struct acpi_pm pm = { 0 };
    uint16_t pm1_sts = 0;
    if (pwrbtn) {
        int status = acpi_pm_find("tick", true, &pm);
        if (status != EXIT_OK)
            return status;
        pm1_sts = (uint16_t)pm.pm1a_evt;
        uint16_t pm1_en = (uint16_t)(pm.pm1a_evt + pm.pm1_evt_len / 2);
        outw(pm1_sts, PM1_PWRBTN);                      /* write 1 to clear; other bits 0: untouched */
        outw(pm1_en, (uint16_t)(inw(pm1_en) | PM1_PWRBTN));
        gk_printf("guestkit: tick pwrbtn armed PM1a_EVT=0x%x\n", pm.pm1a_evt);
    }

    uint64_t period_tsc = muldiv64(period, tsc_hz, 1000);
    uint64_t poll_tsc = muldiv64(TICK_POLL_MS, tsc_hz, 1000);
    uint64_t now = rdtsc();
    uint64_t next_tick = now + period_tsc, next_poll = now;
    uint64_t end = timeout ? deadline_after_s(timeout) : UINT64_MAX;
    uint64_t ticks = 0;
    for (;;) {
        now = rdtsc();
        if (pwrbtn && now >= next_poll) {
            next_poll = now + poll_tsc;
            if (inw(pm1_sts) & PM1_PWRBTN) {
                outw(pm1_sts, PM1_PWRBTN);
                gk_printf("guestkit: tick pwrbtn pressed after %lu ticks\n", ticks);
                return acpi_enter_s5(&pm);
            }
        }
        if (now >= next_tick) {
            ticks++;
            gk_printf("guestkit: tick %lu\n", ticks);
            if (n && ticks == n) {
                gk_printf("guestkit: tick done n=%lu\n", n);
                return EXIT_OK;
            }
            /* the next tick a period after this one was due; after a gap of more than a period
             * (the vCPU did not run), a period from now: missed ticks are not made up */
            next_tick += period_tsc;
            if (next_tick <= now)
                next_tick = now + period_tsc;
        }
        if (now >= end) {
            gk_printf("guestkit: error: tick: timeout after %lu s\n", timeout);
            return EXIT_FAILED;
        }
        cpu_relax();
    }
}
