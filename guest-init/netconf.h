/* The guest's network, as init.network_setup and init.configure_link set it
   up: /etc/resolv.conf, GSO and TSO off on the link, loopback up, the
   addresses, the link up, default routes. Talks rtnetlink directly. */
#ifndef HOSTEL_GUEST_NETCONF_H
#define HOSTEL_GUEST_NETCONF_H

#include "config.h"

typedef void (*warn_fn)(void *context, const char *message);

/* Open the rtnetlink socket (before the chroot, like the Python init). */
int netconf_open(void);

/* Loopback up: 0, or -1 with errno. Every guest has it, with a network or
   without (as a container has), so netconf_apply does it too. */
int netconf_loopback_up(int nl);

/* 0, or -1 with a message in `error` for a failure the guest cannot run
   without (IPv4); IPv6 and offload failures are warnings only. */
int netconf_apply(int nl, const struct network_config *net, warn_fn warn, void *context,
                  char *error, size_t error_size);

#endif
