"""What the CLI tells a user: Ctrl-C and how to continue, the fix for a probe applied to a scene
without band names, the help of options whose meaning differs between commands. On the bundled
Rotterdam scene (real GeoTIFFs)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import rasterio
import typer
from typer.testing import CliRunner

from geoupsample.cli import app
from geoupsample.segmentation import hidden_probs_path
from tiling.journal import journal_path

DATA = resources.files("geoupsample") / "data"
SCENE = str(DATA / "rotterdam_ms.tif")
PAN = str(DATA / "rotterdam_pan.tif")
LABELS = str(DATA / "rotterdam_labels.geojson")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--method", "bilinear", "--tile", "160", "--halo", "32", "-q"]


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _interrupt_after_first_band(proc: subprocess.Popen, journaled: str, timeout: float) -> None:
    """Send Ctrl-C (SIGINT) to ``proc`` once the resume journal of ``journaled`` records a
    finished row band."""
    jpath = journal_path(journaled)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(jpath) and len(Path(jpath).read_text().splitlines()) >= 2:
            break  # a header line, then one per finished band
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before it could be "
                        f"interrupted: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no row band was finished in time")
    proc.send_signal(signal.SIGINT)


@pytest.mark.parametrize("command", ["upsample", "features", "segment"])
def test_ctrl_c_says_how_to_continue(tmp_path: Path, command: str) -> None:
    """Ctrl-C in the middle of a run: one line saying it was interrupted and that the same
    command with --resume continues it, exit status 130 (it said nothing), the finished part
    kept beside the output and nothing at the output."""
    out = str(tmp_path / "o.tif")
    tiles = ["--tile", "64", "--halo", "16", "--blocksize", "32", "-q"]  # 5 row bands
    args, journaled = {
        "upsample": (["upsample", SCENE, PAN, "--iters", "2"], out),
        "features": (["features", SCENE, "--iters", "2"], out),
        "segment": (["segment", SCENE, "--labels", LABELS, "--class-field", "class",
                     "--iters", "2"], hidden_probs_path(out)),
    }[command]
    proc = subprocess.Popen([sys.executable, "-m", "geoupsample", *args, *tiles, "-o", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        _interrupt_after_first_band(proc, journaled, timeout=300)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted: the finished part of the output is kept; rerun the same command with "
        "--resume to continue"]
    assert not os.path.exists(out)
    assert os.path.exists(journal_path(journaled))  # what --resume continues from


def test_a_probe_on_a_scene_without_band_names_names_band_names(tmp_path: Path) -> None:
    """A probe fitted with the spectral backbone on the named scene (NDVI and NDWI among its
    36 features), applied to the same image without band descriptions: the backbone finds no
    red, green or nir band and gives 24 features; the error names --band-names, which fixes
    it (the same classes as on the named scene)."""
    probe, named = tmp_path / "p.st", tmp_path / "named.tif"
    code, text = cli("segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o",
                     named, "--save-probe", probe, *FAST)
    assert code == 0, text
    bare = tmp_path / "bare.tif"
    shutil.copy(SCENE, bare)
    with rasterio.open(bare, "r+") as ds:
        for i in range(1, ds.count + 1):
            ds.set_band_description(i, "")
    out = tmp_path / "o.tif"
    code, text = cli("segment", bare, "--probe", probe, "-o", out, *FAST)
    assert code == 2, text
    assert "fitted on 36 features but the spectral backbone gives 24" in text
    assert "no red, green or nir band among the scene's band names (band1, band2" in text
    assert "--band-names red,green,blue,nir" in text
    assert "Traceback" not in text and not out.exists()
    code, text = cli("segment", bare, "--probe", probe, "-o", out, "--band-names",
                     "red,green,blue,nir", *FAST)
    assert code == 0, text
    with rasterio.open(out) as a, rasterio.open(named) as b:
        assert (a.read() == b.read()).all()
    code, text = cli("segment", bare, "--probe", probe, "-o", tmp_path / "c0.tif",
                     "--band-names", "red,green,blue,nir", "--context", "0", *FAST)
    assert code == 2 and "fitted on 36 features" in text and "--band-names" not in text, text


def _help(command: str, option: str) -> str:
    """The help text of ``option`` of ``command``, as --help shows it (whatever the width)."""
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return next(p.help for p in params if option in p.opts)


def test_features_consistency_help_is_about_features() -> None:
    """features has no probabilities: its --consistency help says what the rounds do to
    features and gives their defaults, not the "1 for probabilities" of upsample and segment."""
    text = _help("features", "--consistency")
    assert "probabilities" not in text
    assert "features average back to the low-res features" in text
    assert "default 2 for gsjbu and jbu, 0 for the interpolations" in text
    assert "1 for probabilities" in _help("upsample", "--consistency")
    code, text = cli("features", "--help")
    assert code == 0 and "1 for probabilities" not in " ".join(text.split())


def test_the_cli_prints_warnings_as_one_clear_line(tmp_path):
    """A warning (an interrupted run discarded, values clipped...) reads ``warning: ...`` on
    stderr, not Python's ``file:line: Category: ...`` followed by a source line."""
    import subprocess
    import sys

    code = ("import warnings, geoupsample.cli as c\n"
            "warnings.showwarning = c.show_warning\n"
            "warnings.warn('out.tif: discarding an interrupted run (2 of 8 row bands)')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert res.stderr == "warning: out.tif: discarding an interrupted run (2 of 8 row bands)\n"


def test_halo_help_of_features_and_segment_is_about_them() -> None:
    """upsample's --halo help speaks of its interpolations' crop; features' and segment's of
    the backbone's context and the blended overlaps."""
    assert "interpolations" in _help("upsample", "--halo")
    for command in ("features", "segment"):
        text = _help(command, "--halo")
        assert "interpolations" not in text and "backbone" in text and "blended" in text


@pytest.mark.parametrize("command", ["upsample", "features", "segment", "predict", "demo"])
def test_every_scene_command_takes_threads(command: str) -> None:
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    assert any("--threads" in p.opts for p in params)


def _lowres_of(guide: str, out: Path, factor: int) -> None:
    """A low-res raster of ``guide``'s first band averaged over ``factor``² cells."""
    with rasterio.open(guide) as src:
        a = src.read(1).astype("float32")
        h, w = a.shape[0] // factor, a.shape[1] // factor
        lr = a[: h * factor, : w * factor].reshape(h, factor, w, factor).mean((1, 3))
        profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="float32",
                       crs=src.crs, transform=src.transform * src.transform.scale(factor))
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(lr, 1)


