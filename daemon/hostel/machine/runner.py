"""Starting, watching and stopping containers: the seed's main(), on the event loop.

Blocking preparation (copying a template, attaching loops, reading the
tree) runs in a thread; the plan is built in Python and run by the C
trampoline (born in its cgroup, see cgroups.CgroupJoin); the uid map is
written before the child needs it, and the network is built while the child
sets up its mounts; the child is then watched through its pidfd.
Every start either ends with a running machine or leaves nothing behind."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from hostel import native
from hostel.bus import HostelError
from hostel.machine import capabilities, cgroups, devices, hostfiles, journal, mounts
from hostel.machine import network as machine_network
from hostel.machine import tree, users, userns
from hostel.machine import seccomp as machine_seccomp
from hostel.machine.console import Console, open_console
from hostel.machine.registry import Event, Machine, Registry, State
from hostel.machine.settings import MachineSettings
from hostel.machine.statefile import (SavedMachine, StateStore, process_start_time,
                                      settings_from_json, settings_to_json)
from hostel.spawn import Child, Plan, StepFailed, spawn, wait_exit, wait_readable

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_PATHS = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/sbin/init")
EXIT_REBOOT = 133
TERMINATE_TIMEOUT = 10.0
EXITED_GRACE = 300.0   # how long a machine found dead at adoption stays listed as "exited"
STATUS_UNKNOWN = -1    # the exit status of a process that was not our child


class MachineStartFailed(HostelError):
    dbus_name = "org.hostel1.Error.StartFailed"


@dataclass
class Runtime:
    """What a running machine holds on the host, released when it is gone."""

    settings: MachineSettings
    child: Child | None = None
    console: Console | None = None
    cgroup: cgroups.CgroupSet | None = None
    network_settings: machine_network.NetworkSettings | None = None
    network_setup: machine_network.NetworkSetup | None = None
    cleanup: ExitStack = field(default_factory=ExitStack)
    runtime_dir: Path | None = None
    watcher: asyncio.Task | None = None
    terminating: bool = False
    adopted: bool = False  # started by an earlier hosteld: not our child, status unknowable


@dataclass
class Prepared:
    """Everything the plan needs that had to be looked up or set up first."""

    prepared_root: tree.PreparedRoot
    machine_id: bytes
    user: users.UserIds
    retain: int
    seccomp_bpf: bytes

    @property
    def root(self) -> str:
        return self.prepared_root.root

    @property
    def view(self) -> str | None:
        return self.prepared_root.view


class MachineRunner:
    def __init__(self, registry: Registry, runtime_dir: Path, machines_dir: Path) -> None:
        self.registry = registry
        self.runtime_dir = runtime_dir
        self.machines_dir = machines_dir
        self.store = StateStore(runtime_dir / "machines")
        self._cgroup_layout: cgroups.CgroupLayout | None = None
        registry.subscribe(self._persist)

    def cgroup_layout(self) -> cgroups.CgroupLayout:
        """The hierarchies, read from the mount table at the first start that needs them."""
        if self._cgroup_layout is None:
            self._cgroup_layout = cgroups.CgroupLayout.detect()
        return self._cgroup_layout

    # State on disk -------------------------------------------------------------------

    def _persist(self, event: Event, machine: Machine, changed: dict) -> None:
        """Keep /run/hostel/machines/NAME.json in step with every running machine."""
        if event is Event.REMOVED:
            self.store.delete(machine.name)
        elif machine.state is State.RUNNING and machine.leader:
            self.store.save(self._snapshot(machine))

    @staticmethod
    def _snapshot(machine: Machine) -> SavedMachine:
        runtime: Runtime | None = machine.runtime
        cgroup = runtime.cgroup if runtime else None
        setup = runtime.network_setup if runtime else None
        return SavedMachine(
            name=machine.name, id=machine.id.hex(), klass=machine.klass, service=machine.service,
            unit=machine.unit, leader=machine.leader, leader_start=process_start_time(machine.leader),
            root_directory=machine.root_directory, timestamp_us=machine.timestamp_us,
            timestamp_monotonic_us=machine.timestamp_monotonic_us,
            network_interfaces=list(machine.network_interfaces),
            settings=settings_to_json(machine.settings),
            cgroup=dataclasses.asdict(cgroup) if cgroup else None,
            network=dataclasses.asdict(setup) if setup else None,
            runtime_dir=str(runtime.runtime_dir) if runtime and runtime.runtime_dir else "",
            registered_only=machine.registered_only)

    async def adopt(self) -> None:
        """Take back the machines an earlier hosteld left running (or note that they ended)."""
        for saved in self.store.load():
            machine = Machine(saved.name, id=bytes.fromhex(saved.id), klass=saved.klass,
                              service=saved.service, unit=saved.unit, leader=saved.leader,
                              root_directory=saved.root_directory, state=State.RUNNING,
                              timestamp_us=saved.timestamp_us,
                              timestamp_monotonic_us=saved.timestamp_monotonic_us,
                              network_interfaces=saved.network_interfaces,
                              settings=settings_from_json(saved.settings),
                              registered_only=saved.registered_only)
            runtime = self._adopted_runtime(saved, machine)
            machine.runtime = runtime
            self.registry.reserve(machine)
            if runtime.child is not None:
                log.info("adopted machine %s (leader %d)", machine.name, machine.leader)
                runtime.watcher = asyncio.get_running_loop().create_task(
                    self._watch_adopted(machine, runtime))
            else:
                log.info("machine %s exited while hosteld was down", machine.name)
                await self._cleanup(machine, runtime)
                self.registry.update(machine, state=State.EXITED, exit_status=STATUS_UNKNOWN)
                asyncio.get_running_loop().call_later(EXITED_GRACE, self.registry.remove, machine)

    def _adopted_runtime(self, saved: SavedMachine, machine: Machine) -> Runtime:
        runtime = Runtime(self._saved_settings(saved), adopted=True,
                          runtime_dir=Path(saved.runtime_dir) if saved.runtime_dir else None)
        if saved.cgroup:
            runtime.cgroup = cgroups.CgroupSet(**{**saved.cgroup,
                                                  "paths": tuple(saved.cgroup["paths"])})
            runtime.cleanup.callback(runtime.cgroup.remove)
        if saved.network:
            runtime.network_setup = machine_network.NetworkSetup(**saved.network)
            runtime.cleanup.callback(machine_network.teardown_network, runtime.network_setup)
        if runtime.runtime_dir is not None:
            runtime.cleanup.callback(_remove_tree, runtime.runtime_dir)
        if saved.leader_start is not None and process_start_time(saved.leader) == saved.leader_start:
            try:
                runtime.child = Child(saved.leader, native.pidfd_open(saved.leader), Plan(), -1)
            except ProcessLookupError:
                pass  # it ended just now
        return runtime

    def _saved_settings(self, saved: SavedMachine) -> MachineSettings:
        from hostel.bus import InvalidArgs
        from hostel.machine.settings import from_dbus

        try:
            return from_dbus(saved.name, settings_from_json(saved.settings), self.machines_dir)
        except InvalidArgs as e:
            log.warning("machine %s: saved settings no longer valid (%s); keeping defaults",
                        saved.name, e)
            return MachineSettings(saved.name)

    async def _watch_adopted(self, machine: Machine, runtime: Runtime) -> None:
        """Not our child: the pidfd tells us when it ends, but not how."""
        await wait_readable(runtime.child.pidfd)
        runtime.child.close()
        await self._finish(machine, runtime, STATUS_UNKNOWN,
                           "exited (status unknown: it was started by an earlier hosteld)")

    def track_registered(self, machine: Machine) -> None:
        """RegisterMachine's processes are not ours either: notice when they end."""
        runtime = Runtime(MachineSettings(machine.name), adopted=True)
        runtime.child = Child(machine.leader, native.pidfd_open(machine.leader), Plan(), -1)
        machine.runtime = runtime
        runtime.watcher = asyncio.get_running_loop().create_task(
            self._watch_adopted(machine, runtime))

    # Start ---------------------------------------------------------------------------

    async def start(self, settings: MachineSettings) -> Machine:
        """Start a container; the descriptors in settings.stdio belong to the runner from here."""
        try:
            machine = self.registry.reserve(Machine(
                settings.name, settings=settings.raw,
                root_directory=settings.directory or settings.image or ""))
        except HostelError:
            settings.stdio.close()
            raise
        runtime = Runtime(settings, runtime_dir=self.runtime_dir / "machines" / settings.name)
        machine.runtime = runtime
        try:
            await self._launch(machine, runtime)
        except BaseException:
            await asyncio.to_thread(runtime.cleanup.close)
            if runtime.console is not None:
                runtime.console.close()  # it owns the caller's descriptors now
            else:
                settings.stdio.close()
            self.registry.remove(machine)
            raise
        runtime.watcher = asyncio.get_running_loop().create_task(self._watch(machine, runtime))
        runtime.watcher.add_done_callback(lambda task: self._watch_done(machine, task))
        return machine

    def _watch_done(self, machine: Machine, task: asyncio.Task) -> None:
        """A watcher that died must not leave a machine registered that nobody watches."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("watching machine %s failed: %r", machine.name, task.exception())
        self.registry.remove(machine)

    async def _launch(self, machine: Machine, runtime: Runtime) -> None:
        settings = runtime.settings
        runtime.runtime_dir.mkdir(parents=True, exist_ok=True)
        runtime.cleanup.callback(_remove_tree, runtime.runtime_dir)
        prepared = await asyncio.to_thread(self._prepare, settings, runtime)
        if runtime.console is None:
            runtime.console = open_console(settings.console, settings.stdio)
        else:  # a reboot: same console, fresh descriptors for the new payload
            runtime.console.reopen_payload()
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        join = runtime.cgroup.open_join() if runtime.cgroup else cgroups.CgroupJoin()
        try:
            plan = build_plan(settings, prepared, runtime.console, str(runtime.runtime_dir),
                              go_r, join)
            # In a thread: a plan that shares our memory returns only after its exec.
            child = await asyncio.to_thread(spawn, plan, clone_flags(settings), join.born_in)
        finally:
            os.close(go_r)
            join.close()
        runtime.child = child
        try:
            await self._parent_side(machine, runtime, child, prepared, go_w)
        except (HostelError, OSError):
            # The child runs its first steps meanwhile: if one failed, that is the cause.
            native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            await _child_started(child, settings.name)
            await wait_exit(child.pidfd)
            raise
        except BaseException:
            native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            raise
        finally:
            os.close(go_w)
        await _child_started(child, settings.name)
        runtime.console.close_payload_side()
        runtime.console.start_relay()
        self.registry.update(machine, id=prepared.machine_id, leader=child.pid,
                             unit=runtime.cgroup.unit if runtime.cgroup else "",
                             state=State.RUNNING, root_directory=prepared.view or settings.image or "")
        if not settings.quiet:
            log.info("machine %s started, leader %d, root %s", settings.name, child.pid,
                     prepared.view or settings.image)

    def _prepare(self, settings: MachineSettings, runtime: Runtime) -> Prepared:
        """The blocking part of start-up: runs in a thread."""
        prepared_tree = tree.prepare_root(settings, runtime.runtime_dir, runtime.cleanup)
        machine_id = hostfiles.container_machine_id(prepared_tree.view, settings.uuid)
        ids = users.resolve_user(settings.user, prepared_tree.read_file("/etc/passwd"),
                                 prepared_tree.read_file("/etc/group"))
        plus = capabilities.parse_capabilities(settings.capability)
        minus = capabilities.parse_capabilities(settings.drop_capability)
        retain = capabilities.compute_retain(plus, minus, settings.private_network)
        if not settings.keep_unit:
            runtime.cgroup = cgroups.create(settings.name, settings.slice, self.cgroup_layout())
            runtime.cleanup.callback(runtime.cgroup.remove)
            runtime.cgroup.allow_devices(prepared_tree.devices)
        runtime.network_settings = machine_network.NetworkSettings(
            settings.private_network, settings.network_veth, settings.network_bridge,
            settings.network_interfaces, settings.network_macvlan)
        runtime.network_settings.validate()
        return Prepared(prepared_tree, machine_id, ids, retain, machine_seccomp.container_filter())

    async def _parent_side(self, machine: Machine, runtime: Runtime, child: Child,
                           prepared: Prepared, go_fd: int) -> None:
        """The seed's parent work between clone and the child's exec.

        The id maps come before the child's first step that needs them; the
        network is built while the child sets up its mounts, and the child
        waits for it just before it execs. (The cgroup needs no parent work:
        see cgroups.CgroupJoin.)"""
        settings = runtime.settings
        if settings.private_users is not None:
            userns.write_id_maps(child.pid, settings.private_users, settings.name, prepared.view)
            _release(go_fd)
        if settings.private_network:
            setup = await asyncio.to_thread(machine_network.setup_network, runtime.network_settings,
                                            settings.name, child.pid)
            runtime.cleanup.callback(machine_network.teardown_network, setup)
            runtime.network_setup = setup
            self.registry.update(machine, network_interfaces=list(setup.interfaces))
            _release(go_fd)

    # Watch, stop ---------------------------------------------------------------------

    async def _watch(self, machine: Machine, runtime: Runtime) -> None:
        while True:
            info = await wait_exit(runtime.child.pidfd)
            runtime.child.close()
            reboot = runtime.settings.boot and not runtime.terminating and (
                (info.exited and info.status == EXIT_REBOOT)
                or (not info.exited and info.status == signal.SIGHUP))
            if not reboot:
                break
            log.info("machine %s is rebooting", machine.name)
            self.registry.update(machine, state=State.OPENING)
            await self._cleanup(machine, runtime)
            runtime.cleanup = ExitStack()
            try:
                await self._launch(machine, runtime)
            except HostelError as e:
                log.error("rebooting machine %s failed: %s", machine.name, e)
                await self._finish(machine, runtime, 1, f"failed to reboot: {e}")
                return
        # A shutdown (SIGINT from reboot(2) in the container) is a clean exit.
        clean_shutdown = not info.exited and info.status == signal.SIGINT and runtime.settings.boot
        await self._finish(machine, runtime, 0 if clean_shutdown else info.returncode,
                           info.describe())

    async def _finish(self, machine: Machine, runtime: Runtime, status: int, how: str) -> None:
        self.registry.update(machine, state=State.CLOSING)
        await self._cleanup(machine, runtime)
        if runtime.console is not None:
            try:
                runtime.console.close()
            except OSError as e:  # never keep "exited" from reaching the clients waiting for it
                log.error("closing the console of machine %s: %s", machine.name, e)
        self.registry.update(machine, state=State.EXITED, exit_status=status)
        log.info("machine %s %s", machine.name, how)
        self.registry.remove(machine)

    @staticmethod
    async def _cleanup(machine: Machine, runtime: Runtime) -> None:
        """Release what the machine held (in a thread: cgroup removal waits for stragglers).

        A failure here must not keep the machine registered forever: it is
        logged with the object it failed on, and the machine goes away."""
        try:
            await asyncio.to_thread(runtime.cleanup.close)
        except (HostelError, OSError) as e:
            log.error("cleaning up after machine %s: %s", machine.name, e)

    async def terminate(self, machine: Machine, timeout: float = TERMINATE_TIMEOUT) -> None:
        """Orderly: SIGRTMIN+3 to a booted init, SIGTERM otherwise, SIGKILL after `timeout`."""
        runtime: Runtime = machine.runtime
        if runtime is None or runtime.child is None:
            return
        runtime.terminating = True
        self.registry.update(machine, state=State.CLOSING)
        sig = runtime.settings.kill_signal or (
            signal.SIGRTMIN + 3 if runtime.settings.boot else signal.SIGTERM)
        self._signal_leader(runtime, sig)
        try:
            await asyncio.wait_for(asyncio.shield(runtime.watcher), timeout)
        except asyncio.TimeoutError:
            log.warning("machine %s did not stop within %.0f s: killing it", machine.name, timeout)
            self.kill(machine, "all", signal.SIGKILL)
            await runtime.watcher

    def kill(self, machine: Machine, who: str, sig: int) -> None:
        runtime: Runtime = machine.runtime
        if who == "leader":
            self._signal_leader(runtime, sig)
        elif runtime.cgroup is not None:
            runtime.cgroup.kill(sig)
        else:
            self._signal_leader(runtime, sig)

    @staticmethod
    def _signal_leader(runtime: Runtime, sig: int) -> None:
        try:
            native.pidfd_send_signal(runtime.child.pidfd, sig)
        except ProcessLookupError:
            pass  # already gone: the watcher will see it



async def _child_started(child: Child, name: str) -> None:
    """Wait until the child execs; a step that failed becomes the start's error."""
    try:
        await child.started()
    except StepFailed as e:
        await wait_exit(child.pidfd)
        raise MachineStartFailed(f"starting machine {name} failed at {e}") from None


