"""virtio-net's host side: a tap device (with virtio-net headers) configured
with the address the seed's --tunnet gives (or a guest run's, run_network.py),
or enslaved to a bridge. The tap is not persistent: it goes when the launcher,
its only holder, ends, however it ends."""
from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostel.guest import devices
from hostel.guest.errors import GuestError
from hostel.guest.settings import NetSpec

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_SIZE = 12         # struct virtio_net_hdr_v1 (VERSION_1 always has num_buffers)
TAP_PATTERN = "hosteltap%d"
HOST_PREFIX = 24


def open_tap() -> tuple[int, str]:
    """A new tap with virtio-net headers; returns (fd, interface name)."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise GuestError(f"cannot open {TUN_DEVICE}: {e.strerror} (load the tun module)") from e
    try:
        ifr = struct.pack("16sH", TAP_PATTERN.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        ifr = fcntl.ioctl(fd, TUNSETIFF, ifr.ljust(40, b"\0"))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as e:
        os.close(fd)
        raise GuestError(f"cannot create a tap device: {e.strerror}") from e
    return fd, ifr[:16].rstrip(b"\0").decode()


def mac_bytes(spec: NetSpec, index: int) -> bytes:
    """The MAC the seed's --tunnet gave, else a locally administered one."""
    if spec.mac:
        return bytes(int(part, 16) for part in spec.mac.split(":"))
    return bytes([0x02, 0x68, 0x73]) + os.getrandom(2) + bytes([index & 0xFF])


def host_address(spec: NetSpec) -> tuple[str, int]:
    """The tap's address: the seed's --tunnet gives a bare one (a /24, as lguest's did);
    `guest run --network=veth` gives ADDRESS/PREFIX, its run's point-to-point /30."""
    address, _, prefix = spec.address.partition("/")
    return address, int(prefix) if prefix else HOST_PREFIX


def configure_tap(name: str, spec: NetSpec) -> None:
    with IPRoute() as ipr:
        try:
            (link,) = ipr.link_lookup(ifname=name)
            if spec.bridge:
                bridges = ipr.link_lookup(ifname=spec.bridge)
                if not bridges:
                    raise GuestError(f"no bridge named {spec.bridge!r} for the guest's network; "
                                     "create it first")
                ipr.link("set", index=link, master=bridges[0])
            else:
                address, prefix = host_address(spec)
                ipr.addr("add", index=link, address=address, prefixlen=prefix)
            ipr.link("set", index=link, state="up")
        except NetlinkError as e:
            raise GuestError(f"cannot configure tap {name} ({spec.bridge or spec.address}): "
                             f"{os.strerror(e.code)}") from e


def net_device_for(spec: NetSpec, index: int) -> devices.Device:
    fd, name = open_tap()
    try:
        configure_tap(name, spec)
    except GuestError:
        os.close(fd)
        raise
    device = devices.net_device(fd, mac_bytes(spec, index))
    device.name = f"net:{name}"
    return device
