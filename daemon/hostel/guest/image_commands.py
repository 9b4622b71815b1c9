"""hostelctl image import | pull | inspect | list | remove, and guest run --image.

Imported by hostelctl at every start: standard library only, nothing heavy
(no dbus_fast, no asyncio); the client arrives as an argument."""
from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable

GUEST_PATH = "/org/hostel1/guest"
MANAGER = "org.hostel1.GuestManager"
GUEST = "org.hostel1.Guest"
PROGRESS_INTERVAL = 0.1
VM_POLL_SECONDS = 0.05
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# hosteld's answer when a container's executable is missing or not executable: the
# payload's status, as a VM's init gives it (images_service.CommandNotRunnable)
CANNOT_RUN = {"org.hostel1.Error.CommandNotFound": 127,
              "org.hostel1.Error.CommandNotExecutable": 126}
# When the hosteld that started a guest is gone, its run's client says so and exits with
# hostelctl's status for an unreachable hosteld (cli.EXIT_UNAVAILABLE); the guest goes on.
EXIT_DAEMON_LOST = 69
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
# The bus's word that org.hostel1 changed hands (its owner died, or another took over).
OWNER_CHANGES = dict(type="signal", sender="org.freedesktop.DBus",
                     interface="org.freedesktop.DBus", member="NameOwnerChanged",
                     arg0="org.hostel1")


def hosteld_gone(client: "Any") -> bool:
    """After a call failed with NoReply (what the bus answers when the callee disconnected
    before replying, and after its reply timeout): whether nobody owns org.hostel1 now."""
    from hostel.client import CallFailed, DaemonUnavailable

    try:
        client.call(GUEST_PATH, "org.freedesktop.DBus.Peer", "Ping")
    except DaemonUnavailable:
        return True
    except CallFailed:  # an error is an answer too: someone owns the name
        pass
    return False


def daemon_lost(name: str) -> int:
    """What a run's client says when hosteld dies under it (either isolation): the guest
    does not depend on hosteld or on this client, and the next hosteld takes it back."""
    print(f"hostelctl guest run: hosteld stopped while guest {name} was running; the guest "
          "goes on without this client, and hosteld takes it back when it starts again "
          f"('hostelctl guest list'; 'hostelctl guest terminate {name}' ends it)",
          file=sys.stderr, flush=True)
    return EXIT_DAEMON_LOST


def _human(size: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.1f}{unit}" if unit != "B" else f"{size}B"
        size /= 1024
    return f"{size}B"


