"""TUN device queues: open ``/dev/net/tun`` and attach to a (multi-queue) TUN interface by name.

``TUNSETIFF`` creates the interface in the namespace of the calling process if it does not exist,
else attaches another queue to it (the flags must match the existing device). A non-persistent
device disappears when its last queue fd is closed — upstream's behaviour for ``flannel0``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETQUEUE = 0x400454D9
TUNGETIFF = 0x800454D2

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

TUN_DEV = "/dev/net/tun"


class TunError(OSError):
    """The TUN device could not be opened; the message says why and what to do."""


def tun_flags(multi_queue: bool = True, vnet_hdr: bool = False) -> int:
    """The TUNSETIFF flags: a TUN device without packet info, multi-queue (one queue per worker) and
    with a virtio-net header (``vnet_hdr``, for offload) as asked."""
    flags = IFF_TUN | IFF_NO_PI
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    return flags


def open_queue(name: str, flags: int, nonblock: bool = True) -> int:
    """Open one queue of TUN device ``name`` (creating it if needed); returns the fd."""
    if len(name.encode()) >= 16:
        raise TunError(errno.EINVAL, f"TUN device name too long: {name!r} (at most 15 bytes)")
    try:
        fd = os.open(TUN_DEV, os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0))
    except OSError as e:
        raise TunError(e.errno, f"cannot open {TUN_DEV}: {e.strerror} (load the tun module; run as root)") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        hint = ""
        if e.errno == errno.EINVAL:
            hint = " (a device of that name exists with other flags or is not a TUN device: delete it)"
        elif e.errno == errno.EPERM:
            hint = " (needs CAP_NET_ADMIN: run as root)"
        raise TunError(e.errno, f"cannot attach to TUN device {name}: {e.strerror}{hint}") from None
    return fd


def set_queue_enabled(fd: int, enabled: bool) -> None:
    """Attach/detach a multi-queue fd. A detached queue keeps the device alive but gets no packets."""
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE))


def set_offload(fd: int, offload: int) -> None:
    """TUNSETOFFLOAD on the TUN queue ``fd``: the TUN_F_* offloads (``offload``, a bit set) the
    kernel may hand us. Raises OSError."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
