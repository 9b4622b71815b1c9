/* From the image configuration and the launch request to the process the
   guest runs: launchconfig.build_process's rules (request command replaces
   Cmd, Entrypoint in front, /bin/sh last; PATH (a default), HOSTNAME, HOME
   and TERM on a terminal, then the image's env, then the request's; PATH
   lookup inside the guest's root; cwd defaults to "/"). Must run after the
   chroot: paths are the guest's. */
#ifndef HOSTEL_GUEST_PROCESS_H
#define HOSTEL_GUEST_PROCESS_H

#include "config.h"

struct process {
    char *path;      /* what execve gets */
    char **argv;     /* argv[0] is the executable's file name */
    char **envp;     /* KEY=VALUE, in the order Python's dict keeps */
    char *cwd;
    const char *user;
};

/* 0, or -1 when memory runs out. */
int process_build(const struct image_config *image, const struct launch_request *request,
                  const char *home, struct process *out);

/* posixpath.normpath of an absolute path, into a new string. */
char *normalize_path(const char *path);

#endif
