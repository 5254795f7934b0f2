"""Rendering in bands of LR rows (geoupsample.core.row_render) equals the whole-tile psi path."""

from __future__ import annotations

import pytest
import torch

import geoupsample as gu
from geoupsample.core import gsjbu, row_render


def _kernels(scale: int = 2) -> gu.Kernels:
    torch.manual_seed(3)
    guide = torch.rand(3, 12 * scale, 10 * scale)
    k = gu.fit(guide, (12, 10), iters=0, device="cpu")  # row_render is the torch path
    k.params = k.params + 0.3 * torch.randn_like(k.params)  # kernels that differ cell by cell
    return k


@pytest.mark.parametrize("keep", [True, False], ids=["weights-kept", "weights-rebuilt"])
def test_bands_of_rows_give_the_whole_tile_values_and_gradients(monkeypatch, keep):
    """Several bands (3 LR rows each), with the weights kept for backward or rebuilt there:
    the output and the gradient of the parameters equal those of psi built for every cell at
    once (AssemblePsi + RenderCells)."""
    k = _kernels()
    prep = k._prepared
    maps = torch.randn(5, *k.lr_shape)
    values = gsjbu.neighbours(maps, k.radius)  # [n, K, 5]
    monkeypatch.setattr(row_render, "BAND_ELEMENTS", 3 * 10 * prep.phi.shape[2] * values.shape[1])
    monkeypatch.setattr(gsjbu, "KEEP_WEIGHTS_ELEMENTS", 1 << 30 if keep else 0)
    assert len(prep.source.bands(prep.phi.shape[2] * values.shape[1])) == 4
    grad_out = torch.randn(prep.phi.shape[0], prep.phi.shape[1], 5)

    def run(banded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p = k.params.clone().requires_grad_(True)
        if banded:
            values_of = row_render.neighbour_values(prep.source, maps)
            out = row_render.render(prep.source, p, values_of, prep.phi)
        else:
            out = gsjbu.render_cells(prep.psi(p), values, prep.phi)
        (out * grad_out).sum().backward()
        return out.detach(), p.grad

    for ours, ref in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_render_in_bands_equals_the_whole_tile_render(monkeypatch):
    """Kernels.render with bands of one LR row equals one band for the whole tile."""
    k = _kernels(scale=3)
    x = torch.randn(4, *k.lr_shape)
    whole = k.render(x, consistency=0)
    monkeypatch.setattr(gsjbu, "CHUNK_ELEMENTS", 1)
    banded = gu.Kernels(params=k.params, guide=k.guide, valid=k.valid, radius=k.radius)
    torch.testing.assert_close(banded.render(x, consistency=0), whole, rtol=1e-5, atol=1e-6)


def test_fit_and_render_at_x2_never_allocate_psi_for_the_whole_tile(monkeypatch):
    """At x2 ``psi`` for every cell would be (6 + d) K numbers per 4 pixels (318 MB here, 715 MB
    for a 1152² tile with 4 bands): no single allocation of a fit or render comes near it. The
    budget for what may be kept whole (weights, neighbour values) is cut to 4 MB here, as a
    1152² tile exceeds the real one."""
    monkeypatch.setattr(gsjbu, "KEEP_WEIGHTS_ELEMENTS", 1 << 20)
    torch.manual_seed(0)
    guide = torch.rand(4, 768, 768)
    whole_psi_bytes = 384 * 384 * (gsjbu.N_SPATIAL + 1 + 4) * 49 * 4
    with torch.profiler.profile(profile_memory=True) as prof:
        k = gu.fit(guide, (384, 384), iters=2)
        k.render(torch.rand(2, 384, 384))
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < largest < whole_psi_bytes / 4
