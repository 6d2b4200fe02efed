/*
 * guestkit: PCI configuration mechanism #1 on bus 0, memory BAR sizing and
 * placement, capability lists.  Port I/O at CPL3 goes through the TSS I/O
 * bitmap (all ports open).
 */
#include "pci.h"

#define PCI_CONFIG_ADDRESS      0xcf8
#define PCI_CONFIG_DATA         0xcfc

static void pci_select(const struct pci_dev *d, uint16_t off)
{
    outl(PCI_CONFIG_ADDRESS, 0x80000000u | (uint32_t)d->bus << 16 | (uint32_t)d->dev << 11 |
                             (uint32_t)d->fn << 8 | (off & 0xfc));
}

uint8_t pci_read8(const struct pci_dev *d, uint16_t off)
{
    pci_select(d, off);
    return inb((uint16_t)(PCI_CONFIG_DATA + (off & 3)));
}

uint16_t pci_read16(const struct pci_dev *d, uint16_t off)
{
    pci_select(d, off);
    return inw((uint16_t)(PCI_CONFIG_DATA + (off & 2)));
}

uint32_t pci_read32(const struct pci_dev *d, uint16_t off)
{
    pci_select(d, off);
    return inl(PCI_CONFIG_DATA);
}

void pci_write8(const struct pci_dev *d, uint16_t off, uint8_t val)
{
    pci_select(d, off);
    outb((uint16_t)(PCI_CONFIG_DATA + (off & 3)), val);
}

void pci_write16(const struct pci_dev *d, uint16_t off, uint16_t val)
{
    pci_select(d, off);
    outw((uint16_t)(PCI_CONFIG_DATA + (off & 2)), val);
}

void pci_write32(const struct pci_dev *d, uint16_t off, uint32_t val)
{
    pci_select(d, off);
    outl(PCI_CONFIG_DATA, val);
}

static struct pci_dev devices[PCI_MAX_DEVICES];
static int ndevices = -1;

/* Reads the BAR registers (addresses only; sizes need pci_size_bars). */
static void pci_read_bars(struct pci_dev *d)
{
    for (int i = 0; i < d->nbars; i++) {
        struct pci_bar *b = &d->bar[i];
        uint32_t lo = pci_read32(d, (uint16_t)(PCI_BAR0 + 4 * i));
        memset(b, 0, sizeof(*b));
        if (lo & 1) {
            b->io = true;
            continue;
        }
        b->addr = lo & ~0xfull;
        if (((lo >> 1) & 3) == 2 && i + 1 < d->nbars) {
            b->is64 = true;
            b->addr |= (uint64_t)pci_read32(d, (uint16_t)(PCI_BAR0 + 4 * (i + 1))) << 32;
            memset(&d->bar[i + 1], 0, sizeof(d->bar[i + 1]));
            i++;
        }
    }
}

int pci_devices(struct pci_dev **list)
{
    if (ndevices < 0) {
        ndevices = 0;
        for (uint8_t dev = 0; dev < 32; dev++) {
            for (uint8_t fn = 0; fn < 8; fn++) {
                struct pci_dev probe = { .bus = 0, .dev = dev, .fn = fn };
                uint32_t id = pci_read32(&probe, PCI_VENDOR_ID);
                if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
                    if (fn == 0)
                        break;          /* no device: no functions either */
                    continue;
                }
                uint8_t ht = pci_read8(&probe, PCI_HEADER_TYPE);
                if (ndevices < PCI_MAX_DEVICES) {
                    struct pci_dev *d = &devices[ndevices++];
                    *d = probe;
                    d->vendor = (uint16_t)id;
                    d->device = (uint16_t)(id >> 16);
                    d->header_type = ht & 0x7f;
                    d->class_rev = pci_read32(d, PCI_CLASS_REVISION);
                    d->nbars = d->header_type == 0 ? 6 : d->header_type == 1 ? 2 : 0;
                    pci_read_bars(d);
                }
                if (fn == 0 && !(ht & 0x80))
                    break;              /* single-function device */
            }
        }
    }
    *list = devices;
    return ndevices;
}

/*
 * Sizes every memory BAR of d the standard way: with decoding off, write
 * all-ones, read back, restore.
 */
