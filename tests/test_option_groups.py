"""The option groups of :mod:`geoupsample.options` (tiling, output, render), declared once and
shared by the commands, the scene functions and the xarray functions.

- Agreement by construction: every field of a group is an option ``--field-name`` of each
  command that takes the group, with the field's help (or the command's own, declared in
  ``geoupsample.commands.options.HELP_OVERRIDES``), and a keyword of each Python and xarray
  function that takes it, beside the group's parameter. A field added to a group fails here
  until the commands and functions take it (or it is listed below among what one does not).
- A run given the groups equals the same run given the flat keywords (pixels, tags, layout), on
  the bundled Rotterdam sample.
- A group and a keyword that disagree, a field a function does not take, another type, or a bad
  value are refused with an ``InputError`` that names them, before any work.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rioxarray
import typer

import geoupsample
import geoupsample.backbones as gb
import geoupsample.workers
import geoupsample.xarray as gx
from geoupsample.cli import app
from geoupsample.commands.options import HELP_OVERRIDES
from geoupsample.featuremaps import features_raster
from geoupsample.inputs import InputError
from geoupsample.options import (
    GROUPS,
    OutputOptions,
    RenderOptions,
    TilingOptions,
    field_help,
    takes_option_groups,
)
from geoupsample.pipeline import upsample_raster
from geoupsample.prediction import predict_raster
from geoupsample.segmentation import segment_raster
from geoupsample.time_series import upsample_series
from tests._predict_helpers import export_torchscript, make_net

DATA = resources.files("geoupsample") / "data"
MS = str(DATA / "rotterdam_ms.tif")  # 4 bands, 300 x 300 at 1 m
PAN = str(DATA / "rotterdam_pan.tif")  # 1 band, 600 x 600 at 0.5 m: scale 2
LABELS = str(DATA / "rotterdam_labels.geojson")
BANDS = ("red", "green", "blue", "nir")

RENDER_KERNELS = {"kind", "self_guidance", "min_sigma_r"}  # what features' render lacks
LAZY = {"workers", "threads", "scheduler", "resume"}  # what a lazy xarray result lacks

#: Each command, and the fields of the groups it does not take (its others it must take).
COMMANDS: dict[str, set[str]] = {
    "upsample": set(),
    "features": RENDER_KERNELS,
    "segment": {"dtype", "kind"},  # the class raster is uint8; the probabilities' kind is known
    "predict": {"kind"},
}

#: Each function, the groups it takes, and the fields of those it does not take.
FUNCTIONS: dict[Callable[..., Any], tuple[tuple[type, ...], set[str]]] = {
    upsample_raster: (GROUPS, set()),
    features_raster: (GROUPS, RENDER_KERNELS),
    segment_raster: (GROUPS, {"dtype", "kind"}),
    predict_raster: (GROUPS, {"kind"}),
    gx.upsample: ((TilingOptions, RenderOptions), LAZY),
    gx.features: ((TilingOptions, RenderOptions), LAZY | RENDER_KERNELS),
    gx.segment: ((TilingOptions, RenderOptions), LAZY | {"kind"}),
    gx.predict: ((TilingOptions, RenderOptions), LAZY | {"kind"}),
}


def read(path: str | Path) -> tuple[np.ndarray, dict[str, str], dict[str, Any]]:
    """Pixels, tags and layout (dtype, compression, blocks, overviews) of a raster."""
    with rasterio.open(path) as ds:
        layout = {"dtype": ds.dtypes, "compress": ds.compression, "blocks": ds.block_shapes,
                  "overviews": ds.overviews(1), "nodata": repr(ds.nodata),
                  "layout": ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT"),
                  "nbits": ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")}  # fmt: skip
        return ds.read(), ds.tags(), layout


def assert_same_raster(a: str | Path, b: str | Path) -> None:
    pa, ta, la = read(a)
    pb, tb, lb = read(b)
    np.testing.assert_array_equal(pa, pb)
    assert ta == tb
    assert la == lb


# --- agreement by construction ------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_of_a_group_is_an_option_of_the_commands_with_its_help(command: str) -> None:
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]
    for group in GROUPS:
        for f in dataclasses.fields(group):
            if f.name in COMMANDS[command]:
                assert f.name not in params, (command, f.name)
                continue
            assert f.name in params, f"geoupsample {command} has no option for {group.__name__}" \
                                     f".{f.name}"  # fmt: skip
            param = params[f.name]
            assert f"--{f.name.replace('_', '-')}" in param.opts, (command, param.opts)
            expected = HELP_OVERRIDES.get((command, f.name), field_help(group, f.name))
            assert param.help == expected, (command, f.name)


def test_demo_threads_and_the_overrides_are_declared_beside_the_groups() -> None:
    """demo takes --threads of the tiling group; every command-specific help is of a field of
    a group, of a command that has that option, and says something else than the group's."""
    demo = {p.name: p for p in typer.main.get_command(app).commands["demo"].params}  # type: ignore[attr-defined]
    assert demo["threads"].help == TilingOptions.help("threads")
    fields = {f.name: g for g in GROUPS for f in dataclasses.fields(g)}
    for (command, name), text in HELP_OVERRIDES.items():
        assert command in COMMANDS and name in fields and name not in COMMANDS[command]
        assert text != fields[name].help(name)


