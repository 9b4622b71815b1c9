"""Device access on cgroup v2: a BPF_PROG_TYPE_CGROUP_DEVICE program per container scope.

cgroup v2 has no devices.allow; the kernel instead runs the programs attached
to a cgroup (and its ancestors) at every open() and mknod() of a device node
by a process inside it, and refuses the access unless each returns 1. hosteld
translates the same allow list it writes to a v1 devices hierarchy into such a
program and attaches it to the container's scope without BPF_F_ALLOW_OVERRIDE
or BPF_F_ALLOW_MULTI: the container's processes live in a cgroup below the
scope, and the kernel then lets no program be attached there, so nothing
inside can loosen the rules (nor can it detach ours: the scope is outside its
cgroup namespace, and bpf() is outside its seccomp filter).

The attachment holds the program: hosteld closes its descriptor at once, and
a scope adopted after a restart keeps its policy. Attaching again to the same
scope replaces the program (how more devices are allowed later).

bpf() is called through libc's syscall(); its number comes from libseccomp,
which knows it for every architecture."""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable

from hostel.bus import HostelError

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6           # the attach type

# struct bpf_cgroup_dev_ctx: access_type = (access << 16) | type; major; minor
DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
_ACCESS_BITS = {"m": ACC_MKNOD, "r": ACC_READ, "w": ACC_WRITE}

_LOG_SIZE = 1 << 16


class BpfError(HostelError):
    """The kernel refused to load or attach a device program."""


@dataclass(frozen=True)
class DeviceRule:
    """One allow rule: the same fields as a v1 devices.allow line."""

    kind: int               # DEV_CHAR or DEV_BLOCK
    major: int | None       # None: any
    minor: int | None
    access: int             # ACC_* bits

    @classmethod
    def parse(cls, line: str) -> DeviceRule:
        """From a devices.allow line such as "c 1:3 rwm" or "c 136:* rw"."""
        kind, numbers, perms = line.split()
        major, minor = numbers.split(":")
        access = 0
        for letter in perms:
            access |= _ACCESS_BITS[letter]
        return cls(DEV_CHAR if kind == "c" else DEV_BLOCK,
                   None if major == "*" else int(major), None if minor == "*" else int(minor),
                   access)


# eBPF instructions (struct bpf_insn: code, dst:4|src:4, off, imm) ------------------

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _load_ctx_u32(dst: int, offset: int) -> bytes:
    return _insn(0x61, dst, 1, offset)          # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(r1 + off)


def _jne(reg: int, value: int, skip: int) -> bytes:
    return _insn(0x55, reg, off=skip, imm=value)  # BPF_JMP | BPF_JNE | BPF_K


def _jset(reg: int, value: int, skip: int) -> bytes:
    return _insn(0x45, reg, off=skip, imm=value)  # BPF_JMP | BPF_JSET | BPF_K


def _return(value: int) -> list[bytes]:
    return [_insn(0xb7, 0, imm=value), _insn(0x95)]  # r0 = value; exit


def _rule_block(rule: DeviceRule) -> list[bytes]:
    """Return 1 if the access matches `rule`; fall through to the next block otherwise.
    Registers: r2 = device type, r3 = access bits, r4 = major, r5 = minor."""
    tests: list[tuple[str, int, int]] = [("jne", 2, rule.kind)]
    if rule.major is not None:
        tests.append(("jne", 4, rule.major))
    if rule.minor is not None:
        tests.append(("jne", 5, rule.minor))
    tests.append(("jset", 3, ~rule.access & 0x7))   # asks for more than the rule gives
    block: list[bytes] = []
    for index, (op, reg, value) in enumerate(tests):
        skip = (len(tests) - index - 1) + 2        # past the remaining tests and the return
        block.append(_jne(reg, value, skip) if op == "jne" else _jset(reg, value, skip))
    return block + _return(1)


def program(rules: Iterable[DeviceRule]) -> bytes:
    """The device program for `rules`: allow what one of them allows, refuse the rest."""
    insns = [
        _load_ctx_u32(2, 0), _insn(0x54, 2, imm=0xFFFF),   # r2 = access_type & 0xffff (type)
        _load_ctx_u32(3, 0), _insn(0x74, 3, imm=16),       # r3 = access_type >> 16 (access)
        _load_ctx_u32(4, 4), _load_ctx_u32(5, 8),          # r4 = major, r5 = minor
    ]
    for rule in rules:
        insns += _rule_block(rule)
    return b"".join(insns + _return(0))


# bpf(2) -------------------------------------------------------------------------

