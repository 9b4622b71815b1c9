"""Pulling an image from an OCI registry: skopeo is the transport, hostel's import the rest.

hostel speaks no registry protocol itself. `skopeo copy --preserve-digests
docker://REF oci:DIR` writes the registry's manifest, config and layer blobs,
untouched (so digests stay the registry's), into an OCI layout inside a
staging directory the daemon owns; images.py then imports that layout like
any other, checking every digest again. skopeo reads the host's containers
configuration (/etc/containers: policy.json, registries.d, root's auth.json)
as podman does.

TLS is verified unless the caller says otherwise (podman's --tls-verify=false)
or the host's /etc/containers/registries.conf marks the registry `insecure =
true` (skopeo reads it, as podman does): a registry on plain HTTP, as a local
test registry is, needs one of the two, and the error for it says so. skopeo's own messages are turned into ones that
name the registry and what to do; a cancelled pull kills skopeo."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from hostel.errors import HostelError, InvalidArgs, NoSuchObject
from hostel.guest.images import REFERENCE_RE, SMALL_FILE_MAX, ImageError, Transfer

SKOPEO = "skopeo"
PULL_TIMEOUT = 3600        # seconds for one whole copy
INSPECT_TIMEOUT = 120      # seconds to fetch the manifest
LAYOUT_REF = "image"       # the ref name inside the staging layout; the store names the image
_MANIFEST_LIST_TYPES = ("application/vnd.oci.image.index.v1+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class PullOptions:
    tls_verify: bool = True


def registry_of(reference: str) -> str | None:
    """The registry a reference names: its first component when that is a host (it has
    a '.' or a ':' or is localhost, as docker decides), else None (a short name)."""
    match = REFERENCE_RE.fullmatch(reference)
    name = match.group("name") if match else reference
    first, slash, _rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def check_qualified(reference: str) -> str:
    """A pull names its registry: a short name is refused, as podman refuses one that no
    alias or search list resolves (guessing a registry is how short names get spoofed)."""
    registry = registry_of(reference)
    if registry is None:
        raise InvalidArgs(f"{reference!r} names no registry; pull REGISTRY[:PORT]/NAME[:TAG], "
                          "e.g. localhost:5000/hostel/busybox:1.36 or "
                          "docker.io/library/busybox:latest")
    return registry


def _fatal_message(stderr: str) -> str:
    """skopeo's error without its logging frame (time="..." level=fatal msg="...")."""
    found = re.findall(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    text = found[-1].replace('\\"', '"') if found else stderr.strip()
    return text or "no message"


def explain(stderr: str, reference: str) -> HostelError:
    """A failed skopeo run as an error that names the registry and what to do."""
    registry = registry_of(reference) or "(none named)"
    detail = _fatal_message(stderr)
    lowered = detail.lower()
    if "connection refused" in lowered:
        return ImageError(f"cannot reach registry {registry}: connection refused ({detail}). "
                          f"Is a registry running at {registry}? The reference's first "
                          "component names the registry host and port")
    if "no such host" in lowered or "server misbehaving" in lowered:
        return ImageError(f"cannot resolve the registry host {registry} ({detail}); check "
                          "the reference's first component, or the host's DNS")
    if "i/o timeout" in lowered or "deadline exceeded" in lowered \
            or "network is unreachable" in lowered:
        return ImageError(f"registry {registry} did not answer ({detail}); check the address "
                          "and the network")
    if "http response to https client" in lowered:
        return ImageError(f"registry {registry} speaks plain HTTP, not HTTPS; if you trust it "
                          "(a local registry), pull with --tls-verify=false, or mark it "
                          "'insecure = true' in /etc/containers/registries.conf")
    if "x509" in lowered or "certificate" in lowered:
        return ImageError(f"the TLS certificate of registry {registry} is not trusted "
                          f"({detail}); install its CA on the host, or pull with "
                          "--tls-verify=false if you trust it")
    if any(word in lowered for word in ("manifest unknown", "name unknown", "not found",
                                        "repository name not known")):
        return NoSuchObject(f"registry {registry} has no image {reference} ({detail}); check "
                            "the name and the tag ('skopeo list-tags docker://NAME' lists the "
                            "tags)")
    if "unauthorized" in lowered or "authentication required" in lowered \
            or "denied" in lowered:
        return ImageError(f"registry {registry} refused access to {reference} ({detail}); "
                          f"log in as root with 'skopeo login {registry}' (hosteld uses "
                          "root's credentials), or check the name")
    return ImageError(f"pulling {reference} from {registry} failed: {detail}")


def _skopeo(transfer: Transfer, argv: list[str], reference: str, timeout: float,
            env: dict[str, str], tick: Callable[[], object] | None = None,
            output: IO[bytes] | None = None) -> None:
    try:
        status, errors = transfer.run([SKOPEO, *argv], f"skopeo {argv[0]} {reference}",
                                      timeout, env, tick, output)
    except FileNotFoundError as e:
        raise ImageError("skopeo is not installed; install it (Debian package 'skopeo', "
                         "which 'make setup' installs) to pull images") from e
    if status != 0:
        raise explain(errors, reference)


def _tool_env(scratch: Path) -> dict[str, str]:
    """skopeo's environment: its temporary files in the transfer's staging directory,
    so a cancelled or failed pull leaves none anywhere else."""
    env = dict(os.environ)
    env["TMPDIR"] = str(scratch)
    return env


def _remote_size(manifest: bytes) -> int:
    """Bytes a copy will write (config and layers), from the manifest; 0 when unknown
    (a manifest list: skopeo picks this host's entry, whose size the list lacks)."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return 0
    if not isinstance(doc, dict) or doc.get("mediaType") in _MANIFEST_LIST_TYPES \
            or "manifests" in doc:
        return 0
    descriptors = [doc.get("config"), *(doc.get("layers") or [])]
    return sum(d["size"] for d in descriptors
               if isinstance(d, dict) and isinstance(d.get("size"), int))


def _bytes_under(directory: Path) -> int:
    total = 0
    for parent, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass  # skopeo renamed or removed a temporary file meanwhile
    return total


def pull_layout(reference: str, staging: Path, options: PullOptions,
                transfer: Transfer) -> Path:
    """Copy `reference` from its registry into an OCI layout under `staging` (owned by
    the caller, who removes it): the layout's path."""
    check_qualified(reference)
    scratch = staging / "tmp"
    scratch.mkdir(mode=0o700)
    layout = staging / "layout"
    if ":" in str(layout):
        raise ImageError(f"cannot pull into {layout}: skopeo's oci: transport takes no ':' "
                         "in a path; use a state directory without one")
    env = _tool_env(scratch)
    source = f"docker://{reference}"
    no_tls = [] if options.tls_verify else ["--tls-verify=false"]
    transfer.report("contacting the registry", 0, 0, force=True)
    # The manifest first: a missing image or an unreachable registry is told before
    # any download, and its sizes are the download's total.
    with open(scratch / "manifest.json", "w+b") as manifest:
        _skopeo(transfer, ["inspect", "--raw", *no_tls, source], reference, INSPECT_TIMEOUT,
                env, output=manifest)
        manifest.seek(0)
        total = _remote_size(manifest.read(SMALL_FILE_MAX))
    (scratch / "manifest.json").unlink()

    def tick() -> None:
        transfer.report("downloading", _bytes_under(staging), total)

    transfer.report("downloading", 0, total, force=True)
    copy = ["copy", "--quiet", "--preserve-digests",
            *([] if options.tls_verify else ["--src-tls-verify=false"]),
            source, f"oci:{layout}:{LAYOUT_REF}"]
    _skopeo(transfer, copy, reference, PULL_TIMEOUT, env, tick)
    done = _bytes_under(layout)
    transfer.report("downloaded", done, done, force=True)
    return layout
