"""hostelctl: a thin client of hosteld, in the manner of machinectl.

Start-up time is the product here (see DESIGN.md): `run` parses its own
options (machine/cmdline.py), argparse is imported for the other commands
only, and the D-Bus client when a command needs the daemon.

Exit codes: 0 success, 1 the operation failed, 2 usage error, 4 the
operation requires root (systemctl's code for "insufficient privileges"),
69 (EX_UNAVAILABLE) the bus or hosteld cannot be reached, 130 interrupted."""
from __future__ import annotations

import sys

TYPE_CHECKING = False  # importing typing costs hostelctl 3 ms at every start
if TYPE_CHECKING:
    import argparse
    from types import SimpleNamespace
    from typing import Any, Callable

    from hostel.client import Client

    # args: an argparse.Namespace, or a SimpleNamespace on `run`'s fast path;
    # client: None for the commands in CONNECTS_ITSELF.
    Handler = Callable[[Any, Any], int]

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69

DAEMON_PATH = "/org/hostel1"
MACHINE_PATH = "/org/hostel1/machine"
CRYPTSETUP_PATH = "/org/hostel1/cryptsetup"
GUEST_PATH = "/org/hostel1/guest"

# Commands ------------------------------------------------------------------------

def _machine(client: Client, name: str) -> tuple[str, dict]:
    (path,) = client.call(MACHINE_PATH, "org.hostel1.MachineManager", "GetMachine", "s", name)
    return path, client.get_all(path, "org.hostel1.Machine")


NO_SUCH_OBJECT = "org.hostel1.Error.NoSuchObject"


def _vm_guest(client: Client, name: str) -> str | None:
    """A VM guest's object path: `hostelctl list` lists VM guests beside the machines (a
    container guest is a machine), so `show` and `status` find them too."""
    from hostel.guest.commands import MANAGER, MANAGER_PATH as GUESTS_PATH

    (guests,) = client.call(GUESTS_PATH, MANAGER, "ListGuests")
    return next((path for guest, cls, _state, path in guests
                 if guest == name and cls == "vm"), None)


def _machine_or_vm(client: Client, name: str) -> tuple[str, dict] | str:
    """The machine (path, properties), else the path of a VM guest of that name; no such
    machine raises as GetMachine does."""
    from hostel.client import CallFailed

    try:
        return _machine(client, name)
    except CallFailed as e:
        if e.name != NO_SUCH_OBJECT:
            raise
        path = _vm_guest(client, name)
        if path is None:
            raise
        return path


def _since(usec: int) -> str:
    import time

    from hostel.output import format_timestamp

    if not usec:
        return "n/a"
    ago = max(0, int(time.time() - usec / 1e6))
    stamp = format_timestamp(usec)
    return f"{stamp}; {ago // 60}min {ago % 60}s ago" if ago >= 60 else f"{stamp}; {ago}s ago"


def _process_name(pid: int) -> str:
    """`1234 (sh)`, as machinectl shows a leader: its comm, read from /proc."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return f"{pid} ({comm.read().strip()})"
    except OSError:
        return str(pid)


def _interface_names(indices: list[int]) -> list[str]:
    """The host's names for the machine's interfaces (the host side of its veth, ...),
    as machinectl resolves them; an index the host no longer has stays a number."""
    import socket

    names = []
    for index in indices:
        try:
            names.append(socket.if_indextoname(index))
        except OSError:
            names.append(str(index))
    return names


def _addresses(client: Client, path: str) -> list[str]:
    """The machine's addresses (GetAddresses reads them in its network namespace)."""
    import socket

    from hostel.client import CallFailed

    try:
        (found,) = client.call(path, "org.hostel1.Machine", "GetAddresses")
    except CallFailed:
        return []
    return [socket.inet_ntop(family, bytes(raw)) for family, raw in found]


