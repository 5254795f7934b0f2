"""Backbones on the bundled Rotterdam tile: real timm models (random weights) and ``spectral``."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import timm
import torch
from safetensors.torch import save_file

import geoupsample.backbones as gb

BANDS = ("red", "green", "blue", "nir")


@pytest.fixture(scope="module")
def ms() -> np.ndarray:
    """The bundled 4-band Rotterdam image, float32 ``[4, 300, 300]``, raw values (0..~2000)."""
    path = resources.files("geoupsample") / "data" / "rotterdam_ms.tif"
    with rasterio.open(str(path)) as src:
        return src.read().astype(np.float32)


@pytest.fixture(scope="module")
def tile(ms: np.ndarray) -> np.ndarray:
    """A 64 x 96 crop scaled to about [0, 1] per band (99th percentile)."""
    crop = ms[:, 100:164, 50:146]
    return (crop / np.percentile(ms, 99, axis=(1, 2))[:, None, None]).astype(np.float32)


def test_vit_patch_tokens_adapted_stem(tile: np.ndarray) -> None:
    bb = gb.create("timm:vit_tiny_patch16_224", in_chans=4, random_init=True)
    assert (bb.stride, bb.patch_size, bb.num_features) == (16, 16, 192)
    assert bb.lr_shape(64, 96) == (4, 6)
    out = bb.extract(tile)
    assert isinstance(out, np.ndarray) and out.shape == (192, 4, 6) and out.dtype == np.float32
    assert np.isfinite(out).all()
    batch = bb(torch.from_numpy(np.stack([tile, tile[:, ::-1].copy()])))
    assert batch.shape == (2, 192, 4, 6)
    torch.testing.assert_close(batch[0], torch.from_numpy(out), rtol=1e-4, atol=1e-4)


def test_dinov2_registers_stripped_and_grid_order(tmp_path: Path, tile: np.ndarray) -> None:
    """Tokens after the cls and 4 register tokens, reshaped row-major, equal our feature grid."""
    name = "vit_small_patch14_reg4_dinov2"
    full = timm.create_model(name, pretrained=False, dynamic_img_size=True, depth=2).eval()
    weights = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(weights))
    bb = gb.create(
        f"timm:{name}", weights=weights, bands=["red", "green", "blue"], band_names=BANDS, depth=2
    )
    assert bb.in_chans == 4 and bb.bands == [0, 1, 2] and bb.stride == 14
    x = torch.from_numpy(tile[:, :56, :42].copy())
    feats = bb.extract(x)  # [384, 4, 3], last block before the final norm
    assert feats.shape == (384, 4, 3)
    with torch.no_grad():
        norm_in = (x[None, :3] - bb.mean) / bb.std
        tokens = full.forward_features(norm_in)[0]  # [5 + 12, 384], normed
    assert tokens.shape[0] == full.num_prefix_tokens + 12 and full.num_prefix_tokens == 5
    ours = full.norm(feats.permute(1, 2, 0).reshape(12, 384))
    torch.testing.assert_close(ours, tokens[5:], rtol=1e-4, atol=1e-4)


def test_cnn_stage_choice(tile: np.ndarray) -> None:
    bb = gb.create("timm:resnet18", in_chans=4, layer=2, random_init=True)
    assert bb.stride == 8 and bb.num_features == 128
    assert bb.extract(tile).shape == (128, 8, 12)
    deep = gb.create("timm:resnet18", bands=[3, 0, 1], in_chans=4, random_init=True)
    assert (deep.stride, deep.num_features) == (32, 512)
    assert deep.extract(tile).shape == (512, 2, 3)


def test_random_init_is_the_same_every_run_and_leaves_the_callers_generator_alone() -> None:
    """--random-init weights were unseeded: two identical runs differed (by up to 11.5 on
    features of std 1.4) and a --resume of such a run was always refused."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = gb.create("timm:resnet18", in_chans=4, layer=2, random_init=True)
    assert torch.equal(torch.rand(3), expected_next)  # the global generator is untouched
    b = gb.create("timm:resnet18", in_chans=4, layer=2, random_init=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_normalisation_from_config_or_user() -> None:
    bb = gb.create("timm:resnet18", in_chans=4, random_init=True)
    np.testing.assert_allclose(bb.mean.flatten(), [0.485, 0.456, 0.406, 0.485], rtol=1e-6)
    own = gb.create("timm:resnet18", in_chans=2, random_init=True, mean=[100, 200], std=50)
    np.testing.assert_allclose(own.mean.flatten(), [100, 200])
    np.testing.assert_allclose(own.std.flatten(), [50, 50])
    with pytest.raises(gb.BandCountError, match="mean has 3 values for 2"):
        gb.create("timm:resnet18", in_chans=2, random_init=True, mean=[1, 2, 3])


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "nested"])
def test_weights_from_file(tmp_path: Path, tile: np.ndarray, fmt: str) -> None:
    src = timm.create_model("resnet18", pretrained=False, num_classes=0)
    sd = src.state_dict()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3} if fmt == "nested" else sd, path)
    bb = gb.create("timm:resnet18", weights=path, bands=[0, 1, 2], in_chans=4)
    torch.testing.assert_close(bb.model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    assert bb.weights_source == str(path)
    assert bb.extract(tile).shape == (512, 2, 3)


def test_weights_of_a_larger_model_are_refused(tmp_path: Path) -> None:
    """resnet34's weights hold every tensor of resnet18 and 80 more: they would load into
    resnet18's layers (timm only warns) and give a model nobody trained."""
    path = tmp_path / "r34.safetensors"
    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), str(path))
    with pytest.raises(gb.BackboneError, match=r"80 of its 218 tensors that resnet18 does not "
                       r"have.*another, larger model"):
        gb.create("timm:resnet18", weights=path)
    assert gb.create("timm:resnet34", weights=path).weights_source == str(path)


