"""glibc malloc thresholds for a process that runs networks: freed activation memory stays for the next call.

By default glibc gives freed memory back to the OS (a heap top over the trim threshold, a block over the mmap
threshold); the next forward pass then faults the same pages in again. A 64 px VAE decode in a Triton stub
faulted about 1,500 pages per call, and on this VM a minor fault costs about 3.5 us: 5-6 ms of a 95 ms decode,
gone with the thresholds below (docs/serving.md). Memory a pass frees stays mapped up to `TRIM_THRESHOLD`; a
process that made one large batch keeps that much more resident, which a server (or a CLI that runs the same
network again) wants.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

_LOGGER = logging.getLogger(__name__)

# mallopt(3) parameter numbers (malloc.h). Setting either one also turns off glibc's dynamic thresholds.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit: blocks up to 32 MB come from the heap, reused
TRIM_THRESHOLD = 256 << 20  # free memory a heap keeps at its top before it returns the rest

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Set this process's malloc thresholds for repeated forward passes (once; later calls return the first answer).

    True where glibc took them; False where the C library is not glibc (musl, macOS), which keeps its own policy.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt({M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD})
    return _applied


def _mallopt(options: dict[int, int]) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt
        _LOGGER.info("malloc thresholds left as they are: %s has no mallopt", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in options.items())  # mallopt returns 1 on success
    if not ok:
        _LOGGER.info("%s refused the malloc thresholds %s", name, options)
    return ok
