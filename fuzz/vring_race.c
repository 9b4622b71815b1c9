/* Race harness for bindings/vring.c, built with ThreadSanitizer.
 *
 * A guest's driver runs on another CPU while the device side reads the ring,
 * and the transport reads the queue's error from a third thread. Here three
 * threads play those parts on one ring in heap memory:
 *   driver:    offers one-descriptor chains, and keeps rewriting the
 *              descriptors of chains it has offered (a hostile guest may),
 *              then offers a chain whose next index is beyond the queue;
 *   device:    pops, checks every buffer it got lies inside memory, pushes;
 *   transport: polls the error until the device breaks the queue.
 * The guest side uses atomic accesses (it is another CPU: its stores are
 * single stores). ThreadSanitizer then reports any plain access the device
 * side makes to shared memory -- a memcpy of a descriptor, a non-atomic error
 * flag -- as a data race, and the program exits nonzero.
 *
 *   gcc -g -O1 -fsanitize=thread -Ibindings fuzz/vring_race.c bindings/vring.c -o vring_race
 *   ./vring_race ROUNDS */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vring.h"

#define NUM 8
#define MEM_SIZE 65536
#define DESC 0
#define AVAIL 4096
#define USED 8192
#define DATA 16384
#define F_NEXT 1

struct shared {
        uint8_t *mem;
        struct hostel_vring vq;
        long rounds;
        int device_done;
};

static void put64(uint8_t *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); }
static void put32(uint8_t *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }
static void put16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static uint16_t get16(uint8_t *p) { return __atomic_load_n((uint16_t *)p, __ATOMIC_ACQUIRE); }
static uint32_t get32(uint8_t *p) { return __atomic_load_n((uint32_t *)p, __ATOMIC_RELAXED); }

static void write_desc(uint8_t *mem, unsigned i, uint64_t addr, uint32_t len, uint16_t flags,
                       uint16_t next)
{
        uint8_t *d = mem + DESC + 16 * i;
        put64(d, addr);
        put32(d + 8, len);
        put16(d + 12, flags);
        put16(d + 14, next);
}

static void *driver(void *arg)
{
        struct shared *s = arg;
        uint16_t avail = 0, used_seen = 0;
        unsigned seed = 7;
        for (long r = 0; r <= s->rounds; r++) {
                while ((uint16_t)(avail - get16(s->mem + USED + 2)) >= NUM)
                        if (__atomic_load_n(&s->device_done, __ATOMIC_ACQUIRE))
                                return NULL;
                unsigned slot = avail % NUM;
                int last = r == s->rounds;
                write_desc(s->mem, slot, DATA + 64 * slot, 64, last ? F_NEXT : 0, last ? NUM + 1 : 0);
                put16(s->mem + AVAIL + 4 + 2 * slot, (uint16_t)slot);
                __atomic_store_n((uint16_t *)(s->mem + AVAIL + 2), ++avail, __ATOMIC_RELEASE);
                /* hostile: rewrite an offered descriptor while the device may read it
                 * (with values that stay valid, so the rounds go on) */
                unsigned victim = (unsigned)rand_r(&seed) % NUM;
                write_desc(s->mem, victim, DATA + (unsigned)rand_r(&seed) % 1024,
                           (uint32_t)rand_r(&seed) % 64, (uint16_t)(rand_r(&seed) & 2), 0);
                uint16_t used = get16(s->mem + USED + 2);
                while (used_seen != used) {
                        if (get32(s->mem + USED + 4 + 8 * (used_seen % NUM)) >= NUM)
                                abort();  /* a head the driver never offered */
                        used_seen++;
                }
        }
        return NULL;
}

static void *device(void *arg)
{
        struct shared *s = arg;
        struct iovec iov[NUM];
        struct hostel_chain chain = { .cap = NUM, .iov = iov };
        for (;;) {
                int r = hostel_vring_pop(&s->vq, &chain);
                if (r < 0)
                        break;
                if (r == 0)
                        continue;
                for (uint32_t i = 0; i < chain.n_out + chain.n_in; i++) {
                        uint8_t *p = iov[i].iov_base;
                        if (p < s->mem || iov[i].iov_len > MEM_SIZE
                            || p + iov[i].iov_len > s->mem + MEM_SIZE)
                                abort();  /* a buffer escaped guest memory */
                }
                hostel_vring_push(&s->vq, chain.head, 0);
        }
        __atomic_store_n(&s->device_done, 1, __ATOMIC_RELEASE);
        return NULL;
}

/* The transport's view: hostel_vring_error is this acquire load. */
static void *transport(void *arg)
{
        struct shared *s = arg;
        while (!__atomic_load_n(&s->vq.error, __ATOMIC_ACQUIRE))
                ;
        return NULL;
}

int main(int argc, char **argv)
{
        struct shared s = { .rounds = argc > 1 ? atol(argv[1]) : 20000 };
        s.mem = aligned_alloc(4096, MEM_SIZE);
        memset(s.mem, 0, MEM_SIZE);
        struct hostel_mem_region ram = { 0, MEM_SIZE };
        if (hostel_vring_init(&s.vq, s.mem, &ram, 1, NUM, DESC, AVAIL, USED, 0) < 0)
                return 2;
        pthread_t t[3];
        pthread_create(&t[0], NULL, driver, &s);
        pthread_create(&t[1], NULL, device, &s);
        pthread_create(&t[2], NULL, transport, &s);
        for (int i = 0; i < 3; i++)
                pthread_join(t[i], NULL);
        int error = s.vq.error;  /* the threads are joined */
        printf("error %d\n", error);
        free(s.mem);
        return error == HOSTEL_VQ_BAD_NEXT ? 0 : 3;  /* only the last chain is bad */
}
