"""Capabilities and the seccomp filter, checked in real spawned children."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine import capabilities as caps
from hostel.machine import seccomp
from hostel.spawn import Plan, spawn


def run(plan: Plan, path: str, argv: list[str]) -> tuple[str, native.ExitInfo]:
    """Spawn `plan` + execve with stdout on a pipe; return the output and the exit."""
    out_r, out_w = os.pipe()
    plan.dup2(out_w, 1)
    plan.steps.insert(0, plan.steps.pop())  # stdout first, before anything can fail
    plan.execve(path, argv, ["PATH=/usr/bin:/bin"])
    child = spawn(plan, native.CLONE_NEWNS | native.CLONE_NEWPID)
    os.close(out_w)
    try:
        child.wait_started()
        with os.fdopen(out_r) as out:
            data = out.read()
        return data, native.pidfd_wait(child.pidfd, block=True)
    finally:
        child.close()


def host_bounding_set() -> int:
    return int(Path("/proc/self/status").read_text().split("CapBnd:")[1].split()[0], 16)


# Capabilities ------------------------------------------------------------------

def test_name_table_matches_libcap() -> None:
    """capsh (libcap) is an independent source for the number of every name."""
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("capsh (libcap2-bin) is not installed")
    top = len(caps.NAMES) - 1
    decoded = subprocess.run([capsh, f"--decode={(1 << (top + 1)) - 1:#x}"], check=True,
                             capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    assert [n.upper() for n in decoded.split(",")] == list(caps.NAMES)


def test_kernel_capabilities_all_have_names() -> None:
    assert caps.last_cap() == int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert caps.last_cap() < len(caps.NAMES), "the kernel knows capabilities this table lacks"


@pytest.mark.parametrize("spelling, number", [
    ("CAP_CHOWN", 0), ("cap_chown", 0), ("Cap_Net_Admin", 12), (" CAP_SYS_ADMIN ", 21),
    ("CAP_CHECKPOINT_RESTORE", 40), ("12", 12), ("61", 61),
])
def test_capability_names_as_systemd_accepts_them(spelling: str, number: int) -> None:
    assert caps.capability_from_name(spelling) == number


@pytest.mark.parametrize("spelling", ["CAP_FOO", "chown", "net_admin", "62", "-1", "", "CAP_"])
def test_unknown_capability_is_invalid_args(spelling: str) -> None:
    with pytest.raises(InvalidArgs) as err:
        caps.parse_capabilities([f"CAP_CHOWN,{spelling}"] if spelling else ["x"])
    assert "see capabilities(7) for names" in str(err.value)
    assert "in --capability" in str(err.value)


def test_unknown_capability_message_names_the_option() -> None:
    with pytest.raises(InvalidArgs) as err:
        caps.parse_capabilities(["CAP_FOO"], "--drop-capability")
    assert str(err.value) == ("unknown capability 'CAP_FOO' in --drop-capability; "
                              "see capabilities(7) for names")


def test_lists_and_all() -> None:
    assert caps.parse_capabilities(["CAP_NET_ADMIN,cap_sys_time", "CAP_MKNOD"]) == \
        (1 << 12) | (1 << 25) | (1 << 27)
    assert caps.parse_capabilities(["CAP_NET_ADMIN,,"]) == 1 << 12
    assert caps.parse_capabilities(["CAP_CHOWN,all"]) == caps.ALL
    assert caps.parse_capabilities([]) == 0


def test_default_set_is_nspawns() -> None:
    assert caps.format_mask(caps.DEFAULT_RETAIN) == [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
        "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_IPC_OWNER",
        "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL", "CAP_SETFCAP"]


def test_retain_rules() -> None:
    net_admin, sys_admin, sys_time = 1 << 12, 1 << 21, 1 << 25
    assert caps.compute_retain(0, 0, False) == caps.DEFAULT_RETAIN
    assert caps.compute_retain(0, 0, True) == caps.DEFAULT_RETAIN | net_admin
    assert caps.compute_retain(0, net_admin, True) == caps.DEFAULT_RETAIN  # drop wins
    assert caps.compute_retain(sys_time, sys_admin, False) == \
        (caps.DEFAULT_RETAIN | sys_time) & ~sys_admin
    assert caps.compute_retain(caps.ALL, 0, False) == caps.ALL
    assert caps.compute_retain(caps.ALL, caps.ALL, True) == 0


@given(st.integers(min_value=0, max_value=(1 << caps.CAP_LIMIT) - 1))
def test_format_and_parse_round_trip(mask: int) -> None:
    names = caps.format_mask(mask)
    assert caps.parse_capabilities([",".join(names)]) == mask
    assert len(names) == bin(mask).count("1")


def test_bounding_set_in_a_real_child() -> None:
    retain = caps.compute_retain(caps.parse_capabilities(["CAP_SYS_TIME"]),
                                 caps.parse_capabilities(["CAP_SYS_ADMIN,CAP_MKNOD"]), True)
    plan = Plan()
    plan.drop_bounding_caps(caps.bounding_drop_mask(retain))
    out, info = run(plan, "/bin/grep", ["grep", "^CapBnd:", "/proc/self/status"])
    assert info.exited and info.status == 0
    # A child can only keep what this host's bounding set still has.
    host = host_bounding_set()
    assert int(out.split()[1], 16) == retain & host
    assert ("CAP_SYS_TIME" in caps.format_mask(int(out.split()[1], 16))) == bool(host & 1 << 25)
    assert "CAP_MKNOD" not in caps.format_mask(int(out.split()[1], 16))


# Seccomp -----------------------------------------------------------------------

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/netlink.h>

static const char module_name[] = "hostel_no_such_module";
static const char no_path[] = "/hostel-no-such-swap";

static void report(const char *what, long r)
{
        if (r < 0)
                printf("%s %s\n", what, strerrorname_np(errno));
        else
                printf("%s OK\n", what);
}

/* The i386 ABI from a 64-bit process: the filter must cover it too. */
static long sys32(long nr, long a, long b, long c)
{
        long ret;
        __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c)
                          : "memory", "r8", "r9", "r10", "r11");
        return ret;
}

static void report32(const char *what, long r)
{
        if (r < 0 && r > -4096)
                printf("%s %s\n", what, strerrorname_np((int)-r));
        else
                printf("%s OK\n", what);
}

int main(void)
{
        char line[256];
        FILE *status;
        int fd;

        report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
        report("init_module", syscall(SYS_init_module, NULL, 0, ""));
        report("finit_module", syscall(SYS_finit_module, -1, "", 0));
        report("delete_module", syscall(SYS_delete_module, module_name, 0));
        report("open_by_handle_at", syscall(SYS_open_by_handle_at, -1, NULL, 0));
        report("swapoff", syscall(SYS_swapoff, no_path));
        report("swapon", syscall(SYS_swapon, no_path, 0));
        report("iopl", syscall(SYS_iopl, 0));
        report("ioperm", syscall(SYS_ioperm, 0, 0, 0));
        report("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -4, 0));
        report("add_key", syscall(SYS_add_key, "user", "hostel-probe", "x", 1, -4));
        report("bpf", syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, NULL, 0));
        report("perf_event_open", syscall(SYS_perf_event_open, NULL, -1, 0, -1, 0));
        report("clock_settime", syscall(SYS_clock_settime, 0, NULL));
        report("clone3", syscall(SYS_clone3, NULL, 0));
        fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_AUDIT);
        report("socket_audit", fd);
        fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
        report("socket_route", fd);
        report("getpid", syscall(SYS_getpid));
        report32("i386_getpid", sys32(20, 0, 0, 0));
        report32("i386_delete_module", sys32(129, (long)module_name, 0, 0));
        report32("i386_socket_audit", sys32(359, AF_NETLINK, SOCK_RAW, NETLINK_AUDIT));
        status = fopen("/proc/self/status", "r");
        while (status && fgets(line, sizeof(line), status))
                if (strncmp(line, "Seccomp:", 8) == 0)
                        printf("Seccomp %s", line + 8 + strspn(line + 8, " \t"));
        return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    src = tmp_path_factory.mktemp("seccomp") / "probe.c"
    src.write_text(PROBE_C)
    exe = src.with_suffix("")
    subprocess.run([gcc, "-O1", "-no-pie", "-o", str(exe), str(src)], check=True)
    return str(exe)


def results(probe: str, bpf: bytes | None) -> dict[str, str]:
    plan = Plan()
    if bpf is not None:
        plan.seccomp(bpf)
    out, info = run(plan, probe, ["probe"])
    assert info.exited and info.status == 0, out
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_filter_is_built_once_and_is_a_sock_filter_array() -> None:
    program = seccomp.container_filter()
    assert program is seccomp.container_filter()
    assert program and len(program) % 8 == 0


def test_syscall_groups_are_systemd_252s() -> None:
    """The installed systemd-analyze (252) is the oracle for every group the filter uses."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    listing = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True,
                             text=True, check=True).stdout
    raw: dict[str, list[str]] = {}
    current = ""
    for line in listing.splitlines():
        if line.startswith("@"):
            current = line.strip()
            raw[current] = []
        elif current and (word := line.split("#")[0].strip()):
            raw[current].append(word)

    def expand(group: str) -> set[str]:
        out: set[str] = set()
        for item in raw[group]:
            out |= expand(item) if item.startswith("@") else {item}
        return out

    for group, names in seccomp.GROUPS.items():
        assert names == expand(group), group


