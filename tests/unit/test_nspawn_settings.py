""".nspawn settings files: syntax, 252's lookup order and trust, and precedence over the
caller's settings (see hostel/machine/nspawn_settings.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from dbus_fast import Variant

from hostel.errors import InvalidArgs
from hostel.machine import nspawn_settings
from hostel.machine.options import SIGNATURES
from hostel.machine.settings import MachineSettings, check_value, from_dbus


@pytest.fixture
def trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Two trusted directories of the test's own (in place of /etc and /run/systemd/nspawn)."""
    etc, run = tmp_path / "etc-nspawn", tmp_path / "run-nspawn"
    etc.mkdir()
    run.mkdir()
    monkeypatch.setenv(nspawn_settings.TRUSTED_DIRS_ENV, f"{etc}:{run}")
    return etc, run


@pytest.fixture
def machines(tmp_path: Path) -> Path:
    pool = tmp_path / "machines"
    (pool / "box").mkdir(parents=True)
    return pool


def variants(values: dict[str, object]) -> dict[str, Variant]:
    return {key: Variant(SIGNATURES[key], value) for key, value in values.items()}


def start(machines: Path, **values: object) -> MachineSettings:
    return from_dbus("box", variants({"Directory": str(machines / "box"), **values}), machines)


def parsed(text: str, trusted: bool = True) -> nspawn_settings.SettingsFile:
    return nspawn_settings.parse(text, "/x/box.nspawn", trusted, check_value)


def test_sections_and_keys_become_settings() -> None:
    found = parsed("# comment\n; another\n[Exec]\nBoot=yes\nParameters=a 'b c' \"d\"\n"
                   "Environment=A=1 B=2\nEnvironment=C=3\nUser=nobody\nWorkingDirectory=/tmp\n"
                   "Capability=CAP_NET_ADMIN CAP_SYS_TIME\nKillSignal=SIGINT\n"
                   "[Files]\nReadOnly=on\nBind=/a:/b\nBind=/c\nVolatile=state\n"
                   "[Network]\nPrivate=true\nInterface=eth1 eth2\n")
    assert found.warnings == []
    assert found.values == {
        "Boot": True, "Command": ["a", "b c", "d"], "Environment": ["A=1", "B=2", "C=3"],
        "User": "nobody", "WorkingDirectory": "/tmp",
        "Capability": ["CAP_NET_ADMIN", "CAP_SYS_TIME"], "KillSignal": "SIGINT",
        "ReadOnly": True, "Bind": ["/a:/b", "/c"], "Volatile": "state",
        "PrivateNetwork": True, "NetworkInterface": ["eth1", "eth2"]}


def test_continuation_lines_and_empty_assignment_resets_a_list() -> None:
    found = parsed("[Exec]\nBoot=no\nParameters=/bin/echo \\\n  one two\nEnvironment=A=1\nEnvironment=\n"
                   "Environment=B=2\n")
    assert found.values["Command"] == ["/bin/echo", "one", "two"]
    assert found.values["Environment"] == ["B=2"]


@pytest.mark.parametrize("text, warning", [
    ("[Exec]\nBoot=maybe\n", "/x/box.nspawn:2: Failed to parse boolean value for Boot=, ignoring: maybe"),
    ("[Bogus]\nBoot=yes\n", "/x/box.nspawn:1: Unknown section 'Bogus'. Ignoring."),
    ("[Exec]\nFrobnicate=1\n", "/x/box.nspawn:2: Unknown key 'Frobnicate' in section [Exec], ignoring."),
    ("Boot=yes\n", "/x/box.nspawn:1: Assignment outside of section. Ignoring."),
    ("[Exec]\nBoot\n", "/x/box.nspawn:2: Missing '=', ignoring line."),
    ("[Exec\nBoot=1\n", "/x/box.nspawn:1: Invalid section header '[Exec', ignoring."),
    ("[Exec]\nKillSignal=SIGBOGUS\n",
     "/x/box.nspawn:2: Failed to parse KillSignal=, ignoring: SIGBOGUS (Failed to parse signal string SIGBOGUS)"),
    ("[Exec]\nWorkingDirectory=relative\n",
     "/x/box.nspawn:2: Failed to parse WorkingDirectory=, ignoring: relative (not an absolute path)"),
    ("[Exec]\nParameters=a 'b\n",
     "/x/box.nspawn:2: Failed to parse Parameters=, ignoring: a 'b (Invalid syntax (No closing quotation))"),
    ("[Files]\nBind=relative\n", "/x/box.nspawn:2: Failed to parse Bind=, ignoring: relative (Invalid bind mount"),
])
def test_bad_lines_are_warnings_naming_file_and_line(text: str, warning: str) -> None:
    found = parsed(text)
    assert found.warnings and found.warnings[0].startswith(warning), found.warnings
    assert found.values == {}


