"""The real machinectl against hosteld's org.freedesktop.machine1.

machinectl refuses to run unless /run/systemd/system exists; it runs here in a
private mount namespace with a tmpfs /run that has it, the host untouched."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, NOBODY, busctl, hostelctl, unprivileged_python

pytestmark = pytest.mark.skipif(not shutil.which("machinectl"), reason="machinectl not installed")
ADDRESS = "198.51.100.66"


def machinectl(daemon: DaemonProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec machinectl "$@"'
    result = subprocess.run(["unshare", "-m", "--propagation=private", "sh", "-c", script, "sh",
                             "--no-pager", *args],
                            env={**daemon.environment(), "SYSTEMD_COLORS": "0"},
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def wait_running(daemon: DaemonProcess, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = hostelctl(daemon.address, "list").stdout
        if all(re.search(rf"^{n}\s+container\s+\S+\s+running", listing, re.M)  # SERVICE between
               for n in names):
            return
        time.sleep(0.1)
    raise TimeoutError(f"machines {names} not running")


@pytest.fixture
def two_machines(hosteld: DaemonProcess, tree: Path) -> Iterator[DaemonProcess]:
    script = f"ip addr add {ADDRESS}/24 dev host0; ip link set host0 up; sleep 300"
    # A tree of its own for beta: a running tree is locked, as systemd-nspawn locks it.
    beta_tree = tree.parent / "beta"
    subprocess.run(["cp", "-a", str(tree), str(beta_tree)], check=True)
    procs = [subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "alpha",
                               "--network-veth", "--as-pid2", "/bin/sh", "-c", script],
                              env=hosteld.environment(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(beta_tree), "-M", "beta",
                               "--as-pid2", "sleep", "300"],
                              env=hosteld.environment(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_running(hosteld, ["alpha", "beta"])
        time.sleep(0.5)  # the address inside alpha
        yield hosteld
    finally:
        for name in ("alpha", "beta"):
            hostelctl(hosteld.address, "kill", name, "--signal=KILL")
        for proc in procs:
            proc.wait(timeout=30)


def test_list_shows_both_with_class_and_addresses(two_machines: DaemonProcess) -> None:
    out = machinectl(two_machines, "list").stdout
    assert re.search(r"^alpha\s+container\s+hostel\s+.*" + re.escape(ADDRESS), out, re.M), out
    assert re.search(r"^beta\s+container\s+hostel", out, re.M), out
    assert "2 machines listed." in out


def test_status_shows_leader_root_address_and_os(two_machines: DaemonProcess, tree: Path) -> None:
    out = machinectl(two_machines, "status", "alpha").stdout
    leader = json.loads(busctl(two_machines.bus, "--json=short", "get-property", "org.hostel1",
                               "/org/hostel1/machine/alpha", "org.hostel1.Machine",
                               "Leader").stdout)["data"]
    assert re.search(rf"Leader: {leader}", out)
    assert f"Root: {tree}" in out
    assert ADDRESS in out
    assert "OS: hostel busybox container" in out


def test_show_prints_the_properties(two_machines: DaemonProcess, tree: Path) -> None:
    props = dict(line.split("=", 1) for line in
                 machinectl(two_machines, "show", "beta").stdout.splitlines() if "=" in line)
    assert props["Name"] == "beta" and props["Class"] == "container"
    assert props["Service"] == "hostel" and props["State"] == "running"
    assert props["RootDirectory"] == str(tree.parent / "beta")  # its own copy (two_machines)
    assert props["Unit"] == "machine-beta.scope"
    assert int(props["Leader"]) > 1


def test_shell_runs_a_command_inside(two_machines: DaemonProcess) -> None:
    out = machinectl(two_machines, "-q", "shell", "beta", "/bin/echo", "hi").stdout
    assert "hi" in out.split()
    hostname = machinectl(two_machines, "-q", "shell", "beta", "/bin/hostname").stdout
    assert "beta" in hostname


def test_hostelctl_shell_runs_a_command_inside(two_machines: DaemonProcess) -> None:
    result = hostelctl(two_machines.address, "shell", "beta", "/bin/sh", "-c", "echo in-$(hostname)")
    assert result.returncode == 0, result.stderr
    assert "in-beta" in result.stdout
    missing = hostelctl(two_machines.address, "shell", "nosuch", "/bin/true")
    assert missing.returncode == 1 and "no machine named 'nosuch'" in missing.stderr


def test_terminate_and_kill_act_and_the_list_follows(two_machines: DaemonProcess) -> None:
    machinectl(two_machines, "kill", "alpha", "--signal=SIGKILL")
    machinectl(two_machines, "terminate", "beta")
    deadline = time.monotonic() + 30
    while "No machines." not in machinectl(two_machines, "list").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)


# machined's documented types, org.freedesktop.machine1(5)
MACHINE_PROPERTIES = {"Name": "s", "Id": "ay", "Timestamp": "t", "TimestampMonotonic": "t",
                      "Service": "s", "Unit": "s", "Leader": "u", "Class": "s",
                      "RootDirectory": "s", "NetworkInterfaces": "ai", "State": "s"}
MANAGER_METHODS = {"GetMachine": ("s", "o"), "GetMachineByPID": ("u", "o"),
                   "ListMachines": ("-", "a(ssso)"),
                   "CreateMachine": ("sayssusa(sv)", "o"),
                   "CreateMachineWithNetwork": ("sayssusaia(sv)", "o"),
                   "RegisterMachine": ("sayssus", "o"),
                   "RegisterMachineWithNetwork": ("sayssusai", "o"),
                   "TerminateMachine": ("s", "-"), "KillMachine": ("ssi", "-"),
                   "GetMachineAddresses": ("s", "a(iay)"), "GetMachineOSRelease": ("s", "a{ss}"),
                   "OpenMachinePTY": ("s", "hs"), "OpenMachineLogin": ("s", "hs"),
                   "OpenMachineShell": ("sssasas", "hs")}
MACHINE_METHODS = {"Terminate": ("-", "-"), "Kill": ("si", "-"), "GetAddresses": ("-", "a(iay)"),
                   "GetOSRelease": ("-", "a{ss}"), "OpenPTY": ("-", "hs"),
                   "OpenLogin": ("-", "hs"), "OpenShell": ("ssasas", "hs")}


def members(daemon: DaemonProcess, path: str) -> dict[str, tuple[str, str, str]]:
    out = busctl(daemon.bus, "introspect", "org.freedesktop.machine1", path).stdout
    return {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in
            re.finditer(r"^\.(\w+)\s+(method|property|signal)\s+(\S+)\s+(\S+)", out, re.M)}


def test_types_match_machined_documentation(two_machines: DaemonProcess) -> None:
    manager = members(two_machines, "/org/freedesktop/machine1")
    for name, (sig_in, sig_out) in MANAGER_METHODS.items():
        assert manager[name] == ("method", sig_in, sig_out), name
    machine = members(two_machines, "/org/freedesktop/machine1/machine/alpha")
    for name, signature in MACHINE_PROPERTIES.items():
        assert machine[name][:2] == ("property", signature), name
    for name, (sig_in, sig_out) in MACHINE_METHODS.items():
        assert machine[name] == ("method", sig_in, sig_out), name


CALLER = """
import json, sys
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
path, interface, member, signature, args = json.loads(sys.argv[1])
conn = open_dbus_connection(bus="SYSTEM")
msg = new_method_call(DBusAddress(path, "org.freedesktop.machine1", interface), member,
                      signature or None, tuple(args))
