"""Give memory freed by large transient work back to the system.

glibc's malloc keeps freed heap memory resident for reuse: after a relist of thousands of leases
(gRPC's response buffers, the lists built from it) or a full kernel pass, several MiB that the
daemon will not need again stay in its resident size. :func:`trim` (``malloc_trim(0)``, a few
milliseconds) returns them; the converger calls it after such passes. Python's own small-object
arenas are not affected (they are returned when empty). A no-op where libc has no malloc_trim.
"""

from __future__ import annotations

import ctypes

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def trim() -> None:
    """``malloc_trim(0)``: release free heap memory to the system."""
    if _malloc_trim is not None:
        _malloc_trim(0)
