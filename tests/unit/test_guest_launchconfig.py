"""Image config x launch request -> the process a guest runs (the seed's `run`)."""
from __future__ import annotations

import pytest

from hostel.bus import InvalidArgs
from hostel.guest.launchconfig import (DEFAULT_PATH, ImageConfig, LaunchRequest, NetworkConfig,
                                       Process, build_process, resolve_executable)

FILES = {"/bin/sh", "/bin/busybox", "/usr/bin/env", "/opt/app/run", "/srv/tool"}
HOME = "/home/someone"
PATH = "/usr/local/bin:/usr/bin:/bin"


def is_file(path: str) -> bool:
    return path in FILES


# what every process gets, under the image's and the request's (no TERM: no terminal)
BASE_ENV = {"PATH": DEFAULT_PATH, "HOME": HOME}

CASES = [
    # (image config, request, path, argv, extra env, cwd, user)
    pytest.param(ImageConfig(), LaunchRequest(),
                 "/bin/sh", ["sh"], {}, "/", "", id="empty-image-empty-request"),
    pytest.param(ImageConfig(cmd=["env", "-i"], env=[f"PATH={PATH}"]), LaunchRequest(),
                 "/usr/bin/env", ["env", "-i"], {"PATH": PATH}, "/", "", id="cmd-through-path"),
    pytest.param(ImageConfig(cmd=["env"], env=[f"PATH={PATH}"]),
                 LaunchRequest(command=["sh", "-c", "true"]),
                 "/bin/sh", ["sh", "-c", "true"], {"PATH": PATH}, "/", "",
                 id="request-replaces-cmd"),
    pytest.param(ImageConfig(entrypoint=["/opt/app/run", "--flag"], cmd=["default"]),
                 LaunchRequest(), "/opt/app/run", ["run", "--flag", "default"], {}, "/", "",
                 id="entrypoint-prepended-to-cmd"),
    pytest.param(ImageConfig(entrypoint=["/opt/app/run"], cmd=["default"]),
                 LaunchRequest(command=["mine", "x"]), "/opt/app/run", ["run", "mine", "x"],
                 {}, "/", "", id="entrypoint-prepended-to-request"),
    pytest.param(ImageConfig(entrypoint=["/opt/app/run"]), LaunchRequest(command=[]),
                 "/opt/app/run", ["run"], {}, "/", "", id="empty-request-clears-cmd"),
    pytest.param(ImageConfig(cmd=["echo"]), LaunchRequest(command=[]),
                 "/bin/sh", ["sh"], {}, "/", "", id="empty-everything-is-sh"),
    pytest.param(ImageConfig(cmd=["nowhere"], env=[f"PATH={PATH}"]), LaunchRequest(),
                 "nowhere", ["nowhere"], {"PATH": PATH}, "/", "", id="unresolved-left-alone"),
    pytest.param(ImageConfig(cmd=["env"]), LaunchRequest(),
                 "/usr/bin/env", ["env"], {}, "/", "", id="default-path-searched"),
    pytest.param(ImageConfig(cmd=["env"], env=["PATH="]), LaunchRequest(),
                 "env", ["env"], {"PATH": ""}, "/", "", id="empty-path-no-search"),
    pytest.param(ImageConfig(cmd=["srv/tool"]), LaunchRequest(),
                 "/srv/tool", ["tool"], {}, "/", "", id="relative-file-from-root"),
    pytest.param(ImageConfig(cmd=["env"], env=["PATH=/nope", "A=image", "B=image"]),
                 LaunchRequest(env={"A": "request", "PATH": "/usr/bin"}),
                 "/usr/bin/env", ["env"], {"PATH": "/usr/bin", "A": "request", "B": "image"},
                 "/", "", id="request-env-wins-and-path-from-request"),
    pytest.param(ImageConfig(env=["TERM=xterm"]), LaunchRequest(), "/bin/sh", ["sh"],
                 {"TERM": "xterm"}, "/", "", id="term-from-the-image-only"),
    pytest.param(ImageConfig(), LaunchRequest(terminal="xterm-256color", hostname="h1"),
                 "/bin/sh", ["sh"], {"HOSTNAME": "h1", "TERM": "xterm-256color"}, "/", "",
                 id="terminal-and-hostname"),
    pytest.param(ImageConfig(env=["HOME=/image", "TERM=xterm"]),
                 LaunchRequest(terminal="vt220", hostname="h1", env={"HOSTNAME": "mine"}),
                 "/bin/sh", ["sh"], {"HOSTNAME": "mine", "HOME": "/image", "TERM": "xterm"},
                 "/", "", id="image-and-request-override-the-defaults"),
    pytest.param(ImageConfig(working_dir="/srv", user="1000:1000"), LaunchRequest(),
                 "/bin/sh", ["sh"], {}, "/srv", "1000:1000", id="workdir-and-user"),
    pytest.param(ImageConfig(working_dir="srv/data", user="user"), LaunchRequest(),
                 "/bin/sh", ["sh"], {}, "/srv/data", "user", id="relative-workdir"),
]