@pytest.mark.parametrize("fn", list(FUNCTIONS), ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_every_field_of_a_group_is_a_keyword_of_the_functions(fn: Callable[..., Any]) -> None:
    groups, not_taken = FUNCTIONS[fn]
    params = inspect.signature(fn).parameters
    for group in GROUPS:
        if group not in groups:
            assert group.parameter not in params, (fn.__name__, group.parameter)
            continue
        p = params[group.parameter]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None
        assert group.__name__ in str(p.annotation)  # help() and the API pages show the type
        for f in dataclasses.fields(group):
            assert (f.name in params) is (f.name not in not_taken), (fn.__name__, f.name)
    assert fn.option_groups == {  # type: ignore[attr-defined]
        g: tuple(f.name for f in dataclasses.fields(g) if f.name not in not_taken)
        for g in groups}  # fmt: skip


def test_upsample_series_passes_the_groups_on() -> None:
    params = inspect.signature(upsample_series).parameters
    for group in GROUPS:
        assert params[group.parameter].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD  # upsample_raster's keywords


def test_the_groups_are_exported_and_say_their_fields() -> None:
    assert geoupsample.TilingOptions is TilingOptions and "TilingOptions" in geoupsample.__all__
    assert [f.name for f in dataclasses.fields(TilingOptions)] == [
        "tile", "halo", "blocksize", "workers", "threads", "scheduler", "resume", "aoi",
        "aoi_crs"]  # fmt: skip
    assert [f.name for f in dataclasses.fields(OutputOptions)] == ["dtype", "compress", "cog"]
    assert [f.name for f in dataclasses.fields(RenderOptions)] == [
        "kind", "consistency", "self_guidance", "min_sigma_r"]  # fmt: skip
    for group in GROUPS:
        assert all(f.default is None and f.metadata["help"] for f in dataclasses.fields(group))
        assert group().set_fields() == {}
    assert TilingOptions(tile=256, resume=False).set_fields() == {"tile": 256, "resume": False}
    with pytest.raises(TypeError):
        TilingOptions(256)  # type: ignore[misc]  # keywords only: which field is 256?


# --- the decorator ------------------------------------------------------------------------


@takes_option_groups(TilingOptions, RenderOptions)
def toy(a: int, tile: int = 1024, *, halo: int = 64, consistency: float | None = None,
        tiling_options: TilingOptions | None = None,
        render_options: RenderOptions | None = None) -> tuple[Any, ...]:  # fmt: skip
    return a, tile, halo, consistency


def test_a_group_counts_as_the_keywords_of_its_fields() -> None:
    assert toy(0) == (0, 1024, 64, None)
    assert toy(0, tiling_options=TilingOptions(tile=5)) == (0, 5, 64, None)
    assert toy(0, tiling_options=TilingOptions(halo=3), render_options=RenderOptions(
        consistency=0)) == (0, 1024, 3, 0)  # fmt: skip
    assert toy(0, 5, tiling_options=TilingOptions(tile=5, halo=3)) == (0, 5, 3, None)
    assert toy(0, halo=3, tiling_options=TilingOptions(tile=5, halo=3)) == (0, 5, 3, None)
    with pytest.raises(InputError, match=r"tile=6 and tiling_options=TilingOptions\(tile=5\) "
                                         r"disagree: give tile once"):
        toy(0, 6, tiling_options=TilingOptions(tile=5))  # positionally, too
    with pytest.raises(InputError, match=r"halo=8 and tiling_options=TilingOptions\(halo=3\)"):
        toy(0, halo=8, tiling_options=TilingOptions(halo=3))
    with pytest.raises(InputError, match=r"toy takes no blocksize .*it takes tile, halo"):
        toy(0, tiling_options=TilingOptions(blocksize=16))
    with pytest.raises(InputError, match="toy takes no kind"):
        toy(0, render_options=RenderOptions(kind="continuous"))
    with pytest.raises(InputError, match="render_options takes a geoupsample.options."
                                         "RenderOptions, got TilingOptions"):
        toy(0, render_options=TilingOptions(tile=5))  # type: ignore[arg-type]
    assert inspect.signature(toy).parameters["tiling_options"].default is None


def test_the_decorator_needs_the_group_parameter() -> None:
    with pytest.raises(TypeError, match="keyword-only parameter tiling_options=None"):
        @takes_option_groups(TilingOptions)
        def f(tile: int = 1) -> None: ...


def test_bad_values_are_refused_when_the_group_is_made() -> None:
    """The functions' own checks, with their messages, as InputErrors."""
    with pytest.raises(InputError, match="threads must be a whole number >= 1"):
        TilingOptions(threads=0)
    with pytest.raises(InputError, match="workers must be a whole number >= 1"):
        TilingOptions(workers=0)
    with pytest.raises(InputError, match="cluster's worker threads run the tiles"):
        TilingOptions(workers=2, scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(InputError, match="consistency must be a number >= 0"):
        RenderOptions(consistency=-1)
    with pytest.raises(InputError, match="min_sigma_r must be a number >= 0"):
        RenderOptions(min_sigma_r="0.3")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="kind must be 'auto', 'continuous' or 'probabilities'"):
        RenderOptions(kind="probs")


# --- the same runs, flat or grouped ---------------------------------------------------------

TILING = dict(tile=160, halo=32, blocksize=128)


def test_upsample_raster_with_groups_equals_flat_keywords(tmp_path) -> None:
    flat = upsample_raster(MS, PAN, tmp_path / "flat.tif", method="bilinear", **TILING,
                           workers=1, threads=1, dtype="float32", compress="zstd", cog=True,
                           kind="continuous", consistency=1)  # fmt: skip
    grouped = upsample_raster(
        MS, PAN, tmp_path / "grouped.tif", method="bilinear",
        tiling_options=TilingOptions(**TILING, workers=1, threads=1),
        output_options=OutputOptions(dtype="float32", compress="zstd", cog=True),
        render_options=RenderOptions(kind="continuous", consistency=1))  # fmt: skip
    assert grouped.tiles == flat.tiles and grouped.computed == flat.computed
    assert_same_raster(tmp_path / "flat.tif", tmp_path / "grouped.tif")
    _, tags, layout = read(tmp_path / "grouped.tif")
    assert layout["compress"].name.lower() == "zstd" and layout["layout"] == "COG"
    assert layout["dtype"] == ("float32",) * 4 and layout["blocks"][0] == (128, 128)
    assert '"consistency": 1' in tags["geoupsample_render"]
    # a keyword and a group that agree are one option: the same run again
    upsample_raster(MS, PAN, tmp_path / "both.tif", method="bilinear", tile=160, **{
        k: v for k, v in TILING.items() if k != "tile"}, workers=1, threads=1,
        tiling_options=TilingOptions(tile=160), output_options=OutputOptions(
            dtype="float32", compress="zstd", cog=True), kind="continuous",
        render_options=RenderOptions(consistency=1))  # fmt: skip
    assert_same_raster(tmp_path / "flat.tif", tmp_path / "both.tif")


def test_upsample_raster_refuses_disagreeing_options_before_any_work(tmp_path) -> None:
    out = tmp_path / "o.tif"
    with pytest.raises(InputError, match=r"tile=512 and tiling_options=TilingOptions\(tile=160"
                                         r"\) disagree: give tile once, as a keyword or in "
                                         r"tiling_options"):
        upsample_raster(MS, PAN, out, method="bilinear", tile=512,
                        tiling_options=TilingOptions(tile=160))
    with pytest.raises(InputError, match=r"cog=False and output_options=OutputOptions\(cog="
                                         r"True\) disagree"):
        upsample_raster(MS, PAN, out, "bilinear", 50, 3, 160, 32, None, None, None, None, False,
                        output_options=OutputOptions(cog=True))  # cog given positionally
    with pytest.raises(InputError, match="tiling_options takes a geoupsample.options."
                                         "TilingOptions, got dict"):
        upsample_raster(MS, PAN, out, tiling_options={"tile": 160})  # type: ignore[arg-type]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_upsample_series_with_groups_equals_flat_keywords(tmp_path) -> None:
    for date in ("2020", "2021"):  # two dates' low-res rasters (the same values)
        shutil.copy(MS, tmp_path / f"ms_{date}.tif")
    dates = [(date, str(tmp_path / f"ms_{date}.tif"), PAN) for date in ("2020", "2021")]
    out = tmp_path / "out"
    out.mkdir()
    upsample_series(dates, out / "{date}.tif", method="bilinear", **TILING, compress="lzw")
    out.rename(tmp_path / "flat")  # the same paths for both runs: the run key names them
    out.mkdir()
    upsample_series(dates, out / "{date}.tif", method="bilinear",
                    tiling_options=TilingOptions(**TILING),
                    output_options=OutputOptions(compress="lzw"))
    for date in ("2020", "2021"):
        assert_same_raster(tmp_path / "flat" / f"{date}.tif", out / f"{date}.tif")
    with pytest.raises(InputError, match=r"halo=16 and tiling_options=TilingOptions\(halo=32"):
        upsample_series(dates, tmp_path / "x_{date}.tif", halo=16,
                        tiling_options=TilingOptions(halo=32))


@pytest.fixture(scope="module")
def spectral() -> gb.Backbone:
    return gb.create("spectral", band_names=BANDS, cell_size=10)


def test_features_raster_with_groups_equals_flat_keywords(tmp_path, spectral) -> None:
    run = dict(method="bilinear", tile=160, halo=30, blocksize=32)
    features_raster(MS, tmp_path / "flat.tif", spectral, **run, dtype="float16",
                    compress="lzw", consistency=0)
    features_raster(MS, tmp_path / "grouped.tif", spectral, method="bilinear",
                    tiling_options=TilingOptions(tile=160, halo=30, blocksize=32),
                    output_options=OutputOptions(dtype="float16", compress="lzw"),
                    render_options=RenderOptions(consistency=0))
    assert_same_raster(tmp_path / "flat.tif", tmp_path / "grouped.tif")
    assert read(tmp_path / "grouped.tif")[2]["nbits"] == "16"  # IEEE half floats
    with pytest.raises(InputError, match="features_raster takes no self_guidance"):
        features_raster(MS, tmp_path / "x.tif", spectral, method="bilinear",
                        render_options=RenderOptions(self_guidance=1))
    assert not (tmp_path / "x.tif").exists()


def test_segment_raster_with_groups_equals_flat_and_honours_their_threads(
        tmp_path, spectral, monkeypatch) -> None:  # fmt: skip
    """segment_raster runs within ``threads`` (workers.within_threads): a group's threads are
    expanded before that decorator reads them."""
    seen: list[int | None] = []
    inner = geoupsample.workers.cpu_threads

    def spy(threads: int | None) -> Any:
        seen.append(threads)
        return inner(threads)

    monkeypatch.setattr(geoupsample.workers, "cpu_threads", spy)
    run = dict(method="bilinear", weight_decay=0.01)
    segment_raster(MS, LABELS, "class", tmp_path / "flat.tif", spectral, **run, tile=160,
                   halo=30, blocksize=32, compress="lzw", threads=1, consistency=0)
    assert seen == [1]
    seen.clear()
    segment_raster(MS, LABELS, "class", tmp_path / "grouped.tif", spectral, **run,
                   tiling_options=TilingOptions(tile=160, halo=30, blocksize=32, threads=1),
                   output_options=OutputOptions(compress="lzw"),
                   render_options=RenderOptions(consistency=0))
    assert seen == [1]
    assert_same_raster(tmp_path / "flat.tif", tmp_path / "grouped.tif")
    with pytest.raises(InputError, match=r"segment_raster takes no dtype .*it takes compress, "
                                         r"cog: leave dtype out"):
        segment_raster(MS, LABELS, "class", tmp_path / "x.tif", spectral, **run,
                       output_options=OutputOptions(dtype="float32"))
    assert not (tmp_path / "x.tif").exists()


def test_predict_raster_with_groups_equals_flat_keywords(tmp_path) -> None:
    model = export_torchscript(make_net(kernel=1), str(tmp_path / "m.pt"))
    predict_raster(MS, model, tmp_path / "flat.tif", tile=160, halo=32, blocksize=32,
                   dtype="float32", compress="lzw", model_scale=2, method="bilinear",
                   consistency=1)  # fmt: skip
    predict_raster(MS, model, tmp_path / "grouped.tif", model_scale=2, method="bilinear",
                   tiling_options=TilingOptions(tile=160, halo=32, blocksize=32),
                   output_options=OutputOptions(dtype="float32", compress="lzw"),
                   render_options=RenderOptions(consistency=1))  # fmt: skip
    assert_same_raster(tmp_path / "flat.tif", tmp_path / "grouped.tif")
    assert read(tmp_path / "grouped.tif")[2]["dtype"][0] == "float32"


def test_xarray_upsample_with_groups_equals_flat_keywords() -> None:
    lr = rioxarray.open_rasterio(MS, chunks={"x": 128, "y": 128})
    guide = rioxarray.open_rasterio(PAN, chunks={"x": 256, "y": 256})
    flat = gx.upsample(lr, guide, method="bilinear", **TILING, kind="continuous",
                       consistency=1)
    grouped = gx.upsample(lr, guide, method="bilinear", tiling_options=TilingOptions(**TILING),
                          render_options=RenderOptions(kind="continuous", consistency=1))
    assert flat.chunks == grouped.chunks and repr(flat.attrs) == repr(grouped.attrs)  # NaN
    np.testing.assert_array_equal(flat.values, grouped.values)
    with pytest.raises(InputError, match="upsample takes no workers .*it takes tile, halo, "
                                         "blocksize, aoi, aoi_crs: leave workers out"):
        gx.upsample(lr, guide, tiling_options=TilingOptions(workers=2))