def _os_release(client: Client, path: str) -> dict[str, str]:
    from hostel.client import CallFailed

    try:
        (release,) = client.call(path, "org.hostel1.Machine", "GetOSRelease")
    except CallFailed:  # not running, or no os-release in it
        return {}
    return release


def cmd_machine_status(args: argparse.Namespace, client: Client) -> int:
    """machinectl status, in its layout (or properties with -p/--value/-o)."""
    from hostel import output

    found = _machine_or_vm(client, args.name)
    if isinstance(found, str):  # a VM guest: guest status says it
        from hostel.guest.commands import cmd_status as guest_status

        return guest_status(args, client)
    path, props = found
    if output.wants_properties(args):
        return output.print_properties(args, props, _formatted(props))
    release = _os_release(client, path)
    os_name = release.get("PRETTY_NAME") or release.get("NAME", "")
    addresses = _addresses(client, path)
    rows = [("Since", _since(props["Timestamp"])),
            ("Leader", _process_name(props["Leader"]) if props["Leader"] else "-"),
            ("Service", f"{props['Service']}; class {props['Class']}"),
            ("Root", props["RootDirectory"] or "-"),
            ("Iface", " ".join(_interface_names(props["NetworkInterfaces"])) or "-"),
            ("Address", addresses[0] if addresses else "-")]
    rows += [("", address) for address in addresses[1:]]
    rows += [("OS", os_name or "-"), ("Unit", props["Unit"] or "-"), ("State", props["State"])]
    print(props["Name"])
    for key, value in rows:
        print(f"{key:>16}: {value}" if key else f"{'':>16}  {value}")
    return 0


def _formatted(props: dict) -> dict[str, str]:
    """How machinectl show prints what is not plain: timestamps, the id in hex."""
    from hostel.output import format_timestamp

    formatted = {"Id": bytes(props.get("Id", b"")).hex()}
    if "Timestamp" in props:
        formatted["Timestamp"] = format_timestamp(props["Timestamp"])
    return formatted


def cmd_show(args: argparse.Namespace, client: Client) -> int:
    """machinectl show: every property as Name=value (-p to pick, --value for values);
    without NAME, hosteld's own, as machinectl shows the manager's."""
    from hostel import output

    if not args.name:
        return output.print_properties(args, client.get_all(DAEMON_PATH, "org.hostel1.Daemon"))
    found = _machine_or_vm(client, args.name)
    if isinstance(found, str):  # a VM guest: its org.hostel1.Guest properties
        from hostel.guest.commands import GUEST

        return output.print_properties(args, client.get_all(found, GUEST))
    _path, props = found
    return output.print_properties(args, props, _formatted(props))


def cmd_shell(args: argparse.Namespace, client: Client) -> int:
    """machinectl shell: a pty in the machine, relayed to this terminal until it hangs up
    (or stdin ends, or ^]^]^] is typed)."""
    import os

    options = _shell_options(args)
    user, _, name = args.name.rpartition("@")
    user = options.uid or user
    path, _props = _machine(client, name)
    command = options.command
    env = [f"TERM={os.environ['TERM']}"] if os.environ.get("TERM") else []
    env += options.setenv
    master, _pty = client.call(path, "org.hostel1.Machine", "OpenShell", "ssasas", user,
                               command[0] if command else "", command, env)
    from hostel.machine.ptyrelay import relay

    return relay(master)  # a plain int descriptor, now ours: relay closes it


class UsageError(Exception):
    """A command line hostelctl cannot carry out; exits 2 with the message."""


class _ShellOptions:
    __slots__ = ("uid", "setenv", "command")

    def __init__(self, uid: str, setenv: list[str]) -> None:
        self.uid = uid
        self.setenv = list(setenv)
        self.command: list[str] = []


