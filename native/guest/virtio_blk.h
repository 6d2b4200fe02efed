/* guestkit: virtio-blk driver (virtio 1.2, 5.2) on the modern PCI transport. */
#ifndef GUESTKIT_VIRTIO_BLK_H
#define GUESTKIT_VIRTIO_BLK_H

#include "virtio.h"

#define VIRTIO_BLK_PCI_MODERN           0x1042
#define VIRTIO_BLK_PCI_TRANSITIONAL     0x1001

/* feature bits */
#define VIRTIO_BLK_F_SIZE_MAX           1
#define VIRTIO_BLK_F_SEG_MAX            2
#define VIRTIO_BLK_F_RO                 5
#define VIRTIO_BLK_F_BLK_SIZE           6
#define VIRTIO_BLK_F_FLUSH              9
#define VIRTIO_BLK_F_TOPOLOGY           10
#define VIRTIO_BLK_F_MQ                 12
#define VIRTIO_BLK_F_DISCARD            13
#define VIRTIO_BLK_F_WRITE_ZEROES       14

/* request types */
#define VIRTIO_BLK_T_IN                 0
#define VIRTIO_BLK_T_OUT                1
#define VIRTIO_BLK_T_FLUSH              4
#define VIRTIO_BLK_T_GET_ID             8
#define VIRTIO_BLK_T_DISCARD            11
#define VIRTIO_BLK_T_WRITE_ZEROES       13

/* status byte */
#define VIRTIO_BLK_S_OK                 0
#define VIRTIO_BLK_S_IOERR              1
#define VIRTIO_BLK_S_UNSUPP             2

#define VIRTIO_BLK_ID_BYTES             20
#define SECTOR_SIZE                     512u

#define BLK_MAX_QUEUES                  IRQ_VECTORS
#define BLK_MAX_QD                      256
/* Data buffers are split into descriptors of at most this (or size_max) bytes. */
#define BLK_SEGMENT_DEFAULT             (16u * 1024)

struct virtio_blk_req_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* One request slot of a queue: its buffers live in DMA memory. */
struct blk_slot {
    struct virtio_blk_req_hdr *hdr;     /* device-readable */
    volatile uint8_t *status;           /* device-writable; read only after the used entry */
    uint8_t *data;                      /* max_io bytes */
    struct virtq_desc *indirect;        /* table, when INDIRECT_DESC is negotiated */
    uint16_t head;                      /* first descriptor of the slot */
    uint16_t queue;
    bool busy;
    uint32_t type;
    uint64_t lba;
    uint32_t len;                       /* data bytes */
    uint32_t used_len;                  /* from the used entry */
    uint64_t tag;                       /* for the caller */
};

struct blk_queue {
    struct virtq vq;
    struct blk_slot *slots;             /* opt.qd of them (allocated above the image) */
    uint16_t inflight;
    bool harvesting;                    /* interrupt taken, used entries being consumed */
};

/* How completions are noticed (the workloads' irq=0|1|intx, in this order). */
enum blk_irq_mode {
    BLK_IRQ_POLL,                       /* the used rings are polled */
    BLK_IRQ_MSIX,                       /* one MSI-X vector per queue, 0x40 + queue */
    BLK_IRQ_INTX,                       /* the legacy INTx line through the IOAPIC, vector 0x50 */
};

/* "0", "1", "intx": the words of irq=, indexed by enum blk_irq_mode */
extern const char *const blk_irq_words[];

struct blk_options {
    uint16_t queues;                    /* queues set up, 1..num_queues */
    uint16_t qd;                        /* request slots per queue */
    uint32_t max_io;                    /* largest data transfer of one request, bytes */
    enum blk_irq_mode irq;
    bool event_idx;                     /* negotiate VIRTIO_F_EVENT_IDX if offered */
    bool indirect;                      /* negotiate VIRTIO_F_INDIRECT_DESC if offered */
};

struct blk_dev {
    const char *who;                    /* workload name, for messages */
    unsigned int disk;
    struct virtio_dev vd;
    struct blk_options opt;
    bool ready;                         /* slot memory allocated */
    uint8_t intx_gsi;                   /* BLK_IRQ_INTX: the IOAPIC pin of the INTx line */

    /* configuration (5.2.4), fields of features not negotiated are 0 */
    uint64_t capacity;                  /* 512-byte sectors */
    uint32_t size_max, seg_max, blk_size;
    uint16_t num_queues;                /* 1 without VIRTIO_BLK_F_MQ */
    uint8_t physical_block_exp, alignment_offset;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint32_t max_discard_sectors, max_discard_seg, discard_sector_alignment;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    uint8_t write_zeroes_may_unmap;

    bool bad_used;                      /* a used entry named no request in flight */
    uint16_t bad_used_queue;
    uint32_t bad_used_id;

    uint32_t seg_len;                   /* bytes per data descriptor */
    uint16_t descs_per_slot;            /* header + data segments + status */
    struct blk_queue q[BLK_MAX_QUEUES];
};

static inline bool blk_has(const struct blk_dev *b, unsigned int bit)
{
    return b->vd.features & (1ull << bit);
}

/*
 * Finds the disk-th virtio-blk device on bus 0, initialises it for opt and
 * reads its configuration.  Exits with a message on failure (EXIT_USAGE
 * when the options do not fit the device).
 */
void blk_open(struct blk_dev *b, const char *who, unsigned int disk, const struct blk_options *opt);

/* Reset and initialise again (after DEVICE_NEEDS_RESET); returns false with a message. */
bool blk_reinit(struct blk_dev *b);

/* A free slot of queue q, or NULL. */
struct blk_slot *blk_free_slot(struct blk_dev *b, uint16_t q);

/* Builds the descriptors of a request in slot s and puts it in the avail ring. */
void blk_submit(struct blk_dev *b, struct blk_slot *s, uint32_t type, uint64_t lba, uint32_t len);

/* Publishes the submitted requests of queue q and notifies the device if needed. */
void blk_kick(struct blk_dev *b, uint16_t q);

/*
 * Waits for one request to complete on any queue and returns its slot (no
 * longer busy; the caller reads status and data).  Exits with an error on
 * timeout, on DEVICE_NEEDS_RESET and on a used entry that names no
 * request in flight.
 */
struct blk_slot *blk_wait(struct blk_dev *b);

enum blk_wait_result {
    BLK_WAIT_DONE,
    BLK_WAIT_TIMEOUT,
    BLK_WAIT_NEEDS_RESET,               /* DEVICE_NEEDS_RESET in device_status */
    BLK_WAIT_BAD_USED,                  /* a used entry named no request in flight */
};

/* blk_wait without exiting: *done is set with BLK_WAIT_DONE. */
enum blk_wait_result blk_wait_until(struct blk_dev *b, uint64_t deadline, struct blk_slot **done);

/* Prints what a wait result means (no newline), e.g. which queue stalled. */
void blk_describe_wait(struct blk_dev *b, enum blk_wait_result r);

/* Total requests in flight over all queues. */
unsigned int blk_inflight(const struct blk_dev *b);

/* One request on queue q, waited for; returns its status.  Nothing else may be in flight. */
uint8_t blk_sync(struct blk_dev *b, uint16_t q, uint32_t type, uint64_t lba, uint32_t len,
                 struct blk_slot **slot);

/* The device's GET_ID string (empty when unsupported), NUL-terminated. */
void blk_get_id(struct blk_dev *b, char id[VIRTIO_BLK_ID_BYTES + 1]);

#endif
