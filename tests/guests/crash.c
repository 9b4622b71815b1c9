/* A guest that faults with no IDT: #UD, then a double fault, then a triple
 * fault, which resets the CPU. The launcher must report a shutdown. */
#include "guest.h"

static int crash(uint64_t zero_page)
{
        (void)zero_page;
        puts_serial("about to crash\n");
        __asm__ volatile("lidt %0; ud2" : : "m"((struct { uint16_t l; uint64_t b; } __attribute__((packed))){ 0, 0 }));
        return 0;
}

GUEST_MAIN(crash)
