/* Split virtqueues (VIRTIO 1.x and the legacy lguest layout) over guest
 * memory, and the per-queue device workers that serve them.
 *
 * Everything read from the ring is guest-controlled. Each index is checked
 * against the queue size, and each address range must lie wholly inside one
 * region of guest RAM (a range into or across the MMIO gap is refused); any
 * violation marks the queue broken (the transport then raises
 * DEVICE_NEEDS_RESET) and no further chain is served. Nothing here trusts a
 * value it has read twice: each ring field is fetched once, by one atomic
 * load, and only that copy is checked and used. */
#ifndef HOSTEL_VRING_H
#define HOSTEL_VRING_H

#include <stdint.h>
#include <sys/uio.h>

#define HOSTEL_VQ_MAX_SIZE 32768
/* Runs of guest RAM a queue may address: below the MMIO gap and above 4 GiB
 * (room for a few more layouts). */
#define HOSTEL_VQ_MAX_REGIONS 4
/* The spec's bound on the total length of one chain (2.7.5.2). */
#define HOSTEL_VQ_MAX_CHAIN_BYTES (1ull << 32)
/* Random bytes one rng request gets at most: aliased descriptors could
 * otherwise ask for 2^32 bytes of getrandom per chain. */
#define HOSTEL_RNG_MAX_REQUEST 65536
/* hostel_worker_process: stop_fd fired while a request waited on the host. */
#define HOSTEL_WORKER_STOPPED (-2)

enum hostel_vq_error {
        HOSTEL_VQ_OK = 0,
        HOSTEL_VQ_BAD_LAYOUT,      /* ring areas outside memory or misaligned */
        HOSTEL_VQ_BAD_AVAIL_IDX,   /* avail idx moved more than the queue size */
        HOSTEL_VQ_BAD_HEAD,        /* a head index >= queue size */
        HOSTEL_VQ_BAD_NEXT,        /* a next index >= queue size */
        HOSTEL_VQ_CHAIN_TOO_LONG,  /* more descriptors than the queue holds: a loop */
        HOSTEL_VQ_BAD_ADDRESS,     /* a buffer outside guest memory */
        HOSTEL_VQ_INDIRECT,        /* indirect descriptors were not negotiated */
        HOSTEL_VQ_READ_AFTER_WRITE,/* a device-readable buffer after a writable one */
        HOSTEL_VQ_READONLY_WRITE,  /* the device must write where the guest said read-only */
        HOSTEL_VQ_BAD_REQUEST,     /* a request too short or malformed for the device */
        HOSTEL_VQ_IO_ERROR,        /* the host side failed (errno in last_errno) */
        HOSTEL_VQ_CHAIN_TOO_BIG,   /* a chain's buffers total more than 2^32 bytes */
};

/* A run of guest RAM, guest-physical. */
struct hostel_mem_region {
        uint64_t gpa;
        uint64_t size;
};

struct hostel_vring {
        /* guest memory: host address = mem + guest address, valid only inside
         * one of the regions (the MMIO gap between them is not RAM) */
        uint8_t *mem;
        struct hostel_mem_region region[HOSTEL_VQ_MAX_REGIONS];
        uint32_t n_regions;
        /* ring areas, guest-physical */
        uint64_t desc_gpa, avail_gpa, used_gpa;
        uint32_t num;
        int event_idx;
        /* device-side state */
        uint16_t last_avail;
        uint16_t used_idx;
        uint16_t signalled_used;   /* used idx at the last interrupt (event idx) */
        int signalled_valid;
        int error;                 /* enum hostel_vq_error; nonzero: broken. Shared between
                                      threads: read it with hostel_vring_error */
        int last_errno;
};

/* One available chain, split into device-readable then device-writable parts. */
struct hostel_chain {
        uint16_t head;
        uint32_t n_out, n_in;      /* iov[0..n_out) readable, then n_in writable */
        uint64_t out_len, in_len;
        uint32_t cap;              /* capacity of iov */
        struct iovec *iov;
};

/* Check the regions (1..HOSTEL_VQ_MAX_REGIONS, none wrapping 64 bits) and the
 * ring areas (size a power of two, alignment, each inside one region). */
int hostel_vring_init(struct hostel_vring *vq, uint8_t *mem,
                      const struct hostel_mem_region *regions, uint32_t n_regions,
                      uint32_t num, uint64_t desc, uint64_t avail, uint64_t used,
                      int event_idx);
/* The legacy (lguest, virtio 0.9) layout: one area, used ring aligned. */
void hostel_vring_legacy_layout(uint32_t num, uint64_t base, uint32_t align,
                                uint64_t *desc, uint64_t *avail, uint64_t *used);
/* 1: a chain was taken; 0: nothing available; -1: the queue is broken. */
int hostel_vring_pop(struct hostel_vring *vq, struct hostel_chain *chain);
/* Return a chain with `len` bytes written; -1 if broken. */
int hostel_vring_push(struct hostel_vring *vq, uint16_t head, uint32_t len);
/* Whether the driver wants an interrupt for what was pushed since the last one. */
int hostel_vring_should_notify(struct hostel_vring *vq);
/* Set avail_event (event idx) so the driver kicks us for the next chain. */
void hostel_vring_enable_kicks(struct hostel_vring *vq);
/* Break the queue with `error` unless it is broken already (first error wins). */
void hostel_vring_fail(struct hostel_vring *vq, int error);
/* The queue's error (0: working), with acquire ordering. */
int hostel_vring_error(const struct hostel_vring *vq);

/* Interrupt status shared by a device's workers and its transport. */
void hostel_isr_set(uint32_t *isr, uint32_t bits);
/* Clear `bits`; returns the value before. */
uint32_t hostel_isr_ack(uint32_t *isr, uint32_t bits);

/* Devices served by a worker. */
enum hostel_worker_kind {
        HOSTEL_WORK_BLK = 1,
        HOSTEL_WORK_RNG,
        HOSTEL_WORK_CONSOLE_TX,   /* guest -> host fd */
        HOSTEL_WORK_CONSOLE_RX,   /* host fd -> guest */
        HOSTEL_WORK_NET_TX,       /* guest -> tap */
        HOSTEL_WORK_NET_RX,       /* tap -> guest */
};

struct hostel_worker {
        struct hostel_vring *vq;
        int kind;
        int kick_fd;              /* eventfd the guest's notify write lands on (ioeventfd) */
        int call_fd;              /* eventfd wired to the guest interrupt (irqfd) */
        int stop_fd;              /* eventfd: the launcher tells the worker to return */
        int io_fd;                /* backing file, tap, console fd; -1 for rng (and for
                                     receive queues once their input ended) */
        int readonly;             /* blk: reject writes with VIRTIO_BLK_S_IOERR */
        uint64_t capacity;        /* blk: size in 512-byte sectors */
        char serial[20];          /* blk: GET_ID answer */
        uint64_t served;          /* chains completed */
        uint32_t *isr;            /* transport interrupt status, or NULL */
        struct hostel_chain chain;
};

/* Serve every available chain once, without blocking on the kick.
 * Returns the number served, -1 when the queue broke, HOSTEL_WORKER_STOPPED
 * when stop_fd fired while a request waited for its (nonblocking) io_fd. */
int hostel_worker_process(struct hostel_worker *w);
/* Loop: wait for a kick (or input, for receive queues), process, signal.
 * Returns 0 when stop_fd fires, -1 when the queue broke, -errno on host errors. */
int hostel_worker_run(struct hostel_worker *w);

#endif
