"""``geoupsample predict``: the user's own models (ONNX, TorchScript) over a real scene."""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from geoupsample.cli import app
from geoupsample.inputs import InputError
from geoupsample.prediction import (
    Preprocessing,
    cell_means,
    output_kind,
    predict_array,
    predict_raster,
    to_probabilities,
)
from geoupsample.user_model import SegmentationModel
from geoupsample.xarray import predict as xr_predict
from tests._predict_helpers import (
    KillOnce,
    export_onnx,
    export_torchscript,
    identity_net,
    make_net,
    whole_array,
)
from tests.test_features_segment_options import interrupt_after

DATA = resources.files("geoupsample") / "data"
SCENE = str(DATA / "rotterdam_ms.tif")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(tile=128, halo=16, blocksize=32)  # 3 x 3 tiles on the 300 x 300 scene


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def read(path: str | Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    with rasterio.open(SCENE) as ds:
        return ds.read().astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """The same pointwise net as ONNX (fixed 64 px input, batch 1 or any; any size) and
    TorchScript; a 3 x 3 net; a net of output stride 4; a one-channel net."""
    d = tmp_path_factory.mktemp("models")
    point, conv = make_net(kernel=1), make_net(kernel=3, seed=1)
    return {
        "fixed": export_onnx(point, str(d / "fixed.onnx"), 4, size=64),
        "fixed_b1": export_onnx(point, str(d / "fixed_b1.onnx"), 4, size=64, batch=1),
        "dynamic": export_onnx(point, str(d / "dynamic.onnx"), 4),
        "script": export_torchscript(point, str(d / "script.pt")),
        "conv_fixed": export_onnx(conv, str(d / "conv_fixed.onnx"), 4, size=64),
        "conv_dynamic": export_onnx(conv, str(d / "conv_dynamic.onnx"), 4),
        "stride4": export_onnx(make_net(kernel=1, stride=4, seed=2), str(d / "s4.onnx"), 4),
        "binary": export_onnx(make_net(classes=1, seed=3), str(d / "binary.onnx"), 4),
        "identity": export_onnx(identity_net(4), str(d / "identity.onnx"), 4),
    }


def prepared(scene: np.ndarray) -> np.ndarray:
    """The scene as the models see it by default (no scale or offset: the file has none)."""
    return Preprocessing.of(4).apply(scene)


@pytest.mark.parametrize("name", ["fixed", "fixed_b1", "dynamic", "script"])
def test_tiled_prediction_equals_one_whole_array_call(models, scene, tmp_path, name):
    """A pointwise net sees each pixel alone: tiles, windows, padding and blending give the
    whole-array probabilities at every pixel, whatever the format or input size."""
    out = tmp_path / "p.tif"
    rep = predict_raster(SCENE, models[name], out, dtype="float32", **SMALL)
    assert rep.run.tiles == 9 and rep.output == "logits" and rep.stride == 1
    assert rep.classes == ("class_1", "class_2", "class_3")
    want = whole_array(make_net(kernel=1), prepared(scene))
    np.testing.assert_allclose(read(out), want, rtol=0, atol=2e-4)  # ONNX runtime vs torch


def test_a_receptive_field_differs_only_near_window_and_tile_edges(models, scene, tmp_path):
    """A 3 x 3 net: the fixed-size model's windows and the tiles change the pixels within its
    reach of their edges (blended over the overlaps); elsewhere the whole-array values."""
    want = whole_array(make_net(kernel=3, seed=1), prepared(scene))
    dyn, fixed = tmp_path / "d.tif", tmp_path / "f.tif"
    predict_raster(SCENE, models["conv_dynamic"], dyn, dtype="float32", **SMALL)
    predict_raster(SCENE, models["conv_fixed"], fixed, dtype="float32", overlap=0.25, **SMALL)
    d, f = read(dyn), read(fixed)
    np.testing.assert_allclose(d, want, rtol=0, atol=2e-4)  # tiles reach 16 px past the cores
    err = np.abs(f - want).max(0)
    assert err.max() < 0.1, err.max()
    assert np.mean(err < 2e-4) > 0.85  # exact away from the windows edges
    np.testing.assert_allclose(f.sum(0), 1.0, atol=1e-5)


def test_predict_array_blends_windows_with_weights_summing_to_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 50, 70)).astype(np.float32)
    calls = []

    def model(batch: np.ndarray) -> np.ndarray:  # logits = the input: softmax of 2 bands
        calls.append(batch.shape)
        return batch.copy()

    out = predict_array(model, x, stride=1, kind="logits", input_size=(32, 32), overlap=8,
                        batch=3)  # fmt: skip
    np.testing.assert_allclose(out, to_probabilities(x[None], "logits")[0], atol=1e-6)
    assert all(s[0] <= 3 and s[2:] == (32, 32) for s in calls)  # batches of windows
    small = predict_array(model, x[:, :20, :20], stride=1, kind="logits", input_size=(32, 32))
    assert small.shape == (2, 20, 20)  # a scene smaller than the window: padded


