/* A guest that never ends (sleeping in hlt with interrupts off): for terminate. */
#include "guest.h"

static int spin(uint64_t zero_page)
{
        (void)zero_page;
        for (;;)
                __asm__ volatile("cli; hlt");
        return 0;
}

GUEST_MAIN(spin)
