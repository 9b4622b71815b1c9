"""hostel.guest.init: PID 1 inside a guest, in the manner of krata's guest init.

    python -m hostel.guest.init [--image-device /dev/vda] [--config-device /dev/vdb]
                                [--channel /dev/hvc1] [--console /dev/console|-]
                                [--work-dir /]

In order: early mounts (devtmpfs, proc, sysfs, cgroup2, /dev/fd and std*
links); the console on stdio; the message channel; the image and config
squashfs devices mounted read-only; an overlay with a tmpfs upper on the
image; /sys, /proc and /dev moved into the new root; the new root bound on /
and chrooted into; hostname; /etc/resolv.conf; network (loopback, addresses
and default routes, GSO/TSO off); a cgroup for the task; the task forked
with setsid and the console as controlling terminal; then supervision: every
child is reaped (this is PID 1), the task's exit status goes out on the
channel as {"type": "exit", "code": N} (frames: hostel.guest.channel), the
remaining processes are killed and the guest powers off.

The config device holds image/config.json (the OCI image configuration) and
launch.json (hostel.guest.launchconfig.LaunchRequest). Device and channel
paths are parameters, and --work-dir says where the staging directories
(image, config, overlay, newroot) are made, so the same code runs in a
throwaway set of namespaces under test. After the chroot the host's files
are gone: everything this module needs is imported, and the netlink socket
opened, before it."""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostel import native
from hostel.errors import HostelError
from hostel.guest import channel
from hostel.guest.launchconfig import (ImageConfig, LaunchRequest, NetworkConfig, Process,
                                       build_process)
from hostel.machine import users

EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126
TASK_CGROUP = "hostel-guest-task"
RB_POWER_OFF = 0x4321FEDC
SIOCETHTOOL = 0x8946
ETHTOOL_STSO = 0x1F
ETHTOOL_SGSO = 0x24
_KERNEL_FS_FLAGS = native.MS_NOEXEC | native.MS_NOSUID
MS_RELATIME = 1 << 21
MS_NOATIME = 1024

_libc = ctypes.CDLL(None, use_errno=True)


class GuestInitError(HostelError):
    """A step of the guest's start-up failed; the message names the step and its object."""


@dataclass(frozen=True)
class Paths:
    image_device: str
    config_device: str
    channel: str
    console: str
    work: str

    def at(self, name: str) -> str:
        return os.path.join(self.work, name)


def _mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
           data: str | None = None) -> None:
    try:
        native.mount(source, target, fstype, flags, data)
    except OSError as e:
        raise GuestInitError(f"mounting {fstype or source} on {target}: {e.strerror}") from e


def _mkdir(path: str, mode: int | None = None) -> None:
    """Create `path` with `mode`; an existing directory is left as it is (under test, the host's)."""
    try:
        os.makedirs(path)
    except FileExistsError:
        return
    if mode is not None:
        os.chmod(path, mode)


def _symlink(target: str, path: str) -> None:
    try:
        os.symlink(target, path)
    except FileExistsError:
        pass


