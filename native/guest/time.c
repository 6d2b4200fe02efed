/*
 * guestkit: time from the TSC (rdtsc runs natively at CPL3), calibrated once
 * against channel 2 of the 8254 PIT, whose input clock is 1.193182 MHz on
 * every PC.  Channel 2 is programmed to count down from 0xffff (mode 0) and
 * its count is read back with latch commands on ports 0x43/0x42, each read
 * bracketed by rdtsc.  Only ports 0x40-0x43 are used for the measurement:
 * KVM's in-kernel PIT serves those itself, while the gate/output port 0x61
 * may be missing (microvm, a VMM without a speaker port); the gate is still
 * raised through 0x61 for hardware that needs it.  Nothing is printed
 * unless the calibration fails.
 */
#include "guest.h"

#define PIT_HZ              1193182ull
#define PIT_CH2             0x42
#define PIT_CMD             0x43
#define PIT_CH2_GATE_PORT   0x61
#define PORT61_GATE2        0x01
#define PORT61_SPEAKER      0x02
#define CAL_TICKS           23864u      /* 20 ms of PIT clock */
#define CAL_MAX_READS       2000000u

uint64_t tsc_hz;
uint64_t gk_timeout_s = DEFAULT_TIMEOUT_S;
static uint64_t tsc_start;
static uint64_t ns_mult;        /* ns per TSC tick, 32.32 fixed point */

uint64_t muldiv64(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t hi, lo, q, r;

    __asm__("mulq %3" : "=a"(lo), "=d"(hi) : "a"(a), "rm"(b));
    if (hi >= c)                /* quotient would not fit: saturate */
        return UINT64_MAX;
    __asm__("divq %4" : "=a"(q), "=d"(r) : "a"(lo), "d"(hi), "rm"(c));
    (void)r;
    return q;
}

/* The channel 2 count, and the TSC in the middle of reading it. */
static uint16_t pit_read_ch2(uint64_t *tsc)
{
    uint64_t t0 = rdtsc();
    outb(PIT_CMD, 0x80);                        /* latch channel 2 */
    uint8_t lo = inb(PIT_CH2);
    uint8_t hi = inb(PIT_CH2);
    uint64_t t1 = rdtsc();

    *tsc = t0 + (t1 - t0) / 2;
    return (uint16_t)(lo | hi << 8);
}

/* TSC ticks per second from one 20 ms measurement; 0 if the PIT does not count. */
static uint64_t pit_measure(void)
{
    uint8_t p61 = inb(PIT_CH2_GATE_PORT);

    outb(PIT_CH2_GATE_PORT, (uint8_t)((p61 & ~PORT61_SPEAKER) | PORT61_GATE2));
    outb(PIT_CMD, 0xb0);                        /* ch 2, lobyte/hibyte, mode 0, binary */
    outb(PIT_CH2, 0xff);
    outb(PIT_CH2, 0xff);

    uint64_t t0, t1;
    uint16_t c0 = pit_read_ch2(&t0), c1 = c0;
    uint32_t reads = 0;
    /* c0 is at most 0xffff and the wait ends 23864 ticks later, before any wrap */
    while (c1 <= c0 && (uint32_t)(c0 - c1) < CAL_TICKS) {
        if (++reads == CAL_MAX_READS)
            return 0;
        c1 = pit_read_ch2(&t1);
    }
    if (c1 > c0 || (uint32_t)(c0 - c1) < CAL_TICKS)
        return 0;
    return muldiv64(t1 - t0, PIT_HZ, (uint64_t)(c0 - c1));
}

void time_init(void)
{
    if (tsc_hz)
        return;
    /* the median of three, so that one measurement disturbed by the host does not count */
    uint64_t a = pit_measure(), b = pit_measure(), c = pit_measure();
    uint64_t hz = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
    if (hz < 100000000ull || hz > 20000000000ull)
        gk_fail("TSC calibration against PIT channel 2 failed (measured %lu, %lu and %lu Hz)",
                a, b, c);
    tsc_hz = hz;
    ns_mult = muldiv64(1000000000ull, 1ull << 32, hz);
    tsc_start = rdtsc();
}

uint64_t tsc_to_ns(uint64_t ticks)
{
    uint64_t hi, lo;

    __asm__("mulq %3" : "=a"(lo), "=d"(hi) : "a"(ticks), "rm"(ns_mult));
    return (hi << 32) | (lo >> 32);
}

uint64_t time_ns(void)
{
    return tsc_to_ns(rdtsc() - tsc_start);
}

uint64_t deadline_after_s(uint64_t seconds)
{
    uint64_t ticks = seconds > UINT64_MAX / tsc_hz ? UINT64_MAX / 2 : seconds * tsc_hz;
    uint64_t now = rdtsc();

    return ticks > UINT64_MAX - now ? UINT64_MAX : now + ticks;
}
