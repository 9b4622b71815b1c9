"""Container start-to-exit, side by side: hosteld (D-Bus client and hostelctl run),
systemd-nspawn, crun, runc, and unshare+chroot as the floor; 200 concurrent starts;
hosteld's memory: idle, per machine, and after many start/exit cycles.

Every peer runs `/bin/true` in the same busybox tree. crun refuses this host's
hybrid cgroup layout, so it (and runc, for equal footing) runs in a private
mount namespace with cgroup2 on /sys/fs/cgroup and --cgroup-manager=disabled,
as DESIGN.md describes; that crun does no cgroup work at all. A second crun row
does (cgroupfs on the host's v1 hierarchies, the unified tree unmounted), to
compare with hosteld's own scope."""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from hostel.privatebus import PrivateBus, start_daemon

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUNS = int(os.environ.get("HOSTEL_BENCH_RUNS", "100"))  # fewer on a loaded machine
CONCURRENT = 200
CONNECTIONS = 8  # the system bus allows a connection 128 pending calls
RSS_MACHINES = 50
RSS_CYCLES = int(os.environ.get("HOSTEL_BENCH_CYCLES", "1000"))
# "network": only the interleaved hostelctl run / systemd-nspawn ratios (issue 16), a few
# minutes instead of the whole benchmark, for measuring a change to the start-up path.
ONLY = os.environ.get("HOSTEL_BENCH_ONLY", "")

OCI_WRAPPER = """#!/bin/sh
exec unshare -m sh -c 'mount -t cgroup2 none /sys/fs/cgroup && mount -t tmpfs tmpfs /run && exec "$@"' sh "$@"
"""
# The same host hierarchies minus the unified tree crun refuses: crun then makes
# and joins a cgroup in every v1 hierarchy, the work hosteld does for a scope.
OCI_V1_WRAPPER = """#!/bin/sh
exec unshare -m sh -c 'umount /sys/fs/cgroup/unified && mount -t tmpfs tmpfs /run && exec "$@"' sh "$@"
"""
NSPAWN_WRAPPER = """#!/bin/sh
exec unshare -m sh -c 'mount -t tmpfs tmpfs /run && exec "$@"' sh "$@"
"""


