"""A scratch file for the blend's frontier: tile parts that wait for the next tile row.

With tiles in row-major order, the parts of one tile row that overlap the next row (taper strip
plus block alignment, about ``width x (halo + block)`` pixels) must be kept until that row
arrives. Held in memory, that frontier grows with the scene's width; past a budget the
accumulator moves such parts here instead, so peak memory stays the same for any width.

The file is anonymous (unlinked as soon as it is created, where the OS allows), so nothing is
left behind after a crash; the operating system's page cache, not the process, holds what was
written recently. Freed slots are reused by later parts of the same byte size (most parts of a
grid share a few shapes), so the file stays about as big as the largest frontier.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import IO

import numpy as np


@dataclass(frozen=True)
class Spilled:
    """Where an array lives in the scratch file."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class SpillFile:
    """Arrays written to and read back from one anonymous scratch file.

    Args:
        directory: where to create it (None: the system's temporary directory). Give the
            output's directory to keep the scratch data on the disk that has room for the output.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None  # created by the first put: most runs never spill
        self.end = 0
        self.free: dict[int, list[int]] = {}  # byte size -> offsets of free slots
        self.held = 0  # bytes in live slots

    def put(self, array: np.ndarray) -> Spilled:
        """Store ``array`` (any shape, any fixed-size dtype); returns its handle."""
        data = np.ascontiguousarray(array)
        size = data.nbytes
        slots = self.free.get(size)
        if slots:
            offset = slots.pop()
        else:
            offset, self.end = self.end, self.end + size
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix=".tiling-spill-")
        self._file.seek(offset)
        self._file.write(memoryview(data).cast("B"))
        self.held += size
        return Spilled(offset, tuple(data.shape), data.dtype.str)

    def take(self, handle: Spilled) -> np.ndarray:
        """Read the array back and free its slot."""
        out = np.empty(handle.shape, dtype=np.dtype(handle.dtype))
        assert self._file is not None, "take() of a handle this file never gave"
        self._file.seek(handle.offset)
        got = self._file.readinto(memoryview(out).cast("B"))
        if got != handle.nbytes:
            raise OSError(f"spill file: read {got} of {handle.nbytes} bytes at {handle.offset}")
        self.free.setdefault(handle.nbytes, []).append(handle.offset)
        self.held -= handle.nbytes
        return out

    @property
    def size(self) -> int:
        """Bytes the scratch file spans."""
        return self.end

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
