/*
 * guestkit: the local APIC (xAPIC, MMIO at 0xfee00000), from CPL3.
 *
 * The APIC page is a user page of the identity map, so CPL3 code programs
 * it directly (the IOAPIC's too).  Device interrupts arrive as MSI-X
 * messages on vectors 0x40-0x4f, or as legacy INTx through the IOAPIC on
 * vector 0x50; start.S counts them and writes EOI.  RFLAGS.IF is set through
 * the gate (gk_irq_enable), because sti is not available at CPL3 without
 * IOPL=3.
 */
#include "guest.h"

#define LAPIC_BASE      0xfee00000u
#define LAPIC_ID        0x020
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370

#define SVR_ENABLE      0x100
#define LVT_MASKED      0x10000

#define PIC1_DATA       0x21
#define PIC2_DATA       0xa1

static uint32_t lapic_read(uint32_t reg)
{
    return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(uint32_t reg, uint32_t val)
{
    mmio_write32(LAPIC_BASE + reg, val);
}

uint8_t lapic_id(void)
{
    return (uint8_t)(lapic_read(LAPIC_ID) >> 24);
}

void lapic_enable(void)
{
    /*
     * Only MSIs may interrupt: the 8259s are masked (firmware may have
     * left the timer unmasked, and LINT0 is in ExtINT mode after reset),
     * and so are the APIC's own local interrupt sources.
     */
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
    lapic_write(LAPIC_SVR, SVR_ENABLE | IRQ_SPURIOUS_VECTOR);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    lapic_write(LAPIC_TPR, 0);
}

/*
 * The IOAPIC at its architectural default address, through IOREGSEL (+0x00)
 * and IOWIN (+0x10) from CPL3.  Redirection entry p is registers
 * 0x10 + 2p (low: vector, delivery mode, destination mode, polarity,
 * trigger mode, mask) and 0x11 + 2p (high: destination APIC ID in 31:24).
 */
#define IOAPIC_BASE             0xfec00000u
#define IOAPIC_IOREGSEL         0x00
#define IOAPIC_IOWIN            0x10
#define IOAPIC_REG_VER          0x01
#define IOAPIC_REG_REDTBL       0x10

#define IOREDTBL_LEVEL          (1u << 15)      /* trigger mode; bit 13 = 0: active-high */
#define IOREDTBL_MASKED         (1u << 16)      /* delivery mode 000 fixed, dest mode 0 physical */

static uint32_t ioapic_read(uint32_t reg)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_IOREGSEL, reg);
    return mmio_read32(IOAPIC_BASE + IOAPIC_IOWIN);
}

static void ioapic_write(uint32_t reg, uint32_t val)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_IOREGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOAPIC_IOWIN, val);
}

unsigned int ioapic_pins(void)
{
    return ((ioapic_read(IOAPIC_REG_VER) >> 16) & 0xff) + 1;
}

bool ioapic_route_level(unsigned int pin, uint8_t vector, uint8_t apic_id)
{
    return ioapic_route(pin, vector, apic_id, true);
}

bool ioapic_route(unsigned int pin, uint8_t vector, uint8_t apic_id, bool level)
{
    if (pin >= ioapic_pins())
        return false;
    uint32_t lo = IOAPIC_REG_REDTBL + 2 * pin;
    uint32_t entry = (level ? IOREDTBL_LEVEL : 0) | vector;

    /* masked while the destination changes, unmasked by the last write */
    ioapic_write(lo, entry | IOREDTBL_MASKED);
    ioapic_write(lo + 1, (uint32_t)apic_id << 24);
    ioapic_write(lo, entry);
    return true;
}

/*
 * irq [n=COUNT]: not a test contract of the devices, a check of the
 * interrupt path itself: sends COUNT fixed self-IPIs on vector 0x4f through
 * the ICR and waits for each to be counted by start.S's handler.
 */
int wl_irq(int argc, char **argv)
{
    uint64_t n = 1000, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "n", .max = 1000000, .value = &n },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("irq", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    gk_timeout_s = timeout;
    time_init();
    lapic_enable();
    gk_irq_enable();

    const unsigned int slot = IRQ_VECTORS - 1;
    uint64_t before = gk_irq_count[slot];
    uint64_t t0 = time_ns();
    for (uint64_t i = 1; i <= n; i++) {
        lapic_write(LAPIC_ICR_HI, 0);
        lapic_write(LAPIC_ICR_LO, 0x44000u | (IRQ_VECTOR_BASE + slot));    /* self, fixed, assert */
        uint64_t deadline = deadline_after_s(gk_timeout_s);
        while (gk_irq_count[slot] - before < i)
            if (deadline_passed(deadline))
                gk_fail("irq: self-IPI %lu on vector 0x%x not taken within %lu s "
                        "(count %lu, SVR 0x%x)", i, IRQ_VECTOR_BASE + slot, gk_timeout_s,
                        gk_irq_count[slot] - before, lapic_read(LAPIC_SVR));
    }
    uint64_t ns = time_ns() - t0;
    gk_irq_disable();
    gk_printf("guestkit: irq ok n=%lu ns_per_irq=%lu\n", n, n ? ns / n : 0);
    return EXIT_OK;
}

/*
 * uart-irq [n=COUNT]: COM1's interrupt reaches the CPU on ISA IRQ 4: IOAPIC pin 4 is routed
 * edge-triggered to vector 0x4e, the UART's transmitter-empty interrupt is enabled, and each of
 * COUNT characters written to THR must raise one more interrupt once the previous one was
 * acknowledged by reading IIR (which clears a THRE interrupt, as on a 16550).
 */
int wl_uart_irq(int argc, char **argv)
{
    uint64_t n = 8, timeout = DEFAULT_TIMEOUT_S;
    const struct param params[] = {
        { .key = "n", .max = 1000, .value = &n },
        { .key = "timeout", .max = 3600, .value = &timeout },
    };

    if (!parse_params("uart-irq", argc, argv, params, ARRAY_SIZE(params)))
        return EXIT_USAGE;
    gk_timeout_s = timeout;
    time_init();
    lapic_enable();
    const unsigned int slot = IRQ_VECTORS - 2;
    if (!ioapic_route(4, IRQ_VECTOR_BASE + slot, lapic_id(), false))
        gk_fail("uart-irq: the IOAPIC has no pin 4");
    gk_printf("guestkit: uart-irq: IRQ 4 -> vector 0x%x\n", IRQ_VECTOR_BASE + slot);
    gk_irq_enable();

    uint64_t before = gk_irq_count[slot];
    outb(0x3f9, 0x02);                          /* IER: transmitter holding register empty */
    for (uint64_t i = 1; i <= n; i++) {
        uint64_t deadline = deadline_after_s(gk_timeout_s);
        while (gk_irq_count[slot] - before < i)
            if (deadline_passed(deadline)) {
                outb(0x3f9, 0);
                gk_fail("uart-irq: interrupt %lu of %lu not taken within %lu s (IIR 0x%x)", i, n,
                        gk_timeout_s, inb(0x3fa));
            }
        uint8_t iir = inb(0x3fa);               /* acknowledges the THRE interrupt */
        if ((iir & 0x0f) != 0x02) {
            outb(0x3f9, 0);
            gk_fail("uart-irq: IIR 0x%x after interrupt %lu, expected THRE (0x2)", iir, i);
        }
        if (i < n)
            outb(0x3f8, '.');                   /* transmitted at once: THR empty again */
    }
    outb(0x3f9, 0);
    gk_irq_disable();
    gk_printf("\nguestkit: uart-irq ok n=%lu\n", n);
    return EXIT_OK;
}
