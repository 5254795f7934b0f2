"""The public entry point :func:`run`: any per-tile function over rasters, into one GeoTIFF/COG.

A per-tile function receives a :class:`TileContext` and returns float32 ``[count, rows, cols]`` for
the tile's read window (NaN = nodata), or ``None`` when the tile has no data (e.g. all nodata).
Tiles are computed in the calling thread (``workers=1``), on a local thread pool, or on a
dask.distributed cluster, with a bounded number in flight; a single writer in the calling process
blends them and writes finished cells.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from tiling.accumulate import FRONTIER_BUDGET, Accumulator
from tiling.aoi import load_aoi, window_intersects, window_mask
from tiling.background import BackgroundWriter
from tiling.grid import Tile, TileGrid
from tiling.journal import Journal, PartialRunDiscarded
from tiling.lock import output_lock
from tiling.outputs import OutputSet, identity, make_writer, members, outputs_of, with_tags
from tiling.spill import SpillFile
from tiling.writer import OutputSpec, check_output_dir


@dataclass
class TileContext:
    """What a per-tile function gets.

    Attributes:
        tile: grid indices, core and read windows (output pixels).
        window: ``tile.read``: the output window the function must return values for.
        transform: affine transform of ``window`` in the output CRS.
        data: per input name, float32 ``[bands, rows, cols]`` on that input's own grid covering
            the same ground as ``window`` (a low-res input at scale s has ``rows = window.height
            / s``), NaN where nodata or outside the input.
    """

    tile: Tile
    window: Window
    transform: Affine
    data: dict[str, np.ndarray]


TileFunction = Callable[[TileContext], "np.ndarray | None"]


@dataclass
class Progress:
    """Passed to the progress callback after each tile: tiles done (computed or skipped) out of
    ``total``, megapixels of output computed (the cores of the tiles computed; skipped tiles,
    outside an AOI or already written, add none), and seconds since start."""

    done: int
    total: int
    megapixels: float
    seconds: float
    skipped: int = 0


@dataclass
class RunReport:
    """Summary of a finished :func:`run`."""

    path: str
    tiles: int
    computed: int
    skipped: int
    resumed_bands: int
    seconds: float
    megapixels: float
    extra: dict = field(default_factory=dict)

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("nan")


#: Tag of a finished output holding the key (:func:`tiling.journal.make_key`) of its run.
RUN_KEY_TAG = "tiling_run_key"


def finished_by(path: str, key: str) -> bool:
    """Whether ``path`` is a finished output of the run whose key is ``key`` (same inputs,
    unchanged since, and same parameters)."""
    if not os.path.exists(path):
        return False
    try:
        with rasterio.open(path) as ds:
            return ds.tags().get(RUN_KEY_TAG) == key
    except rasterio.errors.RasterioError:
        return False


@contextlib.contextmanager
def _locks(output: OutputSpec | OutputSet) -> Iterator[None]:
    """Hold the lock of every output (:mod:`tiling.lock`)."""
    with contextlib.ExitStack() as stack:
        for spec in members(output):
            stack.enter_context(output_lock(spec.path))
        yield


def read_tile(inputs: Mapping[str, Any], tile: Tile,
              out_transform: Affine) -> dict[str, np.ndarray]:
    """Every input's data for ``tile`` (see :attr:`TileContext.data`)."""
    with gdal_env():  # also on dask workers (other processes)
        return {name: src.read(tile.read, out_transform) for name, src in inputs.items()}


def call_tile(fn: TileFunction, tile: Tile, data: dict[str, np.ndarray], out_transform: Affine,
              count: int) -> tuple[tuple[int, int], np.ndarray | None]:
    """Call ``fn`` on ``tile``'s data (from :func:`read_tile`) and check the result's shape."""
    out = fn(TileContext(tile, tile.read, window_transform(tile.read, out_transform), data))
    if out is None:
        return tile.id, None
    out = np.asarray(out, dtype=np.float32)
    want = (count, int(tile.read.height), int(tile.read.width))
    if out.shape != want:
        raise ValueError(f"the per-tile function returned shape {out.shape} for tile {tile.id}; "
                         f"expected {want} (bands, rows, cols of the tile's read window)")
    return tile.id, out


