"""Linux capability names and the container's retained set (--capability, --drop-capability).

Names are matched as systemd's capability_from_name() matches them: the full
"CAP_..." name in any letter case, or a decimal number below CAP_LIMIT. systemd
does not accept a bare "chown", so neither do we: a spelling that works here
works with systemd-nspawn too, and the other way round."""
from __future__ import annotations

from typing import Iterable

from hostel.bus import InvalidArgs
from hostel.spawn import Plan

# Index = capability number, as in <linux/capability.h>.
NAMES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
    "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD",
    "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
NUMBERS: dict[str, int] = {name: number for number, name in enumerate(NAMES)}

# systemd refuses numbers from 62 up (its CAP_LIMIT): 63 is its "unset" marker.
CAP_LIMIT = 62
ALL = (1 << 64) - 1


def mask_of(*names: str) -> int:
    mask = 0
    for name in names:
        mask |= 1 << NUMBERS[name]
    return mask


# What a container keeps by default: enough to run an init system as root,
# nothing that reaches the host (modules, raw I/O, clock, MAC policy, network
# configuration unless the container has its own network namespace).
DEFAULT_RETAIN = mask_of(
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_NICE", "CAP_SYS_PTRACE",
    "CAP_SYS_TTY_CONFIG", "CAP_SYS_RESOURCE", "CAP_SYS_BOOT", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_MKNOD",
)


def capability_from_name(name: str, option: str = "--capability") -> int:
    """The number of one capability; `option` only names the source in the error."""
    text = name.strip()
    if text.isdigit() and text.isascii():
        number = int(text)
        if number < CAP_LIMIT:
            return number
    elif text.upper() in NUMBERS:
        return NUMBERS[text.upper()]
    raise InvalidArgs(f"unknown capability {name!r} in {option}; see capabilities(7) for names")


def parse_capabilities(values: Iterable[str], option: str = "--capability") -> int:
    """The mask named by option values, each a comma-separated list of names or "all".

    Empty list elements are skipped, as systemd's word splitting skips them."""
    mask = 0
    for value in values:
        for word in value.split(","):
            if not word.strip():
                continue
            if word.strip() == "all":
                mask = ALL
            else:
                mask |= 1 << capability_from_name(word, option)
    return mask


def compute_retain(plus: int, minus: int, private_network: bool,
                   private_users: bool = False) -> int:
    """The bounding set the container keeps: default + added (+ NET_ADMIN) - dropped.

    A container with its own network namespace may configure it, so it gets
    CAP_NET_ADMIN; an explicit drop still wins over that, as in nspawn. One with
    its own user namespace but the host's network may bind no privileged port
    (the host's network namespace is not its user namespace's), so, as nspawn 252
    does to say so, it loses CAP_NET_BIND_SERVICE even if asked for."""
    net_admin = mask_of("CAP_NET_ADMIN") if private_network else 0
    retain = (DEFAULT_RETAIN | plus | net_admin) & ~minus & ALL
    if private_users and not private_network:
        retain &= ~mask_of("CAP_NET_BIND_SERVICE")
    return retain


def bounding_drop_mask(retain: int) -> int:
    """The mask for Plan.drop_bounding_caps(): every capability not retained."""
    return ALL & ~retain


def plan_root_sets(plan: Plan, retain: int, in_userns: bool) -> None:
    """Give a root payload nspawn 252's capability sets: effective, permitted and
    inheritable all equal to the bounding set it keeps.

    The inheritable set is what makes a file's inheritable capabilities work across
    execve (setcap cap_net_raw+ei on a binary run by a non-root user started from root);
    left empty, such files get nothing. Bits this child cannot hold (beyond the
    kernel's last capability, outside hosteld's bounding or permitted set; a new user
    namespace starts with every one) are left out, as 252 mangles them away."""
    usable = (1 << (last_cap() + 1)) - 1
    if not in_userns:
        usable &= _own_set("CapBnd") & _own_set("CapPrm")
    kept = retain & usable
    plan.set_caps(effective=kept, permitted=kept, inheritable=kept)


def _own_set(field: str, path: str = "/proc/self/status") -> int:
    """One of hosteld's capability sets, as /proc reports it (the child inherits them)."""
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1], 16)
    raise LookupError(f"no {field} line in {path}")


def format_mask(mask: int) -> list[str]:
    """Names of the capabilities in `mask`, by number; numbers for ones without a name."""
    return [NAMES[bit] if bit < len(NAMES) else str(bit)
            for bit in range(64) if mask >> bit & 1]


def last_cap(path: str = "/proc/sys/kernel/cap_last_cap") -> int:
    """The highest capability this kernel knows, which bounds what "all" can mean here."""
    with open(path, encoding="ascii") as f:
        return int(f.read())
