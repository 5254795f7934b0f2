"""Options the tiled commands share: the device, the render overrides, errors before any work."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

import geoupsample.backbones as gb
from geoupsample.cli import app
from geoupsample.core.kernels import parse_device, resolve_device
from geoupsample.core.self_guidance import robust_span
from geoupsample.pipeline import InputError
from geoupsample.segmentation import segment_raster
from geoupsample.workers import check_device

DATA = resources.files("geoupsample") / "data"
MS = str(DATA / "rotterdam_ms.tif")  # 4 bands, 300 x 300 at 1 m
PAN = str(DATA / "rotterdam_pan.tif")  # 1 band, 600 x 600 at 0.5 m: scale 2
LABELS = str(DATA / "rotterdam_labels.geojson")


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_device_names_are_checked() -> None:
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu")
    assert parse_device("cuda:1") == torch.device("cuda", 1)  # a name, not a request
    check_device("cuda", local=False)  # a cluster's workers may have the GPU the client lacks
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        check_device("gpu", local=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            check_device("cuda")


@pytest.mark.parametrize("command", ["features", "segment", "upsample"])
def test_bad_device_refused_before_any_work(tmp_path: Path, command: str) -> None:
    out = tmp_path / "out.tif"
    args = {"features": ["features", MS],
            "segment": ["segment", MS, "--labels", LABELS, "--class-field", "class"],
            "upsample": ["upsample", MS, PAN]}[command]  # fmt: skip
    code, text = cli(*args, "-o", out, "--device", "gpu")
    assert code == 2 and "device must be 'cpu', 'cuda' or 'cuda:N'" in text, text
    assert "tile" not in text  # no progress bar was started
    assert not out.exists()


def test_upsample_render_overrides(tmp_path: Path) -> None:
    fast = ["--iters", "2", "--tile", "256", "--halo", "32", "-q"]
    outs = {}
    for name, extra in {"default": [], "guided": ["--self-guidance", "0.5"],
                        "sharp": ["--min-sigma-r", "0", "--consistency", "0"]}.items():  # fmt: skip
        out = tmp_path / f"{name}.tif"
        code, text = cli("upsample", MS, PAN, "-o", out, *fast, *extra)
        assert code == 0, text
        with rasterio.open(out) as ds:
            outs[name] = (ds.read(), json.loads(ds.tags()["geoupsample_render"]))
    assert outs["sharp"][1] == {"kind": "continuous", "consistency": 0.0, "min_sigma_r": 0.0}
    guided = outs["guided"][1]
    assert guided["self_guidance"] == 0.5
    # one unit for the whole scene (its robust span), not one per tile, so that tiles agree
    with rasterio.open(MS) as ds:
        span = robust_span(torch.from_numpy(ds.read().astype(np.float32)))
    assert guided["self_guidance_scale"] == pytest.approx(span, rel=1e-6)
    for name in ("guided", "sharp"):
        assert np.abs(outs[name][0] - outs["default"][0]).max() > 1e-3, name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "bilinear", "--min-sigma-r", "0"], "only jbu and gsjbu use min_sigma_r"),
        (["--self-guidance", "-1"], "self_guidance must be a number >= 0"),
        (["--consistency", "nan"], "consistency must be a number >= 0"),
    ],
)
def test_upsample_bad_render_overrides(tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "bad.tif"
    code, text = cli("upsample", MS, PAN, "-o", out, "-q", *extra)
    assert code == 2 and message in text, text
    assert not out.exists()


def test_segment_sharp_render(tmp_path: Path) -> None:
    bb = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=8)
    common = dict(probs_dtype="float32", method="gsjbu", iters=2, tile=320, halo=0,
                  path="probabilities")
    probs = {}
    for name, render in {"default": {}, "sharp": dict(consistency=0, min_sigma_r=0)}.items():
        rep = segment_raster(MS, LABELS, "class", tmp_path / f"{name}.tif", bb,
                             probs_path=tmp_path / f"{name}_p.tif", **common, **render)  # fmt: skip
        with rasterio.open(rep.probs_path) as ds:
            probs[name] = ds.read()
        with rasterio.open(tmp_path / f"{name}.tif") as ds:
            tag = json.loads(ds.tags()["geoupsample_render"])
        assert tag["kind"] == "probabilities"
        assert {k: tag[k] for k in render} == {k: float(v) for k, v in render.items()}
    np.testing.assert_allclose(probs["sharp"].sum(0), 1.0, rtol=1e-4)
    assert np.abs(probs["sharp"] - probs["default"]).max() > 0.05
    with pytest.raises(InputError, match="only jbu and gsjbu use min_sigma_r"):
        segment_raster(MS, LABELS, "class", tmp_path / "x.tif", bb, method="bilinear",
                       min_sigma_r=0.0, path="probabilities")  # fmt: skip
    assert not (tmp_path / "x.tif").exists()


def test_features_consistency_is_a_number(tmp_path: Path) -> None:
    fast = ["--method", "bilinear", "--tile", "160", "--halo", "32", "-q"]
    code, text = cli("features", MS, "-o", tmp_path / "bad.tif", *fast, "--consistency", "-1")
    assert code == 2 and "consistency must be a number >= 0" in text, text
    assert not (tmp_path / "bad.tif").exists()
    code, text = cli("features", MS, "-o", tmp_path / "f.tif", *fast, "--consistency", "0.5")
    assert code == 0, text
    with rasterio.open(tmp_path / "f.tif") as ds:
        assert json.loads(ds.tags()["geoupsample_render"]) == {"consistency": 0.5}


def test_upsample_to_a_zarr_path_is_refused(tmp_path) -> None:
    code, text = cli("upsample", MS, PAN, "-o", tmp_path / "x.zarr", "-q")
    assert code == 2 and "upsample writes GeoTIFFs" in text, text
    assert not list(tmp_path.iterdir())
