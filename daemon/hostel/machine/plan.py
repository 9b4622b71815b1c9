"""The child's plan: every step a container takes between clone and exec, in the seed's order.

Built in Python from the settings and what preparation looked up (the tree,
the user, the machine id, the seccomp filter); run by the C trampoline. Kept
apart from the runner so that steps (mounts, devices, policy) can be added
here without touching how a start is driven."""
from __future__ import annotations

from dataclasses import dataclass, field

from hostel import native
from hostel.machine import capabilities, cgroups, credentials, devices, hostfiles, journal, mounts
from hostel.machine import bind_user, payload_limits, tree, users
from hostel.machine import overlays
from hostel.machine.console import Console
from hostel.machine.settings import MachineSettings
from hostel.spawn import Plan

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_PATHS = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/sbin/init")
PAYLOAD_LOCALE = "C.UTF-8"  # what Debian's nspawn 252 is built with (SYSTEMD_NSPAWN_LOCALE)


@dataclass
class Prepared:
    """Everything the plan needs that had to be looked up or set up first."""

    prepared_root: tree.PreparedRoot
    machine_id: bytes
    user: users.UserIds
    retain: int
    seccomp_bpf: bytes
    uid_base: int | None = None  # --private-users: host uid of root inside (userns.uid_base)
    detached: dict[str, int] = field(default_factory=dict)  # mounts.detached_api_mounts

    @property
    def root(self) -> str:
        return self.prepared_root.root

    @property
    def view(self) -> str | None:
        return self.prepared_root.view


def clone_flags(settings: MachineSettings) -> int:
    flags = native.CLONE_NEWNS
    if not settings.share_system:
        flags |= native.CLONE_NEWIPC | native.CLONE_NEWPID | native.CLONE_NEWUTS
    if settings.private_network:
        flags |= native.CLONE_NEWNET
    if settings.private_users is not None:
        flags |= native.CLONE_NEWUSER
    return flags


def build_plan(settings: MachineSettings, prepared: Prepared, console: Console,
               runtime_dir: str, go_fd: int, join: cgroups.CgroupJoin, *,
               wait_for_record: bool = False) -> Plan:
    """The child's whole life before exec, in the seed's order.

    wait_for_record: a child born in no scope of its own waits, last, for the
    parent to record its pid, so that no payload runs that hosteld has no record of."""
    plan = Plan()
    root = prepared.root
    in_userns = settings.private_users is not None
    join.plan_steps(plan)  # first: nothing may fork before the child is in its scope
    caller_limits = settings.raw.get("CallerLimits")
    payload_limits.plan_limits(plan, getattr(caller_limits, "value", caller_limits),
                               {limit.resource for limit in settings.rlimits.values()})
    if in_userns:  # become the namespace's root (host uid BASE) once it is mapped
        plan.wait_for_parent(go_fd, "the uid/gid map")
        plan.setgroups([])
        plan.setresgid(0)
        plan.setresuid(0)
    if settings.wants_process_limits():
        plan.wait_for_parent(go_fd, "the resource limits, CPU affinity and OOM score")
    _plan_stdio(plan, console)
    if not settings.share_system:
        plan.write_file("/proc/self/loginuid", b"4294967295", create=False, truncate=False,
                        best_effort=True)
    plan.mount(None, "/", None, native.MS_SLAVE | native.MS_REC)
    prepared.prepared_root.mount_steps(plan)
    mounts.plan_root(plan, root, settings, runtime_dir)
    mounts.plan_api_filesystems(plan, root, settings, runtime_dir, prepared.detached)
    devices.plan_devnodes(plan, root, in_userns)
    plan.seccomp(prepared.seccomp_bpf)
    devices.plan_console(plan, root, console.tty_path, in_userns)
    devices.plan_kmsg(plan, root)
    if not settings.share_system:
        mounts.plan_boot_id(plan, root)
    # With --volatile=yes the root is a fresh tmpfs: the tree's files are not in it.
    view = None if settings.volatile == "yes" else prepared.view
    read_only = settings.read_only and settings.volatile != "yes"  # nspawn 252's test
    hostfiles.plan_timezone(plan, root, prepared.view, settings.name, settings.timezone,
                            read_only, fresh_root=settings.volatile == "yes",
                            outside=in_userns and _plain_writable_tree(settings))
    hostfiles.plan_resolv_conf(plan, root, settings.private_network, settings.resolv_conf,
                               read_only, view)
    hostfiles.plan_machine_id(plan, root, view, prepared.machine_id)
    credentials.plan_credentials(plan, root, settings.credentials)
    bind_user.plan_bind_users(plan, root, settings.bound_users)
    journal.plan_journal(plan, root, view, settings, prepared.machine_id.hex())
    mounts.plan_binds(plan, root, settings.binds)
    mounts.plan_tmpfs(plan, root, settings.tmpfs)
    overlays.plan_overlays(plan, root, settings.resolved_overlays)
    if not settings.share_system:
        plan.sethostname(settings.hostname or settings.name)
    mounts.plan_enter_root(plan, root)
    plan.drop_bounding_caps(capabilities.bounding_drop_mask(prepared.retain))
    user_env = users.plan_change_user(plan, prepared.user)
    if prepared.user.uid == 0:
        capabilities.plan_root_sets(plan, prepared.retain, in_userns)
    if settings.no_new_privileges:
        plan.no_new_privs()
    if settings.working_directory:
        plan.chdir(settings.working_directory)
    if settings.personality is not None:  # set by --personality, or by an x86 image root
        plan.personality(settings.personality)
    if settings.selinux_context:
        plan.write_file("/proc/self/attr/exec", settings.selinux_context.encode(), create=False)
    env = payload_environment(settings, prepared, user_env)
    if settings.private_network:
        plan.wait_for_parent(go_fd, "the network interfaces")
    if wait_for_record:
        plan.wait_for_parent(go_fd, "the machine's state file")
    if settings.as_pid2:
        plan.stub_init()
    _plan_exec(plan, settings, prepared, env)
    return plan


