"""Escaping and path rules that decide unit names, as systemd v252 applies them.

The generator must produce byte-identical file names and contents to systemd's
own, so these helpers follow systemd's rules exactly, including the odd corners
(byte-wise escaping of non-UTF-8 input, hashed names for overlong paths, the
component-wise path comparison).  Strings are ``str`` decoded from bytes with
``surrogateescape``, so arbitrary bytes survive a round trip.

Only the standard library's built-ins are used: the generator runs at every
boot and must not pay for imports.
"""

NAME_MAX = 255
PATH_MAX = 4096
UNIT_NAME_MAX = 256
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_HASH_KEY = bytes.fromhex("ecf237fb58324a32849f069b0d21eb9a")

_DIGITS_LETTERS = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class UnitNameError(ValueError):
    """A path or name that systemd refuses to turn into a unit name."""


def to_bytes(s: str) -> bytes:
    return s.encode(_ENCODING, _ERRORS)


def from_bytes(b: bytes) -> str:
    return b.decode(_ENCODING, _ERRORS)


def byte_len(s: str) -> int:
    """Length in bytes, which is what NAME_MAX and PATH_MAX limit."""
    return len(s) if s.isascii() else len(to_bytes(s))


def _ascii_map(keep: bytes, special: dict[int, str], fallback) -> dict[int, str]:
    """str.translate() table for the ASCII range; only 128 entries, so import stays cheap."""
    table = {b: fallback(b) for b in range(128) if b not in keep}
    table.update(special)
    return table


def _translate(s: str, ascii_map: dict[int, str], fallback) -> str:
    """Escape per byte: str.translate for ASCII (the common case), bytes otherwise."""
    if s.isascii():
        return s.translate(ascii_map)
    return "".join([ascii_map.get(b, chr(b)) if b < 128 else fallback(b) for b in to_bytes(s)])


def _octal(b: int) -> str:
    return f"\\{b:03o}"


def _hex(b: int) -> str:
    return f"\\x{b:02x}"


# --- unit name escaping (systemd-escape) -----------------------------------

_UNIT_MAP = _ascii_map(_DIGITS_LETTERS + b":_.", {ord("/"): "-"}, _hex)


def unit_name_escape(s: str) -> str:
    """Escape a string for use in a unit name, like `systemd-escape`.

    A leading dot is escaped so that no hidden unit file can result.
    """
    out = _translate(s, _UNIT_MAP, _hex)
    if out.startswith("."):
        out = "\\x2e" + out[1:]
    return out


def _unhex(c: str) -> int:
    try:
        return int(c, 16) if len(c) == 1 else -1
    except ValueError:
        return -1


def unit_name_unescape(s: str) -> str:
    """Undo unit_name_escape(); '-' becomes '/', as systemd-escape --unescape does."""
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "-":
            out += b"/"
        elif c == "\\":
            hi, lo = (_unhex(s[i + 2]) if i + 2 < n else -1), (_unhex(s[i + 3]) if i + 3 < n else -1)
            if s[i + 1:i + 2] != "x" or hi < 0 or lo < 0:
                raise UnitNameError(f"invalid escape in {s!r}")
            out.append(hi << 4 | lo)
            i += 3
        else:
            out += to_bytes(c)
        i += 1
    return from_bytes(bytes(out))


def specifier_escape(s: str) -> str:
    """Protect '%' from unit file specifier expansion."""
    return s.replace("%", "%%")


# --- C-style escaping (used for keydev/headerdev mount point names) --------

_C_SPECIAL = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v",
              ord("\\"): "\\\\", ord('"'): '\\"', ord("'"): "\\'"}
_C_MAP = _ascii_map(bytes(range(32, 127)), _C_SPECIAL, _octal)


def cescape(s: str) -> str:
    """C string escaping: named escapes, octal for control and non-ASCII bytes."""
    return _translate(s, _C_MAP, _octal)


# --- device node names ------------------------------------------------------

_DEVNODE_MAP = _ascii_map(_DIGITS_LETTERS + b"#+-.:=@_", {}, _hex)