reply = conn.send_and_get_reply(msg)
print(json.dumps(reply.header.fields.get(4, "ok") if reply.header.message_type.value == 3 else "ok"))
"""

MUTATING = [
    ("/org/freedesktop/machine1", "org.freedesktop.machine1.Manager", m, sig, args)
    for m, sig, args in [
        ("TerminateMachine", "s", ["x"]), ("KillMachine", "ssi", ["x", "all", 9]),
        ("RegisterMachine", "sayssus", ["x", [], "s", "container", 1, "/"]),
        ("CreateMachine", "sayssusa(sv)", ["x", [], "s", "container", 1, "/", []]),
        ("OpenMachinePTY", "s", ["x"]), ("OpenMachineLogin", "s", ["x"]),
        ("OpenMachineShell", "sssasas", ["x", "", "", [], []]),
        ("UnregisterMachine", "s", ["x"]), ("RemoveImage", "s", ["x"]),
    ]]


@pytest.mark.parametrize("call", MUTATING, ids=lambda c: c[2])
def test_compat_mutations_are_root_only(hosteld_open: DaemonProcess, call: tuple) -> None:
    path, interface, member, signature, args = call
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          unprivileged_python(), "-c", CALLER,
                          json.dumps([path, interface, member, signature, args])],
                         env=hosteld_open.environment(), capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert json.loads(out) == "org.freedesktop.DBus.Error.AccessDenied"