def _release(go_fd: int) -> None:
    """Let the child past its next wait step. A child that already failed a step is not
    waiting any more; its report says why, and _launch() reads it next."""
    try:
        os.write(go_fd, b"x")
    except BrokenPipeError:
        pass


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def clone_flags(settings: MachineSettings) -> int:
    flags = native.CLONE_NEWNS
    if not settings.share_system:
        flags |= native.CLONE_NEWIPC | native.CLONE_NEWPID | native.CLONE_NEWUTS
    if settings.private_network:
        flags |= native.CLONE_NEWNET
    if settings.private_users is not None:
        flags |= native.CLONE_NEWUSER
    return flags


# The plan ------------------------------------------------------------------------

def build_plan(settings: MachineSettings, prepared: Prepared, console: Console,
               runtime_dir: str, go_fd: int, join: cgroups.CgroupJoin) -> Plan:
    """The child's whole life before exec, in the seed's order."""
    plan = Plan()
    root = prepared.root
    in_userns = settings.private_users is not None
    join.plan_steps(plan)  # first: nothing may fork before the child is in its scope
    if in_userns:  # become the namespace's root (host uid BASE) once it is mapped
        plan.wait_for_parent(go_fd, "the uid/gid map")
        plan.setgroups([])
        plan.setresgid(0)
        plan.setresuid(0)
    _plan_stdio(plan, console)
    if not settings.share_system:
        plan.write_file("/proc/self/loginuid", b"4294967295", create=False, truncate=False,
                        best_effort=True)
    plan.mount(None, "/", None, native.MS_SLAVE | native.MS_REC)
    prepared.prepared_root.mount_steps(plan)
    mounts.plan_root(plan, root, settings, runtime_dir)
    mounts.plan_api_filesystems(plan, root, settings)
    devices.plan_devnodes(plan, root, in_userns)
    plan.seccomp(prepared.seccomp_bpf)
    devices.plan_console(plan, root, console.tty_path, in_userns)
    devices.plan_kmsg(plan, root)
    if not settings.share_system:
        mounts.plan_boot_id(plan, root)
    # With --volatile=yes the root is a fresh tmpfs: the tree's files are not in it.
    view = None if settings.volatile == "yes" else prepared.view
    hostfiles.plan_timezone(plan, root, view, settings.name)
    hostfiles.plan_resolv_conf(plan, root, settings.private_network)
    hostfiles.plan_machine_id(plan, root, view, prepared.machine_id)
    journal.plan_journal(plan, root, view, settings)
    mounts.plan_binds(plan, root, settings.binds)
    mounts.plan_tmpfs(plan, root, settings.tmpfs)
    if not settings.share_system:
        plan.sethostname(settings.name)
    mounts.plan_enter_root(plan, root)
    plan.drop_bounding_caps(capabilities.bounding_drop_mask(prepared.retain))
    user_env = users.plan_change_user(plan, prepared.user)
    if settings.working_directory:
        plan.chdir(settings.working_directory)
    if settings.personality is not None:  # set by --personality, or by an x86 image root
        plan.personality(settings.personality)
    if settings.selinux_context:
        plan.write_file("/proc/self/attr/exec", settings.selinux_context.encode(), create=False)
    env = payload_environment(settings, prepared, user_env)
    if settings.private_network:
        plan.wait_for_parent(go_fd, "the network interfaces")
    if settings.as_pid2:
        plan.stub_init()
    _plan_exec(plan, settings, prepared, env)
    return plan


