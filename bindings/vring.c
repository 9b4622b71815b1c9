/* Split virtqueues and their device workers; see vring.h for the contract. */
#define _GNU_SOURCE
#include "vring.h"

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1

struct desc {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
};

/* Guest memory is shared with vCPUs running concurrently: every read of a ring
 * field is one atomic load, so each value is fetched exactly once (the
 * compiler may neither re-read nor tear it) and checked in the copy taken. */
static uint64_t load64(const struct hostel_vring *vq, uint64_t gpa)
{
        return __atomic_load_n((uint64_t *)(vq->mem + gpa), __ATOMIC_RELAXED);
}

static uint32_t load32(const struct hostel_vring *vq, uint64_t gpa)
{
        return __atomic_load_n((uint32_t *)(vq->mem + gpa), __ATOMIC_RELAXED);
}

static void store32(struct hostel_vring *vq, uint64_t gpa, uint32_t v)
{
        __atomic_store_n((uint32_t *)(vq->mem + gpa), v, __ATOMIC_RELAXED);
}

/* Whether [gpa, gpa+len) lies wholly inside region r (len 0: at most at its end). */
static int in_region(const struct hostel_mem_region *r, uint64_t gpa, uint64_t len)
{
        return gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa);
}

/* A pointer to [gpa, gpa+len) in guest memory, or NULL unless one RAM region
 * holds every byte: a range that starts in the MMIO gap or runs from RAM into
 * it is not guest memory, though the host mapping spans the gap. */
static void *gpa_range(const struct hostel_vring *vq, uint64_t gpa, uint64_t len)
{
        for (uint32_t i = 0; i < vq->n_regions; i++)
                if (in_region(&vq->region[i], gpa, len))
                        return vq->mem + gpa;
        return NULL;
}

/* Copy the regions in, refusing a count out of range or a region wrapping 64 bits. */
static int set_regions(struct hostel_vring *vq, const struct hostel_mem_region *regions,
                       uint32_t n)
{
        if (n == 0 || n > HOSTEL_VQ_MAX_REGIONS)
                return -1;
        for (uint32_t i = 0; i < n; i++) {
                if (regions[i].size > UINT64_MAX - regions[i].gpa)
                        return -1;
                vq->region[i] = regions[i];
        }
        vq->n_regions = n;
        return 0;
}

static uint16_t load16_acquire(const struct hostel_vring *vq, uint64_t gpa)
{
        return __atomic_load_n((uint16_t *)(vq->mem + gpa), __ATOMIC_ACQUIRE);
}

static uint16_t load16(const struct hostel_vring *vq, uint64_t gpa)
{
        return __atomic_load_n((uint16_t *)(vq->mem + gpa), __ATOMIC_RELAXED);
}

static void store16_release(struct hostel_vring *vq, uint64_t gpa, uint16_t v)
{
        __atomic_store_n((uint16_t *)(vq->mem + gpa), v, __ATOMIC_RELEASE);
}

/* The error is set by a worker thread and read by the transport (on a vCPU
 * thread) and the fuzz/race harnesses: the first error wins, atomically, and
 * is published before any interrupt that reports it. */
void hostel_vring_fail(struct hostel_vring *vq, int error)
{
        int none = HOSTEL_VQ_OK;
        __atomic_compare_exchange_n(&vq->error, &none, error, 0, __ATOMIC_RELEASE,
                                    __ATOMIC_RELAXED);
}

int hostel_vring_error(const struct hostel_vring *vq)
{
        return __atomic_load_n(&vq->error, __ATOMIC_ACQUIRE);
}

