"""Tune glibc's ``malloc`` for the GSJBU fit's large, short-lived tensors (Linux only).

Each Adam step of a fit allocates and frees several hundred MB of CPU tensors of 1 to 40 MB
(measured with the torch profiler: ~700 MB per step on a 1152 x 1152 tile at scale 8). With
glibc's defaults, blocks above the mmap threshold go back to the kernel when freed and are
faulted in again, page by page, on the next step, and threads other than the main one allocate
from arenas whose heaps are capped at 64 MB, created and unmapped step after step. On a
1152 x 1152 tile that cost about 3 s of kernel (``sys``) time for a 6 s fit.

:func:`tune_allocator` sets, once per process:

- ``M_ARENA_MAX = 1``: every thread allocates from the main heap, which can grow to hold a
  step's tensors and reuse them;
- ``M_MMAP_THRESHOLD = 32 MB``: blocks up to 32 MB come from the heap, not from fresh mappings;
- ``M_TRIM_THRESHOLD = 256 MB``: at most 256 MB of free heap is kept for reuse before it is given
  back to the kernel, so memory stays bounded.

Measured on the 2-core development machine, ``benchmarks/pipeline.py --sizes 4096 --methods gsjbu
--no-bare``, three alternating runs each: 0.150 MP/s against 0.132 untuned, peak RSS 1091 against
1095 MB; a single 1152 x 1152 tile fit went from 6.1 to 4.9 s with ``sys`` time from 3.0 to 1.0 s.
The bilinear pipeline is unchanged. Results are bit-identical: only where memory comes from
changes.

The command line and the whole-scene entry points (``upsample_raster``, ``features_raster``,
``segment_raster``, ``geoupsample.xarray.upsample``) call it before starting their threads, and
their per-tile jobs call it again, which tunes each dask.distributed worker at its first tile. Those
workers need it most: distributed starts them with ``MALLOC_TRIM_THRESHOLD_=65536``, and a 50-step
fit of a 1152 x 1152 tile at scale 8 (one torch thread) took 15.5 s in a worker against 6.0 s once
tuned. Call it yourself early in a script or notebook that fits directly with
:func:`geoupsample.fit`. Set the environment variable ``GEOUPSAMPLE_TUNE_MALLOC=0`` to leave the
allocator alone. Arena assignment happens at a thread's first allocation, so threads that already
allocated keep their arena; the thresholds apply to every thread.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

#: ``mallopt`` parameter numbers (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: The settings applied, in the order applied.
SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("M_ARENA_MAX", M_ARENA_MAX, 1),
    ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, 32 << 20),
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, 256 << 20),
)

#: Environment variable that turns the tuning off (``0``, ``false``, ``no``, ``off``).
ENV_SWITCH = "GEOUPSAMPLE_TUNE_MALLOC"

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet in this process


def allocator_tuning_enabled() -> bool:
    """False when :data:`ENV_SWITCH` says ``0``/``false``/``no``/``off``; True otherwise."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def tune_allocator() -> bool:
    """Apply :data:`SETTINGS` with glibc's ``mallopt`` once per process (see the module docstring).

    Returns:
        True if the settings are in effect (now or from an earlier call); False when turned off
        by :data:`ENV_SWITCH`, on a C library other than glibc (macOS, Windows, musl), or when
        ``mallopt`` refused a setting.
    """
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
        if not (glibc and allocator_tuning_enabled()):
            _applied = False
            return False
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _applied = False
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        accepted = [mallopt(param, value) == 1 for _, param, value in SETTINGS]  # try each one
        _applied = all(accepted)
        return _applied
