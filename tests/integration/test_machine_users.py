"""--user: resolution from the container's own files, and the switch in a real child."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine import users
from hostel.machine.users import ContainerUserError, UserIds, resolve_user
from hostel.privatebus import DaemonProcess
from hostel.spawn import Plan, spawn

PASSWD = b"""\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment, then a blank line

alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:100::/srv/bob/home/:/bin/sh
"""
GROUP = b"""\
root:x:0:
daemon:x:1:
wheel:x:10:alice,bob
users:x:100:alice
alice:x:1000:
audio:x:29:bob,alice
again:x:10:alice
"""
NS_FLAGS = native.CLONE_NEWNS | native.CLONE_NEWPID | native.CLONE_NEWUTS | native.CLONE_NEWIPC


def test_named_user_with_memberships_in_file_order() -> None:
    assert resolve_user("alice", PASSWD, GROUP) == UserIds(
        uid=1000, gid=1000, groups=(10, 100, 29), home="/home/alice", name="alice")


def test_numeric_user_is_a_uid_and_home_is_normalized() -> None:
    assert resolve_user("1001", PASSWD, GROUP) == UserIds(
        uid=1001, gid=100, groups=(10, 29), home="/srv/bob/home", name="bob")


@pytest.mark.parametrize("user", [None, "root", "0"])
def test_root_is_all_zeros_without_looking(user: str | None) -> None:
    assert resolve_user(user, b"", b"garbage") == users.ROOT
    assert users.ROOT == UserIds(0, 0, (), "/root", "root")


def test_unknown_user() -> None:
    with pytest.raises(InvalidArgs) as err:
        resolve_user("foo", PASSWD, GROUP)
    assert str(err.value) == "user 'foo' not found in the container's /etc/passwd"
    with pytest.raises(InvalidArgs, match="user '4242' not found"):
        resolve_user("4242", PASSWD, GROUP)


@pytest.mark.parametrize("user", ["", "a:b", "../x", "a\nb"])
def test_bad_user_argument(user: str) -> None:
    with pytest.raises(InvalidArgs, match="invalid user name"):
        resolve_user(user, PASSWD, GROUP)


@pytest.mark.parametrize("passwd, group, message", [
    (PASSWD + b"carol:x:1002:1002:/home/carol:/bin/sh\n", GROUP,
     r"line 7 of the container's /etc/passwd has 6 fields, not 7"),
    (PASSWD.replace(b"daemon:x:1:1", b"daemon:x:one:1"), GROUP,
     r"line 2 of the container's /etc/passwd has an invalid UID 'one'"),
    (PASSWD.replace(b"x:1000:1000", b"x:1000:4294967295"), GROUP,
     r"line 5 of the container's /etc/passwd has an invalid GID '4294967295'"),
    (PASSWD.replace(b"/home/alice", b"home/alice"), GROUP,
     r"home directory 'home/alice' on line 5 .* not an absolute path"),
    (PASSWD, GROUP + b"broken:x\n", r"line 8 of the container's /etc/group has 2 fields, not 4"),
    (PASSWD, GROUP.replace(b"audio:x:29", b"audio:x:-29"),
     r"line 6 of the container's /etc/group has an invalid GID '-29'"),
])
def test_malformed_files_name_the_line(passwd: bytes, group: bytes, message: str) -> None:
    with pytest.raises(ContainerUserError, match=message):
        resolve_user("alice", passwd, group)


def test_matches_getent_on_this_hosts_files() -> None:
    """getent (glibc NSS, files first here) is the oracle for every account of the host."""
    passwd, group = Path("/etc/passwd").read_bytes(), Path("/etc/group").read_bytes()
    for line in passwd.decode().splitlines():
        name = line.split(":")[0]
        if name == "root":
            continue  # deliberately not looked up
        pw = subprocess.run(["getent", "passwd", name], capture_output=True, text=True,
                            check=True).stdout.strip().split(":")
        init = subprocess.run(["getent", "initgroups", name], capture_output=True, text=True,
                              check=True).stdout.split()[1:]
        ids = resolve_user(name, passwd, group)
        assert (ids.uid, ids.gid, ids.home) == (int(pw[2]), int(pw[3]), os.path.normpath(pw[5]))
        assert ids.groups == tuple(int(g) for g in init), name


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A root with a static busybox, the test's user database and a locked-down /home."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.skip("busybox-static is not installed")
    root = tmp_path / "root"
    for d in ("bin", "etc", "proc", "home", "usr/sbin"):
        (root / d).mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    (root / "etc/passwd").write_bytes(PASSWD)
    (root / "etc/group").write_bytes(GROUP)
    (root / "home").chmod(0o755)  # root-owned: a user cannot create its home here alone
    return root


def run_as(root: Path, ids: UserIds, script: str) -> dict[str, str]:
    """Run `script` in new namespaces, chrooted into `root`, as `ids`; parse KEY=VALUE lines."""
    out_r, out_w = os.pipe()
    plan = Plan()
    plan.dup2(out_w, 1)
    plan.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
    plan.mount("proc", str(root / "proc"), "proc", native.MS_NOSUID | native.MS_NODEV)
    plan.chroot(str(root))
    plan.chdir("/")
    env = users.plan_change_user(plan, ids)
    plan.execve("/bin/busybox", ["sh", "-c", script], ["PATH=/bin", *env])
    child = spawn(plan, NS_FLAGS)
    os.close(out_w)
    try:
        child.wait_started()
        with os.fdopen(out_r) as out:
            text = out.read()
        assert native.pidfd_wait(child.pidfd, block=True).status == 0, text
    finally:
        child.close()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


STATUS_SCRIPT = textwrap.dedent("""\
    while read key a b c d; do
        case $key in Uid:|Gid:|Groups:|CapEff:|CapPrm:) echo "${key%:}=$a $b $c $d";; esac
    done < /proc/self/status
    echo "HOME=$HOME"; echo "USER=$USER"; echo "LOGNAME=$LOGNAME"
    echo "home_owner=$(busybox stat -c '%u:%g %a' "$HOME")"
    echo "whoami=$(busybox id -un)"
