"""The static guest init (guest-init/) against its reference, hostel.guest.init.

Both run as PID 1 in throwaway pid/mnt/net/uts namespaces standing in for the
VM, on the same real squashfs image and config devices (loop devices), with a
pty as the console, a FIFO as the channel and, where the case has a network,
a fresh veth. A probe in the image prints what the task sees (argv, ids,
groups, cwd, hostname, environment, signal dispositions, open descriptors,
session and controlling tty, cgroup, addresses, routes, resolv.conf, the
mounts); after the run-specific names (work directory, loop devices, link
index, MAC) are normalised, both inits must have produced the same output,
the same frames and the same fate (powered off). Then hostile configuration
files, which only the static init gets: a clean error frame, never a crash."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostel import native
from hostel.guest import channel
from hostel.guest.images import ImageStore, make_squashfs
from hostel.guest.launchconfig import LaunchRequest, NetworkConfig
from hostel.machine.loop import LoopDevice
from hostel.native import ExitInfo
from hostel.spawn import Plan, spawn
from unit.test_guest_images import PATH, Layer, busybox_layer, docker_archive, image_config

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = native.CLONE_NEWPID | native.CLONE_NEWNS | native.CLONE_NEWNET | native.CLONE_NEWUTS
HOST_LINK, GUEST_LINK = "hgo-host0", "hgo-guest0"
SIGINT = 2
PT_DYNAMIC, PT_INTERP = 2, 3
NOT_EXECUTABLE = "hostel: cannot run /bin/not-exec: Permission denied\n"

PROBE = b"""#!/bin/sh
code=$1
if [ -n "$INSPECT" ]; then echo inspect-now; read answer; fi
echo "argv:$0 $*"
echo "id:$(id)"
echo "cwd:$(pwd)"
echo "host:$(hostname)"
env | sort | sed 's/^/env:/'
grep -E '^(Sig(Ign|Blk)|NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status
echo "fds:$(ls /proc/self/fd | tr '\\n' ' ')"
set -- $(cut -d' ' -f5-8 /proc/$$/stat)
leader=$([ "$2" = "$$" ] && echo yes || echo no)
echo "session-leader:$leader ctty:$([ "$3" != 0 ] && echo yes || echo no)"
echo "cgroup:$(cat /proc/self/cgroup)"
ip -o -4 addr; ip -o -6 addr show scope global; ip -4 route; ip -6 route
[ -e /etc/resolv.conf ] && sed 's/^/resolv:/' /etc/resolv.conf
sed 's/^/mount:/' /proc/mounts
echo data > /written && echo "read:$(cat /written)"
if [ -n "$INSPECT" ]; then
    (sleep 0.1 &)
    sleep 0.5
    echo "zombies:$(cat /proc/[0-9]*/status | grep -c '^State:.*Z')"
    setsid sleep 100 &
fi
case "$code" in
kill) kill -9 $$ ;;
*) exit "$code" ;;
esac
"""


def _extra_layer() -> Layer:
    """The probe, a group membership, a working directory and a file that is not executable."""
    return (Layer().dir("srv/work").file("probe", PROBE, 0o755)
            .file("bin/not-exec", b"#!/bin/sh\necho never\n", 0o644)
            .file("etc/group", b"root:x:0:\nuser:x:1000:\nextra:x:2000:user\n"))


@dataclass(frozen=True)
class Image:
    squashfs: Path
    config: dict


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    base = tmp_path_factory.mktemp("oracle-image")
    layers = [busybox_layer().tar(), _extra_layer().tar()]
    config = image_config(layers, Env=[f"PATH={PATH}", "FROM_IMAGE=image", "SHARED=image"],
                          Cmd=["/probe", "0"])
    archive = docker_archive(base / "image.tar", layers, config)
    stored = ImageStore(base / "images").import_archive(str(archive), "oracle")
    return Image(stored.squashfs, json.loads(stored.config_path.read_text()))


@pytest.fixture(scope="module")
def static_init() -> str:
    """The static init, built (or found up to date) by its own Makefile rule."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest-init")], check=True)
    return str(REPO / "build/guest-init/init")


def python_init() -> list[str]:
    return [sys.executable, "-m", "hostel.guest.init"]


