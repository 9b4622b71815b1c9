"""A start is on record before its payload runs: kill hosteld mid-start, fill its disk,
fail starts by the hundred, and find nothing left that no hosteld knows of."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import terminate_all_machines

MANAGER = ("/org/hostel1/machine", "org.hostel1.MachineManager")
CONCURRENT = 20
KILL_POINTS = 20
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                            negotiate_unix_fd=True).connect()


async def call(bus: MessageBus, member: str, signature: str = "", body: list | None = None,
               path: str = MANAGER[0], interface: str = MANAGER[1]) -> list:
    reply = await bus.call(Message(destination="org.hostel1", path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    if reply.message_type == MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
    return reply.body


# Machines started together on one tree share it read-only: a writable tree is locked to
# one machine, as systemd-nspawn locks it.
SHARED = {"ReadOnly": Variant("b", True)}


async def start(bus: MessageBus, name: str, tree: Path, command: list[str],
                **extra: Variant) -> str:
    settings = {"Directory": Variant("s", str(tree)), "Command": Variant("as", command), **extra}
    (path,) = await call(bus, "StartMachine", "sa{sv}", [name, settings])
    return path


async def listed(bus: MessageBus) -> dict[str, tuple[str, int]]:
    """name -> (state, leader) of every machine the daemon lists."""
    (machines,) = await call(bus, "ListMachines")
    result = {}
    for name, _klass, state, path in machines:
        try:
            (leader,) = await call(bus, "Get", "ss", ["org.hostel1.Machine", "Leader"], path=path,
                                   interface="org.freedesktop.DBus.Properties")
        except DBusError:
            continue  # gone between the list and the read
        result[name] = (state, leader.value)
    return result


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def scope_pids(prefix: str) -> set[int]:
    """Processes in any cgroup scope of a machine whose name starts with `prefix`."""
    pids: set[int] = set()
    for base in CGROUP_ROOTS:
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base):
            if f"machine-{prefix}" in root and "cgroup.procs" in files:
                try:
                    pids |= {int(p) for p in Path(root, "cgroup.procs").read_text().split()}
                except OSError:
                    pass
            if root.count("/") > 8:
                dirs.clear()
    return pids


def container_processes(tree: Path, prefix: str) -> set[int]:
    """Every live process on the host running in `tree` or in a scope named for our machines."""
    found = {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
             if _readlink(f"/proc/{pid}/root") == str(tree)}
    return {pid for pid in found | scope_pids(prefix) if _alive(pid)}


def orphans(tree: Path, prefix: str, machines: dict[str, tuple[str, int]]) -> set[int]:
    """Container processes that belong to no machine the daemon lists as running."""
    namespaces = {_readlink(f"/proc/{leader}/ns/pid") for state, leader in machines.values()
                  if state == "running" and leader}
    return {pid for pid in container_processes(tree, prefix)
            if _readlink(f"/proc/{pid}/ns/pid") not in namespaces}


def kill_leftovers(tree: Path, prefix: str) -> None:
    """What a failing run leaves (orphans no hosteld knows): SIGKILL it, so no test after
    this one inherits it."""
    for base in CGROUP_ROOTS:
        for kill in Path(base).glob(f"*/machine-{prefix}*.scope/cgroup.kill"):
            kill.write_text("1")
    for pid in container_processes(tree, prefix):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Daemon:
    bus: PrivateBus
    runtime: Path
    state: Path
    log: Path

    def start(self) -> DaemonProcess:
        daemon = DaemonProcess(self.bus.address, self.runtime, self.state, bus=self.bus)
        daemon.log_path = self.log
        return daemon.start()


@pytest.fixture
def daemon_dirs(private_bus: PrivateBus, tmp_path: Path) -> Iterator[Daemon]:
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    runtime.chmod(0o755)
    try:
        yield Daemon(private_bus, runtime, tmp_path / "state", tmp_path / "hosteld.log")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


async def _kill_round(dirs: Daemon, tree: Path, prefix: str, delay: float) -> tuple[int, int]:
    """Start CONCURRENT machines, SIGKILL hosteld after `delay`, restart it, and check.

    Returns (adopted, not adopted) for the round."""
    first = dirs.start()
    bus = await connect(first.address)
    names = [f"{prefix}{i}" for i in range(CONCURRENT)]
    starts = [asyncio.ensure_future(start(bus, name, tree, ["/bin/sleep", "3000"], **SHARED))
              for name in names]
    await asyncio.sleep(delay)
    first.stop(signal.SIGKILL)
    await asyncio.gather(*starts, return_exceptions=True)
    bus.disconnect()
    time.sleep(0.3)  # children that were cut off mid-setup see their pipe close and die

    second = dirs.start()
    bus = await connect(second.address)
    try:
        machines = await listed(bus)
        left = orphans(tree, prefix, machines)
        assert not left, (f"delay {delay:.2f}: processes {sorted(left)} run in {tree} but "
                          f"no listed machine holds them (listed: {machines})")
        for name, (state, leader) in machines.items():
            assert state == "running" and _alive(leader), (name, state, leader)
        # No name is blocked: every one not adopted starts again at once.
        free = [name for name in names if name not in machines]
        results = await asyncio.gather(*(start(bus, name, tree, ["/bin/true"], **SHARED)
                                         for name in free),
                                       return_exceptions=True)
        failed = [name for name, r in zip(free, results) if isinstance(r, Exception)]
        blocked = {}
        for name in failed:  # once more, alone: a start may fail for its own passing reason
            try:
                await start(bus, name, tree, ["/bin/true"], **SHARED)
            except DBusError as e:
                blocked[name] = f"{e.type}: {e.text}"
        assert not blocked, f"delay {delay:.2f}: names blocked after the restart: {blocked}"
        for name in machines:
            await call(bus, "KillMachine", "ssi", [name, "all", signal.SIGKILL])
        await wait_until(lambda: _none_left(bus, tree, prefix))
        return len(machines), len(free)
    finally:
        bus.disconnect()
        terminate_all_machines(second)
        second.stop()


async def _none_left(bus: MessageBus, tree: Path, prefix: str) -> bool:
    return not await listed(bus) and not container_processes(tree, prefix)


async def test_sigkill_at_20_points_of_concurrent_starts_leaves_no_orphan(
        daemon_dirs: Daemon, tree: Path) -> None:
    """20 concurrent starts, hosteld SIGKILLed at a different instant in each round.

    Every container process is afterwards either a machine the restarted
    hosteld lists (adopted) or gone; every name not adopted starts again."""
    probe = daemon_dirs.start()
    bus = await connect(probe.address)
    began = time.monotonic()
    await asyncio.gather(*(start(bus, f"fault-calib{i}", tree, ["/bin/true"], **SHARED)
                           for i in range(CONCURRENT)))
    span = time.monotonic() - began  # how long 20 concurrent starts take here
    bus.disconnect()
    terminate_all_machines(probe)
    probe.stop()

    totals = [0, 0]
    try:
        for point in range(KILL_POINTS):
            delay = span * 1.2 * point / (KILL_POINTS - 1)
            adopted, not_adopted = await _kill_round(daemon_dirs, tree, f"fk{point}x", delay)
            totals[0] += adopted
            totals[1] += not_adopted
    finally:
        kill_leftovers(tree, "fk")
    # The kill points fell inside the starts: some were adopted, some cut short.
    assert totals[0] > 0 and totals[1] > 0, (totals, span)
    assert "was still starting when hosteld stopped" in daemon_dirs.log.read_text()


@pytest.fixture
def tiny_runtime(private_bus: PrivateBus, tmp_path: Path) -> Iterator[Daemon]:
    """A runtime directory on a 256 KiB tmpfs, to fill up."""
    runtime = Path(tempfile.mkdtemp(prefix="hostel-tiny-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(runtime)],
                   check=True)
    try:
        yield Daemon(private_bus, runtime, tmp_path / "state", tmp_path / "hosteld.log")
    finally:
        subprocess.run(["umount", "-l", str(runtime)], check=False)
        shutil.rmtree(runtime, ignore_errors=True)


def _fill(directory: Path) -> Path:
    """Take every free block of the filesystem holding `directory`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def test_enospc_recording_state_fails_the_start_before_the_payload_runs(
        tiny_runtime: Daemon, tree: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    daemon = tiny_runtime.start()
    bus = await connect(daemon.address)
    try:
        (tiny_runtime.runtime / "machines").mkdir(exist_ok=True)
        filler = _fill(tiny_runtime.runtime)
        with pytest.raises(DBusError) as failure:
            await start(bus, "fault-full", tree, ["/bin/sh", "-c", "touch /shared/ran; sleep 3000"],
                        Bind=Variant("as", [f"{shared}:/shared"]))
        assert failure.value.type == "org.hostel1.Error.StartFailed", failure.value
        assert "No space left on device" in failure.value.text
        assert "machines/fault-full.json" in failure.value.text
        time.sleep(0.5)
        assert not (shared / "ran").exists(), "the payload ran with no record of it"
        assert await listed(bus) == {}
        assert not container_processes(tree, "fault-full")
        assert not scope_pids("fault-full")
        assert not list((tiny_runtime.runtime / "machines").glob("*.json*"))

        # Space again: the same name starts, and its record is there.
        filler.unlink()
        await start(bus, "fault-full", tree, ["/bin/sh", "-c", "touch /shared/ran; sleep 3000"],
                    Bind=Variant("as", [f"{shared}:/shared"]))
        assert (tiny_runtime.runtime / "machines" / "fault-full.json").exists()
        assert daemon.proc.poll() is None
    finally:
        bus.disconnect()
        terminate_all_machines(daemon)
        daemon.stop()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        zombies += [int(c) for c in children if not _alive(int(c))]
    return zombies


POOL_BOUND = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default max_workers
FAILED_STARTS = {
    # kind: (settings beyond Directory, command); each fails at a different stage
    "bad root": ({"Directory": Variant("s", "/nonexistent/root")}, ["/bin/true"]),
    "missing binary": ({}, ["no-such-program"]),              # PATH search in the child
    "failing mount step": ({"Bind": Variant("as", ["/nonexistent/src:/mnt"])}, ["/bin/true"]),
    "bad user": ({"User": Variant("s", "nosuchuser")}, ["/bin/true"]),
    "failing chdir": ({"WorkingDirectory": Variant("s", "/no/such/dir")}, ["/bin/true"]),
}


async def test_failed_starts_leak_no_fd_thread_or_zombie(hosteld: DaemonProcess,
                                                         tree: Path) -> None:
    """100 failed starts of each kind leave hosteld's descriptors, threads and
    children exactly as one failure of each kind did."""
    bus = await connect(hosteld.address)
    pid = hosteld.proc.pid

    async def fail_once(kind: str) -> None:
        extra, command = FAILED_STARTS[kind]
        with pytest.raises(DBusError) as failure:
            await start(bus, "fault-leak", tree, command, **extra)
        assert failure.value.type != "org.hostel1.Error.Internal", (kind, failure.value.text)

    try:
        for kind in FAILED_STARTS:  # warm up: caches, the thread pool, the cgroup layout
            for _ in range(3):
                await fail_once(kind)
        fds, threads = _fds(pid), _threads(pid)
        for kind in FAILED_STARTS:
            for _ in range(100):
                await fail_once(kind)
            await asyncio.sleep(0.2)
            assert _fds(pid) <= fds, (f"{kind}: {_fds(pid) - fds} descriptors leaked over 100 "
                                      f"failed starts: {sorted(os.listdir(f'/proc/{pid}/fd'))}")
            # asyncio's default pool may still grow to its bound; a leak would pass it by far.
            assert _threads(pid) <= threads + POOL_BOUND, \
                f"{kind}: threads {threads} -> {_threads(pid)}"
            assert not _zombie_children(pid), f"{kind}: unreaped children"
        assert await listed(bus) == {}
        # Still serving: a good start works.
        await start(bus, "fault-fine", tree, ["/bin/true"])
    finally:
        bus.disconnect()
