/* guestkit: shared declarations.  All C code runs at CPL3 with IOPL=3. */
#ifndef GUESTKIT_GUEST_H
#define GUESTKIT_GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define noreturn __attribute__((noreturn))

/* PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h) */
#define HVM_START_MAGIC 0x336ec578u

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;      /* version >= 1 */
    uint32_t memmap_entries;    /* version >= 1 */
    uint32_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;              /* 1 = RAM */
    uint32_t reserved;
};

#define HVM_MEMMAP_TYPE_RAM 1

/* The gate into CPL0 (start.S): int $0x80, function number in %eax. */
#define GATE_VECTOR             0x80
#define GATE_PARK               0
#define GATE_TRIPLE_FAULT       1
#define GATE_IRQ_ENABLE         2       /* return to CPL3 with RFLAGS.IF = 1 */
#define GATE_IRQ_DISABLE        3       /* return to CPL3 with RFLAGS.IF = 0 */

/* Device interrupts: IDT vectors IRQ_VECTOR_BASE + n, n < IRQ_VECTORS (start.S) */
#define IRQ_VECTOR_BASE         0x40
#define IRQ_VECTORS             16
#define IRQ_SPURIOUS_VECTOR     0xff

/*
 * Legacy INTx through the IOAPIC (level-triggered): one more vector right
 * after the MSI-X ones, counted in gk_irq_count[IRQ_INTX_SLOT].  Its handler
 * reads the byte at gk_intx_isr (a virtio ISR register, which deasserts the
 * line) before it writes EOI; CPL3 sets gk_intx_isr before it routes the pin.
 */
#define IRQ_INTX_SLOT           IRQ_VECTORS
#define IRQ_INTX_VECTOR         (IRQ_VECTOR_BASE + IRQ_INTX_SLOT)
#define IRQ_COUNTERS            (IRQ_VECTORS + 1)

/* gk_irq_count[n]: interrupts taken on vector IRQ_VECTOR_BASE + n (start.S) */
extern volatile uint64_t gk_irq_count[IRQ_COUNTERS];
extern volatile uint64_t gk_intx_isr;

/* Ports */
#define SERIAL_PORT             0x3f8
#define SERIAL_LSR              (SERIAL_PORT + 5)
#define SERIAL_LSR_DR           0x01
#define SERIAL_LSR_THRE         0x20
#define DEBUG_EXIT_PORT         0xf4

/* Exit statuses */
#define EXIT_OK                 0
#define EXIT_USAGE              2       /* bad command line, region does not fit */
#define EXIT_FAILED             3       /* self-check failed, unexpected exception */

/* Linker symbols */
extern char __image_start[], __image_end[];

static inline void outb(uint16_t port, uint8_t val)
{
    __asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t val;
    __asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port) : "memory");
    return val;
}

