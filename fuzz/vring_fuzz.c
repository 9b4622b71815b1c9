/* Fuzz target for bindings/vring.c: the input is guest memory.
 *
 * The first bytes choose the queue size, event-idx, a device kind and whether
 * guest RAM has an MMIO gap; the rest fills guest memory (descriptor table,
 * rings, buffers) exactly as a hostile guest could. The device side then
 * serves everything available. Guest memory is a heap block of exactly its
 * size, so AddressSanitizer sees any byte read or written outside it; with a
 * gap, the gap is poisoned (not RAM: the device must never touch it).
 *
 * libFuzzer: clang -fsanitize=fuzzer,address,undefined -Ibindings fuzz/vring_fuzz.c bindings/vring.c
 * gcc (no libFuzzer): add -DSTANDALONE; the program then runs random inputs
 * from a seed (or the files named on its command line). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <sanitizer/asan_interface.h>

#include "vring.h"

#define MEM_SIZE 16384
#define USED 8192
/* The MMIO gap of layouts that have one: above every ring area (the used ring
 * of 256 entries ends at 10246), with high RAM after it. */
#define GAP_START 12288
#define GAP_END 14336

static int backing_fd = -1;

static void check_chain(const struct hostel_chain *c, const uint8_t *mem, int gap)
{
        for (uint32_t i = 0; i < c->n_out + c->n_in; i++) {
                const uint8_t *p = c->iov[i].iov_base;
                uint64_t len = c->iov[i].iov_len;
                if (p < mem || p + len > mem + MEM_SIZE || p + len < p)
                        abort();
                if (gap && len && p < mem + GAP_END && p + len > mem + GAP_START)
                        abort();  /* a buffer touching the gap was accepted */
        }
}

/* Guest RAM as the device is told of it: all of memory, or two runs around the gap. */
static uint32_t ram_regions(int gap, struct hostel_mem_region *r)
{
        if (!gap) {
                r[0] = (struct hostel_mem_region){ 0, MEM_SIZE };
                return 1;
        }
        r[0] = (struct hostel_mem_region){ 0, GAP_START };
        r[1] = (struct hostel_mem_region){ GAP_END, MEM_SIZE - GAP_END };
        return 2;
}

/* What the device returned last must be sane: a head inside the queue, and no
 * rng request served with more than its cap of random bytes. (Only the last
 * used entry: buffers may alias the used ring, and later data overwrites it.) */
static void check_last_used(const struct hostel_vring *vq, int kind)
{
        if (vq->used_idx == 0)
                return;
        uint32_t elem[2];
        memcpy(elem, vq->mem + vq->used_gpa + 4 + 8ull * ((vq->used_idx - 1u) % vq->num), 8);
        if (elem[0] >= vq->num || (kind == HOSTEL_WORK_RNG && elem[1] > HOSTEL_RNG_MAX_REQUEST))
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        if (size < 4)
                return 0;
        uint32_t num = 1u << (data[0] % 9);           /* 1..256 */
        int event_idx = data[1] & 1;
        int gap = data[1] & 4;
        static const int kinds[] = { HOSTEL_WORK_BLK, HOSTEL_WORK_RNG, HOSTEL_WORK_CONSOLE_TX,
                                     HOSTEL_WORK_CONSOLE_RX };
        int kind = kinds[data[2] % 4];
        uint8_t *mem = calloc(1, MEM_SIZE);
        memcpy(mem, data + 3, size - 3 < MEM_SIZE ? size - 3 : MEM_SIZE);
        if (gap)
                ASAN_POISON_MEMORY_REGION(mem + GAP_START, GAP_END - GAP_START);
        /* ring areas at fixed places; sizes still checked by init */
        struct hostel_vring vq;
        struct hostel_mem_region ram[2];
        uint32_t n_ram = ram_regions(gap, ram);
        struct iovec *iov = calloc(num, sizeof(*iov));
        if (hostel_vring_init(&vq, mem, ram, n_ram, num, 0, 16 * num, USED, event_idx) == 0) {
                struct hostel_worker w;
                memset(&w, 0, sizeof(w));
                w.vq = &vq;
                w.kind = kind;
                w.io_fd = kind == HOSTEL_WORK_RNG ? -1 : backing_fd;
                w.capacity = 8;
                w.readonly = data[1] & 2;
                w.chain.iov = iov;
                w.chain.cap = num;
                w.kick_fd = w.call_fd = w.stop_fd = -1;
                int served = hostel_worker_process(&w);
                if (served >= 0)
                        check_chain(&w.chain, mem, gap);
                hostel_vring_should_notify(&vq);
                hostel_vring_should_notify(&vq);  /* the second takes the event-idx path */
                if ((served < 0) != (hostel_vring_error(&vq) != 0))
                        abort();
                check_last_used(&vq, kind);
        }
        free(iov);
        ASAN_UNPOISON_MEMORY_REGION(mem, MEM_SIZE);
        free(mem);
        return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
        (void)argc;
        (void)argv;
        backing_fd = memfd_create("fuzz-disk", 0);
        if (backing_fd < 0 || ftruncate(backing_fd, 8 * 512) < 0)
                abort();
        return 0;
}

