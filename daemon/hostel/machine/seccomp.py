"""The container's seccomp filter, built once in the daemon and loaded by the trampoline.

libseccomp compiles the rules to classic BPF here, in the parent; the child only
hands the bytes to prctl(PR_SET_SECCOMP) (Plan.seccomp). The filter is a small
blacklist on top of the capability bounding set: calls that reach the host
kernel as a whole (modules, kexec, port I/O, swap, handle-based opens that
bypass the container's mount tree) fail with EPERM, and audit netlink sockets
fail with EAFNOSUPPORT, which audit userspace takes to mean "no audit in this
kernel" -- audit does not work in containers, and this keeps it quiet.

No no_new_privs is set: the trampoline loads the filter while it still holds
CAP_SYS_ADMIN, so setuid binaries in the container keep working."""
from __future__ import annotations

import errno
import functools
import os
import socket

from hostel.bus import HostelError

try:
    import seccomp as _libseccomp
except ImportError:  # the Debian binding is missing: the PyPI build has the same API
    import pyseccomp as _libseccomp

# Syscalls a container gets EPERM for; names unknown to libseccomp are skipped.
BLOCKED_SYSCALLS: tuple[str, ...] = (
    "kexec_load", "open_by_handle_at", "init_module", "finit_module", "delete_module",
    "iopl", "ioperm", "swapon", "swapoff",
)

NETLINK_AUDIT = 9

_ARCH = _libseccomp.Arch
_UINT32 = 0xFFFFFFFF

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


def _build() -> "_libseccomp.SyscallFilter":
    native = _libseccomp.system_arch() & _UINT32
    flt = _libseccomp.SyscallFilter(defaction=_libseccomp.ALLOW)
    for arch in _SECONDARY_ARCHES.get(native, ()):
        try:
            flt.add_arch(arch)
        except RuntimeError as exc:
            raise SeccompError(f"adding architecture {arch} to the container seccomp filter: {exc}") from exc
    for name in BLOCKED_SYSCALLS:
        if _libseccomp.resolve_syscall(_ARCH.NATIVE, name) >= 0:
            _add_rule(flt, errno.EPERM, name)
    _add_rule(flt, errno.EAFNOSUPPORT, "socket",
              _libseccomp.Arg(0, _libseccomp.EQ, socket.AF_NETLINK),
              _libseccomp.Arg(2, _libseccomp.EQ, NETLINK_AUDIT))
    return flt


def _add_rule(flt: "_libseccomp.SyscallFilter", err: int, syscall: str,
              *args: "_libseccomp.Arg") -> None:
    try:
        flt.add_rule(_libseccomp.ERRNO(err), syscall, *args)
    except (RuntimeError, ValueError) as exc:
        raise SeccompError(f"adding the {syscall} rule to the container seccomp filter: {exc}") from exc


@functools.cache
def container_filter() -> bytes:
    """The container filter as classic BPF (struct sock_filter array), built on first use.

    It depends on nothing but the host architecture, so every container start
    after the first reuses the same bytes."""
    flt = _build()
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
    return program
