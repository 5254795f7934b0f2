"""Which path computes the GSJBU fit step and render: fused Triton kernels or plain torch.

``auto`` (the default) takes the Triton kernels (:mod:`geoupsample.core.triton_gsjbu`) for float32
tensors on a CUDA device when Triton imports, the Numba kernels
(:mod:`geoupsample.core.numba_gsjbu`) for float32 tensors on the CPU, and the torch path of
:mod:`geoupsample.core.gsjbu` otherwise (float64 kernels, CUDA without Triton). The environment
variable ``GEOUPSAMPLE_BACKEND`` forces a path:

* ``torch``: always the torch path (on the CPU: float64 fits stay float64);
* ``numba``: the Numba kernels, or an error saying why they cannot run (CPU, float32 only);
* ``triton``: the Triton kernels, or an error saying why they cannot run. On the CPU this works
  only under Triton's interpreter (``TRITON_INTERPRET=1``; slow, for tests).

A CPU fit on the ``auto`` or ``numba`` path runs in float32 whatever the guide's dtype (the
guide is normalised to about [0, 1] first); :func:`fit_path` says which path a fit takes.

``triton_gsjbu`` (and with it ``triton``) is imported only when the Triton path may be taken.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from geoupsample.core import gsjbu
from geoupsample.core.layout import CellLayout

#: Environment variable that forces a backend: ``auto`` (default), ``torch`` or ``triton``.
ENV = "GEOUPSAMPLE_BACKEND"
CHOICES = ("auto", "torch", "triton", "numba")
#: Fit objectives the Numba kernels implement (the others take the torch path).
NUMBA_OBJECTIVES = ("detail", "plain")

FitStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RenderChunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_render(phi: torch.Tensor, psi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[n, P, C]`` = softmax weights ``[n, P, K]`` of ``phi @ psi`` times ``values [n, K, C]``."""
    return torch.bmm(gsjbu.chunk_weights(phi, psi), values)


def choice() -> str:
    """The path asked for by ``GEOUPSAMPLE_BACKEND`` (``"auto"`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {CHOICES}; got {value!r}")
    return value


def fit_path(device: torch.device, objective: str) -> str:
    """``"numba"``, ``"triton"`` or ``"torch"``: the path of a fit on ``device`` with
    ``objective``. On the CPU, ``auto`` takes the Numba kernels (in float32) for the objectives
    they implement (:data:`NUMBA_OBJECTIVES`) and the torch path for the others."""
    asked = choice()
    if device.type == "cpu" and asked in ("auto", "numba"):
        if objective in NUMBA_OBJECTIVES:
            return "numba"
        if asked == "numba":
            raise RuntimeError(f"{ENV}=numba but the Numba kernels fit the objectives "
                               f"{NUMBA_OBJECTIVES}, not {objective!r}")
        return "torch"
    return name(torch.empty(0, device=device))


def name(like: torch.Tensor) -> str:
    """``"triton"``, ``"numba"`` or ``"torch"``: the path for work on ``like``'s device and
    dtype."""
    asked = choice()
    if asked == "torch":
        return "torch"
    cpu32 = like.device.type == "cpu" and like.dtype == torch.float32
    if asked == "numba" and not cpu32:
        raise RuntimeError(f"{ENV}=numba but the Numba kernels take float32 tensors on the CPU, "
                           f"not {like.dtype} on {like.device}")
    if asked in ("auto", "numba") and cpu32:
        return "numba"
    if asked == "auto" and (like.device.type != "cuda" or like.dtype != torch.float32):
        return "torch"
    from geoupsample.core import triton_gsjbu

    if asked == "auto":
        return "triton" if triton_gsjbu.available(like.device) else "torch"
    if not triton_gsjbu.available(like.device, interpreter=True):
        raise RuntimeError(
            f"{ENV}=triton but the Triton kernels cannot run on {like.device}: they need triton "
            "and a CUDA device (or, on the CPU, TRITON_INTERPRET=1 set before the first use)"
        )
    if like.dtype != torch.float32:
        raise RuntimeError(f"{ENV}=triton but the Triton kernels take float32, not {like.dtype}")
    return "triton"


def fit_step(like: torch.Tensor) -> FitStep:
    """The ``fit_loss_and_grad`` to use for tensors like ``like`` (same signature as gsjbu's)."""
    if name(like) == "triton":
        from geoupsample.core import triton_gsjbu

        return triton_gsjbu.fit_loss_and_grad
    return gsjbu.fit_loss_and_grad


def render_chunk(like: torch.Tensor) -> RenderChunk:
    """The ``(phi, psi, values) -> [n, P, C]`` render to use for tensors like ``like``."""
    if name(like) == "triton":
        from geoupsample.core import triton_gsjbu

        return triton_gsjbu.render
    return torch_render


def build_psi(
    params: torch.Tensor,
    gbar: torch.Tensor,
    cell_valid: torch.Tensor,
    layout: CellLayout,
    radius: int,
    geometry: gsjbu.PsiGeometry | None = None,
    workspace: gsjbu.Workspace | None = None,
) -> torch.Tensor:
    """``psi [n, 6 + d, K]`` from ``params [4, h, w]`` (see :func:`gsjbu.build_psi`), on the path
    :func:`name` picks for ``params``: one fused kernel (and one for its backward) with Triton.
    ``geometry`` and ``workspace`` (torch path only) are reused instead of rebuilt.
    """
    if name(params) == "triton":
        from geoupsample.core import triton_gsjbu

        return triton_gsjbu.build_psi(params, gbar, cell_valid, layout, radius)
    return gsjbu.build_psi(params, gbar, cell_valid, layout, radius, geometry, workspace)


def adam_fit(
    prep: Any, params: torch.Tensor, values: torch.Tensor, lr: float, eps: float
) -> Any | None:
    """The fused Triton Adam loop (:class:`triton_gsjbu.AdamFit`) for this fit, or ``None``.

    ``None`` means the torch path (autograd + :class:`geoupsample.core.adam.Adam`). ``prep``
    holds the fit's prepared tensors (``gbar``, ``cell_valid``, ``layout``, ``radius``, ``phi``,
    ``guide_cells``, ``pixel_valid``); ``values`` are the neighbours' cell means ``[n, K, d]``;
    ``lr`` and ``eps`` are Adam's (``eps`` scaled to the loss: :func:`kernels.adam_eps`).
    """
    if name(prep.phi) != "triton":
        return None
    from geoupsample.core import triton_gsjbu

    return triton_gsjbu.AdamFit(
        params, prep.gbar, prep.cell_valid, prep.layout, prep.radius, prep.phi, values,
        prep.guide_cells, prep.pixel_valid, lr=lr, eps=eps,
    )  # fmt: skip