@contextlib.contextmanager
def veth() -> Iterator[IPRoute]:
    ipr = IPRoute()
    ipr.link("add", ifname=HOST_LINK, kind="veth", peer=GUEST_LINK)
    try:
        index = ipr.link_lookup(ifname=HOST_LINK)[0]
        ipr.addr("add", index=index, address="10.78.0.1", prefixlen=24)
        ipr.addr("add", index=index, address="fd78::1", prefixlen=64)
        ipr.link("set", index=index, state="up")
        yield ipr
    finally:
        try:
            ipr.link("del", ifname=HOST_LINK)
        except NetlinkError as e:
            if e.code != errno.ENODEV:   # the guest's end died with its namespace
                raise
        ipr.close()


@dataclass
class Run:
    frames: list[dict]
    output: str
    info: ExitInfo
    replacements: dict[str, str] = field(default_factory=dict)
    host_view: str = ""    # the guest's network as iproute2 and ethtool see it from the host

    def normalised(self) -> str:
        text = self.output
        for old, new in self.replacements.items():
            text = text.replace(old, new)
        text = re.sub(r"link/ether \S+ brd \S+", "link/ether MAC", text)
        text = re.sub(r"^\d+: ", "N: ", text, flags=re.MULTILINE)
        return re.sub(r"@if\d+", "@ifN", text)


# SIOCETHTOOL ETHTOOL_GGSO / ETHTOOL_GTSO on the link named in argv[1].
FEATURES = """
import fcntl, socket, struct, sys
for name, command in (("gso", 0x23), ("tso", 0x1e)):
    request = bytearray(struct.pack("=II", command, 0))
    buffer = (ctypes.c_char * len(request)).from_buffer(request)
    ifreq = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(buffer))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), 0x8946, ifreq)
    print(f"{name}={struct.unpack('=II', bytes(request))[1]}")
""".replace("import fcntl", "import ctypes, fcntl")


def _network_from_the_host(pid: int) -> str:
    """Addresses, every routing table in detail (protocol, scope, table) and offloads."""
    enter = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    commands = [["ip", "-d", "-o", "addr"], ["ip", "-d", "-4", "route", "show", "table", "all"],
                ["ip", "-d", "-6", "route", "show", "table", "all"],
                [sys.executable, "-c", FEATURES, GUEST_LINK]]
    text = "".join(subprocess.run(enter + command, check=True, capture_output=True,
                                  text=True).stdout for command in commands)
    text = re.sub(r"fe80::[0-9a-f:]*[0-9a-f]", "fe80::LINK-LOCAL", text)   # from the MAC
    return re.sub(r"^\d+: ", "N: ", text.replace("tentative ", ""), flags=re.MULTILINE)


def _config_squashfs(where: Path, image_config: bytes, launch: bytes) -> Path:
    tree = where / "config-tree"
    (tree / "image").mkdir(parents=True)
    (tree / "image/config.json").write_bytes(image_config)
    (tree / "launch.json").write_bytes(launch)
    make_squashfs(str(tree), str(where / "config.squashfs"))
    return where / "config.squashfs"


def _drain(fd: int, sink: list[bytes], asked: threading.Event) -> None:
    while True:
        try:
            part = os.read(fd, 65536)
        except OSError as e:
            if e.errno == errno.EIO:   # every slave end is closed
                return
            raise
        if not part:
            return
        sink.append(part)
        if b"inspect-now" in b"".join(sink[-2:]):
            asked.set()


def _frames(fd: int) -> list[dict]:
    os.set_blocking(fd, True)
    frames = []
    while (frame := channel.read_frame(fd)) is not None:
        frames.append(frame)
    return frames