def _transfer(client: "Any", verb: str, what: str, key: str, member: str, signature: str,
              args: tuple["Any", ...], options: dict[str, tuple[str, "Any"]]) -> "Any":
    """image_transfer.run_transfer; Ctrl-C's cancellation said plainly, exit 130."""
    from hostel.guest.image_transfer import Interrupted, run_transfer

    try:
        return run_transfer(client, what, key, member, signature, args, options)
    except Interrupted as e:
        print(f"hostelctl image {verb}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def _stdin_options() -> dict[str, tuple[str, "Any"]]:
    """`import -`: fd 0 itself goes to hosteld (a pipe is streamed, never spooled here)."""
    import stat

    from hostel.cli import UsageError

    try:
        st = os.fstat(0)
    except OSError:
        raise UsageError("'-' reads the archive from standard input, which is closed") from None
    if os.isatty(0):
        raise UsageError("'-' reads the archive from standard input, which is a terminal; "
                         "pipe a tar into it (docker save IMAGE | hostelctl image import -)")
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return {"Source": ("h", 0), "Size": ("t", size)}


def cmd_import(args: "argparse.Namespace", client: "Any") -> int:
    if args.path == "-":
        path, options, shown = "-", _stdin_options(), "standard input"
    else:
        path = shown = os.path.abspath(args.path)
        options = {}
    name = args.name or ""
    imported = _transfer(client, "import", f"importing {shown}", name or path, "ImportImageEx",
                         "ssa{sv}", (path, name), options)
    print(f"imported {shown} as image {imported}")
    return 0


def cmd_pull(args: "argparse.Namespace", client: "Any") -> int:
    options: dict[str, tuple[str, Any]] = {}
    if args.tls_verify is not None:
        options["TLSVerify"] = ("b", args.tls_verify)
    pulled = _transfer(client, "pull", f"pulling {args.reference}", args.reference,
                       "PullImage", "ssa{sv}", (args.reference, args.name or ""), options)
    print(f"pulled {args.reference} as image {pulled}")
    return 0


def cmd_inspect(args: "argparse.Namespace", client: "Any") -> int:
    """A JSON array of the images, as `podman image inspect` prints it."""
    import json

    found = []
    for name in args.names:
        (text,) = client.call(GUEST_PATH, MANAGER, "InspectImage", "s", name)
        found.append(json.loads(text))
    print(json.dumps(found, indent=4))
    return 0


def cmd_list(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.output import print_table

    (images,) = client.call(GUEST_PATH, MANAGER, "ListImages")
    if getattr(args, "output", "short") != "short":  # scripts get the exact size
        rows = [[name, digest, size] for name, digest, size in images]
    else:
        rows = [[name, digest[:19], _human(size)] for name, digest, size in images]
    print_table(args, ["IMAGE", "DIGEST", "SIZE"], rows, "image")
    return 0


def cmd_remove(args: "argparse.Namespace", client: "Any") -> int:
    for name in args.names:
        client.call(GUEST_PATH, MANAGER, "RemoveImage", "s", name)
    return 0


def guest_settings(args: "argparse.Namespace") -> dict[str, tuple[str, "Any"]]:
    """StartGuest's a{sv} for an image, as (signature, value) pairs."""
    settings: dict[str, tuple[str, Any]] = {"Image": ("s", args.image),
                                            "Isolation": ("s", args.isolation)}
    command = list(args.rest)
    if command[:1] == ["--"]:
        command = command[1:]
    if command:
        settings["Command"] = ("as", command)
    if args.env:
        settings["Environment"] = ("as", list(args.env))
    if args.hostname:
        settings["Hostname"] = ("s", args.hostname)
    if args.network:
        settings["Network"] = ("s", args.network)
    vm_options = (("CPUs", "u", args.cpus), ("MemoryMB", "u", args.memory),
                  ("Kernel", "s", os.path.abspath(args.kernel) if args.kernel else None))
    for key, signature, value in vm_options:
        if value is not None:
            settings[key] = (signature, value)
    if on_terminal():
        settings["Terminal"] = ("s", os.environ.get("TERM") or "vt100")
    return settings


def on_terminal() -> bool:
    """The payload gets a terminal (and TERM) when this client's stdin and stdout are one."""
    return os.isatty(0) and os.isatty(1)


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise _Interrupted(signum)


def _vm_stdio(settings: dict[str, tuple[str, "Any"]]) -> None:
    for key, fd in (("StandardInput", 0), ("StandardOutput", 1), ("StandardError", 2)):
        try:
            os.fstat(fd)
        except OSError:
            continue  # closed: the payload's stream goes nowhere
        settings[key] = ("h", fd)


def run_in_vm(args: "argparse.Namespace", client: "Any") -> int:
    """StartGuest in a VM, wait for it to end, exit with its payload's status.

    hosteld holds the read end of a pipe only this process writes: however it
    ends (SIGKILL too) the VM ends with it. SIGINT and SIGTERM terminate the
    VM; the status is then 128+N, as for a payload killed by the signal. On a
    terminal, the terminal is raw while the VM runs, as for a container: the
    guest's console is the payload's tty, which echoes and turns ^C into SIGINT.
    When hosteld dies instead, this client says so and exits (daemon_lost): the VM
    goes on, and the next hosteld takes it back."""
    import signal

    from hostel.client import CallFailed
    from hostel.guest.commands import ESCAPE_HINT, escaped_line
    from hostel.machine.runclient import _EscapeRelay, _RawTerminal

    settings = guest_settings(args)
    raw = _RawTerminal() if "Terminal" in settings else None
    _vm_stdio(settings)
    escape = _EscapeRelay() if raw is not None else None  # ^]^]^] kills the VM, as nspawn's
    if escape is not None:
        settings["StandardInput"] = ("h", escape.slave)
    alive_r, _alive_w = os.pipe()
    settings["ClientAlive"] = ("h", alive_r)
    if not args.quiet:
        print(f"Running image {args.image} in a vm.", file=sys.stderr, flush=True)
        if escape is not None:
            print(ESCAPE_HINT, file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupted = 0
    path = name = None
    try:
        try:
            (path,) = client.call(GUEST_PATH, MANAGER, "StartGuest", "sa{sv}", args.name or "",
                                  settings)
            os.close(alive_r)
            if raw is not None:
                raw.enter()
            name = client.get_property(path, GUEST, "Name")
            if escape is not None:  # its SIGINT terminates the VM by name from now on
                escape.start()
            if not _wait_exited(client, path):
                return daemon_lost(name or "")
        except _Interrupted as e:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)  # a second one must not cut this short
            interrupted = e.signum
            if name is None:
                return 128 + interrupted
            try:
                client.call(GUEST_PATH, MANAGER, "TerminateGuest", "s", name)
            except CallFailed:
                pass  # it ended meanwhile
        props = client.get_all(path, GUEST)
        try:
            client.call(GUEST_PATH, MANAGER, "TerminateGuest", "s", name)  # forget it
        except CallFailed:
            pass  # another client forgot it first
    finally:
        if escape is not None:
            escape.close()
        if raw is not None:
            raw.leave()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if escape is not None and escape.escaped:
        print(escaped_line(name or ""), file=sys.stderr)
        return EXIT_FAILED
    if interrupted:
        return 128 + interrupted
    if props["ExitStatus"] < 0:
        print(f"hostelctl guest run: {name}: {props['ExitDetail']}", file=sys.stderr)
        return EXIT_FAILED
    return props["ExitStatus"]


def _wait_exited(client: "Any", path: str) -> bool:
    """Poll the VM's State until "exited" (True), or until hosteld is gone (False): a
    poll in flight when it dies gets NoReply, the next one ServiceUnknown. A NoReply
    from a hosteld still there (its reply timed out, or a new one took over) polls on."""
    import time

    from hostel.client import CallFailed, DaemonUnavailable

    while True:
        try:
            if client.get_property(path, GUEST, "State") == "exited":
                return True
        except DaemonUnavailable:
            return False
        except CallFailed as e:
            if e.name != NO_REPLY:
                raise
            if hosteld_gone(client):
                return False
        time.sleep(VM_POLL_SECONDS)


class _CannotRun(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _DaemonLost(Exception):
    pass


def cmd_guest_run(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.client import CallFailed, DaemonUnavailable, MatchRule
    from hostel.machine.runclient import RunSession, _name_of

    if args.isolation == "vm":
        return run_in_vm(args, client)

    class GuestRunSession(RunSession):
        """hostelctl run's waiting and signal forwarding, started through StartGuest; the
        wait ends, as a VM run's does, when the hosteld that started the guest is gone."""

        owners: "Any" = None   # NameOwnerChanged of org.hostel1 since StartGuest answered
        guest = ""

        def _start(self) -> str:
            try:
                (path,) = self.client.call(GUEST_PATH, MANAGER, "StartGuest", "sa{sv}",
                                           self.name, self.with_stdio())
            except CallFailed as e:
                if e.name in CANNOT_RUN:
                    raise _CannotRun(CANNOT_RUN[e.name], str(e)) from None
                raise
            # what came before the answer is older than the hosteld that gave it
            self.owners.clear()
            self.guest = _name_of(path)
            return path

        def _check_served(self) -> None:
            if self.owners:
                raise _DaemonLost()

        def run(self) -> int:
            self.client.add_match(MatchRule(**OWNER_CHANGES))
            with self.client.filter(MatchRule(**OWNER_CHANGES)) as owners:
                self.owners = owners
                try:
                    return super().run()
                except _CannotRun as e:  # said as the payload's own stderr would say it
                    print(e.message, file=sys.stderr, flush=True)
                    return e.code
                except _DaemonLost:
                    return daemon_lost(self.guest)
                except DaemonUnavailable:  # gone while a signal was forwarded to it
                    if not self.guest:
                        raise
                    return daemon_lost(self.guest)
                except CallFailed as e:  # ... or while that call was in flight
                    if not (self.guest and e.name == NO_REPLY and hosteld_gone(self.client)):
                        raise
                    return daemon_lost(self.guest)

        def _banner(self) -> None:
            print(f"Running image {args.image} in a {args.isolation}.", file=sys.stderr,
                  flush=True)

    return GuestRunSession(client, args.name or "", guest_settings(args), args.quiet).run()


def _boolean(text: str) -> bool:
    """podman's booleans: true/false (and 1/0, yes/no)."""
    import argparse

    value = {"true": True, "1": True, "yes": True, "false": False, "0": False,
             "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def add_image_commands(sub: "argparse._SubParsersAction",
                       verb: "Callable[..., argparse.ArgumentParser]") -> None:
    """Add the image verbs to hostelctl's 'image' sub-parser."""
    imp = verb(sub, "import", "import a 'docker save' archive or an OCI image layout "
               "(directory or tar; '-' reads a tar from standard input) as a squashfs image",
               cmd_import)
    imp.add_argument("path", metavar="PATH|-")
    imp.add_argument("--name", metavar="NAME[:TAG]",
                     help="the image's reference (default: the archive's tag; NAME is "
                     "NAME:latest)")
    pull = verb(sub, "pull", "pull an image from an OCI registry (with skopeo) and import it",
                cmd_pull)
    pull.add_argument("reference", metavar="REGISTRY[:PORT]/NAME[:TAG|@DIGEST]")
    pull.add_argument("--name", metavar="NAME[:TAG]",
                      help="store it under this reference (default: the one pulled)")
    pull.add_argument("--tls-verify", type=_boolean, nargs="?", const=True, default=None,
                      metavar="BOOL", help="verify the registry's TLS certificate (the "
                      "default); --tls-verify=false for a plain-HTTP or self-signed registry")
    inspect = verb(sub, "inspect", "show images' configuration and layers as JSON (as "
                   "podman image inspect does)", cmd_inspect)
    inspect.add_argument("names", nargs="+", metavar="NAME[:TAG]")
    verb(sub, "list", "list imported images", cmd_list)
    remove = verb(sub, "remove", "remove imported images", cmd_remove)
    remove.add_argument("names", nargs="+", metavar="NAME")


def add_guest_run(sub: "argparse._SubParsersAction",
                  verb: "Callable[..., argparse.ArgumentParser]") -> None:
    """Add 'run' to hostelctl's 'guest' sub-parser; it exits with the guest's status."""
    import argparse

    run = verb(sub, "run", "run an imported image with its command, or CMD", cmd_guest_run)
    run.add_argument("--image", required=True, metavar="NAME",
                     help="the imported image to run (see hostelctl image list)")
    run.add_argument("--env", "-E", action="append", metavar="K=V",
                     help="set an environment variable (repeatable)")
    run.add_argument("--hostname", metavar="H", help="the guest's hostname, which is also "
                     "its name (default: --name, else the image's name)")
    run.add_argument("--name", "-M", metavar="NAME", help="the guest's name (default: hostname, "
                     "else the image's name)")
    run.add_argument("--isolation", choices=["container", "vm"], default="container",
                     help="container: namespaces on this kernel (the default); vm: its own "
                     "kernel under KVM, booted by the image's init")
    # One option for both isolations, podman's --network=MODE, as the image verbs follow
    # podman: nspawn's --network-veth names a container's veth, while a VM's link is a tap.
    run.add_argument("--network", choices=["none", "veth"], metavar="MODE",
                     help="none (the default): loopback only; veth: a point-to-point link to "
                     "the host (a veth pair for a container, a tap for a VM) with a /30 of "
                     "its own from a private pool, the host's end as gateway and the host's "
                     "DNS resolvers")
    run.add_argument("--quiet", "-q", action="store_true",
                     help="no status lines on stderr, only the payload's output")
    run.add_argument("--cpus", type=int, metavar="N", help="virtual CPUs (--isolation=vm only; "
                     "default 1)")
    run.add_argument("--memory", type=int, metavar="MB", help="guest memory in MiB "
                     "(--isolation=vm only; default 256)")
    run.add_argument("--kernel", metavar="PATH", help="the guest's kernel (--isolation=vm only; "
                     "default: Debian's linux-image-cloud-amd64, installed or cached by make setup)")
    run.add_argument("rest", nargs=argparse.REMAINDER, metavar="CMD",
                     help="the command to run instead of the image's (after --)")
