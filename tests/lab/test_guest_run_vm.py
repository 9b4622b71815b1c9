"""`hostelctl guest run --isolation=vm` against `--isolation=container` for the same image.

The image is made here (a docker-save archive with an environment, a working
directory, a whiteout and a non-root user) and imported through hosteld; each
case runs in a container, then in a VM booted by hostel's launcher (Debian's
cloud kernel, hostel's initramfs and static init): stdout, stderr and the
exit status must be the same bytes and number. Three VM boots in all, since
each costs tens of seconds in the lab."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, hostelctl
from lab.plugin import time_scale
from unit.test_guest_images import Layer, busybox_layer, docker_archive, image_config

RUN_TIMEOUT = 240     # seconds for one VM run; the nested boot takes ~15-45 s
APPLETS = ("sh", "echo", "id", "pwd", "hostname", "test", "true", "kill", "cat", "env", "sort",
           "sleep", "tty")
REPORT = "; ".join((
    "cat", "echo", "env | sort", "echo id:$(id)", "echo cwd:$(pwd)", "echo env:$FROM_IMAGE:$FROM_REQUEST",
    "test -e /etc/doomed && echo whiteout:present || echo whiteout:gone",
    "echo host:$(hostname)", "cat /srv/note", "echo to-stderr >&2", "exit 42"))


def _image(path: Path) -> Path:
    base = busybox_layer(APPLETS)
    base.file("etc/doomed", b"gone in the next layer\n")
    top = Layer().dir("etc").whiteout("etc/doomed").dir("srv").file("srv/note", b"note:kept\n")
    layers = [base.tar(), top.tar()]
    config = image_config(layers, User="user", WorkingDir="/srv",
                          Env=["PATH=/bin", "FROM_IMAGE=image"])
    return docker_archive(path, layers, config)


def _run(address: str, isolation: str, *args: str, stdin: str | None = None,
         daemon: DaemonProcess | None = None) -> subprocess.CompletedProcess[str]:
    try:
        extra = {} if stdin is None else {"input": stdin}
        return hostelctl(address, "guest", "run", "--quiet", f"--isolation={isolation}",
                         "--image", "parity", *args, timeout=RUN_TIMEOUT, **extra)
    except subprocess.TimeoutExpired as e:
        log = daemon.log()[-3000:] if daemon is not None else ""
        pytest.fail(f"guest run --isolation={isolation} {args} did not end in {RUN_TIMEOUT} s: "
                    f"{e.stdout!r} {e.stderr!r}\n{log}")


@pytest.mark.lab("kvm")
def test_container_and_vm_give_the_same_output_and_status(
        private_bus: PrivateBus, hosteld: DaemonProcess, tmp_path: Path) -> None:
    imported = hostelctl(private_bus.address, "image", "import",
                         str(_image(tmp_path / "parity.tar")), "--name", "parity")
    assert imported.returncode == 0, imported.stderr
    cases = [
        # stdin piped in: `cat` ends at its end (in a VM, where the host's frame says)
        (("--env", "FROM_REQUEST=request", "--hostname", "parity-one", "--",
          "sh", "-c", REPORT), 42, "piped\nin"),
        # a child killed by SIGKILL: its shell exits 128+9 (the payload itself is pid 1
        # of a container, where a signal from inside cannot kill it; in a VM it can)
        (("--", "sh", "-c", "echo before; sh -c 'kill -9 $$'; exit $?"), 137, None),
        (("--", "no-such-command"), 127, None),
        (("--", "/srv/note"), 126, None),
    ]
    outputs = []
    for args, code, stdin in cases:
        container = _run(private_bus.address, "container", *args, stdin=stdin, daemon=hosteld)
        vm = _run(private_bus.address, "vm", *args, stdin=stdin, daemon=hosteld)
        assert (vm.stdout, vm.stderr, vm.returncode) == \
            (container.stdout, container.stderr, container.returncode), hosteld.log()[-3000:]
        assert container.returncode == code, (container.stdout, container.stderr)
        outputs.append(container)
    report = outputs[0]
    # the environment is the image's and the request's over PATH, HOSTNAME and HOME: no
    # marker, no TERM off a terminal, nothing of either isolation's own
    env = ("FROM_IMAGE=image", "FROM_REQUEST=request", "HOME=/home/user",
           "HOSTNAME=parity-one", "PATH=/bin", "PWD=/srv", "SHLVL=1")
    assert report.stdout.startswith("piped\nin\n" + "".join(f"{e}\n" for e in env)), \
        report.stdout
    for needle in ("id:uid=1000(user)", "cwd:/srv", "env:image:request", "whiteout:gone",
                   "host:parity-one", "note:kept"):
        assert needle in report.stdout, report.stdout
    assert report.stderr == "to-stderr\n" and outputs[1].stdout == "before\n"
    assert outputs[2].stderr == "hostel: cannot run no-such-command: No such file or directory\n"
    assert outputs[3].stderr == "hostel: cannot run /srv/note: Permission denied\n"
    start = time.monotonic()
    true = _run(private_bus.address, "vm", "--", "/bin/true")
    print(f"guest run --isolation=vm -- /bin/true: {time.monotonic() - start:.1f} s")
    assert (true.returncode, true.stdout, true.stderr) == (0, "", ""), hosteld.log()[-3000:]
    listed = hostelctl(private_bus.address, "guest", "list")
    assert "parity" not in listed.stdout, "a finished VM run is forgotten: " + listed.stdout


def _run_on_a_terminal(address: str, isolation: str) -> tuple[int, str]:
    """guest run with a pty as the client's stdin and stdout (TERM=xterm): status, output."""
    master, slave = os.openpty()
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, TERM="xterm")
    script = "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo tty:yes; echo term:$TERM; exit 3"
    client = subprocess.Popen([HOSTELCTL, "guest", "run", "--quiet", f"--isolation={isolation}",
                               "--image", "parity", "--", "sh", "-c", script], env=env,
                              stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                if client.poll() is not None:
                    break
                continue
            try:
                part = os.read(master, 4096)
            except OSError:   # EIO: the client, the last holder of the slave, is gone
                break
            if not part:
                break
            output += part
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        os.close(master)
    assert client.stderr is not None
    client.stderr.close()
    return client.returncode, output.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.lab("kvm")
def test_on_a_terminal_the_payload_gets_a_tty_and_term_in_both(
        private_bus: PrivateBus, hosteld: DaemonProcess, tmp_path: Path) -> None:
    assert hostelctl(private_bus.address, "image", "import", str(_image(tmp_path / "p.tar")),
                     "--name", "parity").returncode == 0
    for isolation in ("container", "vm"):
        code, output = _run_on_a_terminal(private_bus.address, isolation)
        assert (code, "tty:yes\nterm:xterm\n" in output) == (3, True), (isolation, output,
                                                                     hosteld.log()[-2000:])


def _listed(address: str, name: str) -> bool:
    listing = hostelctl(address, "list").stdout
    return re.search(rf"^{re.escape(name)}\s+vm\b.*\brunning\b", listing, re.M) is not None


def _machinectl_list(hosteld: DaemonProcess) -> str:
    script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec machinectl "$@"'
    out = subprocess.run(["unshare", "-m", "--propagation=private", "sh", "-c", script, "sh",
                          "--no-pager", "list"], env={**hosteld.environment(), "SYSTEMD_COLORS": "0"},
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.lab("kvm")
def test_a_vm_run_is_listed_and_ends_by_terminate_or_by_its_client(
        private_bus: PrivateBus, hosteld: DaemonProcess, tmp_path: Path) -> None:
    """Two VM runs at once, ended before their payloads would: one by `guest terminate`,
    the other by SIGTERM to its client (which exits 128+15, as for a killed payload)."""
    assert hostelctl(private_bus.address, "image", "import", str(_image(tmp_path / "p.tar")),
                     "--name", "parity").returncode == 0
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address)
    clients = {name: subprocess.Popen(
        [HOSTELCTL, "guest", "run", "--quiet", "--isolation=vm", "--image", "parity", "--name",
         name, "--", "sleep", "600"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for name in ("vm-a", "vm-b")}
    try:
        deadline = time.monotonic() + 60 * time_scale()
        while not all(_listed(private_bus.address, n) for n in clients):
            assert time.monotonic() < deadline, hostelctl(private_bus.address, "list").stdout
            assert all(c.poll() is None for c in clients.values()), \
                [c.communicate() for c in clients.values()]
            time.sleep(0.5)
        machines = _machinectl_list(hosteld)
        for name in clients:
            assert re.search(rf"^{name}\s+vm\s+hostel", machines, re.M), machines
            # one guest model: a VM run says its class and image as a container guest does
            picked = hostelctl(private_bus.address, "guest", "status", name, "-p",
                               "Class,Image", "--value")
            assert picked.stdout == "vm\nparity:latest\n", (picked.stdout, picked.stderr)
        assert hostelctl(private_bus.address, "guest", "terminate", "vm-a").returncode == 0
        clients["vm-b"].send_signal(signal.SIGTERM)
        a_out, a_err = clients["vm-a"].communicate(timeout=60)
        b_out, b_err = clients["vm-b"].communicate(timeout=60)
        assert clients["vm-a"].returncode == 1 and "vm-a" in a_err, (a_out, a_err)
        assert clients["vm-b"].returncode == 128 + signal.SIGTERM, (b_out, b_err)
        listing = hostelctl(private_bus.address, "guest", "list").stdout
        assert "vm-a" not in listing and "vm-b" not in listing, listing
    finally:
        for client in clients.values():
            if client.poll() is None:
                client.kill()
                client.communicate()


def _leader(address: str, name: str) -> int:
    status = hostelctl(address, "guest", "status", name)
    found = re.search(r"Leader: (\d+)", status.stdout)
    assert found, (status.stdout, status.stderr)
    return int(found.group(1))


def _work_dirs(runtime: Path, name: str) -> list[Path]:
    return list((runtime / "vm").glob(f"{name}.*"))


@pytest.mark.lab("kvm")
def test_vm_runs_are_taken_back_by_a_restarted_hosteld(private_bus: PrivateBus,
                                                      tmp_path: Path) -> None:
    """hosteld killed (-9) under two VM runs: one ends meanwhile (its status and clean-up
    are the next hosteld's), the other is listed again (class vm) and terminated."""
    runtime, state = tmp_path / "run", tmp_path / "state"
    address = private_bus.address
    daemons = [DaemonProcess(address, runtime, state, bus=private_bus).start()]
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    commands = {"adopt-long": ["sleep", "600"], "adopt-short": ["sh", "-c", "sleep 2; exit 7"]}
    clients: list[subprocess.Popen[bytes]] = []
    try:
        assert hostelctl(address, "image", "import", str(_image(tmp_path / "p.tar")),
                         "--name", "parity").returncode == 0
        clients += [subprocess.Popen(
            [HOSTELCTL, "guest", "run", "--quiet", "--isolation=vm", "--image", "parity",
             "--name", name, "--", *command], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, command in commands.items()]
        deadline = time.monotonic() + 60 * time_scale()
        while not all(_listed(address, n) for n in commands):
            assert time.monotonic() < deadline, hostelctl(address, "list").stdout
            time.sleep(0.5)
        short = _leader(address, "adopt-short")
        assert all(_work_dirs(runtime, n) for n in commands)
        daemons[0].stop(signal.SIGKILL)
        deadline = time.monotonic() + RUN_TIMEOUT
        while os.path.exists(f"/proc/{short}"):   # the short run ends while no hosteld runs
            assert time.monotonic() < deadline, "adopt-short's VM did not end"
            time.sleep(0.5)
        daemons.append(DaemonProcess(address, runtime, state, bus=private_bus).start())
        status = hostelctl(address, "guest", "status", "adopt-short").stdout
        assert "State: exited" in status and "(status 7)" in status, status
        assert _work_dirs(runtime, "adopt-short") == []
        if not _listed(address, "adopt-long"):
            status = hostelctl(address, "guest", "status", "adopt-long").stdout
            pytest.fail(f"adopt-long is not running again:\n{status}\n{daemons[-1].log()}")
        assert hostelctl(address, "guest", "terminate", "adopt-long").returncode == 0
        deadline = time.monotonic() + 60
        while "State: exited" not in hostelctl(address, "guest", "status", "adopt-long").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert _work_dirs(runtime, "adopt-long") == []
        assert not list((runtime / "guests").glob("*.json"))
    finally:
        for client in clients:
            client.kill()
            client.wait()
        for daemon in reversed(daemons):
            if daemon.proc is not None and daemon.proc.poll() is None:
                for name in commands:
                    hostelctl(address, "guest", "terminate", name)
                daemon.stop()
