"""hostel._luks through hostel.cryptsetup.luks, and the volume model, on real LUKS images.

The images are made with libcryptsetup (cheap PBKDF2) and cross-checked with the
cryptsetup tool; UUID= resolution runs against a real loop device."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from hostel.bus import InvalidArgs
from hostel.cryptsetup import luks, volumes

PASSPHRASE = b"correct horse battery staple"
KEY_FILE_BYTES = b"\x00\x01key file bytes, not a line\n\xff"
UUID2 = "0a6e5a4c-0b4b-4d8e-9a43-1f2a3b4c5d6e"
IMAGE_BYTES = 20 << 20
FAST = 1000  # PBKDF2 iterations: tests only


def make_image(path: Path, version: int, passphrases: list[bytes], **kwargs: object) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    luks.format_volume(str(path), version, passphrases, pbkdf2_iterations=FAST, **kwargs)
    return path


@pytest.fixture
def luks2(tmp_path: Path) -> Path:
    return make_image(tmp_path / "luks2.img", 2, [PASSPHRASE, KEY_FILE_BYTES],
                      label="hostel-test", uuid=UUID2)


@pytest.fixture
def luks1(tmp_path: Path) -> Path:
    return make_image(tmp_path / "luks1.img", 1, [PASSPHRASE])


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(b"padding!" + KEY_FILE_BYTES + b"trailer")
    return path


def losetup_list() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def loop_device(luks2: Path) -> Iterator[str]:
    device = subprocess.run(["losetup", "--find", "--show", str(luks2)], capture_output=True,
                            text=True, check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


# Header facts -----------------------------------------------------------------------

def luks_dump(path: Path) -> dict[str, str]:
    out = subprocess.run(["cryptsetup", "luksDump", str(path)], capture_output=True, text=True,
                         check=True).stdout
    facts = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t")):
            facts.setdefault(key.strip(), value.strip())
    return facts


def test_luks2_header_facts_agree_with_cryptsetup(luks2: Path) -> None:
    info = luks.read_header(str(luks2))
    assert info == luks.LuksInfo(version=2, uuid=UUID2, cipher="aes-xts-plain64",
                                 key_slots=(0, 1), label="hostel-test")
    dump = luks_dump(luks2)
    assert (dump["Version"], dump["UUID"], dump["Label"]) == ("2", UUID2, "hostel-test")


def test_luks1_header_facts_agree_with_cryptsetup(luks1: Path) -> None:
    info = luks.read_header(str(luks1))
    dump = luks_dump(luks1)
    assert (info.version, info.uuid, info.label, info.key_slots) == (1, dump["UUID"], "", (0,))
    assert info.cipher == f"{dump['Cipher name']}-{dump['Cipher mode']}" == "aes-xts-plain64"


def test_a_header_made_by_the_cryptsetup_tool_reads_too(tmp_path: Path) -> None:
    image = tmp_path / "tool.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                    "pbkdf2", "--pbkdf-force-iterations", "1000", "--cipher", "aes-cbc-essiv:sha256",
                    "--key-size", "256", "--label", "made-by-tool", "--key-file", "-", str(image)],
                   input=PASSPHRASE, check=True, capture_output=True)
    info = luks.read_header(str(image))
    assert (info.cipher, info.label, info.key_slots) == ("aes-cbc-essiv:sha256", "made-by-tool", (0,))
    assert luks.check_key(str(image), luks.Key(passphrase=PASSPHRASE))


@pytest.mark.parametrize("size", [0, 100, 4095, 4096, 1 << 20])
def test_non_luks_files_are_not_luks(tmp_path: Path, size: int) -> None:
    path = tmp_path / "zeros"
    path.write_bytes(bytes(size))
    with pytest.raises(luks.NotLuks, match=f"{path} is not a LUKS device"):
        luks.read_header(str(path))


def test_a_missing_device_is_named(tmp_path: Path) -> None:
    with pytest.raises(luks.LuksError, match=f"cannot open {tmp_path}/nothing.*does not exist"):
        luks.read_header(str(tmp_path / "nothing"))


# Keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("image", ["luks1", "luks2"])
def test_check_key_tells_right_from_wrong(image: str, request: pytest.FixtureRequest) -> None:
    path = str(request.getfixturevalue(image))
    assert luks.check_key(path, luks.Key(passphrase=PASSPHRASE)) is True
    assert luks.check_key(path, luks.Key(passphrase=PASSPHRASE + b"!")) is False
    assert luks.check_key(path, luks.Key(passphrase=b"")) is False


def test_check_key_reads_the_given_part_of_a_key_file(luks2: Path, key_file: Path) -> None:
    part = luks.Key(key_file=str(key_file), key_file_offset=8, key_file_size=len(KEY_FILE_BYTES))
    assert luks.check_key(str(luks2), part) is True
    assert luks.check_key(str(luks2), luks.Key(key_file=str(key_file))) is False


def test_a_missing_key_file_is_an_error_not_a_wrong_key(luks2: Path, tmp_path: Path) -> None:
    with pytest.raises(luks.LuksError, match=f"key file {tmp_path}/nokey"):
        luks.check_key(str(luks2), luks.Key(key_file=str(tmp_path / "nokey")))


def test_a_key_is_a_passphrase_or_a_key_file() -> None:
    with pytest.raises(ValueError):
        luks.Key()
    with pytest.raises(ValueError):
        luks.Key(passphrase=b"x", key_file="/k")


# Activation on a kernel without device-mapper ----------------------------------------------

needs_no_dm = pytest.mark.skipif(luks.device_mapper_missing() is None,
                                 reason="this kernel has device-mapper")


def test_device_mapper_check_agrees_with_proc_misc() -> None:
    with open("/proc/misc") as f:
        listed = any(line.split()[1:] == ["device-mapper"] for line in f)
    missing = luks.device_mapper_missing()
    assert (missing is None) == (listed and os.path.exists("/dev/mapper/control"))
    if not listed:
        assert "no device-mapper" in missing and "modprobe dm_mod" in missing


@needs_no_dm
@pytest.mark.parametrize("passphrase", [PASSPHRASE, b"wrong"])
def test_activate_fails_saying_device_mapper_and_leaves_nothing(luks2: Path,
                                                                passphrase: bytes) -> None:
    loops_before = losetup_list()
    with pytest.raises(luks.DeviceMapperUnavailable,
                       match=r"cannot attach hosteltest .*this kernel has no device-mapper"):
        luks.activate("hosteltest", str(luks2), luks.Key(passphrase=passphrase))
    assert losetup_list() == loops_before  # libcryptsetup's loop device for the file is gone
    assert not os.path.exists("/dev/mapper/hosteltest")


def test_deactivate_of_an_unknown_name_fails_naming_it() -> None:
    with pytest.raises(luks.LuksError, match="cannot detach hostel-no-such-volume"):
        luks.deactivate("hostel-no-such-volume")


def test_format_refuses_a_label_on_luks1(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LUKS1 headers have no label"):
        make_image(tmp_path / "x.img", 1, [PASSPHRASE], label="nope")


# Finding sources ---------------------------------------------------------------------------

def test_uuid_and_label_resolve_to_the_loop_device(loop_device: str) -> None:
    assert luks.evaluate_spec(f"UUID={UUID2}") == loop_device
    assert luks.evaluate_spec('LABEL="hostel-test"') == loop_device
    assert volumes.resolve_source(f"UUID={UUID2}") == loop_device
    assert volumes.resolve_source(f"/dev/disk/by-uuid/{UUID2}") == loop_device
    assert volumes.resolve_source("/dev/disk/by-label/hostel\\x2dtest") == loop_device


def test_an_absent_uuid_resolves_to_nothing() -> None:
    assert luks.evaluate_spec("UUID=ffffffff-0000-4000-8000-000000000000") is None
    assert volumes.resolve_source("UUID=ffffffff-0000-4000-8000-000000000000") == ""


def test_paths_resolve_to_themselves_when_present(luks2: Path, tmp_path: Path) -> None:
    assert volumes.resolve_source(str(luks2)) == os.path.realpath(luks2)
    assert volumes.resolve_source(str(tmp_path / "absent")) == ""
    assert volumes.resolve_source("relative/path") == ""


# The volume model --------------------------------------------------------------------------

@pytest.mark.parametrize("name, problem", [
    ("a/b", "contains '/'"), ("", "empty"), (".", "not allowed"), ("..", "not allowed"),
    ("x" * 128, "longer than 127 bytes"), ("x" * 127, None), ("luks-home_2", None)])
def test_volume_names_must_be_device_mapper_names(name: str, problem: str | None) -> None:
    found = volumes.name_problem(name)
    assert (found is None) if problem is None else (problem in found)
    if problem is not None:
        with pytest.raises(InvalidArgs):
            volumes.check_name(name)


def test_load_keeps_good_lines_and_says_why_others_are_skipped(tmp_path: Path, luks1: Path,
                                                              luks2: Path) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(
        "# a comment\n"
        f"first {luks1} none luks,keyfile-size=32,keyfile-offset=8\n"
        "onefield\n"
        f"a/b {luks2} none\n"
        f"first {luks2} none\n"
        f"second {luks2} /k:/dev/sdz1 luks,header=/hdr:UUID=1234\n")
    loaded = volumes.load(str(crypttab), [""])
    assert list(loaded.volumes) == ["first", "second"]
    assert loaded.error == ""
    text = "\n".join(loaded.warnings)
    assert f"Failed to parse {crypttab}:3, ignoring." in text
    assert f"{crypttab}:4: volume name 'a/b' contains '/'" in text
    assert f"{crypttab}:5: volume first is defined again" in text

    first, second = loaded.volumes["first"], loaded.volumes["second"]
    assert first.luks is not None and first.luks.version == 1
    assert first.key_file_range() == (32, 8)
    assert first.options == ["luks", "keyfile-size=32", "keyfile-offset=8"]
    props = second.properties()
    assert (props["KeyFile"], props["KeyDevice"]) == ("/k", "/dev/sdz1")
    assert (props["Header"], props["HeaderDevice"]) == ("/hdr", "/dev/disk/by-uuid/1234")
    assert props["LuksVersion"] == 0 and "header is on device" in props["HeaderError"]


def test_a_bad_keyfile_size_is_reported_when_used(tmp_path: Path, luks1: Path) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"v {luks1} none keyfile-size=lots\n")
    volume = volumes.load(str(crypttab), [""]).volumes["v"]
    with pytest.raises(InvalidArgs, match="volume v: keyfile-size=lots .* is not a number"):
        volume.key_file_range()


def test_command_line_volumes_come_from_the_same_parser(tmp_path: Path) -> None:
    uuid = "ffffffff-0000-4000-8000-000000000001"
    loaded = volumes.load(str(tmp_path / "no-crypttab"), [f"luks.uuid={uuid} luks.options=discard"])
    volume = loaded.volumes[f"luks-{uuid}"]
    props = volume.properties()
    assert (props["Device"], props["Options"], props["Source"]) == (f"UUID={uuid}", ["discard"],
                                                                    "/proc/cmdline")
    assert (props["State"], props["ResolvedDevice"]) == ("missing-device", "")


def test_an_unreadable_crypttab_loads_nothing_and_says_so(tmp_path: Path) -> None:
    directory = tmp_path / "crypttab.d"
    directory.mkdir()
    loaded = volumes.load(str(directory), [""])
    assert loaded.volumes == {}
    assert loaded.error == f"cannot read {directory} (Is a directory): no volumes loaded"
    assert loaded.error in loaded.warnings


def test_state_follows_the_source(tmp_path: Path, luks2: Path) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"v {luks2}\n")
    volume = volumes.load(str(crypttab), [""]).volumes["v"]
    assert volume.state() == volumes.INACTIVE
    luks2.unlink()
    fresh = volume.inspected()
    assert (fresh.state(), fresh.resolved, fresh.luks) == (volumes.MISSING_DEVICE, "", None)
    assert volume.state() == volumes.INACTIVE  # the old snapshot is left alone

