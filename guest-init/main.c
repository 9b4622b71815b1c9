/* hostel-guest-init: PID 1 inside a hostel VM, the static counterpart of
   hostel.guest.init (which stays the reference; tests run both and compare).

     init [--image-device /dev/vda] [--config-device /dev/vdb] [--channel /dev/hvc1|port:NAME]
          [--console /dev/console|-] [--work-dir /] [--modules LIST]
          [--stderr PATH|port:NAME] [--stdio console|relay]

   The options are hostel.guest.init's, plus --modules (the initramfs's load
   list), "port:NAME" for a channel that is a named virtio-console port,
   --stderr (fd 2 of the init and the task on a stream of its own) and
   --stdio: "console" (the default, as init.py) gives the task the console;
   "relay" (a hostel VM) gives it pipes the init relays (relay.h), stdin
   ending where the host's frame says, unless the launch request names a
   terminal: then the console, back in its cooked mode, is the task's stdin,
   stdout, stderr and controlling tty, as a container's pty is.

   Steps, in init.py's order but for the channel coming before the console
   (so that a console that fails is reported on it): early mounts; the
   initramfs's modules; the message channel; the console on stdio (raw);
   --stderr's stream; the image and config squashfs devices; the
   configuration; overlay and chroot; hostname; network; the task's cgroup;
   the task, in its own session with the console as controlling terminal;
   supervision of every child; the console drained; the exit frame; the rest
   killed; power off. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "bootmarker.h"
#include "config.h"
#include "frame.h"
#include "identity.h"
#include "json.h"
#include "modules.h"
#include "mounts.h"
#include "netconf.h"
#include "ports.h"
#include "process.h"
#include "relay.h"

#define EXIT_NOT_FOUND 127
#define EXIT_CANNOT_RUN 126
#define TASK_CGROUP "/sys/fs/cgroup/hostel-guest-task"
#define DEVICE_WAIT_MS 5000
#define ERROR_MAX 1024
#define WORK_DIR_MAX 1024   /* leaves room for the staging paths below it */

struct options {
    const char *image_device, *config_device, *channel, *console, *work, *modules;
    const char *stderr_spec;   /* NULL: stderr is the console too */
    const char *stdio;         /* "console" or "relay" */
};

struct init {
    struct options opt;
    int channel_fd;
    struct termios console_mode;   /* the console's own (cooked) mode, before make_raw */
    int console_saved;
    int boot_marker;               /* launch.json asks for the boot marker (bootmarker.h) */
    char error[ERROR_MAX];
};

