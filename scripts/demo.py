"""`make demo`: show hosteld working, on whichever bus this machine offers.

An installed hosteld already serving the system bus is used as it is (it may
have been bus-activated); otherwise the demo starts its own, on the system bus
when hostel's policy is installed there, else on a private dbus-daemon.  The
first line says which.  Each step prints the command a person would type, then
its real output."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from hostel.dbuswire import BUS_INTERFACE, BUS_NAME, BUS_PATH, ERROR, connect, method_call
from hostel.privatebus import DaemonProcess, PrivateBus

VENV_BIN = Path(sys.executable).parent
SYSTEM_SOCKET = Path("/run/dbus/system_bus_socket")
INSTALLED_POLICY = [Path("/usr/share/dbus-1/system.d/org.hostel1.conf"),
                    Path("/etc/dbus-1/system.d/org.hostel1.conf")]


FAILED: list[str] = []  # the steps that did not work: `make demo` must fail loudly


def show(*cmd: str, env: dict[str, str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        print(f"(exit status {result.returncode})")
        FAILED.append(shlex.join(cmd))


def system_bus_usable() -> bool:
    """The real system bus only lets hosteld own org.hostel1 once our policy is installed."""
    return (SYSTEM_SOCKET.exists() and "DBUS_SYSTEM_BUS_ADDRESS" not in os.environ
            and any(p.exists() for p in INSTALLED_POLICY))


def serving_pid(address: str) -> int | None:
    """The pid of whoever owns org.hostel1 on the bus at `address`, None if nobody does."""
    try:
        conn = connect(address)
    except OSError:
        return None  # a socket nobody listens on: no bus, so no hosteld either
    try:
        reply = conn.call(method_call(BUS_NAME, BUS_PATH, BUS_INTERFACE,
                                      "GetConnectionUnixProcessID", "s", ("org.hostel1",)))
    finally:
        conn.close()
    return None if reply.type == ERROR else int(reply.body[0])


def run_demo(address: str) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address,
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    show("busctl", f"--address={address}", "tree", "org.hostel1", env=env)
    show("busctl", f"--address={address}", "introspect", "org.hostel1", "/org/hostel1/machine",
         env=env)
    show("hostelctl", "status", env=env)
    show("hostelctl", "run", "-M", "busybox", "/bin/sh", "-c",
         "echo hello from $(hostname), pid $$; id; grep PRETTY /etc/os-release", env=env)
    show("hostelctl", "list", env=env)


DEMO_CRYPTTAB = """# an embedded example crypttab
home UUID=11111111-2222-3333-4444-555555555555 /etc/keys/home.key luks,discard
swap /dev/sdb2 /dev/urandom swap,cipher=aes-xts-plain64,size=256
"""


def run_generator(work: Path) -> None:
    """hostel-cryptsetup-generator on an embedded crypttab, as systemd would run it at boot."""
    tab = work / "crypttab"
    tab.write_text(DEMO_CRYPTTAB)
    out = [work / "generator" / d for d in ("normal", "early", "late")]
    for directory in out:
        directory.mkdir(parents=True)
    env = dict(os.environ, SYSTEMD_CRYPTTAB=str(tab), SYSTEMD_PROC_CMDLINE="",
               SYSTEMD_IN_INITRD="0", RUNTIME_DIRECTORY=str(work / "generator-run"))
    print(f"\n$ hostel-cryptsetup-generator {' '.join(map(str, out))}   # crypttab:\n{DEMO_CRYPTTAB}")
    subprocess.run([str(VENV_BIN / "hostel-cryptsetup-generator"), *map(str, out)], env=env,
                   check=True)
    for path in sorted(out[0].rglob("*")):
        if path.is_file() and path.suffix == ".service":
            print(f"--- {path.relative_to(out[0])}")
            print(path.read_text())


def demo_with_own_daemon(work: Path) -> None:
    bus = None
    if system_bus_usable():
        print("==> starting hosteld on the system bus (hostel's policy is installed there)")
        address = f"unix:path={SYSTEM_SOCKET}"
    else:
        bus = PrivateBus(work / "bus").start()
        address = bus.address
        print(f"==> no usable system bus here: started a private dbus-daemon at {address}")
    daemon = DaemonProcess(address, work / "run", Path("/var/lib/hostel"), bus=bus)
    try:
        daemon.start()
        print(f"==> hosteld is running (pid {daemon.proc.pid}) and reported READY=1")
        run_demo(address)
        run_generator(work)
    finally:
        status = daemon.stop()
        print(f"\n==> hosteld stopped (exit status {status})")
        if bus is not None:
            bus.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="hostel-demo-") as tmp:
        work = Path(tmp)
        system = f"unix:path={SYSTEM_SOCKET}"
        pid = serving_pid(system) if SYSTEM_SOCKET.exists() and \
            "DBUS_SYSTEM_BUS_ADDRESS" not in os.environ else None
        if pid is None:
            demo_with_own_daemon(work)
        else:
            print(f"==> using the hosteld already serving the system bus (pid {pid}); "
                  "it keeps running afterwards")
            run_demo(system)
            run_generator(work)
    if FAILED:
        print("\n==> the demo failed at: " + "; ".join(FAILED), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
