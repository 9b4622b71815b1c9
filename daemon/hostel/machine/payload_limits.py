"""The resource limits a container's PID 1 starts with, as systemd-nspawn 252 sets them.

nspawn does not hand its own limits down: PID 1 gets the limits the kernel
gives the host's PID 1 (a fixed table; RLIMIT_NPROC and RLIMIT_SIGPENDING,
which the kernel scales with the memory, read off the host's PID 1), except
RLIMIT_NOFILE, whose hard limit is the caller's and soft limit 1024 (select()'s
limit, which a payload may raise itself). No limit goes above the caller's
hard limit: a user who lowered one (`ulimit -Hc 100`) keeps it lowered inside.
"The caller" is whoever ran `hostelctl run`: it sends its limits
(CallerLimits, "RESOURCE=SOFT:HARD" with -1 for infinity); a StartMachine
caller that sends none gets hosteld's own taken instead. --rlimit (limits.py)
then sets the ones it names over these."""
from __future__ import annotations

import resource

from hostel.errors import InvalidArgs
from hostel.spawn import Plan

INFINITY = resource.RLIM_INFINITY
NOFILE_SOFT = 1024
# Linux's numbering; what the kernel gives PID 1 (include/asm-generic/resource.h).
KERNEL_DEFAULTS: dict[int, tuple[int, int]] = {
    0: (INFINITY, INFINITY),        # CPU
    1: (INFINITY, INFINITY),        # FSIZE
    2: (INFINITY, INFINITY),        # DATA
    3: (8 << 20, INFINITY),         # STACK
    4: (0, INFINITY),               # CORE
    5: (INFINITY, INFINITY),        # RSS
    8: (8 << 20, 8 << 20),          # MEMLOCK
    9: (INFINITY, INFINITY),        # AS
    10: (INFINITY, INFINITY),       # LOCKS
    12: (819200, 819200),           # MSGQUEUE
    13: (0, 0),                     # NICE
    14: (0, 0),                     # RTPRIO
    15: (INFINITY, INFINITY),       # RTTIME
}
FROM_HOST_PID1 = (6, 11)            # NPROC, SIGPENDING
NOFILE = 7
RESOURCE_COUNT = 16


def _order(value: int) -> float:
    return float("inf") if value == INFINITY else value


def _lowest(a: int, b: int) -> int:
    return min(a, b, key=_order)


def parse_caller_limits(items: list[str]) -> dict[int, tuple[int, int]]:
    """CallerLimits' "RESOURCE=SOFT:HARD" entries, by resource number."""
    limits = {}
    for item in items:
        number, _, values = item.partition("=")
        soft, _, hard = values.partition(":")
        try:
            resource_number, soft_value, hard_value = int(number), int(soft), int(hard)
        except ValueError:
            raise InvalidArgs(f"CallerLimits: {item!r} is not RESOURCE=SOFT:HARD "
                              "(numbers, -1 for infinity)") from None
        if not 0 <= resource_number < RESOURCE_COUNT or min(soft_value, hard_value) < -1 \
                or _order(soft_value) > _order(hard_value):
            raise InvalidArgs(f"CallerLimits: {item!r}: no such resource, or the soft limit "
                              "is above the hard one")
        limits[resource_number] = (soft_value, hard_value)
    return limits


def _own_limits() -> dict[int, tuple[int, int]]:
    return {number: resource.getrlimit(number) for number in range(RESOURCE_COUNT)}


def payload_limits(caller: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """nspawn 252's limits for PID 1, none above the caller's hard limit."""
    own = _own_limits()
    wanted = dict(KERNEL_DEFAULTS)
    for number in FROM_HOST_PID1:
        wanted[number] = resource.prlimit(1, number)
    nofile_hard = caller.get(NOFILE, own[NOFILE])[1]
    wanted[NOFILE] = (_lowest(NOFILE_SOFT, nofile_hard), nofile_hard)
    result = {}
    for number, (soft, hard) in wanted.items():
        ceiling = caller.get(number, own[number])[1]
        hard = _lowest(hard, ceiling)
        result[number] = (_lowest(soft, hard), hard)
    return result


def plan_limits(plan: Plan, caller_items: list[str] | None, explicit: set[int]) -> None:
    """The steps that give the payload its limits (caller_items: CallerLimits, if sent),
    but for the resources --rlimit sets itself (`explicit`: hosteld sets those on the
    child, at a moment these steps must not race with)."""
    caller = parse_caller_limits(caller_items) if caller_items is not None else _own_limits()
    for number, (soft, hard) in sorted(payload_limits(caller).items()):
        if number not in explicit:
            plan.setrlimit(number, soft, hard)