@pytest.mark.parametrize("image,request_,path,argv,env,cwd,user", CASES)
def test_process_table(image: ImageConfig, request_: LaunchRequest, path: str, argv: list[str],
                       env: dict[str, str], cwd: str, user: str) -> None:
    process = build_process(image, request_, is_file, HOME)
    assert process == Process(path=path, argv=argv, env={**BASE_ENV, **env}, cwd=cwd, user=user)


def test_env_list_is_key_value() -> None:
    process = build_process(ImageConfig(env=["A=1=2"]), LaunchRequest(hostname="h"), is_file,
                            "/root")
    assert process.env_list == [f"PATH={DEFAULT_PATH}", "HOSTNAME=h", "HOME=/root", "A=1=2"]


def test_resolve_tries_path_entries_in_order() -> None:
    seen: list[str] = []

    def record(path: str) -> bool:
        seen.append(path)
        return path == "/usr/bin/env"

    assert resolve_executable({"PATH": "::/a:/usr/bin:/bin"}, "env", record) == "/usr/bin/env"
    assert seen == ["/env", "/a/env", "/usr/bin/env"]


def test_image_config_from_document() -> None:
    doc = {"architecture": "amd64", "config": {"Entrypoint": ["/e"], "Cmd": None,
                                               "Env": ["PATH=/bin"], "WorkingDir": "/w",
                                               "User": "nobody"}}
    assert ImageConfig.from_json(doc) == ImageConfig(["/e"], [], ["PATH=/bin"], "/w", "nobody")
    assert ImageConfig.from_json({"config": None}) == ImageConfig()


@pytest.mark.parametrize("doc,needle", [
    ([], "not a JSON object"),
    ({"config": {"Cmd": "sh"}}, "Cmd"),
    ({"config": {"Env": ["NOEQUALS"]}}, "KEY=VALUE"),
    ({"config": {"Env": ["1X=y"]}}, "not a valid environment variable name"),
    ({"config": {"User": "a:b:c"}}, "invalid user"),
    ({"config": {"Entrypoint": ["a\0b"]}}, "NUL"),
])
def test_bad_image_config_is_refused(doc: object, needle: str) -> None:
    with pytest.raises(InvalidArgs, match=needle):
        ImageConfig.from_json(doc)


@pytest.mark.parametrize("kwargs,needle", [
    ({"hostname": "bad host"}, "invalid hostname"),
    ({"hostname": "a" * 65}, "invalid hostname"),
    ({"env": {"A-B": "x"}}, "not a valid environment variable name"),
    ({"env": {"A": "x\0"}}, "NUL"),
    ({"command": ["ok", 3]}, "string"),
    ({"isolation": "chroot"}, "unknown isolation"),
    ({"terminal": ""}, "invalid terminal type"),
    ({"terminal": "TERM=xterm"}, "invalid terminal type"),
])
def test_bad_request_is_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidArgs, match=needle):
        LaunchRequest(**kwargs)


@pytest.mark.parametrize("kwargs,needle", [
    ({"link": "eth0", "ipv4_address": "10.0.0.2", "ipv4_gateway": "10.0.0.1"}, "ADDRESS/PREFIX"),
    ({"link": "eth0", "ipv4_address": "fd00::2/64", "ipv4_gateway": "10.0.0.1"}, "IPv4 address"),
    ({"link": "eth0", "ipv4_address": "10.0.0.2/24", "ipv4_gateway": "x"}, "IPv4 gateway"),
    ({"link": "eth0/1", "ipv4_address": "10.0.0.2/24", "ipv4_gateway": "10.0.0.1"}, "link name"),
    ({"link": "eth0", "ipv4_address": "10.0.0.2/24", "ipv4_gateway": "10.0.0.1",
      "ipv6_address": "fd00::2/64", "ipv6_gateway": "10.0.0.1"}, "IPv6 gateway"),
    ({"link": "eth0", "ipv4_address": "10.0.0.2/24", "ipv4_gateway": "10.0.0.1",
      "nameservers": ("dns",)}, "resolver"),
])
def test_bad_network_is_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidArgs, match=needle):
        NetworkConfig(**kwargs)


def test_launch_request_round_trips_through_json() -> None:
    request = LaunchRequest(command=["echo", "hi"], env={"A": "1"}, hostname="guest1",
                            network=NetworkConfig("eth0", "10.0.0.2/24", "10.0.0.1",
                                                  "fd00::2/64", "fd00::1", ("10.0.0.1",)),
                            isolation="vm", terminal="xterm")
    assert LaunchRequest.from_json(request.to_json()) == request
    assert LaunchRequest.from_json('{"run": null}') == LaunchRequest()


@pytest.mark.parametrize("text,needle", [
    ("{", "not valid JSON"), ("[]", "not a JSON object"),
    ('{"network": {"link": "eth0"}}', "network lacks"),
    ('{"env": ["A=1"]}', "env is not a JSON object"),
])
def test_bad_launch_json_is_refused(text: str, needle: str) -> None:
    with pytest.raises(InvalidArgs, match=needle):
        LaunchRequest.from_json(text)
