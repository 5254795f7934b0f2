"""The linear probe on real features of the Rotterdam scene under the bundled polygon labels."""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import geoupsample.backbones as gb
import geoupsample.labels as gl
from geoupsample.heads import HeadError, LinearProbe

DATA = resources.files("geoupsample") / "data"
CELL = 10


@pytest.fixture(scope="module")
def scene() -> dict:
    """Raw MS image, spectral features and soft labels on the 30 x 30 LR grid (10 m cells)."""
    with rasterio.open(str(DATA / "rotterdam_ms.tif")) as src:
        ms, transform, shape, crs, names = (
            src.read(),
            src.transform,
            src.shape,
            src.crs,
            src.descriptions,
        )
    labels = gl.check_scene(
        gl.read_polygons(str(DATA / "rotterdam_labels.geojson"), "class"), transform, shape, crs
    )
    lr_t, lr_shape = gl.lr_grid(transform, shape, CELL)
    features = gb.create("spectral", band_names=names, cell_size=CELL).extract(ms)
    fractions = gl.rasterize_fractions(labels, lr_t, lr_shape, supersample=CELL)
    return dict(
        ms=ms,
        transform=transform,
        labels=labels,
        lr=(lr_t, lr_shape),
        features=features,
        fractions=fractions,
    )


def test_probe_learns_the_classes_and_generalises(scene: dict) -> None:
    labels, (lr_t, lr_shape) = scene["labels"], scene["lr"]
    halves = []
    for parity in (0, 1):  # split by polygon: train on even features, test on odd ones
        keep = [i for i in range(len(labels)) if i % 2 == parity]
        part = gl.from_geometries(
            [labels.geometries[i] for i in keep],
            [labels.labels[i] for i in keep],
            labels.crs,
            classes=labels.classes,
        )
        halves.append(gl.rasterize_fractions(part, lr_t, lr_shape, supersample=CELL))
    probe = LinearProbe(class_weight="balanced").fit(
        scene["features"], halves[0], classes=labels.classes
    )
    proba = probe.predict_proba(scene["features"])
    assert proba.shape == (3, 30, 30) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(0), 1.0, rtol=1e-5)
    pred = probe.predict(scene["features"])
    for fr, floor in ((halves[0], 0.9), (halves[1], 0.75)):
        mostly = fr.sum(0) > 0.5
        acc = (pred[mostly] == fr.argmax(0)[mostly]).mean()
        assert acc > floor, acc
    assert set(np.unique(pred)) == {0, 1, 2}


def test_fit_is_deterministic(scene: dict) -> None:
    a = LinearProbe(max_samples=300, seed=3).fit(scene["features"], scene["fractions"])
    b = LinearProbe(max_samples=300, seed=3).fit(scene["features"], scene["fractions"])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.n_samples == 300 and a.classes == ("0", "1", "2")


