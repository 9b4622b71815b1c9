""".nspawn settings files read by hosteld, side by side with systemd-nspawn 252.

The file beside the tree is one both programs find; the trusted directories
are hosteld's HOSTEL_NSPAWN_SETTINGS_DIRS here (a test must not write into
/etc/systemd/nspawn), and nspawn's equivalent is --settings=trusted on the
file beside the tree."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import busctl
from integration.nspawn_pair import hostel, needs_nspawn, nspawn, same_stdout


@pytest.fixture
def daemon(trusted_hosteld: DaemonProcess) -> DaemonProcess:
    return trusted_hosteld


@pytest.fixture
def box(tree: Path) -> Path:
    """The busybox tree under a machine name of this file's own."""
    named = tree.parent / "ns-sf"
    tree.rename(named)
    return named


FILE = ('[Exec]\nBoot=no\nEnvironment=FOO=bar "BAZ=two words"\n'
        'Parameters=/bin/sh -c "echo foo=$FOO baz=$BAZ; id -u; pwd; cat /proc/self/status '
        '| grep ^CapBnd; test -e /mnt/hostname && echo bound || echo not-bound"\n'
        'WorkingDirectory=/tmp\nDropCapability=CAP_CHOWN\nBogus=1\n'
        '[Files]\nBindReadOnly=/etc:/mnt\n[Foo]\nA=1\n')


@needs_nspawn
def test_untrusted_file_beside_the_tree_as_nspawn(daemon: DaemonProcess, box: Path) -> None:
    (box.parent / "ns-sf.nspawn").write_text(FILE)
    out = same_stdout(daemon, box)
    assert out.startswith("foo=bar baz=two words\n0\n/tmp\nCapBnd:") and "not-bound" in out
    ours = hostel(daemon, box)
    assert (f"{box.parent}/ns-sf.nspawn:7: Unknown key 'Bogus' in section [Exec], ignoring."
            in ours.stderr)
    assert f"{box.parent}/ns-sf.nspawn:10: Unknown section 'Foo'. Ignoring." in ours.stderr
    assert ("Ignoring TemporaryFileSystem=, Bind= and BindReadOnly= settings, file "
            f"{box.parent}/ns-sf.nspawn is not trusted.") in ours.stderr


@needs_nspawn
def test_settings_trusted_and_override_as_nspawn(daemon: DaemonProcess, box: Path) -> None:
    (box.parent / "ns-sf.nspawn").write_text(FILE)
    assert same_stdout(daemon, box, "--settings=trusted").endswith("\nbound\n")
    # the command line wins: its command, and its own --setenv replaces the file's
    assert same_stdout(daemon, box, "--setenv=FOO=cmd", "/bin/sh", "-c",
                       "echo $FOO $BAZ; pwd") == "cmd\n/tmp\n"
    assert same_stdout(daemon, box, "--settings=override", "--setenv=FOO=cmd", "/bin/sh", "-c",
                       "echo $FOO $BAZ").startswith("foo=bar baz=two words\n")
    assert same_stdout(daemon, box, "--settings=no", "/bin/sh", "-c",
                       "echo x$FOO; pwd") == "x\n/\n"


@needs_nspawn
def test_bad_boolean_is_a_warning_as_in_nspawn(daemon: DaemonProcess, box: Path) -> None:
    (box.parent / "ns-sf.nspawn").write_text("[Files]\nReadOnly=maybe\n")
    same_stdout(daemon, box, "/bin/sh", "-c", "touch /x && echo writable")
    ours, theirs = hostel(daemon, box, "/bin/true"), nspawn(box, "/bin/true")
    warning = f"{box.parent}/ns-sf.nspawn:2: Failed to parse boolean value for ReadOnly=, ignoring: maybe"
    assert warning in ours.stderr and warning in theirs.stderr


def test_trusted_directory_wins_and_may_bind(daemon: DaemonProcess, box: Path,
                                             trusted_dir: Path) -> None:
    (box.parent / "ns-sf.nspawn").write_text("[Exec]\nEnvironment=WHERE=beside\n")
    (trusted_dir / "ns-sf.nspawn").write_text(
        "[Exec]\nEnvironment=WHERE=trusted\n[Files]\nBindReadOnly=/etc:/mnt\n")
    result = hostel(daemon, box, "/bin/sh", "-c", "echo $WHERE; test -e /mnt/hostname && echo bound")
    assert (result.returncode, result.stdout) == (0, "trusted\nbound\n"), result.stderr


