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

/* Ports */
#define SERIAL_PORT             0x3f8
#define SERIAL_LSR              (SERIAL_PORT + 5)
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

bool parse_u64(const char *s, bool allow_suffix, uint64_t *out);

/* guest.c: argument parsing shared by the workloads */
struct param {
    const char *key;
    bool size;          /* accept K/M/G suffixes */
    bool required;
    uint64_t max;
    uint64_t *value;    /* holds the default on entry */
};

/* Returns true if all arguments were valid; otherwise prints the error. */
bool parse_params(const char *workload, int argc, char **argv,
                  const struct param *params, int nparams);

extern const struct hvm_start_info *start_info;

/* workloads.c */
int wl_hello(int argc, char **argv);
int wl_exit(int argc, char **argv);
int wl_count(int argc, char **argv);
int wl_dirty(int argc, char **argv);
int wl_fault(int argc, char **argv);
int wl_info(int argc, char **argv);

#endif
