/* The boot marker (the launcher's port 0x3f0, Firecracker's value 123): with
 * the command line "marker" the guest writes another value first (ignored),
 * then the marker twice (the first counts); with any other command line only
 * the other value. It powers off with status 0 either way. */
#include "guest.h"

#define BOOT_MARKER_PORT 0x3f0
#define BOOT_MARKER_VALUE 123

static int mark(uint64_t zero_page)
{
        const char *cmd = (const char *)(uint64_t)*(const uint32_t *)(zero_page + 0x228);
        outb(BOOT_MARKER_PORT, 7);
        if (cmd[0] == 'm') {
                outb(BOOT_MARKER_PORT, BOOT_MARKER_VALUE);
                outb(BOOT_MARKER_PORT, BOOT_MARKER_VALUE);
        }
        return 0;
}

GUEST_MAIN(mark)
