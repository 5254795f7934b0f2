"""geoupsample.xarray.features and .segment take the CLI's options with the CLI's meanings:
``bands=`` chooses the scene's bands (``--bands``), ``model_bands=`` those a timm model sees
(``--model-bands``), ``layer=`` is the backbone's layer (``--layer``) and ``labels_layer=`` the
labels file's (``--labels-layer``); the results equal the CLI's files pixel for pixel (bundled
Rotterdam scene, timm resnet18 with random weights) and carry the same tags."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rioxarray
from typer.testing import CliRunner

import geoupsample.backbones as gb
from geoupsample.cli import app
from geoupsample.labels import LabelError
from geoupsample.pipeline import InputError
from geoupsample.xarray import features, segment

DATA = resources.files("geoupsample") / "data"
SCENE = str(DATA / "rotterdam_ms.tif")
LABELS = str(DATA / "rotterdam_labels.geojson")
RGB = ["red", "green", "blue"]
SMALL = dict(tile=64, halo=16, blocksize=32)  # 5 x 5 tiles on the 300 x 300 scene
SMALL_CLI = ["--tile", "64", "--halo", "16", "--blocksize", "32", "-q"]
RESNET_CLI = ["--backbone", "timm:resnet18", "--random-init", "--layer", "2"]
RESNET = dict(random_init=True, layer=2)  # with "timm:resnet18": stride 8, 128 channels


def cli(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def written(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    with rasterio.open(path) as ds:
        return ds.read(), ds.tags()


@pytest.fixture(scope="module")
def scene():
    return rioxarray.open_rasterio(SCENE, chunks={"x": 128, "y": 128})


def test_features_bands_choose_the_scenes_bands_as_the_cli_does(tmp_path, scene) -> None:
    """``bands=`` is ``--bands``: the guide and the backbone's input, by name or number (the
    README's example: it was the timm model's bands, ``--model-bands``, 4-band guide)."""
    out = tmp_path / "cli.tif"
    run = ["--pca", "3", "--method", "gsjbu", "--iters", "3", *SMALL_CLI]
    cli("features", SCENE, "-o", out, *RESNET_CLI, "--bands", "red,green,blue", *run)
    ref, tags = written(out)
    lazy = features(scene, "timm:resnet18", bands=RGB, pca=3, method="gsjbu", iters=3,
                    **RESNET, **SMALL)
    np.testing.assert_array_equal(lazy.values, ref)
    assert json.loads(tags["geoupsample_bands"]) == {"indexes": [1, 2, 3], "names": RGB}
    for key in ("geoupsample_bands", "geoupsample_backbone", "geoupsample_render"):
        assert lazy.attrs[key] == tags[key], key
    rgb = gb.create("timm:resnet18", band_names=RGB, **RESNET)
    assert tags["geoupsample_backbone"] == rgb.extra_repr()  # no extra quotes
    assert "bands=None" in tags["geoupsample_backbone"]  # the model sees the 3 chosen bands
    by_number = features(scene, "timm:resnet18", bands=[1, "2", 3], pca=3, method="gsjbu",
                         iters=3, **RESNET, **SMALL)
    assert by_number.attrs["geoupsample_bands"] == tags["geoupsample_bands"]
    np.testing.assert_array_equal(by_number[:, :96, :96].values, ref[:, :96, :96])
    # what bands= meant before: the model's bands, the 4-band scene as the guide
    fed = features(scene, "timm:resnet18", model_bands=RGB, pca=3, method="gsjbu", iters=3,
                   **RESNET, **SMALL)
    assert np.nanmax(np.abs(fed.values - ref)) > 0.1


def test_features_model_bands_are_the_clis_model_bands(tmp_path, scene) -> None:
    """``model_bands=`` is ``--model-bands`` (names or 1-based indexes among the chosen bands):
    the model sees them, the guide keeps all the chosen bands."""
    out = tmp_path / "cli.tif"
    cli("features", SCENE, "-o", out, *RESNET_CLI, "--model-bands", "red,green,blue",
        "--method", "bilinear", *SMALL_CLI)
    ref, tags = written(out)
    fed = features(scene, "timm:resnet18", model_bands=RGB, method="bilinear", **RESNET,
                   **SMALL)
    np.testing.assert_array_equal(fed.values, ref)
    assert fed.attrs["geoupsample_backbone"] == tags["geoupsample_backbone"]
    assert "bands=[0, 1, 2]" in tags["geoupsample_backbone"]
    assert json.loads(tags["geoupsample_bands"])["names"] == ["red", "green", "blue", "nir"]
    assert fed.attrs["geoupsample_bands"] == tags["geoupsample_bands"]
    by_index = features(scene, "timm:resnet18", model_bands=[1, 2, 3], method="bilinear",
                        **RESNET, **SMALL)
    np.testing.assert_array_equal(by_index.values, ref)


def test_segment_layer_is_the_backbones_layer_as_in_the_cli(tmp_path, scene) -> None:
    out = tmp_path / "cli.tif"
    cli("segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o", out, *RESNET_CLI,
        "--method", "bilinear", *SMALL_CLI)
    ref, tags = written(out)
    lazy = segment(scene, LABELS, "class", "timm:resnet18", method="bilinear", **RESNET,
                   **SMALL)
    np.testing.assert_array_equal(lazy.values, ref)
    assert lazy.attrs["geoupsample_backbone"] == tags["geoupsample_backbone"]
    assert "layer=2" in tags["geoupsample_backbone"] and "stride=8" in tags["geoupsample_backbone"]
    assert lazy.attrs["class_names"] == tags["class_names"]
    assert json.loads(lazy.attrs["geoupsample_bands"]) == {
        "indexes": [1, 2, 3, 4], "names": ["red", "green", "blue", "nir"]}
    assert lazy.attrs["geoupsample_bands"] == tags["geoupsample_bands"]  # the CLI records it


def test_segment_bands_choose_the_scenes_bands_as_the_cli_does(tmp_path, scene) -> None:
    out = tmp_path / "cli.tif"
    cli("segment", SCENE, "--labels", LABELS, "--class-field", "class", "-o", out,
        "--bands", "nir,red", "--cell-size", "10", "--method", "bilinear", *SMALL_CLI)
    ref, tags = written(out)
    lazy = segment(scene, LABELS, "class", bands=["NIR", 1], cell_size=10, method="bilinear",
                   **SMALL)
    np.testing.assert_array_equal(lazy.values, ref)
    assert lazy.attrs["geoupsample_bands"] == tags["geoupsample_bands"]
    assert json.loads(lazy.attrs["geoupsample_bands"]) == {"indexes": [4, 1],
                                                           "names": ["nir", "red"]}
    assert "indices=['ndvi']" in lazy.attrs["geoupsample_backbone"]  # red and nir by name


def test_segment_labels_layer_chooses_the_vector_layer(tmp_path, scene) -> None:
    """A GeoPackage with two layers of the bundled polygons, the classes renamed in one."""
    gpkg = tmp_path / "labels.gpkg"
    frame = pyogrio.read_dataframe(LABELS)
    pyogrio.write_dataframe(frame, gpkg, layer="original")
    renamed = frame.assign(**{"class": frame["class"].map(
        {"bright_impervious": "roof", "dark_impervious": "road", "vegetation": "tree"})})
    pyogrio.write_dataframe(renamed, gpkg, layer="renamed")
    out = tmp_path / "cli.tif"
    cli("segment", SCENE, "--labels", gpkg, "--class-field", "class", "--labels-layer",
        "renamed", "-o", out, "--cell-size", "10", "--method", "bilinear", *SMALL_CLI)
    ref, tags = written(out)
    lazy = segment(scene, gpkg, "class", cell_size=10, labels_layer="renamed",
                   method="bilinear", **SMALL)
    assert json.loads(lazy.attrs["class_names"]) == ["road", "roof", "tree"]
    assert lazy.attrs["class_names"] == tags["class_names"]
    np.testing.assert_array_equal(lazy.values, ref)
    with pytest.raises(LabelError, match=r"has layers \['original', 'renamed'\]"):
        segment(scene, gpkg, "class", cell_size=10)
    with pytest.raises(InputError, match="labels_layer="):
        segment(scene, gpkg, "class", layer="renamed")  # the old keyword: a clear error


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bands=["swir"]), r"no band described 'swir'; its bands are described 'red'"),
        (dict(bands=[5]), "band 5 does not exist in the scene"),
        (dict(bands=[]), "no bands selected"),
        (dict(model_bands=RGB), "spectral backbone takes no model bands.*bands="),
        (dict(backbone="timm:resnet18", random_init=True, model_bands=[0]), "1-based"),
    ],
)
def test_bad_band_choices_are_clear_errors(scene, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        features(scene, **{"backbone": "spectral", **kwargs})


def test_options_of_a_backbone_object_are_refused(scene) -> None:
    bb = gb.create("spectral", band_names=("red", "green", "blue", "nir"))
    with pytest.raises(InputError, match="for a backbone given by name"):
        features(scene, bb, model_bands=RGB)