def _shell_options(args: argparse.Namespace) -> _ShellOptions:
    """machinectl's shell options, also after NAME: --uid=USER, -E/--setenv=VAR=VALUE, up
    to the command (or "--"); the command's own options are its own. Others are refused,
    not run as the command."""
    options = _ShellOptions(args.uid or "", args.setenv or [])
    rest = list(args.rest)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        word = rest.pop(0)
        if word == "--":
            break
        key, has_value, value = word.partition("=")
        if key in ("--uid", "--setenv", "-E") and not has_value:
            if not rest:
                raise UsageError(f"option '{key}' requires an argument")
            value = rest.pop(0)
        elif key.startswith("-E") and not key.startswith("--") and len(key) > 2:
            key, value = "-E", word[2:]
        elif key not in ("--uid", "--setenv", "-E"):
            raise UsageError(f"unrecognized option '{word}' (put the command after '--' "
                             "if it starts with '-')")
        if key == "--uid":
            options.uid = value
        else:
            options.setenv.append(_environment_entry(value))
    options.command = rest
    for entry in options.setenv:
        _environment_entry(entry)
    return options


def _environment_entry(entry: str) -> str:
    if "=" not in entry or entry.startswith("="):
        raise UsageError(f"invalid environment assignment '{entry}' (use VAR=VALUE)")
    return entry


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    if args.name:
        return cmd_machine_status(args, client)
    from hostel import output
    from hostel.client import bus_address

    props = client.get_all(DAEMON_PATH, "org.hostel1.Daemon")
    if output.wants_properties(args):
        return output.print_properties(args, props)
    print(f"hosteld {props['Version']} on {bus_address()}")
    for path in props["Managers"]:
        client.call(path, "org.freedesktop.DBus.Peer", "Ping")
        print(f"  {path.rsplit('/', 1)[-1]:<11} {path}  answering")
    return 0


def cmd_run(args: argparse.Namespace | SimpleNamespace, client: None) -> int:
    from hostel.machine.runclient import run

    return run(args.rest)


CONNECTS_ITSELF = frozenset({cmd_run})  # run opens its own connection, after parsing its options


MACHINE_COLUMNS = ["MACHINE", "CLASS", "SERVICE", "STATE", "OS", "VERSION", "ADDRESSES"]


def _machine_row(client: Client, name: str, cls: str, state: str,
                 path: str) -> list[str | list[str]]:
    """machinectl list's columns (and STATE: hostel keeps exited machines until reaped)."""
    if not path.startswith(MACHINE_PATH + "/"):  # a KVM guest: GuestManager's object
        return [name, cls, "hostel-guest", state, "", "", []]
    from hostel.client import CallFailed

    try:
        service = client.get_property(path, "org.hostel1.Machine", "Service")
    except CallFailed:  # gone since ListMachines
        return [name, cls, "", state, "", "", []]
    release = _os_release(client, path) if state == "running" else {}
    addresses = _addresses(client, path) if state == "running" else []
    return [name, cls, service, state, release.get("ID", ""), release.get("VERSION_ID", ""),
            addresses]


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    from hostel import output
    from hostel.guest.commands import MANAGER, MANAGER_PATH as GUESTS_PATH

    (machines,) = client.call(MACHINE_PATH, "org.hostel1.MachineManager", "ListMachines")
    # the guests: a container guest is a machine already, a VM guest is not (class vm)
    (guests,) = client.call(GUESTS_PATH, MANAGER, "ListGuests")
    names = {machine[0] for machine in machines}
    machines = list(machines) + [guest for guest in guests if guest[0] not in names
                                 and (args.all or guest[2] == "running")]
    rows = [_machine_row(client, *machine) for machine in machines]
    if args.output == "short":  # the first address, "…" when there are more, as machinectl
        for row in rows:
            row[-1] = row[-1][0] + ("\u2026" if len(row[-1]) > 1 else "") if row[-1] else ""
    output.print_table(args, MACHINE_COLUMNS, rows, "machine")
    return 0


def cmd_terminate(args: argparse.Namespace, client: Client) -> int:
    for name in args.names:
        client.call(MACHINE_PATH, "org.hostel1.MachineManager", "TerminateMachine", "s", name)
    return 0


