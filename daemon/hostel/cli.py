"""hostelctl: a thin client of hosteld, in the manner of machinectl.

Start-up time is the product here (see DESIGN.md): only argparse is imported
up front; the D-Bus client is imported when a command needs the daemon.

Exit codes: 0 success, 1 the operation failed, 2 usage error,
69 (EX_UNAVAILABLE) the bus or hosteld cannot be reached."""
from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # importing typing costs hostelctl 3 ms at every start
if TYPE_CHECKING:
    from typing import Callable

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69

DAEMON_PATH = "/org/hostel1"
MACHINE_PATH = "/org/hostel1/machine"
CRYPTSETUP_PATH = "/org/hostel1/cryptsetup"
GUEST_PATH = "/org/hostel1/guest"

Handler = "Callable[[argparse.Namespace, object], int]"


def _planned(issue: str) -> str:
    return f"(not implemented yet: {issue})"


# Commands ------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace, client: object) -> int:
    if args.name:
        print(f"hostelctl status NAME: {_planned('issue 3, machines')}", file=sys.stderr)
        return EXIT_FAILED
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


def cmd_cryptsetup_list(args: argparse.Namespace, client: object) -> int:
    (volumes,) = client.call(CRYPTSETUP_PATH, "org.hostel1.CryptsetupManager", "ListVolumes")
    for name, device, state, _path in volumes:
        print(f"{name:<20} {device:<40} {state}")
    return 0


def cmd_image_list(args: argparse.Namespace, client: object) -> int:
    (images,) = client.call(GUEST_PATH, "org.hostel1.GuestManager", "ListImages")
    for name, digest, size in images:
        print(f"{name:<24} {digest:<20} {size}")
    return 0


def not_yet(issue: str) -> Handler:
    def handler(args: argparse.Namespace, client: object) -> int:
        print(f"hostelctl {args.verb}: not implemented yet ({issue})", file=sys.stderr)
        return EXIT_FAILED
    handler.needs_daemon = False
    return handler


# Parser --------------------------------------------------------------------------

def _verb(sub: argparse._SubParsersAction, name: str, help_text: str,
          handler: Handler, add_help: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, add_help=add_help)
    group = sub._prog_prefix.split(" ", 1)[1:]  # "hostelctl cryptsetup" -> ["cryptsetup"]
    parser.set_defaults(handler=handler, verb=" ".join(group + [name]))
    return parser


def build_parser() -> argparse.ArgumentParser:
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
    show = _verb(sub, "show", f"show a machine's properties {_planned('issue 3')}",
                 not_yet("issue 3"))
    show.add_argument("name")
    terminate = _verb(sub, "terminate", "terminate machines", cmd_terminate)
    terminate.add_argument("names", nargs="+", metavar="NAME")
    kill = _verb(sub, "kill", "send a signal to machines' processes", cmd_kill)
    kill.add_argument("names", nargs="+", metavar="NAME")
    kill.add_argument("--signal", "-s", default="SIGTERM")
    kill.add_argument("--kill-whom", choices=["leader", "all"], default="all")
    shell = _verb(sub, "shell", f"open a shell in a machine {_planned('issue 3')}",
                  not_yet("issue 3"))
    shell.add_argument("rest", nargs=argparse.REMAINDER)

    crypt = sub.add_parser("cryptsetup", help="encrypted volumes from crypttab")
    crypt_sub = crypt.add_subparsers(title="cryptsetup commands", metavar="COMMAND")
    _verb(crypt_sub, "list", "list volumes", cmd_cryptsetup_list)
    for name, text in [("status", "show a volume"), ("check-key", "check a volume's key"),
                       ("attach", "attach a volume"), ("detach", "detach a volume")]:
        verb = _verb(crypt_sub, name, f"{text} {_planned('issue 4')}", not_yet("issue 4"))
        verb.add_argument("name")

    guest = sub.add_parser("guest", help="virtual-machine guests")
    guest_sub = guest.add_subparsers(title="guest commands", metavar="COMMAND")
    launch = _verb(guest_sub, "launch", f"launch a kernel, lguest launcher style "
                   f"{_planned('issue 5')}", not_yet("issue 5"))
    launch.add_argument("rest", nargs=argparse.REMAINDER)
    grun = _verb(guest_sub, "run", f"run an imported OCI image {_planned('issue 6')}",
                 not_yet("issue 6"))
    grun.add_argument("rest", nargs=argparse.REMAINDER)

    image = sub.add_parser("image", help="OCI images for guests")
    image_sub = image.add_subparsers(title="image commands", metavar="COMMAND")
    imp = _verb(image_sub, "import", f"import a docker-save or OCI archive "
                f"{_planned('issue 6')}", not_yet("issue 6"))
    imp.add_argument("rest", nargs=argparse.REMAINDER)
    _verb(image_sub, "list", "list imported images", cmd_image_list)
    remove = _verb(image_sub, "remove", f"remove an image {_planned('issue 6')}",
                   not_yet("issue 6"))
    remove.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = extra + args.rest  # options of pass-through verbs (run, launch, ...)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
