"""hostelctl: a thin client of hosteld, in the manner of machinectl.

Start-up time is the product here (see DESIGN.md): `run` parses its own
options (machine/cmdline.py), argparse is imported for the other commands
only, and the D-Bus client when a command needs the daemon.

Exit codes: 0 success, 1 the operation failed, 2 usage error,
69 (EX_UNAVAILABLE) the bus or hosteld cannot be reached."""
from __future__ import annotations

import sys

TYPE_CHECKING = False  # importing typing costs hostelctl 3 ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Callable

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69

DAEMON_PATH = "/org/hostel1"
MACHINE_PATH = "/org/hostel1/machine"
CRYPTSETUP_PATH = "/org/hostel1/cryptsetup"
GUEST_PATH = "/org/hostel1/guest"

Handler = "Callable[[argparse.Namespace, object], int]"


# Commands ------------------------------------------------------------------------

def _machine(client: object, name: str) -> tuple[str, dict]:
    (path,) = client.call(MACHINE_PATH, "org.hostel1.MachineManager", "GetMachine", "s", name)
    return path, client.get_all(path, "org.hostel1.Machine")


def _since(usec: int) -> str:
    import time

    if not usec:
        return "n/a"
    ago = max(0, int(time.time() - usec / 1e6))
    stamp = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(usec / 1e6))
    return f"{stamp}; {ago // 60}min {ago % 60}s ago" if ago >= 60 else f"{stamp}; {ago}s ago"


def cmd_machine_status(name: str, client: object) -> int:
    """machinectl status, in its layout."""
    from hostel.client import CallFailed

    path, props = _machine(client, name)
    try:
        (release,) = client.call(path, "org.hostel1.Machine", "GetOSRelease")
        os_name = release.get("PRETTY_NAME") or release.get("NAME", "")
    except CallFailed:
        os_name = ""
    rows = [("Since", _since(props["Timestamp"])), ("Leader", str(props["Leader"])),
            ("Service", f"{props['Service']}; class {props['Class']}"),
            ("Root", props["RootDirectory"]),
            ("Iface", " ".join(map(str, props["NetworkInterfaces"])) or "-"),
            ("OS", os_name or "-"), ("Unit", props["Unit"] or "-"), ("State", props["State"])]
    print(props["Name"])
    for key, value in rows:
        print(f"{key:>16}: {value}")
    return 0


def cmd_show(args: argparse.Namespace, client: object) -> int:
    """machinectl show: every property as Name=value."""
    _path, props = _machine(client, args.name)
    for key in sorted(props):
        value = props[key]
        if key == "Id":
            value = bytes(value).hex()
        elif isinstance(value, list):
            value = " ".join(map(str, value))
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v[1]}" for k, v in sorted(value.items()))
        print(f"{key}={value}")
    return 0


def cmd_shell(args: argparse.Namespace, client: object) -> int:
    """machinectl shell: a pty in the machine, relayed to this terminal until it hangs up."""
    import os

    user, _, name = args.name.rpartition("@")
    path, _props = _machine(client, name)
    command = list(args.rest)
    env = [f"TERM={os.environ['TERM']}"] if os.environ.get("TERM") else []
    master, _pty = client.call(path, "org.hostel1.Machine", "OpenShell", "ssasas", user,
                               command[0] if command else "", command, env)
    from hostel.machine.ptyrelay import relay

    relay(master)  # a plain int descriptor, now ours: relay closes it
    return 0


def cmd_status(args: argparse.Namespace, client: object) -> int:
    if args.name:
        return cmd_machine_status(args.name, client)
    from hostel.client import bus_address

    props = client.get_all(DAEMON_PATH, "org.hostel1.Daemon")
    print(f"hosteld {props['Version']} on {bus_address()}")
    for path in props["Managers"]:
        client.call(path, "org.freedesktop.DBus.Peer", "Ping")
        print(f"  {path.rsplit('/', 1)[-1]:<11} {path}  answering")
    return 0


def cmd_run(args: argparse.Namespace, client: object) -> int:
    from hostel.machine.runclient import run

    return run(args.rest)


cmd_run.needs_daemon = False  # it opens its own connection, after parsing its options