def parse_signal(text: str) -> int:
    """A signal as systemd takes one: a number, NAME or SIGNAME, RTMIN+N, RTMAX-N."""
    import signal as signals

    name = text.upper()
    name = name[3:] if name.startswith("SIG") else name
    if name.isdigit():
        number = int(name)
    elif name.startswith(("RTMIN", "RTMAX")):
        base = signals.SIGRTMIN if name.startswith("RTMIN") else signals.SIGRTMAX
        offset = name[5:]
        sign = {"+": 1, "-": -1}.get(offset[:1], 0)
        if offset and not (sign and offset[1:].isdigit()):
            raise UsageError(f"invalid signal '{text}'")
        number = int(base) + sign * int(offset[1:] or 0)
    else:
        member = signals.Signals.__members__.get(f"SIG{name}")
        if member is None:
            raise UsageError(f"invalid signal '{text}' (use a name such as SIGTERM, RTMIN+3, "
                             "or a number)")
        number = int(member)
    if not 1 <= number <= int(signals.SIGRTMAX):
        raise UsageError(f"invalid signal '{text}': signals are 1 to {int(signals.SIGRTMAX)}")
    if name.startswith(("RTMIN", "RTMAX")) and number < int(signals.SIGRTMIN):
        raise UsageError(f"invalid signal '{text}': below SIGRTMIN")
    return number


def cmd_kill(args: argparse.Namespace, client: Client) -> int:
    number = parse_signal(args.signal)
    for name in args.names:
        client.call(MACHINE_PATH, "org.hostel1.MachineManager", "KillMachine", "ssi",
                    name, args.kill_whom, number)
    return 0


# Machines as services (machine/services.py): started from the pool, owned by hosteld.

SERVICES = "org.hostel1.MachineServices"
POWEROFF_SIGNAL_OFFSET = 4  # SIGRTMIN+4: what machinectl poweroff sends a booted init
REBOOT_SIGNAL = 2  # SIGINT: machinectl reboot's (systemd's ctrl-alt-del)


def cmd_start(args: argparse.Namespace, client: Client) -> int:
    """machinectl start: NAME from the pool, in the background; hostelctl returns once it runs."""
    for name in args.names:
        client.call(MACHINE_PATH, SERVICES, "StartFromPool", "s", name)
    return 0


def _print_changes(changes: list) -> None:
    """As systemctl (and machinectl) report unit file changes."""
    for kind, path, destination in changes:
        if kind == "symlink":
            print(f"Created symlink {path} \u2192 {destination}.")
        else:
            print(f'Removed "{path}".')


def cmd_enable(args: argparse.Namespace, client: Client) -> int:
    for name in args.names:
        (changes,) = client.call(MACHINE_PATH, SERVICES, "Enable", "s", name)
        _print_changes(changes)
    return 0


def cmd_disable(args: argparse.Namespace, client: Client) -> int:
    for name in args.names:
        (changes,) = client.call(MACHINE_PATH, SERVICES, "Disable", "s", name)
        _print_changes(changes)
    return 0


def _signal_leaders(client: Client, names: list[str], number: int) -> int:
    for name in names:
        client.call(MACHINE_PATH, "org.hostel1.MachineManager", "KillMachine", "ssi",
                    name, "leader", number)
    return 0


def cmd_poweroff(args: argparse.Namespace, client: Client) -> int:
    """machinectl poweroff: ask the booted init to shut down (SIGRTMIN+4)."""
    import signal as signals

    return _signal_leaders(client, args.names, int(signals.SIGRTMIN) + POWEROFF_SIGNAL_OFFSET)


def cmd_reboot(args: argparse.Namespace, client: Client) -> int:
    """machinectl reboot: ask the booted init to reboot (SIGINT); its exit status 133 (or
    reboot(2)) makes hosteld start it again."""
    return _signal_leaders(client, args.names, REBOOT_SIGNAL)