def test_unknown_capability_is_a_warning_the_rest_applies() -> None:
    found = parsed("[Exec]\nCapability=CAP_BOGUS\nDropCapability=CAP_CHOWN\n")
    assert "unknown capability 'CAP_BOGUS'" in found.warnings[0]
    assert found.warnings[0].startswith("/x/box.nspawn:2: Failed to parse Capability=, ignoring")
    assert found.values == {"DropCapability": ["CAP_CHOWN"]}


def test_parameters_need_a_start_mode_as_in_252() -> None:
    found = parsed("[Exec]\nParameters=/bin/true\n")
    assert found.values == {} and "Parameters= without Boot= or ProcessTwo=" in found.warnings[0]
    assert parsed("[Exec]\nProcessTwo=yes\nParameters=/bin/true\n").values["Command"] == ["/bin/true"]


def test_x_sections_and_keys_are_silently_ignored() -> None:
    found = parsed("[X-Mine]\nA=1\n[Exec]\nX-Other=2\n")
    assert found.warnings == [] and found.values == {}


def test_lookup_order_etc_then_run_then_beside_the_tree(trusted: tuple[Path, Path],
                                                        machines: Path) -> None:
    etc, run = trusted
    (machines / "box.nspawn").write_text("[Exec]\nEnvironment=FROM=beside\n")
    assert start(machines).environment == ["FROM=beside"]
    (run / "box.nspawn").write_text("[Exec]\nEnvironment=FROM=run\n")
    assert start(machines).environment == ["FROM=run"]
    (etc / "box.nspawn").write_text("[Exec]\nEnvironment=FROM=etc\n")
    assert start(machines).environment == ["FROM=etc"]
    assert start(machines, Settings="no").environment == []


