#include "bootmarker.h"

#include <sys/io.h>

int boot_marker_allow(void)
{
    return ioperm(BOOT_MARKER_PORT, 1, 1);
}

void boot_marker_write(void)
{
    outb(BOOT_MARKER_VALUE, BOOT_MARKER_PORT);
    ioperm(BOOT_MARKER_PORT, 1, 0);   /* dropping access cannot fail for want of privilege */
}
