"""geoupsample.workers: several fits at once, each with its share of the cores."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from typer.testing import CliRunner

from geoupsample.cli import app
from geoupsample.pipeline import upsample_raster
from geoupsample.workers import available_cores, check_workers, threads_per_worker

DATA = files("geoupsample") / "data"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A real 64 x 64 (MS, 1 m) / 128 x 128 (pan, 0.5 m) crop of the bundled Rotterdam pair."""
    d = tmp_path_factory.mktemp("pair")
    out = []
    for name, win in (("rotterdam_ms", Window(100, 100, 64, 64)),
                      ("rotterdam_pan", Window(200, 200, 128, 128))):  # fmt: skip
        with rasterio.open(DATA / f"{name}.tif") as ds:
            prof = ds.profile
            prof.update(width=int(win.width), height=int(win.height),
                        transform=ds.window_transform(win), tiled=True, blockxsize=16,
                        blockysize=16)  # fmt: skip
            path = d / f"{name}.tif"
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(ds.read(window=win))
        out.append(str(path))
    return out


def test_threads_split_between_workers_and_restored_even_on_error():
    before = torch.get_num_threads()
    with threads_per_worker(2, "cpu"):
        assert torch.get_num_threads() == max(1, available_cores() // 2)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads_per_worker(4, "cpu"):
        raise RuntimeError("tile failed")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers, device", [(None, "cpu"), (1, "cpu"), (2, "cuda")])
def test_threads_untouched_for_one_worker_or_cuda(workers, device):
    before = torch.get_num_threads()
    with threads_per_worker(workers, device):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
        check_workers(bad)


def test_two_fits_at_once_give_the_same_raster(pair, tmp_path):
    lr, hr = pair
    before = torch.get_num_threads()
    outs = {}
    for workers in (1, 2):
        outs[workers] = str(tmp_path / f"w{workers}.tif")
        rep = upsample_raster(lr, hr, outs[workers], method="gsjbu", iters=5, tile=48, halo=16,
                              blocksize=16, workers=workers)  # fmt: skip
        assert rep.computed == rep.tiles > 2
    assert torch.get_num_threads() == before
    with rasterio.open(outs[1]) as a, rasterio.open(outs[2]) as b:
        x, y = a.read(), b.read()
    # other thread counts may sum in another order: equal to float32 rounding, not bit-identical
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3 * float(np.abs(x).max()))


def test_cli_workers_option(pair, tmp_path):
    lr, hr = pair
    out = str(tmp_path / "o.tif")
    base = ["upsample", lr, hr, "-o", out, "--method", "jbu", "--tile", "48", "--halo", "16",
            "--blocksize", "16", "--quiet"]  # fmt: skip
    bad = CliRunner().invoke(app, [*base, "--workers", "0"])
    assert bad.exit_code == 2 and "--workers" in bad.output
    ok = CliRunner().invoke(app, [*base, "--workers", "2"])
    assert ok.exit_code == 0, ok.output
    with rasterio.open(out) as ds:
        assert ds.count == 4 and ds.shape == (128, 128)


def test_workers_with_a_scheduler_and_a_bad_scheduler_address_are_clear_errors(pair, tmp_path):
    """--workers with --scheduler used to be ignored silently, and a malformed address gave
    "invalid literal for int()". Both now say what to pass; nothing is written."""
    lr, hr = pair
    base = ["upsample", lr, hr, "-o", str(tmp_path / "o.tif"), "-m", "bilinear", "-q"]
    both = CliRunner().invoke(app, [*base, "--scheduler", "tcp://127.0.0.1:8786",
                                    "--workers", "2"])
    assert both.exit_code == 2 and "cluster's worker threads" in both.output
    for cmd in (["features", hr, "-o", str(tmp_path / "f.tif"), "--backbone", "spectral"],
                ["segment", hr, "--probe", str(tmp_path / "p.json"), "-o",
                 str(tmp_path / "s.tif")]):  # fmt: skip
        res = CliRunner().invoke(app, [*cmd, "--scheduler", "tcp://127.0.0.1:8786",
                                       "--workers", "2", "-q"])
        assert res.exit_code == 2 and "cluster's worker threads" in res.output, res.output
    bad = CliRunner().invoke(app, [*base, "--scheduler", "localhost:8799x"])
    assert bad.exit_code == 2 and "cannot reach the dask scheduler" in bad.output
    assert "tcp://HOST:PORT" in bad.output
    # the failed client did not make itself dask's default scheduler (later computes hung)
    import dask
    from distributed.client import _get_global_client

    assert dask.config.get("scheduler", None) is None and _get_global_client() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_features_with_two_workers(pair, tmp_path):
    import geoupsample.backbones as gb
    from geoupsample.featuremaps import features_raster

    _, hr = pair
    bb = gb.create("spectral", cell_size=8)
    with pytest.raises(ValueError, match="workers must be"):
        features_raster(hr, tmp_path / "bad.tif", bb, workers=0)
    assert not (tmp_path / "bad.tif").exists()
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"f{workers}.tif")
        features_raster(hr, outs[-1], bb, method="gsjbu", iters=3, tile=48, halo=16,
                        blocksize=16, workers=workers)  # fmt: skip
    with rasterio.open(outs[0]) as a, rasterio.open(outs[1]) as b:
        x, y = a.read(), b.read()
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3 * float(np.nanmax(np.abs(x))))