def test_output_kind_and_probabilities():
    logits = np.array([[[[2.0]], [[-1.0]]]], np.float32)
    assert output_kind(logits) == "logits"
    p = to_probabilities(logits, "logits")
    assert output_kind(p) == "probabilities"
    np.testing.assert_allclose(p.sum(1), 1.0)
    one = to_probabilities(np.array([[[[0.0]]]], np.float32), "logits")
    np.testing.assert_allclose(one[0, :, 0, 0], [0.5, 0.5])
    assert output_kind(np.full((1, 1, 2, 2), 0.3, np.float32)) == "probabilities"


def test_single_channel_model_gives_two_named_classes_and_a_class_raster(models, tmp_path):
    out, cls = tmp_path / "p.tif", tmp_path / "c.tif"
    rep = predict_raster(SCENE, models["binary"], out, class_names=["water"], classes_path=cls,
                         **SMALL)  # fmt: skip
    assert rep.classes == ("not_water", "water")
    with rasterio.open(out) as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255 and ds.count == 2
        assert json.loads(ds.tags()["class_names"]) == ["not_water", "water"]
        assert ds.descriptions == ("not_water", "water")
        assert float(ds.tags()["probability_scale"]) == pytest.approx(1 / 254)
        p = ds.read().astype(np.int32)
    assert np.abs(p.sum(0) - 254).max() <= 1
    with rasterio.open(cls) as ds:
        assert ds.count == 2 and ds.colormap(1)[0][:3] != ds.colormap(1)[1][:3]
        assert ds.tags()["class_1"] == "water"
        c = ds.read(1)
    np.testing.assert_array_equal(c, (p[1] > p[0]).astype(np.uint8) | (c * (p[1] == p[0])))
    assert set(rep.class_fractions) == {"not_water", "water"}


def test_preprocessing_defaults_to_the_files_scale_and_offset(models, scene, tmp_path):
    """The identity model's probabilities are the softmax of what it sees: the stored values x
    the file's GDAL scale + offset, less the mean, over the std; options override the file."""
    packed = tmp_path / "packed.tif"
    with rasterio.open(SCENE) as src:
        profile = src.profile
        with rasterio.open(packed, "w", **profile) as dst:
            dst.write(src.read())
            dst.scales = (0.001,) * 4
            dst.offsets = (-0.1,) * 4
    out = tmp_path / "p.tif"
    predict_raster(packed, models["identity"], out, dtype="float32", output="logits", **SMALL)
    seen = scene * 0.001 - 0.1
    np.testing.assert_allclose(read(out), to_probabilities(seen[None], "logits")[0], atol=1e-5)
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 1.0, 2.0, 4.0]
    predict_raster(packed, models["identity"], out, dtype="float32", output="logits",
                   scale_factor=0.002, offset=0.0, mean=mean, std=std, **SMALL)  # fmt: skip
    seen = (scene * 0.002 - np.array(mean, np.float32)[:, None, None]) / np.array(
        std, np.float32)[:, None, None]
    np.testing.assert_allclose(read(out), to_probabilities(seen[None], "logits")[0], atol=1e-5)