class GuestInit:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.channel_fd = -1

    def send(self, message: dict) -> None:
        if self.channel_fd >= 0:
            channel.write_frame(self.channel_fd, message)

    def log(self, level: str, message: str) -> None:
        print(f"hostel-init: {message}", file=sys.stderr, flush=True)
        self.send({"type": "log", "level": level, "message": message})

    # Steps, in the seed's order -------------------------------------------------------

    def early_init(self) -> None:
        _mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)  # nothing leaks out
        for path, mode in (("/dev", 0o755), ("/proc", None), ("/sys", 0o555),
                           ("/root", 0o700), ("/tmp", None), ("/run", 0o755)):
            _mkdir(path, mode)
        try:
            native.mount("devtmpfs", "/dev", "devtmpfs", _KERNEL_FS_FLAGS, "mode=0755")
        except OSError as e:
            # EBUSY: devtmpfs is on /dev already (CONFIG_DEVTMPFS_MOUNT, or a host under test).
            if e.errno != errno.EBUSY:
                raise GuestInitError(f"mounting devtmpfs on /dev: {e.strerror}") from e
        _mount("proc", "/proc", "proc", _KERNEL_FS_FLAGS)
        _mount("sysfs", "/sys", "sysfs", _KERNEL_FS_FLAGS)
        _symlink("/proc/self/fd", "/dev/fd")
        for number, name in enumerate(("stdin", "stdout", "stderr")):
            _symlink(f"/proc/self/fd/{number}", f"/dev/{name}")
        _mount("cgroup2", "/sys/fs/cgroup", "cgroup2", _KERNEL_FS_FLAGS | MS_RELATIME)

    def map_console(self) -> None:
        if self.paths.console == "-":
            return   # the launcher already put the console on stdio
        try:
            console = os.open(self.paths.console, os.O_RDWR | os.O_NOCTTY)
        except OSError as e:
            self.log("warning", f"cannot open console {self.paths.console}: {e.strerror}")
            return
        for target in (0, 1, 2):
            os.dup2(console, target)
        os.close(console)

    def open_channel(self) -> None:
        try:
            self.channel_fd = os.open(self.paths.channel, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise GuestInitError(f"opening the message channel {self.paths.channel}: "
                                 f"{e.strerror}") from e

    def mount_squashfs_images(self) -> None:
        for device, where in ((self.paths.image_device, self.paths.at("image")),
                              (self.paths.config_device, self.paths.at("config"))):
            _mkdir(where)
            _mount(device, where, "squashfs", native.MS_RDONLY)

    def read_configs(self) -> tuple[ImageConfig, LaunchRequest]:
        config_dir = Path(self.paths.at("config"))
        try:
            image = ImageConfig.from_json(json.loads((config_dir / "image/config.json").read_text()))
            launch = LaunchRequest.from_json((config_dir / "launch.json").read_text())
        except (OSError, ValueError) as e:
            raise GuestInitError(f"reading the guest configuration from "
                                 f"{self.paths.config_device}: {e}") from e
        return image, launch

    def mount_new_root(self) -> str:
        overlay, new_root = self.paths.at("overlay"), self.paths.at("newroot")
        _mkdir(overlay)
        _mount("tmpfs", overlay, "tmpfs")
        for name in ("upper", "work", "image"):
            _mkdir(f"{overlay}/{name}")
        _mount(self.paths.at("image"), f"{overlay}/image", None, native.MS_BIND)
        _mount(None, f"{overlay}/image", None,
               native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY)
        _mkdir(new_root)
        _mount(f"overlayfs:{overlay}", new_root, "overlay", MS_NOATIME,
               f"lowerdir={overlay}/image,upperdir={overlay}/upper,workdir={overlay}/work")
        os.chdir(new_root)
        return new_root

    def bind_new_root(self, new_root: str) -> None:
        for api in ("/sys", "/proc", "/dev"):
            _mkdir(f"{new_root}{api}")
            _mount(api, f"{new_root}{api}", None, native.MS_MOVE)
        _mount(".", "/", None, native.MS_BIND)
        os.chroot(".")
        os.chdir("/")

    def set_hostname(self, launch: LaunchRequest) -> None:
        if launch.hostname:
            try:
                native.sethostname(launch.hostname)
            except OSError as e:
                self.log("warning", f"cannot set hostname {launch.hostname}: {e.strerror}")

    def network_setup(self, network: NetworkConfig, ipr: IPRoute) -> None:
        _mkdir("/etc")
        lines = ["# hostel resolver configuration"]
        lines += [f"nameserver {server}" for server in network.nameservers]
        Path("/etc/resolv.conf").write_text("\n".join(lines) + "\n")
        for command, what in ((ETHTOOL_SGSO, "GSO"), (ETHTOOL_STSO, "TSO")):
            try:
                _ethtool_set(network.link, command, 0)
            except OSError as e:
                self.log("warning", f"cannot turn {what} off on {network.link}: {e.strerror}")
        configure_link(network, ipr, self.log)

    def init_cgroup(self) -> str | None:
        path = f"/sys/fs/cgroup/{TASK_CGROUP}"
        try:
            _mkdir(path)
        except OSError as e:
            self.log("warning", f"cannot create the task cgroup {path}: {e.strerror}")
            return None
        return path

    # Run and supervise -----------------------------------------------------------------

    def fork_and_exec(self, process: Process, cgroup: str | None,
                      identity: users.UserIds) -> int:
        pid = os.fork()
        if pid == 0:
            _foreground(process, cgroup, identity)
        self.send({"type": "started", "pid": pid})
        return pid

    def supervise(self, task: int) -> int:
        """Reap every child until the task is gone; its status, as a shell reports it."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return EXIT_CANNOT_RUN
            except InterruptedError:
                continue
            if pid == task:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code

    def stop_the_rest(self) -> None:
        """Whatever the task left running dies now, and is reaped: a clean power-off."""
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
            except InterruptedError:
                continue

    def run(self) -> int:
        self.early_init()
        self.map_console()
        self.open_channel()
        self.mount_squashfs_images()
        image, launch = self.read_configs()
        ipr = IPRoute()
        try:
            new_root = self.mount_new_root()
            self.bind_new_root(new_root)
            self.set_hostname(launch)
            if launch.network is not None:
                self.network_setup(launch.network, ipr)
            else:   # loopback only, as a container without a network has it
                loopback_up(ipr)
        finally:
            ipr.close()
        identity = resolve_identity(image.user)
        process = build_process(image, launch, os.path.isfile, identity.home)
        cgroup = self.init_cgroup()
        code = self.supervise(self.fork_and_exec(process, cgroup, identity))
        self.send({"type": "exit", "code": code})
        self.stop_the_rest()
        if cgroup is not None:
            _rmdir(cgroup)
        return code


def loopback_up(ipr: IPRoute) -> None:
    lo = ipr.link_lookup(ifname="lo")
    if lo:
        ipr.link("set", index=lo[0], state="up")


def configure_link(network: NetworkConfig, ipr: IPRoute, log) -> None:
    """Loopback up; address, link up and default route for IPv4, then IPv6 (warnings only)."""
    loopback_up(ipr)
    found = ipr.link_lookup(ifname=network.link)
    if not found:
        log("warning", f"no network link named {network.link}; the guest has no network")
        return
    index = found[0]
    address, prefix = network.ipv4_address.split("/")
    ipr.addr("add", index=index, address=address, prefixlen=int(prefix))
    ipv6 = bool(network.ipv6_address)
    if ipv6:
        address6, prefix6 = network.ipv6_address.split("/")
        try:
            ipr.addr("add", index=index, address=address6, prefixlen=int(prefix6))
        except NetlinkError as e:
            log("warning", f"cannot set up IPv6 on {network.link}: {e}")
            ipv6 = False
    ipr.link("set", index=index, state="up")
    ipr.route("add", dst="0.0.0.0/0", gateway=network.ipv4_gateway, oif=index)
    if ipv6:
        try:
            ipr.route("add", dst="::/0", gateway=network.ipv6_gateway, oif=index,
                      family=socket.AF_INET6)
        except NetlinkError as e:
            log("warning", f"cannot add the IPv6 default route via {network.ipv6_gateway}: {e}")


def _ethtool_set(link: str, command: int, value: int) -> None:
    """SIOCETHTOOL with a struct ethtool_value, as `ethtool -K LINK gso off` does."""
    request = ctypes.create_string_buffer(struct.pack("=II", command, value))
    ifreq = struct.pack("16sP", link.encode()[:15], ctypes.addressof(request))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY):
            raise


def resolve_identity(spec: str) -> users.UserIds:
    """OCI User (USER, UID, USER:GROUP, UID:GID) against the guest's /etc files."""
    user, _, group = spec.partition(":")

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return b""

    passwd, groups = read("/etc/passwd"), read("/etc/group")
    if not user:
        ids = users.ROOT
    elif user.isdigit() and f":{user}:".encode() not in passwd:
        ids = users.UserIds(int(user), int(user), (), "/", user)   # OCI allows unlisted uids
    else:
        ids = users.resolve_user(user, passwd, groups)
    if group:
        gid = int(group) if group.isdigit() else _group_id(group, groups)
        ids = users.UserIds(ids.uid, gid, (), ids.home, ids.name)
    return ids


def _group_id(name: str, groups: bytes) -> int:
    for line in groups.decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    raise GuestInitError(f"group {name!r} of the image's User is not in the guest's /etc/group")


def _foreground(process: Process, cgroup: str | None, identity: users.UserIds) -> None:
    """The task's side of the fork: never returns. A missing executable is 127, one that
    cannot be executed 126, said as the container isolation says it (images_service)."""
    try:
        os.setsid()
        if os.isatty(0):
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if cgroup is not None:
            Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
        os.chdir(process.cwd)
        # Python ignores both at start-up, and ignored signals survive execve:
        # the task must get the defaults, as the static init's task does.
        for number in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(number, signal.SIG_DFL)
    except OSError as e:
        print(f"hostel-init: cannot start {process.path} ({' '.join(process.argv)}) in "
              f"{process.cwd}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(EXIT_CANNOT_RUN)
    try:
        os.execve(process.path, process.argv, process.env)
    except OSError as e:
        print(f"hostel: cannot run {process.path}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(EXIT_NOT_FOUND if e.errno in (errno.ENOENT, errno.ENOTDIR) else EXIT_CANNOT_RUN)


def power_off(code: int) -> None:
    """reboot(POWER_OFF); in a PID namespace this ends the namespace (its parent sees SIGINT)."""
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    os._exit(code)   # reboot failed (not PID 1, or not allowed): just end


def parse_args(argv: list[str] | None) -> Paths:
    parser = argparse.ArgumentParser(prog="hostel.guest.init", description=__doc__.split("\n")[0])
    parser.add_argument("--image-device", default="/dev/vda")
    parser.add_argument("--config-device", default="/dev/vdb")
    parser.add_argument("--channel", default="/dev/hvc1")
    parser.add_argument("--console", default="/dev/console",
                        help="console device, or '-' when it is already on stdio")
    parser.add_argument("--work-dir", default="/",
                        help="where the image, config, overlay and newroot directories go")
    args = parser.parse_args(argv)
    return Paths(args.image_device, args.config_device, args.channel, args.console,
                 args.work_dir)


def main(argv: list[str] | None = None) -> None:
    init = GuestInit(parse_args(argv))
    try:
        code = init.run()
    except (HostelError, OSError) as e:
        init.log("error", f"guest init failed: {e}")
        init.send({"type": "exit", "code": EXIT_CANNOT_RUN})
        code = EXIT_CANNOT_RUN
    power_off(code)


if __name__ == "__main__":
    main()
