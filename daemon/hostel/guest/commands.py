"""hostelctl guest launch: the lguest launcher's command line, run through hosteld.

Imported by hostelctl at every start: standard library only, nothing heavy
(no dbus_fast, no asyncio); the client arrives as an argument. The guest's
console is this terminal: stdout is passed to hosteld as a file descriptor,
and hostelctl waits for the guest to end and exits with its status. The guest
ends with its client: Ctrl-C, SIGTERM and SIGHUP (the terminal went away)
all terminate it before hostelctl exits."""
from __future__ import annotations

import os
import signal
import sys
import time

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable

MANAGER_PATH = "/org/hostel1/guest"
MANAGER = "org.hostel1.GuestManager"
GUEST = "org.hostel1.Guest"
EXIT_FAILED = 1
POLL_SECONDS = 0.05
STDIN, STDOUT = 0, 1  # the descriptors themselves: the terminal, whatever sys.std* wrap


def _absolute(path: str) -> str:
    return os.path.abspath(path)


def launch_settings(args: "argparse.Namespace") -> dict[str, tuple[str, "Any"]]:
    """The a{sv} StartGuest takes, from the launcher's options."""
    settings = {"MemoryMB": ("u", args.memory_mb), "Kernel": ("s", _absolute(args.kernel)),
                "CommandLine": ("s", " ".join(args.kernel_args)),
                "Backend": ("s", args.backend), "Verbose": ("b", args.verbose),
                "CPUs": ("u", args.cpus), "OnReboot": ("s", args.on_reboot)}
    if args.initrd:
        settings["Initrd"] = ("s", _absolute(args.initrd))
    if args.block:
        settings["Block"] = ("a(sb)", [(_absolute(path), False) for path in args.block])
    if args.tunnet:
        settings["Network"] = ("as", args.tunnet)
    if args.rng:
        settings["Rng"] = ("b", True)
    if args.chroot:
        settings["Chroot"] = ("s", _absolute(args.chroot))
    if args.username:
        settings["User"] = ("s", args.username)
    return settings


ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _handle_signals(handler: "Any") -> None:
    """Only the main thread may set handlers; called on another (a program running
    cmd_launch on a thread of its own), the signals stay that program's."""
    try:
        for sig in ENDING_SIGNALS:
            signal.signal(sig, handler)
    except ValueError:
        pass


def _end_guest_on_signals() -> None:
    """SIGTERM and SIGHUP end the guest as Ctrl-C (SIGINT) does."""
    _handle_signals(_interrupt)


def _ignore_signals() -> None:
    """While the guest is being terminated: a second signal must not cut that short."""
    _handle_signals(signal.SIG_IGN)


ESCAPE_HINT = "Press ^] three times within 1s to kill the guest."


def escaped_line(name: str) -> str:
    """What the client says after ^]^]^] ended the guest: systemd-nspawn's words."""
    return f"Guest {name} terminated by signal KILL."