def test_nodata_is_kept_out_of_the_models_view_and_in_the_output(models, scene, tmp_path):
    holes = tmp_path / "holes.tif"
    with rasterio.open(SCENE) as src:
        profile = {**src.profile, "nodata": -9999.0}
        data = src.read()
    data[:, 100:140, 50:90] = -9999.0
    with rasterio.open(holes, "w", **profile) as dst:
        dst.write(data)
    out = tmp_path / "p.tif"
    predict_raster(holes, models["dynamic"], out, dtype="float32", **SMALL)
    p = read(out)
    assert np.isnan(p[:, 100:140, 50:90]).all() and np.isfinite(p[:, :100]).all()
    x = prepared(scene)
    x[:, 100:140, 50:90] = 0.0  # nodata: what the model sees there
    want = whole_array(make_net(kernel=1), x)
    np.testing.assert_allclose(p[:, :100], want[:, :100], atol=2e-4)


@pytest.mark.parametrize("method", ["bilinear", "gsjbu"])
def test_probability_path_runs_the_model_on_coarse_cells_and_upsamples(models, scene, tmp_path,
                                                                        method):  # fmt: skip
    full, coarse = tmp_path / "full.tif", tmp_path / "coarse.tif"
    predict_raster(SCENE, models["dynamic"], full, dtype="float32", **SMALL)
    rep = predict_raster(SCENE, models["dynamic"], coarse, dtype="float32", model_scale=4,
                         method=method, iters=10, **SMALL)  # fmt: skip
    assert rep.run.tiles == 9
    p, f = read(coarse), read(full)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
    assert (p >= -1e-6).all() and (p <= 1 + 1e-6).all()
    agree = np.mean(p.argmax(0) == f.argmax(0))
    assert agree > 0.75, agree  # the model on 4 x 4 cell means, upsampled, against full res
    with rasterio.open(coarse) as ds:
        assert ds.tags()["geoupsample_model_scale"] == "4"
        assert ds.tags()["geoupsample_method"] == method
    # the model's own coarse output (stride 4) takes the same path
    rep = predict_raster(SCENE, models["stride4"], tmp_path / "s4.tif", method=method,
                         iters=10, **SMALL)  # fmt: skip
    assert rep.stride == 4


def test_cell_means_skip_nodata():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    x[0, 0, 0] = np.nan
    x[0, 2:, 2:] = np.nan
    m = cell_means(x, 2)
    assert m[0, 0, 0] == pytest.approx((1 + 4 + 5) / 3) and np.isnan(m[0, 1, 1])


def test_resumed_run_equals_an_uninterrupted_one(models, tmp_path):
    out, ref = str(tmp_path / "p.tif"), str(tmp_path / "ref.tif")
    run = dict(model_scale=2, method="gsjbu", iters=5, **{**SMALL, "tile": 64})
    with pytest.raises(KeyboardInterrupt):
        predict_raster(SCENE, models["fixed"], out, progress=interrupt_after(out, 2), **run)
    assert not os.path.exists(out)
    rep = predict_raster(SCENE, models["fixed"], out, resume=True, **run)
    assert rep.run.resumed_bands == 2 and rep.run.computed < rep.run.tiles
    predict_raster(SCENE, models["fixed"], ref, **run)
    np.testing.assert_array_equal(read(out), read(ref))


def test_a_killed_dask_worker_does_not_stop_the_run(models, tmp_path):
    from distributed import Client, LocalCluster

    data = Path(models["dynamic"]).read_bytes()
    marker = str(tmp_path / "killed")
    local, dist = tmp_path / "local.tif", tmp_path / "dist.tif"
    run = dict(method="bilinear", model_scale=2, **{**SMALL, "tile": 64})
    # one thread, as on the workers: the same float sums
    predict_raster(SCENE, SegmentationModel(data, "m.onnx", "cpu"), local, threads=1, **run)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(sys.path.insert, 0, ROOT)  # workers import the test helpers
        rep = predict_raster(SCENE, KillOnce(data, "m.onnx", marker), dist, scheduler=client,
                             **run)  # fmt: skip
    assert os.path.exists(marker), "no worker was killed"
    assert rep.run.computed == rep.run.tiles
    np.testing.assert_array_equal(read(dist), read(local))


