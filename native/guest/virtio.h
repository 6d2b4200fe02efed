/* guestkit: virtio 1.x over the modern PCI transport, split virtqueues. */
#ifndef GUESTKIT_VIRTIO_H
#define GUESTKIT_VIRTIO_H

#include "guest.h"
#include "pci.h"

#define VIRTIO_PCI_VENDOR               0x1af4

/* device_status */
#define VIRTIO_STATUS_ACKNOWLEDGE       0x01
#define VIRTIO_STATUS_DRIVER            0x02
#define VIRTIO_STATUS_DRIVER_OK         0x04
#define VIRTIO_STATUS_FEATURES_OK       0x08
#define VIRTIO_STATUS_NEEDS_RESET       0x40
#define VIRTIO_STATUS_FAILED            0x80

/* device-independent feature bits */
#define VIRTIO_F_INDIRECT_DESC          28
#define VIRTIO_F_EVENT_IDX              29
#define VIRTIO_F_VERSION_1              32

#define VIRTIO_MSI_NO_VECTOR            0xffff

/* split virtqueue layout */
#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2
#define VIRTQ_DESC_F_INDIRECT           4
#define VIRTQ_AVAIL_F_NO_INTERRUPT      1
#define VIRTQ_USED_F_NO_NOTIFY          1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];    /* then le16 used_event */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];      /* then le16 avail_event */
};

/* Largest queue the kit sets up; the device's queue_size is lowered to this. */
#define VIRTQ_MAX_SIZE                  1024

struct virtq {
    uint16_t index;             /* queue number on the device */
    uint16_t size;
    uint16_t alloc_size;        /* entries the rings were allocated for */
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    volatile uint16_t *used_event;      /* in the avail ring, after ring[size] */
    volatile uint16_t *avail_event;     /* in the used ring, after ring[size] */
    uintptr_t notify;           /* notify address of this queue */
    bool event_idx;             /* VIRTIO_F_EVENT_IDX negotiated */
    uint16_t avail_idx;         /* next free avail ring slot (driver's copy of avail->idx) */
    uint16_t kicked_idx;        /* avail_idx at the last publish */
    uint16_t last_used;         /* next used ring entry to consume */
    uint16_t msix_entry;        /* VIRTIO_MSI_NO_VECTOR: polled or INTx */
    uint16_t irq_slot;          /* gk_irq_count index of an interrupt-driven queue */
    uint64_t irq_seen;          /* gk_irq_count[irq_slot] when last consumed */
    uint64_t kicks;             /* notifications written */
};

struct virtio_dev {
    struct pci_dev *pci;
    uintptr_t common;           /* struct virtio_pci_common_cfg */
    uintptr_t notify_base;
    uint32_t notify_mult;
    uint32_t notify_len;
    uintptr_t isr;
    uintptr_t devcfg;
    uint32_t devcfg_len;
    uint8_t msix_cap;           /* 0: no MSI-X capability */
    uintptr_t msix_table;
    uint16_t msix_entries;
    uint64_t device_features;
    uint64_t features;          /* negotiated */
};

/*
 * Finds the virtio PCI capabilities of pci, enables its memory BARs and
 * bus mastering.  Returns false (message printed) if they are unusable.
 */
bool virtio_probe(struct virtio_dev *vd, struct pci_dev *pci);

uint8_t virtio_status(const struct virtio_dev *vd);
void virtio_set_status(struct virtio_dev *vd, uint8_t status);     /* ORs the bits in */

/* Writes 0 to device_status and waits (up to the timeout) until it reads 0. */
bool virtio_reset(struct virtio_dev *vd);

/*
 * ACKNOWLEDGE, DRIVER, features: negotiates device & wanted (VERSION_1 is
 * required), sets FEATURES_OK and checks that it stuck.  Returns false
 * with a message printed on failure.
 */
bool virtio_negotiate(struct virtio_dev *vd, uint64_t wanted);

/* Programs MSI-X table entries 0..n-1 with vectors IRQ_VECTOR_BASE + i and enables MSI-X. */
bool virtio_msix_enable(struct virtio_dev *vd, uint16_t n);

/*
 * Legacy INTx instead of MSI-X: MSI-X disabled in its capability,
 * config_msix_vector NO_VECTOR, INTx-disable cleared in the Command register.
 * Needs the ISR capability (the interrupt handler reads it); returns false
 * with a message printed otherwise.
 */
bool virtio_intx_enable(struct virtio_dev *vd);

/*
 * Sets up queue `index` with at most max_size entries (rings allocated on
 * the first call for a given vq, reused and cleared after a reset).
 * msix_entry is the queue's MSI-X table entry (VIRTIO_MSI_NO_VECTOR for a
 * polled or INTx queue); irq_slot is the gk_irq_count index that counts its
 * interrupts, or -1 for a polled queue.
 */
bool virtio_queue_setup(struct virtio_dev *vd, struct virtq *vq, uint16_t index,
                        uint16_t max_size, uint16_t msix_entry, int irq_slot);

void virtio_driver_ok(struct virtio_dev *vd);

/* Device configuration space; 64-bit reads are two 32-bit reads checked against config_generation. */
uint8_t virtio_cfg_read8(const struct virtio_dev *vd, uint32_t off);
uint16_t virtio_cfg_read16(const struct virtio_dev *vd, uint32_t off);
uint32_t virtio_cfg_read32(const struct virtio_dev *vd, uint32_t off);
uint64_t virtio_cfg_read64(const struct virtio_dev *vd, uint32_t off);

/* Puts head in the next avail ring slot (not yet visible to the device). */
void virtq_push(struct virtq *vq, uint16_t head);
/*
 * Makes the pushed entries visible (avail->idx) and notifies the device if
 * it wants to be (event idx / NO_NOTIFY), or always when force is set.
 */
void virtq_kick(struct virtq *vq, bool force);
/* Takes the next used entry if there is one. */
bool virtq_pop(struct virtq *vq, struct virtq_used_elem *elem);
/* Device has used entries the driver did not take yet. */
static inline bool virtq_has_used(const struct virtq *vq)
{
    return *(volatile uint16_t *)&vq->used->idx != vq->last_used;
}
/*
 * Interrupt-driven queues: true when an interrupt came since the last call
 * that returned true.  Re-arms used_event (event idx) first.
 */
bool virtq_irq_taken(struct virtq *vq);
/* Tells the device when to interrupt next: after the entry at last_used. */
void virtq_arm(struct virtq *vq);

#endif
