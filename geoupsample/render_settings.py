"""The render settings of a whole-scene run, decided once for the scene so that tiles agree:
the user's overrides (validated), the kind of raster (``auto`` resolved from a sample), and the
unit of self-guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from geoupsample.core import presets
from geoupsample.core.kernels import render_overrides
from geoupsample.core.methods import INTERPOLATIONS
from geoupsample.core.self_guidance import robust_span
from geoupsample.inputs import InputError


def checked_overrides(method: str, **overrides: float | None) -> dict[str, float]:
    """:func:`~geoupsample.core.kernels.render_overrides` of ``method``'s run, validated;
    ``InputError`` for a bad value, or for kernel settings (``self_guidance``, ``min_sigma_r``)
    given to an interpolation, which has no kernels to apply them to."""
    try:
        render = render_overrides(**overrides)
    except (TypeError, ValueError) as err:
        raise InputError(str(err)) from err
    kernel_only = sorted(set(render) - {"consistency"})
    if method in INTERPOLATIONS and kernel_only:
        raise InputError(f"only jbu and gsjbu use {' and '.join(kernel_only)}; {method} has no "
                         "kernels: leave it out or use method gsjbu")
    return render


#: Longest side, in cells, of the decimated sample of a low-res raster that decides its kind.
SAMPLE_SIDE = 1024


def scene_render(method: str, kind: str, sample: Callable[[], torch.Tensor],
                 **overrides: float | None) -> dict[str, Any]:
    """The tiles' rendering arguments, decided once for the scene so that tiles agree.

    Args:
        method: the upsampling method (the interpolations take ``consistency`` alone).
        kind: ``auto`` (resolved here from the sample), ``continuous`` or ``probabilities``.
        sample: returns a decimated sample of the low-res raster ``[C, h', w']`` float, NaN as
            nodata; called only when needed (``auto``, or self-guidance on a continuous
            raster, whose unit is then the sample's robust span).
        overrides: ``consistency``, ``self_guidance``, ``min_sigma_r`` (None = the default).

    Returns:
        ``gu.upsample`` keyword arguments: the overrides, ``kind`` and, where self-guidance
        applies, ``self_guidance_scale`` (1 for probabilities).
    """
    render: dict[str, Any] = checked_overrides(method, **overrides)
    if method in INTERPOLATIONS:
        return render
    x = sample() if kind == "auto" or render.get("self_guidance") else None
    try:
        kind, _ = presets.resolve(kind, x)
    except ValueError as err:
        raise InputError(str(err)) from err
    render["kind"] = kind
    if kind == "probabilities":
        render["self_guidance_scale"] = 1.0  # the same unit in every tile
    elif render.get("self_guidance"):  # the scene's span, not each tile's: tiles agree
        render["self_guidance_scale"] = robust_span(x)
    return render
