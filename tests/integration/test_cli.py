"""hostelctl against a real hosteld, and without one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostel import __version__
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import hostelctl

DESIGN_VERBS = ["run", "list", "status", "show", "terminate", "kill", "shell",
                "cryptsetup", "guest", "image"]


def test_help_lists_every_verb() -> None:
    result = hostelctl("unix:path=/nonexistent", "--help")
    assert result.returncode == 0
    for verb in DESIGN_VERBS:
        assert f"\n    {verb}" in result.stdout, verb
    assert "not implemented" not in result.stdout
    for group, verbs in [("cryptsetup", ["list", "status", "check-key", "attach", "detach"]),
                         ("guest", ["launch", "run"]), ("image", ["import", "list", "remove"])]:
        sub = hostelctl("unix:path=/nonexistent", group, "--help").stdout
        for verb in verbs:
            assert f"\n    {verb}" in sub, (group, verb)


def _importtime(command: list[str], **kwargs: object) -> tuple[subprocess.CompletedProcess[str],
                                                                set[str]]:
    """Run `command` (an interpreter given -X importtime) and name every module it imported."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    return result, {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}


def _imports(*argv: str) -> set[str]:
    """What `hostelctl ARGV...` imports (against a bus that is not there)."""
    return _importtime([sys.executable, "-X", "importtime", "-m", "hostel.cli", *argv],
                       env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"})[1]


def test_help_imports_no_bus_library() -> None:
    """The fast start is structural: --help must not import asyncio, dbus_fast or jeepney."""
    _result, imported = _importtime([sys.executable, "-X", "importtime", "-m", "hostel.cli",
                                     "--help"], check=True)
    assert not imported & {"asyncio", "dbus_fast", "jeepney", "hostel.client",
                           "hostel.dbuswire"}, imported


def test_bus_client_imports_only_light_modules() -> None:
    """Commands that reach hosteld pay for hostel.client: it must not bring in `re`,
    `typing` or `selectors` (jeepney cost ~7.5 ms for those), nor jeepney itself.
    Run as the launcher runs it (-IS), so that site.py's own imports do not count."""
    code = f"import sys; sys.path += {sys.path!r}; import hostel.client"
    _result, imported = _importtime([sys.executable, "-IS", "-X", "importtime", "-c", code],
                                    check=True)
    assert "hostel.dbuswire" in imported
    heavy = {"re", "typing", "selectors", "dataclasses", "jeepney", "asyncio", "dbus_fast"}
    assert not imported & heavy, imported


def test_only_the_named_group_is_built() -> None:
    """`hostelctl list` must not pay for the cryptsetup, guest and image command modules."""
    group_modules = {"hostel.cryptsetup.commands", "hostel.guest.commands",
                     "hostel.guest.image_commands"}
    assert not _imports("list") & group_modules
    assert "hostel.cryptsetup.commands" in _imports("cryptsetup", "list")
    assert "hostel.cryptsetup.commands" in _imports("--help")


def test_installed_launcher_skips_site_and_needs_no_environment() -> None:
    """The venv's hostelctl is our lean launcher (python -IS), not pip's wrapper: no site.py,
    no `re` for the wrapper, and PYTHONPATH or a stray cwd module cannot change what runs."""
    from conftest import HOSTELCTL

    shebang = Path(HOSTELCTL).read_text().splitlines()[0]
    interpreter, flags = shebang[2:].split()
    assert flags == "-IS", shebang
    result, imported = _importtime([interpreter, flags, "-X", "importtime", HOSTELCTL, "--help"],
                                   env={"PYTHONPATH": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    assert "site" not in imported and "hostel.cli" in imported


def test_status_shows_version_and_managers(hosteld: DaemonProcess) -> None:
    result = hostelctl(hosteld.address, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"hosteld {__version__} on {hosteld.address}"
    for path in ("/org/hostel1/machine", "/org/hostel1/cryptsetup", "/org/hostel1/guest"):
        assert any(path in line and "answering" in line for line in lines[1:]), path


def test_list_with_no_machines(hosteld: DaemonProcess) -> None:
    result = hostelctl(hosteld.address, "list")
    assert (result.returncode, result.stdout) == (0, "No machines.\n")


def test_errors_from_the_daemon_go_to_stderr_with_status_1(hosteld: DaemonProcess) -> None:
    result = hostelctl(hosteld.address, "terminate", "nope")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "hostelctl terminate: no machine named 'nope'"


def test_daemon_not_running(private_bus: PrivateBus) -> None:
    result = hostelctl(private_bus.address, "status")
    assert result.returncode == 69
    assert "hosteld is not running" in result.stderr
    assert "systemctl start hosteld" in result.stderr


def test_no_bus_at_all(tmp_path: Path) -> None:
    result = hostelctl(f"unix:path={tmp_path}/missing", "list")
    assert result.returncode == 69
    assert f"cannot reach the system bus at unix:path={tmp_path}/missing" in result.stderr


def test_usage_errors_exit_2_but_run_exits_1_as_nspawn() -> None:
    assert hostelctl("unix:path=/nonexistent", "--bogus").returncode == 2
    assert hostelctl("unix:path=/nonexistent").returncode == 2
    assert hostelctl("unix:path=/nonexistent", "kill", "x", "--kill-whom=nobody").returncode == 2
    for argv, message in [(["--bogus"], "unrecognized option '--bogus'"),
                          (["-D"], "option requires an argument -- 'D'"),
                          (["--quiet=no"], "option '--quiet' doesn't allow an argument")]:
        result = hostelctl("unix:path=/nonexistent", "run", *argv)
        assert result.returncode == 1, argv
        assert result.stderr.splitlines() == [
            f"hostelctl run: {message}", "Try 'hostelctl run --help' for more information."]


def test_run_help_and_its_imports() -> None:
    """`run` parses nspawn's options itself: no argparse (with re, gettext, shutil) at start."""
    result = hostelctl("unix:path=/nonexistent", "run", "--help")
    assert result.returncode == 0 and "-D --directory=PATH" in result.stdout
    assert not _imports("run", "--help") & {"argparse", "re", "typing"}


def test_losing_the_bus_mid_run_is_a_clear_error(tmp_path: Path) -> None:
    """hostelctl run waits on the bus; when the bus dies it says so and exits 69."""
    import signal
    import subprocess
    import time

    from conftest import HOSTELCTL
    from hostel.privatebus import PrivateBus, start_daemon

    tree = tmp_path / "tree"
    subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts/make-busybox-tree"),
                    str(tree)], check=True, capture_output=True)
    bus = PrivateBus(tmp_path / "bus").start()
    daemon = start_daemon(bus, tmp_path)
    # stderr to a file: the container shares hostelctl's descriptors and outlives it.
    errors = tmp_path / "stderr"
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "orphan", "--as-pid2",
                             "sleep", "60"], env=daemon.environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(errors, "w"))
    try:
        deadline = time.monotonic() + 20
        while "orphan" not in hostelctl(bus.address, "list").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        bus.stop()
        assert proc.wait(timeout=30) == 69
        err = errors.read_text()
        assert "lost the connection to the system bus" in err and "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()
        daemon.stop(signal.SIGKILL)
        bus.stop()
        # The container outlived both; a new hosteld adopts it, so it can be cleaned up.
        bus = PrivateBus(tmp_path / "bus2").start()
        again = start_daemon(bus, tmp_path)
        hostelctl(bus.address, "kill", "orphan", "--signal=KILL")
        deadline = time.monotonic() + 20
        while "orphan" in hostelctl(bus.address, "list").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        again.stop()
        bus.stop()