def test_image_looks_beside_the_image(trusted: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "imgs" / "box.raw"
    image.parent.mkdir()
    image.write_bytes(b"")
    (image.parent / "box.nspawn").write_text("[Exec]\nUser=daemon\n")
    assert from_dbus("box", variants({"Image": str(image)}), tmp_path).user == "daemon"


def test_command_line_wins_unless_override(trusted: tuple[Path, Path], machines: Path) -> None:
    (trusted[0] / "box.nspawn").write_text("[Exec]\nUser=daemon\nBoot=no\nParameters=/bin/true\n"
                                           "Environment=A=1\n[Files]\nReadOnly=yes\n")
    s = start(machines, User="root", Command=["/bin/false"])
    assert (s.user, s.command, s.environment, s.read_only) == ("root", ["/bin/false"], ["A=1"], True)
    s = start(machines, User="root", Command=["/bin/false"], Settings="override")
    assert (s.user, s.command) == ("daemon", ["/bin/true"])
    # --boot on the command line masks the file's Parameters= (one group in 252)
    assert start(machines, Boot=True).command == []


def test_untrusted_file_loses_its_privileged_settings(trusted: tuple[Path, Path],
                                                     machines: Path) -> None:
    (machines / "box.nspawn").write_text(
        "[Exec]\nCapability=CAP_SYS_ADMIN\nDropCapability=CAP_CHOWN\nUser=daemon\n"
        "MachineID=0123456789abcdef0123456789abcdef\n"
        "[Files]\nBind=/etc\n[Network]\nPrivate=yes\n")
    s = start(machines)
    assert (s.user, s.drop_capability) == ("daemon", ["CAP_CHOWN"])
    assert (s.capability, s.binds, s.private_network, s.uuid) == ([], [], False, None)
    s = start(machines, Settings="trusted")
    assert (s.capability, len(s.binds), s.private_network) == (["CAP_SYS_ADMIN"], 1, True)
    assert s.uuid == bytes.fromhex("0123456789abcdef0123456789abcdef")


def test_untrusted_warnings_are_252s() -> None:
    found = parsed("[Files]\nBind=/etc\n[Network]\nPrivate=yes\n", trusted=False)
    nspawn_settings.merge({}, found, False)
    assert found.warnings == [
        "Ignoring TemporaryFileSystem=, Bind= and BindReadOnly= settings, file /x/box.nspawn "
        "is not trusted.",
        "Ignoring network settings, file /x/box.nspawn is not trusted."]


def test_bad_settings_mode_is_refused(machines: Path) -> None:
    with pytest.raises(InvalidArgs, match="Failed to parse --settings= argument: maybe"):
        start(machines, Settings="maybe")


def test_a_directory_in_place_of_the_file_fails_the_start_by_name(
        trusted: tuple[Path, Path], machines: Path) -> None:
    (trusted[0] / "box.nspawn").mkdir()
    with pytest.raises(InvalidArgs, match=f"{trusted[0]}/box.nspawn: it is a directory"):
        start(machines)


def test_a_fifo_is_refused_without_blocking(trusted: tuple[Path, Path], machines: Path) -> None:
    os.mkfifo(trusted[0] / "box.nspawn")
    with pytest.raises(InvalidArgs, match="not a regular file"):
        start(machines)


def test_a_huge_file_is_refused(trusted: tuple[Path, Path], machines: Path) -> None:
    with open(trusted[0] / "box.nspawn", "wb") as f:
        f.truncate(nspawn_settings.MAX_FILE_SIZE + 1)
    with pytest.raises(InvalidArgs, match="more than the 1048576 a settings file may have"):
        start(machines)


def test_symlinks_are_followed_as_fopen_does(trusted: tuple[Path, Path], machines: Path,
                                             tmp_path: Path) -> None:
    target = tmp_path / "real.nspawn"
    target.write_text("[Exec]\nUser=daemon\n")
    (trusted[0] / "box.nspawn").symlink_to(target)
    assert start(machines).user == "daemon"
    (trusted[0] / "box.nspawn").unlink()
    (trusted[0] / "box.nspawn").symlink_to(tmp_path / "missing")  # dangling: no file
    assert start(machines).user is None
    (trusted[0] / "box.nspawn").unlink()
    (trusted[0] / "box.nspawn").symlink_to(trusted[0] / "box.nspawn")  # a loop
    with pytest.raises(InvalidArgs, match="Failed to open settings file .*box.nspawn"):
        start(machines)


def test_unreadable_bytes_and_binary_garbage_are_only_warnings(trusted: tuple[Path, Path],
                                                               machines: Path) -> None:
    (trusted[0] / "box.nspawn").write_bytes(b"\xff\xfe\x00garbage\n[Exec]\nUser=daemon\n")
    assert start(machines).user == "daemon"


def test_file_values_still_meet_the_combination_rules(trusted: tuple[Path, Path],
                                                      machines: Path) -> None:
    (trusted[0] / "box.nspawn").write_text("[Exec]\nBoot=yes\nProcessTwo=yes\n")
    with pytest.raises(InvalidArgs, match="--as-pid2 and --boot may not be combined"):
        start(machines)


def test_warnings_reach_the_callers_stderr(trusted: tuple[Path, Path], machines: Path) -> None:
    (trusted[0] / "box.nspawn").write_text("[Exec]\nBogus=1\n")
    r, w = os.pipe()
    try:
        start(machines, StandardError=w)
        assert os.read(r, 4096).decode() == (
            f"{trusted[0]}/box.nspawn:2: Unknown key 'Bogus' in section [Exec], ignoring.\n")
    finally:
        os.close(r)
        os.close(w)


def test_resource_limits_are_masked_one_by_one(trusted: tuple[Path, Path], machines: Path) -> None:
    (trusted[0] / "box.nspawn").write_text("[Exec]\nLimitNOFILE=100:200\nLimitNPROC=50\n")
    s = start(machines, RLimits=["NOFILE=300"])
    assert {n: (lim.soft, lim.hard) for n, lim in s.rlimits.items()} == {
        "NOFILE": (300, 300), "NPROC": (50, 50)}
    s = start(machines, RLimits=["NOFILE=300"], Settings="override")
    assert s.rlimits["NOFILE"].soft == 100


def test_untrusted_file_sets_no_limits_as_252() -> None:
    found = parsed("[Exec]\nLimitNOFILE=10\nOOMScoreAdjust=5\nCPUAffinity=0\nHostname=h\n",
                   trusted=False)
    assert nspawn_settings.merge({}, found, False) == {"Hostname": "h"}
    assert found.warnings == [
        "Ignoring LimitNOFILE= setting, file '/x/box.nspawn' is not trusted.",
        "Ignoring OOMScoreAdjust= setting, file '/x/box.nspawn' is not trusted.",
        "Ignoring CPUAffinity= setting, file '/x/box.nspawn' is not trusted."]


def test_untrusted_ephemeral_and_journal_link_are_ignored_as_252() -> None:
    found = parsed("[Exec]\nEphemeral=yes\nLinkJournal=host\nUser=daemon\n", trusted=False)
    assert nspawn_settings.merge({}, found, False) == {"User": "daemon"}
    assert found.warnings == [
        "Ignoring ephemeral setting, file /x/box.nspawn is not trusted.",
        "Ignoring journal link setting, file '/x/box.nspawn' is not trusted."]


def test_untrusted_file_may_deny_but_not_allow_system_calls() -> None:
    deny = parsed("[Exec]\nSystemCallFilter=~uname\n", trusted=False)
    assert nspawn_settings.merge({}, deny, False) == {"SystemCallFilter": ["~uname"]}
    allow = parsed("[Exec]\nSystemCallFilter=@swap\n", trusted=False)
    assert nspawn_settings.merge({}, allow, False) == {}
    assert allow.warnings == [
        "Ignoring SystemCallFilter= settings, file /x/box.nspawn is not trusted."]


def test_bad_resource_limit_in_a_file_is_a_warning() -> None:
    found = parsed("[Exec]\nLimitNOFILE=lots\nOOMScoreAdjust=5000\nCPUAffinity=x\n")
    assert found.values == {}
    assert [w.split(": ")[1] for w in found.warnings] == [
        "Failed to parse LimitNOFILE=, ignoring", "Failed to parse OOMScoreAdjust=, ignoring",
        "Failed to parse CPUAffinity=, ignoring"]


def test_property_values_become_cgroup_files() -> None:
    from hostel.machine.cgroup_properties import parse_property

    assert parse_property("MemoryMax=1.5G").v2 == (("memory.max", str(3 << 29)),)
    assert parse_property("MemoryMax=infinity").v1 == (("memory", "memory.limit_in_bytes", "-1"),)
    assert parse_property("CPUQuota=250%").v2 == (("cpu.max", "250000 100000"),)
    assert parse_property("CPUWeight=50").v1 == (("cpu", "cpu.shares", "512"),)
    assert parse_property("TasksMax=infinity").v2 == (("pids.max", "max"),)
    assert parse_property("MemoryHigh=10M").v1 == ()  # v2 only: refused at start on v1
    with pytest.raises(InvalidArgs, match="a number from 1 to 10000"):
        parse_property("IOWeight=0")


def test_private_users_ownership_defaults_and_file_keys(trusted: tuple[Path, Path],
                                                        machines: Path) -> None:
    assert start(machines).ownership == "off"
    assert start(machines, PrivateUsers="pick").ownership == "auto"  # 252: pick implies auto
    assert start(machines, PrivateUsers="pick", PrivateUsersOwnership="chown").ownership == "chown"
    with pytest.raises(InvalidArgs, match="Cannot parse --private-users-ownership= value: x"):
        start(machines, PrivateUsersOwnership="x")
    (trusted[0] / "box.nspawn").write_text("[Exec]\nPrivateUsers=pick\n[Files]\nPrivateUsersChown=yes\n")
    assert start(machines).ownership == "chown"
    (machines / "box.nspawn").write_text("[Files]\nPrivateUsersOwnership=map\n")
    (trusted[0] / "box.nspawn").unlink()
    assert start(machines).ownership == "off"  # untrusted: ignored


def test_dash_u_is_pick_and_auto() -> None:
    from hostel.machine import cmdline, runclient

    _, settings = runclient.settings_from_args(cmdline.parse(["-U", "-D", "/x", "true"]))
    assert settings["PrivateUsers"] == ("s", "pick")
    assert settings["PrivateUsersOwnership"] == ("s", "auto")
    assert "-U" in cmdline.usage()
