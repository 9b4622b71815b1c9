"""Small decisions hostel takes as systemd-nspawn 252 takes them, checked without a container
(test_machine_nspawn_compare proves the result side by side with 252)."""
from __future__ import annotations

from pathlib import Path

import pytest

from hostel import native
from hostel._native import lib
from hostel.machine import capabilities as caps
from hostel.machine import mounts, rootfs
from hostel.machine.settings import MachineSettings
from hostel.spawn import Plan


def _library(tree: Path, directory: str, version: str) -> None:
    where = tree / directory.lstrip("/")
    where.mkdir(parents=True, exist_ok=True)
    (where / f"libsystemd-shared-{version}.so").write_bytes(b"")


@pytest.mark.parametrize("directory", ["/usr/lib/systemd", "/usr/lib/x86_64-linux-gnu/systemd",
                                       "/usr/lib64/systemd", "/lib/systemd"])
def test_the_trees_systemd_version_is_read_from_its_shared_library(tmp_path: Path,
                                                                   directory: str) -> None:
    _library(tmp_path, directory, "252")
    assert rootfs.systemd_version_at_least(str(tmp_path), 233)
    assert not rootfs.systemd_version_at_least(str(tmp_path), 253)


def test_an_old_or_absent_systemd_is_not_new_enough(tmp_path: Path) -> None:
    assert not rootfs.systemd_version_at_least(str(tmp_path), 233)
    _library(tmp_path, "/usr/lib/systemd", "232")
    assert not rootfs.systemd_version_at_least(str(tmp_path), 233)


def test_the_version_is_looked_up_inside_the_tree(tmp_path: Path) -> None:
    """An absolute /lib link ends at the tree's root, never at the host's (whose systemd is
    252 here): a merged tree is read through its own /usr/lib."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "lib").symlink_to("/usr/lib")
    assert not rootfs.systemd_version_at_least(str(tree), 233)
    _library(tree, "/usr/lib/systemd", "240")
    assert rootfs.systemd_version_at_least(str(tree), 233)


def test_no_privileged_ports_in_a_user_namespace_on_the_hosts_network() -> None:
    bind = caps.mask_of("CAP_NET_BIND_SERVICE")
    assert caps.compute_retain(0, 0, False, private_users=True) & bind == 0
    assert caps.compute_retain(bind, 0, False, private_users=True) & bind == 0  # even if asked
    assert caps.compute_retain(0, 0, True, private_users=True) & bind
    assert caps.compute_retain(0, 0, False) & bind


def _mounts(private_network: bool) -> list[tuple[str | None, str, int]]:
    return [(m.what, m.where, m.flags) for m in mounts.api_mounts(private_network)]


def test_proc_sys_net_is_writable_only_with_a_network_of_its_own() -> None:
    remount_ro = native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY
    shared = _mounts(False)
    assert not any(where == "/proc/sys/net" for _, where, _ in shared)
    own = _mounts(True)
    net = [i for i, (_, where, _) in enumerate(own) if where == "/proc/sys/net"]
    read_only = [i for i, (what, where, flags) in enumerate(own)
                 if where == "/proc/sys" and what is None and flags & remount_ro == remount_ro]
    assert len(net) == 4 and len(read_only) == 1
    assert all(not own[i][2] & native.MS_RDONLY for i in net)
    bind_proc_sys = next(i for i, (what, where, _) in enumerate(own) if what == "/proc/sys")
    assert net[1] < bind_proc_sys < net[2] < read_only[0]  # one under the bind, one on it


def test_sys_is_a_read_only_tmpfs_with_sysfs_pieces_with_a_network_of_its_own(
        tmp_path: Path) -> None:
    assert ("sysfs", "/sys") in [(what, where) for what, where, _ in _mounts(False)]
    settings = MachineSettings("parity", directory=str(tmp_path), private_network=True)
    plan = Plan()
    mounts.plan_api_filesystems(plan, "/tree", settings, str(tmp_path))
    steps = [(s.arg2 or s.arg, s.path, s.num) for s in plan.steps if s.kind == lib.HOSTEL_OP_MOUNT]
    staging = f"{tmp_path}/sysfs"
    assert ("tmpfs", "/tree/sys", mounts.API_FLAGS) in steps
    assert ("sysfs", staging, mounts.API_FLAGS | native.MS_RDONLY) in steps
    for name in mounts.SYSFS_SUBTREES:
        assert (f"{staging}/{name}", f"/tree/sys/{name}", native.MS_BIND) in steps
    assert [s.path for s in plan.steps if s.kind == lib.HOSTEL_OP_UMOUNT] == [staging]
    last_sys = max(i for i, (_, path, _) in enumerate(steps) if path == "/tree/sys")
    assert steps[last_sys][2] & native.MS_REMOUNT and steps[last_sys][2] & native.MS_RDONLY
