"""`make install` into a DESTDIR: a hostel that stands alone.

The install is checked where it would run.  In a private mount namespace the
DESTDIR's /usr/local is bound over /usr/local and an empty tmpfs covers the
checkout, so nothing of the repository or its venv can be reached; there the
installed hosteld serves a private bus carrying the installed policy, and the
installed hostelctl answers, for root and for uid 65534.  The generator also
runs in a chroot that holds nothing but /usr, as at early boot.  The DESTDIR
starts with an install of the old kind (links into a checkout, an older venv),
which `make install` must replace.  The tests share one install and run in
file order: the last one uninstalls it.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO
from hostel import __version__
from hostel.privatebus import PrivateBus

PYTHON = os.path.realpath("/usr/bin/python3")
SITE = "usr/local/lib/hostel/lib/python3.11/site-packages"
OLD_MARKER = "left-by-an-older-install"


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("destdir")
    bindir = dest / "usr/local/bin"
    bindir.mkdir(parents=True)
    for tool in ("hosteld", "hostelctl"):
        (bindir / tool).symlink_to(REPO / ".venv/bin" / tool)
    (dest / "usr/local/lib/hostel").mkdir(parents=True)
    (dest / "usr/local/lib/hostel" / OLD_MARKER).touch()
    result = subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={dest}"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return dest


def in_installed_system(dest: Path, script: str, env: dict[str, str],
                        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a bash script where /usr/local is the installed one and the checkout is gone."""
    prologue = ('set -eu\nmount --bind "$DEST/usr/local" /usr/local\n'
                'mount -t tmpfs -o mode=0755 tmpfs "$REPO"\n')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                           prologue + script],
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "DEST": str(dest),
                               "REPO": str(REPO), **env},
                          cwd="/", capture_output=True, text=True, timeout=timeout)


def test_files_are_in_place_and_replace_the_older_install(destdir: Path) -> None:
    for tool in ("hosteld", "hostelctl", "hostel-cryptsetup-generator"):
        launcher = destdir / "usr/local/bin" / tool
        assert launcher.is_file() and not launcher.is_symlink(), tool
        assert os.stat(launcher).st_mode & 0o777 == 0o755
    assert not (destdir / "usr/local/lib/hostel" / OLD_MARKER).exists()
    for page in ("man1/hostelctl.1", "man8/hosteld.8", "man8/hostel-cryptsetup-generator.8"):
        assert ".TH" in (destdir / "usr/local/share/man" / page).read_text(), page
    completion = destdir / "usr/local/share/bash-completion/completions/hostelctl"
    assert "complete -F _hostelctl hostelctl" in completion.read_text()
    # Lean launchers start as the checkout's: the real interpreter with -IS.
    for tool in ("hostelctl", "hostel-cryptsetup-generator"):
        assert (destdir / "usr/local/bin" / tool).read_text().startswith(f"#!{PYTHON} -IS\n")
    assert (destdir / "usr/local/bin/hosteld").read_text().startswith(
        "#!/usr/local/lib/hostel/bin/python -I\n")
    assert list((destdir / SITE / "hostel").glob("_native*.so")), "the wheel's compiled extension"
    assert (destdir / "usr/share/dbus-1/system.d/org.hostel1.conf").read_bytes() == \
        (REPO / "dbus/org.hostel1.conf").read_bytes()
    activation = (destdir / "usr/share/dbus-1/system-services/org.hostel1.service").read_text()
    assert "Exec=/usr/local/bin/hosteld\n" in activation
    assert (destdir / "usr/lib/tmpfiles.d/hostel.conf").is_file()
    generator = destdir / "etc/systemd/system-generators/systemd-cryptsetup-generator"
    assert os.readlink(generator) == "/usr/local/bin/hostel-cryptsetup-generator"
    unit = (destdir / "etc/systemd/system/hosteld.service").read_text()
    assert "Type=notify" in unit and "BusName=org.hostel1" in unit
    documentation = next(line for line in unit.splitlines() if line.startswith("Documentation="))
    assert (destdir / documentation.removeprefix("Documentation=file:///")).is_file(), documentation