def test_capabilities_open_their_calls() -> None:
    """nspawn allows @clock, ptrace, reboot, ... only with the capability retained."""
    default = seccomp.refused_syscalls(caps.DEFAULT_RETAIN)
    assert {"clock_settime", "init_module", "mlock", "syslog", "acct"} <= default
    assert "ptrace" not in default  # CAP_SYS_PTRACE is kept by default
    assert "reboot" not in default  # CAP_SYS_BOOT is kept by default, as in nspawn
    more = caps.DEFAULT_RETAIN | caps.mask_of("CAP_SYS_TIME", "CAP_IPC_LOCK")
    opened = default - seccomp.refused_syscalls(more)
    assert {"clock_settime", "settimeofday", "adjtimex", "mlock", "mlockall"} <= opened
    assert seccomp.container_filter(more) != seccomp.container_filter()


def test_filter_blocks_what_nspawn_blocks_in_a_real_child(probe: str) -> None:
    unfiltered = results(probe, None)
    filtered = results(probe, seccomp.container_filter())
    assert unfiltered["Seccomp"] == "0" and filtered["Seccomp"] == "2"
    refused = seccomp.refused_syscalls(caps.DEFAULT_RETAIN)
    probed = [name for name in unfiltered if name in refused]
    assert {"keyctl", "add_key", "bpf", "perf_event_open", "kexec_load", "init_module",
            "open_by_handle_at", "swapon", "clock_settime"} <= set(probed)
    for name in probed:
        # Without the filter the kernel answers something else (ENOSYS, ENOENT,
        # EBADF, success): EPERM below can only come from the filter.
        assert unfiltered[name] != "EPERM", (name, unfiltered[name])
        assert filtered[name] == "EPERM", name
    assert unfiltered["socket_audit"] == "OK"
    assert filtered["socket_audit"] == "EAFNOSUPPORT"
    assert filtered["socket_route"] == "OK"  # only audit netlink is refused
    assert filtered["getpid"] == "OK"
    # Allowed calls reach the kernel: clone3 with no arguments is its own EINVAL.
    assert unfiltered["clone3"] == filtered["clone3"] == "EINVAL"


