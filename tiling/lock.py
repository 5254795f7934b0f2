"""One run at a time per output: an advisory lock beside the output while a run writes it.

Two runs writing the same output would share its partial file and journal: one renames the
other's half-written blocks onto the output and exits 0 (a corrupt GeoTIFF), the other fails
on a vanished file. :func:`output_lock` takes an exclusive ``flock`` on ``.NAME.lock`` beside the
output for the whole run, so a second run is refused at once with :class:`OutputBusy`. The
kernel drops the lock when its process ends, however it ends (``kill -9`` too), so a crashed
run never leaves a stale lock; the lock file is removed when the run ends. Where ``fcntl`` is
missing (Windows) there is no lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class OutputBusy(OSError):
    """Another run is writing the same output (it holds the output's lock)."""


def lock_path(path: str) -> str:
    """The lock file of output ``path``: ``.NAME.lock`` in the same folder."""
    p = Path(path)
    return str(p.with_name(f".{p.name}.lock"))


@contextmanager
def output_lock(path: str) -> Iterator[None]:
    """Hold the lock of output ``path`` (a GeoTIFF or a Zarr store) for the ``with`` block.

    Raises:
        OutputBusy: another process (or another run in this one) holds it.
    """
    if fcntl is None:
        yield
        return
    where = lock_path(path)
    for _ in range(5):
        fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(
                f"another run is writing {path} (it holds the lock {where}); wait for it to "
                "finish, or write to another path"
            ) from None
        try:  # the last holder may have removed the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(where).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise OutputBusy(f"could not lock {where}: other runs keep taking it; is {path} "
                         "being written by several runs?")
    try:
        yield
    finally:
        try:
            os.unlink(where)  # while still holding the lock (see the loop above)
        finally:
            os.close(fd)
