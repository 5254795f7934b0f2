"""The features' PCA: fitted on the whole scene whatever the AOI (adjacent AOIs mosaic), saved
and reused across runs and scenes, its components' signs fixed by a rule."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import rasterio
from shapely.geometry import box
from typer.testing import CliRunner

import geoupsample.backbones as gb
from geoupsample.cli import app
from geoupsample.featuremaps import features_raster
from geoupsample.inputs import InputError
from geoupsample.pca import PCA

SCENE = str(resources.files("geoupsample") / "data" / "rotterdam_ms.tif")
RUN = dict(method="bilinear", tile=128, halo=16, blocksize=16)


def read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.fixture(scope="module")
def spectral():
    return gb.create("spectral", cell_size=8)


def test_adjacent_aois_share_the_whole_scenes_pca(tmp_path, spectral) -> None:
    """Each AOI's run projects with the PCA of the whole scene: its pixels are the whole run's,
    so adjacent AOIs mosaic (their PCA used to be fitted on their own windows)."""
    with rasterio.open(SCENE) as ds:
        b = ds.bounds
    mid = (b.left + b.right) / 2
    whole = tmp_path / "whole.tif"
    features_raster(SCENE, whole, spectral, pca=3, **RUN)
    full = read(whole)
    for name, area, cols in (("west", box(b.left, b.bottom, mid, b.top), np.s_[:, :, :140]),
                             ("east", box(mid, b.bottom, b.right, b.top), np.s_[:, :, 160:])):
        out = tmp_path / f"{name}.tif"
        features_raster(SCENE, out, spectral, pca=3, aoi=area, aoi_crs="EPSG:32631", **RUN)
        part = read(out)
        np.testing.assert_allclose(part[cols], full[cols], rtol=1e-5, atol=1e-5)
        with rasterio.open(out) as ds:
            assert ds.tags()["geoupsample_pca_fitted_on"] == "rotterdam_ms.tif"


def features_cli(scene, out, *options: str) -> None:
    result = CliRunner().invoke(app, ["features", str(scene), "-o", str(out), "--backbone",
                                      "spectral", "--cell-size", "8", "-m", "bilinear",
                                      "--tile", "128", "--halo", "16", "--blocksize", "16", "-q",
                                      *options])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_saved_pca_projects_another_run_the_same_way(tmp_path) -> None:
    first, saved = tmp_path / "a.tif", tmp_path / "pca.json"
    features_cli(SCENE, first, "--pca", "4", "--save-pca", str(saved))
    state = json.loads(saved.read_text())
    assert state["format"] == PCA.FORMAT and len(state["components"]) == 4
    assert "ndvi" in state["about"]["backbone"]
    # another scene: a crop of this one, projected with the saved PCA, not its own
    crop = tmp_path / "crop.tif"
    with rasterio.open(SCENE) as ds:
        win = rasterio.windows.Window(64, 64, 160, 160)
        prof = {**ds.profile, "width": 160, "height": 160, "transform": ds.window_transform(win),
                "blockxsize": 16, "blockysize": 16}
        with rasterio.open(crop, "w", **prof) as out:
            out.write(ds.read(window=win))
            out.descriptions = ds.descriptions
    own, reused, raw = (tmp_path / f"{n}.tif" for n in ("own", "reused", "raw"))
    features_cli(crop, own, "--pca", "4")
    features_cli(crop, reused, "--pca", str(saved))
    features_cli(crop, raw)
    # the crop's own features projected with the saved components (bilinear upsampling and
    # the affine projection commute), not with a PCA of its own
    expected = PCA.load(saved).transform(read(raw))
    np.testing.assert_allclose(read(reused), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(read(own), read(reused), atol=1e-2)


def test_a_pca_of_other_features_is_refused(tmp_path, spectral) -> None:
    saved = tmp_path / "pca.json"
    features_raster(SCENE, tmp_path / "a.tif", spectral, pca=3, save_pca=saved, **RUN)
    other = gb.create("spectral", cell_size=8, context=0)  # fewer features
    with pytest.raises(InputError, match="fitted on 24 features of SpectralBackbone.*this "
                       "run's backbone gives 12"):
        features_raster(SCENE, tmp_path / "b.tif", other, pca=saved, **RUN)
    assert not (tmp_path / "b.tif").exists()
    with pytest.raises(InputError, match="does not exist.*--save-pca"):
        features_raster(SCENE, tmp_path / "c.tif", spectral, pca=tmp_path / "none.json", **RUN)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not a geoupsample PCA file"):
        PCA.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="--save-pca needs a PCA"):
        features_raster(SCENE, tmp_path / "d.tif", spectral, save_pca=saved, **RUN)


def test_component_signs_follow_a_rule() -> None:
    """Each component's largest loading is positive, whatever the SVD returned: two samples of
    one distribution, and a sample and its mirror image, give components of the same signs."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(5, 5))
    a = rng.normal(size=(4000, 5)) @ mix
    b = rng.normal(size=(4000, 5)) @ mix
    pa, pb = PCA.fit(a, 3), PCA.fit(b, 3)
    for p in (pa, pb):
        peak = np.abs(p.components).argmax(1)
        assert (p.components[np.arange(3), peak] > 0).all()
    assert (np.sign(pa.components) == np.sign(pb.components))[np.abs(pa.components) > 0.2].all()
    np.testing.assert_allclose(PCA.fit(-a, 3).components, pa.components, atol=1e-9)