#ifdef STANDALONE
/* A random input whose ring parts are mostly plausible, so the fuzzer gets
 * past the first checks: small indices, addresses inside memory, lengths small. */
static size_t random_input(uint8_t *buf, size_t cap, unsigned *seed)
{
        size_t size = 3 + (size_t)(rand_r(seed) % (int)(cap - 3));
        for (size_t i = 0; i < size; i++)
                buf[i] = (uint8_t)rand_r(seed);
        uint32_t num = 1u << (buf[0] % 9);
        for (uint32_t d = 0; d < num && 3 + 16 * d + 16 <= size; d++) {
                uint8_t *desc = buf + 3 + 16 * d;
                if (rand_r(seed) % 4) {
                        static const uint32_t types[] = { 0, 1, 4, 8, 0xdead };
                        uint64_t addr = (uint64_t)(rand_r(seed) % MEM_SIZE);
                        if (rand_r(seed) % 4 == 0)  /* near the gap: across it, or just short */
                                addr = GAP_START - (uint64_t)(rand_r(seed) % 600);
                        uint32_t len = (uint32_t)(rand_r(seed) % 2 ? 512 * (rand_r(seed) % 3)
                                                                    : rand_r(seed) % 600);
                        if (rand_r(seed) % 2 && 3 + addr + 16 <= size) {
                                /* a block request header where a buffer points */
                                uint32_t type = types[rand_r(seed) % 5];
                                uint64_t sector = (uint64_t)(rand_r(seed) % 10);
                                memcpy(buf + 3 + addr, &type, 4);
                                memcpy(buf + 3 + addr + 8, &sector, 8);
                                len = 16;
                        }
                        uint16_t next = (uint16_t)(rand_r(seed) % (num + 1));
                        memcpy(desc, &addr, 8);
                        memcpy(desc + 8, &len, 4);
                        desc[12] &= 3;
                        memcpy(desc + 14, &next, 2);
                }
        }
        if (rand_r(seed) % 3 == 0 && num >= 4 && size >= 3 + 64 + 4096) {
                /* a well-formed read or write: header, 512-byte data, status */
                uint32_t type = (uint32_t)(rand_r(seed) % 2);
                uint64_t sector = (uint64_t)(rand_r(seed) % 9);
                struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d[3] = {
                        { 1024, 16, 1, 1 },
                        { 2048, 512, (uint16_t)(type ? 1 : 3), 2 },
                        { 3072, 1, 2, 0 },
                };
                memcpy(buf + 3, d, sizeof(d));
                memcpy(buf + 3 + 1024, &type, 4);
                memcpy(buf + 3 + 1024 + 8, &sector, 8);
        }
        if (rand_r(seed) % 8 == 0 && size >= 3 + 16 * num) {
                /* every descriptor one writable buffer over all of memory, chained:
                 * an rng request for num times guest memory */
                buf[2] = 1;  /* HOSTEL_WORK_RNG */
                for (uint32_t d = 0; d < num; d++) {
                        struct { uint64_t addr; uint32_t len; uint16_t flags, next; } desc = {
                                0, MEM_SIZE, (uint16_t)(d + 1 < num ? 3 : 2), (uint16_t)(d + 1) };
                        memcpy(buf + 3 + 16 * d, &desc, sizeof(desc));
                }
        }
        uint32_t avail = 16 * num;
        if (3 + avail + 4 <= size) {
                uint16_t idx = (uint16_t)(rand_r(seed) % (num + 2));
                memcpy(buf + 3 + avail + 2, &idx, 2);
                for (uint32_t i = 0; i < num && 3 + avail + 4 + 2 * i + 2 <= size; i++) {
                        uint16_t head = (uint16_t)(rand_r(seed) % (num + 1));
                        memcpy(buf + 3 + avail + 4 + 2 * i, &head, 2);
                }
        }
        return size;
}

