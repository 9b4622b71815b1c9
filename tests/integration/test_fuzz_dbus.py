"""Random D-Bus calls against a real hosteld: never an Internal error, never a dead daemon.

Every method of every manager (org.hostel1's machine, cryptsetup and guest
managers and org.freedesktop.machine1's) is found by introspection, and
hypothesis draws arguments from each method's signature: odd strings (empty,
5,000 characters, paths of FIFOs and devices, non-paths), numbers at their
limits, a{sv} settings mixing known keys and wrong types. Property reads and
unknown members are mixed in. Calls go out in concurrent batches; at least
5,000 in all, within a bounded time. A reply may be any error but hosteld's
Internal one (or dbus-fast's "the service raised" errors), and the daemon
must be alive and answering at the end.

Kept harmless for the machine it runs on: methods that act on processes or
devices named by the caller (RegisterMachine with a pid, Kill/Terminate of
registered machines, OpenShell, attaching a volume) find nothing to act on,
because the daemon's crypttab is empty and no machine is registered; the
Register* and Create* methods, which would adopt a real pid, are left out."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Node
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

from conftest import terminate_all_machines

TARGETS = [("org.hostel1", "/org/hostel1/machine"), ("org.hostel1", "/org/hostel1/cryptsetup"),
           ("org.hostel1", "/org/hostel1/guest"), ("org.hostel1", "/org/hostel1"),
           ("org.freedesktop.machine1", "/org/freedesktop/machine1")]
LEFT_OUT = ("Register", "Create")
BANNED_ERRORS = ("org.hostel1.Error.Internal", "com.dubstepdish.dbus.next.ServiceError",
                 "com.dubstepdish.dbus.next.InternalError")
BATCH = 50
EXAMPLES = 110  # x BATCH calls: over 5,000
TIME_LIMIT = 90.0
SETTING_KEYS = ["Directory", "Image", "Command", "Bind", "BindReadOnly", "Environment", "User",
                "Boot", "Ephemeral", "PrivateNetwork", "PrivateUsers", "Capability",
                "DropCapability", "ReadOnly", "Volatile", "Kernel", "MemoryMB", "Devices",
                "Passphrase", "KeyFile", "ReadOnly", "Cmdline", "Unknown", ""]


@pytest.fixture
def daemon(open_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text("")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {"SYSTEMD_CRYPTTAB": str(crypttab), "SYSTEMD_PROC_CMDLINE": "",
           "SYSTEMD_EFI_OPTIONS": "", "SYSTEMD_IN_INITRD": "0",
           # machine1's image methods act on the pool: an empty one of the test's own, never
           # the host's /var/lib/machines (RemoveImage of a drawn name would delete it)
           "HOSTEL_MACHINE_POOL": str(tmp_path / "pool")}
    hosteld = start_daemon(open_bus, tmp_path, extra_env=env)
    try:
        yield hosteld
    finally:
        terminate_all_machines(hosteld)
        hosteld.stop()


def odd_strings(fifo: str) -> st.SearchStrategy[str]:
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                   max_size=40)
    return st.one_of(text, st.sampled_from([
        "", "/", ".", "..", "a" * 5000, "/" + "d/" * 2000, fifo, "/dev/zero", "/proc/kmsg",
        "/nonexistent/x", "all", "leader", "container", "luks", "-", "a/b", "\u00e9\u4e2d"]))


def _split(signature: str) -> list[str]:
    """A signature's complete types, in order."""
    out, i = [], 0
    while i < len(signature):
        j = _end(signature, i)
        out.append(signature[i:j])
        i = j
    return out


def _end(signature: str, i: int) -> int:
    if signature[i] == "a":
        return _end(signature, i + 1)
    if signature[i] in "({":
        close = ")" if signature[i] == "(" else "}"
        j = i + 1
        while signature[j] != close:
            j = _end(signature, j)
        return j + 1
    return i + 1


