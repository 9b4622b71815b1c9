"""The container's seccomp filter: systemd-nspawn 252's allow-list, built in the daemon.

libseccomp compiles the rules to classic BPF here, in the parent; the child only
hands the bytes to prctl(PR_SET_SECCOMP) (Plan.seccomp). As in nspawn 252, the
filter is an allow-list: the system call groups a container needs (ALLOWED_GROUPS,
taken from systemd 252's own group definitions in syscall_groups.py) and a few
single calls, plus the groups and calls that only make sense with a capability
the container keeps (CAPABILITY_GATED: the clock with CAP_SYS_TIME, ptrace with
CAP_SYS_PTRACE, ...). Every other call systemd knows by name fails with EPERM --
among them the keyring (not namespaced), bpf, perf_event_open, kexec,
open_by_handle_at, quotactl, fanotify and swap; calls newer than that list fail
with ENOSYS, so libc falls back to an older call as it would on an older kernel.
Audit netlink sockets fail with EAFNOSUPPORT, which audit userspace takes to mean
"no audit in this kernel" -- audit does not work in containers.
--system-call-filter adds calls and groups to the list, and its "~" lists take
calls away (EPERM), winning over any addition, as in 252.

No no_new_privs is set: the trampoline loads the filter while it still holds
CAP_SYS_ADMIN, so setuid binaries in the container keep working."""
from __future__ import annotations

import errno
import functools
import os
import socket

from hostel.bus import HostelError
from hostel.machine import capabilities
from hostel.machine.syscall_groups import GROUPS

try:
    import seccomp as _libseccomp
except ImportError:  # the Debian binding is missing: the PyPI build has the same API
    import pyseccomp as _libseccomp

# nspawn 252's unconditional allow-list (src/nspawn/nspawn-seccomp.c).
ALLOWED_GROUPS: tuple[str, ...] = (
    "@aio", "@basic-io", "@chown", "@default", "@file-system", "@io-event", "@ipc",
    "@mount", "@network-io", "@process", "@resources", "@setuid", "@signal", "@sync",
    "@timer",
)
ALLOWED_SYSCALLS: frozenset[str] = frozenset("""
    arm_fadvise64_64 brk capget capset copy_file_range fadvise64 fadvise64_64 flock
    get_mempolicy getcpu getpriority getrandom ioctl ioprio_get kcmp madvise mincore
    mprotect mremap name_to_handle_at oldolduname olduname personality readahead readdir
    remap_file_pages sched_get_priority_max sched_get_priority_min sched_getaffinity
    sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
    sched_rr_get_interval_time64 sched_yield sendfile sendfile64 setdomainname setfsgid
    setfsgid32 setfsuid setfsuid32 sethostname setpgid setsid splice sysinfo tee umask
    uname userfaultfd vmsplice
""".split())
# Allowed only while the container keeps the capability that makes them useful.
CAPABILITY_GATED: tuple[tuple[str, str], ...] = (
    ("CAP_SYS_TIME", "@clock"), ("CAP_SYS_MODULE", "@module"), ("CAP_SYS_RAWIO", "@raw-io"),
    ("CAP_IPC_LOCK", "@memlock"), ("CAP_SYS_PACCT", "acct"),
    ("CAP_SYS_PTRACE", "process_vm_readv"), ("CAP_SYS_PTRACE", "process_vm_writev"),
    ("CAP_SYS_PTRACE", "ptrace"), ("CAP_SYS_BOOT", "reboot"), ("CAP_SYSLOG", "syslog"),
    ("CAP_SYS_TTY_CONFIG", "vhangup"),
)

NETLINK_AUDIT = 9

_ARCH = _libseccomp.Arch
_UINT32 = 0xFFFFFFFF
_UNKNOWN_TO_LIBSECCOMP = -1  # resolve_syscall()'s answer; other negatives are pseudo-numbers

# The other ABIs a process on each native architecture can use (int 0x80, x32
# system calls): without them a 32-bit binary in the container would bypass
# the filter.
_SECONDARY_ARCHES = {
    _ARCH.X86_64 & _UINT32: (_ARCH.X86, _ARCH.X32),
    _ARCH.X86 & _UINT32: (_ARCH.X86_64, _ARCH.X32),
    _ARCH.X32 & _UINT32: (_ARCH.X86, _ARCH.X86_64),
}


class SeccompError(HostelError):
    """libseccomp could not build the container filter."""


def _names(item: str) -> frozenset[str]:
    return GROUPS[item] if item.startswith("@") else frozenset((item,))


def expand(items: frozenset[str]) -> frozenset[str]:
    """System call names and @groups (--system-call-filter's words) as names."""
    return frozenset(name for item in items for name in _names(item))