def test_startmachine_honours_the_file(daemon: DaemonProcess, box: Path,
                                       trusted_dir: Path, private_bus: PrivateBus) -> None:
    """Not only hostelctl: a bare StartMachine call reads it too (here: the machine's
    environment, seen through the leader's /proc/PID/environ)."""
    (trusted_dir / "ns-sf.nspawn").write_text(
        "[Exec]\nBoot=no\nEnvironment=FROMFILE=1\nParameters=/bin/sleep 30\n")
    busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
           "org.hostel1.MachineManager", "StartMachine", "sa{sv}", "ns-sf", "1",
           "Directory", "s", str(box))
    try:
        shown = busctl(private_bus, "get-property", "org.hostel1", "/org/hostel1/machine/ns_2dsf",
                       "org.hostel1.Machine", "Leader").stdout
        leader = int(shown.split()[1])
        environ = Path(f"/proc/{leader}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{leader}/cmdline").read_bytes().split(b"\0")
        assert b"FROMFILE=1" in environ and cmdline[:2] == [b"/bin/sleep", b"30"]
    finally:
        busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
               "org.hostel1.MachineManager", "KillMachine", "ssi", "ns-sf", "all", "9",
               check=False)


@pytest.mark.parametrize("make, error", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: subprocess.run(["truncate", "-s", "5M", str(p)], check=True), "more than the"),
])
def test_unusable_file_fails_the_start_naming_it(daemon: DaemonProcess, box: Path,
                                                 trusted_dir: Path, make, error: str) -> None:
    make(trusted_dir / "ns-sf.nspawn")
    result = hostel(daemon, box, "/bin/true")
    assert result.returncode != 0
    assert f"{trusted_dir}/ns-sf.nspawn" in result.stderr and error in result.stderr
    assert "Traceback" not in result.stderr and daemon.proc.poll() is None
    assert hostel(daemon, box, "--settings=no", "/bin/true").returncode == 0


@needs_nspawn
def test_252_exec_keys_from_the_file_as_nspawn(daemon: DaemonProcess, box: Path) -> None:
    """The options 252 added over the seed, set from a .nspawn file beside the tree."""
    (box.parent / "ns-sf.nspawn").write_text(
        "[Exec]\nHostname=ns-from-file\nNoNewPrivileges=yes\nLimitNOFILE=321:654\n"
        "OOMScoreAdjust=250\nCPUAffinity=0\nResolvConf=off\nTimezone=off\n"
        "SystemCallFilter=@swap\n")
    (box / "etc/resolv.conf").write_text("nameserver 10.7.7.7\n")
    out = same_stdout(daemon, box, "/bin/sh", "-c",
                      "hostname; grep NoNewPrivs /proc/self/status; ulimit -Sn; ulimit -Hn; "
                      "cat /proc/self/oom_score_adj; grep Cpus_allowed_list /proc/self/status; "
                      "cat /etc/resolv.conf; swapoff /x 2>&1 | grep -c 'No such file'")
    # 252 ignores the limits, the OOM score, the CPU set and the system calls allowed by an
    # untrusted file, and takes them with --settings=trusted
    assert out.split()[:3] == ["ns-from-file", "NoNewPrivs:", "1"]
    assert out.split()[-3:] == ["nameserver", "10.7.7.7", "0"]
    trusted = same_stdout(daemon, box, "--settings=trusted", "/bin/sh", "-c",
                          "ulimit -Sn; ulimit -Hn; cat /proc/self/oom_score_adj; "
                          "grep Cpus_allowed_list /proc/self/status; "
                          "swapoff /x 2>&1 | grep -c 'No such file'")
    assert trusted.split() == ["321", "654", "250", "Cpus_allowed_list:", "0", "1"]
    ours = hostel(daemon, box, "/bin/true")
    assert (f"Ignoring LimitNOFILE= setting, file '{box.parent}/ns-sf.nspawn' is not trusted."
            in ours.stderr)


@needs_nspawn
def test_untrusted_privileged_settings_give_nspawns_warnings(daemon: DaemonProcess,
                                                             box: Path) -> None:
    (box.parent / "ns-sf.nspawn").write_text(
        "[Exec]\nBoot=no\nParameters=/bin/true\nMachineID=0123456789abcdef0123456789abcdef\n"
        "PrivateUsers=pick\nCapability=CAP_SYS_TIME\nLinkJournal=no\nEphemeral=no\n"
        "[Files]\nOverlay=/tmp:/mnt\nPrivateUsersOwnership=chown\n[Network]\nPrivate=yes\n")
    ours, theirs = hostel(daemon, box), nspawn(box)
    assert (ours.returncode, theirs.returncode) == (0, 0)
    warnings = [line for line in theirs.stderr.splitlines() if line.startswith("Ignoring")]
    assert len(warnings) == 7
    assert sorted(warnings) == sorted(line for line in ours.stderr.splitlines()
                                      if line.startswith("Ignoring"))
