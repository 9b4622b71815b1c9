"""Fixtures: a private dbus-daemon with the project's policy, and a real hosteld on it."""
from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

# @pytest.mark.lab: tests run in the lab VM where this host lacks KVM or device-mapper
pytest_plugins = ["lab.plugin"]

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
HOSTELCTL = shutil.which("hostelctl", path=str(Path(sys.executable).parent)) or "hostelctl"


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        pytest.exit("hostel's tests need root: they create namespaces, mounts and devices", 2)


_client_envs: list[Path] = []


def unprivileged_python() -> str:
    """A Python that uid 65534 can run and that imports hostel and jeepney.

    The checkout, and so its venv, may sit where only root can enter (/root is
    0700), which an installed hostel never does.  Unprivileged clients therefore
    run from a world-readable venv holding copies of the two packages they use,
    made once per session and removed at its end."""
    if _client_envs:
        return str(_client_envs[0] / "bin/python")
    import jeepney

    import hostel
    env = Path(tempfile.mkdtemp(prefix="hostel-clients-"))
    _client_envs.append(env)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = env / f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    for package in (hostel, jeepney):
        source = Path(package.__file__).parent
        shutil.copytree(source, site / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(env)], check=True)
    return str(env / "bin/python")


def pytest_unconfigure(config: pytest.Config) -> None:
    for env in _client_envs:
        shutil.rmtree(env, ignore_errors=True)


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    bus = PrivateBus(tmp_path / "bus").start()
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def open_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A bus whose policy lets anyone call anything: only hosteld's own checks remain."""
    bus = PrivateBus(tmp_path / "openbus", open_policy=True).start()
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def hosteld(private_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    # A world-searchable runtime directory, as /run/hostel is: containers with
    # --private-users run as an unprivileged host uid that must reach it.
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    runtime.chmod(0o755)
    daemon = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus)
    daemon.log_path = tmp_path / "hosteld.log"
    try:
        daemon.start()
        yield daemon
    finally:
        terminate_all_machines(daemon)  # they would outlive hosteld, as they should
        status = daemon.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        assert status == 0, f"hosteld exited with {status} on SIGTERM:\n{daemon.log()}"


def terminate_all_machines(daemon: DaemonProcess) -> None:
    """Machines and guests outlive hosteld by design; a test must not leave any behind."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    guests = hostelctl(daemon.address, "guest", "list").stdout.splitlines()
    for line in guests[1:]:
        if line.strip() and "guests listed" not in line:
            hostelctl(daemon.address, "guest", "terminate", line.split()[0])
    listing = hostelctl(daemon.address, "list", "--no-legend").stdout.splitlines()
    for name in [line.split()[0] for line in listing if line.strip()]:
        hostelctl(daemon.address, "kill", name, "--signal=KILL")
    for _ in range(100):
        listed = hostelctl(daemon.address, "list", "--no-legend")
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        time.sleep(0.1)


@contextlib.contextmanager
def hosteld_with_env(bus: PrivateBus, tmp_path: Path,
                     env: dict[str, str]) -> Iterator[DaemonProcess]:
    """A hosteld with `env` added to its environment, for a fixture's `with`.
    Its runtime directory is world-searchable, as /run/hostel is: -U containers run as an
    unprivileged host uid. A test that stopped it gets it started again, to clean up."""
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    runtime.chmod(0o755)
    daemon = DaemonProcess(bus.address, runtime, tmp_path / "state", bus=bus, extra_env=env)
    daemon.log_path = tmp_path / "hosteld.log"
    try:
        daemon.start()
        yield daemon
    finally:
        if daemon.proc is None:
            daemon.start()
        terminate_all_machines(daemon)
        status = daemon.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        assert status == 0, daemon.log()


def serve_with_pool(bus: PrivateBus, pool_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A hosteld whose machine pool is pool_dir (HOSTEL_MACHINE_POOL)."""
    with hosteld_with_env(bus, tmp_path, {"HOSTEL_MACHINE_POOL": str(pool_dir)}) as daemon:
        yield daemon


@pytest.fixture
def trusted_dir(tmp_path: Path) -> Path:
    """The trusted .nspawn directory of `trusted_hosteld` (252's /etc/systemd/nspawn)."""
    path = tmp_path / "etc-nspawn"
    path.mkdir()
    return path


@pytest.fixture
def trusted_hosteld(private_bus: PrivateBus, tmp_path: Path,
                    trusted_dir: Path) -> Iterator[DaemonProcess]:
    """A hosteld whose only trusted .nspawn directory is `trusted_dir`."""
    from hostel.machine.nspawn_settings import TRUSTED_DIRS_ENV
    with hosteld_with_env(private_bus, tmp_path, {TRUSTED_DIRS_ENV: str(trusted_dir)}) as daemon:
        yield daemon


def read_pty(argv: list[str], env: dict[str, str], timeout: float = 60,
             until: bytes | None = None) -> bytes:
    """What argv writes on a fresh pty of its own, until it exits (or writes `until`);
    past `timeout` it is killed."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not (until and until in output):
            readable, _, _ = select.select([master], [], [], 1)
            if not readable:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            output += data
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)
    return output


@pytest.fixture
def hosteld_open(open_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = start_daemon(open_bus, tmp_path)
    try:
        yield daemon
    finally:
        terminate_all_machines(daemon)
        daemon.stop()


def busctl(bus: PrivateBus, *args: str, uid: int | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real busctl against `bus`, optionally as an unprivileged uid."""
    cmd = ["busctl", f"--address={bus.address}", *args]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def hostelctl(bus_address: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus_address)
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("timeout", 60)
    return subprocess.run([HOSTELCTL, *args], capture_output=True, text=True, env=env, **kwargs)


@pytest.fixture(scope="session")
def busybox_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One busybox root built for the session; tests get copies (see `tree`)."""
    base = tmp_path_factory.mktemp("busybox") / "tree"
    subprocess.run([str(REPO / "scripts/make-busybox-tree"), str(base)], check=True,
                   capture_output=True)
    return base


@pytest.fixture
def tree(busybox_base: Path, tmp_path: Path) -> Path:
    """A private busybox root directory for one test, named like a machine."""
    copy = tmp_path / "bbox"
    subprocess.run(["cp", "-a", str(busybox_base), str(copy)], check=True)
    return copy