def check_filter_item(item: str) -> None:
    """A --system-call-filter word must name a group systemd 252 has or a call libseccomp
    knows: a typo would otherwise silently leave the call as it was."""
    if item.startswith("@"):
        if item not in GROUPS:
            raise HostelError(f"Unknown system call group: {item} (known: "
                              f"{', '.join(sorted(GROUPS))})")
    elif _libseccomp.resolve_syscall(_ARCH.NATIVE, item) == _UNKNOWN_TO_LIBSECCOMP:
        raise HostelError(f"Unknown system call: {item}")


def allowed_syscalls(retain: int, allow: frozenset[str] = frozenset(),
                     deny: frozenset[str] = frozenset()) -> frozenset[str]:
    """The calls a container with bounding set `retain` may make, by name: nspawn's list
    and --system-call-filter's additions, less its ~denials (they win, as in 252)."""
    allowed = set(ALLOWED_SYSCALLS) | expand(allow)
    for group in ALLOWED_GROUPS:
        allowed |= GROUPS[group]
    for cap, item in CAPABILITY_GATED:
        if retain & capabilities.mask_of(cap):
            allowed |= _names(item)
    return frozenset(allowed - expand(deny))


def refused_syscalls(retain: int) -> frozenset[str]:
    """The known calls that fail with EPERM for a container with bounding set `retain`."""
    return GROUPS["@known"] - allowed_syscalls(retain)


def _build(retain: int, allow: frozenset[str], deny: frozenset[str]) -> "_libseccomp.SyscallFilter":
    native = _libseccomp.system_arch() & _UINT32
    flt = _libseccomp.SyscallFilter(defaction=_libseccomp.ERRNO(errno.ENOSYS))
    for arch in _SECONDARY_ARCHES.get(native, ()):
        try:
            flt.add_arch(arch)
        except RuntimeError as exc:
            raise SeccompError(f"adding architecture {arch} to the container seccomp filter: {exc}") from exc
    # A binary tree of syscall numbers, as nspawn asks for: ~10 jumps per call
    # instead of a linear walk through a list this long.
    flt.set_attr(_libseccomp.Attr.CTL_OPTIMIZE, 2)
    allowed = allowed_syscalls(retain, allow, deny)
    for name in sorted((GROUPS["@known"] | allowed | expand(deny)) - {"socket"}):
        if _libseccomp.resolve_syscall(_ARCH.NATIVE, name) == _UNKNOWN_TO_LIBSECCOMP:
            continue  # another architecture's call this libseccomp has never heard of
        _add_rule(flt, _libseccomp.ALLOW if name in allowed else _libseccomp.ERRNO(errno.EPERM),
                  name)
    if "socket" in expand(deny):
        _add_rule(flt, _libseccomp.ERRNO(errno.EPERM), "socket")
    else:
        _add_socket_rules(flt)
    return flt


def _add_socket_rules(flt: "_libseccomp.SyscallFilter") -> None:
    """socket() is allowed except for audit netlink. An unconditional allow would win
    over the audit rule in libseccomp, so the allowed cases are spelled out."""
    arg = _libseccomp.Arg
    _add_rule(flt, _libseccomp.ALLOW, "socket", arg(0, _libseccomp.NE, socket.AF_NETLINK))
    _add_rule(flt, _libseccomp.ALLOW, "socket", arg(0, _libseccomp.EQ, socket.AF_NETLINK),
              arg(2, _libseccomp.NE, NETLINK_AUDIT))
    _add_rule(flt, _libseccomp.ERRNO(errno.EAFNOSUPPORT), "socket",
              arg(0, _libseccomp.EQ, socket.AF_NETLINK), arg(2, _libseccomp.EQ, NETLINK_AUDIT))


def _add_rule(flt: "_libseccomp.SyscallFilter", action: int, syscall: str,
              *args: "_libseccomp.Arg") -> None:
    try:
        flt.add_rule(action, syscall, *args)
    except (RuntimeError, ValueError) as exc:
        raise SeccompError(f"adding the {syscall} rule to the container seccomp filter: {exc}") from exc


@functools.cache
def container_filter(retain: int = capabilities.DEFAULT_RETAIN,
                     allow: frozenset[str] = frozenset(),
                     deny: frozenset[str] = frozenset()) -> bytes:
    """The filter for a container with bounding set `retain` and --system-call-filter's
    `allow` and `deny` words, as classic BPF (a struct sock_filter array), built on first use.

    It depends on nothing but the host architecture and these arguments, so every
    start with the same ones reuses the same bytes."""
    flt = _build(retain, allow, deny)
    fd = os.memfd_create("hostel-seccomp", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as out:
        try:
            flt.export_bpf(out)
        except RuntimeError as exc:
            raise SeccompError(f"exporting the container seccomp filter as BPF: {exc}") from exc
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise SeccompError(f"libseccomp exported {len(program)} bytes, not a sock_filter array; "
                           "check the python3-seccomp installation")
    if len(program) // 8 > 4096:  # BPF_MAXINSNS: the kernel would refuse it with EINVAL
        raise SeccompError(f"the container seccomp filter has {len(program) // 8} instructions, "
                           "more than the kernel's 4096")
    return program