int hostel_vring_init(struct hostel_vring *vq, uint8_t *mem,
                      const struct hostel_mem_region *regions, uint32_t n_regions,
                      uint32_t num, uint64_t desc, uint64_t avail, uint64_t used,
                      int event_idx)
{
        memset(vq, 0, sizeof(*vq));
        vq->mem = mem;
        vq->num = num;
        vq->desc_gpa = desc;
        vq->avail_gpa = avail;
        vq->used_gpa = used;
        vq->event_idx = event_idx;
        if (set_regions(vq, regions, n_regions) < 0
            || num == 0 || num > HOSTEL_VQ_MAX_SIZE || (num & (num - 1))
            || desc % 16 || avail % 2 || used % 4
            || !gpa_range(vq, desc, 16ull * num)
            || !gpa_range(vq, avail, 6 + 2ull * num)
            || !gpa_range(vq, used, 6 + 8ull * num)) {
                hostel_vring_fail(vq, HOSTEL_VQ_BAD_LAYOUT);
                return -1;
        }
        return 0;
}

void hostel_vring_legacy_layout(uint32_t num, uint64_t base, uint32_t align,
                                uint64_t *desc, uint64_t *avail, uint64_t *used)
{
        *desc = base;
        *avail = base + 16ull * num;
        *used = (*avail + 6 + 2ull * num + align - 1) & ~((uint64_t)align - 1);
}

static int read_desc(struct hostel_vring *vq, uint32_t i, struct desc *d)
{
        uint64_t at = vq->desc_gpa + 16ull * i;
        uint32_t flags_next = load32(vq, at + 12);
        d->addr = load64(vq, at);
        d->len = load32(vq, at + 8);
        d->flags = (uint16_t)flags_next;
        d->next = (uint16_t)(flags_next >> 16);
        if (d->flags & DESC_F_INDIRECT) {
                hostel_vring_fail(vq, HOSTEL_VQ_INDIRECT);
                return -1;
        }
        return 0;
}

int hostel_vring_pop(struct hostel_vring *vq, struct hostel_chain *chain)
{
        if (hostel_vring_error(vq))
                return -1;
        uint16_t avail_idx = load16_acquire(vq, vq->avail_gpa + 2);
        uint16_t pending = (uint16_t)(avail_idx - vq->last_avail);
        if (pending == 0)
                return 0;
        if (pending > vq->num) {
                hostel_vring_fail(vq, HOSTEL_VQ_BAD_AVAIL_IDX);
                return -1;
        }
        uint16_t head = load16(vq, vq->avail_gpa + 4 + 2ull * (vq->last_avail % vq->num));
        if (head >= vq->num) {
                hostel_vring_fail(vq, HOSTEL_VQ_BAD_HEAD);
                return -1;
        }
        chain->head = head;
        chain->n_out = chain->n_in = 0;
        chain->out_len = chain->in_len = 0;
        uint32_t i = head, count = 0;
        struct desc d;
        do {
                if (count >= vq->num || count >= chain->cap) {
                        hostel_vring_fail(vq, HOSTEL_VQ_CHAIN_TOO_LONG);
                        return -1;
                }
                if (read_desc(vq, i, &d) < 0)
                        return -1;
                void *host = gpa_range(vq, d.addr, d.len);
                if (!host) {
                        hostel_vring_fail(vq, HOSTEL_VQ_BAD_ADDRESS);
                        return -1;
                }
                if ((uint64_t)d.len > HOSTEL_VQ_MAX_CHAIN_BYTES - chain->in_len - chain->out_len) {
                        hostel_vring_fail(vq, HOSTEL_VQ_CHAIN_TOO_BIG);
                        return -1;
                }
                if (d.flags & DESC_F_WRITE) {
                        chain->n_in++;
                        chain->in_len += d.len;
                } else {
                        if (chain->n_in) {
                                hostel_vring_fail(vq, HOSTEL_VQ_READ_AFTER_WRITE);
                                return -1;
                        }
                        chain->n_out++;
                        chain->out_len += d.len;
                }
                chain->iov[count].iov_base = host;
                chain->iov[count].iov_len = d.len;
                count++;
                if (d.flags & DESC_F_NEXT) {
                        if (d.next >= vq->num) {
                                hostel_vring_fail(vq, HOSTEL_VQ_BAD_NEXT);
                                return -1;
                        }
                        i = d.next;
                }
        } while (d.flags & DESC_F_NEXT);
        vq->last_avail++;
        return 1;
}