def strategy(sig: str, strings: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Values of D-Bus type `sig`, biased to the edges."""
    ints = {"y": (0, 255), "n": (-2**15, 2**15 - 1), "q": (0, 2**16 - 1),
            "i": (-2**31, 2**31 - 1), "u": (0, 2**32 - 1), "x": (-2**63, 2**63 - 1),
            "t": (0, 2**64 - 1)}
    if sig in ints:
        low, high = ints[sig]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1]))
    if sig == "b":
        return st.booleans()
    if sig == "d":
        return st.floats(allow_nan=False)
    if sig == "s":
        return strings
    if sig == "o":
        return st.sampled_from(["/", "/org/hostel1/machine/x", "/org/freedesktop/machine1"])
    if sig == "g":
        return st.sampled_from(["", "s", "a{sv}"])
    if sig == "v":
        return variants(strings)
    if sig == "a{sv}":
        return st.dictionaries(st.one_of(st.sampled_from(SETTING_KEYS), strings),
                               variants(strings), max_size=5)
    if sig.startswith("a{"):
        key, value = _split(sig[2:-1])
        return st.dictionaries(strategy(key, strings), strategy(value, strings), max_size=3)
    if sig.startswith("a"):
        element = strategy(sig[1:], strings)
        return st.binary(max_size=40) if sig == "ay" else st.lists(element, max_size=4)
    if sig.startswith("("):
        return st.tuples(*[strategy(s, strings) for s in _split(sig[1:-1])]).map(list)
    raise AssertionError(f"no strategy for {sig}")


def variants(strings: st.SearchStrategy[str]) -> st.SearchStrategy[Variant]:
    return st.one_of(strings.map(lambda v: Variant("s", v)),
                     st.lists(strings, max_size=3).map(lambda v: Variant("as", v)),
                     st.booleans().map(lambda v: Variant("b", v)),
                     st.integers(0, 2**32 - 1).map(lambda v: Variant("u", v)),
                     st.integers(-2**31, 2**31 - 1).map(lambda v: Variant("i", v)))


async def methods(bus: MessageBus, extra: list[tuple[str, str]]
                  ) -> list[tuple[str, str, str, str, str]]:
    """(bus name, path, interface, member, signature) of every method to fuzz."""
    found = []
    # An orderly stop of the live machine waits out its payload's grace period (a
    # sleep as PID 1 ignores SIGTERM): a long wait, not an error. Kill ends it.
    extra_left_out = {(path, "Terminate") for _name, path in extra}
    for name, path in TARGETS + extra:
        node: Node = await bus.introspect(name, path)
        for interface in node.interfaces:
            if interface.name.startswith("org.freedesktop.DBus."):
                continue
            for method in interface.methods:
                signature = "".join(arg.signature for arg in method.in_args)
                if "h" in signature or method.name.startswith(LEFT_OUT):
                    continue
                if (path, method.name) in extra_left_out:
                    continue
                found.append((name, path, interface.name, method.name, signature))
    return found


def calls(targets: list[tuple[str, str, str, str, str]], fifo: str) -> st.SearchStrategy[Message]:
    strings = odd_strings(fifo)

    def one(target: tuple[str, str, str, str, str]) -> st.SearchStrategy[Message]:
        name, path, interface, member, signature = target
        args = st.tuples(*[strategy(s, strings) for s in _split(signature)]).map(list)
        return args.map(lambda body: Message(destination=name, path=path, interface=interface,
                                             member=member, signature=signature, body=body))

    properties = st.tuples(st.sampled_from(TARGETS), strings, strings).map(
        lambda t: Message(destination=t[0][0], path=t[0][1],
                          interface="org.freedesktop.DBus.Properties", member="Get",
                          signature="ss", body=[t[1], t[2]]))
    unknown = st.tuples(st.sampled_from(TARGETS), st.sampled_from(["Nope", "ListMachines"]),
                        st.sampled_from(["", "s", "u"])).map(
        lambda t: Message(destination=t[0][0], path=t[0][1], member=t[1], signature=t[2],
                          body=[""] if t[2] == "s" else [7] if t[2] == "u" else []))
    return st.one_of(*[one(target) for target in targets], properties, unknown)


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()


async def start_machine(bus: MessageBus, tree: Path) -> str:
    """A running machine, so that its object's methods (Kill, Terminate, GetOSRelease,
    racing its exit) are fuzzed too."""
    reply = await bus.call(Message(
        destination="org.hostel1", path="/org/hostel1/machine",
        interface="org.hostel1.MachineManager", member="StartMachine", signature="sa{sv}",
        body=["fuzzed", {"Directory": Variant("s", str(tree)),
                         "Command": Variant("as", ["/bin/sleep", "600"])}]))
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body[0]


def test_fuzzed_calls_never_get_an_internal_error(daemon: DaemonProcess, tree: Path,
                                                  tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    bus = loop.run_until_complete(connect(daemon.address))
    sent: list[int] = []
    banned: list[tuple[str, str, str]] = []
    try:
        machine = loop.run_until_complete(start_machine(bus, tree))
        targets = loop.run_until_complete(methods(bus, [("org.hostel1", machine)]))
        assert {t[3] for t in targets} >= {"StartMachine", "Attach", "Reload", "ImportImage",
                                           "StartGuest", "ListMachines", "GetMachineOSRelease",
                                           "GetOSRelease", "Kill", "TerminateMachine"}

        async def answered(call: Message) -> Message:
            try:
                return await asyncio.wait_for(bus.call(call), 30)
            except asyncio.TimeoutError:
                raise AssertionError(f"no reply within 30 s to {call.member}{call.body!r:.200}")

        async def run(batch: list[Message]) -> None:
            replies = await asyncio.gather(*map(answered, batch))
            sent.append(len(batch))
            # OpenPTY's terminals; dbus-fast may list one message's descriptors in the
            # next message too, so each is closed once.
            for fd in {fd for reply in replies for fd in reply.unix_fds}:
                os.close(fd)
            for call, reply in zip(batch, replies):
                if reply.message_type == MessageType.ERROR and reply.error_name in BANNED_ERRORS:
                    banned.append((call.member, repr(call.body)[:200], reply.body[0][:300]))

        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(calls(targets, str(tmp_path / "fifo")), min_size=BATCH, max_size=BATCH))
        def fuzz(batch: list[Message]) -> None:
            loop.run_until_complete(run(batch))

        started = time.monotonic()
        fuzz()
        elapsed = time.monotonic() - started
        assert banned == []
        assert sum(sent) >= 5000, sum(sent)
        assert elapsed < TIME_LIMIT, f"{sum(sent)} calls took {elapsed:.1f} s"
        alive = loop.run_until_complete(bus.call(Message(
            destination="org.hostel1", path="/org/hostel1/machine",
            interface="org.hostel1.MachineManager", member="ListMachines")))
        assert alive.message_type == MessageType.METHOD_RETURN
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        bus.disconnect()
        loop.close()


async def terminate_while_exiting(address: str, tree: Path, rounds: int) -> list[str]:
    """Start payloads that exit at once and Terminate each as it exits; the error names."""
    bus = await connect(address)
    names = []
    try:
        for number in range(rounds):
            name = f"racer{number}"
            start = bus.call(Message(
                destination="org.hostel1", path="/org/hostel1/machine",
                interface="org.hostel1.MachineManager", member="StartMachine",
                signature="sa{sv}", body=[name, {"Directory": Variant("s", str(tree)),
                                                 "ReadOnly": Variant("b", True),  # shared lock
                                                 "Command": Variant("as", ["/bin/true"])}]))
            terminate = [bus.call(Message(
                destination="org.hostel1", path="/org/hostel1/machine",
                interface="org.hostel1.MachineManager", member=member, signature=sig,
                body=body)) for member, sig, body in
                [("TerminateMachine", "s", [name]), ("KillMachine", "ssi", [name, "all", 9])]]
            for reply in await asyncio.gather(start, *terminate):
                if reply.message_type == MessageType.ERROR:
                    names.append(reply.error_name)
            await asyncio.sleep(0.02 * (number % 5))
    finally:
        bus.disconnect()
    return names


def test_terminate_racing_the_exit_is_never_internal(daemon: DaemonProcess, tree: Path) -> None:
    """A Terminate or Kill arriving as the payload exits (the pidfd being closed: EBADF)."""
    errors = asyncio.run(terminate_while_exiting(daemon.address, tree, 40))
    assert [e for e in errors if e in BANNED_ERRORS] == []
    assert set(errors) <= {"org.hostel1.Error.NoSuchObject", "org.hostel1.Error.AlreadyExists"}, \
        errors
