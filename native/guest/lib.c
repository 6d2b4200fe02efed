/* guestkit: string functions, serial output, printf, exit, gate calls. */
#include "guest.h"

/* ---- memory and strings (rep movs/stos are native at CPL3) ---- */

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;

    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;

    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;

    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

/* ---- serial: 16550 at 0x3f8, polled ---- */

static void serial_putc(char c)
{
    /* wait for THRE; give up waiting after a while rather than hang */
    for (unsigned int spin = 0; spin < 1000000; spin++)
        if (inb(SERIAL_LSR) & SERIAL_LSR_THRE)
            break;
    outb(SERIAL_PORT, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        serial_putc(s[i]);
}

/* ---- printf: %s %c %d %i %u %x %p %%, flags '0' '-', width, l/ll/z ---- */

struct outbuf {
    char buf[128];
    size_t len;
};

static void ob_flush(struct outbuf *ob)
{
    serial_write(ob->buf, ob->len);
    ob->len = 0;
}

static void ob_putc(struct outbuf *ob, char c)
{
    if (ob->len == sizeof(ob->buf))
        ob_flush(ob);
    ob->buf[ob->len++] = c;
}

static void ob_pad(struct outbuf *ob, char c, int n)
{
    while (n-- > 0)
        ob_putc(ob, c);
}

static void ob_field(struct outbuf *ob, const char *s, size_t len, int width,
                     bool left, bool zero, bool negative)
{
    int pad = width - (int)len - (negative ? 1 : 0);

    if (!left && !zero)
        ob_pad(ob, ' ', pad);
    if (negative)
        ob_putc(ob, '-');
    if (!left && zero)
        ob_pad(ob, '0', pad);
    for (size_t i = 0; i < len; i++)
        ob_putc(ob, s[i]);
    if (left)
        ob_pad(ob, ' ', pad);
}

void gk_vprintf(const char *fmt, va_list ap)
{
    struct outbuf ob;

    ob.len = 0;
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            ob_putc(&ob, *fmt);
            continue;
        }
        fmt++;
        bool left = false, zero = false;
        for (;; fmt++) {
            if (*fmt == '-')
                left = true;
            else if (*fmt == '0')
                zero = true;
            else
                break;
        }
        int width = 0;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        int lng = 0;
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }

        char tmp[24];
        char *end = tmp + sizeof(tmp), *p = end;
        uint64_t v;
        bool negative = false;
        unsigned int base = 10;

        switch (*fmt) {
        case '\0':
            fmt--;
            continue;
        case '%':
            ob_putc(&ob, '%');
            continue;
        case 'c':
            tmp[0] = (char)va_arg(ap, int);
            ob_field(&ob, tmp, 1, width, left, false, false);
            continue;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            ob_field(&ob, s, strlen(s), width, left, false, false);
            continue;
        }
        case 'd':
        case 'i': {
            int64_t sv = lng ? va_arg(ap, long) : va_arg(ap, int);
            negative = sv < 0;
            v = negative ? -(uint64_t)sv : (uint64_t)sv;
            break;
        }
        case 'p':
            v = (uintptr_t)va_arg(ap, void *);
            base = 16;
            ob_putc(&ob, '0');
            ob_putc(&ob, 'x');
            break;
        case 'x':
            base = 16;
            /* fall through */
        case 'u':
            v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
            break;
        default:        /* unknown conversion: print it verbatim */
            ob_putc(&ob, '%');
            ob_putc(&ob, *fmt);
            continue;
        }
        do {
            *--p = "0123456789abcdef"[v % base];
            v /= base;
        } while (v);
        ob_field(&ob, p, (size_t)(end - p), width, left, zero, negative);
    }
    ob_flush(&ob);
}

void gk_printf(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    gk_vprintf(fmt, ap);
    va_end(ap);
}

/* ---- gate calls, exit ---- */

noreturn void gk_park(void)
{
    __asm__ volatile("int %0" : : "i"(GATE_VECTOR), "a"(GATE_PARK) : "memory");
    for (;;)                    /* not reached */
        __asm__ volatile("pause");
}

noreturn void gk_triple_fault(void)
{
    __asm__ volatile("int %0" : : "i"(GATE_VECTOR), "a"(GATE_TRIPLE_FAULT) : "memory");
    for (;;)                    /* not reached */
        __asm__ volatile("pause");
}

noreturn void gk_exit(unsigned int code)
{
    outb(DEBUG_EXIT_PORT, (uint8_t)code);
    gk_printf("guestkit: no debug-exit device at 0x%x; parking vCPU\n", DEBUG_EXIT_PORT);
    gk_park();
}

/* ---- numbers: decimal, optional K/M/G suffix (binary) ---- */

bool parse_u64(const char *s, bool allow_suffix, uint64_t *out)
{
    uint64_t v = 0;
    const char *p = s;

    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned int d = (unsigned int)(*p - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    if (*p && allow_suffix) {
        unsigned int shift;
        switch (*p) {
        case 'K': case 'k': shift = 10; break;
        case 'M': case 'm': shift = 20; break;
        case 'G': case 'g': shift = 30; break;
        default: return false;
        }
        if (v > (UINT64_MAX >> shift))
            return false;
        v <<= shift;
        p++;
    }
    if (*p)
        return false;
    *out = v;
    return true;
}

/* ---- interrupts: RFLAGS.IF is set through the gate (start.S) ---- */

void gk_irq_enable(void)
{
    __asm__ volatile("int %0" : : "i"(GATE_VECTOR), "a"(GATE_IRQ_ENABLE) : "memory");
}

void gk_irq_disable(void)
{
    __asm__ volatile("int %0" : : "i"(GATE_VECTOR), "a"(GATE_IRQ_DISABLE) : "memory");
}

/* ---- errors ---- */

static noreturn void fail_v(unsigned int code, const char *fmt, va_list ap)
{
    gk_printf("guestkit: error: ");
    gk_vprintf(fmt, ap);
    gk_printf("\n");
    gk_exit(code);
}

noreturn void gk_fail(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fail_v(EXIT_FAILED, fmt, ap);
}

noreturn void gk_usage_error(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fail_v(EXIT_USAGE, fmt, ap);
}