def _plain_writable_tree(settings: MachineSettings) -> bool:
    """Whether the root is the directory tree itself, writable: hosteld may then create
    what 252 creates in it from outside the user namespace (hostfiles.plan_timezone)."""
    return (settings.image is None and not settings.ephemeral and settings.volatile == "no"
            and not settings.read_only)


def _plan_stdio(plan: Plan, console: Console) -> None:
    for target, fd in enumerate((console.stdin, console.stdout, console.stderr)):
        plan.dup2(fd, target)
    plan.setsid()
    if console.tty_path is not None:
        plan.set_controlling_tty(0)


def payload_environment(settings: MachineSettings, prepared: Prepared,
                        user_env: list[str]) -> list[str]:
    """The payload's environment as nspawn 252's inner child builds it: its own variables,
    then --setenv over them.

    USER and LOGNAME are the --user string as given (252 names a user "0" if told
    --user=0), HOME the account's. A payload that is not an init gets LANG=C.UTF-8
    (252's compiled-in locale, whatever the caller's LANG): the tree's locale.conf is for
    its init to apply, and a shell without LANG would fall back to plain ASCII."""
    if settings.exact_environment:
        return list(settings.environment)
    env = {"PATH": f"PATH={DEFAULT_PATH}", "container": "container=hostel"}
    if settings.terminal:
        env["TERM"] = f"TERM={settings.terminal}"
    for item in user_env:
        env[item.split("=", 1)[0]] = item
    if settings.user:
        env["USER"], env["LOGNAME"] = f"USER={settings.user}", f"LOGNAME={settings.user}"
    env["container_uuid"] = "container_uuid=" + _uuid_text(prepared.machine_id)
    if settings.credentials:
        env["CREDENTIALS_DIRECTORY"] = f"CREDENTIALS_DIRECTORY={credentials.DIRECTORY}"
    if not settings.boot:
        env["LANG"] = f"LANG={PAYLOAD_LOCALE}"
    for item in settings.environment:
        env[item.split("=", 1)[0]] = item
    return list(env.values())


def _uuid_text(raw: bytes) -> str:
    import uuid

    return str(uuid.UUID(bytes=raw))


def _plan_exec(plan: Plan, settings: MachineSettings, prepared: Prepared, env: list[str]) -> None:
    if settings.boot:
        for init in INIT_PATHS:
            plan.execve(init, [init, *settings.command], env, try_next=True)
        plan.fail(2, f"find an init system in the container ({', '.join(INIT_PATHS)})")
        return
    if settings.command:
        _plan_exec_search(plan, settings.command, env)
        return
    home = prepared.user.home or "/root"
    plan.chdir(home, best_effort=True)
    plan.execve("/bin/bash", ["-bash"], env, try_next=True)
    plan.execve("/bin/sh", ["-sh"], env)


def _plan_exec_search(plan: Plan, command: list[str], env: list[str]) -> None:
    """execvpe() with the container's PATH, as steps: each candidate tried in turn."""
    name = command[0]
    if "/" in name:
        plan.execve(name, command, env)
        return
    path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for directory in [d for d in path.split(":") if d]:
        plan.execve(f"{directory}/{name}", command, env, try_next=True)
    plan.fail(2, f"find {name!r} in the container's PATH ({path})")
