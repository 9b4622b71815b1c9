/* The escape probe: what root inside a container can do to the host.
 *
 * Built static by tests/integration/test_machine_escape.py and run as the
 * payload of a systemd-nspawn 252 container and of a hostel one, on copies of
 * the same busybox tree. Each check prints one line, "NAME ALLOWED" when the
 * kernel let the action through (or its permission check passed and it failed
 * later, e.g. EINVAL on a deliberately empty argument) and "NAME BLOCKED:ERRNO"
 * when a permission check (capability, seccomp, device policy, read-only
 * mount) or the container's view (ENOENT, nothing to reach) stopped it.
 *
 * Nothing here harms the host when allowed: writes put back the value just
 * read, the clock is set to the time it shows, keys are added with a name the
 * test removes, and reboot() asks for a command a pid namespace refuses.
 *
 * argv: CANARY_KEY_TEXT DISK_MAJOR DISK_MINOR */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <linux/reboot.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

#define CANARY_KEY "hostel-probe-canary"
#define CANARY_CGROUP "hostel-probe-canary"

static int denied(int err)
{
        return err == EPERM || err == EACCES || err == ENOSYS || err == EROFS ||
               err == ENOENT || err == ENOKEY || err == ENODEV || err == ENXIO;
}

static void verdict(const char *name, int ok, int err)
{
        if (ok || !denied(err))
                printf("%s ALLOWED\n", name);
        else
                printf("%s BLOCKED:%s\n", name, strerrorname_np(err));
        fflush(stdout);
}

/* `ok` is computed (and *err set) before the verdict reads *err. */
static void checked(const char *name, int ok, const int *err)
{
        verdict(name, ok, *err);
}

/* A system call whose only interesting failure is the permission check. */
static void call(const char *name, long r)
{
        verdict(name, r >= 0, r < 0 ? errno : 0);
}

static void keyring(const char *canary)
{
        char buf[256];
        long ring = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0);
        long key = ring < 0 ? ring :
                syscall(SYS_keyctl, KEYCTL_SEARCH, ring, "user", CANARY_KEY, 0);
        long n = key < 0 ? key : syscall(SYS_keyctl, KEYCTL_READ, key, buf, sizeof buf - 1);
        int err = n < 0 ? errno : 0;
        if (n >= 0)
                buf[n] = 0;
        verdict("keyring_read", n >= 0 && strcmp(buf, canary) == 0, n >= 0 ? ENOKEY : err);
        call("add_key", syscall(SYS_add_key, "user", "hostel-probe-added", "x", 1,
                                KEY_SPEC_USER_KEYRING));
}

static void bpf_map(void)
{
        union bpf_attr attr;

        memset(&attr, 0, sizeof attr);
        attr.map_type = BPF_MAP_TYPE_ARRAY;
        attr.key_size = 4;
        attr.value_size = 4;
        attr.max_entries = 1;
        call("bpf", syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr));
}

static void perf(void)
{
        struct perf_event_attr attr;

        memset(&attr, 0, sizeof attr);
        attr.size = sizeof attr;
        attr.type = PERF_TYPE_SOFTWARE;
        attr.config = PERF_COUNT_SW_CPU_CLOCK;
        /* every process on CPU 0: the host's too */
        call("perf_event_open", syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0));
}

/* Read a file and write the same bytes back: tests the right to change it. */
static int rewrite(const char *path, int *err)
{
        char buf[4096];
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
                *err = errno;
                return 0;
        }
        ssize_t n = read(fd, buf, sizeof buf);
        close(fd);
        if (n < 0) {
                *err = errno;
                return 0;
        }
        fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0) {
                *err = errno;
                return 0;
        }
        ssize_t w = write(fd, buf, (size_t)n);
        *err = w < 0 ? errno : 0;
        close(fd);
        return w >= 0;
}

