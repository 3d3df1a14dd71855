"""The TUN device: opened with the TUNSETIFF ioctl, non-persistent (it vanishes when the
last file descriptor closes, so a crashed vstack leaves no device behind).

Flags: ``IFF_TUN | IFF_NO_PI`` (plain IP packets, no packet-information header). The
``vnet_hdr`` and ``multi_queue`` switches are the hooks for the offload / multi-queue work
(issue 6): with ``IFF_VNET_HDR`` every packet carries a ``virtio_net_hdr`` in front, and
with ``IFF_MULTI_QUEUE`` the same name may be opened once per worker.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


class TunError(RuntimeError):
    """The TUN device could not be created; the message says why and what to do."""


@dataclass
class Tun:
    fd: int
    name: str
    vnet_hdr: bool = False
    multi_queue: bool = False
    offloads: int = 0  # TUN_F_* flags set with TUNSETOFFLOAD (vstack.vnic.offload)

    def fileno(self) -> int:
        return self.fd

    def write(self, packet: bytes | bytearray | memoryview) -> int:
        return os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tun(name: str, *, vnet_hdr: bool = False, multi_queue: bool = False,
             nonblocking: bool = True) -> Tun:
    """Create (or, with ``multi_queue``, attach one more queue to) the TUN device ``name``."""
    if not name or len(name) >= IFNAMSIZ:
        raise TunError(f"device name {name!r}: must be 1..15 characters")
    flags = IFF_TUN | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
    except PermissionError:
        raise TunError("cannot open /dev/net/tun: run vstack as root "
                       "(or with CAP_NET_ADMIN)") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise TunError("TUNSETIFF: permission denied: run vstack as root "
                           "(or with CAP_NET_ADMIN)") from None
        if e.errno in (errno.EBUSY, errno.EINVAL, errno.EEXIST):
            raise TunError(f"device name {name!r} is taken (in use, or not a TUN device): "
                           "choose another [vnic] name") from None
        raise TunError(f"TUNSETIFF {name!r}: {e.strerror}") from None
    if nonblocking:
        os.set_blocking(fd, False)
    return Tun(fd, name, vnet_hdr, multi_queue)
