"""``segment`` from a few small polygons gives maps that follow the image (issue 27): agreement
with the index split the polygons were drawn from, on the bundled Rotterdam and NAIP scenes; the
feature path's arithmetic; the probe's cross-validation, its tags and its warnings."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.warp import transform_geom
from scipy import ndimage
from shapely.geometry import box, mapping
from typer.testing import CliRunner

import geoupsample as gu
import geoupsample.backbones as gb
from geoupsample.cli import app
from geoupsample.probe_selection import (
    PoorProbeWarning,
    select_probe,
    standard_error,
    temperature,
)
from geoupsample.segmentation import FeatureSegmentTile, plan_segment, segment_raster

DATA = resources.files("geoupsample") / "data"
ROTTERDAM = str(DATA / "rotterdam_ms.tif")
NAIP = str(DATA / "naip_20200831.tif")
SIZE = 6


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def index_split(path: str, a: str, b: str) -> tuple[np.ndarray, float]:
    """The normalised difference ``(a - b) / (a + b)`` of the named bands and Otsu's threshold."""
    with rasterio.open(path) as ds:
        names = [d.lower() for d in ds.descriptions]
        x = ds.read().astype(np.float64)
    idx = (x[names.index(a)] - x[names.index(b)]) / np.maximum(
        x[names.index(a)] + x[names.index(b)], 1e-9)
    h, edges = np.histogram(idx, 256)
    c = (edges[:-1] + edges[1:]) / 2
    w0, m0 = np.cumsum(h), np.cumsum(h * c)
    w1 = w0[-1] - w0
    between = np.where((w0 > 0) & (w1 > 0), (m0 / np.maximum(w0, 1) - (m0[-1] - m0)
                                              / np.maximum(w1, 1)) ** 2 * w0 * w1, 0)
    return idx, float(c[np.argmax(between)])


def squares_geojson(path: str, classes: np.ndarray, names: tuple[str, str], out: Path,
                    per_class: int = 12, seed: int = 0) -> Path:
    """``per_class`` squares of 6 x 6 px per class, at random among the windows wholly in one
    class of ``classes [H, W]`` (0/1), 12 px apart, as GeoJSON in lon/lat (property ``c``)."""
    with rasterio.open(path) as ds:
        t, crs = ds.transform, ds.crs
    rng = np.random.default_rng(seed)
    feats = []
    for k in (0, 1):
        whole = ndimage.minimum_filter((classes == k).astype(np.uint8), SIZE) > 0
        score = np.where(whole, rng.random(classes.shape), -np.inf)
        score[:SIZE] = score[-SIZE:] = score[:, :SIZE] = score[:, -SIZE:] = -np.inf
        for _ in range(per_class):
            y, x = np.unravel_index(np.argmax(score), score.shape)
            y0, x0 = int(y) - SIZE // 2, int(x) - SIZE // 2
            score[max(0, y - 12):y + 12, max(0, x - 12):x + 12] = -np.inf
            (ax, ay), (bx, by) = t * (x0, y0), t * (x0 + SIZE, y0 + SIZE)
            geom = transform_geom(crs, "EPSG:4326", mapping(box(ax, by, bx, ay)), precision=9)
            feats.append({"type": "Feature", "properties": {"c": names[k]}, "geometry": geom})
    out.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return out


