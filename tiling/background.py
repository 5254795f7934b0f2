"""A writer's writes and flushes on one background thread.

GDAL compresses blocks inside ``write`` and releases the GIL while it does, so running the
writes on their own thread lets the caller blend the next cells (and the tile workers compute)
while the last ones are compressed. Order is kept (one thread, one FIFO queue); the queue is
short, so at most ``depth`` finished cells wait in memory. An error on the thread is raised again
in the caller at its next call, and by :meth:`BackgroundWriter.close`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from rasterio.windows import Window

_STOP = object()


class BackgroundWriter:
    """Wraps a writer (``write(data, window)``, ``flush()``).

    Args:
        writer: the writer; only the background thread touches it until :meth:`close` returns.
        on_flushed: called on the thread after each :meth:`flush` with its ``tag`` (e.g. to
            journal a finished band of cells once it is durable).
        depth: most items waiting in the queue.
    """

    def __init__(self, writer: Any, on_flushed: Callable[[Any], None] | None = None,
                 depth: int = 2) -> None:
        self.writer = writer
        self.on_flushed = on_flushed
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.thread = threading.Thread(target=self._loop, name="tiling-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # drain without working after a failure
            try:
                kind, a, b = item
                if kind == "write":
                    self.writer.write(a, b)
                else:
                    self.writer.flush()
                    if self.on_flushed is not None:
                        self.on_flushed(a)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                self.error = err

    def _put(self, item: Any) -> None:
        self._raise()
        self.queue.put(item)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def write(self, data: np.ndarray, window: Window) -> None:
        """Queue ``data`` for ``window`` (the array must not be changed afterwards)."""
        self._put(("write", data, window))

    def flush(self, tag: Any = None) -> None:
        """Queue a flush; ``on_flushed(tag)`` runs after it."""
        self._put(("flush", tag, None))

    def close(self) -> None:
        """Wait for every queued item; raise the thread's error if there was one."""
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join()
        self._raise()
