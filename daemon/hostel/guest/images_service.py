"""The image half of org.hostel1.GuestManager, and running an image in a container.

guest/service.py owns the D-Bus interface; its ImportImage(Ex), PullImage,
InspectImage, ListImages, RemoveImage and (for settings carrying "Image")
StartGuest call the coroutines here. Imports and pulls run in a thread (they
read archives, run skopeo and mksquashfs), so the event loop never waits on
them. A caller may pass the read end of a pipe only it writes ("ClientAlive"):
when it hangs up (Ctrl-C, or the client died) the transfer is cancelled and
leaves nothing behind, as machinectl's cancelled transfers do.

Container isolation: the image's squashfs is attached to a read-only loop
device and, inside the container's own mount namespace, mounted with an
overlay whose upper layer is a tmpfs; the machine runtime then runs the
launch configuration (launchconfig.py, shared with the VM guest init) on
it. Writes vanish with the container; the loop device goes with it.

Network ("Network": none or veth): without it a container has its own network
namespace with loopback only, as a VM without a network device; with veth
both isolations get a /30 of their own to the host (run_network.py).

A container run, like any machine, outlives hosteld (nothing of it depends on hosteld's
descriptors off a terminal): the next hosteld adopts it from its state file, which names
the host end of its veth, so that end is deleted when the container ends; its loop device
(autoclear) and namespace go with its mounts."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dbus_fast import Variant
from typing import Any, Callable, Iterable, Iterator, TypeVar

from hostel import native, settingsdict
from hostel.errors import ERROR_PREFIX, HostelError, InvalidArgs, NotImplementedYet
from hostel.guest import initramfs, run_network, vmrun
from hostel.guest.images import (ImageInfo, ImageInUse, ImageStore, Progress, Transfer,
                                 normalize_reference, reference_basename)
from hostel.guest.registry_pull import PullOptions, check_qualified, pull_layout
from hostel.guest.settings import BlockSpec, GuestSettings, NetSpec
from hostel.guest.launchconfig import LaunchRequest, Process, build_process, parse_env_list
from hostel.machine import rootfs, users
from hostel.machine.loop import LoopDevice
from hostel.machine.registry import Machine
from hostel.machine.runner import MachineStartFailed
from hostel.machine.settings import MachineSettings, Stdio, machine_name_is_valid
from hostel.machine.tree import FILES_FROM_IMAGE, PreparedRoot
from hostel.spawn import Plan, StepFailed

log = logging.getLogger(__name__)

T = TypeVar("T")
ROOT_HOOK = "root_provider"            # MachineSettings field tree.prepare_root consults
WORKDIR_HOOK = "working_directory"     # MachineSettings field the runner chdirs to
GUEST_SETTINGS = {
    "Image": "s", "Isolation": "s", "Command": "as", "Environment": "as", "Hostname": "s",
    "Terminal": "s", "Console": "s",
    "StandardInput": "h", "StandardOutput": "h", "StandardError": "h",
    "CPUs": "u", "MemoryMB": "u", "Kernel": "s", "ClientAlive": "h", "Network": "s",
}
VM_ONLY = ("CPUs", "MemoryMB", "Kernel")
IMPORT_OPTIONS = {"Source": "h", "Size": "t", "ClientAlive": "h"}
PULL_OPTIONS = {"TLSVerify": "b", "ClientAlive": "h"}
DEFAULT_VM_MEMORY_MB = 256
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126
# The runner's plan steps that exec the payload (plan.py): their failure is the payload's.
_EXEC_STEPS = ("execute ", "find ")


class CommandNotRunnable(HostelError):
    """The payload's executable is missing (127) or cannot be executed (126). The message is
    what the static guest init prints in a VM, so that both isolations say the same."""

    def __init__(self, path: str, err: int) -> None:
        super().__init__(cannot_run_message(path, err))
        self.dbus_name = f"{ERROR_PREFIX}.CommandNotFound" if err in (errno.ENOENT, errno.ENOTDIR) \
            else f"{ERROR_PREFIX}.CommandNotExecutable"


def cannot_run_message(path: str, err: int) -> str:
    """guest-init/main.c's run_task writes the same line (no newline here)."""
    return f"hostel: cannot run {path}: {os.strerror(err)}"