def compute_tile(fn: TileFunction, inputs: Mapping[str, Any], tile: Tile,
                 out_transform: Affine, count: int) -> tuple[tuple[int, int], np.ndarray | None]:
    """Read the inputs for ``tile``, call ``fn``, check the result's shape. Runs on workers."""
    share_malloc_arena()
    return call_tile(fn, tile, read_tile(inputs, tile, out_transform), out_transform, count)


def _caller_results(fn: TileFunction, inputs: Mapping[str, Any], tiles: Iterator[Tile],
                    transform: Affine,
                    count: int) -> Iterator[tuple[tuple[int, int], np.ndarray | None]]:
    """One tile at a time, ``fn`` called in this (the calling) thread; the next tile's inputs
    are read meanwhile in a background thread.

    Why not a worker thread: torch's CPU operations run OpenMP parallel regions, and once two
    threads have each run one (the caller, say, before the run, and a worker during it), every
    parallel region of either pays a wake-up of its team (libgomp throttles its spin-wait when
    its teams hold more threads than there are cores): a 200k-element multiply took 55 us
    instead of 9 on the 2-core development machine, and a gsjbu fit about 1.4x as long.
    """
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiling-read") as reader:
        queued = iter(tiles)

        def read_next() -> tuple[Tile, cf.Future] | None:
            t = next(queued, None)
            return None if t is None else (t, reader.submit(read_tile, inputs, t, transform))

        ahead = read_next()
        try:
            while ahead is not None:
                t, data = ahead
                ready = data.result()
                ahead = read_next()
                yield call_tile(fn, t, ready, transform, count)
        finally:
            if ahead is not None:
                ahead[1].cancel()


def _local_results(fn: TileFunction, inputs: Mapping[str, Any], tiles: Iterator[Tile],
                   transform: Affine, count: int, workers: int,
                   max_in_flight: int) -> Iterator[tuple[tuple[int, int], np.ndarray | None]]:
    if workers == 1:
        yield from _caller_results(fn, inputs, tiles, transform, count)
        return
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiling") as pool:
        pending: set[cf.Future] = set()
        try:
            for t in tiles:
                pending.add(pool.submit(compute_tile, fn, inputs, t, transform, count))
                if len(pending) >= max_in_flight:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


#: How many times a tile whose task was lost with a dask worker is submitted again.
MAX_RESUBMITS = 3


