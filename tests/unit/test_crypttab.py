"""crypttab and command-line parsing into Volumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostel.cryptsetup.crypttab import (
    CrypttabError, Volume, filter_header_device, filter_options, find_option, iter_lines,
    load_volumes, parse_cmdline, split_cmdline, split_location, option_yes_no)

U = "deadbeef-0000-1111-2222-333344445555"


def volumes(tmp_path: Path, crypttab: str, cmdline: str = "", initrd: bool = False) -> list[Volume]:
    path = tmp_path / "crypttab"
    path.write_text(crypttab)
    return load_volumes(str(path), [cmdline], initrd)


def test_crypttab_fields_and_defaults(tmp_path: Path) -> None:
    vols = volumes(tmp_path, "# c\n\n home UUID=x /k.key luks,discard\nroot /dev/sda2\nbad\n")
    assert [v.name for v in vols] == ["home", "root"]
    assert vols[0] == Volume("home", "UUID=x", "/k.key", None, None, "luks,discard",
                             source=str(tmp_path / "crypttab"), line=3)
    assert vols[1].key_file is None and vols[1].options is None


def test_key_and_header_devices_are_split(tmp_path: Path) -> None:
    (vol,) = volumes(tmp_path, "v /dev/sda /k:LABEL=usb header=/h.img:/dev/sdh,discard\n")
    assert (vol.key_file, vol.key_device) == ("/k", "/dev/disk/by-label/usb")
    assert (vol.header_device, vol.options) == ("/dev/sdh", "discard,header=/h.img")


def test_allow_list_and_cmdline_only_volumes(tmp_path: Path) -> None:
    crypttab = f"a UUID={U} none\nb /dev/sdb none\n"
    vols = volumes(tmp_path, crypttab, f"luks.uuid={U} luks.name=abcd=data luks.key=abcd=/x")
    assert [(v.name, v.from_cmdline) for v in vols] == [("a", False), ("data", True)]
    assert vols[1].device == "UUID=abcd" and vols[1].key_file is None  # abcd is not a valid UUID


def test_cmdline_options_override_crypttab_options(tmp_path: Path) -> None:
    vols = volumes(tmp_path, f"luks-{U} /dev/sdz none tries=1\n", f"luks.options={U}=tries=9")
    assert [(v.name, v.options) for v in vols] == [(f"luks-{U}", "tries=9")]


def test_rd_prefix_only_in_initrd(tmp_path: Path) -> None:
    assert volumes(tmp_path, "", f"rd.luks.uuid={U}") == []
    (vol,) = volumes(tmp_path, "", f"rd.luks.uuid={U} rd.luks.data={U}=LABEL=d", initrd=True)
    assert vol.device == vol.data_device == "/dev/disk/by-label/d"


def test_switches_off(tmp_path: Path) -> None:
    assert volumes(tmp_path, "a /dev/sda\n", "luks=no") == []
    assert volumes(tmp_path, "a /dev/sda\n", "luks.crypttab=off") == []
    assert len(volumes(tmp_path, "a /dev/sda\n", "luks=bogus")) == 1


def test_cmdline_quoting() -> None:
    assert split_cmdline('a "b c" d=\'e f\'g\\ h') == ["a", "b c", "d=e fg\\", "h"]
    config = parse_cmdline([f'luks.name={U}="my vol"'], False)
    assert config.disks[U].name == "my"  # sscanf %s stops at the space, as in systemd


def test_option_helpers() -> None:
    assert filter_options("a,,header=/x\\,y,b\\\\c", ("header",)) == (True, "/x,y", "a,b\\c")
    assert filter_options(None, ("tmp",)) == (False, None, "")
    assert find_option("swap=1,x", ("swap",)) == "swap"
    assert find_option("a\\,swap", ("swap",)) is None
    assert option_yes_no("noauto,auto", "noauto", "auto") is False
    assert filter_header_device("header") == (None, "header=")
    assert split_location("/a:b") == ("/a:b", None)
    assert split_location("/a:b:UUID=1") == ("/a:b", "/dev/disk/by-uuid/1")


def test_line_endings_and_limits() -> None:
    assert list(iter_lines(b"a\r\nb\n\rc\rd\0e\n\nf")) == [b"a", b"b", b"c", b"d", b"e", b"", b"f"]
    with pytest.raises(CrypttabError):
        list(iter_lines(b"x" * (1 << 20)))


def test_directory_as_crypttab_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(CrypttabError):
        load_volumes(str(tmp_path), [""], False)
