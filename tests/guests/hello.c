/* The smallest guest: say hello on the 16550 and power off with status 0. */
#include "guest.h"

static int hello(uint64_t zero_page)
{
        (void)zero_page;
        puts_serial("hello from the guest\n");
        return 0;
}

GUEST_MAIN(hello)
