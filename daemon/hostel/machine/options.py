"""systemd-nspawn's command-line options, and the D-Bus settings keys they map to.

One table serves both sides: hostelctl turns argv into an a{sv} settings
dictionary with it (a shallow, fast translation: paths made absolute, flags
made booleans), and hosteld checks the same dictionary's keys and types
against it before settings.py gives the values meaning. Nothing here imports
more than the standard library's core, because hostelctl imports it at start."""
from __future__ import annotations


class Option:
    """One option. A plain class: importing dataclasses costs hostelctl ~6 ms per start."""

    __slots__ = ("long", "key", "signature", "short", "metavar", "help", "path",
                 "optional_value")

    def __init__(self, long: str, key: str, signature: str, short: str | None = None,
                 metavar: str | None = None, help: str = "", *, path: bool = False,
                 optional_value: str | None = None) -> None:
        self.long = long                      # "directory" for --directory
        self.key = key                        # "Directory": the a{sv} settings key
        self.signature = signature            # D-Bus type of the value: "s", "b", "as"
        self.short = short                    # "D" for -D
        self.metavar = metavar
        self.help = help
        self.path = path                      # made absolute against the client's cwd
        self.optional_value = optional_value  # the value of a bare --volatile


OPTIONS: tuple[Option, ...] = (
    Option("directory", "Directory", "s", "D", "PATH", "root directory for the container", path=True),
    Option("template", "Template", "s", None, "PATH",
           "initialize the root directory from this template directory", path=True),
    Option("ephemeral", "Ephemeral", "b", "x", None,
           "run on a throwaway snapshot of the root directory, removed on exit"),
    Option("image", "Image", "s", "i", "PATH", "disk image or block device for the container", path=True),
    Option("boot", "Boot", "b", "b", None, "boot the container: run its init as PID 1"),
    Option("user", "User", "s", "u", "USER", "run the command as this user (name or uid)"),
    Option("machine", "Machine", "s", "M", "NAME", "the machine's name"),
    Option("uuid", "UUID", "s", None, "UUID", "the machine's id (container_uuid=)"),
    Option("slice", "Slice", "s", "S", "SLICE", "place the container in this slice"),
    Option("private-network", "PrivateNetwork", "b", None, None, "no network access: only loopback"),
    Option("network-interface", "NetworkInterface", "as", None, "IFACE",
           "move this host interface into the container (repeatable)"),
    Option("network-macvlan", "NetworkMacvlan", "as", None, "IFACE",
           "give the container a macvlan interface on this host interface (repeatable)"),
    Option("network-veth", "NetworkVeth", "b", "n", None,
           "virtual Ethernet link between host (ve-NAME) and container (host0)"),
    Option("network-bridge", "NetworkBridge", "s", None, "BRIDGE",
           "like --network-veth, with the host side added to this bridge"),
    Option("network-zone", "NetworkZone", "s", None, "NAME",
           "like --network-veth, with the host side added to bridge vz-NAME, shared by the "
           "zone's containers (made and removed as they come and go)"),
    Option("port", "Port", "as", "p", "[PROTOCOL:]HOSTPORT[:CONTAINERPORT]",
           "forward a host port (tcp or udp) to the container's address (repeatable)"),
    Option("selinux-context", "SELinuxContext", "s", "Z", "SECLABEL",
           "SELinux context of the container's processes"),
    Option("selinux-apifs-context", "SELinuxApiFsContext", "s", "L", "SECLABEL",
           "SELinux context of the container's API file systems"),
    Option("capability", "Capability", "as", None, "CAP", "retain this capability too (or 'all')"),
    Option("drop-capability", "DropCapability", "as", None, "CAP",
           "drop this capability from the default set (or 'all')"),
    Option("link-journal", "LinkJournal", "s", None, "MODE",
           "link the guest journal: no, auto, guest, host, try-guest, try-host"),
    Option("read-only", "ReadOnly", "b", None, None, "mount the root directory read-only"),
    Option("bind", "Bind", "as", None, "SRC[:DST]", "bind mount a host path into the container"),
    Option("bind-ro", "BindReadOnly", "as", None, "SRC[:DST]", "read-only bind mount"),
    Option("bind-user", "BindUser", "as", None, "NAME",
           "bind a host user's home to /run/host/home/NAME and add the user (needs --private-users)"),
    Option("tmpfs", "TemporaryFileSystem", "as", None, "PATH[:OPTS]", "mount a tmpfs at PATH"),
    Option("overlay", "Overlay", "as", None, "PATH[:PATH...]:DEST",
           "mount an overlay of host trees at DEST, writes going to the last tree (repeatable)"),
    Option("overlay-ro", "OverlayReadOnly", "as", None, "PATH[:PATH...]:DEST",
           "mount a read-only overlay of host trees at DEST (repeatable)"),
    Option("setenv", "Environment", "as", None, "NAME=VALUE", "pass an environment variable to PID 1"),
    Option("share-system", "ShareSystem", "b", None, None, "share the host's pid, ipc and uts namespaces"),
    Option("register", "Register", "s", None, "BOOL", "register the container as a machine (yes/no)"),
    Option("keep-unit", "KeepUnit", "b", None, None, "stay in hosteld's cgroup instead of a scope"),
    Option("personality", "Personality", "s", None, "ARCH", "execution domain: x86 or x86-64"),
    Option("volatile", "Volatile", "s", None, "MODE", "volatile mode: yes, state, overlay or no",
           optional_value="yes"),
    Option("quiet", "Quiet", "b", "q", None, "do not show status information"),
    Option("private-users", "PrivateUsers", "s", None, "UID[:RANGE]|yes|pick|no",
           "run in a user namespace: container root is an unprivileged host uid",
           optional_value="yes"),
    Option("private-users-ownership", "PrivateUsersOwnership", "s", None, "MODE",
           "fit the tree's owners to --private-users' range: off, chown, map or auto"),
    Option("as-pid2", "AsPid2", "b", None, None, "run the command as PID 2 under a minimal stub init"),
    Option("console", "Console", "s", None, "MODE",
           "console mode: interactive, read-only, passive or pipe"),
    Option("pipe", "Pipe", "b", "P", None, "the same as --console=pipe"),
    Option("chdir", "WorkingDirectory", "s", None, "PATH",
           "working directory of the command, inside the container"),
    Option("kill-signal", "KillSignal", "s", None, "SIGNAL",
           "signal that asks the container to stop (default: SIGRTMIN+3 with --boot, else SIGTERM)"),
    Option("settings", "Settings", "s", None, "MODE",
           "read the machine's .nspawn file: yes, no, trusted or override"),
    Option("hostname", "Hostname", "s", None, "NAME",
           "the container's hostname (default: the machine's name)"),
    Option("no-new-privileges", "NoNewPrivileges", "s", None, "BOOL",
           "set PR_SET_NO_NEW_PRIVS for the payload: setuid binaries gain nothing"),
    Option("rlimit", "RLimits", "as", None, "NAME=SOFT[:HARD]",
           "set a resource limit of the payload, e.g. NOFILE=1024:4096 (repeatable)"),
    Option("oom-score-adjust", "OOMScoreAdjust", "s", None, "VALUE",
           "the payload's OOM score adjustment, -1000 to 1000"),
    Option("cpu-affinity", "CPUAffinity", "s", None, "CPUS",
           "run the payload on these CPUs only, e.g. 0-3,5"),
    Option("system-call-filter", "SystemCallFilter", "as", None, "[~]SYSCALLS",
           "allow these system calls and @groups too, or with ~ forbid them (repeatable)"),
    Option("property", "Property", "as", None, "NAME=VALUE",
           "a resource limit of the machine's scope: MemoryMax=, CPUQuota=, TasksMax=, ..."),
    Option("set-credential", "SetCredential", "as", None, "ID:VALUE",
           "pass a credential to the payload ($CREDENTIALS_DIRECTORY/ID; C escapes allowed)"),
    Option("load-credential", "LoadCredential", "as", None, "ID:PATH",
           "pass the host file PATH as credential ID to the payload"),
    Option("timezone", "Timezone", "s", None, "MODE",
           "/etc/localtime from the host: off, copy, bind, symlink, delete or auto"),
    Option("resolv-conf", "ResolvConf", "s", None, "MODE",
           "/etc/resolv.conf from the host: off, copy-host, replace-host, bind-host (and "
           "-static, -uplink, -stub), delete or auto"),
)

BY_KEY = {opt.key: opt for opt in OPTIONS}
BY_LONG = {opt.long: opt for opt in OPTIONS}
BY_SHORT = {opt.short: opt for opt in OPTIONS if opt.short}

# Settings with no command-line option of their own.
EXTRA_KEYS = {
    "Command": "as",          # the positional COMMAND [ARGS...]
    "LinkJournalTry": "b",    # the "try-" prefix of --link-journal, from -j
    "CallerDirectory": "s",   # the client's cwd: the root when no -D/-i/-M is given, as in nspawn
    "StandardInput": "h",
    "StandardOutput": "h",
    "StandardError": "h",
    "Terminal": "s",          # TERM of the client, as nspawn passes its own
    "CallerLimits": "as",     # the client's rlimits, RESOURCE=SOFT:HARD (payload_limits.py)
}

SIGNATURES = {**{opt.key: opt.signature for opt in OPTIONS}, **EXTRA_KEYS}