@dataclass(frozen=True)
class VmOptions:
    """What only a VM has: its size and kernel (None: find_kernel's), and the pipe
    whose hang-up says the client is gone (as for `guest launch`)."""

    cpus: int = 1
    memory_mb: int = DEFAULT_VM_MEMORY_MB
    kernel: Path | None = None
    client_alive: int | None = None


@dataclass
class GuestRunSettings:
    """StartGuest's settings when they name an image; "vm" fits the same fields."""

    image: str
    isolation: str
    request: LaunchRequest
    terminal: str | None
    console: str | None
    stdio: Stdio
    vm: VmOptions = VmOptions()
    network: str = "none"          # run_network.NETWORK_MODES

    @classmethod
    def from_dbus(cls, raw: dict[str, Any]) -> GuestRunSettings:
        values = settingsdict.unwrap(raw, GUEST_SETTINGS, "setting")
        if not values.get("Image"):
            raise InvalidArgs("setting 'Image' is required: the name of an imported image")
        isolation = values.get("Isolation") or "container"
        if isolation != "vm" and (given := [k for k in VM_ONLY if k in values]):
            raise InvalidArgs(f"setting(s) {', '.join(given)} are for isolation 'vm' only")
        kernel = values.get("Kernel")
        if kernel is not None and not kernel.startswith("/"):
            raise InvalidArgs(f"kernel path {kernel!r} must be absolute")
        vm = VmOptions(values.get("CPUs", 1), values.get("MemoryMB", DEFAULT_VM_MEMORY_MB),
                       Path(kernel) if kernel else None, values.get("ClientAlive"))
        request = LaunchRequest(
            command=list(values["Command"]) if values.get("Command") else None,
            env=parse_env_list(list(values.get("Environment", [])), "Environment"),
            hostname=values.get("Hostname") or None,
            isolation=isolation, terminal=values.get("Terminal") or None)
        return cls(values["Image"], request.isolation, request, values.get("Terminal") or None,
                   values.get("Console") or None,
                   Stdio(values.get("StandardInput"), values.get("StandardOutput"),
                         values.get("StandardError")), vm,
                   run_network.check_mode(values.get("Network") or "none"))


# Looking into an image without a mount anyone else sees ---------------------------------