def run_init(command: list[str], where: Path, image: Path, image_config: bytes,
             launch: bytes, network: bool) -> Run:
    """One init as PID 1 of fresh namespaces; returns when it is gone."""
    where.mkdir()
    config = _config_squashfs(where, image_config, launch)
    fifo, work = where / "channel", where / "work"
    os.mkfifo(fifo)
    work.mkdir()
    frames_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    master, slave = os.openpty()
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    output: list[bytes] = []
    asked = threading.Event()
    reader = threading.Thread(target=_drain, args=(master, output, asked))
    host_view = ""
    child = None
    try:
        with contextlib.ExitStack() as stack:
            image_loop = stack.enter_context(LoopDevice(str(image), read_only=True))
            config_loop = stack.enter_context(LoopDevice(str(config), read_only=True))
            ipr = stack.enter_context(veth()) if network else None
            plan = Plan()
            plan.wait_for_parent(go_r, "the veth is moved in")
            for target in (0, 1, 2):
                plan.dup2(slave, target)
            plan.execve(command[0], command + [
                "--image-device", image_loop.device, "--config-device", config_loop.device,
                "--channel", str(fifo), "--console", "-", "--work-dir", str(work)],
                ["PATH=/usr/bin:/bin"])
            child = spawn(plan, NAMESPACES)
            os.close(slave)
            slave = -1
            reader.start()
            if ipr is not None:
                ipr.link("set", index=ipr.link_lookup(ifname=GUEST_LINK)[0], net_ns_pid=child.pid)
            os.write(go_w, b"x")
            child.wait_started()
            if network:
                assert asked.wait(timeout=60), b"".join(output)
                host_view = _network_from_the_host(child.pid)
                os.write(master, b"go\n")
            info = native.pidfd_wait(child.pidfd, block=True)
            reader.join(timeout=30)
            frames = _frames(frames_fd)
            replacements = {str(work): "WORK", image_loop.device: "IMAGE-DEVICE",
                            config_loop.device: "CONFIG-DEVICE"}
    finally:
        for fd in (frames_fd, go_r, go_w, slave):
            if fd >= 0:
                os.close(fd)
        if child is not None:
            child.close()
        reader.join(timeout=30)
        os.close(master)
    assert info is not None
    text = b"".join(output).decode(errors="replace").replace("\r\n", "\n")
    return Run(frames, text, info, replacements, host_view)


@dataclass(frozen=True)
class Case:
    name: str
    expected_code: int
    config: dict = field(default_factory=dict)    # overrides of the image's "config"
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    network: bool = False
    expected_output: tuple[str, ...] = ()

    def launch(self) -> LaunchRequest:
        network = NetworkConfig(GUEST_LINK, "10.78.0.2/24", "10.78.0.1", "fd78::2/64", "fd78::1",
                                ("10.78.0.1", "fd78::1")) if self.network else None
        return LaunchRequest(command=self.command, env=self.env, hostname=self.hostname,
                             network=network, isolation="vm")


