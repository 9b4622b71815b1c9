"""What a lab job runs in: the host's environment, copied in part, and its cgroup
layout, mirrored. Shared by the pytest plugin and `make lab-shell`."""
from __future__ import annotations

import os
import shlex

INSIDE = "HOSTEL_LAB_INSIDE"
TIME_SCALE = "HOSTEL_TEST_TIME_SCALE"
INSIDE_TIME_SCALE = "10"   # TCG, nested: a hosteld start takes ~10-25 s instead of ~1 s
# What the inside environment copies from here: enough to be the same user in
# the same venv, nothing else (no credentials, no sockets of this host).
PASSED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME", "SHELL", "TERM",
              "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "PYTEST_ADDOPTS")
PASSED_ENV_PREFIXES = ("LC_", "HOSTEL_")
NOT_PASSED = ("HOSTEL_LAB",)   # inside, lab tests run directly whatever the host said


def inside_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if (k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)) and k not in NOT_PASSED}
    env.setdefault(TIME_SCALE, INSIDE_TIME_SCALE)
    env.update({INSIDE: "1", "TMPDIR": "/tmp", **(extra or {})})
    return env


def mirror_cgroup_mounts() -> str:
    """Shell lines mounting the cgroup file systems inside as this host has them
    (hybrid here), so that code reading the layout sees the same one."""
    lines = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            source, target, fstype, options = line.split()[:4]
            if target.startswith("/sys/fs/cgroup") and fstype in ("tmpfs", "cgroup", "cgroup2"):
                if fstype == "cgroup" and "name=" in options:
                    options += ",none"   # a named v1 hierarchy with no controller must say so
                lines.append(f"mkdir -p {shlex.quote(target)} && mount -t {fstype} -o "
                             f"{shlex.quote(options)} {shlex.quote(source)} {shlex.quote(target)}\n")
    return "".join(lines)


def preamble(workdir: str, extra_env: dict[str, str] | None = None) -> str:
    """The start of a job.sh: cgroups mounted, the environment set, in workdir."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n"
                      for k, v in sorted(inside_environment(extra_env).items()))
    return mirror_cgroup_mounts() + exports + f"cd {shlex.quote(workdir)}\n"
