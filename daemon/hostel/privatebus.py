"""A private system bus and a hosteld on it, for tests, `make demo` and benchmarks.

This machine (and many CI machines) has no system bus. A private dbus-daemon
with the system bus's default policy plus hostel's own policy file behaves
like the real one for every check hostel cares about: name ownership,
per-method policy, GetConnectionUnixUser, fd passing."""
from __future__ import annotations

import os
import select
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_TEMPLATE = """<?xml version="1.0"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  {extra_policy}
  <includedir>{policy_dir}</includedir>
</busconfig>
"""

# Lets anyone own and call anything: for proving that hosteld enforces its
# rules itself, not only through the bus policy.
OPEN_POLICY = """<policy context="default">
    <allow own="*"/>
    <allow send_type="method_call"/>
  </policy>"""

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "dbus"
# Slower machines (the lab VM: emulated CPU, nested KVM) stretch the start-up waits.
TIME_SCALE = float(os.environ.get("HOSTEL_TEST_TIME_SCALE", "1"))


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Until the bus accepts connections (the socket file exists before listen())."""
    deadline = time.monotonic() + timeout
    while not _accepts(path):
        if proc.poll() is not None:
            raise RuntimeError(f"dbus-daemon exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"dbus-daemon did not listen on {path} within {timeout} s")
        time.sleep(0.01)


@dataclass
class PrivateBus:
    """A dbus-daemon listening on a socket under `workdir`."""

    workdir: Path
    policy_dir: Path = REPO_POLICY_DIR
    open_policy: bool = False
    limits: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    socket_dir: Path | None = None

    @property
    def socket_path(self) -> Path:
        # Its own world-searchable directory: unprivileged test clients must
        # reach the socket even when workdir sits under a private tmp.
        assert self.socket_dir is not None, "bus not started"
        return self.socket_dir / "system_bus_socket"

    @property
    def address(self) -> str:
        return f"unix:path={self.socket_path}"

    def start(self) -> "PrivateBus":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="hostel-bus-"))
        self.socket_dir.chmod(0o755)
        config = self.workdir / "bus.conf"
        config.write_text(CONFIG_TEMPLATE.format(
            socket=self.socket_path, policy_dir=self.policy_dir,
            extra_policy=(OPEN_POLICY if self.open_policy else "") + "".join(
                f'<limit name="{name}">{value}</limit>' for name, value in self.limits.items())))
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "bus.log", "wb"))
        _wait_for_socket(self.socket_path, self.proc, timeout=10)
        return self

    def restart(self) -> None:
        """A new dbus-daemon on the same socket, as when the system's bus is restarted:
        every connection drops, and clients that reconnect find the same address."""
        assert self.proc is not None, "bus not started"
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.socket_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.workdir / 'bus.conf'}", "--nofork",
             "--nopidfile"],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "bus.log", "ab"))
        _wait_for_socket(self.socket_path, self.proc, timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


@dataclass
class DaemonProcess:
    """A hosteld process on the bus at `address`, declared ready through sd_notify."""

    address: str
    runtime_dir: Path
    state_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    bus: PrivateBus | None = None  # the private bus it runs on, if any
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 20) -> "DaemonProcess":
        self.runtime_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = self.runtime_dir.parent / "hosteld.log"
        # An abstract socket: nothing to clean up, no path length or permission limits.
        notify_name = f"hostel-notify-{os.getpid()}-{id(self)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind("\0" + notify_name)
            env = self.environment()
            env["NOTIFY_SOCKET"] = "@" + notify_name
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hostel.daemon", "--runtime-dir", str(self.runtime_dir),
                 "--state-dir", str(self.state_dir)],
                env=env, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
            self._wait_ready(self.proc, notify, timeout * TIME_SCALE)
        return self

    def _wait_ready(self, proc: subprocess.Popen, notify: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hosteld exited with status {proc.returncode}:\n{self.log()}")
            readable, _, _ = select.select([notify], [], [], 0.1)
            if readable and b"READY=1" in notify.recv(4096).split(b"\n"):
                return
        raise TimeoutError(f"hosteld did not report READY=1 within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop the daemon; returns its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        status = self.proc.returncode
        self.proc = None
        return status


def start_daemon(bus: PrivateBus, workdir: Path, **kwargs: Any) -> DaemonProcess:
    """A hosteld on `bus` with its state under `workdir`."""
    return DaemonProcess(bus.address, workdir / "run", workdir / "state", bus=bus,
                         **kwargs).start()