def test_xarray_predict_equals_the_cli_file(models, tmp_path):
    import rioxarray

    out = tmp_path / "p.tif"
    code, text = cli("predict", SCENE, "--model", models["conv_fixed"], "-o", out, "--dtype",
                     "float32", "--model-scale", "2", "--method", "bilinear", "--tile", "128",
                     "--halo", "16", "--blocksize", "32", "-q")  # fmt: skip
    assert code == 0, text
    scene = rioxarray.open_rasterio(SCENE, chunks={"x": 128, "y": 128})
    probs = xr_predict(scene, models["conv_fixed"], model_scale=2, method="bilinear", tile=128,
                       halo=16, blocksize=32)  # fmt: skip
    assert probs.dims == ("band", "y", "x") and probs.attrs["long_name"][0] == "class_1"
    np.testing.assert_allclose(probs.values, read(out), rtol=0, atol=1e-6)
    classes = xr_predict(scene, models["conv_fixed"], model_scale=2, method="bilinear",
                         tile=128, halo=16, blocksize=32, classes=True)  # fmt: skip
    assert classes.dtype == np.uint8 and classes.shape[0] == 2


def test_aoi_limits_the_prediction(models, tmp_path):
    from shapely.geometry import box

    with rasterio.open(SCENE) as ds:
        b, crs = ds.bounds, ds.crs
    aoi = box(b.left, b.bottom, b.left + (b.right - b.left) / 3, b.top)
    out = tmp_path / "p.tif"
    predict_raster(SCENE, models["dynamic"], out, aoi=aoi, aoi_crs=crs, **SMALL)
    p = read(out)
    assert (p[:, :, 150:] == 255).all() and (p[:, :, :90] < 255).all()


def test_bad_inputs_get_clear_errors_and_no_file(models, tmp_path):
    out = tmp_path / "p.tif"
    cases = [
        (["--model", models["fixed"], "--bands", "1,2,3"], "takes 4 bands but 3 were chosen"),
        (["--model", models["script"], "--bands", "1,2"], "refused a 2-band"),
        (["--model", SCENE], "not an ONNX or TorchScript model"),
        (["--model", tmp_path / "missing.onnx"], "not found"),
        (["--model", models["fixed"], "--class-names", "a,b"], "predicts 3 classes"),
        (["--model", models["fixed"], "--mean", "0.1,0.2"], "one per band"),
        (["--model", models["fixed"], "--std", "1,1,0,1"], "--std must be positive"),
        (["--model", models["fixed"], "--model-scale", "0"], "--model-scale"),
        (["--model", models["fixed"], "--input-size", "32"], "takes 64x64 inputs"),
        (["--model", models["fixed"], "--scale-factor", "x"], "--scale-factor takes numbers"),
    ]
    for extra, message in cases:
        code, text = cli("predict", SCENE, "-o", out, *extra, "-q")
        assert code == 2 and message in text, (extra, text)
        assert not out.exists()
    code, text = cli("predict", SCENE, "--model", models["fixed"], "-o", SCENE, "-q")
    assert code == 2 and "overwrite" in text


def test_pickled_torch_models_and_weights_are_refused_with_the_way_to_export(tmp_path):
    net = make_net()
    pickled, weights = tmp_path / "model.pt", tmp_path / "weights.pt"
    torch.save(net, pickled)
    torch.save(net.state_dict(), weights)
    for path in (pickled, weights):
        with pytest.raises(InputError, match="does not unpickle.*torch.jit.script"):
            SegmentationModel.load(path)
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(InputError, match="safetensors weights file, not a model"):
        SegmentationModel.load(tmp_path / "w.safetensors")


def test_model_signature_is_read_from_onnx(models):
    fixed = SegmentationModel.load(models["fixed_b1"])
    assert fixed.signature.input_size == (64, 64) and fixed.signature.batch == 1
    assert fixed.signature.bands == 4 and fixed.signature.classes == 3
    dyn = SegmentationModel.load(models["dynamic"])
    assert dyn.signature.input_size is None and dyn.signature.batch is None
    assert dyn.probe(4, (64, 64)) == (3, 1)
    assert SegmentationModel.load(models["stride4"]).probe(4, (64, 64)) == (3, 4)
    script = SegmentationModel.load(models["script"])
    assert script.format == "torchscript" and script.probe(4, (32, 32)) == (3, 1)
