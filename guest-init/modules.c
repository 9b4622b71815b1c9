/* See modules.h. */
#include "modules.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int load_one(const char *path, char *error, size_t error_size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    long result;
    if (fd < 0) {
        snprintf(error, error_size, "opening module %.300s: %s", path, strerror(errno));
        return -1;
    }
    result = syscall(SYS_finit_module, fd, "", 0);
    if (result < 0 && errno != EEXIST) {
        snprintf(error, error_size, "loading module %.300s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

int modules_load(const char *list, char *error, size_t error_size)
{
    char line[4096];
    FILE *f = fopen(list, "re");
    int result = 0;
    if (f == NULL) {
        if (errno == ENOENT)
            return 0;
        snprintf(error, error_size, "opening the module list %s: %s", list, strerror(errno));
        return -1;
    }
    /* A failure does not stop the rest: with virtio-console loaded the init
       can still report the failure on the channel. The first one is kept. */
    while (fgets(line, sizeof(line), f) != NULL) {
        char why[512];
        line[strcspn(line, "\n")] = '\0';
        if (line[0] == '\0' || line[0] == '#' || load_one(line, why, sizeof(why)) == 0)
            continue;
        if (result == 0)
            snprintf(error, error_size, "%s", why);
        result = -1;
    }
    fclose(f);
    return result;
}
