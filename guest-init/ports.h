/* virtio-console ports by name: without udev there is no /dev/virtio-ports/NAME,
   so the name a launcher gave the port is looked up in sysfs. */
#ifndef HOSTEL_GUEST_PORTS_H
#define HOSTEL_GUEST_PORTS_H

#include <stddef.h>

#define PORT_PREFIX "port:"

/* For "port:NAME", the /dev node of the port named NAME, waiting up to
   `wait_ms` for it to appear (ports are announced asynchronously); any other
   spec is copied as it is. 0, or -1 when no such port shows up. */
int port_path(const char *spec, int wait_ms, char *out, size_t out_size);

#endif