/* Chains near the spec's 2^32-byte bound need a large memory: descriptors over
 * a sparse 1 GiB mapping (nothing but the ring is touched), aliased at will.
 * A chain the device accepts must total at most 2^32 bytes. */
#define BIG_SIZE (1ull << 30)
#define BIG_NUM 8

static void big_chain_input(uint8_t *big, unsigned *seed)
{
        struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d[BIG_NUM];
        for (uint32_t i = 0; i < BIG_NUM; i++) {
                uint64_t len = rand_r(seed) % 2 ? BIG_SIZE - (uint64_t)(rand_r(seed) % 4096)
                                                : (uint64_t)(rand_r(seed) % 4096);
                d[i].addr = 0;
                d[i].len = (uint32_t)len;
                d[i].flags = (uint16_t)((rand_r(seed) % 4 ? 1 : 0) | (rand_r(seed) % 2 ? 2 : 0));
                d[i].next = (uint16_t)((i + 1) % BIG_NUM);
        }
        memcpy(big, d, sizeof(d));
        uint16_t head = (uint16_t)(rand_r(seed) % BIG_NUM), idx = 1;
        memcpy(big + 4096 + 4, &head, 2);
        memcpy(big + 4096 + 2, &idx, 2);
        struct hostel_vring vq;
        struct iovec iov[BIG_NUM];
        struct hostel_chain chain = { .cap = BIG_NUM, .iov = iov };
        struct hostel_mem_region ram = { 0, BIG_SIZE };
        if (hostel_vring_init(&vq, big, &ram, 1, BIG_NUM, 0, 4096, 8192, 0) < 0)
                abort();
        if (hostel_vring_pop(&vq, &chain) == 1 && chain.out_len + chain.in_len > (1ull << 32))
                abort();  /* a chain longer than the spec allows was accepted */
}

int main(int argc, char **argv)
{
        LLVMFuzzerInitialize(&argc, &argv);
        static uint8_t buf[MEM_SIZE + 3];
        if (argc > 1 && strcmp(argv[1], "--random") != 0) {
                for (int i = 1; i < argc; i++) {
                        FILE *f = fopen(argv[i], "rb");
                        if (!f)
                                return 2;
                        size_t n = fread(buf, 1, sizeof(buf), f);
                        fclose(f);
                        LLVMFuzzerTestOneInput(buf, n);
                }
                return 0;
        }
        unsigned seed = argc > 2 ? (unsigned)atoi(argv[2]) : 1;
        long runs = argc > 3 ? atol(argv[3]) : 10000;
        uint8_t *big = mmap(NULL, BIG_SIZE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (big == MAP_FAILED)
                return 2;
        for (long r = 0; r < runs; r++) {
                LLVMFuzzerTestOneInput(buf, random_input(buf, sizeof(buf), &seed));
                if (r % 16 == 0)
                        big_chain_input(big, &seed);
        }
        munmap(big, BIG_SIZE);
        printf("%ld inputs\n", runs);
        return 0;
}
#endif