def _devnode_char(c: str) -> str:
    o = ord(c)
    if o < 0x80:
        return _DEVNODE_MAP.get(o, c)
    # Valid UTF-8 is kept, except what systemd's validator also rejects:
    # undecodable bytes (surrogate-escaped) and Unicode non-characters.
    if 0xDC80 <= o <= 0xDCFF or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE:
        return "".join(_hex(b) for b in to_bytes(c))
    return c


def encode_devnode_name(s: str) -> str:
    """Escape a tag value (LABEL=...) the way udev names /dev/disk/by-* links."""
    if s.isascii():
        return s.translate(_DEVNODE_MAP)
    return "".join([_devnode_char(c) for c in s])


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] in "\"'" and s[-1] == s[0]:
        return s[1:-1]
    return s


_TAGS = (("LABEL=", "label"), ("UUID=", "uuid"), ("PARTUUID=", "partuuid"), ("PARTLABEL=", "partlabel"))


def fstab_node_to_udev_node(spec: str) -> str:
    """Turn LABEL=/UUID=/PARTUUID=/PARTLABEL= into a /dev/disk/by-* path; others pass through."""
    for prefix, by in _TAGS:
        if spec.startswith(prefix):
            return f"/dev/disk/by-{by}/" + encode_devnode_name(_unquote(spec[len(prefix):]))
    return spec


# --- paths --------------------------------------------------------------------

def _skip_slash_or_dot(p: str, i: int) -> int:
    n = len(p)
    while i < n:
        if p[i] == "/":
            i += 1
        elif p.startswith("./", i):
            i += 2
        else:
            break
    return i


def _simple(p: str) -> bool:
    """Absolute, short, ASCII, no empty/dot components, no trailing slash: such a path
    is already simplified and normalized, so the component walk can be skipped."""
    return (p.startswith("/") and len(p) <= NAME_MAX and p.isascii() and "//" not in p
            and "/." not in p and (len(p) == 1 or not p.endswith("/")))


def first_component(p: str, i: int, accept_dot_dot: bool = True) -> tuple[str | None, int]:
    """Next path component at or after index i, and the index past it.

    Returns (None, end) when there is none; raises UnitNameError for a
    component that is too long (or '..' when not accepted).  Repeated
    slashes and '.' components are skipped, as systemd does.
    """
    first = _skip_slash_or_dot(p, i)
    if first >= len(p) or p[first:] == ".":
        return None, len(p)
    end = p.find("/", first)
    if end < 0:
        end = len(p)
    comp = p[first:end]
    if byte_len(comp) > NAME_MAX or (not accept_dot_dot and comp == ".."):
        raise UnitNameError(f"invalid path component in {p!r}")
    nxt = _skip_slash_or_dot(p, end)
    if p[nxt:] == ".":
        nxt += 1
    return comp, nxt


def path_startswith(path: str, prefix: str) -> str | None:
    """Remainder of path after prefix, compared component by component; None if no match."""
    if path.startswith("/") != prefix.startswith("/"):
        return None
    base = prefix.rstrip("/")
    if base and _simple(path) and _simple(base):
        if path == base:
            return ""
        return path[len(base) + 1:] if path.startswith(base + "/") else None
    i = j = 0
    try:
        while True:
            start = _skip_slash_or_dot(path, i)
            comp, i_next = first_component(path, i)
            want, j = first_component(prefix, j)
            if want is None:
                return path[start:] if comp is not None else path[i_next:]
            if comp != want:
                return None
            i = i_next
    except UnitNameError:
        return None


def path_equal(a: str, b: str) -> bool:
    """Whether two paths name the same thing, ignoring repeated slashes and '.'."""
    if a.startswith("/") != b.startswith("/"):
        return False
    if _simple(a) and _simple(b):
        return a == b
    i = j = 0
    ca: str | bool | None  # False: the component is malformed
    cb: str | bool | None
    while True:
        try:
            ca, i2 = first_component(a, i)
        except UnitNameError:
            ca, i2 = False, i
        try:
            cb, j2 = first_component(b, j)
        except UnitNameError:
            cb, j2 = False, j
        if ca is False or cb is False:
            return ca is cb and a[i:] == b[j:]
        if ca != cb:
            return False
        if ca is None:
            return True
        i, j = i2, j2


