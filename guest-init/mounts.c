/* See mounts.h. */
#include "mounts.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define KERNEL_FS_FLAGS (MS_NOEXEC | MS_NOSUID)

static int do_mount(const char *source, const char *target, const char *fstype,
                    unsigned long flags, const char *data, char *error, size_t error_size)
{
    if (mount(source, target, fstype, flags, data) == 0)
        return 0;
    snprintf(error, error_size, "mounting %s on %s: %s", fstype ? fstype : source, target,
             strerror(errno));
    return -1;
}

static int make_one(const char *path, mode_t mode)
{
    if (mkdir(path, 0777) < 0)
        return errno == EEXIST ? 0 : -1;
    return mode == (mode_t)-1 ? 0 : chmod(path, mode);
}

void join_path(char *out, size_t size, const char *dir, const char *name)
{
    size_t n = strlen(dir);
    snprintf(out, size, "%s%s%s", dir, n > 0 && dir[n - 1] == '/' ? "" : "/", name);
}

int make_dirs(const char *path, mode_t mode)
{
    char partial[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof(partial)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(partial, path, n + 1);
    for (char *p = partial + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(partial, 0777) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return make_one(partial, mode);
}

static int dirs(const char *path, mode_t mode, char *error, size_t error_size)
{
    if (make_dirs(path, mode) == 0)
        return 0;
    snprintf(error, error_size, "creating %s: %s", path, strerror(errno));
    return -1;
}

static int link_once(const char *target, const char *path, char *error, size_t error_size)
{
    if (symlink(target, path) == 0 || errno == EEXIST)
        return 0;
    snprintf(error, error_size, "linking %s to %s: %s", path, target, strerror(errno));
    return -1;
}

int mounts_early(char *error, size_t error_size)
{
    static const struct { const char *path; mode_t mode; } directories[] = {
        { "/dev", 0755 }, { "/proc", (mode_t)-1 }, { "/sys", 0555 }, { "/root", 0700 },
        { "/tmp", (mode_t)-1 }, { "/run", 0755 },
    };
    static const char *const std_names[] = { "stdin", "stdout", "stderr" };
    char target[32], path[32];
    if (do_mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL, error, error_size) < 0)
        return -1;
    for (size_t i = 0; i < sizeof(directories) / sizeof(directories[0]); i++)
        if (dirs(directories[i].path, directories[i].mode, error, error_size) < 0)
            return -1;
    /* EBUSY: devtmpfs is there already (CONFIG_DEVTMPFS_MOUNT, or a host under test). */
    if (mount("devtmpfs", "/dev", "devtmpfs", KERNEL_FS_FLAGS, "mode=0755") < 0 && errno != EBUSY) {
        snprintf(error, error_size, "mounting devtmpfs on /dev: %s", strerror(errno));
        return -1;
    }
    if (do_mount("proc", "/proc", "proc", KERNEL_FS_FLAGS, NULL, error, error_size) < 0 ||
        do_mount("sysfs", "/sys", "sysfs", KERNEL_FS_FLAGS, NULL, error, error_size) < 0 ||
        link_once("/proc/self/fd", "/dev/fd", error, error_size) < 0)
        return -1;
    for (int i = 0; i < 3; i++) {
        snprintf(target, sizeof(target), "/proc/self/fd/%d", i);
        snprintf(path, sizeof(path), "/dev/%s", std_names[i]);
        if (link_once(target, path, error, error_size) < 0)
            return -1;
    }
    return do_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", KERNEL_FS_FLAGS | MS_RELATIME, NULL,
                    error, error_size);
}

int mounts_squashfs(const char *device, const char *where, char *error, size_t error_size)
{
    if (dirs(where, (mode_t)-1, error, error_size) < 0)
        return -1;
    return do_mount(device, where, "squashfs", MS_RDONLY, NULL, error, error_size);
}

int mounts_new_root(const char *work, char *error, size_t error_size)
{
    char overlay[PATH_MAX], image[PATH_MAX], lower[PATH_MAX + 8], sub[PATH_MAX + 8];
    char new_root[PATH_MAX], source[PATH_MAX + 16], data[3 * PATH_MAX + 64];
    static const char *const names[] = { "upper", "work", "image" };
    join_path(overlay, sizeof(overlay), work, "overlay");
    join_path(image, sizeof(image), work, "image");
    snprintf(lower, sizeof(lower), "%s/image", overlay);
    join_path(new_root, sizeof(new_root), work, "newroot");
    if (dirs(overlay, (mode_t)-1, error, error_size) < 0 ||
        do_mount("tmpfs", overlay, "tmpfs", 0, NULL, error, error_size) < 0)
        return -1;
    for (int i = 0; i < 3; i++) {
        snprintf(sub, sizeof(sub), "%s/%s", overlay, names[i]);
        if (dirs(sub, (mode_t)-1, error, error_size) < 0)
            return -1;
    }
    snprintf(source, sizeof(source), "overlayfs:%s", overlay);
    snprintf(data, sizeof(data), "lowerdir=%s/image,upperdir=%s/upper,workdir=%s/work",
             overlay, overlay, overlay);
    if (do_mount(image, lower, NULL, MS_BIND, NULL, error, error_size) < 0 ||
        do_mount(NULL, lower, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL, error,
                 error_size) < 0 ||
        dirs(new_root, (mode_t)-1, error, error_size) < 0 ||
        do_mount(source, new_root, "overlay", MS_NOATIME, data, error, error_size) < 0)
        return -1;
    if (chdir(new_root) < 0) {
        snprintf(error, error_size, "entering %s: %s", new_root, strerror(errno));
        return -1;
    }
    return 0;
}

int mounts_enter_new_root(char *error, size_t error_size)
{
    static const char *const apis[] = { "/sys", "/proc", "/dev" };
    char cwd[PATH_MAX], target[PATH_MAX + 8];
    if (getcwd(cwd, sizeof(cwd)) == NULL) {
        snprintf(error, error_size, "finding the new root: %s", strerror(errno));
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        snprintf(target, sizeof(target), "%s%s", cwd, apis[i]);
        if (dirs(target, (mode_t)-1, error, error_size) < 0 ||
            do_mount(apis[i], target, NULL, MS_MOVE, NULL, error, error_size) < 0)
            return -1;
    }
    if (do_mount(".", "/", NULL, MS_BIND, NULL, error, error_size) < 0)
        return -1;
    if (chroot(".") < 0 || chdir("/") < 0) {
        snprintf(error, error_size, "entering the new root %s: %s", cwd, strerror(errno));
        return -1;
    }
    return 0;
}