static void log_message(struct init *init, const char *level, const char *fmt, ...)
{
    char message[ERROR_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    dprintf(2, "hostel-init: %s\n", message);
    frame_log(init->channel_fd, level, message);
}

static void warn_callback(void *context, const char *message)
{
    log_message(context, "warning", "%s", message);
}

static int fail(struct init *init, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(init->error, sizeof(init->error), fmt, ap);
    va_end(ap);
    return -1;
}

/* A device a just-loaded driver has yet to create (virtio-console ports come
   up asynchronously); present at once on a host under test. */
static void wait_for(const char *path)
{
    struct timespec tick = { 0, 1000000 };
    for (int waited = 0; waited < DEVICE_WAIT_MS && access(path, F_OK) < 0; waited++)
        nanosleep(&tick, NULL);
}

/* A tty channel (a console port) would have its frames rewritten by the line
   discipline (LF -> CRLF); raw mode passes them as they are. */
static void make_raw(int fd)
{
    struct termios mode;
    if (tcgetattr(fd, &mode) < 0)
        return;   /* not a tty: a generic port, a FIFO, a socket */
    cfmakeraw(&mode);
    tcsetattr(fd, TCSANOW, &mode);
}

static void map_console(struct init *init)
{
    int fd;
    if (strcmp(init->opt.console, "-") == 0)
        return;   /* the launcher already put the console on stdio */
    wait_for(init->opt.console);
    fd = open(init->opt.console, O_RDWR | O_NOCTTY);
    if (fd < 0) {
        log_message(init, "warning", "cannot open console %s: %s", init->opt.console,
                    strerror(errno));
        return;
    }
    init->console_saved = tcgetattr(fd, &init->console_mode) == 0;
    make_raw(fd);   /* bytes as the payload wrote them (no CRLF), no echo of stdin */
    for (int target = 0; target < 3; target++)
        dup2(fd, target);
    if (fd > 2)
        close(fd);
}

/* A separate stream for fd 2 (a named port in a VM), so that the payload's
   stdout and stderr reach the host apart, as they do from a container. */
static void map_stderr(struct init *init)
{
    char path[512];
    int fd;
    if (init->opt.stderr_spec == NULL)
        return;
    if (port_path(init->opt.stderr_spec, DEVICE_WAIT_MS, path, sizeof(path)) < 0) {
        log_message(init, "warning", "no stderr port %s appeared in %d ms: stderr stays on the "
                    "console", init->opt.stderr_spec, DEVICE_WAIT_MS);
        return;
    }
    wait_for(path);
    fd = open(path, O_WRONLY | O_NOCTTY);
    if (fd < 0) {
        log_message(init, "warning", "cannot open stderr %s: %s", path, strerror(errno));
        return;
    }
    make_raw(fd);
    dup2(fd, 2);
    if (fd != 2)
        close(fd);
}

static int open_channel(struct init *init)
{
    char path[512];
    if (port_path(init->opt.channel, DEVICE_WAIT_MS, path, sizeof(path)) < 0)
        return fail(init, "opening the message channel %s: no virtio-console port of that name "
                    "appeared in %d ms", init->opt.channel, DEVICE_WAIT_MS);
    wait_for(path);
    init->channel_fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (init->channel_fd < 0)
        return fail(init, "opening the message channel %s: %s", path, strerror(errno));
    make_raw(init->channel_fd);
    return 0;
}

/* The whole file into a new NUL-terminated buffer, refusing more than the parser takes. */
static char *read_small(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char *data = fd < 0 ? NULL : malloc(JSON_MAX_INPUT + 2);
    *len = 0;
    while (data != NULL && *len <= JSON_MAX_INPUT) {
        ssize_t n = read(fd, data + *len, JSON_MAX_INPUT + 1 - *len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(data);
            data = NULL;
        }
        if (n <= 0)
            break;
        *len += (size_t)n;
    }
    if (fd >= 0) {
        int saved = errno;
        close(fd);
        errno = saved;
    }
    if (data != NULL)
        data[*len] = '\0';
    return data;
}

static int parse_file(struct init *init, const char *name, struct json_doc *doc)
{
    char path[4096 + 64], why[512], config[4096];
    size_t len;
    char *text;
    join_path(config, sizeof(config), init->opt.work, "config");
    snprintf(path, sizeof(path), "%s/%s", config, name);
    text = read_small(path, &len);
    if (text == NULL)
        return fail(init, "reading the guest configuration from %s: %s: %s",
                    init->opt.config_device, name, strerror(errno));
    if (json_parse(text, len, doc, why, sizeof(why)) < 0) {
        free(text);
        return fail(init, "reading the guest configuration from %s: %s is not valid JSON: %s",
                    init->opt.config_device, name, why);
    }
    free(text);
    return 0;
}

static int read_configs(struct init *init, struct json_doc *image_doc, struct json_doc *launch_doc,
                        struct image_config *image, struct launch_request *launch)
{
    char why[512];
    if (parse_file(init, "image/config.json", image_doc) < 0 ||
        parse_file(init, "launch.json", launch_doc) < 0)
        return -1;
    if (image_config_read(image_doc, image, why, sizeof(why)) < 0 ||
        launch_request_read(launch_doc, launch, why, sizeof(why)) < 0)
        return fail(init, "reading the guest configuration from %s: %s",
                    init->opt.config_device, why);
    return 0;
}

static int mount_images(struct init *init)
{
    char where[4096];
    const char *devices[2] = { init->opt.image_device, init->opt.config_device };
    const char *names[2] = { "image", "config" };
    for (int i = 0; i < 2; i++) {
        join_path(where, sizeof(where), init->opt.work, names[i]);
        wait_for(devices[i]);
        if (mounts_squashfs(devices[i], where, init->error, sizeof(init->error)) < 0)
            return -1;
    }
    return 0;
}

/* The task's side of the fork: never returns. A missing executable is 127, one
   that cannot be executed 126, in the words the container isolation uses
   (images_service.cannot_run_message), so that both print the same line. */
static void run_task(const struct process *p, const struct identity *id, int cgroup,
                     const struct relay *relay, int terminal, int boot_marker)
{
    int fd, saved;
    char pid[24];
    if (relay != NULL) {
        for (int i = 0; i < 3; i++)
            if (dup2(relay->task_stdio[i], i) < 0)
                goto failed;
        relay_unblock();
    } else if (terminal && dup2(0, 2) < 0) {
        goto failed;
    }
    if (setsid() < 0 || (isatty(0) && ioctl(0, TIOCSCTTY, 0) < 0))
        goto failed;
    if (cgroup) {
        fd = open(TASK_CGROUP "/cgroup.procs", O_WRONLY | O_CLOEXEC);
        snprintf(pid, sizeof(pid), "%d", (int)getpid());
        if (fd < 0 || write(fd, pid, strlen(pid)) < 0)
            goto failed;
        close(fd);
    }
    if (boot_marker && boot_marker_allow() < 0) {
        dprintf(2, "hostel-init: no boot marker: ioperm: %s\n", strerror(errno));
        boot_marker = 0;
    }
    if (setgroups((size_t)id->group_count, id->groups) < 0 ||
        setresgid(id->gid, id->gid, id->gid) < 0 || setresuid(id->uid, id->uid, id->uid) < 0 ||
        chdir(p->cwd) < 0)
        goto failed;
    signal(SIGPIPE, SIG_DFL);
    if (boot_marker)
        boot_marker_write();
    execve(p->path, p->argv, p->envp);
    saved = errno;
    dprintf(2, "hostel: cannot run %s: %s\n", p->path, strerror(saved));
    _exit(saved == ENOENT || saved == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_RUN);
failed:
    saved = errno;
    dprintf(2, "hostel-init: cannot start %s (", p->path);
    for (int i = 0; p->argv[i] != NULL; i++)
        dprintf(2, "%s%s", i ? " " : "", p->argv[i]);
    dprintf(2, ") in %s: %s\n", p->cwd, strerror(saved));
    _exit(EXIT_CANNOT_RUN);
}

/* Reap every child until the task is gone; its status as a shell reports it. */
static int supervise(pid_t task)
{
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            return EXIT_CANNOT_RUN;
        if (pid == task)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
}

/* Whatever the task left running dies now, and is reaped. */
static void stop_the_rest(void)
{
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
        ;
}

/* What the task wrote to a console port may still sit in the tty layer's
   buffer (hvc pushes it to the device from a kernel thread): wait until it
   has reached the host before the exit frame and the power-off end the VM.
   Not a tty (a file, a FIFO, a generic port): nothing to wait for. */
static void drain_output(void)
{
    tcdrain(1);
    tcdrain(2);
}

/* --stdio relay: the task's output is relayed until it ends; what it and the
   rest it left wrote is drained once they are all gone, before the exit frame. */
static int supervise_relayed(struct init *init, struct relay *relay, pid_t task)
{
    int code;
    relay_parent(relay);
    code = relay_supervise(relay, task);
    stop_the_rest();
    relay_drain(relay);
    drain_output();
    frame_exit(init->channel_fd, code);
    return code;
}

static int start_and_supervise(struct init *init, const struct process *p,
                               const struct identity *id, const struct launch_request *launch)
{
    int cgroup = make_dirs(TASK_CGROUP, (mode_t)-1) == 0, code;
    int relayed = strcmp(init->opt.stdio, "relay") == 0;
    int terminal = relayed && launch->terminal != NULL;
    struct relay relay;
    pid_t pid;
    if (!cgroup)
        log_message(init, "warning", "cannot create the task cgroup %s: %s", TASK_CGROUP,
                    strerror(errno));
    relayed = relayed && !terminal;
    if (relayed && (relay_open(&relay, 0, 1, 2, init->channel_fd) < 0 || relay_block() < 0))
        return fail(init, "making the task's stdio pipes: %s", strerror(errno));
    if (terminal && init->console_saved)
        tcsetattr(0, TCSANOW, &init->console_mode);
    pid = fork();
    if (pid < 0)
        return fail(init, "forking the task: %s", strerror(errno));
    if (pid == 0)
        run_task(p, id, cgroup, relayed ? &relay : NULL, terminal, init->boot_marker);
    frame_started(init->channel_fd, pid);
    if (relayed) {
        code = supervise_relayed(init, &relay, pid);
    } else {
        code = supervise(pid);
        drain_output();
        frame_exit(init->channel_fd, code);
        stop_the_rest();
    }
    if (cgroup && rmdir(TASK_CGROUP) < 0 && errno != ENOENT && errno != EBUSY)
        log_message(init, "warning", "cannot remove %s: %s", TASK_CGROUP, strerror(errno));
    return code;
}

/* launch.json's "boot_marker": true, false, or absent (false); anything else is refused. */
static int read_boot_marker(struct init *init, const struct json_doc *launch_doc)
{
    int member = json_member(launch_doc, 0, "boot_marker");
    enum json_type type = member < 0 ? JSON_FALSE : launch_doc->nodes[member].type;
    if (type != JSON_TRUE && type != JSON_FALSE)
        return fail(init, "reading the guest configuration from %s: boot_marker must be true "
                    "or false, not %s", init->opt.config_device, json_type_name(type));
    init->boot_marker = type == JSON_TRUE;
    return 0;
}

static int enter_guest(struct init *init, const struct launch_request *launch)
{
    int nl = netconf_open();
    if (nl < 0)
        return fail(init, "opening a netlink socket: %s", strerror(errno));
    if (mounts_new_root(init->opt.work, init->error, sizeof(init->error)) < 0 ||
        mounts_enter_new_root(init->error, sizeof(init->error)) < 0)
        goto failed;
    if (launch->hostname != NULL && sethostname(launch->hostname, strlen(launch->hostname)) < 0)
        log_message(init, "warning", "cannot set hostname %s: %s", launch->hostname,
                    strerror(errno));
    if (launch->has_network &&
        netconf_apply(nl, &launch->network, warn_callback, init, init->error,
                      sizeof(init->error)) < 0)
        goto failed;
    if (!launch->has_network && netconf_loopback_up(nl) < 0) {
        snprintf(init->error, sizeof(init->error), "bringing up lo: %s", strerror(errno));
        goto failed;
    }
    close(nl);
    return 0;
failed:
    close(nl);
    return -1;
}

static int run(struct init *init)
{
    struct json_doc image_doc = { 0 }, launch_doc = { 0 };
    struct image_config image = { 0 };
    struct launch_request launch = { 0 };
    struct process process;
    struct identity id;
    char module_error[ERROR_MAX] = "";
    int modules_ok;
    if (mounts_early(init->error, sizeof(init->error)) < 0)
        return -1;
    modules_ok = modules_load(init->opt.modules, module_error, sizeof(module_error)) == 0;
    /* the channel first: a console that cannot be opened is then said on it */
    if (open_channel(init) < 0)
        return modules_ok ? -1 : fail(init, "%s", module_error);   /* the likelier cause */
    map_console(init);
    if (!modules_ok)
        return fail(init, "%s", module_error);
    map_stderr(init);
    if (mount_images(init) < 0 ||
        read_configs(init, &image_doc, &launch_doc, &image, &launch) < 0 ||
        read_boot_marker(init, &launch_doc) < 0 || enter_guest(init, &launch) < 0)
        return -1;
    if (identity_resolve(image.user, &id, init->error, sizeof(init->error)) < 0)
        return -1;
    if (process_build(&image, &launch, id.home, &process) < 0)
        return fail(init, "building the task's command line: out of memory");
    return start_and_supervise(init, &process, &id, &launch);
}

static void power_off(int code)
{
    sync();
    reboot(RB_POWER_OFF);
    _exit(code);   /* not allowed (not PID 1, or no CAP_SYS_BOOT): just end */
}

static int parse_options(int argc, char **argv, struct options *opt)
{
    static const struct { const char *name; size_t offset; } flags[] = {
        { "--image-device", offsetof(struct options, image_device) },
        { "--config-device", offsetof(struct options, config_device) },
        { "--channel", offsetof(struct options, channel) },
        { "--console", offsetof(struct options, console) },
        { "--work-dir", offsetof(struct options, work) },
        { "--modules", offsetof(struct options, modules) },
        { "--stderr", offsetof(struct options, stderr_spec) },
        { "--stdio", offsetof(struct options, stdio) },
    };
    *opt = (struct options){ "/dev/vda", "/dev/vdb", "/dev/hvc1", "/dev/console", "/",
                             "/lib/modules/hostel/load.list", NULL, "console" };
    for (int i = 1; i < argc; i++) {
        size_t f, n = sizeof(flags) / sizeof(flags[0]);
        const char *value = NULL;
        for (f = 0; f < n; f++) {
            size_t len = strlen(flags[f].name);
            if (strncmp(argv[i], flags[f].name, len) != 0)
                continue;
            if (argv[i][len] == '=')
                value = argv[i] + len + 1;
            else if (argv[i][len] == '\0' && i + 1 < argc)
                value = argv[++i];
            else
                continue;
            break;
        }
        if (f == n || value == NULL || *value == '\0') {
            dprintf(2, "hostel-init: unknown or incomplete argument '%s'; expected %s\n",
                    argv[i], "--image-device, --config-device, --channel, --console, "
                    "--work-dir, --modules, --stderr or --stdio, each with a value");
            return -1;
        }
        *(const char **)((char *)opt + flags[f].offset) = value;
    }
    if (strcmp(opt->stdio, "console") != 0 && strcmp(opt->stdio, "relay") != 0) {
        dprintf(2, "hostel-init: --stdio is 'console' or 'relay', not '%s'\n", opt->stdio);
        return -1;
    }
    if (strlen(opt->work) > WORK_DIR_MAX) {
        dprintf(2, "hostel-init: --work-dir is longer than %d bytes\n", WORK_DIR_MAX);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct init init = { .channel_fd = -1 };
    int code;
    if (parse_options(argc, argv, &init.opt) < 0)
        return 2;
    code = run(&init);
    if (code < 0) {
        log_message(&init, "error", "guest init failed: %s", init.error);
        frame_exit(init.channel_fd, EXIT_CANNOT_RUN);
        code = EXIT_CANNOT_RUN;
    }
    power_off(code);
}