def _dask_results(fn: TileFunction, inputs: Mapping[str, Any], tiles: Iterator[Tile],
                  transform: Affine, count: int, scheduler: Any,
                  max_in_flight: int) -> Iterator[tuple[tuple[int, int], np.ndarray | None]]:
    from distributed import Client, as_completed

    own = isinstance(scheduler, str)
    try:
        client = Client(scheduler, set_as_default=False) if own else scheduler
    except (ValueError, OSError) as err:  # a malformed address, or nothing listening there
        raise ValueError(
            f"cannot reach the dask scheduler at {scheduler!r} ({err}); give its address as "
            "tcp://HOST:PORT (as the scheduler prints it), or leave the scheduler out to run "
            "on this machine"
        ) from err
    # fn goes to every worker once (a backbone's weights are tens to hundreds of MB), not with
    # every task: each worker deserialises it once and its tasks share it
    shared = [client.scatter(fn, broadcast=True, hash=False)]
    seq = as_completed()
    tile_of: dict[str, Tile] = {}
    resubmitted: dict[tuple[int, int], int] = {}

    def submit(t: Tile) -> None:
        f = client.submit(compute_tile, shared[-1], inputs, t, transform, count, pure=False)
        tile_of[f.key] = t
        seq.add(f)

    def collect(f: Any) -> tuple[tuple[int, int], np.ndarray | None] | None:
        """The tile's result; None when its task was lost with a worker and went again."""
        t = tile_of.pop(f.key)
        try:
            return f.result()
        except cf.CancelledError:
            # a killed worker can take the scheduler's last copy of the scattered function
            # with it, and the tasks that need it are forgotten, not rerun: scatter it again
            # and resubmit the tile (a tile whose own work kills workers ends as KilledWorker)
            tries = resubmitted[t.id] = resubmitted.get(t.id, 0) + 1
            if tries > MAX_RESUBMITS:
                raise
            if shared[-1].status != "finished":
                shared.append(client.scatter(fn, broadcast=True, hash=False))
            submit(t)
            return None

    try:
        in_flight = 0
        for t in tiles:
            submit(t)
            in_flight += 1
            while in_flight >= max_in_flight:
                result = collect(next(seq))
                if result is not None:
                    in_flight -= 1
                    yield result
        for f in seq:  # tiles resubmitted meanwhile are added to seq and come out here too
            result = collect(f)
            if result is not None:
                yield result
    finally:
        for future in shared:
            future.release()
        if own:
            client.close()


#: GDAL block cache used during a run (MB) unless GDAL_CACHEMAX is set in the environment. GDAL's
#: default (5% of RAM) would let the cache grow with the scene. Measured at 4096 and 16384 px wide
#: (bilinear, 8 float32 bands): 64 MB let the output's dirty blocks add ~+110 MB of peak RSS on
#: the wide scene, 32 MB ~+55 MB, 16 MB ~+40 MB; but 16 MB re-decompresses the guide's halo
#: blocks and cost gsjbu ~10% of its speed (0.088 against 0.096 MP/s at 2048^2), 32 MB did not.
GDAL_CACHE_MB = 32


def _malloc_trim() -> Callable[[], None]:
    """``malloc_trim(0)`` on glibc (hands freed heap pages back to the OS), else a no-op.

    Per-tile buffers of tens of MB freed in several threads otherwise stay in glibc's arenas
    and the resident size creeps up with the number of tiles.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


trim_memory = _malloc_trim()


_ARENA_SHARED = False


def share_malloc_arena() -> None:
    """On glibc, let every thread allocate from one malloc arena (``mallopt(M_ARENA_MAX, 1)``);
    once per process (dask workers, other processes, call it from :func:`compute_tile`).

    Per-tile work in worker threads otherwise gets per-thread arenas, whose large temporaries
    are mapped and unmapped on every allocation (system time in worker threads, and RSS per
    arena). Added when GSJBU fits ran 5-8x slower in worker threads; most of that turned out to
    be a strided batched matmul (fixed in geoupsample's psi), so this is a secondary measure.
    Affects threads created afterwards; a no-op elsewhere.
    """
    global _ARENA_SHARED
    if _ARENA_SHARED:
        return
    _ARENA_SHARED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def gdal_env() -> rasterio.Env:
    """A rasterio environment capping GDAL's block cache (see :data:`GDAL_CACHE_MB`)."""
    if "GDAL_CACHEMAX" in os.environ:
        return rasterio.Env()
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2 ** 20)