def test_band_count_mismatch_with_weights(tmp_path: Path) -> None:
    path = tmp_path / "rgb.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    with pytest.raises(
        gb.BandCountError, match=r"expect 3 input band.*4 band.*--model-bands.*--adapt-stem"
    ):
        gb.create("timm:resnet18", weights=path, in_chans=4)
    adapted = gb.create("timm:resnet18", weights=path, in_chans=4, adapt_stem=True)
    assert adapted.model.conv1.weight.shape[1] == 4
    bb = gb.create("timm:resnet18", random_init=True, in_chans=4)
    with pytest.raises(gb.BandCountError, match="built for tiles of 4 band.*has 3"):
        bb(torch.zeros(3, 64, 64))


def test_missing_weights_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(gb.WeightsNotFoundError, match=r"not found.*--weights FILE.*--random-init"):
        gb.create("timm:resnet18", weights=tmp_path / "nope.safetensors")
    with pytest.raises(gb.BackboneError, match=r"no weights chosen.*--weights FILE.*--random-init"):
        gb.create("timm:resnet18")
    with pytest.raises(gb.BackboneError, match="more than one weight source"):
        gb.create("timm:resnet18", random_init=True, weights=tmp_path / "w.pth")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(gb.WeightsNotFoundError, match=r"not in the local.*nothing is downloaded"):
        gb.create("timm:resnet18.a1_in1k", pretrained=True)


def test_pretrained_from_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model already in the HF hub cache (its on-disk layout) is found and loaded offline."""
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(sd, str(snap / "model.safetensors"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    bb = gb.create("timm:resnet18.a1_in1k", pretrained=True)
    assert bb.weights_source.endswith("model.safetensors")
    torch.testing.assert_close(bb.model.conv1.weight, sd["conv1.weight"])


def test_weights_of_another_model_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", depth=1).state_dict(), str(path))
    with pytest.raises(gb.BackboneError, match="matches only 0 of"):
        gb.create("timm:resnet18", weights=path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a safetensors file nor"):
        gb.create("timm:resnet18", weights=junk)


def test_weights_of_another_model_leave_no_timm_key_dump(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """timm logs every unexpected key of a ViT's weights loaded into resnet18 (kilobytes on the
    console, before our one-line error): held back and dropped. The same warning about weights
    that are accepted (one extra tensor) still reaches the user's logging."""
    vit = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", depth=1).state_dict(), str(vit))
    with caplog.at_level(logging.INFO), pytest.raises(gb.BackboneError, match="matches only 0"):
        gb.create("timm:resnet18", weights=vit)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("timm")] == []
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "leftover_token": torch.zeros(4)}, str(extra))
    with caplog.at_level(logging.INFO):
        gb.create("timm:resnet18", weights=extra)
    kept = [r.getMessage() for r in caplog.records if r.name.startswith("timm")]
    assert any(m.startswith("Unexpected keys (leftover_token)") for m in kept), kept
    assert logging.getLogger("timm").propagate and not logging.getLogger("timm").handlers


