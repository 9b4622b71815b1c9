/* Guest RAM's host mapping: one reservation spanning every guest-physical
 * address from 0 to the end of RAM (the MMIO gap included, so that host
 * address = base + guest address), backed by private anonymous memory.
 *
 * Private anonymous rather than a memfd: it is what the kernel backs with
 * transparent huge pages (shmem gets them only when the host's
 * shmem_enabled says so, and it says "never" by default), and KVM maps a
 * 2 MiB page of the host as one 2 MiB page of the guest only when host and
 * guest addresses agree modulo 2 MiB: the base is aligned to that. Every
 * first touch of a guest page is a page fault KVM must serve (under nested
 * virtualization, an exit to the outer hypervisor): 4 KiB pages cost 512
 * times as many of them. */
#ifndef HOSTEL_GUESTRAM_H
#define HOSTEL_GUESTRAM_H

#include <stdint.h>

#define HOSTEL_GUEST_RAM_ALIGN (2u << 20)

/* Map `span` bytes at a HOSTEL_GUEST_RAM_ALIGN-aligned *base, asking for huge
 * pages (a hint: the host may refuse). 0 or -errno. */
int hostel_guest_ram_map(uint64_t span, void **base);
/* Unmap what hostel_guest_ram_map gave. 0 or -errno. */
int hostel_guest_ram_unmap(void *base, uint64_t span);

#endif
