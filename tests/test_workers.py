"""geoupsample.workers: several fits at once, each with its share of the cores."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window
from typer.testing import CliRunner

from geoupsample.cli import app
from geoupsample.pipeline import upsample_raster
from geoupsample.workers import (
    available_cores,
    cgroup_cpu_quota,
    check_threads,
    check_workers,
    cpu_threads,
    threads_per_worker,
)

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


@pytest.mark.parametrize("workers", [None, 1])
def test_one_worker_gets_every_usable_cpu_and_cuda_is_untouched(workers):
    before = torch.get_num_threads()
    with threads_per_worker(workers, "cpu"):
        assert torch.get_num_threads() == available_cores()
    with threads_per_worker(2, "cuda"):
        assert torch.get_num_threads() == before
    with threads_per_worker(2, "cuda", threads=1):  # an explicit count applies anyway
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_threads_override_the_default_and_set_compression_threads():
    from tiling.writer import OutputSpec

    before = torch.get_num_threads()
    spec = OutputSpec("x.tif", crs="EPSG:32631", transform=Affine.identity(), width=8,
                      height=8, count=1, dtype="float32")  # fmt: skip
    assert spec.compress_threads == "ALL_CPUS"
    with threads_per_worker(None, "cpu", threads=1):
        assert torch.get_num_threads() == 1 and spec.compress_threads == "1"
    with cpu_threads(1), threads_per_worker(2, "cpu"):  # the CLI's --threads, then the run's
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and spec.compress_threads == "ALL_CPUS"
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        check_threads(0)


@pytest.mark.parametrize("files_, expected", [
    ({"cpu.max": "250000 100000"}, 2.5),  # cgroup v2, a quota of 2.5 CPUs
    ({"cpu.max": "max 100000"}, None),  # v2, unlimited
    ({"cpu/cpu.cfs_quota_us": "150000", "cpu/cpu.cfs_period_us": "100000"}, 1.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1, unlimited
    ({}, None),
])  # fmt: skip
def test_cgroup_cpu_quota(tmp_path, files_, expected):
    for name, text in files_.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert cgroup_cpu_quota(str(tmp_path)) == expected


def test_available_cores_is_capped_by_the_quota(tmp_path, monkeypatch):
    import geoupsample.workers as workers

    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    monkeypatch.setattr(workers, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(workers, "_cgroup_dirs", lambda root: [root])
    assert workers.available_cores() == 1


def test_cli_threads_option(pair, tmp_path):
    lr, hr = pair
    before = torch.get_num_threads()
    out = str(tmp_path / "o.tif")
    base = ["upsample", lr, hr, "-o", out, "--method", "gsjbu", "--iters", "3", "--tile", "48",
            "--halo", "16", "--blocksize", "16", "--quiet"]  # fmt: skip
    bad = CliRunner().invoke(app, [*base, "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output
    ok = CliRunner().invoke(app, [*base, "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert torch.get_num_threads() == before
    ref = str(tmp_path / "ref.tif")
    upsample_raster(lr, hr, ref, method="gsjbu", iters=3, tile=48, halo=16, blocksize=16,
                    threads=1)  # fmt: skip
    with rasterio.open(out) as a, rasterio.open(ref) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    with pytest.raises(ValueError, match="threads must be"):
        upsample_raster(lr, hr, str(tmp_path / "x.tif"), threads=0)


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


def test_a_fit_keeps_the_thread_count_it_was_given_in_a_fresh_process():
    """Numba's OpenMP layer shares the OpenMP runtime with torch: starting it (at the first
    kernel of a process) used to set torch's count back to every core, so ``--threads 1`` ran
    its fits on all of them after the first."""
    import subprocess
    import sys

    code = ("import numpy as np, torch, numba, geoupsample as gu\n"
            "torch.set_num_threads(1)\n"
            "g = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)\n"
            "k = gu.fit(g, (16, 16), iters=3)\n"
            "k.render(g[:1, ::4, ::4])\n"
            "print(torch.get_num_threads(), numba.get_num_threads())\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["1", "1"], out.stdout + out.stderr


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_wait_passively_unless_told_otherwise(given):
    """``import geoupsample`` sets OMP_WAIT_POLICY=PASSIVE before torch loads GNU OpenMP (two
    runs side by side: 36.1 s each against 55.4 s spinning), and leaves a policy the user set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import sys, os, geoupsample\n"
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)  # fmt: skip
    assert out.stdout.split() == [given or "PASSIVE", "True"], out.stdout + out.stderr
