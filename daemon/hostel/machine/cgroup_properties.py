"""--property=NAME=VALUE: the resource-control properties of the machine's scope.

systemd-nspawn 252 hands --property to systemd for the scope unit it creates;
hosteld has no systemd to ask, so it writes the cgroup files those properties
stand for into the scope itself (so that, as in 252, the limit covers the whole
container, not just the payload cgroup below it). Values are parsed with
systemd's rules (sizes with K/M/G/T base 1024, percentages of RAM or of the
task limit, "infinity", CPUQuota as a percentage of one CPU). Both cgroup v2
and the v1 controllers are served; a property a hierarchy cannot express is
refused by name rather than silently ignored."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from hostel.errors import InvalidArgs

CPU_PERIOD_US = 100_000  # systemd's default CPUQuotaPeriodSec=100ms
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]?)B?$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
          "E": 1 << 60}
MAX = "max"


@dataclass(frozen=True)
class Property:
    """One parsed property: its v2 file and value, and its v1 (controller, file, value)."""

    name: str
    v2: tuple[tuple[str, str], ...]             # (file, value)
    v1: tuple[tuple[str, str, str], ...]        # (controller, file, value)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _tasks_limit() -> int:
    values = []
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        with open(path) as f:
            values.append(int(f.read()))
    return min(values)


def _percent(text: str) -> float | None:
    if text.endswith("%") and re.fullmatch(r"[0-9]+(\.[0-9]+)?", text[:-1]):
        return float(text[:-1])
    return None


def _bytes(name: str, text: str) -> str:
    """A memory property's value as a cgroup file takes it: bytes, or "max"."""
    if text == "infinity":
        return MAX
    percent = _percent(text)
    if percent is not None:
        return str(int(_physical_memory() * percent / 100))
    match = _SIZE.match(text)
    if not match:
        raise InvalidArgs(f"Failed to parse {name}= value: {text} (bytes with K, M, G or T, "
                          "a percentage of RAM, or infinity)")
    return str(int(float(match.group(1)) * _UNITS[match.group(2)]))


def _tasks(text: str) -> str:
    if text == "infinity":
        return MAX
    percent = _percent(text)
    if percent is not None:
        return str(int(_tasks_limit() * percent / 100))
    if not text.isdigit():
        raise InvalidArgs(f"Failed to parse TasksMax= value: {text} (a number, a percentage "
                          "or infinity)")
    return text


def _weight(name: str, text: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidArgs(f"Failed to parse {name}= value: {text} (a number from {low} to {high})")
    return int(text)


def _quota(text: str) -> int:
    percent = _percent(text)
    if percent is None or percent <= 0:
        raise InvalidArgs(f"Failed to parse CPUQuota= value: {text} (a percentage of one CPU, "
                          "e.g. 50% or 200%)")
    return max(1000, int(CPU_PERIOD_US * percent / 100))  # the kernel's minimum quota: 1 ms


def _v1_bytes(value: str) -> str:
    return "-1" if value == MAX else value


def parse_property(spec: str) -> Property:
    name, sep, value = spec.partition("=")
    if not sep:
        raise InvalidArgs(f"--property= expects NAME=VALUE: {spec}")
    if name in ("MemoryMax", "MemoryLimit"):
        amount = _bytes(name, value)
        return Property(name, (("memory.max", amount),),
                        (("memory", "memory.limit_in_bytes", _v1_bytes(amount)),))
    if name in ("MemoryHigh", "MemoryLow", "MemoryMin", "MemorySwapMax"):
        file = {"MemoryHigh": "memory.high", "MemoryLow": "memory.low", "MemoryMin": "memory.min",
                "MemorySwapMax": "memory.swap.max"}[name]
        return Property(name, ((file, _bytes(name, value)),), ())
    if name == "TasksMax":
        tasks = _tasks(value)
        return Property(name, (("pids.max", tasks),), (("pids", "pids.max", tasks),))
    if name == "CPUQuota":
        quota = _quota(value)
        return Property(name, (("cpu.max", f"{quota} {CPU_PERIOD_US}"),),
                        (("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                         ("cpu", "cpu.cfs_quota_us", str(quota))))
    if name == "CPUWeight":
        weight = _weight(name, value, 1, 10000)
        return Property(name, (("cpu.weight", str(weight)),),
                        (("cpu", "cpu.shares", str(max(2, weight * 1024 // 100))),))
    if name == "IOWeight":
        return Property(name, (("io.weight", str(_weight(name, value, 1, 10000))),), ())
    raise InvalidArgs(f"Unknown or unsupported property: {name} (hostel applies MemoryMax, "
                      "MemoryHigh, MemoryLow, MemoryMin, MemorySwapMax, MemoryLimit, TasksMax, "
                      "CPUQuota, CPUWeight and IOWeight)")


def parse_properties(specs: list[str]) -> list[Property]:
    return [parse_property(spec) for spec in specs]
