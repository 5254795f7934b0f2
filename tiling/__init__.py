"""Tiling engine: tile grids, readers, blending, writers, execution. Never imports geoupsample.

Run any per-tile function over rasters into one seamless, georeferenced GeoTIFF/COG with bounded
memory::

    import tiling

    def double(ctx: tiling.TileContext):
        return ctx.data["image"] * 2          # float32 [bands, rows, cols] on ctx.window

    spec = tiling.OutputSpec("out.tif", crs=src.crs, transform=src.transform,
                             width=src.width, height=src.height, count=src.count)
    tiling.run(double, {"image": tiling.RasterInput("in.tif")}, spec, tile=1024, halo=32)

Modules: :mod:`~tiling.grid` (tile/cell geometry), :mod:`~tiling.blend` (taper weights),
:mod:`~tiling.reader` (windowed readers), :mod:`~tiling.accumulate` (bounded blending),
:mod:`~tiling.spill` (its scratch file),
:mod:`~tiling.writer` (GeoTIFF/COG writer), :mod:`~tiling.outputs` (several outputs of one
run), :mod:`~tiling.zarr_writer` (Zarr stores: ``run(..., ZarrOutputSpec(...))``),
:mod:`~tiling.journal` (resume),
:mod:`~tiling.lock` (one run per output),
:mod:`~tiling.aoi` (areas of interest), :mod:`~tiling.execute` (:func:`run`),
:mod:`~tiling.lazy` (the same blend as a lazy dask array).
"""

from tiling.execute import Progress, RunReport, TileContext, TileFunction, compute_tile, run
from tiling.grid import Cell, Tile, TileGrid
from tiling.journal import JournalMismatch, PartialRunDiscarded
from tiling.lock import OutputBusy
from tiling.outputs import OutputSet
from tiling.reader import ArrayInput, RasterInput, Warp, open_dask
from tiling.writer import OutputSpec, default_nodata
from tiling.zarr_writer import ZarrOutputSpec

__all__ = [
    "ArrayInput", "Cell", "JournalMismatch", "OutputBusy", "OutputSet", "OutputSpec",
    "PartialRunDiscarded",
    "Progress", "RasterInput", "RunReport", "Tile", "TileContext", "TileFunction", "TileGrid",
    "Warp", "ZarrOutputSpec", "compute_tile", "default_nodata", "open_dask", "run",
]