""")


def test_switch_to_a_user_in_a_real_child(tiny_root: Path) -> None:
    ids = resolve_user("alice", (tiny_root / "etc/passwd").read_bytes(),
                       (tiny_root / "etc/group").read_bytes())
    got = run_as(tiny_root, ids, STATUS_SCRIPT)
    assert got["Uid"].split() == ["1000"] * 4
    assert got["Gid"].split() == ["1000"] * 4
    assert got["Groups"].split() == ["10", "29", "100"]  # the kernel sorts them
    assert got["CapEff"].strip() == got["CapPrm"].strip() == "0000000000000000"
    assert (got["HOME"], got["USER"], got["LOGNAME"]) == ("/home/alice", "alice", "alice")
    assert got["home_owner"] == "1000:1000 755"
    assert got["whoami"] == "alice"
    st = (tiny_root / "home/alice").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_missing_parents_are_made_for_root_and_the_home_for_the_user(tiny_root: Path) -> None:
    ids = resolve_user("bob", PASSWD, GROUP)
    got = run_as(tiny_root, ids, STATUS_SCRIPT)
    assert got["home_owner"] == "1001:100 755"
    for parent in ("srv", "srv/bob"):
        st = (tiny_root / parent).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o755), parent


def test_an_existing_home_keeps_its_owner(tiny_root: Path) -> None:
    """daemon's home is /usr/sbin: switching to daemon must not give it /usr/sbin."""
    ids = resolve_user("daemon", PASSWD, GROUP)
    got = run_as(tiny_root, ids, STATUS_SCRIPT)
    assert got["Uid"].split() == ["1"] * 4
    assert got["home_owner"] == "0:0 755"


def test_root_resets_groups_and_keeps_capabilities(tiny_root: Path) -> None:
    got = run_as(tiny_root, resolve_user(None, b"", b""), STATUS_SCRIPT)
    assert got["Uid"].split() == ["0"] * 4
    assert got["Groups"].strip() == ""
    assert int(got["CapEff"], 16) != 0
    assert (got["HOME"], got["USER"]) == ("/root", "root")


