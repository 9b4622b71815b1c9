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
from pathlib import Path

from hostel import native
from hostel.bus import HostelError
from hostel.machine import adoption, capabilities, cgroups, hostfiles, limits, tree, treelock
from hostel.machine import bind_user, mounts, users, userns
from hostel.machine import network as machine_network
from hostel.machine import overlays
from hostel.machine import seccomp as machine_seccomp
from hostel.machine.console import open_console
from hostel.machine.plan import Prepared, build_plan, clone_flags
from hostel.machine.registry import Event, Machine, Registry, State
from hostel.machine.runtime import Runtime
from hostel.machine.settings import MachineSettings
from hostel.machine.statefile import (SavedMachine, SavedState, StateStore,
                                      process_start_time, settings_to_json)
from hostel.spawn import Child, Plan, StepFailed, spawn, wait_exit

log = logging.getLogger(__name__)

EXIT_REBOOT = 133
TERMINATE_TIMEOUT = 10.0


class MachineStartFailed(HostelError):
    dbus_name = "org.hostel1.Error.StartFailed"


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
        """Keep /run/hostel/machines/NAME.json in step with every running machine.

        A start records the machine itself (see _record) and fails if it
        cannot; later changes (e.g. its network interfaces) that fail to
        save are logged: the file on disk still finds the machine."""
        if event is Event.REMOVED:
            self.store.delete(machine.name)
        elif machine.state is State.RUNNING and machine.leader and "state" not in changed:
            try:
                self.store.save(self._snapshot(machine, SavedState.RUNNING))
            except OSError as e:
                log.error("saving the state of machine %s: %s", machine.name, e)

    @staticmethod
    def _snapshot(machine: Machine, state: SavedState) -> SavedMachine:
        runtime: Runtime | None = machine.runtime
        cgroup = runtime.cgroup if runtime else None
        setup = runtime.network_setup if runtime else None
        return SavedMachine(
            name=machine.name, id=machine.id.hex(), klass=machine.klass, service=machine.service,
            unit=machine.unit, leader=machine.leader, leader_start=process_start_time(machine.leader) if machine.leader else None,
           
            root_directory=machine.root_directory, timestamp_us=machine.timestamp_us,
            timestamp_monotonic_us=machine.timestamp_monotonic_us,
            network_interfaces=list(machine.network_interfaces),
            settings=settings_to_json(machine.settings),
            cgroup=dataclasses.asdict(cgroup) if cgroup else None,
            network=dataclasses.asdict(setup) if setup else None,
            runtime_dir=str(runtime.runtime_dir) if runtime and runtime.runtime_dir else "",
            registered_only=machine.registered_only, state=state.value)

    async def adopt(self) -> None:
        """Take back the machines an earlier hosteld left running (see adoption)."""
        await adoption.adopt(self)

    def track_registered(self, machine: Machine) -> None:
        """RegisterMachine's processes are not ours either: notice when they end."""
        runtime = Runtime(MachineSettings(machine.name), adopted=True)
        runtime.child = Child(machine.leader, native.pidfd_open(machine.leader), Plan(), -1)
        machine.runtime = runtime
        adoption.watch_foreign(self, machine, runtime)

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
        runtime_dir = runtime.runtime_dir
        assert runtime_dir is not None  # set by start() for every machine it launches
        runtime.cleanup.callback(adoption.remove_tree, runtime_dir)
        prepared = await asyncio.to_thread(self._prepare, settings, runtime, runtime_dir)
        # On record before the child exists: the scope it will be born in is in the file,
        # so a restarted hosteld finds (and kills) whatever a start cut short left in it.
        await self._record(machine, runtime, SavedState.OPENING)
        if runtime.console is None:
            runtime.console = open_console(settings.console, settings.stdio, boot=settings.boot)
        else:  # a reboot: same console, fresh descriptors for the new payload
            runtime.console.reopen_payload()
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        join = runtime.cgroup.open_join() if runtime.cgroup else cgroups.CgroupJoin()
        try:
            plan = build_plan(settings, prepared, runtime.console, str(runtime_dir),
                              go_r, join, wait_for_record=runtime.cgroup is None)
            # In a thread: a plan that shares our memory returns only after its exec.
            child = await asyncio.to_thread(spawn, plan, clone_flags(settings), join.born_in)
        except BaseException:
            os.close(go_w)
            raise
        finally:
            os.close(go_r)
            join.close()
            mounts.close_detached(prepared.detached)  # the child has its copies
        runtime.child = child
        try:
            await self._start_child(machine, runtime, child, prepared, go_w)
        except BaseException:
            runtime.child = None
            child.close()
            raise
        runtime.console.close_payload_side()
        runtime.console.start_relay(machine.name)
        self.registry.update(machine, state=State.RUNNING)
        if not settings.quiet:
            log.info("machine %s started, leader %d, root %s", settings.name, child.pid,
                     prepared.view or settings.image)

    async def _start_child(self, machine: Machine, runtime: Runtime, child: Child,
                           prepared: Prepared, go_fd: int) -> None:
        """From clone to a recorded, running payload; on any failure the child is killed
        and reaped (the caller closes its descriptors)."""
        settings = runtime.settings
        try:
            await self._parent_side(machine, runtime, child, prepared, go_fd)
            if runtime.cgroup is None:  # nothing to find it by but its pid: record that first
                self._set_identity(machine, runtime, child, prepared)
                await self._record(machine, runtime, SavedState.OPENING)
                _release(go_fd)
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
            os.close(go_fd)
        await _child_started(child, settings.name)
        self._set_identity(machine, runtime, child, prepared)
        try:
            await self._record(machine, runtime, SavedState.RUNNING)
        except BaseException:
            self._kill_now(runtime, child)
            await wait_exit(child.pidfd)
            raise

    def _set_identity(self, machine: Machine, runtime: Runtime, child: Child,
                      prepared: Prepared) -> None:
        settings = runtime.settings
        self.registry.update(machine, id=prepared.machine_id, leader=child.pid,
                             unit=runtime.cgroup.unit if runtime.cgroup else "",
                             root_directory=prepared.view or settings.image or "")

    @staticmethod
    def _kill_now(runtime: Runtime, child: Child) -> None:
        """SIGKILL the leader and everything in its scope (a payload that already forked)."""
        native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        if runtime.cgroup is not None:
            try:
                runtime.cgroup.kill(signal.SIGKILL)
            except OSError as e:  # the leader's death ends its pid namespace anyway
                log.error("killing the scope of machine %s: %s", runtime.settings.name, e)

    async def _record(self, machine: Machine, runtime: Runtime, state: SavedState) -> None:
        """Write the state file (fsync'd, in a thread); a failure fails the start."""
        saved = self._snapshot(machine, state)
        try:
            await asyncio.to_thread(self.store.save, saved)
        except OSError as e:
            raise MachineStartFailed(
                f"starting machine {machine.name} failed: cannot record its state in "
                f"{self.store.path(machine.name)}: {e.strerror or e}; free space there "
                "(or fix its permissions) and start it again") from None

    def _prepare(self, settings: MachineSettings, runtime: Runtime, runtime_dir: Path) -> Prepared:
        """The blocking part of start-up: runs in a thread."""
        runtime_dir.mkdir(parents=True, exist_ok=True)
        treelock.lock_root(settings, runtime.cleanup)
        prepared_tree = tree.prepare_root(settings, runtime_dir, runtime.cleanup)
        settings.resolved_overlays = overlays.prepare(settings.overlays, prepared_tree.view,
                                                      runtime.cleanup)
        machine_id = hostfiles.container_machine_id(prepared_tree.view, settings.uuid)
        # A tree without the files has no users but root (which is never looked up).
        passwd = prepared_tree.read_file("/etc/passwd") or b""
        group = prepared_tree.read_file("/etc/group") or b""
        if settings.bind_user and settings.private_users is not None:
            settings.bound_users = bind_user.resolve(settings.bind_user, passwd, group,
                                                     settings.private_users.range)
            runtime.cleanup.callback(bind_user.close_homes, settings.bound_users)
            bind_user.open_homes(settings.bound_users)
        ids = users.resolve_user(settings.user, passwd, group,
                                 tuple(bound.ids for bound in settings.bound_users))
        plus = capabilities.parse_capabilities(settings.capability)
        minus = capabilities.parse_capabilities(settings.drop_capability)
        retain = capabilities.compute_retain(plus, minus, settings.private_network,
                                             settings.private_users is not None)
        if not settings.keep_unit:
            runtime.cgroup = cgroups.create(settings.name, settings.slice, self.cgroup_layout())
            runtime.cleanup.callback(runtime.cgroup.remove)
            runtime.cgroup.allow_devices(prepared_tree.devices)
            runtime.cgroup.apply_properties(settings.properties)
        network_settings = machine_network.NetworkSettings(
            settings.private_network, settings.network_veth, settings.network_bridge,
            settings.network_interfaces, settings.network_macvlan,
            zone=settings.network_zone, ports=settings.ports)
        network_settings.validate()
        runtime.network_settings = network_settings
        prepared = Prepared(prepared_tree, machine_id, ids, retain,
                            machine_seccomp.container_filter(retain, settings.syscall_allow,
                                                             settings.syscall_deny))
        if settings.private_users is not None:  # last: nothing fails after the mounts
            prepared.uid_base = userns.uid_base(
                settings.private_users, settings.name,
                userns.owner_root(prepared_tree.view, prepared_tree.ownership))
            prepared.detached = mounts.detached_api_mounts(settings, prepared.uid_base)
            runtime.cleanup.callback(mounts.close_detached, prepared.detached)
        return prepared

    async def _parent_side(self, machine: Machine, runtime: Runtime, child: Child,
                           prepared: Prepared, go_fd: int) -> None:
        """The seed's parent work between clone and the child's exec.

        The id maps come before the child's first step that needs them; the
        network is built while the child sets up its mounts, and the child
        waits for it just before it execs. (The cgroup needs no parent work:
        see cgroups.CgroupJoin.)"""
        settings = runtime.settings
        if settings.private_users is not None:
            base = prepared.uid_base
            assert base is not None  # chosen by _prepare for every --private-users start
            await asyncio.to_thread(userns.write_id_maps, child.pid, settings.private_users,
                                    base, prepared.view, prepared.prepared_root.ownership,
                                    settings.private_users_ownership, settings.bound_users)
            if runtime.cgroup is not None:  # its init may manage its own cgroups, as in nspawn
                await asyncio.to_thread(runtime.cgroup.delegate, base, base)
            _release(go_fd)
        if settings.wants_process_limits():  # the child waits for them (plan.build_plan)
            await asyncio.to_thread(limits.apply, child.pid, settings.rlimits,
                                    settings.cpu_affinity, settings.oom_score_adjust)
            _release(go_fd)
        if settings.private_network and runtime.network_settings is not None:
            setup = await asyncio.to_thread(machine_network.setup_network, runtime.network_settings,
                                            settings.name, child.pid)
            # deferred: the exit is reported without waiting for the veth's deletion
            runtime.cleanup.callback(machine_network.teardown_network, setup, defer=True)
            runtime.network_setup = setup
            self.registry.update(machine, network_interfaces=list(setup.interfaces))
            _release(go_fd)

    # Watch, stop ---------------------------------------------------------------------

    async def _watch(self, machine: Machine, runtime: Runtime) -> None:
        while True:
            child = runtime.child
            assert child is not None  # _launch set it, or raised
            info = await wait_exit(child.pidfd)
            child.close()
            if runtime.terminating or not _reboots(info, runtime.settings):
                break
            log.info("machine %s is rebooting", machine.name)
            self.registry.update(machine, state=State.OPENING)
            if runtime.terminating:  # a listener stopped it (a start limit): not again
                break
            await self.cleanup(machine, runtime)
            runtime.cleanup = ExitStack()
            try:
                await self._launch(machine, runtime)
            except (HostelError, OSError) as e:
                log.error("rebooting machine %s failed: %s", machine.name, e)
                await self.finish(machine, runtime, 1, f"failed to reboot: {e}")
                return
        await self.finish(machine, runtime, nspawn_exit_status(info), info.describe(),
                          exit_signal=0 if info.exited else info.status)

    async def finish(self, machine: Machine, runtime: Runtime, status: int, how: str,
                     exit_signal: int = 0) -> None:
        self.registry.update(machine, state=State.CLOSING)
        await self.cleanup(machine, runtime)
        if runtime.console is not None:
            try:
                runtime.console.close()
            except OSError as e:  # never keep "exited" from reaching the clients waiting for it
                log.error("closing the console of machine %s: %s", machine.name, e)
        self.registry.update(machine, state=State.EXITED, exit_status=status,
                             exit_signal=exit_signal)
        log.info("machine %s %s", machine.name, how)
        self.registry.remove(machine)

    @staticmethod
    async def cleanup(machine: Machine, runtime: Runtime) -> None:
        """Release what the machine held (in a thread: cgroup removal waits for stragglers).

        A failure here must not keep the machine registered forever: it is
        logged with the object it failed on, and the machine goes away."""
        try:
            await asyncio.to_thread(runtime.cleanup.close)
        except (HostelError, OSError) as e:
            log.error("cleaning up after machine %s: %s", machine.name, e)

    async def terminate(self, machine: Machine, timeout: float = TERMINATE_TIMEOUT) -> None:
        """Orderly: SIGRTMIN+3 to a booted init, SIGTERM otherwise, SIGKILL after `timeout`."""
        runtime = machine.runtime
        if runtime is None or runtime.child is None or runtime.watcher is None:
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
        runtime = machine.runtime
        if runtime is None:
            return  # nothing of it runs (found dead at adoption)
        if who == "leader":
            self._signal_leader(runtime, sig)
        elif runtime.cgroup is not None:
            runtime.cgroup.kill(sig)
        else:
            self._signal_leader(runtime, sig)

    @staticmethod
    def _signal_leader(runtime: Runtime, sig: int) -> None:
        child = runtime.child
        if child is None or child.pidfd < 0:
            return  # it ended, and the watcher closed its pidfd
        try:
            native.pidfd_send_signal(child.pidfd, sig)
        except ProcessLookupError:
            pass  # already gone: the watcher will see it


