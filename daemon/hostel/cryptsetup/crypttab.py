"""crypttab and kernel command line, turned into one Volume per encrypted volume.

The generator and the daemon's volume manager share this parser, so the
result is plain data: what to unlock, from where, with which key and options.
The rules follow systemd v252's cryptsetup generator exactly, quirks included
(they are part of the contract a drop-in replacement has to keep).

Lean on purpose: the generator imports this at every boot.  No dataclasses
(13 ms to import here), no re, and not even os (1.4 ms with what it pulls in):
the builtin posix module does the few system calls needed.
"""

import errno
import posix
import stat
import sys

from hostel.cryptsetup.unitname import fstab_node_to_udev_node, from_bytes, path_startswith

DEFAULT_CRYPTTAB = "/etc/crypttab"
CMDLINE_SOURCE = "/proc/cmdline"
LONG_LINE_MAX = 1024 * 1024
_EFI_OPTIONS_CACHE = "/run/systemd/efivars/SystemdOptions-8cf2644b-4b0b-428f-9387-6d876050dc67"
_WHITESPACE = " \t\n\r"          # systemd's WHITESPACE: splits the kernel command line
_C_SPACE = " \t\n\v\f\r"         # isspace() in the C locale: what sscanf() skips
_HEX_OR_DASH = frozenset("0123456789abcdefABCDEF-")
_ALNUM_OR_DASH = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")
_LOG_LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 3, 4, 6, 7


class CrypttabError(OSError):
    """The crypttab exists but cannot be read to the end; systemd fails the run."""

    errno: int  # always raised as CrypttabError(errno, message)


def getenv(name: str) -> str | None:
    """os.environ.get() without importing os; uses os.environ when a host program
    (the daemon) already has os loaded, so its changes to the environment count."""
    os_module = sys.modules.get("os")
    if os_module is not None:
        value: str | None = os_module.environ.get(name)
        return value
    raw = posix.environ.get(name.encode())
    return None if raw is None else from_bytes(raw)


def getenv_or(name: str, default: str) -> str:
    """getenv() with a default for an unset variable (a set, empty one stays empty, as in C)."""
    value = getenv(name)
    return default if value is None else value


def exists(path: str) -> bool:
    try:
        posix.stat(path)
    except OSError:
        return False
    return True


def _max_log_level() -> int:
    value = getenv_or("SYSTEMD_LOG_LEVEL", "info")
    return int(value) if value.isdigit() else _LOG_LEVELS.get(value, LOG_INFO)


def log(level: int, message: str) -> None:
    """Log to stderr, honouring SYSTEMD_LOG_LEVEL like systemd's generators."""
    if level <= _max_log_level():
        sys.stderr.write(message + "\n")


# --- the data model -------------------------------------------------------------

class Volume:
    """One encrypted volume, with its specs still as written (udev paths are resolved later)."""

    __slots__ = ("name", "device", "key_file", "key_device", "header_device",
                 "options", "source", "from_cmdline", "uuid", "data_device", "line")

    def __init__(self, name: str, device: str, key_file: str | None = None,
                 key_device: str | None = None, header_device: str | None = None,
                 options: str | None = None, source: str = DEFAULT_CRYPTTAB,
                 from_cmdline: bool = False, uuid: str | None = None,
                 data_device: str | None = None, line: int = 0) -> None:
        self.name = name
        self.device = device                # what to unlock (luks.data= already applied)
        self.key_file = key_file            # relative to key_device's root when that is set
        self.key_device = key_device
        self.header_device = header_device  # options then hold header= relative to it
        self.options = options
        self.source = source                # crypttab path, or /proc/cmdline
        self.from_cmdline = from_cmdline
        self.uuid = uuid                    # the luks.* UUID a command-line volume came from
        self.data_device = data_device      # luks.data=, for command-line volumes
        self.line = line                    # crypttab line number, 0 for the command line

    def _fields(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Volume) and self._fields() == other._fields()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Volume({args})"