def cmd_list(args: argparse.Namespace, client: object) -> int:
    (machines,) = client.call(MACHINE_PATH, "org.hostel1.MachineManager", "ListMachines")
    if machines:
        print(f"{'MACHINE':<20} {'CLASS':<10} {'STATE':<10}")
        for name, cls, state, _path in machines:
            print(f"{name:<20} {cls:<10} {state:<10}")
    print(f"\n{len(machines)} machines listed.")
    return 0


def cmd_terminate(args: argparse.Namespace, client: object) -> int:
    for name in args.names:
        client.call(MACHINE_PATH, "org.hostel1.MachineManager", "TerminateMachine", "s", name)
    return 0


def cmd_kill(args: argparse.Namespace, client: object) -> int:
    import signal as signals

    sig = args.signal.upper()
    number = int(sig) if sig.isdigit() else int(getattr(signals, sig if sig.startswith("SIG") else f"SIG{sig}"))
    for name in args.names:
        client.call(MACHINE_PATH, "org.hostel1.MachineManager", "KillMachine", "ssi",
                    name, args.kill_whom, number)
    return 0


# Parser --------------------------------------------------------------------------

def _verb(sub: argparse._SubParsersAction, name: str, help_text: str,
          handler: Handler, add_help: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, add_help=add_help)
    group = sub._prog_prefix.split(" ", 1)[1:]  # "hostelctl cryptsetup" -> ["cryptsetup"]
    parser.set_defaults(handler=handler, verb=" ".join(group + [name]))
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


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or with `wanted`, only that group's subcommands filled in."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="hostelctl",
        description="Control hosteld: namespace containers, guests and encrypted volumes.",
        epilog="Exit status: 0 success, 1 failure, 2 usage error, 69 hosteld or the bus unreachable.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = _verb(sub, "run", "run a command in a new container (systemd-nspawn options; "
                "'hostelctl run --help' lists them)", cmd_run, add_help=False)
    run.add_argument("rest", nargs=argparse.REMAINDER)
    _verb(sub, "list", "list running machines", cmd_list)
    status = _verb(sub, "status", "show the daemon's status, or a machine's with NAME", cmd_status)
    status.add_argument("name", nargs="?")
    show = _verb(sub, "show", "show a machine's properties", cmd_show)
    show.add_argument("name")
    terminate = _verb(sub, "terminate", "terminate machines", cmd_terminate)
    terminate.add_argument("names", nargs="+", metavar="NAME")
    kill = _verb(sub, "kill", "send a signal to machines' processes", cmd_kill)
    kill.add_argument("names", nargs="+", metavar="NAME")
    kill.add_argument("--signal", "-s", default="SIGTERM")
    kill.add_argument("--kill-whom", choices=["leader", "all"], default="all")
    shell = _verb(sub, "shell", "open a shell (or run CMD) in a machine, on a pty", cmd_shell)
    shell.add_argument("name", metavar="NAME")
    shell.add_argument("rest", nargs=argparse.REMAINDER, metavar="CMD")

    # The groups' commands live in their own modules; only the group named on the
    # command line is filled in, so `hostelctl list` does not import them all.
    for group, help_text, fill in _GROUPS:
        group_parser = sub.add_parser(group, help=help_text)
        if wanted in (None, group):
            fill(group_parser.add_subparsers(title=f"{group} commands", metavar="COMMAND"))
    return parser


_VERBS = ("run", "list", "status", "show", "terminate", "kill", "shell")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return _invoke(handler, args)


def _invoke(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command, turning the daemon's and the bus's failures into messages and exit codes."""
    from hostel.client import CallFailed, Client, DaemonUnavailable

    try:
        if not getattr(handler, "needs_daemon", True):
            return handler(args, None)
        with Client() as client:
            return handler(args, client)
    except DaemonUnavailable as e:
        print(f"hostelctl: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except CallFailed as e:
        print(f"hostelctl {args.verb}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (ConnectionError, EOFError) as e:  # the bus went away under us
        print(f"hostelctl {args.verb}: lost the connection to the system bus ({e})",
              file=sys.stderr)
        return EXIT_UNAVAILABLE

if __name__ == "__main__":
    sys.exit(main())