def cmd_logs(args: argparse.Namespace, client: Client) -> int:
    from hostel.machine.logs_client import show

    if args.lines is not None and args.lines < 0:
        raise UsageError(f"invalid number of lines: {args.lines} (0 or more)")
    return show(client, args.name, args.lines, args.follow, sys.stdout.buffer)


# Parser --------------------------------------------------------------------------

# Verbs that list or show take the output options (-o, --no-legend, -p, --value, ...),
# in every group, so the conventions hold everywhere without each module adding them.
_OUTPUT_VERBS = ("list", "status", "show")


def _verb(sub: argparse._SubParsersAction, name: str, help_text: str,
          handler: Handler, add_help: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, add_help=add_help)
    group = sub._prog_prefix.split(" ", 1)[1:]  # "hostelctl cryptsetup" -> ["cryptsetup"]
    parser.set_defaults(handler=handler, verb=" ".join(group + [name]))
    if name in _OUTPUT_VERBS:
        from hostel.output import add_options

        add_options(parser)
    return parser


def _fill_cryptsetup(sub: argparse._SubParsersAction) -> None:
    from hostel.cryptsetup.commands import add_commands

    add_commands(sub, _verb)


def _fill_guest(sub: argparse._SubParsersAction) -> None:
    from hostel.guest.commands import add_commands
    from hostel.guest.image_commands import add_guest_run

    add_commands(sub, _verb)
    add_guest_run(sub, _verb)


def _fill_image(sub: argparse._SubParsersAction) -> None:
    from hostel.guest.image_commands import add_image_commands

    add_image_commands(sub, _verb)


_GROUPS = (("cryptsetup", "encrypted volumes from crypttab", _fill_cryptsetup),
           ("guest", "virtual-machine guests", _fill_guest),
           ("image", "OCI images for guests", _fill_image))