def test_filter_covers_the_i386_abi(probe: str) -> None:
    unfiltered = results(probe, None)
    if unfiltered["i386_getpid"] == "ENOSYS":
        pytest.skip("this kernel has no IA-32 emulation")
    filtered = results(probe, seccomp.container_filter())
    assert filtered["i386_getpid"] == "OK"
    assert unfiltered["i386_delete_module"] != "EPERM"
    assert filtered["i386_delete_module"] == "EPERM"
    assert unfiltered["i386_socket_audit"] == "OK"
    assert filtered["i386_socket_audit"] == "EAFNOSUPPORT"


def test_no_new_privs_is_not_forced() -> None:
    plan = Plan()
    plan.seccomp(seccomp.container_filter())
    out, _ = run(plan, "/bin/grep", ["grep", "^NoNewPrivs:", "/proc/self/status"])
    assert out.split() == ["NoNewPrivs:", "0"]


def test_default_bounding_set_matches_systemd_nspawn(tmp_path: Path) -> None:
    """The installed systemd-nspawn is an oracle for the default set (both are clipped
    by this host's own bounding set). Its /run state goes to a private tmpfs."""
    nspawn = shutil.which("systemd-nspawn")
    if nspawn is None:
        pytest.skip("systemd-nspawn (systemd-container) is not installed")
    root = tmp_path / "root"
    for d in ("bin", "etc", "usr/lib"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    (root / "etc/os-release").write_text("ID=hostel-test\n")
    script = ("mount --make-rprivate / && mount -t tmpfs tmpfs /run && "
              f"{nspawn} -q --register=no --keep-unit -D {root} "
              "/bin/busybox grep ^CapBnd: /proc/self/status")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[1], 16) == caps.DEFAULT_RETAIN & host_bounding_set()


# The cgroup v2 device program ----------------------------------------------------

def test_device_rules_parse_as_devices_allow_lines() -> None:
    from hostel.machine import bpf_devices as bpf

    assert bpf.DeviceRule.parse("c 1:3 rwm") == bpf.DeviceRule(bpf.DEV_CHAR, 1, 3, 7)
    assert bpf.DeviceRule.parse("c 136:* rw") == bpf.DeviceRule(bpf.DEV_CHAR, 136, None, 6)
    assert bpf.DeviceRule.parse("b *:* m") == bpf.DeviceRule(bpf.DEV_BLOCK, None, None, 1)


def test_device_program_passes_the_kernel_verifier() -> None:
    """Every rule shape (exact, any minor, any device) and the empty list load."""
    from hostel.machine import bpf_devices as bpf

    rules = [bpf.DeviceRule.parse(line) for line in ("c 1:3 rwm", "c 136:* rw", "b *:* m")]
    for chosen in ([], rules[:1], rules):
        os.close(bpf.load(chosen))
    # 6 loads, then per rule: its tests and a 2-instruction return; 2 to refuse at the end.
    assert len(bpf.program(rules)) // 8 == 6 + (3 + 1 + 2) + (2 + 1 + 2) + (1 + 1 + 2) + 2