CASES = [
    Case("exit-0-network-env", 0, env={"SHARED": "request", "NEW": "x y", "INSPECT": "1"},
         hostname="oracle-one",
         network=True,
         expected_output=("env:FROM_IMAGE=image", "env:SHARED=request", "env:NEW=x y",
                          "env:HOSTNAME=oracle-one", "env:HOME=/root", "host:oracle-one",
                          "inet 10.78.0.2/24", "inet6 fd78::2/64", "default via 10.78.0.1",
                          "default via fd78::1", "resolv:nameserver fd78::1", "read:data",
                          "session-leader:yes ctty:yes", "zombies:0", "uid=0(root) gid=0(root)")),
    # no network: loopback only, and up (as in a container without one)
    Case("exit-42", 42, command=["/probe", "42"], expected_output=("lo    inet 127.0.0.1/8",)),
    Case("killed-by-signal", 137, command=["probe", "kill"]),
    Case("missing-binary", 127, command=["no-such-command", "arg"],
         expected_output=("hostel: cannot run no-such-command: No such file or directory\n",)),
    Case("not-executable", 126, command=["not-exec"],
         expected_output=(NOT_EXECUTABLE,)),
    Case("image-user-by-name", 0, config={"User": "user"},
         expected_output=("id:uid=1000(user) gid=1000(user) groups=2000(extra)\n",
                          "env:HOME=/home/user\n")),
    Case("user-and-group", 0, config={"User": "user:extra"},
         expected_output=("id:uid=1000(user) gid=2000(extra)\n",)),
    Case("unlisted-uid", 0, config={"User": "4242"},
         expected_output=("id:uid=4242 gid=4242\n", "env:HOME=/\n")),
    Case("relative-workdir", 0, config={"WorkingDir": "srv/./work"},
         expected_output=("cwd:/srv/work",)),
    Case("entrypoint-and-cmd", 3, config={"Entrypoint": ["/probe"], "Cmd": ["3"]}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_static_init_matches_the_python_init(case: Case, image: Image, static_init: str,
                                             tmp_path: Path) -> None:
    document = json.loads(json.dumps(image.config))
    document["config"].update(case.config)
    config_bytes = json.dumps(document).encode()
    launch = case.launch().to_json().encode()
    reference = run_init(python_init(), tmp_path / "python", image.squashfs, config_bytes, launch,
                         case.network)
    static = run_init([static_init], tmp_path / "static", image.squashfs, config_bytes, launch,
                      case.network)

    expected_frames = [{"type": "started", "pid": 2}, {"type": "exit", "code": case.expected_code}]
    assert reference.frames == expected_frames, (reference.frames, reference.output)
    assert static.frames == reference.frames, (static.frames, static.output)
    for run in (reference, static):
        assert not run.info.exited and run.info.status == SIGINT, \
            f"init {run.info.describe()}, not powered off"
        for needle in case.expected_output:
            assert needle in run.output, (needle, run.output)
    assert static.normalised() == reference.normalised()
    assert static.host_view == reference.host_view
    if case.network:
        assert "gso=0\ntso=0\n" in reference.host_view, reference.host_view
        assert "default via 10.78.0.1 dev hgo-guest0 table main proto static scope global" \
            in reference.host_view, reference.host_view


@pytest.mark.parametrize("user,needle", [
    ("nosuchuser", "user 'nosuchuser' not found in the "),
    ("user:nosuchgroup",
     "group 'nosuchgroup' of the image's User is not in the guest's /etc/group"),
], ids=["unknown-user", "unknown-group"])
def test_both_inits_refuse_an_unknown_identity(user: str, needle: str, image: Image,
                                               static_init: str, tmp_path: Path) -> None:
    """The task never starts; both say why, on the console and in an error frame, then 126."""
    document = json.loads(json.dumps(image.config))
    document["config"]["User"] = user
    config_bytes = json.dumps(document).encode()
    launch = LaunchRequest(command=["/probe", "0"]).to_json().encode()
    runs = [run_init(command, tmp_path / name, image.squashfs, config_bytes, launch, False)
            for name, command in (("python", python_init()), ("static", [static_init]))]
    for run in runs:
        assert [f["type"] for f in run.frames] == ["log", "exit"], run.frames
        assert run.frames[0]["level"] == "error" and needle in run.frames[0]["message"], run.frames
        assert run.frames[1] == {"type": "exit", "code": 126}
        assert not run.info.exited and run.info.status == SIGINT, run.info.describe()
        assert "argv:" not in run.output, "the task ran"


def test_static_init_writes_stderr_apart(image: Image, static_init: str, tmp_path: Path) -> None:
    """--stderr (a VM's named port; a file here): the task's fd 2 goes there, not to the
    console, so that a VM's stdout and stderr stay apart as a container's do. The
    reference init has no such option: the console carries both there."""
    stderr_file = tmp_path / "stderr.out"
    stderr_file.touch()
    launch = LaunchRequest(command=["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"],
                           isolation="vm").to_json().encode()
    run = run_init([static_init, "--stderr", str(stderr_file)], tmp_path / "static",
                   image.squashfs, json.dumps(image.config).encode(), launch, False)
    assert run.frames[-1] == {"type": "exit", "code": 7}, (run.frames, run.output)
    assert stderr_file.read_bytes() == b"to-stderr\n"
    assert "to-stdout" in run.output and "to-stderr" not in run.output, run.output


def test_frames_are_byte_identical(tmp_path: Path) -> None:
    """The same bytes hostel.guest.channel.encode makes, for every frame the init sends."""
    source = r"""
#include "frame.h"
int main(void) {
    frame_started(1, 2); frame_exit(1, 137);
    frame_log(1, "error", "guest init failed: \"q\" \\ \n\t\x01 caf\xc3\xa9 \xf0\x9f\x90\xa7 \xff");
    return 0;
}
"""
    src, exe = tmp_path / "frame-probe.c", tmp_path / "frame-probe"
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-I", str(REPO / "guest-init"), "-o", str(exe), str(src),
                    str(REPO / "guest-init/frame.c")], check=True)
    produced = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    message = "guest init failed: \"q\" \\ \n\t\x01 caf\u00e9 \U0001f427 \ufffd"
    expected = (channel.encode({"type": "started", "pid": 2}) +
                channel.encode({"type": "exit", "code": 137}) +
                channel.encode({"type": "log", "level": "error", "message": message}))
    assert produced == expected


# Hostile input: only the static init ------------------------------------------------------

