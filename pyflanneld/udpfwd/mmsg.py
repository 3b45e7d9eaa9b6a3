"""Batched UDP I/O through ctypes: ``recvmmsg``/``sendmmsg`` over preallocated buffers.

A :class:`MsgBatch` owns ``count`` slots of ``slot_size`` bytes and the ``mmsghdr``/``iovec``/
``sockaddr_in`` arrays pointing at them, built once. The per-packet fields (length, destination)
are read and written through flat ``memoryview`` casts of those arrays, which costs a list index,
not a ctypes attribute lookup.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

libc = ctypes.CDLL(None, use_errno=True)

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


class iovec(ctypes.Structure):  # noqa: N801 (C name)
    """``struct iovec`` (sys/uio.h)."""
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class msghdr(ctypes.Structure):  # noqa: N801
    """``struct msghdr`` (sys/socket.h), 64-bit layout."""
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class mmsghdr(ctypes.Structure):  # noqa: N801
    """``struct mmsghdr`` for sendmmsg(2)/recvmmsg(2): a msghdr and the byte count the call returns."""
    _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]


class sockaddr_in(ctypes.Structure):  # noqa: N801
    """``struct sockaddr_in`` (netinet/in.h): family, port and address in network byte order."""
    _fields_ = [("sin_family", ctypes.c_uint16), ("sin_port", ctypes.c_uint16),
                ("sin_addr", ctypes.c_uint8 * 4), ("sin_zero", ctypes.c_uint8 * 8)]


assert ctypes.sizeof(mmsghdr) == 64 and ctypes.sizeof(iovec) == 16 and ctypes.sizeof(sockaddr_in) == 16

_recvmmsg = libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_sendmsg = libc.sendmsg
_sendmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_sendmsg.restype = ctypes.c_ssize_t

# Word indexes into the flat views of one 64-byte mmsghdr.
_Q_NAME = 0  # msg_hdr.msg_name (8-byte words)
_I_NAMELEN = 2  # msg_hdr.msg_namelen (4-byte words)
_Q_CONTROLLEN = 5
_I_FLAGS = 12
_I_LEN = 14  # msg_len


def make_sockaddr(ip: str, port: int) -> sockaddr_in:
    """A ``sockaddr_in`` for the IPv4 address text ``ip`` and ``port``."""
    sa = sockaddr_in()
    sa.sin_family = socket.AF_INET
    sa.sin_port = socket.htons(port)
    sa.sin_addr[:] = list(socket.inet_aton(ip))
    return sa


class MsgBatch:
    """``count`` preallocated message slots for ``recvmmsg``/``sendmmsg``."""

    def __init__(self, count: int, slot_size: int, control_size: int = 0, offset: int = 0) -> None:
        """Slot ``i`` is ``slots[i]``; its datagram lives at ``slots[i][offset:]`` (room for a header)."""
        self.count = count
        self.slot_size = slot_size
        self.offset = offset
        self.buf = (ctypes.c_ubyte * (count * slot_size))()
        mv = memoryview(self.buf).cast("B")
        self.slots = [mv[i * slot_size:(i + 1) * slot_size] for i in range(count)]
        self.iov = (iovec * count)()
        self.hdrs = (mmsghdr * count)()
        self.names = (sockaddr_in * count)()
        self.control = (ctypes.c_ubyte * max(1, count * control_size))()
        self.control_size = control_size
        base = ctypes.addressof(self.buf)
        for i in range(count):
            self.iov[i].iov_base = base + i * slot_size + offset
            self.iov[i].iov_len = slot_size - offset
            h = self.hdrs[i].msg_hdr
            h.msg_iov = ctypes.addressof(self.iov[i])
            h.msg_iovlen = 1
            h.msg_name = ctypes.addressof(self.names[i])
            h.msg_namelen = ctypes.sizeof(sockaddr_in)
            if control_size:
                h.msg_control = ctypes.addressof(self.control) + i * control_size
                h.msg_controllen = control_size
        self.iov_q = memoryview(self.iov).cast("B").cast("Q")  # iov_len of slot i at 2*i+1
        self.hdr_q = memoryview(self.hdrs).cast("B").cast("Q")
        self.hdr_i = memoryview(self.hdrs).cast("B").cast("I")
        self.control_mv = memoryview(self.control).cast("B")
        self.addr = ctypes.addressof(self.hdrs)
        self.refused_bytes = 0  # send(): the bytes of the datagrams the kernel refused in the last call

    # --- receive -----------------------------------------------------------------------------

    def recv(self, fd: int, n: int | None = None) -> int:
        """``recvmmsg`` into the first ``n`` slots without blocking; returns how many arrived (0: none)."""
        n = self.count if n is None else n
        if self.control_size:
            q = self.hdr_q
            cs = self.control_size
            for i in range(n):
                q[i * 8 + _Q_CONTROLLEN] = cs
        got = _recvmmsg(fd, self.addr, n, MSG_DONTWAIT, None)
        if got < 0:
            err = ctypes.get_errno()
            if err in (11, 4):  # EAGAIN, EINTR
                return 0
            raise OSError(err, os.strerror(err))
        return got

    def length(self, i: int) -> int:
        """The length in bytes of message ``i`` the last recvmmsg filled (msg_len)."""
        return self.hdr_i[i * 16 + _I_LEN]

    def truncated(self, i: int) -> bool:
        """True when message ``i`` was cut to its slot (MSG_TRUNC in its msg_flags)."""
        return bool(self.hdr_i[i * 16 + _I_FLAGS] & MSG_TRUNC)

    def gro_size(self, i: int) -> int:
        """The UDP_GRO segment size of slot ``i`` (0 if the kernel sent none)."""
        clen = self.hdr_q[i * 8 + _Q_CONTROLLEN]
        off = i * self.control_size
        c = self.control_mv
        pos = 0
        while pos + 16 <= clen:
            ln, level, typ = struct.unpack_from("QiI", c, off + pos)
            if level == SOL_UDP and typ == UDP_GRO:
                return struct.unpack_from("i", c, off + pos + 16)[0]
            pos += (ln + 7) & ~7
            if ln == 0:
                break
        return 0

    # --- send --------------------------------------------------------------------------------

    def send(self, fd: int, n: int) -> int:
        """``sendmmsg`` slots 0..n-1 (blocking when the socket buffer is full); returns how many went out.

        A datagram the kernel refuses (e.g. EPERM from a firewall, ENETUNREACH) is skipped, like
        upstream logs and drops a failed ``sendto``; ``refused_bytes`` adds up their lengths.
        """
        done = refused = 0
        self.refused_bytes = 0
        while done < n:
            r = _sendmmsg(fd, self.addr + done * 64, n - done, 0)
            if r < 0:
                err = ctypes.get_errno()
                if err == 4:  # EINTR
                    continue
                self.refused_bytes += self.iov_q[2 * done + 1]
                refused += 1
                done += 1  # the first message failed: drop it and go on
                continue
            done += r
        return done - refused
