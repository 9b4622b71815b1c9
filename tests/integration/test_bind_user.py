"""--bind-user=NAME side by side with systemd-nspawn 252, over hostelctl run, StartMachine
and .nspawn files ([Files] BindUser=).

The host users are made for this module (useradd, removed with their homes at the
end). Both programs run on copies of one tree with -U; what the payload sees must be
the same: the namespace's maps (less each program's own uid base), the bound home at
/run/host/home/NAME with its owners, and the userdb records in /run/host/userdb, byte
for byte; and a file the container gives to the user is the user's on the host."""
from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import busctl
from integration.nspawn_pair import hostel, needs_nspawn, nspawn

USERS = ("hbinduser1", "hbinduser2")
PROBE = ("cat /proc/self/uid_map /proc/self/gid_map; echo ==; "
         "ls -lna /run/host/home/$0 | awk 'NR > 1 {print $1, $3, $4, $NF}'; echo ==; "
         "cat /run/host/home/$0/note; echo ==; "
         "cd /run/host/userdb && for f in *; do "
         "if [ -L $f ]; then echo $f '->' $(readlink $f); "
         "else stat -c '%n %a %u %g' $f; cat $f; fi; done")


@pytest.fixture(scope="module")
def host_users() -> Iterator[list[pwd.struct_passwd]]:
    """Two host users with homes holding a file of theirs."""
    made = []
    try:
        for name in USERS:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True,
                           capture_output=True)
            made.append(name)
            entry = pwd.getpwnam(name)
            note = Path(entry.pw_dir) / "note"
            note.write_text(f"I am {name}\n")
            os.chown(note, entry.pw_uid, entry.pw_gid)
        yield [pwd.getpwnam(name) for name in USERS]
    finally:
        for name in made:
            subprocess.run(["userdel", "-r", name], capture_output=True)


@pytest.fixture
def twins(tree: Path) -> tuple[Path, Path]:
    """Two copies of the tree: hostel's and nspawn's (idmapped by both, never changed)."""
    named = tree.parent / "bind-user"
    tree.rename(named)
    twin = tree.parent / "bind-user-twin"
    subprocess.run(["cp", "-a", str(named), str(twin)], check=True)
    return named, twin


def normalized(out: str, host_ids: set[int]) -> str:
    """The probe's output with the namespace's base taken out of its map lines (each
    program picks its own): 'INSIDE OUTSIDE COUNT' becomes 'INSIDE base+INSIDE COUNT'
    unless OUTSIDE is a bound user's host id."""
    def line(match: re.Match[str]) -> str:
        inside, outside, count = (int(g) for g in match.groups())
        return f"{inside} {outside if outside in host_ids else 'base+' + str(inside)} {count}"
    return re.sub(r"^\s*(\d+)\s+(\d+)\s+(\d+)$", line, out, flags=re.M)


def _compare(daemon: DaemonProcess, twins: tuple[Path, Path], users: list[pwd.struct_passwd],
             *args: str) -> str:
    ours = hostel(daemon, twins[0], "-M", "bind-user", *args, "/bin/sh", "-c", PROBE,
                  users[0].pw_name)
    theirs = nspawn(twins[1], "-M", "bind-user", *args, "/bin/sh", "-c", PROBE,
                    users[0].pw_name)
    assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
    ids = {u.pw_uid for u in users} | {u.pw_gid for u in users}
    assert normalized(ours.stdout, ids) == normalized(theirs.stdout, ids)
    return normalized(ours.stdout, ids)


@needs_nspawn
def test_a_bound_user_is_seen_as_nspawn_shows_it(hosteld: DaemonProcess, twins: tuple[Path, Path],
                                                 host_users: list[pwd.struct_passwd]) -> None:
    user = host_users[0]
    seen = _compare(hosteld, twins, host_users[:1], "-U", f"--bind-user={user.pw_name}")
    maps, home, note, userdb = seen.split("==\n")
    assert maps == (f"0 base+0 60514\n60514 {user.pw_uid} 1\n60515 base+60515 5021\n"
                    f"0 base+0 60514\n60514 {user.pw_gid} 1\n60515 base+60515 5021\n")
    assert "-rw-r--r-- 60514 60514 note" in home
    assert note == f"I am {user.pw_name}\n"
    assert (f'{user.pw_name}.user 644 0 0\n{{"userName":"{user.pw_name}","uid":60514,'
            f'"gid":60514,"homeDirectory":"/run/host/home/{user.pw_name}",'
            '"service":"io.systemd.NSpawn"}') in userdb
    assert f"60514.user -> {user.pw_name}.user" in userdb
    assert f"{user.pw_name}.user-privileged 600 0 0" in userdb


@needs_nspawn
def test_two_users_get_the_next_uids_and_repeats_are_dropped(
        hosteld: DaemonProcess, twins: tuple[Path, Path],
        host_users: list[pwd.struct_passwd]) -> None:
    first, second = host_users
    seen = _compare(hosteld, twins, host_users, "-U", f"--bind-user={first.pw_name}",
                    f"--bind-user={second.pw_name}", f"--bind-user={first.pw_name}")
    assert f"60514 {first.pw_uid} 1\n60515 {second.pw_uid} 1\n60516 base+60516 5020\n" in seen
    assert f"60515.user -> {second.pw_name}.user" in seen


