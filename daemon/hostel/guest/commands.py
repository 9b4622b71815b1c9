"""hostelctl guest launch: the lguest launcher's command line, run through hosteld.

Imported by hostelctl at every start: standard library only, nothing heavy
(no dbus_fast, no asyncio); the client arrives as an argument. The guest's
console is this terminal: stdout is passed to hosteld as a file descriptor,
and hostelctl waits for the guest to end and exits with its status."""
from __future__ import annotations

import os
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
                "Backend": ("s", args.backend), "Verbose": ("b", args.verbose)}
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


def cmd_launch(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.client import CallFailed

    name = args.name or f"guest-{os.getpid()}"
    settings = launch_settings(args)
    settings["Console"] = ("h", STDOUT)
    settings["ConsoleInput"] = ("h", STDIN)
    (path,) = client.call(MANAGER_PATH, MANAGER, "StartGuest", "sa{sv}", name, settings)
    if args.verbose:
        print(f"hostelctl guest launch: guest {name} at {path}", file=sys.stderr)
    try:
        while client.get_property(path, GUEST, "State") != "exited":
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        client.call(MANAGER_PATH, MANAGER, "TerminateGuest", "s", name)
    props = client.get_all(path, GUEST)
    try:
        client.call(MANAGER_PATH, MANAGER, "TerminateGuest", "s", name)  # forget it
    except CallFailed:
        pass  # another client forgot it first
    if props["ExitReason"] != "poweroff" or args.verbose:
        print(f"hostelctl guest launch: {name}: {props['ExitDetail']}", file=sys.stderr)
    return props["ExitStatus"] if props["ExitReason"] == "poweroff" else EXIT_FAILED


def cmd_list(args: "argparse.Namespace", client: "Any") -> int:
    (guests,) = client.call(MANAGER_PATH, MANAGER, "ListGuests")
    if guests:
        print(f"{'GUEST':<24} {'CLASS':<6} STATE")
        for name, cls, state, _path in guests:
            print(f"{name:<24} {cls:<6} {state}")
    print(f"\n{len(guests)} guests listed.")
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
    verb(sub, "list", "list the guests", cmd_list)
    terminate = verb(sub, "terminate", "stop a guest (or forget an exited one)", cmd_terminate)
    terminate.add_argument("name")