/* Write `text` to an existing file. */
static int write_text(const char *path, const char *text, int *err)
{
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0) {
                *err = errno;
                return 0;
        }
        ssize_t w = write(fd, text, strlen(text));
        *err = w < 0 ? errno : 0;
        close(fd);
        return w >= 0;
}

/* Find the canary cgroup the test made outside the container's cgroup, at most
 * three levels up from the mount's root (that is: anywhere in a small tree). */
static int find_dir(const char *base, const char *name, int depth, char *out, size_t len)
{
        DIR *dir = opendir(base);
        struct dirent *e;
        int found = 0;

        if (!dir)
                return 0;
        while (!found && (e = readdir(dir))) {
                char path[1024];
                if (e->d_type != DT_DIR || e->d_name[0] == '.')
                        continue;
                snprintf(path, sizeof path, "%s/%s", base, e->d_name);
                if (strcmp(e->d_name, name) == 0) {
                        snprintf(out, len, "%s", path);
                        found = 1;
                } else if (depth > 0) {
                        found = find_dir(path, name, depth - 1, out, len);
                }
        }
        closedir(dir);
        return found;
}

static int mount_fresh(const char *fstype, const char *where, const char *options)
{
        mkdir(where, 0700);
        return mount(fstype, where, fstype, 0, options);
}

