"""The CPU fit: Adam steps, each on a lattice of cells and a few pixels of each (Numba kernels).

Every LR cell carries its own kernel, and a fit step that visits every cell costs the same per
*cell* whatever the scale: at x2 a cell holds 4 pixels, at x16 256, so a fit that touched every
cell at every step cost 12 times more per output pixel at x2 than at x8. Here each step visits
the cells of a lattice, every ``ty``-th row and ``tx``-th column of cells from a random offset, and
``m`` random pixels (phases) of each, so that a step costs about the same per pixel of the tile
at every scale (:class:`Sampling`). The offsets cycle through all ``ty tx`` positions in a
random order, so every cell enters the loss equally often; a cell's kernel also moves whenever a
cell within ``radius`` of it is visited, which is most steps.

The gradient flows from the sampled pixels to the coefficient maps of their neighbours
(:func:`numba_gsjbu.fit_step`), then through the coefficients to the raw parameters, with the
Adam update, in one pass over the cells (:func:`numba_gsjbu.adam_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from geoupsample.core import numba_gsjbu

#: Most phases (pixels) of one cell in a step: a cell's neighbours are gathered once per step,
#: so several pixels per visited cell share that cost.
PHASES_PER_CELL = 16
#: The work of visiting a cell in a step (gathering its neighbourhood, adding the gradient back),
#: in pixels' worth: measured about 140 ns per cell against 90 ns per sampled pixel on 2 cores.
CELL_COST = 1.5


@dataclass(frozen=True)
class Sampling:
    """Which pixels a step of the fit sees: the cells of a lattice of strides ``(ty, tx)``
    (every ``ty``-th row and ``tx``-th column of cells) and ``phases`` random phases of each."""

    stride: tuple[int, int]
    phases: int

    @classmethod
    def choose(cls, n_phases: int, sample: float) -> Sampling:
        """The lattice and phases for cells of ``n_phases`` pixels (``P``) so that a step costs
        about what ``sample`` of the pixels cost in cells of 16 or more, at every scale.

        ``m = min(P, max(16, ceil(sample P)))`` phases per visited cell; visiting a cell costs
        as much as :data:`CELL_COST` pixels, so one cell in ``ty tx ~ (m + CELL_COST) /
        (P sample (1 + CELL_COST / 16))`` is visited. x16 and x8 see ``sample`` of the pixels
        (every cell at x16, one in 2 x 2 at x8); x4 one cell in 4 x 4, all of its pixels; x2,
        whose cells hold 4 pixels, one in 4 x 5 (1/20 of the pixels for ``sample = 1/16``).
        ``sample = 1`` sees every pixel at every step."""
        if sample >= 1:
            return cls(stride=(1, 1), phases=n_phases)
        m = min(n_phases, max(PHASES_PER_CELL, math.ceil(sample * n_phases)))
        budget = sample * (1 + CELL_COST / PHASES_PER_CELL)
        cells = max(1.0, (m + CELL_COST) / (n_phases * budget))
        ty = max(1, round(math.sqrt(cells)))
        tx = max(1, round(cells / ty))
        return cls(stride=(ty, tx), phases=m)

    @property
    def fraction(self) -> float:
        """Fraction of the cells visited at each step."""
        return 1.0 / (self.stride[0] * self.stride[1])


def fit_cells(
    prep,
    params: torch.Tensor,
    iters: int,
    lr: float,
    eps: float,
    sample: float,
    detail: bool,
    seed: int,
) -> tuple[torch.Tensor, list[float]]:
    """Fit the raw parameters ``params [4, h, w]`` (float32, CPU) to ``prep`` (the guide in cell
    layout, :class:`geoupsample.core.kernels._Prepared`): ``iters`` Adam steps of rate ``lr``,
    each on about ``sample`` of the pixels (:class:`Sampling`), of the L1 error of the guide
    rebuilt from its cell means (less each visited cell's mean error when ``detail``).

    Returns:
        The fitted parameters and the loss of each step (the mean over its sampled pixels,
        before its update).
    """
    cells = numba_gsjbu.CellTensors.of(prep)
    bands = cells.bands
    sampling = Sampling.choose(cells.n_phases, sample)
    ty, tx = sampling.stride
    state = numba_gsjbu.AdamState(params.detach().cpu().float().numpy().copy(), lr, eps, bands,
                                  cells.radius)
    grad = state.gradient_buffer(numba_gsjbu.sync_threads())
    generator = torch.Generator().manual_seed(int(seed))
    all_phases = np.arange(cells.n_phases, dtype=np.int64)
    offsets: list[int] = []
    history = []
    for _ in range(int(iters)):
        if not offsets:  # every lattice position once per round, in a random order
            offsets = torch.randperm(ty * tx, generator=generator).tolist()
        offset = offsets.pop()
        if sampling.phases < cells.n_phases:
            phases = torch.randperm(cells.n_phases, generator=generator)[: sampling.phases]
            phases = np.sort(phases.numpy()).astype(np.int64)
        else:
            phases = all_phases
        lattice = (offset // tx, offset % tx, ty, tx)
        loss, count = numba_gsjbu.fit_step(state.coef, cells, lattice, phases, detail, grad)
        numba_gsjbu.adam_step(state, grad, 1.0 / max(count, 1))
        history.append(loss / max(count, 1))
    return torch.from_numpy(state.params), history
