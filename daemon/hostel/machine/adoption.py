"""Taking back the machines an earlier hosteld left running.

A restarted hosteld reads the state files (statefile.StateStore), rebuilds
each machine's registry entry and host-side handle from them, and watches
the leaders that still live through a pidfd. Those are not its children:
the pidfd says when they end, and pidfs how (foreign_exit.py; the status
stays unknown on kernels before 6.15), so a reboot can be told from a poweroff."""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from hostel import native
from hostel.bus import HostelError, InvalidArgs
from hostel.machine import cgroups, foreign_exit, treelock
from hostel.machine import network as machine_network
from hostel.machine.registry import Machine, State
from hostel.machine.runtime import Runtime
from hostel.machine.settings import MachineSettings, from_dbus
from hostel.machine.statefile import (SavedMachine, SavedState, process_start_time,
                                      settings_from_json)
from hostel.spawn import Child, Plan, wait_readable

if TYPE_CHECKING:
    from hostel.machine.runner import MachineRunner

log = logging.getLogger(__name__)

EXITED_GRACE = 300.0   # how long a machine found dead at adoption stays listed as "exited"
STATUS_UNKNOWN = -1    # the exit status of a process that was not our child
REAPED_WITHIN = 5.0    # seconds its reaper (init) may take to reap it, for its status
IMAGE_RUN_KEY = "Isolation"   # in the Settings of a guest run from an image (images_service)


async def adopt(runner: MachineRunner) -> None:
    """Take back the machines an earlier hosteld left running (or note that they ended)."""
    for saved in runner.store.load():
        machine = _saved_machine(saved)
        runtime = _adopted_runtime(saved, runner.machines_dir)
        machine.runtime = runtime
        if saved.state != SavedState.RUNNING.value:
            await _abandon(runner, machine, runtime)
            continue
        runner.registry.reserve(machine)
        if runtime.child is not None:
            log.info("adopted machine %s (leader %d)", machine.name, machine.leader)
            if runtime.network_setup is not None:  # before its end can tear the network down
                await asyncio.to_thread(machine_network.resume_forwarding, runtime.network_setup)
            watch_foreign(runner, machine, runtime)
        else:
            log.info("machine %s exited while hosteld was down", machine.name)
            await runner.cleanup(machine, runtime)
            runner.registry.update(machine, state=State.EXITED, exit_status=STATUS_UNKNOWN)
            asyncio.get_running_loop().call_later(EXITED_GRACE, runner.registry.remove, machine)


async def _abandon(runner: MachineRunner, machine: Machine, runtime: Runtime) -> None:
    """A start cut short by hosteld's end: its client got no answer, so nothing of it stays.

    Whatever was born in its scope (or is its recorded leader) is killed, what
    it held is released, and its record goes; its name is free again."""
    log.warning("machine %s was still starting when hosteld stopped: killing what it "
                "started and releasing its resources", machine.name)
    if runtime.child is not None:
        try:
            native.pidfd_send_signal(runtime.child.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended on its own (its parent's pipe closed)
    if runtime.cgroup is not None:
        try:
            await asyncio.to_thread(runtime.cgroup.kill, signal.SIGKILL)
        except (HostelError, OSError) as e:  # cleanup() below kills what is left, or says why
            log.error("killing the scope of machine %s: %s", machine.name, e)
    await runner.cleanup(machine, runtime)
    if runtime.child is not None:
        runtime.child.close()
    runner.store.delete(machine.name)


def watch_foreign(runner: MachineRunner, machine: Machine, runtime: Runtime) -> None:
    """Watch a leader that is not our child (adopted, or registered by RegisterMachine)."""
    runtime.watcher = asyncio.get_running_loop().create_task(
        _watch_adopted(runner, machine, runtime))


def _saved_machine(saved: SavedMachine) -> Machine:
    return Machine(saved.name, id=bytes.fromhex(saved.id), klass=saved.klass,
                   service=saved.service, unit=saved.unit, leader=saved.leader,
                   root_directory=saved.root_directory, state=State.RUNNING,
                   timestamp_us=saved.timestamp_us,
                   timestamp_monotonic_us=saved.timestamp_monotonic_us,
                   network_interfaces=saved.network_interfaces,
                   settings=settings_from_json(saved.settings),
                   registered_only=saved.registered_only)


def _adopted_runtime(saved: SavedMachine, machines_dir: Path) -> Runtime:
    runtime = Runtime(_saved_settings(saved, machines_dir), adopted=True,
                      runtime_dir=Path(saved.runtime_dir) if saved.runtime_dir else None)
    if saved.cgroup:
        runtime.cgroup = cgroups.CgroupSet(**{**saved.cgroup,
                                              "paths": tuple(saved.cgroup["paths"])})
        runtime.cleanup.callback(runtime.cgroup.remove)
    if saved.network:
        runtime.network_setup = machine_network.NetworkSetup.restore(saved.network)
        runtime.cleanup.callback(machine_network.teardown_network, runtime.network_setup)
    if runtime.runtime_dir is not None:
        runtime.cleanup.callback(remove_tree, runtime.runtime_dir)
    if saved.leader_start is not None and process_start_time(saved.leader) == saved.leader_start:
        try:
            runtime.child = Child(saved.leader, native.pidfd_open(saved.leader), Plan(), -1)
        except ProcessLookupError:
            pass  # it ended just now
    if runtime.child is not None:
        _relock(saved.name, runtime)
    return runtime


def _relock(name: str, runtime: Runtime) -> None:
    """Its tree's lock went with the hosteld that took it: take it again (treelock)."""
    try:
        treelock.lock_root(runtime.settings, runtime.cleanup)
    except (HostelError, OSError) as e:  # someone took the tree meanwhile: say so, adopt anyway
        log.warning("machine %s: cannot lock its tree again: %s", name, e)


def _saved_settings(saved: SavedMachine, machines_dir: Path) -> MachineSettings:
    if IMAGE_RUN_KEY in saved.settings:
        # StartGuest's image run: its Settings are the guest's (Image is an image's name,
        # not a path), never StartMachine's; the defaults are what it ran with (its root,
        # network and loop device go with its namespaces, its host veth is in saved.network)
        return MachineSettings(saved.name)
    try:
        return from_dbus(saved.name, settings_from_json(saved.settings), machines_dir)
    except InvalidArgs as e:
        log.warning("machine %s: saved settings no longer valid (%s); keeping defaults",
                    saved.name, e)
        return MachineSettings(saved.name)


async def _watch_adopted(runner: MachineRunner, machine: Machine, runtime: Runtime) -> None:
    """Not our child: the pidfd tells us when it ends, and pidfs how, once its reaper
    has reaped it (foreign_exit); an older kernel leaves the status unknown."""
    from hostel.machine.runner import nspawn_exit_status

    assert runtime.child is not None
    await wait_readable(runtime.child.pidfd)
    info = await foreign_exit.wait_reaped(runtime.child.pidfd, runtime.child.pid,
                                          REAPED_WITHIN)
    runtime.child.close()
    if info is None:
        await runner.finish(machine, runtime, STATUS_UNKNOWN,
                            "exited (status unknown: it was started by an earlier hosteld)")
        return
    await runner.finish(machine, runtime, nspawn_exit_status(info),
                        f"{info.describe()} (it was started by an earlier hosteld)",
                        exit_signal=0 if info.exited else info.status)


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
