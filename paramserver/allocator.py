"""Keep freed memory in the process for reuse: the allocator settings of a shard process.

A shard's data plane allocates and frees the same sizes every step (1 MiB chunk messages in and
out, per-piece conversions). glibc's defaults hand freed heap tops back to the kernel once
they pass a threshold that its dynamic rule keeps close to the last large allocation, so the next
step's buffers are fresh pages that fault in one by one: measured here, that fault-in costs about
as much as the copy that fills them. These settings keep up to :data:`TRIM_BYTES` of freed heap
in the process, so steady-state steps reuse warm pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: Allocations up to this size come from the heap (glibc's ceiling for the setting: 32 MiB on
#: 64-bit); larger ones stay separate mappings, returned as soon as they are freed.
MMAP_BYTES = 32 << 20
#: Freed heap kept before any is returned to the kernel.
TRIM_BYTES = 1 << 30
#: Extra heap obtained per growth, so a step's buffers do not grow the heap piece by piece.
TOP_PAD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Apply the settings to this process's glibc malloc; False (and nothing changed) where the
    C library is not glibc or refuses them."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave its defaults
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, MMAP_BYTES), (M_TRIM_THRESHOLD, TRIM_BYTES), (M_TOP_PAD, TOP_PAD_BYTES))
    )
    if not ok:
        log.warning("mallopt refused the shard allocator settings; glibc's defaults stay")
    return ok
