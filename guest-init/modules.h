/* Kernel modules the initramfs carries, loaded before anything needs them. */
#ifndef HOSTEL_GUEST_MODULES_H
#define HOSTEL_GUEST_MODULES_H

#include <stddef.h>

/* Load every module named in `list` (one path a line, dependencies first,
   as hostel.guest.initramfs writes it) with finit_module. A missing list
   means there is nothing to load (0). A module already present is fine.
   Every module is tried; 0, or -1 with a message naming the first that
   failed in `error`. */
int modules_load(const char *list, char *error, size_t error_size);

#endif
