/*
 * guestkit: CPL3 entry, command line, workload dispatch, exception report.
 *
 * start.S enters guest_main() at CPL3 (IOPL=3, IF=0) with the PVH
 * hvm_start_info pointer; its return value is the exit status.
 */
#include "guest.h"

#define CMDLINE_MAX     4096
#define ARGS_MAX        64

const struct hvm_start_info *start_info;

static char cmdline_buf[CMDLINE_MAX];
static char *argv_buf[ARGS_MAX];

struct workload {
    const char *name;
    int (*run)(int argc, char **argv);
};

static const struct workload workloads[] = {
    { "hello", wl_hello },
    { "exit", wl_exit },
    { "count", wl_count },
    { "dirty", wl_dirty },
    { "pattern", wl_pattern },
    { "restore-touch", wl_restore_touch },
    { "touch", wl_touch },
    { "fault", wl_fault },
    { "info", wl_info },
    { "reset", wl_reset },
    { "rtc", wl_rtc },
    { "cpuid", wl_cpuid },
    { "poweroff", wl_poweroff },
    { "tick", wl_tick },
    { "irq", wl_irq },
    { "uart-irq", wl_uart_irq },
    { "pci", wl_pci },
    { "blk-verify", wl_blk_verify },
    { "blk-log", wl_blk_log },
    { "blk-seq", wl_blk_seq },
    { "blk-bench", wl_blk_bench },
    { "blk-evil", wl_blk_evil },
};

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Split the command line into argv; returns argc or -1 if it is too long. */
static int split_cmdline(const char *src, char **argv)
{
    size_t len = 0;
    int argc = 0;

    if (src)
        while (src[len]) {
            if (len + 1 >= CMDLINE_MAX)
                return -1;
            cmdline_buf[len] = src[len];
            len++;
        }
    cmdline_buf[len] = '\0';

    char *p = cmdline_buf;
    for (;;) {
        while (is_space(*p))
            *p++ = '\0';
        if (!*p)
            break;
        if (argc == ARGS_MAX)
            return -1;
        argv[argc++] = p;
        while (*p && !is_space(*p))
            p++;
    }
    return argc;
}

bool parse_params(const char *workload, int argc, char **argv,
                  const struct param *params, int nparams)
{
    bool seen[PARAMS_MAX] = { false };

    for (int i = 0; i < argc; i++) {
        char *arg = argv[i];
        char *eq = arg;
        while (*eq && *eq != '=')
            eq++;
        int k = -1;
        if (*eq == '=' && eq != arg && nparams <= PARAMS_MAX) {
            size_t klen = (size_t)(eq - arg);
            for (int j = 0; j < nparams; j++)
                if (strlen(params[j].key) == klen && !memcmp(params[j].key, arg, klen))
                    k = j;
        }
        uint64_t v = 0;
        bool ok = k >= 0;
        if (ok && params[k].words) {
            ok = false;
            for (uint64_t w = 0; params[k].words[w]; w++)
                if (!strcmp(params[k].words[w], eq + 1)) {
                    v = w;
                    ok = true;
                }
        } else if (ok) {
            ok = parse_u64(eq + 1, params[k].size, &v) && v <= params[k].max;
        }
        if (!ok) {
            gk_printf("guestkit: error: bad argument '%s' for %s\n", arg, workload);
            return false;
        }
        *params[k].value = v;
        seen[k] = true;
    }
    for (int j = 0; j < nparams; j++)
        if (params[j].required && !seen[j]) {
            gk_printf("guestkit: error: missing argument '%s' for %s\n", params[j].key, workload);
            return false;
        }
    return true;
}

int guest_main(const struct hvm_start_info *si);

int guest_main(const struct hvm_start_info *si)
{
    const char *cmdline = NULL;

    if (si && si->magic == HVM_START_MAGIC) {
        start_info = si;
        if (si->cmdline_paddr && si->cmdline_paddr < (1ull << 32))
            cmdline = (const char *)(uintptr_t)si->cmdline_paddr;
    } else {
        gk_printf("guestkit: warning: no hvm_start_info (ebx=%p); using defaults\n", (const void *)si);
    }

    int argc = split_cmdline(cmdline, argv_buf);
    if (argc < 0) {
        gk_printf("guestkit: error: command line too long\n");
        return EXIT_USAGE;
    }

    const char *name = argc > 0 ? argv_buf[0] : "hello";
    for (size_t i = 0; i < sizeof(workloads) / sizeof(workloads[0]); i++)
        if (!strcmp(workloads[i].name, name))
            return workloads[i].run(argc > 0 ? argc - 1 : 0, argv_buf + 1);

    gk_printf("guestkit: error: unknown workload '%s'\n", name);
    return EXIT_USAGE;
}

/* Entered at CPL3 on the exception stack from start.S (exc_common). */
noreturn void guest_exception(uint64_t vector, uint64_t error, uint64_t rip,
                              uint64_t cr2, uint64_t cs, uint64_t rsp);

noreturn void guest_exception(uint64_t vector, uint64_t error, uint64_t rip,
                              uint64_t cr2, uint64_t cs, uint64_t rsp)
{
    static const char *const names[32] = {
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
        "#DF", "#MF(9)", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
        "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23",
        "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
    };

    gk_printf("guestkit: error: unexpected exception %lu (%s) error=0x%lx rip=0x%lx "
              "cs=0x%lx rsp=0x%lx cr2=0x%lx\n",
              vector, names[vector & 31], error, rip, cs, rsp, cr2);
    gk_exit(EXIT_FAILED);
}
