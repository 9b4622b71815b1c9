/* See netconf.h. */
#include "netconf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/ethtool.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

struct request {
    struct nlmsghdr header;
    char body[256];
};

int netconf_open(void)
{
    struct sockaddr_nl local = { .nl_family = AF_NETLINK };
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static void *start(struct request *req, int type, int flags, size_t header_size)
{
    memset(req, 0, sizeof(*req));
    req->header.nlmsg_len = NLMSG_LENGTH(header_size);
    req->header.nlmsg_type = (unsigned short)type;
    req->header.nlmsg_flags = (unsigned short)(NLM_F_REQUEST | NLM_F_ACK | flags);
    return NLMSG_DATA(&req->header);
}

static void add_attr(struct request *req, int type, const void *data, size_t len)
{
    char *end = (char *)&req->header + NLMSG_ALIGN(req->header.nlmsg_len);
    struct rtattr *attr = (struct rtattr *)end;
    attr->rta_type = (unsigned short)type;
    attr->rta_len = (unsigned short)RTA_LENGTH(len);
    memcpy(RTA_DATA(attr), data, len);
    req->header.nlmsg_len = NLMSG_ALIGN(req->header.nlmsg_len) + RTA_ALIGN(attr->rta_len);
}

/* Send and wait for the kernel's acknowledgement; 0 or -1 with errno. */
static int transact(int nl, struct request *req)
{
    struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
    char reply[4096];
    req->header.nlmsg_seq = 1;   /* one request in flight at a time */
    if (sendto(nl, req, req->header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
        return -1;
    for (;;) {
        ssize_t n = recv(nl, reply, sizeof(reply), 0);
        struct nlmsghdr *h = (struct nlmsghdr *)reply;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        for (; NLMSG_OK(h, (unsigned)n); h = NLMSG_NEXT(h, n)) {
            struct nlmsgerr *err = NLMSG_DATA(h);
            if (h->nlmsg_seq != req->header.nlmsg_seq || h->nlmsg_type != NLMSG_ERROR)
                continue;
            if (err->error == 0)
                return 0;
            errno = -err->error;
            return -1;
        }
    }
}

static int link_up(int nl, int index)
{
    struct request req;
    struct ifinfomsg *info = start(&req, RTM_NEWLINK, 0, sizeof(*info));
    info->ifi_family = AF_UNSPEC;
    info->ifi_index = index;
    info->ifi_flags = IFF_UP;
    info->ifi_change = IFF_UP;
    return transact(nl, &req);
}

/* ADDRESS/PREFIX (already validated) into binary form. */
static int split_cidr(const char *cidr, int family, unsigned char *binary, int *prefix)
{
    char address[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(cidr, '/');
    size_t n = (size_t)(slash - cidr);
    if (slash == NULL || n >= sizeof(address))
        return -1;
    memcpy(address, cidr, n);
    address[n] = '\0';
    *prefix = atoi(slash + 1);
    return inet_pton(family, address, binary) == 1 ? 0 : -1;
}

static int add_address(int nl, int index, int family, const char *cidr)
{
    struct request req;
    struct ifaddrmsg *addr = start(&req, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, sizeof(*addr));
    unsigned char binary[16];
    int prefix;
    size_t size = family == AF_INET ? 4 : 16;
    if (split_cidr(cidr, family, binary, &prefix) < 0) {
        errno = EINVAL;
        return -1;
    }
    addr->ifa_family = (unsigned char)family;
    addr->ifa_prefixlen = (unsigned char)prefix;
    addr->ifa_index = (unsigned)index;
    if (family == AF_INET)
        add_attr(&req, IFA_LOCAL, binary, size);
    add_attr(&req, IFA_ADDRESS, binary, size);
    return transact(nl, &req);
}

static int add_default_route(int nl, int index, int family, const char *gateway)
{
    struct request req;
    struct rtmsg *route = start(&req, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, sizeof(*route));
    unsigned char binary[16];
    unsigned oif = (unsigned)index;
    if (inet_pton(family, gateway, binary) != 1) {
        errno = EINVAL;
        return -1;
    }
    route->rtm_family = (unsigned char)family;
    route->rtm_table = RT_TABLE_MAIN;
    route->rtm_protocol = RTPROT_STATIC;
    route->rtm_scope = RT_SCOPE_UNIVERSE;
    route->rtm_type = RTN_UNICAST;
    add_attr(&req, RTA_GATEWAY, binary, family == AF_INET ? 4 : 16);
    add_attr(&req, RTA_OIF, &oif, sizeof(oif));
    return transact(nl, &req);
}

/* `ethtool -K LINK gso|tso off`. */
static int ethtool_off(const char *link, unsigned command)
{
    struct ethtool_value value = { .cmd = command, .data = 0 };
    struct ifreq ifr;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), result, saved;
    if (fd < 0)
        return -1;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", link);
    ifr.ifr_data = (void *)&value;
    result = ioctl(fd, SIOCETHTOOL, &ifr);
    saved = errno;
    close(fd);
    errno = saved;
    return result;
}

static int write_resolv_conf(const struct network_config *net, char *error, size_t error_size)
{
    FILE *f;
    if (mkdir("/etc", 0777) < 0 && errno != EEXIST) {
        snprintf(error, error_size, "creating /etc: %s", strerror(errno));
        return -1;
    }
    f = fopen("/etc/resolv.conf", "we");
    if (f == NULL) {
        snprintf(error, error_size, "writing /etc/resolv.conf: %s", strerror(errno));
        return -1;
    }
    fputs("# hostel resolver configuration\n", f);
    for (int i = 0; i < net->nameservers.count; i++)
        fprintf(f, "nameserver %s\n", net->nameservers.items[i]);
    if (fclose(f) != 0) {
        snprintf(error, error_size, "writing /etc/resolv.conf: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static void warn_errno(warn_fn warn, void *context, const char *what, const char *object)
{
    char message[256];
    snprintf(message, sizeof(message), what, object, strerror(errno));
    warn(context, message);
}

static int configure_ipv6(int nl, int index, const struct network_config *net, warn_fn warn,
                          void *context)
{
    if (add_address(nl, index, AF_INET6, net->ipv6_address) < 0) {
        warn_errno(warn, context, "cannot set up IPv6 on %s: %s", net->link);
        return 0;
    }
    return 1;
}

int netconf_loopback_up(int nl)
{
    int lo = (int)if_nametoindex("lo");
    return lo > 0 ? link_up(nl, lo) : 0;
}

int netconf_apply(int nl, const struct network_config *net, warn_fn warn, void *context,
                  char *error, size_t error_size)
{
    int index, ipv6 = 0;
    if (write_resolv_conf(net, error, error_size) < 0)
        return -1;
    if (ethtool_off(net->link, ETHTOOL_SGSO) < 0)
        warn_errno(warn, context, "cannot turn GSO off on %s: %s", net->link);
    if (ethtool_off(net->link, ETHTOOL_STSO) < 0)
        warn_errno(warn, context, "cannot turn TSO off on %s: %s", net->link);
    if (netconf_loopback_up(nl) < 0)
        goto failed;
    index = (int)if_nametoindex(net->link);
    if (index == 0) {
        char message[128];
        snprintf(message, sizeof(message), "no network link named %s; the guest has no network",
                 net->link);
        warn(context, message);
        return 0;
    }
    if (add_address(nl, index, AF_INET, net->ipv4_address) < 0)
        goto failed;
    if (*net->ipv6_address)
        ipv6 = configure_ipv6(nl, index, net, warn, context);
    if (link_up(nl, index) < 0 || add_default_route(nl, index, AF_INET, net->ipv4_gateway) < 0)
        goto failed;
    if (ipv6 && add_default_route(nl, index, AF_INET6, net->ipv6_gateway) < 0) {
        char message[256];
        snprintf(message, sizeof(message), "cannot add the IPv6 default route via %s: %s",
                 net->ipv6_gateway, strerror(errno));
        warn(context, message);
    }
    return 0;
failed:
    snprintf(error, error_size, "configuring the network on %s: %s", net->link, strerror(errno));
    return -1;
}