class _ConsoleTerminal:
    """This terminal as a launched guest's console. ^]^]^] kills the guest, through
    hostelctl run's escape relay (typed input reaches hosteld through a pty of ours,
    watched on its way); characters go to the guest as typed, not by line (else the
    escape would wait for Enter), while ^C still ends the guest and newlines are still
    translated on output, as in QEMU's stdio console."""

    def __init__(self) -> None:
        import termios

        from hostel.machine.runclient import _EscapeRelay

        self.saved = termios.tcgetattr(STDIN)
        self.escape = _EscapeRelay()

    def enter(self) -> None:
        import termios

        mode = termios.tcgetattr(STDIN)
        mode[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP |
                     termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
        mode[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(STDIN, termios.TCSADRAIN, mode)  # what was typed is kept
        self.escape.start()

    def close(self) -> None:
        import termios

        self.escape.close()
        termios.tcsetattr(STDIN, termios.TCSADRAIN, self.saved)


def cmd_launch(args: "argparse.Namespace", client: "Any") -> int:
    name = args.name or f"guest-{os.getpid()}"
    settings = launch_settings(args)
    settings["Console"] = ("h", STDOUT)
    settings["ConsoleInput"] = ("h", STDIN)
    terminal = _ConsoleTerminal() if os.isatty(STDIN) else None
    if terminal is None:
        return _launch(args, client, name, settings, None)
    settings["ConsoleInput"] = ("h", terminal.escape.slave)
    print(ESCAPE_HINT, file=sys.stderr, flush=True)
    try:
        terminal.enter()
        code = _launch(args, client, name, settings, terminal)
    finally:
        terminal.close()
    if terminal.escape.escaped:
        print(escaped_line(name), file=sys.stderr)
        return EXIT_FAILED
    return code


def _launch(args: "argparse.Namespace", client: "Any", name: str,
            settings: dict[str, tuple[str, "Any"]], terminal: _ConsoleTerminal | None) -> int:
    from hostel.client import CallFailed

    # hosteld holds the read end; the write end closes only when this process ends,
    # however it ends (SIGKILL too), and the guest ends with it
    alive_r, _alive_w = os.pipe()
    settings["ClientAlive"] = ("h", alive_r)
    _end_guest_on_signals()
    path = None
    try:
        (path,) = client.call(MANAGER_PATH, MANAGER, "StartGuest", "sa{sv}", name, settings)
        os.close(alive_r)
        if args.verbose:
            print(f"hostelctl guest launch: guest {name} at {path}", file=sys.stderr)
        while client.get_property(path, GUEST, "State") != "exited":
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        _ignore_signals()
        try:
            client.call(MANAGER_PATH, MANAGER, "TerminateGuest", "s", name)
        except CallFailed:
            pass  # it never started, or ended meanwhile
        if path is None:
            return EXIT_FAILED
    _ignore_signals()
    props = client.get_all(path, GUEST)
    try:
        client.call(MANAGER_PATH, MANAGER, "TerminateGuest", "s", name)  # forget it
    except CallFailed:
        pass  # another client forgot it first
    if (props["ExitReason"] != "poweroff" or args.verbose) and \
            not (terminal is not None and terminal.escape.escaped):  # said by cmd_launch
        try:
            print(f"hostelctl guest launch: {name}: {props['ExitDetail']}", file=sys.stderr)
        except OSError:
            pass  # the terminal is gone (SIGHUP): the exit status still tells
    return props["ExitStatus"] if props["ExitReason"] == "poweroff" else EXIT_FAILED


def _cmd_console(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.guest.console_client import cmd_console

    return cmd_console(args, client)


def _guest_path(client: "Any", name: str) -> str | None:
    (guests,) = client.call(MANAGER_PATH, MANAGER, "ListGuests")
    return next((path for guest, _cls, _state, path in guests if guest == name), None)


def cmd_status(args: "argparse.Namespace", client: "Any") -> int:
    """One guest's state, devices and where its console went."""
    path = _guest_path(client, args.name)
    if path is None:
        print(f"hostelctl guest status: no guest named {args.name!r} "
              "('hostelctl guest list' shows the guests)", file=sys.stderr)
        return EXIT_FAILED
    props = client.get_all(path, GUEST)
    from hostel.output import print_properties, wants_properties

    if wants_properties(args):  # -p, --value, -o json
        return print_properties(args, props)
    vm = props["Class"] == "vm"
    print(f"{props['Name']} ({props['Class']})")
    print(f"       State: {props['State']}")
    if props["Image"]:
        print(f"       Image: {props['Image']}")
    print(f"      Leader: {props['Leader']} ({'the launcher' if vm else 'its payload'})")
    if vm:  # a container has neither kernel nor devices of its own
        print(f"      Kernel: {props['Kernel']} ({props['Backend']}, {props['MemoryMB']} MiB)")
        print(f"     Devices: {', '.join(props['Devices'])}")
        print(f" Console log: {props['ConsoleLog'] or '-'}")
    if props["State"] == "exited":
        print(f"        Exit: {props['ExitReason']} (status {props['ExitStatus']}): "
              f"{props['ExitDetail']}")
    return 0


def cmd_list(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.output import print_table

    (guests,) = client.call(MANAGER_PATH, MANAGER, "ListGuests")
    print_table(args, ["GUEST", "CLASS", "STATE"],
                [[name, cls, state] for name, cls, state, _path in guests], "guest")
    return 0


def cmd_terminate(args: "argparse.Namespace", client: "Any") -> int:
    client.call(MANAGER_PATH, MANAGER, "TerminateGuest", "s", args.name)
    return 0


def add_launch_arguments(parser: "argparse.ArgumentParser") -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="say what happens")
    parser.add_argument("--tunnet", "-t", action="append", metavar="IP:MAC|bridge:BR:MAC",
                        help="a network device on a tap (with that host address, or on a bridge)")
    parser.add_argument("--block", "-b", action="append", metavar="FILE",
                        help="a block device backed by FILE")
    parser.add_argument("--rng", "-r", action="store_true", help="a random number generator")
    parser.add_argument("--initrd", "-i", metavar="FILE", help="an initial ramdisk")
    parser.add_argument("--username", "-u", metavar="USER",
                        help="run the launcher as USER after setup")
    parser.add_argument("--chroot", "-c", metavar="DIR", help="chroot the launcher into DIR after setup")
    parser.add_argument("--backend", choices=["kvm", "lguest"], default="kvm",
                        help="the hypervisor backend (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=1, metavar="N",
                        help="virtual CPUs (default: %(default)s)")
    parser.add_argument("--on-reboot", choices=["exit", "restart"], default="exit",
                        help="what a guest reboot does: end the guest or boot it again "
                             "(default: %(default)s)")
    parser.add_argument("--name", "-M", help="the guest's name (default: guest-PID)")
    parser.add_argument("memory_mb", metavar="MEM-MB", type=int, help="guest memory in MiB")
    parser.add_argument("kernel", metavar="KERNEL", help="vmlinux (ELF) or bzImage")
    parser.add_argument("kernel_args", metavar="KERNEL-ARGS", nargs="*",
                        help="the kernel command line")


def add_commands(sub: "argparse._SubParsersAction", verb: "Callable[..., argparse.ArgumentParser]") -> None:
    """Add the guest verbs to hostelctl's 'guest' sub-parser."""
    launch = verb(sub, "launch", "launch a kernel as a guest, lguest launcher style; the "
                  "console is this terminal", cmd_launch)
    add_launch_arguments(launch)
    console = verb(sub, "console", "attach this terminal to a running guest's console "
                   "(^]^]^] detaches, leaving the guest running)", _cmd_console)
    console.add_argument("name")
    verb(sub, "list", "list the guests", cmd_list)
    status = verb(sub, "status", "show a guest's state and where its console goes", cmd_status)
    status.add_argument("name")
    terminate = verb(sub, "terminate", "stop a guest (or forget an exited one)", cmd_terminate)
    terminate.add_argument("name")
