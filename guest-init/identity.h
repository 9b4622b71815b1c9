/* Who the task runs as: OCI's User (USER, UID, USER:GROUP, UID:GID) looked up
   in the guest's own /etc/passwd and /etc/group, as init.resolve_identity and
   hostel.machine.users do (files only, strict about malformed lines). */
#ifndef HOSTEL_GUEST_IDENTITY_H
#define HOSTEL_GUEST_IDENTITY_H

#include <stddef.h>
#include <sys/types.h>

#define IDENTITY_MAX_GROUPS 64

struct identity {
    uid_t uid;
    gid_t gid;
    gid_t groups[IDENTITY_MAX_GROUPS];   /* supplementary, /etc/group order */
    int group_count;
    char home[4096];   /* HOME: /root for root, "/" for an unlisted UID, else /etc/passwd's */
};

/* 0, or -1 with a message in `error`. Reads /etc/passwd and /etc/group of the
   current root. */
int identity_resolve(const char *spec, struct identity *out, char *error, size_t error_size);

#endif
