"""The CPU's Numba kernels against the torch path (float64) and the sampled fit's behaviour."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
import torch

import geoupsample as gu
from geoupsample.core import gsjbu, lattice_fit, numba_gsjbu
from geoupsample.core.adam import Adam
from geoupsample.core.objective import detail_l1
from tests.test_gsjbu import CASES, kernels_with, random_params


def _float64_twin(k: gu.Kernels) -> gu.Kernels:
    """The same kernels in float64: they render on the torch path."""
    return gu.Kernels(params=k.params.double(), guide=k.guide.double(), valid=k.valid,
                      radius=k.radius)  # fmt: skip


@pytest.mark.parametrize("hr_shape,lr_shape,bands,radius", CASES)
@pytest.mark.parametrize("channels", [3, numba_gsjbu.CHANNELS_LAST + 4])
def test_render_matches_the_torch_path(hr_shape, lr_shape, bands, radius, channels):
    """Fractional and per-axis scales, nodata holes, radius 1-2, both channel layouts."""
    rng = np.random.default_rng(sum(hr_shape) + bands + channels)
    guide = rng.random((bands, *hr_shape))
    valid = rng.random(hr_shape) > 0.15
    guide[:, ~valid] = 0.0
    scale = (hr_shape[0] / lr_shape[0], hr_shape[1] / lr_shape[1])
    k64 = kernels_with(random_params(lr_shape, scale, rng), guide, valid, radius)
    k32 = gu.Kernels(params=k64.params.float(), guide=k64.guide.float(), valid=k64.valid,
                     radius=radius)  # fmt: skip
    x = rng.normal(size=(channels, *lr_shape))
    ours = k32.render(x.astype(np.float32), consistency=0)
    ref = k64.render(x, consistency=0)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5, equal_nan=True)


def _problem(hr=(40, 36), lr=(10, 9), bands=3, seed=0):
    rng = np.random.default_rng(seed)
    guide = torch.from_numpy(rng.random((bands, *hr)).astype(np.float32))
    guide[:, 3:6, 4:9] = float("nan")  # nodata: invalid pixels and a cell without any
    k = gu.fit(guide, lr, iters=0)
    k.params.copy_(torch.from_numpy(random_params(lr, k.scale, rng)).float())
    return k, k._prepared


@pytest.mark.parametrize("detail", [False, True])
@pytest.mark.parametrize("lattice", [(0, 0, 1, 1), (1, 2, 2, 3)])
def test_fit_step_gradient_equals_autograd(detail, lattice):
    """The hand-written forward and backward of a step, over a lattice of cells and some phases,
    against autograd through the torch path's render (float64)."""
    k, prep = _problem()
    k64 = _float64_twin(k)
    prep64 = k64._prepared
    phases = torch.tensor([0, 3, 5, 10, 15])
    oy, ox, ty, tx = lattice
    h, w = k.lr_shape
    chosen = torch.zeros(h, w, dtype=torch.bool)
    chosen[oy::ty, ox::tx] = True
    params = k64.params.clone().requires_grad_(True)
    rendered = gsjbu.render_cells(prep64.psi(params), gsjbu.neighbours(prep64.gbar, k.radius),
                                  prep64.phi.index_select(1, phases))  # fmt: skip
    pv = prep64.pixel_valid.index_select(1, phases) & chosen.reshape(-1, 1)
    if detail:
        masked = type(prep64)(prep64.layout, prep64.radius, prep64.guide_cells,
                              prep64.pixel_valid & chosen.reshape(-1, 1), prep64.gbar,
                              prep64.cell_valid)  # fmt: skip
        loss = detail_l1(rendered, masked, phases)
    else:
        m = pv[..., None].double()
        err = (rendered - prep64.guide_cells.index_select(1, phases)).abs() * m
        loss = err.sum() / (m.sum() * rendered.shape[2])
    (want,) = torch.autograd.grad(loss, params)

    state = numba_gsjbu.AdamState(k.params.numpy().copy(), 0.1, 1e-8, 3, k.radius)
    grad = state.gradient_buffer(numba_gsjbu.sync_threads())
    total, count = numba_gsjbu.fit_step(state.coef, prep.cells, lattice, phases.numpy(), detail,
                                        grad)  # fmt: skip
    r = k.radius
    got_coef = torch.from_numpy(grad.sum(0)[:, r:-r, r:-r] / count).double()
    p = k64.params.clone().requires_grad_(True)
    torch.stack(gsjbu.kernel_coefficients(p, 3)).backward(got_coef)
    assert total / count == pytest.approx(float(loss.detach()), rel=1e-5)
    torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_adam_step_equals_torch_adam_through_the_coefficients():
    rng = np.random.default_rng(4)
    params = torch.from_numpy(random_params((6, 7), (4.0, 4.0), rng)).float()
    state = numba_gsjbu.AdamState(params.numpy().copy(), lr=0.1, eps=1e-8, bands=3, radius=2)
    ref = params.double().clone().requires_grad_(True)
    adam = Adam(ref, lr=0.1, eps=1e-8)
    grad = state.gradient_buffer(2)
    for step in range(3):
        g = rng.normal(size=(4, 6, 7)).astype(np.float32)
        grad[step % 2, :, 2:-2, 2:-2] = g * 2  # split over two "threads", halved below
        numba_gsjbu.adam_step(state, grad, 0.5)
        assert not grad.any()  # consumed
        torch.stack(gsjbu.kernel_coefficients(ref, 3)).backward(torch.from_numpy(g).double())
        adam.step()
    np.testing.assert_allclose(state.params, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    coef = torch.stack(gsjbu.kernel_coefficients(ref.detach(), 3)).numpy()
    np.testing.assert_allclose(state.coef[:, 2:-2, 2:-2], coef, rtol=2e-5, atol=1e-6)
    assert not state.coef[:, :2].any() and not state.coef[:, :, -2:].any()  # the frame


def test_vectorisable_elementary_functions_are_accurate():
    @numba.njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[0, i] = numba_gsjbu.exp_neg(-abs(x[i]))
            out[1, i] = numba_gsjbu.exp_(x[i])
            out[2, i] = numba_gsjbu.tanh_(x[i] / np.float32(8))
            s, c = numba_gsjbu.sincos_pi(x[i] / np.float32(86))
            out[3, i], out[4, i] = s, c

    x = np.linspace(-86, 86, 100_001).astype(np.float32)
    out = np.empty((5, x.size), np.float32)
    run(x, out)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(out[0], np.exp(-np.abs(xd)), rtol=1e-5)
    np.testing.assert_allclose(out[1], np.exp(xd), rtol=1e-5)
    np.testing.assert_allclose(out[2], np.tanh(xd / 8), rtol=0, atol=3e-7)
    np.testing.assert_allclose(out[3], np.sin(np.pi * xd / 86), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[4], np.cos(np.pi * xd / 86), rtol=0, atol=1e-6)
    below = np.empty((5, 2), np.float32)
    run(np.array([-1e30, -90.0], np.float32), below)
    assert (below[0] == 0).all()  # exp_neg: 0 below its floor, never garbage


@pytest.mark.parametrize("phases,stride,fraction", [
    (4, (4, 5), 1 / 20),  # x2: all 4 pixels of one cell in 20
    (16, (4, 4), 1 / 16),  # x4
    (64, (2, 2), 1 / 16),  # x8: 16 of 64 pixels, one cell in 4
    (256, (1, 1), 1 / 16),  # x16: every cell
])  # fmt: skip
def test_sampling_costs_about_the_same_per_pixel_at_every_scale(phases, stride, fraction):
    s = lattice_fit.Sampling.choose(phases, 1 / 16)
    assert s.stride == stride
    assert s.phases * s.fraction / phases == pytest.approx(fraction)
    # a step's cost per pixel of the tile, visiting a cell counted as CELL_COST pixels
    cost = (s.phases + lattice_fit.CELL_COST) * s.fraction / phases
    assert cost == pytest.approx((16 + lattice_fit.CELL_COST) / 256, rel=0.25)
    full = lattice_fit.Sampling.choose(phases, 1.0)
    assert full.stride == (1, 1) and full.phases == phases


def test_fit_is_deterministic_lowers_its_loss_and_beats_jbu(rotterdam_ms):
    """NIR from RGB, Wald's protocol at x8 on the bundled scene: the fit beats classic JBU."""
    guide = rotterdam_ms[:3, :288, :288]
    nir = torch.from_numpy(rotterdam_ms[3:, :288, :288].astype(np.float32))
    lowres = torch.nn.functional.avg_pool2d(nir[None], 8)[0]
    k = gu.fit(guide, (36, 36), seed=3)
    again = gu.fit(guide, (36, 36), seed=3)
    torch.testing.assert_close(again.params, k.params, rtol=0, atol=0)
    other = gu.fit(guide, (36, 36), seed=4)
    assert not torch.equal(other.params, k.params)
    assert np.mean(k.loss_history[-10:]) < 0.9 * np.mean(k.loss_history[:3])
    jbu = gu.fit(guide, (36, 36), iters=0)
    mse = float(((k.render(lowres) - nir) ** 2).mean())
    mse_jbu = float(((jbu.render(lowres) - nir) ** 2).mean())
    assert mse < 0.9 * mse_jbu, (mse, mse_jbu)


def test_fits_in_several_threads_at_once_equal_sequential_fits(rotterdam_ms):
    """Whole-scene runs fit tiles in several threads: the kernels' thread pool must take
    concurrent launches (with Numba's workqueue layer they are serialised) and give the same
    kernels."""
    guides = [rotterdam_ms[:3, :64, 64 * i : 64 * (i + 1)] for i in range(3)]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [gu.fit(g, (16, 16), iters=10).params for g in guides]
        results: dict[int, torch.Tensor] = {}

        def work(i: int) -> None:
            torch.set_num_threads(1)
            results[i] = gu.fit(guides[i], (16, 16), iters=10).params

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(saved)
    for i in range(3):
        torch.testing.assert_close(results[i], alone[i], rtol=0, atol=0)
