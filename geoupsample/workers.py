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

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from geoupsample.core.kernels import parse_device, resolve_device


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where known, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def threads_per_worker(workers: int | None, device: str | torch.device | None) -> Iterator[None]:
    """Set torch's intra-op threads to ``cores // workers`` for the block, then restore them.

    Nothing changes for ``workers`` None or 1, or on CUDA (``device`` ``"cuda"``, or None on a
    machine with a GPU: the GPU does the work). The setting is process-wide while the block runs.
    """
    if workers is None or workers <= 1 or parse_device(device).type == "cuda":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cores() // workers))
    try:
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
