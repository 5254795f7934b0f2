"""Where a run's tile work goes: the device it runs on, and how the CPU's cores are shared
between the tiles a local run computes at once.

A fit (``jbu``/``gsjbu``) or a backbone runs one tile at a time by default, in the calling thread
(:func:`tiling.run` with one worker), and uses every core inside it through torch's intra-op
threads. Those threads do not keep every core busy all the time (on the 2-core development machine a
gsjbu run used 1.3 cores on average), so several tiles at once can be faster — at the price of one
tile's working memory each (about 0.6 GB for a 1024 px gsjbu tile at scale 8 with 8 classes). With
``workers`` tiles at once, each should use ``cores // workers`` torch threads, not all of them (2
tiles at once on 2 cores, one run each: 0.157 MP/s with 2 threads per tile, 0.167 with 1). Measured
on the 2-core development machine, ``geoupsample upsample`` over the 2048² benchmark scene
(``benchmarks/_data``, gsjbu, 8 classes), two alternating runs each: 1 worker 21.5 and 21.7 s wall,
1.58 and 1.51 GB max RSS; 2 workers 19.2 and 19.0 s, 2.03 and 2.15 GB (max RSS includes about 0.65
GB of imports). The default stays 1, inside the memory target.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from geoupsample.core.kernels import parse_device, resolve_device
from tiling.writer import compression_threads

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (what ``taskset``, ``numactl`` and batch
    schedulers set), capped by its cgroup's CPU quota (what a container's ``--cpus`` or a
    Kubernetes limit sets: ``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` of v1), rounded up;
    the machine's CPU count where neither is known."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


#: Where the cgroup CPU quota is read (v2's ``cpu.max``, v1's quota and period files).
CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_quota(root: str | None = None) -> float | None:
    """CPUs' worth of time this process's cgroup may use (``2.5`` for a quota of 250 ms per 100
    ms), or None when unlimited or unknown. Reads the process's own cgroup (from
    ``/proc/self/cgroup``) under ``root`` (default :data:`CGROUP_ROOT`), then the root's
    files."""
    for path in _cgroup_dirs(root or CGROUP_ROOT):
        text = _read(os.path.join(path, "cpu.max"))  # v2: "max 100000" or "250000 100000"
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                return _ratio(quota, period)
            return None
        quota = _read(os.path.join(path, "cpu.cfs_quota_us"))  # v1: -1 when unlimited
        period = _read(os.path.join(path, "cpu.cfs_period_us"))
        if quota and period:
            return _ratio(quota, period) if int(quota) > 0 else None
    return None


def _cgroup_dirs(root: str) -> list[str]:
    """The process's own cgroup folders under ``root`` (v2 unified and v1 ``cpu``
    controller), then ``root`` itself and its ``cpu`` folder."""
    dirs = []
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if rel and rel != "/" and (controllers == "" or "cpu" in controllers.split(",")):
            sub = "" if controllers == "" else "cpu"
            dirs.append(os.path.join(root, sub, rel.lstrip("/")))
    return [*dirs, root, os.path.join(root, "cpu")]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = float(quota), float(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def check_threads(threads: int | None) -> None:
    """Refuse a ``threads`` count that is not a whole number >= 1, saying what to pass."""
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads
                                or threads < 1):  # fmt: skip
        raise ValueError(f"threads must be a whole number >= 1 (CPU threads of the run); got "
                         f"{threads!r}")


#: CPU threads set by :func:`cpu_threads` for the runs inside it, innermost last (None: default).
_THREADS: list[int | None] = [None]


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Runs inside the block use ``threads`` CPU threads in all (None: :func:`available_cores`)
    unless they are given their own (the CLI's ``--threads``; in Python, around a
    ``DataArray.compute()`` of the xarray API, or ``threads=`` of the scene functions)."""
    check_threads(threads)
    _THREADS.append(None if threads is None else int(threads))
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        _THREADS.pop()
        torch.set_num_threads(before)


def within_threads(fn: Callable[..., T] | None = None, *,
                   default: Callable[[], int] | None = None) -> Any:  # fmt: skip
    """Decorate a scene function with a ``threads`` parameter: it runs within
    :func:`cpu_threads` of that argument (the function itself need not read it), or of
    ``default()`` when it is None (``@within_threads(default=available_cores)``: torch's count
    set to the CPUs this process may use, for work that reads it, e.g. a model session)."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> T:
            threads = signature.bind_partial(*args, **kwargs).arguments.get("threads")
            if threads is None and default is not None:
                threads = default()
            with cpu_threads(threads):
                return fn(*args, **kwargs)

        return run

    return decorate if fn is None else decorate(fn)


@contextmanager
def threads_per_worker(workers: int | None, device: str | torch.device | None,
                       threads: int | None = None) -> Iterator[None]:  # fmt: skip
    """Run the block with ``threads // workers`` CPU threads per tile (torch's intra-op threads,
    which the Numba kernels follow, and GDAL's compression threads), then restore them.

    ``threads`` defaults to :func:`cpu_threads`' setting, else :func:`available_cores` (the
    affinity and the cgroup quota, not the machine's count: a container limited to 2 CPUs on a
    64-core node runs 2 threads, not 64 that would take turns). On CUDA (``device`` ``"cuda"``,
    or None on a machine with a GPU) the GPU does the work and only an explicit ``threads`` is
    applied. The setting is process-wide while the block runs.
    """
    check_threads(threads)
    if threads is None:
        threads = _THREADS[-1]
    if threads is None and parse_device(device).type == "cuda":
        yield
        return
    total = int(threads) if threads is not None else available_cores()
    per_tile = max(1, total // max(1, workers or 1))
    before = torch.get_num_threads()
    torch.set_num_threads(per_tile)
    try:
        with compression_threads(total):
            yield
    finally:
        torch.set_num_threads(before)


def check_workers(workers: int | None, scheduler: Any = None) -> None:
    """Refuse a ``workers`` count below 1, or one given with a ``scheduler`` (whose worker
    threads run the tiles: it would be ignored), with a message that says what to pass."""
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers
                                or workers < 1):  # fmt: skip
        raise ValueError(f"workers must be a whole number >= 1 (tiles at once); got {workers!r}")
    if workers is not None and scheduler is not None:
        raise ValueError(
            f"workers={workers} counts this machine's threads, but with a scheduler the "
            "cluster's worker threads run the tiles: leave workers (--workers) out, and size "
            "the cluster instead (dask worker --nthreads)"
        )


def check_device(device: str | torch.device | None, local: bool = True) -> None:
    """Refuse, before any work, a device torch does not know and (``local``: the tiles run in
    this process) CUDA where torch sees no GPU; ``ValueError`` naming what to pass. With a
    dask.distributed cluster (``local=False``) only the name is checked: the workers may have
    the GPU."""
    (resolve_device if local else parse_device)(device)