def run(fn: TileFunction, inputs: Mapping[str, Any],
        output: OutputSpec | OutputSet | Sequence[OutputSpec], *,
        tile: int = 1024, halo: int = 64, align: int | tuple[int, int] = 1,
        align_offset: tuple[int, int] = (0, 0), blend: str = "taper",
        region: Window | None = None, context: Window | None = None, aoi: Any = None,
        aoi_crs: Any = None, resume: bool = False, params: Mapping[str, Any] | None = None,
        scheduler: Any = None, workers: int | None = None, max_in_flight: int | None = None,
        progress: Callable[[Progress], None] | None = None,
        frontier_budget: int = FRONTIER_BUDGET) -> RunReport:
    """Run ``fn`` over every tile of ``output``'s grid and write one seamless GeoTIFF/COG.

    Args:
        fn: per-tile function ``fn(ctx: TileContext) -> float32 [output.count, rows, cols] | None``
            (must be picklable for a dask.distributed scheduler).
        inputs: named readers (:class:`tiling.RasterInput`, :class:`tiling.ArrayInput`) whose
            grids nest with the output grid (e.g. a low-res raster at an integer scale).
        output: the output grid, bands, dtype, nodata, compression, COG flag; or several
            outputs on one grid (a list of specs, :class:`tiling.outputs.OutputSet`): ``fn``
            then returns their bands stacked in order, and each is written to its own file.
        tile: core tile size in output pixels (rounded up to a multiple of ``align``).
        halo: context pixels around each core; also the width of the blending ramp.
        align, align_offset: read windows start on ``align_offset + k * align`` and span multiples
            of ``align`` pixels (pass the low-res scale and the output pixel where a low-res pixel
            starts, or a backbone's patch size).
        blend: ``"taper"`` (raised cosine over the overlap, none at the region border) or
            ``"crop"`` (each pixel from the tile that owns it).
        region: optional output window to process; everything outside it is nodata.
        context: optional output window, containing the region and possibly reaching past the
            output raster, where the inputs hold data worth reading: the tiles at the region's
            edge read up to ``halo`` pixels into it (see :class:`TileGrid`). Default: the region.
        aoi: optional shapely geometry / GeoJSON (file path, dict or string); tiles outside it are
            skipped and pixels outside it are nodata. ``aoi_crs`` gives its CRS (see
            :mod:`tiling.aoi` for defaults).
        resume: continue a run interrupted (even by ``kill -9``) with the same inputs and
            parameters; a journal from other inputs/parameters raises
            :class:`tiling.JournalMismatch`. An output the same run already finished (its
            ``tiling_run_key`` tag) is left as it is: nothing is computed.
        params: extra parameters identifying the job (method, iterations...) for the journal key.
        scheduler: None (local threads) or a ``distributed.Client`` or scheduler address. ``fn``
            is sent to every worker once (``Client.scatter``), not with each tile, and the
            tiles a worker runs share it.
        workers: local threads (default: CPU count). With 1, ``fn`` runs in the calling thread,
            one tile at a time, while the next tile's inputs are read in the background (torch
            code runs faster there: see :func:`_caller_results`).
        max_in_flight: tiles submitted but not yet blended (default: 2 x workers, or 2 x the
            cluster's threads); bounds memory. With one local worker it is always 2: the tile
            being computed and the next one being read.
        progress: called with a :class:`Progress` after every tile.
        frontier_budget: bytes of blend parts waiting for the next tile row kept in memory; the
            rest go to an anonymous scratch file beside the output (see :mod:`tiling.spill`).

    Returns:
        a :class:`RunReport`. Nothing exists at ``output.path`` until the run is complete: the
        file is written under a temporary name beside it and renamed at the end. A second run
        writing the same output meanwhile is refused (:class:`tiling.OutputBusy`). On an error
        the temporary files are removed; on ``KeyboardInterrupt`` they are kept for ``resume=True``.

    Memory: about ``max_in_flight`` tile outputs (``count x (tile + 2 halo)^2`` float32 each),
    plus at most ``frontier_budget`` bytes of the row of cell edges waiting for the next tile row
    (``width x (block + halo / 2) x count`` float32 in all; the rest is on disk), plus GDAL's
    block cache (capped at :data:`GDAL_CACHE_MB` unless ``GDAL_CACHEMAX`` is set). It grows
    neither with the number of tile rows nor with the width. Disk: the output, plus a scratch
    file of about the frontier's size while running.
    """
    share_malloc_arena()
    output = outputs_of(output)
    for spec in members(output):
        check_output_dir(spec.path)
    with _locks(output), gdal_env():  # one run per output: see tiling.lock
        return _run(fn, inputs, output, tile=tile, halo=halo, align=align,
                    align_offset=align_offset, blend=blend, region=region, context=context,
                    aoi=aoi, aoi_crs=aoi_crs, resume=resume, params=params, scheduler=scheduler,
                    workers=workers, max_in_flight=max_in_flight, progress=progress,
                    frontier_budget=frontier_budget)


