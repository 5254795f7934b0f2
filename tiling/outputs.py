"""Several outputs on one grid, written by one run (:func:`tiling.run` with a list of specs).

A per-tile function then returns the bands of every output stacked, in order (``sum(count)``
bands); the engine blends them as one array and each output's writer writes its own slice of
every finished cell. One journal (beside the first output) records the finished row bands of
all of them, and all of them appear together at the end, each under its own name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from rasterio.windows import Window

from tiling.writer import OutputSpec, Writer


def spec_identity(spec: OutputSpec) -> dict[str, Any]:
    """What identifies an output in a resume journal's key (its grid, bands and encoding)."""
    return {"crs": str(spec.crs), "transform": list(spec.transform)[:6], "count": spec.count,
            "dtype": spec.dtype, "nodata": str(spec.nodata), "compress": spec.compress,
            "blocksize": spec.blocksize, "cog": spec.cog, "nodata_mask": spec.nodata_mask}


@dataclass(frozen=True)
class OutputSet:
    """Outputs sharing one grid (CRS, transform, size, block size), written in one run.

    Attributes:
        specs: the outputs, in the order their bands come in a tile's result.
    """

    specs: tuple[OutputSpec, ...]

    def __post_init__(self) -> None:
        specs = tuple(self.specs)
        object.__setattr__(self, "specs", specs)
        if not specs:
            raise ValueError("an OutputSet needs at least one output")
        first = specs[0]
        for s in specs[1:]:
            if (s.crs, tuple(s.transform), s.width, s.height, s.blocksize) != (
                    first.crs, tuple(first.transform), first.width, first.height,
                    first.blocksize):  # fmt: skip
                raise ValueError(f"the outputs {first.path} and {s.path} are on different grids "
                                 "(CRS, transform, size or block size): one run writes one grid")
        paths = [s.path for s in specs]
        if len(set(paths)) != len(paths):
            raise ValueError(f"two outputs of one run have the same path: {paths}")

    # --- what the engine reads of an output --------------------------------------------
    @property
    def path(self) -> str:
        """The first output's path: the journal and the scratch file live beside it."""
        return self.specs[0].path

    @property
    def crs(self) -> Any:
        return self.specs[0].crs

    @property
    def transform(self) -> Any:
        return self.specs[0].transform

    @property
    def width(self) -> int:
        return self.specs[0].width

    @property
    def height(self) -> int:
        return self.specs[0].height

    @property
    def blocksize(self) -> int:
        return self.specs[0].blocksize

    @property
    def count(self) -> int:
        """All outputs' bands."""
        return sum(s.count for s in self.specs)

    @property
    def tags(self) -> dict:
        return self.specs[0].tags

    def slices(self) -> list[slice]:
        """Each output's bands in a tile's result."""
        out, start = [], 0
        for s in self.specs:
            out.append(slice(start, start + s.count))
            start += s.count
        return out


def outputs_of(output: OutputSpec | OutputSet | Sequence[OutputSpec]) -> OutputSpec | OutputSet:
    """A spec as it is; a list of specs as an :class:`OutputSet` (one spec: itself)."""
    if isinstance(output, (OutputSpec, OutputSet)):
        return output
    specs = tuple(output)
    return specs[0] if len(specs) == 1 else OutputSet(specs)


def members(output: OutputSpec | OutputSet) -> tuple[OutputSpec, ...]:
    """The specs of ``output`` (one for a plain spec)."""
    return output.specs if isinstance(output, OutputSet) else (output,)


def identity(output: OutputSpec | OutputSet) -> Any:
    """:func:`spec_identity` of the output, or the list of them for a set."""
    if isinstance(output, OutputSet):
        return [{"path": s.path, **spec_identity(s)} for s in output.specs]
    return spec_identity(output)


def with_tags(output: OutputSpec | OutputSet, tags: dict) -> OutputSpec | OutputSet:
    """``output`` with ``tags`` added to every spec's."""
    if isinstance(output, OutputSet):
        return OutputSet(tuple(replace(s, tags={**s.tags, **tags}) for s in output.specs))
    return replace(output, tags={**output.tags, **tags})


class MultiWriter:
    """The writers of an :class:`OutputSet` behind :class:`~tiling.writer.Writer`'s methods:
    each writes its slice of every window's bands."""

    def __init__(self, outputs: OutputSet, resume: bool = False) -> None:
        self.writers: list[Writer] = []
        self.slices = outputs.slices()
        try:
            for s in outputs.specs:
                self.writers.append(Writer(s, resume=resume))
        except BaseException:
            self.abort()
            raise

    @property
    def clipped(self) -> int:
        return sum(w.clipped for w in self.writers)

    @property
    def clipped_by_output(self) -> list[int]:
        """Values each output's integer dtype clipped."""
        return [w.clipped for w in self.writers]

    def write(self, data: np.ndarray, window: Window) -> None:
        for w, part in zip(self.writers, self.slices, strict=True):
            w.write(data[part], window)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def finish(self) -> str:
        paths = [w.finish() for w in self.writers]
        return paths[0]

    def abort(self, keep: bool = False) -> None:
        errors = []
        for w in self.writers:
            try:
                w.abort(keep=keep)
            except Exception as err:  # noqa: BLE001 - abort every one, then report
                errors.append(err)
        if errors:
            raise errors[0]


def make_writer(output: OutputSpec | OutputSet, resume: bool) -> Writer | MultiWriter:
    """The writer of ``output``."""
    if isinstance(output, OutputSet):
        return MultiWriter(output, resume=resume)
    return Writer(output, resume=resume)