static inline void outw(uint16_t port, uint16_t val)
{
    __asm__ volatile("outw %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t val;
    __asm__ volatile("inw %1, %0" : "=a"(val) : "Nd"(port) : "memory");
    return val;
}

static inline void outl(uint16_t port, uint32_t val)
{
    __asm__ volatile("outl %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t val;
    __asm__ volatile("inl %1, %0" : "=a"(val) : "Nd"(port) : "memory");
    return val;
}

/* MMIO: one access of exactly the given width */
static inline uint8_t mmio_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

/* Compiler barrier; full barrier (orders stores before later loads too). */
#define barrier()       __asm__ volatile("" : : : "memory")
#define mb()            __asm__ volatile("mfence" : : : "memory")

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" : : : "memory");
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

#define ARRAY_SIZE(a)   (sizeof(a) / sizeof((a)[0]))

/* lib.c */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

void serial_write(const char *s, size_t n);
void gk_vprintf(const char *fmt, va_list ap);
void gk_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

noreturn void gk_exit(unsigned int code);
noreturn void gk_park(void);
noreturn void gk_triple_fault(void);
void gk_irq_enable(void);
void gk_irq_disable(void);

/* Prints "guestkit: error: <message>" and exits with EXIT_FAILED or EXIT_USAGE. */
noreturn void gk_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
noreturn void gk_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* a * b / c with a 128-bit intermediate; the quotient must fit in 64 bits */
uint64_t muldiv64(uint64_t a, uint64_t b, uint64_t c);

bool parse_u64(const char *s, bool allow_suffix, uint64_t *out);

/* guest.c: argument parsing shared by the workloads */
struct param {
    const char *key;
    bool size;          /* accept K/M/G suffixes */
    bool required;
    uint64_t max;
    uint64_t *value;    /* holds the default on entry */
    /*
     * If set, the value is a word from this NULL-terminated list and
     * *value becomes its index (size and max are then ignored).
     */
    const char *const *words;
};

#define PARAMS_MAX      32

/* Returns true if all arguments were valid; otherwise prints the error. */
bool parse_params(const char *workload, int argc, char **argv,
                  const struct param *params, int nparams);

extern const struct hvm_start_info *start_info;

/* time.c: TSC calibrated against PIT channel 2 */
extern uint64_t tsc_hz;
void time_init(void);                   /* exits with an error if calibration fails */
uint64_t tsc_to_ns(uint64_t ticks);
uint64_t time_ns(void);                 /* since time_init */
uint64_t deadline_after_s(uint64_t seconds);    /* a TSC value */
static inline bool deadline_passed(uint64_t deadline) { return rdtsc() >= deadline; }

/* Default for every wait in the device workloads; timeout=SECONDS overrides. */
#define DEFAULT_TIMEOUT_S       10
extern uint64_t gk_timeout_s;

/* dma.c: guest RAM above the image for rings and buffers, 4 KiB aligned */
#define PAGE_SIZE       4096ull
#define HUGE_PAGE_SIZE  0x200000ull
#define FOUR_GIB        0x100000000ull
uint64_t ram_area_base(void);           /* first 2 MiB boundary above the image */
bool ram_area_fits(uint64_t base, uint64_t size);   /* from the PVH memmap */

/* workloads.c: `pattern`'s word for the 8 bytes at addr (restore-touch, touch and tick fill with it) */
uint64_t pattern_value(uint64_t addr, uint64_t seed);
void *dma_alloc(uint64_t size);         /* zeroed; exits (EXIT_USAGE) when RAM runs out */
uint64_t dma_mark(void);
void dma_release(uint64_t mark);        /* frees everything allocated after dma_mark() */

/* irq.c: local APIC, IOAPIC */
uint8_t lapic_id(void);
void lapic_enable(void);                /* software-enable, mask LVTs, mask the 8259s */
/*
 * Routes IOAPIC pin to vector: fixed delivery, physical destination apic_id,
 * level-triggered, active-high, unmasked.  False if the IOAPIC has no such pin.
 */
bool ioapic_route_level(unsigned int pin, uint8_t vector, uint8_t apic_id);
bool ioapic_route(unsigned int pin, uint8_t vector, uint8_t apic_id, bool level);
unsigned int ioapic_pins(void);         /* redirection entries of the IOAPIC */

/* workloads.c */
int wl_hello(int argc, char **argv);
int wl_exit(int argc, char **argv);
int wl_count(int argc, char **argv);
int wl_dirty(int argc, char **argv);
int wl_pattern(int argc, char **argv);
int wl_restore_touch(int argc, char **argv);
int wl_touch(int argc, char **argv);
int wl_fault(int argc, char **argv);
int wl_info(int argc, char **argv);
int wl_reset(int argc, char **argv);
int wl_rtc(int argc, char **argv);
int wl_cpuid(int argc, char **argv);
int wl_poweroff(int argc, char **argv);
int wl_tick(int argc, char **argv);
int wl_irq(int argc, char **argv);
int wl_uart_irq(int argc, char **argv);
int wl_pci(int argc, char **argv);

/* blk_workloads.c */
int wl_blk_verify(int argc, char **argv);
int wl_blk_log(int argc, char **argv);
int wl_blk_seq(int argc, char **argv);
int wl_blk_bench(int argc, char **argv);
int wl_blk_evil(int argc, char **argv);

#endif
