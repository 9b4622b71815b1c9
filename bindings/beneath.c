/* Confined opens (see beneath.h). */
#define _GNU_SOURCE
#include "beneath.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <string.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

int hostel_openat_beneath(int rootfd, const char *path, int flags, int mode)
{
        struct open_how how;

        memset(&how, 0, sizeof how);
        how.flags = (uint64_t)(flags | O_CLOEXEC);
        how.mode = (flags & (O_CREAT | O_TMPFILE)) ? (uint64_t)mode : 0;
        how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
        long fd = syscall(SYS_openat2, rootfd, *path ? path : ".", &how, sizeof how);
        return fd < 0 ? -errno : (int)fd;
}

int hostel_open_beneath(const char *root, const char *path, int flags, int mode)
{
        int rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);

        if (rootfd < 0)
                return -errno;
        int fd = hostel_openat_beneath(rootfd, path, flags, mode);
        close(rootfd);
        return fd;
}

long hostel_fs_type(int fd)
{
        struct statfs st;

        return fstatfs(fd, &st) < 0 ? -errno : (long)st.f_type;
}
