/* guestkit: PCI bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc). */
#ifndef GUESTKIT_PCI_H
#define GUESTKIT_PCI_H

#include "guest.h"

#define PCI_VENDOR_ID           0x00
#define PCI_DEVICE_ID           0x02
#define PCI_COMMAND             0x04
#define PCI_STATUS              0x06
#define PCI_CLASS_REVISION      0x08
#define PCI_HEADER_TYPE         0x0e
#define PCI_BAR0                0x10
#define PCI_CAP_PTR             0x34
#define PCI_INTERRUPT_LINE      0x3c
#define PCI_INTERRUPT_PIN       0x3d

#define PCI_COMMAND_IO          0x0001
#define PCI_COMMAND_MEMORY      0x0002
#define PCI_COMMAND_MASTER      0x0004
#define PCI_COMMAND_INTX_DISABLE 0x0400
#define PCI_STATUS_CAP_LIST     0x0010

#define PCI_CAP_ID_MSIX         0x11
#define PCI_CAP_ID_VNDR         0x09

/* Where the kit places memory BARs that firmware/VMM left unassigned. */
#define PCI_WINDOW_START        ((uint64_t)0xc0000000)
#define PCI_WINDOW_END          ((uint64_t)0xe0000000)

#define PCI_MAX_DEVICES         64

struct pci_bar {
    uint64_t addr;      /* memory BARs: base address; 0 if not implemented */
    uint64_t size;      /* memory BARs: known after pci_enable_memory() */
    bool io;            /* an I/O BAR (not used by the kit) */
    bool is64;          /* 64-bit memory BAR (takes this slot and the next) */
};

struct pci_dev {
    uint8_t bus, dev, fn;
    uint16_t vendor, device;
    uint8_t header_type;        /* without the multi-function bit */
    uint32_t class_rev;
    int nbars;                  /* 6 for type 0 headers, 2 for bridges */
    struct pci_bar bar[6];
};

uint8_t pci_read8(const struct pci_dev *d, uint16_t off);
uint16_t pci_read16(const struct pci_dev *d, uint16_t off);
uint32_t pci_read32(const struct pci_dev *d, uint16_t off);
void pci_write8(const struct pci_dev *d, uint16_t off, uint8_t val);
void pci_write16(const struct pci_dev *d, uint16_t off, uint16_t val);
void pci_write32(const struct pci_dev *d, uint16_t off, uint32_t val);

/* All functions on bus 0, in device/function order; scanned once. */
int pci_devices(struct pci_dev **list);

/* Sizes the memory BARs of d (decoding is off meanwhile). */
void pci_size_bars(struct pci_dev *d);

/*
 * Sizes the memory BARs of d, assigns those left at 0 or placed above
 * 4 GiB in [PCI_WINDOW_START, PCI_WINDOW_END) above every BAR already
 * there, and sets Command = memory space | bus master (INTx disabled).
 * Returns false with a message printed if a BAR cannot be placed.
 */
bool pci_enable_memory(struct pci_dev *d);

/* Offset of the first capability with this id after `after` (0: from the start); 0 if none. */
uint8_t pci_find_cap(const struct pci_dev *d, uint8_t id, uint8_t after);

#endif