void pci_size_bars(struct pci_dev *d)
{
    uint16_t cmd = pci_read16(d, PCI_COMMAND);

    pci_write16(d, PCI_COMMAND, (uint16_t)(cmd & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO)));
    for (int i = 0; i < d->nbars; i++) {
        struct pci_bar *b = &d->bar[i];
        uint16_t off = (uint16_t)(PCI_BAR0 + 4 * i);
        if (b->io)
            continue;
        uint32_t lo = pci_read32(d, off);
        pci_write32(d, off, 0xffffffffu);
        uint64_t mask = pci_read32(d, off) & ~0xfull;
        pci_write32(d, off, lo);
        if (b->is64) {
            uint32_t hi = pci_read32(d, (uint16_t)(off + 4));
            pci_write32(d, (uint16_t)(off + 4), 0xffffffffu);
            mask |= (uint64_t)pci_read32(d, (uint16_t)(off + 4)) << 32;
            pci_write32(d, (uint16_t)(off + 4), hi);
        } else if (mask) {
            mask |= 0xffffffff00000000ull;
        }
        b->size = mask ? ~mask + 1 : 0;
        if (b->is64)
            i++;
    }
    pci_write16(d, PCI_COMMAND, cmd);
}

static bool in_window(uint64_t addr)
{
    return addr >= PCI_WINDOW_START && addr < PCI_WINDOW_END;
}

/* End of the highest memory BAR of any bus 0 function inside the window. */
static uint64_t pci_window_top(void)
{
    struct pci_dev *list;
    int n = pci_devices(&list);
    uint64_t top = PCI_WINDOW_START;

    for (int k = 0; k < n; k++) {
        struct pci_dev *d = &list[k];
        bool any = false;
        for (int i = 0; i < d->nbars; i++)
            if (!d->bar[i].io && in_window(d->bar[i].addr))
                any = true;
        if (!any)
            continue;
        pci_size_bars(d);
        for (int i = 0; i < d->nbars; i++) {
            struct pci_bar *b = &d->bar[i];
            if (!b->io && b->size && in_window(b->addr) && b->addr + b->size > top)
                top = b->addr + b->size;
        }
    }
    return top;
}

bool pci_enable_memory(struct pci_dev *d)
{
    uint64_t top = 0;

    pci_read_bars(d);
    pci_size_bars(d);
    for (int i = 0; i < d->nbars; i++) {
        struct pci_bar *b = &d->bar[i];
        if (b->io || !b->size || (b->addr && b->addr + b->size <= FOUR_GIB)) {
            if (b->is64)
                i++;
            continue;
        }
        if (!b->is64 && b->size > 0xffffffffull)
            continue;
        if (!top)
            top = pci_window_top();
        uint64_t addr = (top + b->size - 1) & ~(b->size - 1);
        if (addr + b->size > PCI_WINDOW_END || addr + b->size < addr) {
            gk_printf("guestkit: error: PCI %02x:%02x.%x BAR%d (%lu bytes) does not fit in "
                      "[0x%lx, 0x%lx) above 0x%lx\n", d->bus, d->dev, d->fn, i, b->size,
                      PCI_WINDOW_START, PCI_WINDOW_END, top);
            return false;
        }
        uint16_t cmd = pci_read16(d, PCI_COMMAND);
        pci_write16(d, PCI_COMMAND, (uint16_t)(cmd & ~PCI_COMMAND_MEMORY));
        uint16_t off = (uint16_t)(PCI_BAR0 + 4 * i);
        pci_write32(d, off, (uint32_t)addr);
        if (b->is64)
            pci_write32(d, (uint16_t)(off + 4), 0);
        pci_write16(d, PCI_COMMAND, cmd);
        b->addr = addr;
        top = addr + b->size;
        if (b->is64)
            i++;
    }
    /* read back what the device holds now */
    for (int i = 0; i < d->nbars; i++) {
        struct pci_bar *b = &d->bar[i];
        if (b->io)
            continue;
        uint64_t addr = pci_read32(d, (uint16_t)(PCI_BAR0 + 4 * i)) & ~0xfull;
        if (b->is64)
            addr |= (uint64_t)pci_read32(d, (uint16_t)(PCI_BAR0 + 4 * (i + 1))) << 32;
        if (b->size && addr != b->addr) {
            gk_printf("guestkit: error: PCI %02x:%02x.%x BAR%d reads 0x%lx after writing 0x%lx\n",
                      d->bus, d->dev, d->fn, i, addr, b->addr);
            return false;
        }
        if (b->is64)
            i++;
    }
    uint16_t cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, (uint16_t)(cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER |
                                           PCI_COMMAND_INTX_DISABLE));
    return true;
}

uint8_t pci_find_cap(const struct pci_dev *d, uint8_t id, uint8_t after)
{
    if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    uint8_t pos = after ? pci_read8(d, (uint16_t)(after + 1)) : pci_read8(d, PCI_CAP_PTR);
    /* at most 48 capabilities fit in 256 bytes: a longer list loops */
    for (int n = 0; n < 48 && pos >= 0x40; n++) {
        pos &= 0xfc;
        if (pci_read8(d, pos) == id)
            return pos;
        pos = pci_read8(d, (uint16_t)(pos + 1));
    }
    return 0;
}