def test_soft_labels_and_coverage_weights() -> None:
    """Uninformative features + huge decay: the probe returns the coverage-weighted prior."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 10, 10)).astype(np.float32)
    frac = np.zeros((2, 10, 10), dtype=np.float32)
    frac[0, :4] = 1.0  # 40 cells fully class 0
    frac[1, 4:] = 0.3  # 60 cells, 30 % labelled class 1
    frac[:, 9, :] = [[0.25], [0.75]]  # 10 mixed cells (overrides part of the above)
    probe = LinearProbe(weight_decay=1e4).fit(feats, frac)
    p = probe.predict_proba(feats)
    w0 = 40 * 1.0
    w1 = 50 * 0.3
    wm = 10 * 1.0
    expected = (w0 + 0.25 * wm) / (w0 + w1 + wm)
    np.testing.assert_allclose(p[0], expected, atol=2e-3)


def test_timm_features_batches_torch_and_nodata(scene: dict) -> None:
    ms = scene["ms"].astype(np.float32)
    tile = ms[:, :288, :288] / np.percentile(ms, 99, axis=(1, 2))[:, None, None]
    bb = gb.create("timm:resnet18", in_chans=4, layer=2, random_init=True)
    assert bb.stride == 8
    feats = bb.extract(torch.from_numpy(tile.copy()))  # [128, 36, 36]
    t8, _ = gl.lr_grid(scene["transform"], (288, 288), 8)
    frac = gl.rasterize_fractions(scene["labels"], t8, (36, 36), supersample=8)
    quads = [feats[:, :18, :18], feats[:, 18:, 18:]]
    fquads = [frac[:, :18, :18], frac[:, 18:, 18:]]
    probe = LinearProbe(max_iter=30).fit(quads, fquads, classes=scene["labels"].classes)
    batch = torch.stack([feats, feats.flip(-1)])
    p = probe.predict_proba(batch)
    assert isinstance(p, torch.Tensor) and p.shape == (2, 3, 36, 36)
    torch.testing.assert_close(p[0], probe.predict_proba(feats))
    holes = feats.clone()
    holes[:, 0, 0] = float("nan")
    p = probe.predict_proba(holes)
    assert torch.isnan(p[:, 0, 0]).all() and torch.isfinite(p[:, 1:]).all()
    for cls in (probe.predict(holes), torch.from_numpy(probe.predict(holes.numpy()))):
        assert cls[0, 0] == -1 and (cls.flatten()[1:] >= 0).all()  # missing, not class 0
    refit = LinearProbe(max_iter=5).fit(holes, frac)  # the NaN cell is left out of the fit
    assert refit.n_samples == int((frac.sum(0) > 1e-9).sum()) - int(frac[:, 0, 0].sum() > 1e-9)


def test_save_and_load(tmp_path: Path, scene: dict) -> None:
    probe = LinearProbe(weight_decay=0.01).fit(
        scene["features"], scene["fractions"], classes=scene["labels"].classes
    )
    path = probe.save(tmp_path / "probe.safetensors")
    back = LinearProbe.load(path)
    assert back.classes == probe.classes and back.weight_decay == 0.01
    np.testing.assert_array_equal(
        back.predict_proba(scene["features"]), probe.predict_proba(scene["features"])
    )


def test_a_class_labelled_over_less_than_a_cell_is_warned_about(scene: dict) -> None:
    """A class whose only polygon covers a tenth of a cell trained silently and was never
    predicted; now the fit warns, naming it with its coverage. The other classes do not."""
    feats, frac = scene["features"], scene["fractions"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real labels: every class well covered, no warning
        LinearProbe().fit(feats, frac, classes=["a", "b", "c"])
    tiny = np.zeros_like(frac[:1])
    tiny[0, 10, 10] = 0.1
    frac = np.concatenate([frac, tiny])
    frac[:3, 10, 10] *= 0.9
    with pytest.warns(UserWarning, match=r"less than 1 low-res cell.*: d \(0\.1\); too little"):
        LinearProbe().fit(feats, frac, classes=["a", "b", "c", "d"])
    # coverage counts over every labelled cell, not the max_samples drawn for the fit: a class
    # of 1.5 cells in all is not scarce even where the sample holds a fraction of it
    spread = np.zeros_like(frac[:1])
    spread[0, 20, 5:10] = 0.3
    frac[3] = spread[0]
    frac[:3, 20, 5:10] *= 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinearProbe(max_samples=100).fit(feats, frac, classes=["a", "b", "c", "d"])


def test_errors(tmp_path: Path, scene: dict) -> None:
    feats, frac = scene["features"], scene["fractions"]
    with pytest.raises(HeadError, match="not fitted"):
        LinearProbe().predict_proba(feats)
    one = frac.copy()
    one[1:] = 0
    with pytest.raises(HeadError, match="cover 1 class.*at least two"):
        LinearProbe().fit(feats, one)
    with pytest.raises(HeadError, match="features give 900 cells but fractions 225"):
        LinearProbe().fit(feats, frac[:, :15, :15])
    with pytest.raises(HeadError, match="2 class names for 3"):
        LinearProbe().fit(feats, frac, classes=["a", "b"])
    probe = LinearProbe().fit(feats, frac)
    with pytest.raises(HeadError, match="fitted on 36 feature channels, got 6"):
        probe.predict_proba(feats[:6])
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"nope")
    with pytest.raises(HeadError, match="cannot read"):
        LinearProbe.load(bogus)