def _plan_stdio(plan: Plan, console: Console) -> None:
    for target, fd in enumerate((console.stdin, console.stdout, console.stderr)):
        plan.dup2(fd, target)
    plan.setsid()
    if console.tty_path is not None:
        plan.set_controlling_tty(0)


def payload_environment(settings: MachineSettings, prepared: Prepared,
                        user_env: list[str]) -> list[str]:
    env = {"PATH": f"PATH={DEFAULT_PATH}", "container": "container=hostel"}
    if settings.terminal:
        env["TERM"] = f"TERM={settings.terminal}"
    for item in user_env:
        env[item.split("=", 1)[0]] = item
    env["container_uuid"] = "container_uuid=" + _uuid_text(prepared.machine_id)
    for item in settings.environment:
        env[item.split("=", 1)[0]] = item
    return list(env.values())


def _uuid_text(raw: bytes) -> str:
    import uuid

    return str(uuid.UUID(bytes=raw))


def _plan_exec(plan: Plan, settings: MachineSettings, prepared: Prepared, env: list[str]) -> None:
    if settings.boot:
        for init in INIT_PATHS:
            plan.execve(init, [init, *settings.command], env, try_next=True)
        plan.fail(2, f"find an init system in the container ({', '.join(INIT_PATHS)})")
        return
    if settings.command:
        _plan_exec_search(plan, settings.command, env)
        return
    home = prepared.user.home or "/root"
    plan.chdir(home, best_effort=True)
    plan.execve("/bin/bash", ["-bash"], env, try_next=True)
    plan.execve("/bin/sh", ["-sh"], env)


def _plan_exec_search(plan: Plan, command: list[str], env: list[str]) -> None:
    """execvpe() with the container's PATH, as steps: each candidate tried in turn."""
    name = command[0]
    if "/" in name:
        plan.execve(name, command, env)
        return
    path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for directory in [d for d in path.split(":") if d]:
        plan.execve(f"{directory}/{name}", command, env, try_next=True)
    plan.fail(2, f"find {name!r} in the container's PATH ({path})")
