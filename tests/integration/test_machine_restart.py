"""Machines outlive hosteld: kill -9 the daemon, start it again, and take them back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, busctl, hostelctl

COUNT = 5


def machines(daemon: DaemonProcess) -> dict[str, dict]:
    out = busctl(daemon.bus, "--json=short", "call", "org.hostel1", "/org/hostel1/machine",
                 "org.hostel1.MachineManager", "ListMachines").stdout
    result = {}
    for name, _cls, state, path in json.loads(out)["data"][0]:
        got = busctl(daemon.bus, "--json=short", "call", "org.hostel1", path,
                     "org.freedesktop.DBus.Properties", "GetAll", "s", "org.hostel1.Machine",
                     check=False)
        if got.returncode != 0:
            continue  # gone between the list and the read (e.g. a start that failed)
        props = json.loads(got.stdout)["data"][0]
        result[name] = {key: value["data"] for key, value in props.items()}
    return result


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def test_sigkill_restart_adopts_every_machine(private_bus: PrivateBus, tree: Path,
                                              tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    first = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus).start()
    second = None
    clients = []
    try:
        for i in range(COUNT):
            extra = ["--network-veth"] if i == 0 else []
            root = tmp_path / f"tree{i}"  # each its own: a running tree is locked, as in nspawn
            subprocess.run(["cp", "-a", str(tree), str(root)], check=True)
            clients.append(subprocess.Popen(
                [HOSTELCTL, "run", "-q", "-D", str(root), "-M", f"keep{i}", "--as-pid2", *extra,
                 "/bin/sh", "-c", "sleep 300"],
                env=first.environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"client{i}.err", "w")))
        try:
            wait_for(lambda: sum(m["State"] == "running" for m in machines(first).values())
                     == COUNT)
        except TimeoutError:
            errors = {p.name: p.read_text() for p in tmp_path.glob("client*.err")}
            raise AssertionError(f"not all started: {errors}\n{first.log()}") from None
        before = machines(first)
        first.stop(signal.SIGKILL)
        for client in clients:
            client.kill()  # they were waiting on the daemon that died
        # One machine ends while no hosteld is running.
        os.kill(before["keep4"]["Leader"], signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{before['keep4']['Leader']}/stat")
                 or "Z" in open(f"/proc/{before['keep4']['Leader']}/stat").read().split()[2])

        second = DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                               bus=private_bus).start()
        after = machines(second)
        assert set(after) == set(before)
        for name in ("keep0", "keep1", "keep2", "keep3"):
            for key in ("Leader", "Id", "RootDirectory", "Unit", "Settings", "Timestamp",
                        "NetworkInterfaces"):
                assert after[name][key] == before[name][key], (name, key)
            assert after[name]["State"] == "running"
        assert after["keep4"]["State"] == "exited"
        assert "keep0" in hostelctl(second.address, "list").stdout

        # The adopted machines can be terminated, and their end is observed.
        for name in ("keep0", "keep1", "keep2", "keep3"):
            assert hostelctl(second.address, "terminate", name).returncode == 0
        assert hostelctl(second.address, "terminate", "keep4").returncode == 0
        wait_for(lambda: machines(second) == {})
        assert not any(Path(runtime, "machines").glob("*.json"))
        assert "ve-keep0" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                text=True).stdout
        scopes = subprocess.run(["find", "/sys/fs/cgroup", "-name", "machine-keep*.scope"],
                                capture_output=True, text=True).stdout
        assert scopes == ""
        for name in before:
            assert not os.path.exists(f"/proc/{before[name]['Leader']}/cmdline") or \
                "Z" in open(f"/proc/{before[name]['Leader']}/stat").read().split()[2]
    finally:
        for daemon in (second, first):
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                for name in machines(daemon):
                    hostelctl(daemon.address, "kill", name, "--signal=KILL")
                daemon.stop()
        for client in clients:
            client.kill()
            client.wait()


def _payload_of(leader: int) -> int | None:
    """The stub init's one child (the payload), or None when it has none."""
    try:
        children = Path(f"/proc/{leader}/task/{leader}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text() \
            .rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_as_pid2_machines_survive_hosteld_stop_and_crash(private_bus: PrivateBus, tree: Path,
                                                         tmp_path: Path) -> None:
    """With no caller descriptors the console is a pty hosteld holds; its hangup when
    hosteld goes must not reach the payload through the stub init (PID 1 ignores it)."""
    runtime = tmp_path / "run"
    daemons: list[DaemonProcess] = []
    before: dict[str, dict] = {}

    def start_daemon() -> DaemonProcess:
        daemons.append(DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                                     bus=private_bus).start())
        return daemons[-1]

    try:
        daemon = start_daemon()
        for name, pid2 in (("pid2-stub", "true"), ("pid2-plain", "false")):
            busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
                   "org.hostel1.MachineManager", "StartMachine", "sa{sv}", name, "4",
                   "Directory", "s", str(tree), "Command", "as", "2", "/bin/sleep", "3000",
                   "AsPid2", "b", pid2,
                   "ReadOnly", "b", "true")  # both on one tree: a shared lock, as in nspawn
        before.update(machines(daemon))
        payload = _payload_of(before["pid2-stub"]["Leader"])
        assert _alive(payload), "the stub init has no payload child"
        for how in (signal.SIGTERM, signal.SIGKILL):
            daemon.stop(how)
            time.sleep(0.5)
            assert _alive(before["pid2-plain"]["Leader"]), f"the plain container died on {how!r}"
            assert _alive(payload), f"the --as-pid2 payload died when hosteld got {how!r}"
            assert _alive(before["pid2-stub"]["Leader"]), f"the stub init died on {how!r}"
            daemon = start_daemon()
            after = machines(daemon)
            assert {name: m["State"] for name, m in after.items()} == \
                {"pid2-stub": "running", "pid2-plain": "running"}, how
    finally:
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                for name in machines(daemon):
                    hostelctl(daemon.address, "kill", name, "--signal=KILL")
                wait_for(lambda: machines(daemon) == {})
                daemon.stop()
        for machine in before.values():  # a failure above may have left no daemon to ask
            try:
                os.kill(machine["Leader"], signal.SIGKILL)
            except ProcessLookupError:
                pass