@needs_nspawn
def test_a_file_given_to_the_user_inside_is_the_users_on_the_host(
        hosteld: DaemonProcess, twins: tuple[Path, Path],
        host_users: list[pwd.struct_passwd]) -> None:
    user = host_users[0]
    for run, tree, name in ((hostel, twins[0], "by-hostel"), (nspawn, twins[1], "by-nspawn")):
        target = f"/run/host/home/{user.pw_name}/{name}"
        args = ("-U", f"--bind-user={user.pw_name}", "/bin/sh", "-c",
                f"touch {target} && chown 60514:60514 {target}")
        done = run(hosteld, tree, *args) if run is hostel else run(tree, *args)
        assert done.returncode == 0, done.stderr
        st = os.stat(Path(user.pw_dir) / name)
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)


@needs_nspawn
@pytest.mark.parametrize("args, message", [
    (("--bind-user=hbinduser1",), "--bind-user= requires --private-users"),
    (("-U", "--bind-user=hbindnosuch"), "Failed to resolve user 'hbindnosuch': No such process"),
    (("-U", "--bind-user=root"), "Mapping 'root' user not supported, sorry."),
    (("-U", "--bind-user=nobody"), "Mapping 'nobody' user not supported, sorry."),
])
def test_refusals_as_nspawn(hosteld: DaemonProcess, twins: tuple[Path, Path],
                            host_users: list[pwd.struct_passwd], args: tuple[str, ...],
                            message: str) -> None:
    ours = hostel(hosteld, twins[0], *args, "/bin/true")
    theirs = nspawn(twins[1], *args, "/bin/true")
    assert ours.returncode != 0 and theirs.returncode != 0
    assert message in theirs.stderr
    assert message in ours.stderr and "Traceback" not in ours.stderr


def test_a_name_the_container_has_is_refused(hosteld: DaemonProcess, twins: tuple[Path, Path],
                                             host_users: list[pwd.struct_passwd]) -> None:
    with open(twins[0] / "etc/passwd", "a") as f:
        f.write("hbinduser1:x:2000:2000::/home/x:/bin/sh\n")
    ours = hostel(hosteld, twins[0], "-U", "--bind-user=hbinduser1", "/bin/true")
    assert ours.returncode != 0
    assert "Sorry, specified user 'hbinduser1' already exists in the container." in ours.stderr


# StartMachine and .nspawn files ---------------------------------------------------------

@pytest.fixture
def daemon(trusted_hosteld: DaemonProcess) -> DaemonProcess:
    return trusted_hosteld


def test_startmachine_binds_the_user(daemon: DaemonProcess, twins: tuple[Path, Path],
                                     host_users: list[pwd.struct_passwd],
                                     private_bus: PrivateBus) -> None:
    user = host_users[0]
    busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
           "org.hostel1.MachineManager", "StartMachine", "sa{sv}", "bind-user", "4",
           "Directory", "s", str(twins[0]), "PrivateUsers", "s", "pick",
           "BindUser", "as", "1", user.pw_name, "Command", "as", "2", "/bin/sleep", "30")
    try:
        shown = busctl(private_bus, "get-property", "org.hostel1",
                       "/org/hostel1/machine/bind_2duser", "org.hostel1.Machine", "Leader").stdout
        leader = int(shown.split()[1])
        uid_map = Path(f"/proc/{leader}/uid_map").read_text().split("\n")
        assert uid_map[1].split() == ["60514", str(user.pw_uid), "1"]
        record = Path(f"/proc/{leader}/root/run/host/userdb/{user.pw_name}.user").read_text()
        assert f'"userName":"{user.pw_name}","uid":60514' in record
        assert Path(f"/proc/{leader}/root/run/host/home/{user.pw_name}/note").read_text() \
            == f"I am {user.pw_name}\n"
    finally:
        busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
               "org.hostel1.MachineManager", "KillMachine", "ssi", "bind-user", "all", "9",
               check=False)


@needs_nspawn
def test_a_trusted_file_binds_and_an_untrusted_one_is_ignored_as_by_nspawn(
        daemon: DaemonProcess, twins: tuple[Path, Path], host_users: list[pwd.struct_passwd],
        trusted_dir: Path) -> None:
    user = host_users[0]
    listing = ("/bin/sh", "-c", "ls /run/host/userdb 2>&1")
    setting = f"[Files]\nBindUser={user.pw_name}\n"
    (trusted_dir / "bind-user.nspawn").write_text(setting)
    done = hostel(daemon, twins[0], "-U", *listing)
    assert done.returncode == 0 and f"{user.pw_name}.user" in done.stdout, done.stderr
    (trusted_dir / "bind-user.nspawn").unlink()
    for tree in twins:  # untrusted: next to each tree, named after the machine
        (tree.parent / f"{tree.name}.nspawn").write_text(setting)
    ours = hostel(daemon, twins[0], "-U", *listing)
    theirs = nspawn(twins[1], "-U", *listing)
    for done, tree in ((ours, twins[0]), (theirs, twins[1])):
        assert "No such file or directory" in done.stdout
        assert (f"Ignoring bind user setting, file {tree.parent}/{tree.name}.nspawn "
                "is not trusted.") in done.stderr


def test_user_runs_the_payload_as_the_bound_user(hosteld: DaemonProcess,
                                                 twins: tuple[Path, Path],
                                                 host_users: list[pwd.struct_passwd]) -> None:
    """--user=NAME finds a bound user as nss-systemd finds its record after /etc/passwd:
    the payload runs as 60514 in the bound home, and what it writes there is the user's."""
    user = host_users[0]
    done = hostel(hosteld, twins[0], "-U", f"--bind-user={user.pw_name}", f"--user={user.pw_name}",
                  "/bin/sh", "-c", 'id -u; id -g; echo $HOME $USER; echo hi > "$HOME/written"')
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["60514", "60514",
                                           f"/run/host/home/{user.pw_name} {user.pw_name}"]
    st = os.stat(Path(user.pw_dir) / "written")
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
