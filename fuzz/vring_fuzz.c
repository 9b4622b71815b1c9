/* Fuzz target for bindings/vring.c: the input is guest memory.
 *
 * The first bytes choose the queue size, event-idx and a device kind; the rest
 * fills guest memory (descriptor table, rings, buffers) exactly as a hostile
 * guest could. The device side then serves everything available. Guest memory
 * is a heap block of exactly its size, so AddressSanitizer sees any byte read
 * or written outside it.
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

#include "vring.h"

#define MEM_SIZE 16384

static int backing_fd = -1;

static void check_chain(const struct hostel_chain *c, const uint8_t *mem)
{
        for (uint32_t i = 0; i < c->n_out + c->n_in; i++) {
                const uint8_t *p = c->iov[i].iov_base;
                if (p < mem || p + c->iov[i].iov_len > mem + MEM_SIZE || p + c->iov[i].iov_len < p)
                        abort();
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        if (size < 4)
                return 0;
        uint32_t num = 1u << (data[0] % 9);           /* 1..256 */
        int event_idx = data[1] & 1;
        static const int kinds[] = { HOSTEL_WORK_BLK, HOSTEL_WORK_RNG, HOSTEL_WORK_CONSOLE_TX,
                                     HOSTEL_WORK_CONSOLE_RX };
        int kind = kinds[data[2] % 4];
        uint8_t *mem = calloc(1, MEM_SIZE);
        memcpy(mem, data + 3, size - 3 < MEM_SIZE ? size - 3 : MEM_SIZE);
        /* ring areas at fixed places; sizes still checked by init */
        struct hostel_vring vq;
        struct iovec *iov = calloc(num, sizeof(*iov));
        if (hostel_vring_init(&vq, mem, MEM_SIZE, num, 0, 16 * num, 8192, event_idx) == 0) {
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
                        check_chain(&w.chain, mem);
                hostel_vring_should_notify(&vq);
                hostel_vring_should_notify(&vq);  /* the second takes the event-idx path */
                if ((served < 0) != (vq.error != 0))
                        abort();
        }
        free(iov);
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
        for (long r = 0; r < runs; r++)
                LLVMFuzzerTestOneInput(buf, random_input(buf, sizeof(buf), &seed));
        printf("%ld inputs\n", runs);
        return 0;
}
#endif