def _script(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def oci_bundle(work: Path, tree: Path) -> Path:
    bundle = work / "bundle"
    bundle.mkdir()
    subprocess.run(["cp", "-a", str(tree), str(bundle / "rootfs")], check=True)
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(args=["/bin/true"], terminal=False)
    config["linux"].pop("resources", None)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


# The network set-ups compared side by side: none (the host's), loopback only, a veth pair.
NETWORKS = {"none": "", "--private-network": " --private-network",
            "--network-veth": " --network-veth"}


def network_pairs(tree: Path, nspawn: str) -> dict[str, str]:
    """`hostelctl run` and systemd-nspawn with each of NETWORKS, named by their flags; a
    fixed machine name, so that the veth's host side is ve-bench in both."""
    pairs = {}
    for flags in NETWORKS.values():
        pairs[f"hostelctl run{flags}"] = (f"{VENV_BIN}/hostelctl run -q -D {tree} -M bench"
                                          f"{flags} /bin/true")
        pairs[f"systemd-nspawn{flags}"] = (f"{nspawn} systemd-nspawn --register=no --keep-unit "
                                           f"-q -D {tree} -M bench{flags} /bin/true")
    return pairs


def interleaved_medians(commands: dict[str, str], env: dict[str, str],
                        runs: int) -> dict[str, float]:
    """Median start-to-exit in ms of each command, run in turn (the order rotating each
    round) rather than one command's runs after another's as hyperfine does: on a shared,
    loaded machine a load change then hits every command alike, so their ratios hold."""
    argvs = {name: shlex.split(cmd) for name, cmd in commands.items()}
    names = list(argvs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(runs + 3):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            subprocess.run(argvs[name], env=env, check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL)
            if round_ >= 3:  # warm-up, as for hyperfine
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def network_ratio_rows(tree: Path, nspawn: str, env: dict[str, str]) -> list[dict[str, object]]:
    """Issue 16's ratios: hostelctl run / systemd-nspawn per network set-up, interleaved."""
    medians = interleaved_medians(network_pairs(tree, nspawn), env, RUNS)
    rows: list[dict[str, object]] = []
    for label, flags in NETWORKS.items():
        ours, theirs = medians[f"hostelctl run{flags}"], medians[f"systemd-nspawn{flags}"]
        rows.append({"benchmark": "hostelctl run / systemd-nspawn, interleaved",
                     "target": label, "hostel_median_ms": round(ours, 1),
                     "nspawn_median_ms": round(theirs, 1), "ratio": round(ours / theirs, 2)})
    return rows


def hyperfine(commands: dict[str, str], env: dict[str, str]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = ["hyperfine", "-N", "--warmup", "3", "--runs", str(RUNS), "--export-json", out.name]
        for name, cmd in commands.items():
            args += ["-n", name, cmd]
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
        return {r["command"]: r["mean"] * 1000 for r in json.load(open(out.name))["results"]}


def dbus_client_mean_ms(address: str, tree: Path, keep_unit: bool = False) -> float:
    """A long-lived D-Bus client: StartMachine, then wait for State=exited.

    keep_unit: no cgroup of its own, like crun --cgroup-manager=disabled here."""
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    from hostel.client import Client, MatchRule

    settings = {"Directory": ("s", str(tree)), "Command": ("as", ["/bin/true"]),
                "Quiet": ("b", True), "KeepUnit": ("b", keep_unit)}
    fields = dict(type="signal", interface="org.freedesktop.DBus.Properties",
                  member="PropertiesChanged", path_namespace="/org/hostel1/machine")
    with Client() as client:
        client.add_match(MatchRule(sender="org.hostel1", **fields))
        with client.filter(MatchRule(**fields)) as queue:
            times = []
            for i in range(RUNS + 3):
                start = time.perf_counter()
                client.call("/org/hostel1/machine", "org.hostel1.MachineManager", "StartMachine",
                            "sa{sv}", "bench", settings)
                while not _exited(queue):
                    client.receive_into(queue)
                if i >= 3:  # warm-up, as for hyperfine
                    times.append(time.perf_counter() - start)
    return sum(times) / len(times) * 1000


def _exited(queue: deque) -> bool:
    while queue:
        _iface, changed, _inv = queue.popleft().body
        if changed.get("State", ("s", ""))[1] == "exited":
            return True
    return False


async def concurrent_starts(address: str, tree: Path) -> tuple[int, float]:
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    from hostel.bus import make_patient

    buses = [make_patient(await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect())
             for _ in range(CONNECTIONS)]
    # Read-only: many machines on one tree take its lock shared, as nspawn 252's would.
    settings = {"Directory": Variant("s", str(tree)), "Command": Variant("as", ["/bin/true"]),
                "ReadOnly": Variant("b", True)}

    async def one(i: int) -> bool:
        reply = await buses[i % CONNECTIONS].call(Message(destination="org.hostel1", path="/org/hostel1/machine",
                                       interface="org.hostel1.MachineManager",
                                       member="StartMachine", signature="sa{sv}",
                                       body=[f"c{i}", settings]))
        return reply.message_type == MessageType.METHOD_RETURN

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
    elapsed = time.perf_counter() - start
    for bus in buses:
        bus.disconnect()
    return sum(results), elapsed


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def memory_rows(address: str, tree: Path, daemon_pid: int) -> list[dict[str, object]]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    ctl = str(VENV_BIN / "hostelctl")
    idle = rss_kib(daemon_pid)
    procs = [subprocess.Popen([ctl, "run", "-q", "-D", str(tree), "-M", f"m{i}", "--as-pid2",
                               "--read-only", "sleep", "600"], env=env, stdin=subprocess.DEVNULL)
             for i in range(RSS_MACHINES)]
    try:  # machines outlive hosteld: kill them whatever happens
        _wait_listed(ctl, env, RSS_MACHINES)
        loaded = rss_kib(daemon_pid)
    finally:
        for i in range(RSS_MACHINES):
            subprocess.run([ctl, "kill", f"m{i}", "--signal=KILL"], env=env, check=False,
                           capture_output=True)
        for proc in procs:
            proc.wait()
    after_warmup = rss_kib(daemon_pid)
    for _ in range(RSS_CYCLES):
        subprocess.run([ctl, "run", "-q", "-D", str(tree), "/bin/true"], env=env, check=True,
                       stdin=subprocess.DEVNULL)
    after_cycles = rss_kib(daemon_pid)
    return [
        {"benchmark": "hosteld memory", "target": "idle RSS", "kib": idle},
        {"benchmark": "hosteld memory", "target": f"per machine ({RSS_MACHINES} running)",
         "kib": round((loaded - idle) / RSS_MACHINES, 1)},
        {"benchmark": "hosteld memory", "target": f"growth over {RSS_CYCLES} start/exit cycles",
         "kib": after_cycles - after_warmup},
    ]


def _wait_listed(ctl: str, env: dict[str, str], count: int) -> None:
    for _ in range(600):
        out = subprocess.run([ctl, "list"], env=env, capture_output=True, text=True).stdout
        if out.count(" running") >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{count} machines did not start")


def run() -> list[dict[str, object]]:
    for tool in ("hyperfine", "crun", "runc", "systemd-nspawn", "unshare"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run 'make setup'")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="hostel-bench-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        subprocess.run([str(REPO / "scripts/make-busybox-tree"), str(tree)], check=True)
        bundle = oci_bundle(work, tree)
        oci = _script(work, "oci-run", OCI_WRAPPER)
        oci_v1 = _script(work, "oci-v1-run", OCI_V1_WRAPPER)
        nspawn = _script(work, "nspawn-run", NSPAWN_WRAPPER)
        bus = PrivateBus(work / "bus").start()
        daemon = start_daemon(bus, work)
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
        try:
            if ONLY == "network":
                return network_ratio_rows(tree, nspawn, env)
            client_ms = dbus_client_mean_ms(bus.address, tree)
            no_cgroup_ms = dbus_client_mean_ms(bus.address, tree, keep_unit=True)
            peers = {}
            if os.path.ismount("/sys/fs/cgroup/unified"):  # hybrid: the v1 row is possible
                peers["crun run, cgroupfs v1"] = (f"{oci_v1} crun --cgroup-manager=cgroupfs run "
                                                  f"-b {bundle} bench")
            means = hyperfine({
                **network_pairs(tree, nspawn),
                "crun run": f"{oci} crun --cgroup-manager=disabled run -b {bundle} bench",
                "runc run": f"{oci} runc run -b {bundle} bench",
                "unshare+chroot (floor)": f"unshare -fpmiun --mount-proc chroot {tree} /bin/true",
                **peers,
            }, env)
            means = {"hosteld D-Bus client": client_ms,
                     "hosteld D-Bus client, --keep-unit (no cgroup, as crun here)": no_cgroup_ms,
                     **means}
            for name, ms in means.items():
                rows.append({"benchmark": "start-to-exit /bin/true", "target": name,
                             "mean_ms": round(ms, 1),
                             "vs crun": round(ms / means["crun run"], 2),
                             "vs nspawn": round(ms / means["systemd-nspawn"], 2)})
            rows += network_ratio_rows(tree, nspawn, env)
            ok, elapsed = asyncio.run(concurrent_starts(bus.address, tree))
            _wait_gone(env)
            rows.append({"benchmark": f"{CONCURRENT} concurrent StartMachine", "target": "hosteld",
                         "succeeded": ok, "containers_per_s": round(CONCURRENT / elapsed, 1)})
            rows += memory_rows(bus.address, tree, daemon.proc.pid)
        finally:
            daemon.stop()
            bus.stop()
    return rows


def _wait_gone(env: dict[str, str]) -> None:
    for _ in range(600):
        out = subprocess.run([str(VENV_BIN / "hostelctl"), "list"], env=env,
                             capture_output=True, text=True).stdout
        if out.strip() == "0 machines listed.":
            return
        time.sleep(0.1)


if __name__ == "__main__":
    for row in run():
        print(row)