@pytest.mark.parametrize("name", ["foo", "timm:", "timm:not_a_model_xyz", "spectral:x", "timm"])
def test_unknown_backbone(name: str) -> None:
    with pytest.raises(gb.BackboneError, match="unknown|name the timm model|takes no model"):
        gb.create(name, random_init=True)


def test_layer_out_of_range_is_named() -> None:
    with pytest.raises(gb.BackboneError, match="resnet18 has no layer 9: pass a smaller index"):
        gb.create("timm:resnet18", random_init=True, layer=9)


def test_tile_size_must_be_multiple_of_patch() -> None:
    bb = gb.create("timm:vit_tiny_patch16_224", random_init=True)
    with pytest.raises(gb.BackboneError, match="multiple of the backbone's patch size 16"):
        bb(torch.zeros(3, 40, 48))


def test_spectral_statistics_and_indices(ms: np.ndarray) -> None:
    bb = gb.create("spectral", band_names=BANDS, cell_size=10)
    assert (bb.stride, bb.num_features, bb.in_chans) == (10, 36, 4)
    names = bb.feature_names()
    assert names[12:14] == ["red_edge", "green_edge"]
    assert names[18:20] == ["red_mean_around3", "green_mean_around3"] and len(names) == 36
    assert names[:6] == [
        "red_mean",
        "green_mean",
        "blue_mean",
        "nir_mean",
        "ndvi_mean",
        "ndwi_mean",
    ]
    feats = bb.extract(ms)
    assert feats.shape == (36, 30, 30)
    blocks = ms.astype(np.float64).reshape(4, 30, 10, 30, 10)
    np.testing.assert_allclose(feats[:4], blocks.mean(axis=(2, 4)), rtol=1e-5)
    np.testing.assert_allclose(feats[6:10], blocks.std(axis=(2, 4)), rtol=1e-4, atol=1e-3)
    red, green, nir = ms[0].astype(np.float64), ms[1].astype(np.float64), ms[3].astype(np.float64)
    ndvi = (nir - red) / (nir + red)
    ndwi = (green - nir) / (green + nir)
    np.testing.assert_allclose(feats[4], ndvi.reshape(30, 10, 30, 10).mean(axis=(1, 3)), atol=1e-5)
    np.testing.assert_allclose(feats[5], ndwi.reshape(30, 10, 30, 10).mean(axis=(1, 3)), atol=1e-5)
    assert -1 <= feats[4].min() and feats[4].max() <= 1 and feats[4].std() > 0.05
    # edge: cell mean of the gradient magnitude (central differences, edge pixels replicated)
    padded = np.pad(ms.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    gy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    gx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
    magnitude = np.hypot(gx, gy).reshape(4, 30, 10, 30, 10).mean(axis=(2, 4))
    np.testing.assert_allclose(feats[12:16], magnitude, rtol=1e-4, atol=1e-3)
    # context: each cell statistic averaged over the 3 x 3 cells around (fewer at the edges)
    own = feats[:18].astype(np.float64)
    np.testing.assert_allclose(feats[18:, 7, 4], own[:, 6:9, 3:6].mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(feats[18:, 0, 29], own[:, 0:2, 28:30].mean(axis=(1, 2)),
                               rtol=1e-5)
    alone = gb.create("spectral", band_names=BANDS, cell_size=10, context=0)
    assert alone.num_features == 18
    np.testing.assert_array_equal(alone.extract(ms), feats[:18])
    wide = gb.create("spectral", band_names=BANDS, cell_size=10, context=2)
    assert wide.feature_names()[18] == "red_mean_around5"
    np.testing.assert_allclose(wide.extract(ms)[18:, 10, 10],
                               own[:, 8:13, 8:13].mean(axis=(1, 2)), rtol=1e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(gb.BackboneError, match="context must be a whole number"):
            gb.create("spectral", band_names=BANDS, context=bad)


def test_spectral_window_features_match_the_whole_scene(ms: np.ndarray) -> None:
    """Training windows are read with the context margin: a window's edge cells get the
    neighbourhood they have in the whole scene (without it they average fewer cells)."""
    from affine import Affine
    from rasterio.windows import Window

    from geoupsample.featuremaps import TileFeatures
    from geoupsample.scenes import ArrayScene

    scene = ArrayScene(ms, BANDS, "EPSG:32631", Affine(1, 0, 500000, 0, -1, 5800000))
    features = TileFeatures(gb.create("spectral", band_names=BANDS, cell_size=10), None)
    assert features.margin == 20  # a ring of cells, and a pixel more for the gradient
    whole = features(ms)
    win = Window(100, 50, 120, 100)
    np.testing.assert_allclose(features.of_window(scene, win), whole[:, 5:15, 10:22], rtol=1e-5)
    plain = features(scene.read(win))
    assert not np.allclose(plain[12:, 0, :], whole[12:, 5, 10:22], rtol=1e-3)
    corner = features.of_window(scene, Window(0, 0, 60, 60))  # the scene's edge: as in the whole
    np.testing.assert_allclose(corner, whole[:, :6, :6], rtol=1e-5)


def test_spectral_nodata_and_band_errors(ms: np.ndarray) -> None:
    bb = gb.create("spectral", band_names=BANDS, cell_size=5, stats=["mean"])
    x = ms[:, :10, :10].copy()
    x[:, :5, :5] = np.nan  # one whole cell
    x[:, 5, 5] = np.nan  # one pixel of another
    feats = bb.extract(x)
    assert np.isnan(feats[:6, 0, 0]).all() and np.isfinite(feats[:6, 1:, :]).all()
    np.testing.assert_allclose(feats[0, 1, 1], np.nanmean(x[0, 5:10, 5:10]), rtol=1e-6)
    # the empty cell's neighbourhood means are those of its three valid neighbours
    np.testing.assert_allclose(feats[6:, 0, 0], feats[:6, [0, 1, 1], [1, 0, 1]].mean(1), rtol=1e-6)
    no_names = gb.create("spectral", cell_size=5)
    assert no_names.extract(ms[:3, :10, :10]).shape == (18, 2, 2)
    with pytest.raises(gb.BackboneError, match="ndvi needs the nir and red band"):
        gb.create("spectral", indices=["ndvi"])
    explicit = gb.create("spectral", in_chans=4, index_bands={"red": 0, "nir": 3}, indices=["ndvi"])
    assert explicit.feature_names()[-1] == "ndvi_edge_around3"
    with pytest.raises(gb.BandCountError):
        bb(torch.zeros(3, 10, 10))


def test_registry_extension() -> None:
    assert {"spectral", "timm"} <= set(gb.available())

    @gb.register("cells")
    def _cells(arg: str | None, **kw: object) -> gb.Backbone:
        return gb.SpectralBackbone(cell_size=int(arg or 4), stats=["mean"])

    assert gb.create("cells:6").stride == 6


def test_channels_last_stages_are_transposed(tile: np.ndarray) -> None:
    """Swin's feature stages are NHWC in timm; the backbone returns ``[C, h, w]`` like others."""
    kw = dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 2, 3, 4))
    bb = gb.create("timm:swin_tiny_patch4_window7_224", random_init=True, layer=1, **kw)
    x = torch.from_numpy(tile[:3, :64, :96].copy())
    out = bb.extract(x)
    assert bb.stride == 8 and out.shape == (48, 8, 12)
    with torch.no_grad():
        nhwc = bb.model((x[None] - bb.mean) / bb.std)[-1]
    torch.testing.assert_close(out, nhwc[0].permute(2, 0, 1))


def test_spectral_pixel_features_without_band_names_hold_every_band_pair_ratio():
    """No identified index band: the pixel features are the bands and the normalised difference
    of every band pair (NDVI of bands 1 and 4 among them, up to sign); named bands keep their
    named indices and no pairs; more than MAX_PAIR_BANDS bands get no pairs."""
    from geoupsample.backbones.spectral import MAX_PAIR_BANDS, SpectralBackbone

    x = torch.rand(4, 6, 5) + 0.1
    plain = SpectralBackbone(in_chans=4)
    names = plain.pixel_feature_names(4)
    assert names[:4] == ["band1", "band2", "band3", "band4"] and len(names) == 4 + 6
    f = plain.pixel_features(x)
    assert f.shape == (10, 6, 5)
    ndvi = (x[3] - x[0]) / (x[3] + x[0])
    k = names.index("nd_band1_band4")
    torch.testing.assert_close(f[k], -ndvi, rtol=1e-5, atol=1e-6)
    named = SpectralBackbone(band_names=("red", "green", "blue", "nir"))
    assert named.pixel_feature_names() == ["red", "green", "blue", "nir", "ndvi", "ndwi"]
    assert SpectralBackbone(in_chans=MAX_PAIR_BANDS + 1).band_pairs(MAX_PAIR_BANDS + 1) == []