def path_join(a: str, b: str | None) -> str:
    """Join with exactly one added slash at most; empty or missing (NULL in C) parts are skipped."""
    if not b:
        return a
    if not a or a.endswith("/") or b.startswith("/"):
        return a + b
    return a + "/" + b


def path_simplify(p: str) -> str:
    """Drop redundant slashes and '.' components; '..' is kept, overlong parts stop it."""
    if not p or _simple(p):
        return p
    lead = "/" if p.startswith("/") else ""
    comps: list[str] = []
    i = len(lead)
    while True:
        try:
            comp, nxt = first_component(p, i)
        except UnitNameError:
            return lead + "/".join(comps) + ("/" if comps else "") + p[i:]
        if comp is None:
            break
        comps.append(comp)
        i = nxt
    out = lead + "/".join(comps)
    return out or "."


def path_is_normalized(p: str) -> bool:
    if _simple(p):
        return True
    if not p:
        return False
    i = 0
    try:
        while True:
            comp, i = first_component(p, i, accept_dot_dot=False)
            if byte_len(p[:i]) >= PATH_MAX:
                return False
            if comp is None or i >= len(p):
                break
    except UnitNameError:
        return False
    return not (p == "." or p.startswith("./") or p.endswith("/.") or "/./" in p or "//" in p)


def unit_name_path_escape(path: str) -> str:
    """Escape a path as `systemd-escape --path` does ('/' alone becomes '-')."""
    p = path_simplify(path)
    if not p or path_equal(p, "/"):
        return "-"
    if not path_is_normalized(p):
        raise UnitNameError(f"path {path!r} is not normalized")
    return unit_name_escape(p.strip("/"))


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & 0xFFFFFFFFFFFFFFFF


def siphash24(data: bytes, key: bytes) -> int:
    """SipHash-2-4; systemd uses it to shorten overlong unit names."""
    mask = 0xFFFFFFFFFFFFFFFF
    k0 = int.from_bytes(key[:8], "little")
    k1 = int.from_bytes(key[8:], "little")
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(count: int) -> None:
        for _ in range(count):
            v[0] = (v[0] + v[1]) & mask
            v[1] = _rotl(v[1], 13) ^ v[0]
            v[0] = _rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & mask
            v[3] = _rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & mask
            v[3] = _rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & mask
            v[1] = _rotl(v[1], 17) ^ v[2]
            v[2] = _rotl(v[2], 32)

    tail = len(data) % 8
    for off in range(0, len(data) - tail, 8):
        m = int.from_bytes(data[off:off + 8], "little")
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    m = int.from_bytes(data[len(data) - tail:] + bytes(8 - tail), "little") | ((len(data) & 0xFF) << 56)
    v[3] ^= m
    rounds(2)
    v[0] ^= m
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _hash_long(name: str) -> str:
    base, _, typ = name.rpartition(".")
    # systemd hashes the terminating NUL too.
    digest = siphash24(to_bytes(name) + b"\0", _HASH_KEY).to_bytes(8, "little").hex()
    keep = UNIT_NAME_MAX - 1 - len(typ) - 16 - 2
    return name[:keep] + "_" + digest + "." + typ


def unit_name_from_path(path: str, suffix: str) -> str:
    """Unit name for a path (e.g. '.device', '.mount'); overlong names get a hash."""
    name = unit_name_path_escape(path) + suffix
    if len(name) >= UNIT_NAME_MAX:
        name = _hash_long(name)
    return name


def unit_name_build(prefix: str, instance: str, suffix: str) -> str:
    """'prefix@instance.suffix' for an already escaped instance, length-checked."""
    if not instance:
        raise UnitNameError("empty unit instance")
    name = f"{prefix}@{instance}{suffix}"
    if len(name) >= UNIT_NAME_MAX:
        raise UnitNameError(f"unit name {name!r} too long")
    return name