def in_private_mount(squashfs: Path, work: Callable[[str], T], scratch_dir: Path) -> T:
    """Run `work(root)` with the squashfs mounted at root, in a thread of its own that
    moved to a private mount namespace: the mount is never visible, and dies with it."""
    result: list[T] = []
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            native.unshare(native.CLONE_NEWNS)
            native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
            scratch_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            with LoopDevice(str(squashfs), read_only=True) as loop:
                scratch = tempfile.mkdtemp(prefix="inspect-", dir=scratch_dir)
                try:
                    native.mount(loop.device, scratch, "squashfs",
                                 native.MS_RDONLY | native.MS_NODEV | native.MS_NOSUID)
                    try:
                        result.append(work(scratch))
                    finally:
                        native.umount(scratch)
                finally:
                    os.rmdir(scratch)
        except BaseException as e:  # handed to the calling thread below
            failure.append(e)

    worker = threading.Thread(target=thread, name=f"inspect {squashfs}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def _is_file_in(root: str) -> Callable[[str], bool]:
    def is_file(path: str) -> bool:
        try:
            fd = rootfs.open_in_root(root, path)
        except OSError:
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    return is_file


def image_home(spec: str, passwd: bytes | None, group: bytes | None) -> str:
    """HOME for the image's User, by init.resolve_identity's rules: root's is /root, an
    unlisted UID's "/", anyone else's the home in the image's /etc/passwd."""
    user = spec.partition(":")[0]
    if not user:
        return users.ROOT.home
    if user.isdigit() and f":{user}:".encode() not in (passwd or b""):
        return "/"
    return users.resolve_user(user, passwd or b"", group or b"").home


def inspect_image(info: ImageInfo, request: LaunchRequest,
                  scratch_dir: Path) -> tuple[Process, dict[str, bytes | None]]:
    """The process to run (PATH resolved inside the image) and the files the runner reads."""
    image_config = info.config()

    def work(root: str) -> tuple[Process, dict[str, bytes | None]]:
        files = {p: rootfs.read_file_in_root(root, p) for p in FILES_FROM_IMAGE}
        home = image_home(image_config.user, files["/etc/passwd"], files["/etc/group"])
        return build_process(image_config, request, _is_file_in(root), home), files

    return in_private_mount(info.squashfs, work, scratch_dir)


# The container's root -------------------------------------------------------------------

def prepare_image_root(info: ImageInfo, files: dict[str, bytes | None], runtime_dir: Path,
                       cleanup: ExitStack,
                       network: run_network.ContainerNetwork | None = None) -> PreparedRoot:
    """A root for the machine runtime: squashfs (read-only loop) under a tmpfs-backed overlay.

    The host only sees an empty staging directory and an attached loop
    device; the mounts are made by the plan inside the container's mount
    namespace (after / became a slave), so they die with it."""
    loop = LoopDevice(str(info.squashfs), read_only=True)
    cleanup.callback(loop.detach)
    staging = runtime_dir / "image"
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    lower, upper, work, root = (str(staging / d) for d in ("lower", "upper", "work", "root"))

    def mount_steps(plan: Plan) -> None:
        plan.mount("tmpfs", str(staging), "tmpfs", native.MS_NODEV | native.MS_NOSUID,
                   "mode=0755")
        for path, mode in ((lower, 0o755), (upper, 0o755), (work, 0o700), (root, 0o755)):
            plan.mkdir(path, mode)
        plan.mount(loop.device, lower, "squashfs", native.MS_RDONLY | native.MS_NODEV)
        plan.mount("overlay", root, "overlay", 0,
                   f"lowerdir={lower},upperdir={upper},workdir={work}")
        if network is not None:
            plan_network(plan, root, network)

    return PreparedRoot(root, None, mount_steps, files, [loop.device])


def plan_network(plan: Plan, root: str, network: run_network.ContainerNetwork) -> None:
    """The container joins the namespace hosteld made for it (before it mounts /sys, which
    then shows that namespace's links) and gets the resolvers the VM's init writes."""
    plan.setns(network.netns_fd, native.CLONE_NEWNET, "the guest's network namespace")
    plan.mkdir(f"{root}/etc", 0o755)
    plan.unlink(f"{root}/etc/resolv.conf", optional=True)  # never written through a symlink
    plan.write_file(f"{root}/etc/resolv.conf", run_network.resolv_conf(network.config))


def container_network(name: str, cleanup: ExitStack) -> run_network.ContainerNetwork:
    """A `--network=veth` container's namespace and links, removed with the container."""
    network = run_network.make_container_network(name, run_network.pool_from_environment(),
                                                 run_network.host_nameservers())
    cleanup.callback(network.teardown)
    log.info("guest %s: %s on the host, %s in the guest", name, network.addressing.host,
             network.addressing.guest)
    return network


def _hook_missing(name: str) -> bool:
    return name not in {f.name for f in dataclasses.fields(MachineSettings)}


def machine_settings(name: str, run: GuestRunSettings, process: Process,
                     provider: Callable[[Path, ExitStack], PreparedRoot]) -> MachineSettings:
    if _hook_missing(ROOT_HOOK):
        raise NotImplementedYet("running an image in a container needs the machine runtime "
                                f"to take a prepared root (MachineSettings.{ROOT_HOOK}); "
                                "this hosteld lacks it")
    if process.cwd != "/" and _hook_missing(WORKDIR_HOOK):
        raise NotImplementedYet(f"image {run.image} wants working directory {process.cwd}, "
                                "and this hosteld's machine runtime cannot set one")
    settings = MachineSettings(name=name, command=[process.path, *process.argv[1:]],
                               environment=process.env_list,
                               user=process.user.partition(":")[0] or None,
                               terminal=run.terminal, console=run.console, stdio=run.stdio,
                               raw={"Image": Variant("s", run.image),
                                    "Isolation": Variant("s", run.isolation)},
                               exact_environment=True,
                               # without --network=veth the container has loopback only, as a VM
                               # without a network device has; with it, it joins its own
                               # namespace (plan_network) instead of this one
                               private_network=True)
    setattr(settings, ROOT_HOOK, provider)
    if not _hook_missing(WORKDIR_HOOK):
        setattr(settings, WORKDIR_HOOK, process.cwd)
    return settings


def machine_name(name: str, run: GuestRunSettings) -> str:
    """The machine runtime names the host after the machine: the hostname is the name."""
    hostname = run.request.hostname
    if name and hostname and name != hostname:
        raise InvalidArgs(f"guest name {name!r} and hostname {hostname!r} differ; a container "
                          "is named after its hostname, so pass one of them or the same twice")
    chosen = name or hostname or reference_basename(run.image)
    if not machine_name_is_valid(chosen):
        raise InvalidArgs(f"invalid guest name {chosen!r}: letters, digits, '-', '_' and '.'")
    return chosen


# A VM --------------------------------------------------------------------------------------

@dataclass
class VmLaunch:
    """A `guest run --isolation=vm`, ready for GuestManager.start. Its descriptors are
    copies owned here (the caller's belong to the D-Bus message): close() them once
    the launcher has its own."""

    name: str
    settings: GuestSettings
    console_fd: int | None         # port 0, the payload's stdout (else the console log)
    input_fd: int | None           # what port 0 reads: the payload's stdin
    client_fd: int | None
    ports: tuple[tuple[str, int], ...]   # (vmrun.STDERR_PORT, the payload's stderr)
    channel_port: str
    work_dir: Path                 # the config disk's directory, removed when the guest ends

    def close(self) -> None:
        for fd in (self.console_fd, self.input_fd, self.client_fd, *(f for _n, f in self.ports)):
            if fd is not None:
                os.close(fd)


# The static init's option for a VM's payload: pipes (or, on a terminal, the console as
# its tty) and stdin's end from the host, as in a container (guest-init/relay.h).
INIT_STDIO = "--stdio relay"


def vm_guest_settings(vm: vmrun.VmRun, options: VmOptions,
                      addressing: run_network.Addressing | None = None) -> GuestSettings:
    """The launcher's settings: the disks read-only, in vmrun's order; with an addressing, a
    virtio-net device on a tap that carries the host's end of the run's /30."""
    network = () if addressing is None else (NetSpec(address=str(addressing.host)),)
    return GuestSettings(memory_mb=options.memory_mb, kernel=vm.kernel,
                         cmdline=f"{vm.cmdline} {INIT_STDIO}",
                         initrd=vm.initrd, cpus=options.cpus,
                         block=tuple(BlockSpec(disk, read_only=True) for disk in vm.disks),
                         network=network)


def reserved_vm_networks(vm_dir: Path) -> list[run_network.Taken]:
    """The /30s of VM runs (their directories' RESERVATION_FILE): a run's directory goes
    when its guest ends, also one an adopting hosteld saw end."""
    taken = []
    for path in vm_dir.glob(f"*/{run_network.RESERVATION_FILE}"):
        try:
            network = json.loads(path.read_text())["network"]
            taken.append(run_network.Taken(ipaddress.IPv4Network(network),
                                           f"run {path.parent.name}"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the network reservation %s: %s", path, e)
    return taken


def vm_network(name: str, work_dir: Path) -> run_network.Addressing:
    """The run's /30, reserved in its directory (the launcher addresses the tap later)."""
    def reserve(addressing: run_network.Addressing) -> None:
        work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (work_dir / run_network.RESERVATION_FILE).write_text(
            json.dumps({"network": str(addressing.network)}))

    return run_network.allocate(name, run_network.pool_from_environment(),
                                lambda: reserved_vm_networks(work_dir.parent), reserve)


def _copy(fd: int | None) -> int | None:
    return os.dup(fd) if fd is not None else None


def vm_launch(name: str, run: GuestRunSettings, info: ImageInfo, work_dir: Path,
              kernel: initramfs.Kernel | None = None, init: Path = initramfs.DEFAULT_INIT,
              cache: Path = initramfs.INITRAMFS_CACHE) -> VmLaunch:
    """Check the kernel, build the initramfs and the config disk (slow: in a thread)."""
    # The container is named after its hostname; the VM says the same to its init.
    request = dataclasses.replace(run.request, hostname=name)
    addressing = vm_network(name, work_dir) if run.network == "veth" else None
    if addressing is not None:
        request = dataclasses.replace(
            request, network=addressing.guest_config(run_network.host_nameservers()))
    vm = vmrun.prepare(info, request, work_dir, kernel, init, cache)
    settings = vm_guest_settings(vm, run.vm, addressing)
    stderr = _copy(run.stdio.stderr)
    if stderr is None:  # the init waits for the port: it must exist, even unread
        stderr = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return VmLaunch(name, settings, _copy(run.stdio.stdout), _copy(run.stdio.stdin),
                    _copy(run.vm.client_alive), ((vmrun.STDERR_PORT, stderr),), vm.channel_port,
                    work_dir)


# The service -------------------------------------------------------------------------------

@contextlib.contextmanager
def cancelled_on_hangup(fd: int | None, transfer: Transfer) -> Iterator[None]:
    """Cancel `transfer` when the client's end of the ClientAlive pipe closes (its
    read end then polls readable, at EOF): Ctrl-C closes it, and so does death."""
    if fd is None:
        yield
        return
    loop = asyncio.get_running_loop()
    own = os.dup(fd)   # the caller's descriptor belongs to the D-Bus message

    def hung_up() -> None:
        loop.remove_reader(own)   # at EOF it stays readable: once is enough
        transfer.cancel.set()

    loop.add_reader(own, hung_up)
    try:
        yield
    finally:
        loop.remove_reader(own)
        os.close(own)


class ImageService:
    """Images: import, pull, inspect, list, remove; StartGuest for images in containers."""

    def __init__(self, images_dir: Path, runtime_dir: Path, runner: Any = None,
                 progress: Callable[[str, str, int, int], None] | None = None) -> None:
        self.store = ImageStore(images_dir)
        self.runtime_dir = runtime_dir
        self.runner = runner          # a hostel.machine.runner.MachineRunner
        self.progress = progress      # (key, stage, bytes done, bytes in all), a D-Bus signal
        # (guest name, its disk images) of each running VM: set by the guest service
        self.running_vms: Callable[[], Iterable[tuple[str, Iterable[Path]]]] = lambda: ()

    def _reporter(self, key: str) -> Progress | None:
        if self.progress is None:
            return None
        loop = asyncio.get_running_loop()
        report = self.progress
        return lambda stage, done, total: loop.call_soon_threadsafe(report, key, stage, done,
                                                                    total)

    async def import_image(self, path: str, name: str,
                           raw_options: dict[str, Any] | None = None) -> str:
        """Import from `path`, or with option Source from that descriptor (then `path`
        only names it in messages); progress is keyed by the name, else the path."""
        options = settingsdict.unwrap(raw_options or {}, IMPORT_OPTIONS, "import option")
        transfer = Transfer(self._reporter(name or path))
        source = options.get("Source")
        with cancelled_on_hangup(options.get("ClientAlive"), transfer):
            if source is not None:
                own = os.dup(source)
                try:
                    info = await asyncio.to_thread(self.store.import_stream, own, name,
                                                   options.get("Size", 0), transfer)
                finally:
                    os.close(own)
                path = "standard input"
            else:
                if not path.startswith("/"):
                    raise InvalidArgs(f"image path {path!r} must be absolute")
                info = await asyncio.to_thread(self.store.import_archive, path, name,
                                               transfer=transfer)
        log.info("imported image %s (%s) from %s", info.name, info.digest, path)
        return info.name

    async def pull_image(self, reference: str, name: str, raw_options: dict[str, Any]) -> str:
        """Pull `reference` from its registry (skopeo) and import it as `name` (default:
        the reference); progress is keyed by the reference as the caller gave it."""
        options = settingsdict.unwrap(raw_options, PULL_OPTIONS, "pull option")
        remote = normalize_reference(reference)
        check_qualified(remote)
        local = normalize_reference(name) if name else remote
        transfer = Transfer(self._reporter(reference))
        pull = PullOptions(tls_verify=options.get("TLSVerify", True))
        with cancelled_on_hangup(options.get("ClientAlive"), transfer):
            info = await asyncio.to_thread(self._pull, remote, local, pull, transfer)
        log.info("pulled image %s (%s) as %s", remote, info.digest, info.name)
        return info.name

    def _pull(self, remote: str, local: str, options: PullOptions,
              transfer: Transfer) -> ImageInfo:
        self.store.refuse_existing(local)
        staging = self.store.staging("pull")
        try:
            layout = pull_layout(remote, staging, options, transfer)
            return self.store.import_archive(str(layout), local, transfer=transfer,
                                             label=f"docker://{remote}",
                                             source_name=f"docker://{remote}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def inspect_image(self, name: str) -> str:
        """`podman image inspect` JSON of one image."""
        return json.dumps(await asyncio.to_thread(self.store.inspect, name))

    def list_images(self) -> list[list[Any]]:
        return [[i.name, i.digest, i.size] for i in self.store.list()]

    def users_of(self, info: ImageInfo) -> list[str]:
        """The running machines and guests that run an image ("container NAME", "vm NAME")."""
        users = []
        for machine in self.runner.registry.all() if self.runner is not None else ():
            image = machine.settings.get("Image")
            if getattr(image, "value", image) == info.name and machine.state != "exited":
                users.append(f"container {machine.name}")
        for guest, disks in self.running_vms():
            if info.squashfs in disks:
                users.append(f"vm {guest}")
        return users

    async def remove_image(self, name: str) -> None:
        """Refused while a machine or guest runs the image: it would lose its root."""
        info = self.store.get(name)
        users = self.users_of(info)
        if users:
            raise ImageInUse(f"image {info.name} is in use by {', '.join(users)}; stop "
                             f"{'it' if len(users) == 1 else 'them'} first ('hostelctl "
                             "terminate NAME' or 'hostelctl guest terminate NAME')")
        await asyncio.to_thread(self.store.remove, info.name)
        log.info("removed image %s", info.name)

    async def prepare_vm(self, name: str, raw: dict[str, Any]) -> VmLaunch:
        """StartGuest with an "Image" and Isolation "vm": what the guest manager starts."""
        run = GuestRunSettings.from_dbus(raw)
        info = self.store.get(run.image)
        run.image = info.name   # the reference as the store keys it (bb is bb:latest)
        name = machine_name(name, run)
        kernel = run.vm.kernel

        def prepare() -> VmLaunch:
            # a directory of its own: a guest of the same name may still be running
            (self.runtime_dir / "vm").mkdir(mode=0o700, parents=True, exist_ok=True)
            work_dir = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.runtime_dir / "vm"))
            try:
                return vm_launch(name, run, info, work_dir,
                                 initramfs.kernel_at(kernel) if kernel else None)
            except BaseException:
                shutil.rmtree(work_dir, ignore_errors=True)
                raise

        return await asyncio.to_thread(prepare)

    async def run_container(self, name: str, raw: dict[str, Any]) -> str:
        """StartGuest with an "Image": the machine's object path (its ExitStatus tells the end)."""
        from hostel.machine.service import machine_path

        run = GuestRunSettings.from_dbus(raw)
        if run.isolation != "container":
            raise InvalidArgs(f"isolation {run.isolation!r} is not a container's: "
                              "StartGuest starts it with the guest manager (start_vm)")
        if self.runner is None:
            raise NotImplementedYet("this hosteld has no machine runtime to run images in")
        info = self.store.get(run.image)
        run.image = info.name   # the reference as the store keys it (bb is bb:latest)
        name = machine_name(name, run)
        # the container's hostname is its name: its HOSTNAME says so, as a VM's does
        request = dataclasses.replace(run.request, hostname=name)
        process, files = await asyncio.to_thread(inspect_image, info, request,
                                                 self.runtime_dir / "inspect")
        networks: list[run_network.ContainerNetwork] = []   # the veth's, once made

        def provider(runtime_dir: Path, cleanup: ExitStack) -> PreparedRoot:
            if run.network == "veth":
                networks.append(container_network(name, cleanup))
            return prepare_image_root(info, files, runtime_dir, cleanup,
                                      networks[-1] if networks else None)

        settings = machine_settings(name, run, process, provider)
        # The caller's descriptors belong to the D-Bus message; the runner owns these copies.
        settings.stdio = Stdio(*(os.dup(fd) if fd is not None else None
                                 for fd in (run.stdio.stdin, run.stdio.stdout, run.stdio.stderr)))
        try:
            machine = await self.runner.start(settings)
        except MachineStartFailed as e:
            cause = e.__cause__
            if isinstance(cause, StepFailed) and cause.description.startswith(_EXEC_STEPS) \
                    and cause.errno is not None:
                raise CommandNotRunnable(process.path, cause.errno) from None
            raise
        if networks:
            record_host_end(machine, networks[-1])
            # its host end, as for --network-veth (hostelctl status shows it); the update
            # saves the state file, which now names the host end too
            self.runner.registry.update(machine, network_interfaces=[networks[-1].host_index])
        return machine_path(machine.name)


def record_host_end(machine: Machine, network: run_network.ContainerNetwork) -> None:
    """Name the run's host end in the machine runtime's network setup, as a --network-veth
    container's veth is named there: the setup is saved in the machine's state file, so a
    hosteld that adopts the container after a crash deletes the link when the container
    ends (teardown_network), as this hosteld's ContainerNetwork.teardown would have."""
    setup = machine.runtime.network_setup if machine.runtime is not None else None
    if setup is not None and setup.host_veth is None:
        setup.host_veth, setup.host_veth_index = network.host_link, network.host_index