@pytest.mark.parametrize("scene, bands, names", [
    (ROTTERDAM, ("nir", "red"), ("built", "vegetation")),
    (NAIP, ("green", "nir"), ("land", "water")),
])
def test_a_few_polygons_give_a_map_that_follows_the_image(tmp_path, scene, bands, names):
    """24 squares of 6 x 6 px drawn on clear vegetation/built (NDVI) or water/land (NDWI): the
    default command's map agrees with the index split on >= 90% of the pixels (measured 96 and
    99.7), the probability path's blobs of 8 px cells on fewer (measured 84 and 96)."""
    idx, t = index_split(scene, *bands)
    truth = (idx > t).astype(np.uint8)
    polys = squares_geojson(scene, truth, names, tmp_path / "squares.geojson")
    agreement = {}
    for path in ("features", "probabilities"):
        out = tmp_path / f"{path}.tif"
        code, text = cli("segment", scene, "--labels", polys, "--class-field", "c", "-o", out,
                         "--method", "bilinear", "--tile", "256", "--halo", "32",
                         *(["--path", "probabilities"] if path == "probabilities" else []))
        assert code == 0, text
        with rasterio.open(out) as ds:
            cls = ds.read(1)
            tags = ds.tags()
        assert tags["geoupsample_path"] == path
        assert float(tags["probe_balanced_accuracy"]) > 0.9
        agreement[path] = float((cls == truth).mean())
        assert "held-out accuracy" in text and "warning" not in text, text
    assert agreement["features"] >= 0.9, agreement
    assert agreement["features"] > agreement["probabilities"] + 0.02, agreement


def test_class_scores_upsample_as_the_features_would(tmp_path):
    """The feature path renders the cells' class scores, not the C features: the same numbers
    because the continuous render is linear in what it renders (fixed kernel weights,
    back-projection)."""
    with rasterio.open(ROTTERDAM) as ds:
        guide = ds.read()[:, :160, :160].astype(np.float32)
    bb = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=8)
    lr = bb.extract(guide)
    w = np.random.default_rng(0).normal(size=(3, lr.shape[0]))
    kw = dict(method="gsjbu", iters=3, kind="continuous", seed=0)
    features = np.asarray(gu.upsample(lr, guide, **kw), dtype=np.float64)
    scores = np.asarray(gu.upsample(np.einsum("kc,chw->khw", w, lr).astype(np.float32),
                                    guide, **kw), dtype=np.float64)
    direct = np.einsum("kc,chw->khw", w, features)
    np.testing.assert_allclose(scores, direct, atol=1e-3 * np.abs(direct).max())


def test_the_feature_path_job_applies_the_probe_to_every_pixels_features(tmp_path):
    """The tile job's probabilities equal the probe applied to the features it was trained on
    (the pixel's own and the cells' rendered at it)."""
    from geoupsample import labels as gl
    from geoupsample.scenes import Scene

    scene = Scene.open(ROTTERDAM)
    bb = gb.create("spectral", band_names=scene.band_names, cell_size=10)
    labels = gl.check_scene(gl.read_polygons(str(DATA / "rotterdam_labels.geojson"), "class"),
                            scene.transform, scene.shape, scene.crs)
    plan = plan_segment(scene, labels, bb, path="features", method="bilinear",
                        weight_decay=1e-3)
    job = plan.job
    assert isinstance(job, FeatureSegmentTile) and plan.probe.layout["path"] == "features"
    assert plan.probe.layout["pixel"] == 6  # red, green, blue, nir, ndvi, ndwi
    guide = scene.read(rasterio.windows.Window(0, 0, 160, 160))
    feats = job.pixel_features(guide)
    expected = plan.probe.predict_proba(feats.astype(np.float32))

    class Ctx:
        data = {"guide": guide}

    got = job(Ctx())  # type: ignore[arg-type]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cross_validation_prefers_the_simplest_of_the_best():
    """Candidates within one standard error of the best: the first (simplest) is taken; the
    standard error never falls to 0 when every fold scores 100%."""
    assert standard_error(np.ones(5), 1.0, 25) == pytest.approx(0.047, abs=0.001)
    assert standard_error(np.ones(5), 1.0, 400) < 0.01
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    signal = y + 0.1 * rng.normal(size=n)  # separates the classes alone
    noise = rng.normal(size=(n, 5))
    x = np.c_[signal, noise]
    frac = np.eye(2)[y]
    groups = np.arange(n) // 10
    probe, cv = select_probe(x, frac, groups, ["a", "b"],
                             feature_sets={"signal": np.array([0]), "all": np.arange(6)})
    assert cv.feature_set == "signal" and cv.weight_decay == 1.0  # simplest, strongest
    assert cv.balanced_accuracy == 1.0 and cv.folds == 5 and not cv.poor
    assert probe.weight is not None and probe.weight.shape == (2, 6)
    assert float(probe.weight[:, 1:].abs().max()) == 0.0  # the other columns are unused
    # strong regularisation leaves flat probabilities: the temperature sharpens them
    assert cv.temperature > 1
    p = probe.predict_proba(x.T[:, :, None].astype(np.float32))[:, :, 0].T
    assert (p.argmax(1) == y).mean() > 0.99 and np.median(p.max(1)) > 0.9