int hostel_vring_push(struct hostel_vring *vq, uint16_t head, uint32_t len)
{
        if (hostel_vring_error(vq))
                return -1;
        if (head >= vq->num) {  /* a device bug: never hand the driver a head it cannot own */
                hostel_vring_fail(vq, HOSTEL_VQ_BAD_HEAD);
                return -1;
        }
        uint64_t elem = vq->used_gpa + 4 + 8ull * (vq->used_idx % vq->num);
        store32(vq, elem, head);
        store32(vq, elem + 4, len);
        vq->used_idx++;
        store16_release(vq, vq->used_gpa + 2, vq->used_idx);
        return 0;
}

void hostel_vring_enable_kicks(struct hostel_vring *vq)
{
        if (vq->event_idx)
                store16_release(vq, vq->used_gpa + 4 + 8ull * vq->num, vq->last_avail);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

int hostel_vring_should_notify(struct hostel_vring *vq)
{
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (hostel_vring_error(vq))
                return 1;  /* the transport reports the breakage by interrupt */
        if (!vq->event_idx)
                return !(load16(vq, vq->avail_gpa) & AVAIL_F_NO_INTERRUPT);
        uint16_t old = vq->signalled_used, new = vq->used_idx;
        int valid = vq->signalled_valid;
        vq->signalled_used = new;
        vq->signalled_valid = 1;
        if (!valid)
                return 1;
        uint16_t used_event = load16(vq, vq->avail_gpa + 4 + 2ull * vq->num);
        return (uint16_t)(new - used_event - 1) < (uint16_t)(new - old);
}

/* Device data paths ------------------------------------------------------------ */

/* Copy request headers out of guest memory once, byte by byte with atomic
 * loads: the device then decides on its private copy only (no double fetch). */
static void copy_from_guest(uint8_t *dst, const uint8_t *src, uint64_t n)
{
        for (uint64_t i = 0; i < n; i++)
                dst[i] = __atomic_load_n(src + i, __ATOMIC_RELAXED);
}

/* Copy up to len bytes out of the readable part of a chain, skipping `skip`. */
static uint64_t chain_read(const struct hostel_chain *c, uint64_t skip, void *dst, uint64_t len)
{
        uint64_t done = 0;
        for (uint32_t i = 0; i < c->n_out && done < len; i++) {
                uint64_t l = c->iov[i].iov_len;
                if (skip >= l) {
                        skip -= l;
                        continue;
                }
                uint64_t n = l - skip < len - done ? l - skip : len - done;
                copy_from_guest((uint8_t *)dst + done, (const uint8_t *)c->iov[i].iov_base + skip, n);
                done += n;
                skip = 0;
        }
        return done;
}

/* A sub-vector of iov covering bytes [skip, skip+len) of iov[0..n). */
static int iov_slice(const struct iovec *iov, uint32_t n, uint64_t skip, uint64_t len,
                     struct iovec *out, uint32_t cap)
{
        uint32_t k = 0;
        for (uint32_t i = 0; i < n && len; i++) {
                uint64_t l = iov[i].iov_len;
                if (skip >= l) {
                        skip -= l;
                        continue;
                }
                if (k >= cap)
                        return -1;
                uint64_t take = l - skip < len ? l - skip : len;
                out[k].iov_base = (uint8_t *)iov[i].iov_base + skip;
                out[k].iov_len = take;
                k++;
                len -= take;
                skip = 0;
        }
        return (int)k;
}

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define BLK_ID_BYTES 20
#define MAX_IOV 1024

/* One block request: header readable, data, one writable status byte last. */
static int blk_request(struct hostel_worker *w, uint32_t *written)
{
        struct hostel_chain *c = &w->chain;
        struct hostel_vring *vq = w->vq;
        struct { uint32_t type; uint32_t reserved; uint64_t sector; } hdr;
        if (c->n_in == 0 || c->in_len < 1) {
                hostel_vring_fail(vq, c->out_len >= 16 ? HOSTEL_VQ_READONLY_WRITE : HOSTEL_VQ_BAD_REQUEST);
                return -1;
        }
        if (chain_read(c, 0, &hdr, sizeof(hdr)) != sizeof(hdr)) {
                hostel_vring_fail(vq, HOSTEL_VQ_BAD_REQUEST);
                return -1;
        }
        struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
        if (last->iov_len < 1) {
                hostel_vring_fail(vq, HOSTEL_VQ_BAD_REQUEST);
                return -1;
        }
        uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
        uint64_t in_data = c->in_len - 1, out_data = c->out_len - sizeof(hdr);
        struct iovec part[MAX_IOV];
        uint8_t result = BLK_S_OK;
        ssize_t n = 0;
        *written = 1;
        switch (hdr.type) {
        case BLK_T_IN:
        case BLK_T_OUT: {
                uint64_t len = hdr.type == BLK_T_IN ? in_data : out_data;
                if (len % 512 || hdr.sector > w->capacity || len / 512 > w->capacity - hdr.sector) {
                        result = BLK_S_IOERR;
                        break;
                }
                if (hdr.type == BLK_T_OUT && w->readonly) {
                        result = BLK_S_IOERR;
                        break;
                }
                int k = hdr.type == BLK_T_IN
                        ? iov_slice(c->iov + c->n_out, c->n_in, 0, len, part, MAX_IOV)
                        : iov_slice(c->iov, c->n_out, sizeof(hdr), len, part, MAX_IOV);
                if (k < 0) {
                        result = BLK_S_IOERR;
                        break;
                }
                off_t off = (off_t)(hdr.sector * 512);
                n = hdr.type == BLK_T_IN ? preadv(w->io_fd, part, k, off) : pwritev(w->io_fd, part, k, off);
                if (n < 0 || (uint64_t)n != len) {
                        w->vq->last_errno = n < 0 ? errno : EIO;
                        result = BLK_S_IOERR;
                        break;
                }
                if (hdr.type == BLK_T_IN)
                        *written += (uint32_t)n;
                break;
        }
        case BLK_T_FLUSH:
                if (!w->readonly && fdatasync(w->io_fd) < 0) {
                        w->vq->last_errno = errno;
                        result = BLK_S_IOERR;
                }
                break;
        case BLK_T_GET_ID: {
                int k = iov_slice(c->iov + c->n_out, c->n_in, 0,
                                  in_data < BLK_ID_BYTES ? in_data : BLK_ID_BYTES, part, MAX_IOV);
                uint64_t off = 0;
                for (int i = 0; i < k; i++) {
                        memcpy(part[i].iov_base, w->serial + off, part[i].iov_len);
                        off += part[i].iov_len;
                }
                *written += (uint32_t)off;
                break;
        }
        default:
                result = BLK_S_UNSUPP;
        }
        *status = result;
        return 0;
}

static int rng_request(struct hostel_worker *w, uint32_t *written)
{
        struct hostel_chain *c = &w->chain;
        if (c->n_out || !c->n_in) {
                hostel_vring_fail(w->vq, c->n_out ? HOSTEL_VQ_READONLY_WRITE : HOSTEL_VQ_BAD_REQUEST);
                return -1;
        }
        *written = 0;
        uint64_t budget = HOSTEL_RNG_MAX_REQUEST;  /* aliased buffers cannot ask for more */
        for (uint32_t i = 0; i < c->n_in && budget; i++) {
                uint8_t *p = c->iov[i].iov_base;
                size_t left = c->iov[i].iov_len < budget ? c->iov[i].iov_len : budget;
                budget -= left;
                while (left) {
                        ssize_t n = getrandom(p, left, 0);
                        if (n < 0) {
                                if (errno == EINTR)
                                        continue;
                                w->vq->last_errno = errno;
                                return 0;
                        }
                        p += n;
                        left -= (size_t)n;
                        *written += (uint32_t)n;
                }
        }
        return 0;
}

/* What serving one chain came to. */
enum serve_result {
        SERVE_BROKEN = -1,   /* the queue broke */
        SERVE_DONE = 0,      /* push the chain */
        SERVE_AGAIN = 1,     /* nothing to do now: the chain went back to the ring */
        SERVE_STOPPED = 2,   /* stop_fd fired while the worker waited on the host */
};

/* Wait until io_fd is writable; SERVE_STOPPED if stop_fd fires first. */
static int wait_writable(struct hostel_worker *w)
{
        for (;;) {
                struct pollfd p[2] = {
                        { .fd = w->stop_fd, .events = POLLIN },
                        { .fd = w->io_fd, .events = POLLOUT },
                };
                if (poll(p, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        w->vq->last_errno = errno;
                        return SERVE_DONE;
                }
                if (p[0].revents)
                        return SERVE_STOPPED;
                return SERVE_DONE;  /* writable, or an error the next write reports */
        }
}

/* Drop the first `n` bytes of an iovec array (after a partial write). */
static uint32_t iov_advance(struct iovec *iov, uint32_t count, uint64_t n)
{
        uint32_t i = 0;
        while (i < count && n >= iov[i].iov_len)
                n -= iov[i++].iov_len;
        if (i < count) {
                iov[i].iov_base = (uint8_t *)iov[i].iov_base + n;
                iov[i].iov_len -= n;
        }
        return i;
}

/* Transmit: everything readable goes to io_fd (a tap takes one frame per
 * write; a console takes bytes, and may take them in parts). io_fd is
 * nonblocking, so a reader that stops reading blocks the worker only in
 * poll, where stop_fd still reaches it. Writable parts are a driver bug. */
static int tx_request(struct hostel_worker *w, uint32_t *written)
{
        struct hostel_chain *c = &w->chain;
        if (c->n_in) {
                hostel_vring_fail(w->vq, HOSTEL_VQ_BAD_REQUEST);
                return SERVE_BROKEN;
        }
        *written = 0;
        struct iovec *iov = c->iov;
        uint32_t left = c->n_out;
        while (left) {
                ssize_t n = writev(w->io_fd, iov, (int)left);
                if (n >= 0) {
                        uint32_t done = iov_advance(iov, left, (uint64_t)n);
                        iov += done;
                        left -= done;
                } else if (errno == EAGAIN) {
                        if (wait_writable(w) == SERVE_STOPPED)
                                return SERVE_STOPPED;
                } else if (errno != EINTR) {
                        w->vq->last_errno = errno;  /* the output is gone: drop the bytes */
                        break;
                }
        }
        return SERVE_DONE;
}

/* Receive: one readv from io_fd into the writable parts. End of input (or
 * an error reading it) stops the listening, so an exhausted input never
 * wakes the worker again; "no data after all" gives the chain back. */
static int rx_request(struct hostel_worker *w, uint32_t *written)
{
        struct hostel_chain *c = &w->chain;
        if (c->n_out || !c->n_in) {
                hostel_vring_fail(w->vq, c->n_out ? HOSTEL_VQ_READONLY_WRITE : HOSTEL_VQ_BAD_REQUEST);
                return SERVE_BROKEN;
        }
        ssize_t n = readv(w->io_fd, c->iov, (int)c->n_in);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
                w->vq->last_avail--;  /* unpop: the next pop takes the same chain again */
                return SERVE_AGAIN;
        }
        if (n <= 0) {
                if (n < 0)
                        w->vq->last_errno = errno;
                w->io_fd = -1;  /* end of input: stop listening (the fd stays the caller's) */
                w->vq->last_avail--;
                return SERVE_AGAIN;
        }
        *written = (uint32_t)n;
        return SERVE_DONE;
}

static int serve_one(struct hostel_worker *w, uint32_t *written)
{
        switch (w->kind) {
        case HOSTEL_WORK_BLK: return blk_request(w, written);
        case HOSTEL_WORK_RNG: return rng_request(w, written);
        case HOSTEL_WORK_CONSOLE_TX:
        case HOSTEL_WORK_NET_TX: return tx_request(w, written);
        case HOSTEL_WORK_CONSOLE_RX:
        case HOSTEL_WORK_NET_RX: return rx_request(w, written);
        }
        hostel_vring_fail(w->vq, HOSTEL_VQ_BAD_REQUEST);
        return SERVE_BROKEN;
}

static int is_rx(const struct hostel_worker *w)
{
        return w->kind == HOSTEL_WORK_CONSOLE_RX || w->kind == HOSTEL_WORK_NET_RX;
}

/* poll's "something to read": data, or the end of it (a pipe whose writer
 * closed reports only POLLHUP, and a read then returns 0). */
#define READABLE (POLLIN | POLLHUP | POLLERR)

/* Whether io_fd has input (or its end) now: receive queues serve only then. */
static int input_ready(const struct hostel_worker *w)
{
        if (w->io_fd < 0)
                return 0;
        struct pollfd p = { .fd = w->io_fd, .events = POLLIN };
        return poll(&p, 1, 0) == 1 && (p.revents & READABLE);
}

int hostel_worker_process(struct hostel_worker *w)
{
        int served = 0;
        for (;;) {
                if (is_rx(w) && !input_ready(w))
                        break;
                hostel_vring_enable_kicks(w->vq);
                int r = hostel_vring_pop(w->vq, &w->chain);
                if (r <= 0) {
                        if (r < 0)
                                return -1;
                        break;
                }
                uint32_t written = 0;
                int result = serve_one(w, &written);
                if (result == SERVE_STOPPED)
                        return HOSTEL_WORKER_STOPPED;
                if (result == SERVE_AGAIN)
                        break;
                if (result < 0 || hostel_vring_push(w->vq, w->chain.head, written) < 0)
                        return -1;
                served++;
                w->served++;
        }
        return served;
}

void hostel_isr_set(uint32_t *isr, uint32_t bits)
{
        __atomic_fetch_or(isr, bits, __ATOMIC_SEQ_CST);
}

uint32_t hostel_isr_ack(uint32_t *isr, uint32_t bits)
{
        return __atomic_fetch_and(isr, ~bits, __ATOMIC_SEQ_CST);
}

static void signal_guest(struct hostel_worker *w)
{
        uint64_t one = 1;
        if (w->isr)
                hostel_isr_set(w->isr, hostel_vring_error(w->vq) ? 3u : 1u);
        if (w->call_fd >= 0 && write(w->call_fd, &one, sizeof(one)) < 0)
                w->vq->last_errno = errno;
}

int hostel_worker_run(struct hostel_worker *w)
{
        for (;;) {
                struct pollfd p[3] = {
                        { .fd = w->stop_fd, .events = POLLIN },
                        { .fd = w->kick_fd, .events = POLLIN },
                        { .fd = is_rx(w) ? w->io_fd : -1, .events = POLLIN },
                };
                if (poll(p, 3, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (p[0].revents)
                        return 0;
                uint64_t count;
                if ((p[1].revents & POLLIN) && read(w->kick_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
                        return -errno;
                int served = hostel_worker_process(w);
                if (served == HOSTEL_WORKER_STOPPED)
                        return 0;
                if (served > 0 || served < 0) {
                        if (served < 0 || hostel_vring_should_notify(w->vq))
                                signal_guest(w);
                        if (served < 0)
                                return -1;
                }
                if (is_rx(w) && (p[2].revents & READABLE) && w->io_fd >= 0 && served == 0) {
                        /* input waits for buffers: sleep on the kick only */
                        struct pollfd q[2] = { p[0], p[1] };
                        if (poll(q, 2, -1) < 0 && errno != EINTR)
                                return -errno;
                        if (q[0].revents)
                                return 0;
                }
        }
}