GOOD_LAUNCH = LaunchRequest(command=["/probe", "0"]).to_json()
HOSTILE_LAUNCH = [
    ("truncated", GOOD_LAUNCH[: len(GOOD_LAUNCH) // 2].encode(), "launch.json is not valid JSON"),
    ("empty", b"", "unexpected end of input"),
    ("huge-string", b'{"run": ["' + b"a" * (2 << 20) + b'"]}', "more than the 1048576 allowed"),
    ("long-hostname", json.dumps({"hostname": "h" * 900_000}).encode(), "invalid hostname"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "nested deeper than"),
    ("deep-objects", b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested deeper than"),
    ("many-values", b"[" + b"0," * 70_000 + b"0]", "more than 65536 JSON values"),
    ("not-an-object", b"[1, 2]", "launch configuration is not a JSON object"),
    ("run-is-a-string", b'{"run": "ls"}', "command must be a list of strings"),
    ("run-has-a-number", b'{"run": ["ls", 5]}', "command must be a string"),
    ("env-is-a-list", b'{"env": ["A=1"]}', "env is not a JSON object"),
    ("env-bad-name", b'{"env": {"1A": "x"}}', "not a valid environment variable name"),
    ("env-value-number", b'{"env": {"A": 1}}', "must be a string"),
    ("nul-in-string", b'{"run": ["sh\\u0000x"]}', "without NUL bytes"),
    ("hostname-number", b'{"hostname": 5}', "hostname must be a string"),
    ("network-no-link", b'{"network": {"ipv4": {"address": "10.0.0.2/24", "gateway": "10.0.0.1"}}}',
     "network lacks 'link'"),
    ("network-bad-address", json.dumps({"network": {
        "link": "eth0", "ipv4": {"address": "10.0.0.300/24", "gateway": "10.0.0.1"}}}).encode(),
     "invalid IPv4 address"),
    ("network-no-prefix", json.dumps({"network": {
        "link": "eth0", "ipv4": {"address": "10.0.0.2", "gateway": "10.0.0.1"}}}).encode(),
     "expected ADDRESS/PREFIX"),
    ("bad-utf8", b'{"run": ["\xff\xfe"]}', "invalid UTF-8"),
    ("lone-surrogate", b'{"run": ["\\ud800"]}', "lone high surrogate"),
    ("bad-escape", b'{"run": ["\\q"]}', "bad escape"),
    ("trailing-garbage", b'{"run": null} x', "trailing data"),
    ("control-character", b'{"run": ["a\x01"]}', "control character"),
    ("bad-number", b'{"run": null, "x": -}', "bad number"),
    ("nan", b'{"x": NaN}', "bad number"),
    ("bad-isolation", b'{"isolation": "chroot"}', "unknown isolation"),
]
HOSTILE_IMAGE = [
    ("config-a-list", b'{"config": [1]}', "'config' is not a JSON object"),
    ("env-not-key-value", b'{"config": {"Env": ["NOEQUALS"]}}', "is not of the form KEY=VALUE"),
    ("user-injection", b'{"config": {"User": "root:x:0"}}', "invalid user"),
    ("cmd-an-object", b'{"config": {"Cmd": {"a": 1}}}', "image Cmd must be a list"),
]


@pytest.mark.parametrize("name,launch,needle", HOSTILE_LAUNCH, ids=[c[0] for c in HOSTILE_LAUNCH])
def test_hostile_launch_configuration(name: str, launch: bytes, needle: str, image: Image,
                                      static_init: str, tmp_path: Path) -> None:
    _assert_clean_refusal(static_init, image, json.dumps(image.config).encode(), launch, needle,
                          tmp_path)


@pytest.mark.parametrize("name,config,needle", HOSTILE_IMAGE, ids=[c[0] for c in HOSTILE_IMAGE])
def test_hostile_image_configuration(name: str, config: bytes, needle: str, image: Image,
                                     static_init: str, tmp_path: Path) -> None:
    _assert_clean_refusal(static_init, image, config, GOOD_LAUNCH.encode(), needle, tmp_path)


def _assert_clean_refusal(static_init: str, image: Image, config: bytes, launch: bytes,
                          needle: str, tmp_path: Path) -> None:
    run = run_init([static_init], tmp_path / "static", image.squashfs, config, launch, False)
    assert not run.info.exited and run.info.status == SIGINT, \
        f"init {run.info.describe()}, not a clean power-off\n{run.output}"
    assert [f["type"] for f in run.frames] == ["log", "exit"], run.frames
    log, exit_frame = run.frames
    assert log["level"] == "error" and needle in log["message"], log
    assert log["message"].startswith("guest init failed: reading the guest configuration"), log
    assert exit_frame == {"type": "exit", "code": 126}
    assert f"hostel-init: {log['message']}" in run.output


def test_static_init_needs_no_interpreter_and_is_small(static_init: str) -> None:
    """Nothing but this one file goes into the initramfs: no dynamic loader, no libc."""
    data = Path(static_init).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    types = [int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little")
             for i in range(phnum)]
    assert PT_INTERP not in types and PT_DYNAMIC not in types, types
    assert len(data) < 200_000, f"the init grew to {len(data)} bytes"