class CmdlineDisk:
    """What luks.*= switches said about one UUID."""

    __slots__ = ("uuid", "name", "key_file", "key_device", "header_device",
                 "data_device", "options", "create")

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.name: str | None = None
        self.key_file: str | None = None
        self.key_device: str | None = None
        self.header_device: str | None = None
        self.data_device: str | None = None
        self.options: str | None = None
        self.create = False


class CmdlineConfig:
    """The luks.* switches of the kernel command line, in effect after parsing all of them."""

    def __init__(self) -> None:
        self.enabled = True
        self.read_crypttab = True
        self.allow_list = False        # any luks.uuid=/luks.name= restricts crypttab to those
        self.disks: dict[str, CmdlineDisk] = {}
        self.default_options: str | None = None
        self.default_key_file: str | None = None

    def disk(self, uuid: str) -> CmdlineDisk:
        d = self.disks.get(uuid)
        if d is None:
            d = self.disks[uuid] = CmdlineDisk(uuid)
        return d


# --- small parsers --------------------------------------------------------------

def parse_boolean(value: str) -> bool | None:
    v = value.lower()
    if v in ("1", "yes", "y", "true", "t", "on"):
        return True
    if v in ("0", "no", "n", "false", "f", "off"):
        return False
    return None


def id128_is_valid(s: str) -> bool:
    if len(s) == 36:
        if any(s[i] != "-" for i in (8, 13, 18, 23)):
            return False
        s = s[:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
    return len(s) == 32 and all(c in _HEX_OR_DASH and c != "-" for c in s)


def _scan_uuid_assignment(value: str) -> tuple[str, str] | None:
    """sscanf("%[0-9a-fA-F-]=%s"): hex-ish UUID, '=', then one whitespace-free word."""
    n = 0
    while n < len(value) and value[n] in _HEX_OR_DASH:
        n += 1
    if n == 0 or value[n:n + 1] != "=":
        return None
    rest = value[n + 1:].lstrip(_C_SPACE)
    end = 0
    while end < len(rest) and rest[end] not in _C_SPACE:
        end += 1
    return (value[:n], rest[:end]) if end else None


def _span_alnum_dash(value: str) -> int:
    n = 0
    while n < len(value) and value[n] in _ALNUM_OR_DASH:
        n += 1
    return n


def split_location(spec: str | None) -> tuple[str | None, str | None]:
    """'file:device' into (file, device); the part after the last colon counts as a
    device only if it resolves to an absolute path (LABEL=..., /dev/...)."""
    if spec is None:
        return None, None
    colon = spec.rfind(":")
    if colon >= 0:
        device = fstab_node_to_udev_node(spec[colon + 1:])
        if device.startswith("/"):
            return spec[:colon], device
    return spec, None


# --- mount-style option strings ----------------------------------------------------

def _split_escaped(opts: str, unescape: bool) -> list[str]:
    """Split at commas not escaped by a backslash.  With unescape, '\\,' and
    '\\\\' lose their backslash and empty items vanish (systemd's filter mode)."""
    if "\\" not in opts:
        parts = opts.split(",")
        return [p for p in parts if p] if unescape else parts
    words: list[str] = []
    cur: list[str] = []
    i, n = 0, len(opts)
    while i < n:
        c = opts[i]
        if c == "\\":
            nxt = opts[i + 1:i + 2]
            cur.append(nxt if unescape and nxt in (",", "\\") else c + nxt)
            i += 2
            continue
        if c == ",":
            if cur or not unescape:
                words.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if cur or not unescape:
        words.append("".join(cur))
    return words


def filter_options(opts: str | None, names: tuple[str, ...]) -> tuple[bool, str | None, str]:
    """(found, last value, the remaining options re-joined) for options called one of names.

    The remaining options are normalised on the way, as systemd does: empty
    items dropped, escapes undone and commas re-escaped.
    """
    if opts is None:
        return False, None, ""
    found, value, kept = False, None, []
    for word in _split_escaped(opts, unescape=True):
        for name in names:
            if word.startswith(name) and (len(word) == len(name) or word[len(name)] == "="):
                found = True
                value = word[len(name) + 1:] if len(word) > len(name) else None
                break
        else:
            kept.append(word)
    return found, value, ",".join(w.replace(",", "\\,") for w in kept)


def find_option(opts: str | None, names: tuple[str, ...]) -> str | None:
    """The name (from names) of the last option present, with or without a value."""
    if not opts:
        return None
    found = None
    for word in _split_escaped(opts, unescape=False):
        for name in names:
            if word.startswith(name) and (len(word) == len(name) or word[len(name)] == "="):
                found = name
                break
    return found


def option_yes_no(opts: str | None, yes: str, no: str) -> bool:
    """True if the last of yes/no present is yes (e.g. noauto vs auto)."""
    return find_option(opts, (yes, no)) == yes


def filter_header_device(options: str) -> tuple[str | None, str]:
    """Split header=FILE:DEVICE off the options; the options keep header=FILE."""
    found, spec, filtered = filter_options(options, ("header",))
    if not found:
        return None, filtered
    header_file, header_device = split_location(spec)
    joined = "header=" + (header_file or "")
    return header_device, (filtered + "," + joined if filtered else joined)


# --- kernel command line -------------------------------------------------------------

def split_cmdline(line: str) -> list[str]:
    """Words of a kernel command line: quotes group and vanish, backslashes stay."""
    if "'" not in line and '"' not in line:
        for ws in "\t\n\r":
            line = line.replace(ws, " ")
        return [w for w in line.split(" ") if w]
    words: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _WHITESPACE:
            i += 1
        if i >= n:
            return words
        buf: list[str] = []
        quote = ""
        while i < n:
            c = line[i]
            if quote:
                if c == quote:
                    quote = ""
                else:
                    buf.append(c)
            elif c in "'\"":
                quote = c
            elif c in _WHITESPACE:
                break
            else:
                buf.append(c)
            i += 1
        words.append("".join(buf))


def parse_cmdline(lines: list[str], in_initrd: bool) -> CmdlineConfig:
    """Apply every luks.* switch in order; rd.luks.* counts only inside the initrd."""
    config = CmdlineConfig()
    for line in lines:
        for word in split_cmdline(line):
            if word.startswith("rd."):
                if not in_initrd:
                    continue
                word = word[3:]
            key, eq, value = word.partition("=")
            handler = _SWITCHES.get(key)
            if handler is not None:
                handler(config, key, value if eq else None)
    return config


def _missing_value(key: str) -> None:
    log(LOG_WARNING, f"Missing argument for {key}= kernel command line switch, ignoring.")


def _uuid_invalid(uuid: str, key: str) -> bool:
    if not id128_is_valid(uuid):
        log(LOG_WARNING, f"Failed to parse {key}= kernel command line switch. UUID is invalid, ignoring.")
        return True
    return False


def _switch_bool(attr: str):
    def handle(config: CmdlineConfig, key: str, value: str | None) -> None:
        parsed = True if value is None else parse_boolean(value)
        if parsed is None:
            log(LOG_WARNING, f"Failed to parse {key}= kernel command line switch {value}. Ignoring.")
        else:
            setattr(config, attr, parsed)
    return handle


def _switch_uuid(config: CmdlineConfig, key: str, value: str | None) -> None:
    if value is None:
        return _missing_value(key)
    # v252 takes any string here, UUID or not, minus an optional "luks-".
    d = config.disk(value[5:] if value.startswith("luks-") else value)
    d.create = config.allow_list = True


def _switch_options(config: CmdlineConfig, key: str, value: str | None) -> None:
    if value is None:
        return _missing_value(key)
    scanned = _scan_uuid_assignment(value)
    if scanned is None:
        config.default_options = value
        return
    uuid, options = scanned
    if _uuid_invalid(uuid, key):
        return
    d = config.disk(uuid)
    d.header_device, d.options = filter_header_device(options)


def _switch_key(config: CmdlineConfig, key: str, value: str | None) -> None:
    if value is None:
        return _missing_value(key)
    n = _span_alnum_dash(value)
    if value[n:n + 1] != "=":
        config.default_key_file = value
        return
    if _uuid_invalid(value[:n], key):
        return
    d = config.disk(value[:n])
    d.key_file, d.key_device = split_location(value[n + 1:])


def _switch_data(config: CmdlineConfig, key: str, value: str | None) -> None:
    if value is None:
        return _missing_value(key)
    n = _span_alnum_dash(value)
    if value[n:n + 1] != "=":
        log(LOG_WARNING, "Failed to parse luks.data= kernel command line switch. UUID is invalid, ignoring.")
        return
    if _uuid_invalid(value[:n], key):
        return
    config.disk(value[:n]).data_device = fstab_node_to_udev_node(value[n + 1:])


def _switch_name(config: CmdlineConfig, key: str, value: str | None) -> None:
    if value is None:
        return _missing_value(key)
    scanned = _scan_uuid_assignment(value)
    if scanned is None:
        log(LOG_WARNING, f"Failed to parse luks name switch {value}. Ignoring.")
        return
    d = config.disk(scanned[0])
    d.create = config.allow_list = True
    d.name = scanned[1]


_SWITCHES = {
    "luks": _switch_bool("enabled"),
    "luks.crypttab": _switch_bool("read_crypttab"),
    "luks.uuid": _switch_uuid,
    "luks.options": _switch_options,
    "luks.key": _switch_key,
    "luks.data": _switch_data,
    "luks.name": _switch_name,
}


# --- reading files the way systemd does ------------------------------------------------

def iter_lines(data: bytes):
    """Lines as systemd's read_line() cuts them: \\n, \\r, \\r\\n, \\n\\r and NUL all end a line.

    Raises CrypttabError for a line of LONG_LINE_MAX bytes or more.
    """
    if b"\r" not in data and b"\0" not in data:
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
    else:
        lines = _split_mixed_eol(data)
    for line in lines:
        if len(line) >= LONG_LINE_MAX:
            raise CrypttabError(105, "line too long")  # ENOBUFS, as read_line() reports
        yield line


def _split_mixed_eol(data: bytes) -> list[bytes]:
    lines, start, i, n = [], 0, 0, len(data)
    while i < n:
        c = data[i]
        if c not in (10, 13, 0):
            i += 1
            continue
        lines.append(data[start:i])
        seen = {c}
        i += 1
        # One EOL is a run of distinct markers, and nothing may follow a NUL.
        while i < n and 0 not in seen and data[i] in (10, 13, 0) and data[i] not in seen:
            seen.add(data[i])
            i += 1
        start = i
    if start < n:
        lines.append(data[start:])
    return lines


def read_file(path: str) -> bytes | None:
    """Whole file, None if it does not exist; other open errors are logged and count as absent.

    Errors while reading (a directory, an I/O error) raise CrypttabError: systemd
    opens with fopen(), which succeeds on a directory, and fails on the read.
    """
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        log(LOG_ERR, f"Failed to open {path}: {e.strerror}")
        return None
    try:
        mode = posix.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
            # Not the generator's behaviour (fopen would wait): a daemon must not.
            raise CrypttabError(errno.EINVAL, f"Failed to read {path}: not a regular file")
        chunks = []
        while chunk := posix.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise CrypttabError(e.errno, f"Failed to read {path}: {e.strerror}") from e
    finally:
        posix.close(fd)


def first_line(path: str) -> str | None:
    data = read_file(path)
    if data is None:
        return None
    return from_bytes(next(iter_lines(data), b""))


def in_initrd() -> bool:
    value = parse_boolean(getenv_or("SYSTEMD_IN_INITRD", "-"))
    return exists("/etc/initrd-release") if value is None else value


def _in_container() -> bool:
    """The cheap subset of systemd's detect_container() (no WSL/proot/sched heuristics)."""
    if exists("/proc/vz") and not exists("/proc/bc"):
        return True
    for marker in ("/run/host/container-manager", "/run/systemd/container"):
        try:
            with open(marker, "rb") as f:
                if f.read().strip():
                    return True
        except OSError:
            pass
    try:
        with open("/proc/1/environ", "rb") as f:
            if any(v.startswith(b"container=") and len(v) > 10 for v in f.read().split(b"\0")):
                return True
    except OSError:
        pass
    return exists("/run/.containerenv") or exists("/.dockerenv")


def kernel_command_lines() -> list[str]:
    """The SystemdOptions EFI variable (parsed first, lower priority), then the command line.

    SYSTEMD_EFI_OPTIONS and SYSTEMD_PROC_CMDLINE override both, as in systemd.
    In a container the "kernel command line" is PID 1's argv.
    """
    lines = []
    efi = getenv("SYSTEMD_EFI_OPTIONS")
    if efi is None:
        efi = first_line(_EFI_OPTIONS_CACHE)
    if efi is not None:
        lines.append(efi)
    cmdline = getenv("SYSTEMD_PROC_CMDLINE")
    if cmdline is None:
        if _in_container():
            data = read_file("/proc/1/cmdline") or b""
            cmdline = from_bytes(data.rstrip(b"\0").replace(b"\0", b" ")).rstrip(_WHITESPACE)
        else:
            cmdline = first_line(CMDLINE_SOURCE) or ""
    lines.append(cmdline)
    return lines


# --- volumes -----------------------------------------------------------------------

def _uuid_of_entry(name: str, device: str) -> str | None:
    if device.startswith("UUID="):
        return device[5:]
    by_uuid = path_startswith(device, "/dev/disk/by-uuid/")
    if by_uuid is not None:
        return by_uuid
    return name[5:] if name.startswith("luks-") else None


def _crypttab_volumes(data: bytes, path: str, config: CmdlineConfig):
    for number, raw in enumerate(iter_lines(data), 1):
        line = raw.strip(b" \t\n\r")
        if not line or line.startswith(b"#"):
            continue
        # Like sscanf("%s %s %s %s"): up to four fields, anything after them ignored.
        fields = [from_bytes(f) for f in line.split(None, 4)[:4]]
        if len(fields) < 2:
            log(LOG_ERR, f"Failed to parse {path}:{number}, ignoring.")
            continue
        name, device = fields[0], fields[1]
        keyspec = fields[2] if len(fields) > 2 else None
        options = fields[3] if len(fields) > 3 else None
        uuid = _uuid_of_entry(name, device)
        d = config.disks.get(uuid) if uuid is not None else None
        if config.allow_list and d is None:
            log(LOG_INFO, f"Not creating device '{name}' because it was not specified on the kernel command line.")
            continue
        key_file, key_device = split_location(keyspec)
        header_device = None
        if d is not None and d.options is not None:
            header_device, options = d.header_device, d.options
        elif options is not None:
            header_device, options = filter_header_device(options)
        yield Volume(name, device, key_file, key_device, header_device, options,
                     source=path, line=number)
        if d is not None:
            d.create = False


def _cmdline_volumes(config: CmdlineConfig):
    for d in list(config.disks.values()):
        if not d.create:
            continue
        device = "UUID=" + d.uuid
        yield Volume(
            d.name if d.name is not None else "luks-" + d.uuid,
            d.data_device if d.data_device is not None else device,
            d.key_file if d.key_file is not None else config.default_key_file,
            d.key_device, d.header_device,
            d.options if d.options is not None else config.default_options,
            source=CMDLINE_SOURCE, from_cmdline=True, uuid=d.uuid, data_device=d.data_device)


def iter_volumes(config: CmdlineConfig, crypttab_path: str = DEFAULT_CRYPTTAB):
    """Volumes in generation order: crypttab first, then command-line-only ones.

    Lazy on purpose: a crypttab entry that matches a command-line UUID suppresses
    that UUID's own volume only once the consumer has taken the entry, and a
    crypttab read error surfaces exactly where systemd would hit it.
    """
    if not config.enabled:
        return
    if config.read_crypttab:
        data = read_file(crypttab_path)
        if data is not None:
            yield from _crypttab_volumes(data, crypttab_path, config)
    yield from _cmdline_volumes(config)


def load_volumes(crypttab_path: str | None = None, cmdline: list[str] | None = None,
                 initrd: bool | None = None) -> list[Volume]:
    """All volumes at once, for callers (the daemon) that do not generate units."""
    path = crypttab_path or getenv_or("SYSTEMD_CRYPTTAB", DEFAULT_CRYPTTAB)
    lines = kernel_command_lines() if cmdline is None else cmdline
    config = parse_cmdline(lines, in_initrd() if initrd is None else initrd)
    return list(iter_volumes(config, path))