def test_a_fitted_scale_beyond_the_limit_is_refused_and_few_cells_warned(tmp_path) -> None:
    """x100 (3 x 3 cells of the 300 px pan-sized scene): jbu/gsjbu refused with the limit and
    the fix, nothing written; bilinear runs. x50 (6 x 6 cells): a warning, the run completes."""
    from geoupsample.grids import MAX_FITTED_SCALE

    lr100, lr50 = tmp_path / "lr100.tif", tmp_path / "lr50.tif"
    _lowres_of(SCENE, lr100, 100)
    _lowres_of(SCENE, lr50, 50)
    out = tmp_path / "o.tif"
    code, text = cli("upsample", lr100, SCENE, "-o", out, "--method", "gsjbu", "-q")
    assert code == 2, text
    assert f"up to {MAX_FITTED_SCALE} per axis" in text and "--method bilinear" in text
    assert not out.exists()
    code, text = cli("upsample", lr100, SCENE, "-o", out, "--method", "bilinear", "-q")
    assert code == 0 and out.exists(), text
    with pytest.warns(UserWarning, match="only 6 x 6 cells"):
        from geoupsample.pipeline import upsample_raster

        upsample_raster(str(lr50), SCENE, str(tmp_path / "j.tif"), method="jbu")
    assert (tmp_path / "j.tif").exists()


def test_segment_records_the_band_names_it_was_given(tmp_path) -> None:
    """--band-names on a file without band descriptions: the geoupsample_bands tag holds them,
    not band1..bandN; -m nearest records no self_guidance_scale (no range term)."""
    import json

    plain = tmp_path / "plain.tif"
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data)  # no descriptions
    out = tmp_path / "s.tif"
    code, text = cli("segment", plain, "--labels", LABELS, "--class-field", "class", "-o", out,
                     "--band-names", "red,green,blue,nir", "--cell-size", "10",
                     "--method", "nearest", "--path", "probabilities", "--tile", "160",
                     "--halo", "32", "--threads", "1", "-q")  # fmt: skip
    assert code == 0, text
    with rasterio.open(out) as ds:
        tags = ds.tags()
    assert json.loads(tags["geoupsample_bands"])["names"] == ["red", "green", "blue", "nir"]
    assert "self_guidance_scale" not in json.loads(tags["geoupsample_render"])


def test_warnings_point_at_the_callers_line(tmp_path) -> None:
    """A warning raised deep in the package (under the option groups' and threads' wrappers)
    names the caller's file, not the package's."""
    from geoupsample.pipeline import upsample_raster

    lr50 = tmp_path / "lr50.tif"
    _lowres_of(SCENE, lr50, 50)
    with pytest.warns(UserWarning, match="only 6 x 6 cells") as record:
        upsample_raster(str(lr50), SCENE, str(tmp_path / "j.tif"), method="jbu")
    assert [r.filename for r in record if "6 x 6" in str(r.message)] == [__file__]