def test_loginuid_is_reset_in_the_child(tmp_path: Path) -> None:
    """Run as a process with a login uid (set in a throwaway interpreter), as under sshd."""
    if not os.path.exists("/proc/self/loginuid"):
        pytest.skip("kernel without audit: no loginuid")
    probe = textwrap.dedent("""\
        import os
        from hostel.machine.users import plan_reset_loginuid
        from hostel.spawn import Plan, spawn
        from hostel import native
        with open("/proc/self/loginuid", "w") as f:
            f.write("4242")
        out_r, out_w = os.pipe()
        plan = Plan()
        plan.dup2(out_w, 1)
        plan_reset_loginuid(plan)
        plan.execve("/bin/cat", ["cat", "/proc/self/loginuid"], [])
        child = spawn(plan, native.CLONE_NEWPID | native.CLONE_NEWNS)
        os.close(out_w)
        child.wait_started()
        print(len(plan.steps), open("/proc/self/loginuid").read(), os.read(out_r, 100).decode())
        native.pidfd_wait(child.pidfd, block=True)
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "4242", "4294967295"]


def test_loginuid_step_is_skipped_when_already_unset() -> None:
    plan = Plan()
    users.plan_reset_loginuid(plan)
    if Path("/proc/self/loginuid").read_text().strip() == "4294967295":
        assert plan.steps == []
    else:
        assert [s.description for s in plan.steps] == ["write /proc/self/loginuid"]


# --private-users: root inside owns the tree ------------------------------------------

OWNERSHIP_PROBE = ("id -u; stat -c '%u %g' / /etc/passwd; touch /root/written && echo write-ok; "
                   "cat /proc/self/uid_map")


def _run_userns(hosteld: DaemonProcess, tree: Path, mode: str) -> list[str]:
    from conftest import hostelctl

    done = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), f"--private-users={mode}",
                     "/bin/sh", "-c", OWNERSHIP_PROBE)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")


@pytest.mark.parametrize("mode", ["pick", "yes"])
def test_root_inside_owns_a_root_owned_tree_through_an_idmapped_mount(
        hosteld: DaemonProcess, tree: Path, mode: str) -> None:
    """nspawn's --private-users-ownership=auto on a file system that supports idmapped
    mounts: the tree is seen as root's inside, and stays root's on disk."""
    assert os.stat(tree).st_uid == 0
    lines = _run_userns(hosteld, tree, mode)
    assert lines[:4] == ["0", "0 0", "0 0", "write-ok"], lines
    base = int(lines[4].split()[1])
    assert base >= 0x80000  # an unprivileged host range
    written = os.stat(tree / "root/written")
    assert (written.st_uid, written.st_gid) == (0, 0)  # mapped back through the mount
    assert os.stat(tree).st_uid == 0 and os.stat(tree / "etc/passwd").st_uid == 0


def test_a_file_system_without_idmapped_mounts_gets_a_recorded_chown(
        hosteld: DaemonProcess, tree: Path, tmp_path: Path) -> None:
    """ramfs cannot idmap: the tree is chowned into the range once, and the owner of its
    root records the range, which the next --private-users=pick takes again."""
    ram = tmp_path / "ram"
    ram.mkdir()
    native.mount("ramfs", str(ram), "ramfs", 0, None)
    try:
        copy = ram / "tree"
        subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
        setuid = copy / "bin/probe-setuid"
        setuid.write_bytes(b"")
        setuid.chmod(0o4755)
        first = _run_userns(hosteld, copy, "pick")
        assert first[:4] == ["0", "0 0", "0 0", "write-ok"], first
        base = int(first[4].split()[1])
        assert os.stat(copy).st_uid == base and os.stat(copy / "etc/passwd").st_gid == base
        assert os.stat(copy / "root/written").st_uid == base
        assert os.stat(setuid).st_mode & 0o7777 == 0o4755  # chown cleared it; put back
        again = _run_userns(hosteld, copy, "pick")
        assert again[:4] == first[:4] and int(again[4].split()[1]) == base
    finally:
        native.umount(str(ram), native.MNT_DETACH)


def test_root_of_a_user_namespaced_container_manages_its_own_cgroups(
        hosteld: DaemonProcess, tree: Path) -> None:
    """As nspawn delegates: in name=systemd (and cgroup2) the container's root may make
    cgroups below its own and move itself there; the device hierarchy stays closed."""
    script = ("mkdir /sys/fs/cgroup/systemd/inner && "
              "echo $$ > /sys/fs/cgroup/systemd/inner/cgroup.procs && echo delegated; "
              "grep name=systemd /proc/self/cgroup; "
              "mkdir -p /tmp/dv && mount -t cgroup -o devices none /tmp/dv && "
              "(echo a > /tmp/dv/devices.allow) 2>/dev/null && echo widened || echo devices-closed")
    from conftest import hostelctl

    done = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "--private-users=pick",
                     "/bin/sh", "-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "delegated" and lines[1].endswith(":name=systemd:/inner")
    assert lines[2] == "devices-closed"