EPILOG = ("Exit status: 0 success, 1 failure, 2 usage error, 4 the operation requires root "
          "(systemctl's code for insufficient privileges), 69 hosteld or the bus unreachable, "
          "130 interrupted.")


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or with `wanted`, only that group's subcommands filled in."""
    import argparse

    from hostel import __version__

    parser = argparse.ArgumentParser(
        prog="hostelctl",
        description="Control hosteld: namespace containers, guests and encrypted volumes.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"hostel {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = _verb(sub, "run", "run a command in a new container (systemd-nspawn options; "
                "'hostelctl run --help' lists them)", cmd_run, add_help=False)
    run.add_argument("rest", nargs=argparse.REMAINDER)
    _verb(sub, "list", "list machines (running, and with --all also the guests that are not)",
          cmd_list)
    status = _verb(sub, "status", "show the daemon's status, or a machine's (or VM guest's) "
                   "with NAME", cmd_status)
    status.add_argument("name", nargs="?", metavar="NAME")
    show = _verb(sub, "show", "show a machine's (or VM guest's) properties, or hosteld's "
                 "without NAME", cmd_show)
    show.add_argument("name", nargs="?", metavar="NAME")
    terminate = _verb(sub, "terminate", "terminate machines", cmd_terminate)
    terminate.add_argument("names", nargs="+", metavar="NAME")
    kill = _verb(sub, "kill", "send a signal to machines' processes", cmd_kill)
    kill.add_argument("names", nargs="+", metavar="NAME")
    kill.add_argument("--signal", "-s", default="SIGTERM", metavar="SIGNAL",
                      help="the signal: a name (SIGTERM, TERM), RTMIN+N or a number")
    kill.add_argument("--kill-whom", choices=["leader", "all"], default="all",
                      help="whom to signal: the leader or all processes (the default)")
    for name, help_text, handler in (
            ("start", "start machines from the pool (/var/lib/machines/NAME, NAME.raw; "
             "STATE_DIR/machines) in the background, booted, as systemd-nspawn@NAME.service",
             cmd_start),
            ("enable", "start these pool machines whenever hosteld starts", cmd_enable),
            ("disable", "no longer start these machines with hosteld (a running one keeps "
             "running)", cmd_disable),
            ("poweroff", "ask booted machines to power off (SIGRTMIN+4 to init)", cmd_poweroff),
            ("reboot", "ask booted machines to reboot (SIGINT to init); hosteld starts them "
             "again", cmd_reboot)):
        _verb(sub, name, help_text, handler).add_argument("names", nargs="+", metavar="NAME")
    logs = _verb(sub, "logs", "show a pool machine's console log", cmd_logs)
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep showing new output until the machine ends (or Ctrl-C)")
    logs.add_argument("-n", "--lines", type=int, metavar="N",
                      help="only the last N lines (default: all; 10 with --follow)")
    shell = _verb(sub, "shell", "open a shell (or run CMD) in a machine, on a pty; "
                  "^]^]^] (Ctrl-] three times within a second) leaves it", cmd_shell)
    shell.add_argument("--uid", metavar="USER", help="run as USER (as USER@NAME does)")
    shell.add_argument("-E", "--setenv", action="append", metavar="VAR=VALUE",
                       help="set an environment variable (repeatable)")
    shell.add_argument("name", metavar="[USER@]NAME")
    shell.add_argument("rest", nargs=argparse.REMAINDER, metavar="CMD")

    # The groups' commands live in their own modules; only the group named on the
    # command line is filled in, so `hostelctl list` does not import them all.
    for group, help_text, fill in _GROUPS:
        group_parser = sub.add_parser(group, help=help_text, description=help_text)
        group_parser.set_defaults(group_parser=group_parser)
        if wanted in (None, group):
            fill(group_parser.add_subparsers(title=f"{group} commands", metavar="COMMAND"))
    return parser


_VERBS = ("run", "list", "status", "show", "terminate", "kill", "shell", "start", "enable",
          "disable", "poweroff", "reboot", "logs")
EXIT_USAGE = 2
EXIT_NEEDS_ROOT = 4  # systemctl's (LSB's) "user had insufficient privilege"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling: no traceback
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # and a second one neither
        print("hostelctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hostelctl list | head -1`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # no second error at exit's flush
        return EXIT_FAILED


def _main(argv: list[str]) -> int:
    first = argv[0] if argv else None
    if first == "run":  # the hot path: its own parser does all the work
        from types import SimpleNamespace

        return _invoke(cmd_run, SimpleNamespace(rest=argv[1:], verb="run"))
    known = first in _VERBS or any(first == group for group, _h, _f in _GROUPS)
    parser = build_parser(first if known else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = extra + args.rest  # options of pass-through verbs (launch, ...)
    handler = getattr(args, "handler", None)
    if handler is None:  # no verb: the help of the group named, else the whole tree's
        getattr(args, "group_parser", parser).print_help(sys.stderr)
        return EXIT_USAGE
    return _invoke(handler, args)


def _invoke(handler: Handler, args: argparse.Namespace | SimpleNamespace) -> int:
    """Run a command, turning the daemon's and the bus's failures into messages and exit codes."""
    from hostel.client import CallFailed, Client, DaemonUnavailable, NeedsRoot

    try:
        if handler in CONNECTS_ITSELF:
            return handler(args, None)
        with Client() as client:
            return handler(args, client)
    except UsageError as e:
        print(f"hostelctl {args.verb}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UnicodeError:  # sys.argv keeps undecodable bytes as surrogates; D-Bus wants UTF-8
        print(f"hostelctl {args.verb}: arguments must be valid UTF-8", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnavailable as e:
        print(f"hostelctl: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except NeedsRoot as e:
        print(f"hostelctl {args.verb}: {e}", file=sys.stderr)
        return EXIT_NEEDS_ROOT
    except CallFailed as e:
        print(f"hostelctl {args.verb}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (ConnectionError, EOFError) as e:  # the bus went away under us
        print(f"hostelctl {args.verb}: lost the connection to the system bus ({e})",
              file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