static void cgroups(void)
{
        char path[1024], file[1100];
        int err = 0;

        /* A fresh mount of the freezer hierarchy: does it show the canary cgroup
         * (a sibling of the container's), and may we freeze it? */
        if (mount_fresh("cgroup", "/tmp/probe-freezer", "freezer") < 0) {
                verdict("mount_cgroup_v1", 0, errno);
                verdict("cgroup_sibling_write", 0, errno);
        } else {
                verdict("mount_cgroup_v1", 1, 0);
                if (find_dir("/tmp/probe-freezer", CANARY_CGROUP, 3, path, sizeof path)) {
                        snprintf(file, sizeof file, "%s/freezer.state", path);
                        checked("cgroup_sibling_write", write_text(file, "THAWED", &err), &err);
                } else {
                        verdict("cgroup_sibling_write", 0, ENOENT);
                }
        }
        /* The devices hierarchy: may we allow ourselves every device? */
        if (mount_fresh("cgroup", "/tmp/probe-devices", "devices") < 0) {
                verdict("devices_allow_widen", 0, errno);
        } else {
                checked("devices_allow_widen", write_text("/tmp/probe-devices/devices.allow", "a", &err), &err);
        }
        /* cgroup2: the canary again, and detaching the device program. */
        if (mount_fresh("cgroup2", "/tmp/probe-unified", NULL) < 0) {
                verdict("mount_cgroup_v2", 0, errno);
                verdict("bpf_device_detach", 0, errno);
        } else {
                verdict("mount_cgroup_v2", 1, 0);
                union bpf_attr attr;
                int fd = open("/tmp/probe-unified", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                memset(&attr, 0, sizeof attr);
                attr.target_fd = (uint32_t)fd;
                attr.attach_type = BPF_CGROUP_DEVICE;
                call("bpf_device_detach", syscall(SYS_bpf, BPF_PROG_DETACH, &attr, sizeof attr));
                close(fd);
                if (find_dir("/tmp/probe-unified", CANARY_CGROUP, 3, path, sizeof path)) {
                        snprintf(file, sizeof file, "%s/cgroup.freeze", path);
                        checked("cgroup_v2_sibling_write", write_text(file, "0", &err), &err);
                } else {
                        verdict("cgroup_v2_sibling_write", 0, ENOENT);
                }
        }
}

/* mknod a host device in /dev (a tmpfs without nodev in both) and open it: the
 * device policy's business. */
static void device(const char *name, mode_t kind, unsigned major_, unsigned minor_, int flags)
{
        char path[64];

        snprintf(path, sizeof path, "/dev/probe-%s", name);  /* /tmp may be nodev */
        unlink(path);
        if (mknod(path, kind | 0600, makedev(major_, minor_)) < 0) {
                verdict(name, 0, errno);
                return;
        }
        int fd = open(path, flags | O_CLOEXEC | O_NONBLOCK);
        int err = errno;
        unlink(path);
        if (fd >= 0)
                close(fd);
        verdict(name, fd >= 0, err);
}

static void modules(void)
{
        call("init_module", syscall(SYS_init_module, NULL, 0, ""));
        call("finit_module", syscall(SYS_finit_module, -1, "", 0));
        call("delete_module", syscall(SYS_delete_module, "hostel_no_such_module", O_NONBLOCK));
}

static void clock_and_power(void)
{
        struct timespec now;

        clock_gettime(CLOCK_REALTIME, &now);
        call("clock_settime", syscall(SYS_clock_settime, CLOCK_REALTIME, &now));
        /* A pid namespace refuses every reboot command but restart and halt (EINVAL). */
        call("reboot", syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                               LINUX_REBOOT_CMD_CAD_OFF, NULL));
        call("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
        call("swapon", syscall(SYS_swapon, "/hostel-no-such-swap", 0));
}

static void handles(void)
{
        struct { struct file_handle fh; unsigned char space[128]; } h;
        int mount_id;

        h.fh.handle_bytes = 128;
        if (syscall(SYS_name_to_handle_at, AT_FDCWD, "/", &h.fh, &mount_id, 0) < 0) {
                verdict("open_by_handle_at", 0, errno);
                return;
        }
        int root = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        long fd = syscall(SYS_open_by_handle_at, root, &h.fh, O_RDONLY | O_CLOEXEC);
        verdict("open_by_handle_at", fd >= 0, fd < 0 ? errno : 0);
        if (fd >= 0)
                close((int)fd);
        close(root);
}

static void api_filesystems(void)
{
        int err = 0;

        if (mount_fresh("proc", "/tmp/probe-proc", NULL) < 0) {
                verdict("mount_proc", 0, errno);
                verdict("proc_sys_write", 0, errno);
        } else {
                verdict("mount_proc", 1, 0);
                checked("proc_sys_write", rewrite("/tmp/probe-proc/sys/kernel/printk_ratelimit", &err), &err);
        }
        checked("proc_sys_write_in_place", rewrite("/proc/sys/kernel/printk_ratelimit", &err), &err);
        if (mount_fresh("sysfs", "/tmp/probe-sys", NULL) < 0) {
                verdict("mount_sysfs", 0, errno);
                verdict("sysfs_write", 0, errno);
        } else {
                verdict("mount_sysfs", 1, 0);
                checked("sysfs_write", rewrite("/tmp/probe-sys/module/printk/parameters/time", &err), &err);
        }
        checked("sysfs_write_in_place", rewrite("/sys/module/printk/parameters/time", &err), &err);
        checked("cgroupfs_write_in_place", write_text("/sys/fs/cgroup/devices/devices.allow", "a", &err), &err);
}

int main(int argc, char **argv)
{
        if (argc < 4) {
                fprintf(stderr, "usage: probe CANARY DISK_MAJOR DISK_MINOR\n");
                return 2;
        }
        mkdir("/tmp", 01777);
        keyring(argv[1]);
        bpf_map();
        perf();
        cgroups();
        device("mknod_open_kvm", S_IFCHR, 10, 232, O_RDWR);
        device("mknod_open_disk", S_IFBLK, (unsigned)atoi(argv[2]), (unsigned)atoi(argv[3]), O_RDONLY);
        device("mknod_open_loop_control", S_IFCHR, 10, 237, O_RDWR);
        device("mknod_open_mem", S_IFCHR, 1, 1, O_RDONLY);
        device("mknod_open_kmsg", S_IFCHR, 1, 11, O_RDONLY);
        modules();
        clock_and_power();
        handles();
        api_filesystems();
        printf("END\n");
        return 0;
}