def _reboots(info: native.ExitInfo, settings: MachineSettings) -> bool:
    """Whether PID 1's end asks for the container to start again.

    A reboot(2) in a pid namespace kills its PID 1 with SIGHUP; systemd-nspawn
    252 then starts the container again, unless it runs as a service
    (--keep-unit), where it exits 133 for the unit's RestartForceExitStatus=133
    to restart it. A booted init's exit status 133 asks for the same."""
    if not info.exited:
        return info.status == signal.SIGHUP and not settings.keep_unit
    return settings.boot and info.status == EXIT_REBOOT


def nspawn_exit_status(info: native.ExitInfo) -> int:
    """The container's exit status as systemd-nspawn 252 reports it for PID 1's end:
    its exit code; 0 for a poweroff or halt (SIGINT from reboot(2)); 133 for a reboot
    it does not carry out itself (SIGHUP, see _reboots); 1 for any other signal."""
    if info.exited:
        return info.status
    if info.status == signal.SIGINT:
        return 0
    return EXIT_REBOOT if info.status == signal.SIGHUP else 1


async def _child_started(child: Child, name: str) -> None:
    """Wait until the child execs; a step that failed becomes the start's error."""
    try:
        await child.started()
    except StepFailed as e:
        await wait_exit(child.pidfd)
        raise MachineStartFailed(f"starting machine {name} failed at {e}") from e


def _release(go_fd: int) -> None:
    """Let the child past its next wait step. A child that already failed a step is not
    waiting any more; its report says why, and _launch() reads it next."""
    try:
        os.write(go_fd, b"x")
    except BrokenPipeError:
        pass
