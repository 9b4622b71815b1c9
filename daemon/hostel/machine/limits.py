"""Process limits of the payload: --rlimit, --oom-score-adjust and --cpu-affinity (nspawn 252).

The values are parsed here with 252's rules (resource names with or without
RLIMIT_, sizes with K/M/G..., CPU time as a time span, "infinity", nice
values as +N/-N); the resource limits and the CPU set are then set on the
child by hosteld while the child waits (prlimit, sched_setaffinity and
/proc/PID/oom_score_adj work on another process, and the trampoline has no
step for them)."""
from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass

from hostel.errors import InvalidArgs

# Linux's resource numbers (Python's resource module lacks RLIMIT_LOCKS and others).
RESOURCES = {name: number for number, name in enumerate((
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS", "LOCKS",
    "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME"))}
_SIZES = {"FSIZE", "DATA", "STACK", "CORE", "RSS", "AS", "MEMLOCK", "MSGQUEUE"}
_SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
                  "P": 1 << 50, "E": 1 << 60}
_USEC = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 10**6, "sec": 10**6,
         "m": 60 * 10**6, "min": 60 * 10**6, "h": 3600 * 10**6, "hr": 3600 * 10**6,
         "d": 86400 * 10**6}
_NUMBER_UNIT = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)$")
INFINITY = resource.RLIM_INFINITY
OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX = -1000, 1000


@dataclass(frozen=True)
class RLimit:
    name: str       # "NOFILE"
    soft: int
    hard: int

    @property
    def resource(self) -> int:
        return RESOURCES[self.name]


def resource_name(text: str) -> str:
    """NOFILE, RLIMIT_NOFILE or LimitNOFILE: the name 252's rlimit_from_string_harder takes."""
    name = text.removeprefix("RLIMIT_") if text.startswith("RLIMIT_") else text.removeprefix("Limit")
    if name not in RESOURCES:
        raise InvalidArgs(f"Unknown resource limit: {text} (known: {', '.join(RESOURCES)})")
    return name


def _time(text: str, default_unit: str) -> int:
    """A time span in microseconds ("10", "1.5h", "1h 20min"), a bare number in default_unit."""
    if not re.fullmatch(r"(\s*[0-9]+(?:\.[0-9]+)?\s*[A-Za-z]*)+\s*", text):
        raise ValueError(text)
    total = 0
    for number, unit in re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text):
        if unit and unit not in _USEC:
            raise ValueError(unit)
        total += int(float(number) * _USEC[unit or default_unit])
    return total


def _one_value(name: str, text: str) -> int:
    if text == "infinity":
        return INFINITY
    if name in _SIZES:
        match = _NUMBER_UNIT.match(text)
        if not match or match.group(2).upper() not in _SIZE_SUFFIXES:
            raise ValueError(text)
        return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()])
    if name == "CPU":  # seconds, rounded up
        return -(-_time(text, "s") // 10**6)
    if name == "RTTIME":
        return _time(text, "us")
    if name == "NICE" and text[:1] in "+-":  # a nice level: the limit is 20 - nice
        nice = int(text)
        if not -20 <= nice <= 19:
            raise ValueError(text)
        return 20 - nice
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def parse_rlimit(spec: str) -> RLimit:
    """--rlimit=NAME=SOFT[:HARD]: one value sets both, as in 252."""
    name_text, sep, value = spec.partition("=")
    if not sep:
        raise InvalidArgs(f"--rlimit= expects an '=' assignment: {spec}")
    name = resource_name(name_text)
    soft_text, colon, hard_text = value.partition(":")
    try:
        soft = _one_value(name, soft_text)
        hard = _one_value(name, hard_text) if colon else soft
    except ValueError:
        raise InvalidArgs(f"Failed to parse resource limit: {value} (--rlimit={spec}; "
                          "SOFT[:HARD], numbers, sizes with K/M/G or 'infinity')") from None
    if _order(soft) > _order(hard):
        raise InvalidArgs(f"Failed to parse resource limit: {value}: the soft limit is above "
                          "the hard limit")
    return RLimit(name, soft, hard)


def _order(value: int) -> float:
    """Python's RLIM_INFINITY is -1: compare it as the largest limit."""
    return float("inf") if value == INFINITY else value


def parse_rlimits(specs: list[str]) -> dict[str, RLimit]:
    """By resource name; a later --rlimit of a resource replaces an earlier one."""
    return {limit.name: limit for limit in map(parse_rlimit, specs)}


def parse_oom_score_adjust(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = OOM_SCORE_ADJ_MAX + 1
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise InvalidArgs(f"Failed to parse --oom-score-adjust= parameter: {text} "
                          f"(an integer from {OOM_SCORE_ADJ_MIN} to {OOM_SCORE_ADJ_MAX})")
    return value


def parse_cpu_affinity(text: str) -> frozenset[int]:
    """A CPU set as 252's parse_cpu_set takes it: numbers and ranges, by commas or spaces."""
    cpus: set[int] = set()
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise InvalidArgs(f"Failed to parse CPU affinity mask {text}: {item!r} is not a "
                              "CPU number or range (e.g. 0-3,5)")
        low, high = int(first), int(last) if dash else int(first)
        if low > high or high >= 8192:
            raise InvalidArgs(f"Failed to parse CPU affinity mask {text}: bad range {item!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise InvalidArgs(f"Failed to parse CPU affinity mask {text!r}: no CPU in it")
    return frozenset(cpus)


def apply(pid: int, rlimits: dict[str, RLimit], cpus: frozenset[int] | None,
          oom_score_adjust: int | None) -> None:
    """Set the limits, CPU set and OOM score adjustment of the waiting child (from hosteld,
    in a thread: it holds the capabilities in the host's user namespace that lowering the
    OOM score or raising a hard limit need, which a child with --private-users has not)."""
    for limit in rlimits.values():
        try:
            _set_closest(pid, limit)
        except (OSError, ValueError) as e:
            raise InvalidArgs(f"--rlimit={limit.name}: cannot set it on the container: "
                              f"{e}") from None
    if cpus is not None:
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError as e:
            usable = ",".join(map(str, sorted(os.sched_getaffinity(0))))
            raise InvalidArgs(f"--cpu-affinity={','.join(map(str, sorted(cpus)))}: "
                              f"{e.strerror} (the CPUs hosteld may use: {usable})") from None
    if oom_score_adjust is not None:
        try:
            with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                f.write(str(oom_score_adjust))
        except OSError as e:
            raise InvalidArgs(f"--oom-score-adjust={oom_score_adjust}: Failed to adjust OOM "
                              f"score: {e.strerror} (a value below hosteld's own needs "
                              "CAP_SYS_RESOURCE)") from None


def _set_closest(pid: int, limit: RLimit) -> None:
    """252's setrlimit_closest: a limit above the hard limit we may not raise is clamped to
    it (EPERM without CAP_SYS_RESOURCE), not an error; other failures are."""
    try:
        resource.prlimit(pid, limit.resource, (limit.soft, limit.hard))
        return
    except PermissionError:
        current_soft, current_hard = resource.prlimit(pid, limit.resource)
        if current_hard == INFINITY:
            raise
    clamped = (min(limit.soft, current_hard, key=_order), min(limit.hard, current_hard, key=_order))
    if clamped != (current_soft, current_hard):
        resource.prlimit(pid, limit.resource, clamped)
