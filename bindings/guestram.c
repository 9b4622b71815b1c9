/* Guest RAM's host mapping; see guestram.h for why it looks like this. */
#define _GNU_SOURCE
#include "guestram.h"

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>

/* Give back the parts of [p, p+len) outside [keep, keep+span). */
static void trim(uint8_t *p, uint64_t len, uint8_t *keep, uint64_t span)
{
        if (keep > p)
                munmap(p, (size_t)(keep - p));
        if (keep + span < p + len)
                munmap(keep + span, (size_t)(p + len - (keep + span)));
}

int hostel_guest_ram_map(uint64_t span, void **base)
{
        if (span == 0 || span > UINT64_MAX - HOSTEL_GUEST_RAM_ALIGN)
                return -EINVAL;
        /* over-reserve by one alignment unit, then cut the aligned span out */
        uint64_t len = span + HOSTEL_GUEST_RAM_ALIGN;
        uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
                return -errno;
        uintptr_t aligned = ((uintptr_t)p + HOSTEL_GUEST_RAM_ALIGN - 1)
                            & ~(uintptr_t)(HOSTEL_GUEST_RAM_ALIGN - 1);
        uint8_t *keep = (uint8_t *)aligned;
        trim(p, len, keep, span);
        /* hints: EINVAL where THP is not built in; the mapping works without.
         * DONTFORK: a child forked later (none is, today) gets no copy-on-write
         * share of guest RAM, which would break KVM's mapping of it. */
        (void)madvise(keep, span, MADV_HUGEPAGE);
        (void)madvise(keep, span, MADV_DONTFORK);
        *base = keep;
        return 0;
}

int hostel_guest_ram_unmap(void *base, uint64_t span)
{
        return munmap(base, span) < 0 ? -errno : 0;
}