def test_unit_passes_systemd_analyze_verify(destdir: Path) -> None:
    result = in_installed_system(destdir, 'systemd-analyze verify --man=no '
                                 '"$DEST/etc/systemd/system/hosteld.service"', {})
    assert (result.returncode, result.stderr) == (0, ""), result.stdout


@pytest.fixture
def installed_bus(destdir: Path, tmp_path: Path) -> Iterator[PrivateBus]:
    bus = PrivateBus(tmp_path / "bus", policy_dir=destdir / "usr/share/dbus-1/system.d").start()
    try:
        yield bus
    finally:
        bus.stop()


def test_installed_commands_work_without_the_checkout(destdir: Path, installed_bus: PrivateBus,
                                                      tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    runtime.chmod(0o755)
    script = '''
hosteld --runtime-dir "$RUNTIME" --state-dir "$STATE" 2>"$LOG" &
pid=$!
for _ in $(seq 200); do hostelctl status >/dev/null 2>&1 && break; sleep 0.1; done
echo "== status"; hostelctl status
echo "== nobody"; setpriv --reuid=65534 --regid=65534 --clear-groups hostelctl list
echo "== nobody may not"; setpriv --reuid=65534 --regid=65534 --clear-groups \
    hostelctl terminate nothing 2>&1 || echo "exit $?"
kill -TERM "$pid"
wait "$pid" && echo "== hosteld exited 0"
'''
    try:
        result = in_installed_system(destdir, script, {
            "DBUS_SYSTEM_BUS_ADDRESS": installed_bus.address, "RUNTIME": str(runtime),
            "STATE": str(tmp_path / "state"), "LOG": str(tmp_path / "hosteld.log")})
    finally:
        subprocess.run(["rm", "-rf", str(runtime)], check=True)
    log = (tmp_path / "hosteld.log").read_text(errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr + log
    sections = dict(part.split("\n", 1) for part in result.stdout.split("== ")[1:])
    assert sections["status"].startswith(f"hosteld {__version__} on {installed_bus.address}\n")
    assert sections["nobody"].strip() == "No machines."
    # The installed bus policy turns the mutation away before hosteld sees it; hostelctl
    # says what that means instead of the bus's rule dump, with systemctl's exit status 4.
    assert "requires root" in sections["nobody may not"]
    assert "Rejected send message" not in sections["nobody may not"]
    assert sections["nobody may not"].endswith("exit 4\n")
    assert "hosteld exited 0" in result.stdout, log


def test_generator_runs_with_nothing_but_usr(destdir: Path, tmp_path: Path) -> None:
    """At early boot only /usr may be mounted: no /var, no /home, no checkout."""
    root = tmp_path / "root"
    script = '''
mkdir -p "$ROOT/usr" "$ROOT/etc" "$ROOT/out/normal" "$ROOT/out/early" "$ROOT/out/late"
mount --rbind /usr "$ROOT/usr"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ROOT/$d"; done
cp -a "$DEST/etc/systemd" "$ROOT/etc/"
echo 'home UUID=11111111-2222-3333-4444-555555555555 none luks' >"$ROOT/etc/crypttab"
SYSTEMD_CRYPTTAB=/etc/crypttab SYSTEMD_PROC_CMDLINE= SYSTEMD_IN_INITRD=0 RUNTIME_DIRECTORY=/run \
    chroot "$ROOT" /etc/systemd/system-generators/systemd-cryptsetup-generator \
    /out/normal /out/early /out/late
'''
    result = in_installed_system(destdir, script, {"ROOT": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    unit = (root / "out/normal/systemd-cryptsetup@home.service").read_text()
    assert "ExecStart=/lib/systemd/systemd-cryptsetup attach 'home'" in unit


def test_uninstall_removes_everything_installed(destdir: Path) -> None:
    subprocess.run(["make", "-C", str(REPO), "uninstall", f"DESTDIR={destdir}"], check=True,
                   capture_output=True, timeout=120)
    left = [p for p in destdir.rglob("*") if p.is_symlink() or not p.is_dir()]
    assert left == []


def test_activation_file_names_the_unit() -> None:
    text = (REPO / "dbus/org.hostel1.service").read_text()
    assert "Name=org.hostel1" in text and "SystemdService=hosteld.service" in text
