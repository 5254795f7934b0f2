"""GSJBU kernels against a plainly written reference, gradients, properties and persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geoupsample as gu
from geoupsample.core import consistency, gsjbu
from geoupsample.core.adam import Adam
from geoupsample.core.consistency import cell_average
from geoupsample.core.layout import CellLayout
from tests import reference


def random_params(lr_shape, scale, rng) -> np.ndarray:
    """Random raw parameters around sensible values: sigmas 0.3-3 LR px, any angle."""
    h, w = lr_shape
    sy, sx = scale
    p = np.empty((4, h, w))
    p[0] = np.log(sx * rng.uniform(0.3, 3.0, (h, w)))
    p[1] = np.log(sy * rng.uniform(0.3, 3.0, (h, w)))
    p[2] = rng.uniform(-2.0, 2.0, (h, w))
    p[3] = np.log(rng.uniform(0.05, 0.5, (h, w)))
    return p


def kernels_with(params: np.ndarray, guide: np.ndarray, valid: np.ndarray, radius: int):
    return gu.Kernels(
        params=torch.from_numpy(params),
        guide=torch.from_numpy(guide),
        valid=torch.from_numpy(valid),
        radius=radius,
    )


CASES = [
    # (H, W), (h, w), bands, radius
    ((12, 16), (3, 4), 1, 2),  # integer scale 4
    ((13, 11), (4, 3), 3, 2),  # fractional, different per axis
    ((10, 21), (5, 4), 8, 1),  # scale 2 x 5.25
    ((9, 9), (9, 9), 3, 1),  # scale 1
]


@pytest.mark.parametrize("hr_shape,lr_shape,bands,radius", CASES)
def test_render_matches_dense_reference(hr_shape, lr_shape, bands, radius):
    rng = np.random.default_rng(sum(hr_shape) + bands)
    guide = rng.random((bands, *hr_shape))
    valid = rng.random(hr_shape) > 0.15  # nodata holes
    guide[:, ~valid] = 0.0
    scale = (hr_shape[0] / lr_shape[0], hr_shape[1] / lr_shape[1])
    params = random_params(lr_shape, scale, rng)
    x = rng.normal(size=(3, *lr_shape))
    ours = kernels_with(params, guide, valid, radius).render(x, consistency=0)
    ref = reference.render(params, guide, valid, lr_shape, radius, x)
    assert ours.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_render_float32_matches_reference_with_borders_and_nan_in_x():
    rng = np.random.default_rng(7)
    hr, lr = (20, 18), (5, 6)
    guide = rng.random((4, *hr)).astype(np.float32)
    valid = np.ones(hr, bool)
    valid[3:6, 4:9] = False
    params = random_params(lr, (4.0, 3.0), rng).astype(np.float32)
    x = rng.normal(size=(2, *lr)).astype(np.float32)
    x[:, 0, 0] = np.nan  # a missing cell in every channel
    x[1, 2, 3] = np.nan  # a missing cell in one channel only
    ours = kernels_with(params, guide, valid, 2).render(x, consistency=0)
    ref = reference.render(params, guide, valid, lr, 2, x)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4, equal_nan=True)
    assert np.isfinite(ours[:, valid]).all(), "NaN in x leaked into valid output pixels"


@pytest.mark.parametrize(("backend", "tol"), [("auto", 2e-6), ("torch", 1e-9)])
def test_jbu_equals_classic_joint_bilateral_formula(backend, tol, monkeypatch):
    """The CPU's Numba path works in float32 (to float32's precision); the torch path keeps a
    float64 guide in float64."""
    monkeypatch.setenv("GEOUPSAMPLE_BACKEND", backend)
    rng = np.random.default_rng(3)
    guide = rng.random((3, 16, 20))
    x = rng.normal(size=(2, 4, 5))
    ours = gu.upsample(x, guide, method="jbu", normalize=False, radius=3, consistency=0)
    ref = reference.classic_jbu(guide, np.ones((16, 20), bool), (4, 5), x, sigma_r=0.12, radius=3)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


def _tiny_problem(dtype=torch.float64, seed=0):
    rng = np.random.default_rng(seed)
    hr, lr, d, radius = (7, 9), (3, 4), 2, 1
    guide = torch.from_numpy(rng.random((d, *hr))).to(dtype)
    valid = torch.from_numpy(rng.random(hr) > 0.1)
    k = gu.Kernels(
        params=torch.from_numpy(random_params(lr, (7 / 3, 9 / 4), rng)).to(dtype),
        guide=guide * valid,
        valid=valid,
        radius=radius,
    )
    return k, k._prepared


@pytest.mark.parametrize("keep_weights", [True, False])
def test_gradcheck_render_function(keep_weights, monkeypatch):
    if not keep_weights:  # the backward that recomputes the weights chunk by chunk
        monkeypatch.setattr(gsjbu, "KEEP_WEIGHTS_ELEMENTS", 0)
    k, prep = _tiny_problem()
    params = k.params.clone().requires_grad_(True)
    x = torch.randn(2, *k.lr_shape, dtype=torch.float64, requires_grad=True)

    def run(p, v):
        psi = prep.psi(p)
        return gsjbu.render_cells(psi, gsjbu.neighbours(v, k.radius), prep.phi)

    assert torch.autograd.gradcheck(run, (params, x), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [((40, 56), (5, 7), 3), ((37, 50), (9, 11), 1)])
def test_gradcheck_psi_assembly_with_invalid_cells(shape):
    """The hand-written backward of psi (and its fold onto the cells) against finite differences."""
    (hh, ww), (h, w), d = shape
    torch.manual_seed(1)
    layout = CellLayout.build((hh, ww), (h, w))
    gbar = torch.rand(d, h, w, dtype=torch.float64)
    cell_valid = torch.rand(h, w) > 0.2
    params = (0.3 * torch.randn(4, h, w, dtype=torch.float64)).requires_grad_(True)
    finite = torch.isfinite(gsjbu.build_psi(params.detach(), gbar, cell_valid, layout, 2))
    assert not finite.all()  # some neighbours are outside or invalid: -inf there

    weight = torch.randn(finite.shape, dtype=torch.float64)

    def projected_psi(p):  # a scalar: one backward, and gradcheck's slow mode stays cheap
        psi = gsjbu.build_psi(p, gbar, cell_valid, layout, 2).masked_fill(~finite, 0.0)
        return (psi * weight).sum()

    assert torch.autograd.gradcheck(projected_psi, (params,))


def test_fused_fit_gradient_equals_autograd():
    k, prep = _tiny_problem(seed=1)
    params = k.params.clone().requires_grad_(True)
    values = gsjbu.neighbours(prep.gbar, k.radius)
    psi = prep.psi(params)
    out = gsjbu.render_cells(psi, values, prep.phi)
    m = prep.pixel_valid[..., None]
    loss = ((out - prep.guide_cells).abs() * m).sum() / (m.sum() * out.shape[2])
    (grad_auto,) = torch.autograd.grad(loss, params)
    psi2 = prep.psi(params)
    loss2, grad_psi = gsjbu.fit_loss_and_grad(
        psi2.detach(), prep.phi, values, prep.guide_cells, prep.pixel_valid
    )
    (grad_fused,) = torch.autograd.grad(psi2, params, grad_psi)
    assert float(loss2) == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(grad_fused, grad_auto, rtol=1e-9, atol=1e-12)


def test_constant_raster_renders_constant_and_weights_sum_to_one():
    rng = np.random.default_rng(5)
    guide = rng.random((3, 30, 27)).astype(np.float32)
    k = gu.fit(guide, (7, 6), iters=5, device="cpu")  # checks the torch path's weights
    out = k.render(np.full((2, 7, 6), 3.25, np.float32))
    np.testing.assert_allclose(out, 3.25, rtol=1e-5)
    prep = k._prepared
    w = gsjbu.chunk_weights(prep.phi, k._psi)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]), rtol=1e-5, atol=1e-5)


def test_ramp_stays_ramp_under_bilinear_and_flat_guide_jbu():
    s, h, w = 8, 12, 12
    ramp_lr = np.broadcast_to(np.arange(w, dtype=np.float64), (h, w))[None]
    guide = np.full((3, h * s, w * s), 0.5)
    x_hr = (np.arange(w * s) + 0.5) / s - 0.5  # LR coordinate of each HR pixel centre
    bil = gu.upsample(ramp_lr, guide, method="bilinear")
    inner = slice(s, (w - 1) * s)
    np.testing.assert_allclose(
        bil[0, :, inner], np.broadcast_to(x_hr[inner], (h * s, len(x_hr[inner]))), atol=1e-9
    )
    jbu = gu.upsample(ramp_lr, guide, method="jbu", normalize=False)
    inner = slice(3 * s, (w - 3) * s)  # radius 3 away from the edges
    err = np.abs(jbu[0, 3 * s : (h - 3) * s, inner] - x_hr[inner])
    assert err.max() < 0.01, err.max()  # within 1 % of the ramp's step per LR pixel


def test_fit_lowers_l1_loss_and_is_deterministic(rotterdam_ms):
    guide = rotterdam_ms[:3, :48, :48]  # a real RGB crop
    k = gu.fit(guide, (8, 8), iters=30, device="cpu", sample=0.5, seed=4)
    assert len(k.loss_history) == 30
    assert k.loss_history[-1] < 0.8 * k.loss_history[0]
    k0 = gu.fit(guide, (8, 8), iters=0, device="cpu")
    gbar = k._prepared.gbar.numpy()
    target = k.guide.numpy()
    err_fit = np.abs(k.render(gbar, consistency=0) - target).mean()
    err_init = np.abs(k0.render(gbar, consistency=0) - target).mean()
    assert err_fit < err_init
    again = gu.fit(guide, (8, 8), iters=30, device="cpu", sample=0.5, seed=4)
    torch.testing.assert_close(again.params, k.params, rtol=0, atol=0)


def test_kernels_repr_is_a_summary():
    k = gu.fit(np.random.default_rng(0).random((3, 64, 64)), (8, 8), iters=3)
    text = repr(k)
    assert text.startswith("Kernels(lr_shape=(8, 8), hr_shape=(64, 64), guide_bands=3, radius=3")
    assert "3 steps, L1" in text and len(text) < 200  # not the tensors


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    guide = rng.integers(0, 4000, (4, 40, 36)).astype(np.uint16)
    k = gu.fit(guide, (5, 6), iters=3, nodata=0, device="cpu")  # load() gives CPU kernels
    k.save(tmp_path / "k.pt")
    k2 = gu.Kernels.load(tmp_path / "k.pt")
    x = rng.normal(size=(3, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(k.render(x), k2.render(x))
    assert k2.loss_history == k.loss_history
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a geoupsample kernels file"):
        gu.Kernels.load(tmp_path / "bad.pt")
    state = torch.load(tmp_path / "k.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "params"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"incomplete kernels file \(no params\)"):
        gu.Kernels.load(tmp_path / "partial.pt")


def test_layout_covers_every_pixel_once():
    for hr, lr in [((300, 301), (37, 40)), ((64, 64), (16, 16)), ((10, 7), (10, 2))]:
        layout = CellLayout.build(hr, lr)
        idx = torch.arange(hr[0] * hr[1], dtype=torch.float64).reshape(1, *hr)
        cells = layout.to_cells(idx)[..., 0]
        picked = cells[layout.phase_valid]
        assert sorted(picked.long().tolist()) == list(range(hr[0] * hr[1]))


@pytest.mark.parametrize("method", gu.METHODS)
def test_methods_share_shapes_dtypes_and_array_kind(method):
    rng = np.random.default_rng(0)
    guide = rng.random((3, 30, 25))
    x32 = rng.random((2, 3, 6, 5)).astype(np.float32)
    out = gu.upsample(x32, guide, method=method, iters=2)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 30, 25) and out.dtype == np.float32
    out64 = gu.upsample(torch.from_numpy(x32[0]).double(), guide, method=method, iters=2)
    assert isinstance(out64, torch.Tensor) and out64.shape == (3, 30, 25)
    assert out64.dtype == torch.float64
    xi = rng.integers(0, 9, (1, 6, 5)).astype(np.int16)
    assert gu.upsample(xi, guide, method=method, iters=2).dtype == np.float32


@pytest.mark.parametrize("method", gu.METHODS)
def test_nan_in_x_never_leaks(method):
    rng = np.random.default_rng(1)
    guide = rng.random((3, 32, 32)).astype(np.float32)
    x = rng.random((2, 8, 8)).astype(np.float32)
    x[:, 3, 4] = np.nan
    x[0, 6, 1] = np.nan
    out = gu.upsample(x, guide, method=method, iters=2)
    if method == "nearest":
        assert np.isnan(out[:, 12:16, 16:20]).all()
        out[:, 12:16, 16:20] = 0
        out[0, 24:28, 4:8] = 0
    assert np.isfinite(out).all()


def test_torch_guide_that_requires_grad_is_accepted():
    guide = torch.rand(3, 20, 20, requires_grad=True)
    out = gu.upsample(torch.rand(1, 5, 5), guide, iters=2)
    assert out.shape == (1, 20, 20) and torch.isfinite(out).all()


def test_guide_nodata_gives_nan_output_for_every_method():
    rng = np.random.default_rng(4)
    guide = rng.integers(1, 255, (3, 24, 24)).astype(np.uint8)
    guide[:, 5:9, 2:7] = 0
    x = rng.random((1, 6, 6)).astype(np.float32)
    for method in gu.METHODS:
        out = gu.upsample(x, guide, method=method, nodata=0, iters=2)
        assert np.isnan(out[0, 5:9, 2:7]).all(), method
        assert np.isfinite(out[0, 12:, 12:]).all(), method


@pytest.mark.parametrize("method", gu.METHODS)
def test_masked_arrays_mask_means_missing(rotterdam_ms, tmp_path, method):
    """rasterio's ``read(masked=True)`` hands over masked arrays: masked guide pixels and low-res
    cells are missing (as NaN would be), whatever value lies under the mask, and the result is
    a masked array, masked where it is NaN."""
    import rasterio
    from affine import Affine

    guide = rotterdam_ms[:3, :96, :96]
    lr = rotterdam_ms[3:, :96, :96].reshape(1, 12, 8, 12, 8).mean(axis=(2, 4))
    lr[:, 4:6, 3:5] = -9999.0  # nodata cells, as stored in the file
    path = tmp_path / "lr.tif"
    with rasterio.open(path, "w", driver="GTiff", width=12, height=12, count=1,
                       dtype="float32", nodata=-9999.0, crs="EPSG:32631",
                       transform=Affine(8, 0, 0, 0, -8, 0)) as dst:
        dst.write(lr.astype(np.float32))
    with rasterio.open(path) as src:
        masked_lr = src.read(masked=True)
    hole = np.zeros(guide.shape, bool)
    hole[:, 40:56, 60:80] = True
    masked_guide = np.ma.masked_array(guide, hole)
    out = gu.upsample(masked_lr, masked_guide, method=method, iters=3)
    nan_lr = np.where(lr == -9999.0, np.nan, lr).astype(np.float32)
    want = gu.upsample(nan_lr, np.where(hole, np.nan, guide), method=method, iters=3)
    assert isinstance(out, np.ma.MaskedArray)
    np.testing.assert_array_equal(out.mask, np.isnan(want))
    assert out.mask[0, 40:56, 60:80].all() and np.isfinite(out.compressed()).all()
    np.testing.assert_allclose(out.filled(np.nan), want, rtol=0, atol=1e-5, equal_nan=True)
    assert float(out.min()) > float(np.nanmin(lr[lr > -9999])) - 200  # no -9999 leaked in


@pytest.mark.parametrize("objective", ["back_projected", "plain"])
@pytest.mark.parametrize("lr_shape", [(12, 12), (10, 11)])  # x8, and fractional (stencil-free)
def test_nodata_collar_wider_than_the_neighbourhood_stays_out_of_the_fit(
    rotterdam_ms, objective, lr_shape
):
    # a rotated scene's collar: cells deep inside it have no valid neighbour at all, whose
    # softmax was NaN and spread through Adam to every kernel (all-NaN output)
    guide = rotterdam_ms[:3, :96, :96].copy()
    collar = np.triu(np.ones((96, 96), bool), 40)
    guide[:, collar] = np.nan
    k = gu.fit(guide, lr_shape, iters=8, radius=1, objective=objective, sample=1.0)
    assert np.isfinite(k.loss_history).all() and torch.isfinite(k.params).all()
    assert k.loss_history[-1] < k.loss_history[0]
    out = k.render(np.random.default_rng(0).random((2, *lr_shape)).astype(np.float32))
    assert np.isfinite(out[0][~collar]).all()
    assert np.isnan(out[0][collar]).all()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda g, x: gu.fit(g, (50, 8)), ValueError, "finer than the guide"),
        (lambda g, x: gu.upsample(x, np.moveaxis(g, 0, -1)), ValueError,
         r"channels-last.*np.moveaxis\(guide, -1, 0\)"),
        (lambda g, x: gu.fit(g, (8,)), TypeError, "pair of ints"),
        (lambda g, x: gu.fit(g, (8.7, 8)), TypeError, "whole numbers of cells"),
        (lambda g, x: gu.fit(g, (8, 8), nodata="x"), TypeError, "nodata must be a number"),
        (lambda g, x: gu.guide_stats(g, percentiles=(98, 2)), ValueError, "0 <= low < high"),
        (lambda g, x: gu.upsample(x, g, seed=None), ValueError, "seed must be an integer"),
        (lambda g, x: gu.fit(g, (8, 8), normalize=([1, 1, 1], [0, 2, 2])), ValueError, "swapped"),
        (lambda g, x: gu.fit(g[0], (8, 8)), ValueError, "add a band axis"),
        (lambda g, x: gu.fit(g[None], (8, 8)), ValueError, r"\[bands, H, W\]"),
        (lambda g, x: gu.fit(g[:, :0], (8, 8)), ValueError, "empty"),
        (lambda g, x: gu.fit(np.full_like(g, np.nan), (8, 8)), ValueError, "no valid pixel"),
        (lambda g, x: gu.fit(g, (8, 8), iters=-1), ValueError, "iters"),
        (lambda g, x: gu.fit(g, (8, 8), radius=0), ValueError, "radius"),
        (lambda g, x: gu.fit(g, (8, 8), normalize="yes"), TypeError, "normalize"),
        (lambda g, x: gu.fit("guide.tif", (8, 8)), TypeError, "numpy array or a torch tensor"),
        (lambda g, x: gu.fit(g, (8, 8), iters=0).render(x[:, :4]), ValueError, "lr_shape"),
        (lambda g, x: gu.fit(g, (8, 8), iters=0).render(x[0]), ValueError, "channel axis"),
        (lambda g, x: gu.upsample(x, g, method="lanczos"), ValueError, "unknown method"),
        (lambda g, x: gu.upsample(x, g, method="bilinear", iter=3), TypeError, "unexpected"),
        (
            lambda g, x: gu.upsample(x[:, :, :4].repeat(20, 2), g, method="bilinear"),
            ValueError,
            "finer",
        ),
        (
            lambda g, x: gu.upsample(x, g, method="gsjbu", normalize=gu.GuideStats([0], [1])),
            ValueError,
            "bands",
        ),
    ],
)
def test_bad_input_gives_clear_errors(call, error, match):
    rng = np.random.default_rng(0)
    guide = rng.random((3, 32, 32)).astype(np.float32)
    x = rng.random((2, 8, 8)).astype(np.float32)
    with pytest.raises(error, match=match):
        call(guide, x)


@pytest.mark.parametrize("hr_shape,lr_shape", [((48, 40), (6, 5)), ((50, 37), (7, 5))])
def test_consistency_makes_cell_means_match_the_input(hr_shape, lr_shape, rotterdam_ms):
    guide = rotterdam_ms[:3, : hr_shape[0], : hr_shape[1]]
    rng = np.random.default_rng(8)
    x = rng.random((2, *lr_shape))
    x[1, 2, 2] = np.nan
    k = gu.fit(guide, lr_shape, iters=5)
    layout = k._prepared.layout

    def mismatch(out):
        means = cell_average(torch.from_numpy(out), layout).numpy()
        ok = np.isfinite(x)
        return np.abs(means - x)[ok].max()

    pure = k.render(x, consistency=0)
    fixed = k.render(x, consistency=2)
    assert mismatch(fixed) < 0.5 * mismatch(pure)
    assert np.isfinite(fixed).all(), "NaN in x leaked through back-projection"
    np.testing.assert_allclose(k.render(np.full((1, *lr_shape), 2.0)), 2.0, rtol=1e-6)
    bil = gu.upsample(x, guide, method="bilinear", consistency=2)
    assert mismatch(bil) < 0.5 * mismatch(gu.upsample(x, guide, method="bilinear"))


@pytest.mark.parametrize("with_nan", [False, True])
def test_back_projection_is_per_channel_whatever_the_chunk(monkeypatch, with_nan):
    layout = CellLayout.build((30, 27), (6, 5))  # fractional scale along x
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(11, 6, 5, generator=gen)
    out = torch.nn.functional.interpolate(x[None], size=(30, 27), mode="bilinear")[0]
    out += 0.1 * torch.rand(out.shape, generator=gen)
    if with_nan:
        x[3, 1, 1] = float("nan")
        out[:, 4:9, 2] = float("nan")
    results = []
    for chunk in (1, 8, 64):
        monkeypatch.setattr(consistency, "CHANNEL_CHUNK", chunk)
        results.append(consistency.back_project(out.clone(), x, layout, 1.5, not with_nan))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-6, equal_nan=True)
    assert torch.isnan(results[0]).any() == with_nan
    # on a GPU the chunk is sized by elements (a 384-channel 224^2 raster in one go)
    assert consistency.channel_chunk(torch.empty(384, 224, 224, device="meta")) >= 384
    assert consistency.channel_chunk(torch.empty(384, 224, 224)) == consistency.CHANNEL_CHUNK


def test_torch_path_samples_at_least_twelve_pixels_per_cell(rotterdam_ms, monkeypatch):
    monkeypatch.setenv("GEOUPSAMPLE_BACKEND", "torch")
    guide = rotterdam_ms[:3, :24, :24]
    # scale 3: 9 pixels per cell, all used; on the CPU (CUDA's scatter-adds are not bitwise
    # reproducible)
    k_default = gu.fit(guide, (8, 8), iters=3, device="cpu")
    k_full = gu.fit(guide, (8, 8), iters=3, sample=1.0, device="cpu")
    torch.testing.assert_close(k_default.params, k_full.params, rtol=0, atol=0)
    monkeypatch.delenv("GEOUPSAMPLE_BACKEND")
    with pytest.raises(ValueError, match="sample"):
        gu.fit(guide, (8, 8), sample=0.0)
    with pytest.raises(ValueError, match="consistency"):
        k_full.render(np.zeros((1, 8, 8)), consistency=-1)


def test_self_guidance_keeps_constants_and_sharpens_raster_edges_under_a_flat_guide():
    guide = np.full((3, 64, 64), 0.3)
    step = np.zeros((2, 8, 8))
    step[:, :, 4:] = 1.0
    k = gu.fit(guide, (8, 8), iters=0, normalize=False)
    np.testing.assert_allclose(k.render(np.full((1, 8, 8), 5.0), self_guidance=1.0), 5.0, rtol=1e-6)
    plain = k.render(step, consistency=0)
    nearly_plain = k.render(step, consistency=0, self_guidance=1e-4)
    np.testing.assert_allclose(nearly_plain, plain, atol=1e-4)
    guided = k.render(step, consistency=0, self_guidance=2.0)

    def blurred(out):
        return float(((out > 0.1) & (out < 0.9)).mean())

    assert blurred(guided) < 0.5 * blurred(plain)
    many = np.concatenate([step] * 10)  # 20 channels: reduced to 8 principal components
    assert np.isfinite(k.render(many, self_guidance=0.5)).all()
    with pytest.raises(ValueError, match="self_guidance"):
        k.render(step, self_guidance=-1.0)


@pytest.mark.parametrize("channels", [3, 20])
def test_self_guidance_with_a_given_scale_is_tile_independent(channels, rotterdam_ms):
    """With scene-wide guide statistics and a given scale, a window renders like the whole
    raster away from its edges (what the tiling engine relies on), projection included."""
    guide = rotterdam_ms[:3, :128, :128]
    stats = gu.guide_stats(guide)
    x = np.random.default_rng(9).random((channels, 32, 32))
    kw = dict(
        method="jbu", normalize=stats, consistency=0, self_guidance=1.0, self_guidance_scale=1.0
    )
    whole = gu.upsample(x, guide, **kw)
    window = gu.upsample(x[:, 4:28, 4:28], guide[:, 16:112, 16:112], **kw)
    np.testing.assert_allclose(
        window[:, 16:80, 16:80], whole[:, 32:96, 32:96], rtol=1e-5, atol=1e-5
    )


def test_adam_matches_torch_optim_adam():
    torch.manual_seed(0)
    ours = torch.randn(4, 3, 5, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_(True)
    opt_ours = Adam(ours, lr=0.1)
    opt_theirs = torch.optim.Adam([theirs], lr=0.1)
    for step in range(5):
        g = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("hr", "lr"), [((64, 48), (8, 6)), ((37, 50), (9, 11))])
def test_back_projected_objective_is_the_rendered_error(hr, lr):
    """With every pixel, the fit objective equals the L1 error of ``render(Gbar)`` with its
    default back-projection; the integer-scale stencil equals full HR upsampling."""
    from geoupsample.core.objective import BilinearStencil, back_projected_l1

    torch.manual_seed(3)
    k = gu.fit(torch.rand(3, *hr), lr, iters=0, device="cpu")  # the torch path's pieces
    prep = k._prepared
    psi = prep.psi(k.params)
    values = gsjbu.neighbours(prep.gbar, k.radius)
    stencil = BilinearStencil.build(prep, torch.float32)
    assert (stencil is None) == (hr[0] % lr[0] != 0)
    full = back_projected_l1(gsjbu.render_cells(psi, values, prep.phi), prep, stencil=stencil)
    rendered = k.render(prep.gbar, kind="continuous")  # consistency=2, as the fit assumes
    expected = (rendered - k.guide).abs().mean()
    assert float(full) == pytest.approx(float(expected), rel=1e-5)
    phases = torch.tensor([0, 2, 5])
    sampled = gsjbu.render_cells(psi, values, prep.phi.index_select(1, phases))
    via_hr = back_projected_l1(sampled, prep, phases, stencil=None)
    via_stencil = back_projected_l1(sampled, prep, phases, stencil=stencil)
    assert float(via_stencil) == pytest.approx(float(via_hr), rel=1e-6)


def test_fit_objectives_each_lower_their_own_error(rotterdam_ms):
    guide = rotterdam_ms[:3, :96, :96]
    k0 = gu.fit(guide, (12, 12), iters=0)
    gbar = k0._prepared.gbar

    def error(k, consistency):
        out = k.render(gbar, consistency=consistency, kind="continuous")
        return float((out - k.guide).abs().mean())

    bp = gu.fit(guide, (12, 12), iters=30)  # objective="back_projected" by default
    plain = gu.fit(guide, (12, 12), iters=30, objective="plain")
    assert error(bp, 2) < error(k0, 2) and error(plain, 0) < error(k0, 0)
    assert error(bp, 2) < error(plain, 2)  # each is best at what it optimises
    with pytest.raises(ValueError, match="objective"):
        gu.fit(guide, (12, 12), objective="l2")


def test_workspace_reuse_gives_the_same_gradients():
    """A fit's steps write psi, its gradient and the neighbour planes of the coefficients into
    the same buffers (gsjbu.Workspace): the gradients of successive steps equal those computed
    with fresh tensors."""
    from geoupsample.core.objective import back_projected_l1

    torch.manual_seed(5)
    k = gu.fit(torch.rand(3, 48, 40), (6, 5), iters=0, device="cpu")  # the torch path
    prep = k._prepared
    values = gsjbu.neighbours(prep.gbar, k.radius)
    steps = [k.params + 0.1 * torch.randn_like(k.params) for _ in range(3)]

    def grads(workspace: gsjbu.Workspace | None) -> list[torch.Tensor]:
        out = []
        for start in steps:
            p = start.clone().requires_grad_(True)
            psi = prep.psi(p, workspace)
            loss = back_projected_l1(gsjbu.render_cells(psi, values, prep.phi, workspace), prep)
            loss.backward()
            out.append(p.grad)
        return out

    workspace = gsjbu.Workspace()
    for fresh, reused in zip(grads(None), grads(workspace), strict=True):
        torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    # the buffers were used: psi, its gradient, and the neighbours' coefficients and gradients
    assert set(workspace.buffers) == {"psi", "grad_psi", "coef_nb", "coef_nb_grad"}


@pytest.mark.parametrize("method", ["jbu", "gsjbu"])
def test_float64_raster_far_from_zero_keeps_float64_precision(rotterdam_ms, method):
    # northings or elevations: 4e6 + detail, rendered by float32 kernels of an ordinary guide
    guide = rotterdam_ms[:3, :64, :64].astype(np.float32)
    detail = np.random.default_rng(3).random((1, 8, 8))
    far = gu.upsample(4e6 + detail, guide, method=method, iters=3)
    near = gu.upsample(detail, guide, method=method, iters=3)
    assert far.dtype == np.float64
    np.testing.assert_allclose(far - 4e6, near, rtol=0, atol=1e-6)  # float32 alone: ~0.25


@pytest.mark.parametrize("h,hr", [(2, 41), (40, 100), (66, 99), (7, 7), (5, 23)])
def test_nearest_takes_the_cell_whose_footprint_holds_the_pixel_centre(h, hr):
    # ties at half-integer scales (pixel centre on a footprint edge) go to the later cell, as
    # in the cell layout every guided method uses; torch's float 'nearest-exact' rounded some
    # of them down
    from fractions import Fraction

    x = np.arange(h * 3, dtype=np.float32).reshape(1, h, 3)
    out = gu.upsample(x, np.zeros((1, hr, 6), np.float32), method="nearest")[0]
    cell = [int((Fraction(y) + Fraction(1, 2)) / Fraction(hr, h)) for y in range(hr)]
    np.testing.assert_array_equal(out[:, ::2], x[0][cell])
    np.testing.assert_array_equal(out[:, 1::2], x[0][cell])


def test_a_diverging_fit_is_an_error_not_nan_kernels(rotterdam_ms):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        gu.fit(rotterdam_ms[:3, :128, :128], (16, 16), iters=50, lr=10.0)


def test_big_endian_arrays_are_read(rotterdam_ms):
    # netCDF / HDF5 readers hand out big-endian arrays, which torch refuses as they are
    guide = rotterdam_ms[:3, :32, :32].astype(">f4")
    x = np.random.default_rng(0).random((1, 4, 4)).astype(">f8")
    want = gu.upsample(x.astype("<f8"), guide.astype("<f4"), method="bilinear")
    np.testing.assert_array_equal(gu.upsample(x, guide, method="bilinear"), want)


@pytest.mark.parametrize("cells", [(12, 12), (150, 150)])
def test_first_adam_step_is_lr_whatever_the_tile_size(rotterdam_ms, cells):
    """Adam's first step is ``lr * g / (|g| + eps)``. The loss is a mean over the tile, so its
    gradients shrink as ``1 / cells``: with a fixed ``eps`` of 1e-8 this step was 0.91 x ``lr``
    at 150 x 150 cells (and later steps of a 1024 px tile at x8 about 0.7 x), so one scene
    fitted in tiles of two sizes got two different fits."""
    guide = rotterdam_ms[:3]
    k0 = gu.fit(guide, cells, iters=0, device="cpu")
    k1 = gu.fit(guide, cells, iters=1, device="cpu", lr=0.1)
    step = (k1.params - k0.params).abs().flatten()
    moved = step[step > 1e-3]  # parameters with a gradient (not those of flat, clamped cells)
    assert moved.numel() > 0.5 * step.numel()
    assert float(moved.median()) == pytest.approx(0.1, rel=0.02)