def _run(fn: TileFunction, inputs: Mapping[str, Any], output: OutputSpec | OutputSet, *,
         tile: int,
         halo: int, align: int | tuple[int, int], align_offset: tuple[int, int], blend: str,
         region: Window | None, context: Window | None, aoi: Any, aoi_crs: Any, resume: bool,
         params: Mapping[str, Any] | None, scheduler: Any, workers: int | None,
         max_in_flight: int | None, progress: Callable[[Progress], None] | None,
         frontier_budget: int) -> RunReport:
    t0 = time.perf_counter()
    if not inputs:
        raise ValueError("run() needs at least one input")
    grid = TileGrid(output.height, output.width, tile=tile, halo=halo, align=align,
                    offset=align_offset, block=output.blocksize, region=region, blend=blend,
                    context=context)
    geom = load_aoi(aoi, output.crs, aoi_crs) if aoi is not None else None
    if geom is not None and not window_intersects(geom, grid.region_window, output.transform):
        raise ValueError("the AOI does not overlap the raster")
    cells = grid.cells()

    key_params = {
        "inputs": {k: v.identity() for k, v in inputs.items()},
        "grid": {"height": grid.height, "width": grid.width, "tile": tile, "halo": halo,
                 "align": align, "align_offset": list(align_offset), "blend": blend,
                 "region": None if region is None else str(region),
                 **({"context": str(context)} if context is not None else {})},
        "output": identity(output),
        "aoi": None if geom is None else geom.wkt,
        "params": dict(params or {}),
    }
    journal = Journal(output.path, key_params)
    specs = members(output)
    if not resume:
        _warn_discarded(journal, output.path, specs[0].partial_path, grid.rows.n_cells)
    done_bands: set[int] = journal.load() if resume else set()
    if resume and done_bands and not all(os.path.exists(s.partial_path) for s in specs):
        done_bands = set()  # journal without its partial files: start over
    if resume and not done_bands and all(finished_by(s.path, journal.key) for s in specs):
        return RunReport(output.path, len(grid), 0, len(grid), grid.rows.n_cells,
                         time.perf_counter() - t0, 0.0, extra={"already_complete": True})
    # the finished files record their run's key: a later resume of the same run leaves them be
    output = with_tags(output, {RUN_KEY_TAG: journal.key})

    skip = set()
    band_left: dict[int, int] = {}
    for i, c in enumerate(cells):
        if c.row in done_bands:
            skip.add(i)
        elif geom is not None and not window_intersects(geom, c.window, output.transform):
            skip.add(i)
        else:
            band_left[c.row] = band_left.get(c.row, 0) + 1
    spill = SpillFile(os.path.dirname(os.path.abspath(output.path)))
    acc = Accumulator(grid, output.count, skip, spill=spill, frontier_budget=frontier_budget)

    workers = workers or os.cpu_count() or 1
    total = len(grid)
    state = {"done": 0, "skipped": 0, "mp": 0.0, "core_mp": 0.0}

    def report() -> None:
        if progress is not None:
            progress(Progress(state["done"], total, state["core_mp"], time.perf_counter() - t0,
                              state["skipped"]))

    def tiles_to_compute() -> Iterator[Tile]:
        for t in grid.tiles():
            needed = acc.needed(t.id)
            if needed and geom is not None:
                (y0, y1), (x0, x1) = grid.support(*t.id)
                needed = window_intersects(geom, Window(x0, y0, x1 - x0, y1 - y0),
                                           output.transform)
            if needed:
                yield t
            else:
                state["skipped"] += 1
                consume(t.id, None, computed=False)

    def consume(tile_id: tuple[int, int], data: np.ndarray | None,
                computed: bool = True) -> None:  # fmt: skip
        for cell, values in acc.add(tile_id, data):
            if geom is not None:
                inside = window_mask(geom, cell.window, output.transform)
                values[:, ~inside] = np.nan
            background.write(values, cell.window)
            state["mp"] += cell.window.width * cell.window.height / 1e6
            band_left[cell.row] -= 1
            if band_left[cell.row] == 0:
                background.flush(cell.row)  # the journal marks the row once it is on disk
            del values  # the queue holds it now; not kept alive while the next cell blends
        del data
        trim_memory()
        state["done"] += 1
        if computed:  # skipped tiles (outside the AOI, or resumed) add no work
            core = grid.get(*tile_id).core
            state["core_mp"] += core.width * core.height / 1e6
        report()

    if max_in_flight is None:
        if scheduler is None:
            max_in_flight = 2 * workers
        else:
            max_in_flight = 2 * _cluster_threads(scheduler)
    max_in_flight = max(1, max_in_flight)

    keep = finished = False
    writer = make_writer(output, resume=bool(done_bands))
    background = BackgroundWriter(writer, on_flushed=journal.mark)
    try:
        if not done_bands:
            journal.start()
        report()
        if scheduler is None:
            results = _local_results(fn, inputs, tiles_to_compute(), output.transform,
                                     output.count, workers, max_in_flight)
        else:
            results = _dask_results(fn, inputs, tiles_to_compute(), output.transform,
                                    output.count, scheduler, max_in_flight)
        computed = 0
        for tile_id, data in results:
            computed += 1
            consume(tile_id, data)
        if acc.pending:
            raise RuntimeError(f"internal error: {acc.pending} cells were never completed")
        background.close()
        path = writer.finish()
        finished = True
    except KeyboardInterrupt:
        keep = True
        raise
    finally:
        spill.close()
        if not finished:
            try:
                background.close()  # let the thread stop before the file goes
            except BaseException:  # noqa: BLE001 - the error being handled already says more
                pass
            writer.abort(keep=keep)
            if not keep:
                journal.remove()
    journal.remove()
    return RunReport(path, total, computed, state["skipped"], len(done_bands),
                     time.perf_counter() - t0, state["mp"],
                     extra={"peak_pending_parts": acc.peak_parts, "cells": len(cells),
                            "peak_held_mb": round(acc.peak_held_bytes / 2 ** 20, 1),
                            "spill_file_mb": round(spill.size / 2 ** 20, 1),
                            "clipped_values": writer.clipped,
                            "clipped_by_output": getattr(writer, "clipped_by_output",
                                                         [writer.clipped])})


def _warn_discarded(journal: Journal, path: str, partial_path: str, bands: int) -> None:
    """Warn that a run without ``resume`` discards the interrupted run of the same output whose
    partial file and journal it found (it used to vanish silently)."""
    found = journal.peek()
    if found is None or not found[0] or not os.path.exists(partial_path):
        return
    done, same = found
    how = ("with the same inputs and parameters: resume=True (--resume on the command line) "
           "would have continued it" if same else "with other inputs or parameters")
    warnings.warn(f"{path}: discarding an interrupted run of this output ({done} of {bands} "
                  f"row bands, about {done / max(1, bands):.0%} of it, were finished, {how}); "
                  "starting over", PartialRunDiscarded, stacklevel=4)


def _cluster_threads(scheduler: Any) -> int:
    if isinstance(scheduler, str):
        return 4
    try:
        return max(1, sum(scheduler.nthreads().values()))
    except Exception:  # noqa: BLE001 - any client-like object without nthreads()
        return 4