def test_temperature_fits_the_held_out_probabilities():
    """Right but timid predictions are sharpened (T > 1), confident mistakes softened (T < 1)."""
    target = np.eye(2)[np.r_[np.zeros(50, int), np.ones(50, int)]]
    timid = np.where(target > 0, 0.6, 0.4)
    weight = np.ones(100)
    assert temperature(timid, target, weight) > 4
    brash = np.where(target > 0, 0.99, 0.01)
    brash[:30] = brash[:30, ::-1]  # 30% confidently wrong
    assert temperature(brash, target, weight) < 0.5


def test_poor_or_untested_probes_are_warned_about(tmp_path):
    """Classes drawn at random over the image: the held-out accuracy is poor, said in the
    output's tags and the command's output; a single polygon per class cannot be tested."""
    with rasterio.open(ROTTERDAM) as ds:
        shape = ds.shape
    rng = np.random.default_rng(3)
    random_classes = (rng.random((shape[0] // 12, shape[1] // 12)) > 0.5).repeat(12, 0).repeat(
        12, 1)
    random_classes = np.pad(random_classes, ((0, shape[0] - random_classes.shape[0]),
                                             (0, shape[1] - random_classes.shape[1])))
    polys = squares_geojson(ROTTERDAM, random_classes.astype(np.uint8), ("x", "y"),
                            tmp_path / "random.geojson", per_class=10)
    out = tmp_path / "random.tif"
    code, text = cli("segment", ROTTERDAM, "--labels", polys, "--class-field", "c", "-o", out,
                     "--method", "bilinear", "--tile", "160", "--halo", "32")
    assert code == 0, text
    assert "warning: poor held-out accuracy" in text, text
    with rasterio.open(out) as ds:
        tags = ds.tags()
    assert float(tags["probe_balanced_accuracy"]) < 0.8
    assert tags["probe_warning"].startswith("poor held-out accuracy")
    assert json.loads(tags["probe_cv"])["folds"] == 5
    bb = gb.create("spectral", band_names=("red", "green", "blue", "nir"), cell_size=10)
    two = json.loads(polys.read_text())
    two["features"] = [two["features"][0], two["features"][-1]]
    (tmp_path / "two.geojson").write_text(json.dumps(two))
    with pytest.warns(PoorProbeWarning, match="could not be tested"):
        rep = segment_raster(ROTTERDAM, tmp_path / "two.geojson", "c", tmp_path / "two.tif", bb,
                             method="bilinear", tile=160, halo=32)
    assert rep.cv is not None and rep.cv.balanced_accuracy is None


def test_path_options_and_saved_probes(tmp_path):
    """A probe saved on the feature path applies with it (the same classes) and is refused on
    the other; the probabilities' render options are refused on the feature path."""
    labels = str(DATA / "rotterdam_labels.geojson")
    fast = ["--method", "bilinear", "--tile", "160", "--halo", "32", "-q", "--cell-size", "10"]
    code, text = cli("segment", ROTTERDAM, "--labels", labels, "--class-field", "class", "-o",
                     tmp_path / "a.tif", "--save-probe", tmp_path / "p.st", *fast)
    assert code == 0, text
    code, text = cli("segment", ROTTERDAM, "--probe", tmp_path / "p.st", "-o",
                     tmp_path / "b.tif", *fast)
    assert code == 0, text
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert b.tags()["geoupsample_path"] == "features"
        assert b.tags()["probe_accuracy"] == a.tags()["probe_accuracy"]
    code, text = cli("segment", ROTTERDAM, "--probe", tmp_path / "p.st", "-o",
                     tmp_path / "c.tif", "--path", "probabilities", *fast)
    assert code == 2 and "fitted for path features" in text, text
    code, text = cli("segment", ROTTERDAM, "--labels", labels, "--class-field", "class", "-o",
                     tmp_path / "d.tif", "--min-sigma-r", "0", "--method", "gsjbu", "-q")
    assert code == 2 and "--path probabilities" in text, text
    code, text = cli("segment", ROTTERDAM, "--labels", labels, "--class-field", "class", "-o",
                     tmp_path / "d.tif", "--path", "pixels", "-q")
    assert code == 2 and "pixels" in text, text
    assert torch.get_num_threads() >= 1


def test_a_scene_without_band_names_gets_a_note(tmp_path):
    """Without band descriptions (and no --band-names) spectral computes no index: the command
    says so and how to fix it."""
    import shutil

    bare = tmp_path / "bare.tif"
    shutil.copy(ROTTERDAM, bare)
    with rasterio.open(bare, "r+") as ds:
        for i in range(1, ds.count + 1):
            ds.set_band_description(i, "")
    code, text = cli("segment", bare, "--labels", str(DATA / "rotterdam_labels.geojson"),
                     "--class-field", "class", "-o", tmp_path / "o.tif", "--method", "bilinear",
                     "--cell-size", "10", "--tile", "160", "--halo", "32")
    assert code == 0, text
    assert "note: the spectral backbone computed no NDVI" in text
    assert "--band-names red,green,blue,nir" in text


def test_touching_polygons_of_different_classes_are_separate_groups():
    """A densely labelled area (two classes side by side, one class touching itself only at a
    corner) gives one group per class region, not one group for the whole area."""
    from geoupsample.probe_selection import label_groups

    lab = np.zeros((6, 6), dtype=np.int64)
    lab[:3, :3] = 1
    lab[:3, 3:] = 2  # touches class 1 along an edge
    lab[3:, 3:] = 1  # touches the first class-1 square at a corner only: 8-connected to it
    ids, n = label_groups(lab, offset=10)
    assert n == 2  # class 1: one region (the corner connects it); class 2: one
    assert set(np.unique(ids[lab == 2])) != set(np.unique(ids[lab == 1]))
    assert (ids[lab == 0] == -1).all() and ids[lab > 0].min() == 10
    mask_ids, mask_n = label_groups(lab > 0)  # a bool mask: connected labelled regions
    assert mask_n == 1 and (mask_ids[lab > 0] == 0).all()


def test_a_poor_best_candidate_is_chosen_over_a_simpler_one():
    """Where no candidate separates the classes well (best balanced accuracy below 80%), the
    best candidate wins, not the simplest within one (wide) standard error; where one does,
    the simplest within one standard error wins."""
    from geoupsample.probe_selection import select_probe

    rng = np.random.default_rng(0)
    n_groups, per = 40, 30
    groups = np.repeat(np.arange(n_groups), per)
    truth = np.repeat(rng.permutation(np.arange(n_groups) % 4), per)  # 4 classes, 10 regions
    y = np.eye(4)[truth]
    noise = rng.normal(size=(len(truth), 6))
    weak = noise[:, :1] + 0.3 * truth[:, None]  # one column: a little signal
    strong = noise[:, 1:] + 0.6 * np.eye(4)[truth][:, [0, 1, 2, 3, 0]]  # more columns, more
    x = np.concatenate([weak, strong], axis=1)
    sets = {"weak": np.arange(1), "all": np.arange(6)}
    probe, cv = select_probe(x, y, groups, ["a", "b", "c", "d"], feature_sets=sets)
    assert max(cv.scores.values()) < 0.8
    assert cv.feature_set == "all", cv.summary()
    easy = noise + 8.0 * np.eye(4)[truth][:, [0, 1, 2, 3, 0, 1]]
    probe, cv = select_probe(easy, y, groups, ["a", "b", "c", "d"], feature_sets=sets)
    assert max(cv.scores.values()) >= 0.8
    best = max(cv.scores.values())
    tied = [k for k, v in cv.scores.items() if v == best]
    assert cv.weight_decay > min(float(k.rsplit(" ", 1)[1]) for k in tied), cv.summary()
