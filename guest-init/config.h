/* The guest's two configuration files, read and checked as
   hostel.guest.launchconfig reads them: image/config.json (the OCI image
   configuration) and launch.json (a LaunchRequest). Every string points into
   the json_doc it came from, which must outlive the structures. */
#ifndef HOSTEL_GUEST_CONFIG_H
#define HOSTEL_GUEST_CONFIG_H

#include <stddef.h>

#include "json.h"

struct strings {
    const char **items;
    int count;
};

struct image_config {
    struct strings entrypoint, cmd, env;
    const char *working_dir;   /* "" when unset */
    const char *user;          /* "" when unset */
};

struct network_config {
    const char *link;
    const char *ipv4_address, *ipv4_gateway;   /* ADDRESS/PREFIX, ADDRESS */
    const char *ipv6_address, *ipv6_gateway;   /* "" when absent */
    struct strings nameservers;
};

struct launch_request {
    int has_command;              /* 0: the image's Cmd */
    struct strings command;
    struct strings env_keys, env_values;
    const char *hostname;         /* NULL when unset */
    const char *terminal;         /* the client's TERM on a terminal; NULL: pipes */
    int has_network;
    struct network_config network;
};

/* 0 on success; -1 with a message naming the offending field in `error`. */
int image_config_read(const struct json_doc *doc, struct image_config *out,
                      char *error, size_t error_size);
int launch_request_read(const struct json_doc *doc, struct launch_request *out,
                        char *error, size_t error_size);
void image_config_free(struct image_config *config);
void launch_request_free(struct launch_request *request);

int valid_env_name(const char *name);

#endif