@functools.cache
def _syscall() -> tuple[ctypes.CDLL, int]:
    try:
        import seccomp as libseccomp
    except ImportError:
        import pyseccomp as libseccomp
    return ctypes.CDLL(None, use_errno=True), libseccomp.resolve_syscall(libseccomp.Arch.NATIVE, "bpf")


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    libc, number = _syscall()
    result = libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return int(result)


# The verifier gives up with EAGAIN when a signal arrives while it works (it checks
# signal_pending between instructions), which a busy daemon's threads see under many
# concurrent starts; libbpf retries the load a few times for the same reason.
PROG_LOAD_ATTEMPTS = 5


def _load_retrying(attr: ctypes.Array) -> int:
    attempts_left = PROG_LOAD_ATTEMPTS
    while True:
        try:
            return _bpf(BPF_PROG_LOAD, attr, "the container's device program")
        except OSError as exc:
            attempts_left -= 1
            if exc.errno != errno.EAGAIN or attempts_left == 0:
                raise


def load(rules: Iterable[DeviceRule]) -> int:
    """Load the program for `rules`; returns its descriptor (the caller closes it)."""
    return _load_code(program(rules))


def _load_code(code: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = ctypes.create_string_buffer(72)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, _LOG_SIZE,
                     ctypes.addressof(log))
    struct.pack_into("16s", attr, 48, b"hostel_device")   # prog_name
    try:
        fd = _load_retrying(attr)
    except OSError as exc:
        verifier = log.value.decode(errors="replace").strip()
        again = (f" {PROG_LOAD_ATTEMPTS} times in a row (the verifier was interrupted each "
                 "time; start the machine again)" if exc.errno == errno.EAGAIN else "")
        raise BpfError(f"loading the cgroup device program failed: {exc.strerror}{again}"
                       + (f"; the verifier said: {verifier[-500:]}" if verifier else "")) from exc
    os.set_inheritable(fd, False)
    return fd


# One loaded program serves every scope with the same rules (a program may be attached
# to any number of cgroups): the verifier's pass, ~1.5 ms of each start, runs once per
# rule set. Rule sets differ only by the devices of an image's loop, so few are kept.
_SHARED_MAX = 16
_shared: dict[bytes, int] = {}
_shared_lock = threading.Lock()  # starts prepare their scopes in threads


def _shared_program(code: bytes) -> int:
    """The descriptor of the loaded program `code`, loaded at its first use and kept
    (the one of the oldest rule set is closed when too many are). Call it holding
    _shared_lock, and use the descriptor before letting go of it."""
    fd = _shared.get(code)
    if fd is None:
        fd = _shared[code] = _load_code(code)
        if len(_shared) > _SHARED_MAX:
            os.close(_shared.pop(next(iter(_shared))))
    return fd


def attach(cgroup_dir: str, rules: Iterable[DeviceRule]) -> None:
    """Attach the program for `rules` to the v2 cgroup at `cgroup_dir` (replacing the
    one attached before, if any), loading it first if no scope had these rules yet."""
    code = program(list(rules))
    with _shared_lock:
        _attach(cgroup_dir, _shared_program(code))


def _attach(cgroup_dir: str, prog: int) -> None:
    try:
        target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise BpfError(f"opening cgroup {cgroup_dir} to attach its device program: "
                       f"{exc.strerror}") from exc
    try:
        attr = ctypes.create_string_buffer(20)
        struct.pack_into("<IIII", attr, 0, target, prog, BPF_CGROUP_DEVICE, 0)
        _bpf(BPF_PROG_ATTACH, attr, cgroup_dir)
    except OSError as exc:
        raise BpfError(f"attaching the device program to cgroup {cgroup_dir}: "
                       f"{exc.strerror}") from exc
    finally:
        os.close(target)


def attached_programs(cgroup_dir: str) -> tuple[int, list[int]]:
    """(attach flags, program ids) of the device programs attached to `cgroup_dir` itself."""
    target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ids = (ctypes.c_uint32 * 8)()
        attr = ctypes.create_string_buffer(40)
        struct.pack_into("<IIIIQI", attr, 0, target, BPF_CGROUP_DEVICE, 0, 0,
                         ctypes.addressof(ids), len(ids))
        _bpf(BPF_PROG_QUERY, attr, cgroup_dir)
        flags, = struct.unpack_from("<I", attr, 12)
        count, = struct.unpack_from("<I", attr, 24)
        return flags, list(ids[:count])
    finally:
        os.close(target)


def supported() -> bool:
    """Whether this kernel loads cgroup device programs (CONFIG_CGROUP_BPF)."""
    try:
        os.close(load([]))
    except BpfError as exc:
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True
