/* See ports.h. */
#include "ports.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PORTS_DIR "/sys/class/virtio-ports"

/* 1 if /sys/class/virtio-ports/ENTRY/name holds `name`. */
static int has_name(const char *entry, const char *name)
{
    char path[512], found[256];
    ssize_t n;
    int fd;
    snprintf(path, sizeof(path), PORTS_DIR "/%s/name", entry);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, found, sizeof(found) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    found[n] = '\0';
    found[strcspn(found, "\n")] = '\0';
    return strcmp(found, name) == 0;
}

static int find_port(const char *name, char *out, size_t out_size)
{
    DIR *dir = opendir(PORTS_DIR);
    struct dirent *entry;
    int result = -1;
    if (dir == NULL)
        return -1;
    while (result < 0 && (entry = readdir(dir)) != NULL)
        if (entry->d_name[0] != '.' && has_name(entry->d_name, name)) {
            snprintf(out, out_size, "/dev/%s", entry->d_name);
            result = access(out, F_OK) == 0 ? 0 : -1;   /* devtmpfs may lag sysfs */
        }
    closedir(dir);
    return result;
}

int port_path(const char *spec, int wait_ms, char *out, size_t out_size)
{
    struct timespec tick = { 0, 1000000 };
    const char *name = spec + strlen(PORT_PREFIX);
    if (strncmp(spec, PORT_PREFIX, strlen(PORT_PREFIX)) != 0) {
        snprintf(out, out_size, "%s", spec);
        return 0;
    }
    for (int waited = 0; waited <= wait_ms; waited++) {
        if (find_port(name, out, out_size) == 0)
            return 0;
        nanosleep(&tick, NULL);
    }
    errno = ENOENT;
    return -1;
}
